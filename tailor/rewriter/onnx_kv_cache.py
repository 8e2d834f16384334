"""A decoder's KV cache inputs and outputs (Optimum's `text-generation-with-past` exports), kept
consistent with the rewrites.

Each attention layer reads `past_key_values.N.key` / `.value` [B, kv heads, past, D] and appends
its own keys and values (a Concat on the length axis), which it attends over and returns as
`present.N.key` / `.value`. A rewrite that changes the layer's KV heads changes the cache's declared
head count; a layer whose attention no longer reads its cache (skipped, made constant, or reading
another layer's through KV sharing) loses its cache I/O; the caches left are numbered 0..n-1 again
in model order, as runtimes that feed present back as past expect (Optimum pairs them by order,
onnxruntime-genai by the number in the name).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from tailor.core.errors import TailorError
from tailor.rewriter.onnx_check import is_past_input

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
ROLES = ("key", "value")


@dataclass
class CacheEntry:
    """One of a layer's two caches: the past input, the Concat appending this step's tensor to it,
    and the graph output returning the result (present)."""
    role: str
    past: ir.Value
    concat: ir.Node
    present: ir.Value | None

    @property
    def attended(self) -> ir.Value:
        """The whole cache as the layer attends over it (the Concat's output)."""
        return self.concat.outputs[0]


def check_not_merged(model: ir.Model, where) -> None:
    """Refuse a merged decoder (older Optimum's decoder_model_merged.onnx: the no-past and
    with-past graphs as two branches of an If, chosen by the use_cache_branch input): its layers
    live in the branches' subgraphs, which tailor does not rewrite."""
    if any(v.name == "use_cache_branch" for v in model.graph.inputs):
        raise TailorError(f"{where}: a merged decoder (use_cache_branch input, both graphs in an If node) "
                          f"is not supported; give tailor the decoder with past alone "
                          f"(decoder_with_past_model.onnx, or optimum-onnx's model.onnx)")


def has_cache(model: ir.Model) -> bool:
    return any(is_past_input(v.name) for v in model.graph.inputs)


def _entry(model: ir.Model, past: ir.Value) -> CacheEntry:
    match = PAST.match(past.name or "")
    concats = [u.node for u in past.uses() if u.node.op_type == "Concat"]
    if match is None or len(concats) != 1:
        raise TailorError(f"the KV cache input '{past.name}' is not appended to by one Concat "
                          f"(past_key_values.N.key/value as Optimum exports them)")
    out = concats[0].outputs[0]
    outputs = set(model.graph.outputs)
    present = out if out in outputs else next(
        (u.node.outputs[0] for u in out.uses()
         if u.node.op_type == "Identity" and u.node.outputs[0] in outputs),
        None)
    return CacheEntry(match.group(2), past, concats[0], present)


def cache_entries(model: ir.Model) -> list[CacheEntry]:
    """Every KV cache input of the model with its Concat and present output, in input order."""
    return [_entry(model, v) for v in model.graph.inputs if is_past_input(v.name)]


def layer_cache(model: ir.Model, nodes: set[ir.Node]) -> dict[str, CacheEntry]:
    """The caches whose Concat is among `nodes` (one attention's), by role."""
    return {e.role: e for e in cache_entries(model) if e.concat in nodes}


def check_caches(model: ir.Model, attention_nodes: list[set[ir.Node]]) -> None:
    """Refuse caches tailor cannot keep consistent: each layer's attention must append to one key
    and one value cache of its own, and every cache must belong to one layer."""
    entries = cache_entries(model)
    found = 0
    for layer, nodes in enumerate(attention_nodes):
        mine = [e for e in entries if e.concat in nodes]
        if sorted(e.role for e in mine) != list(ROLES) or any(e.present is None for e in mine):
            raise TailorError(f"layer {layer}: its attention does not append to one key and one value "
                              f"cache returned as present outputs; tailor cannot keep this export's KV "
                              f"cache consistent")
        found += len(mine)
    if found != len(entries):
        raise TailorError(f"{len(entries) - found} KV cache inputs belong to no attention layer; tailor "
                          f"cannot keep this export's KV cache consistent")


def set_cache_heads(model: ir.Model, nodes: set[ir.Node], kv_heads: int) -> None:
    """The declared head count (axis 1) of one layer's cache inputs and outputs."""
    for e in layer_cache(model, nodes).values():
        for v in (e.past, e.present, e.attended):
            if v is not None and v.shape is not None and len(v.shape) == 4:
                dims = list(v.shape)
                dims[1] = kv_heads
                v.shape = ir.Shape(dims)


def read_other_cache(model: ir.Model, layer_nodes: set[ir.Node], source_nodes: set[ir.Node]) -> None:
    """The layer attends over the source layer's whole caches (its past and this step's keys and
    values, as the source appends them) instead of its own, which it then no longer reads."""
    mine, theirs = layer_cache(model, layer_nodes), layer_cache(model, source_nodes)
    for role in ROLES:
        if role in mine and role in theirs:
            for use in _attention_reads(mine[role]):
                use.node.replace_input_with(use.idx, theirs[role].attended)


def _attention_reads(e: CacheEntry) -> list:
    """The uses of the appended cache by the attention: all but the Identity writing present."""
    writer = e.present.producer() if e.present is not None and e.present is not e.attended else None
    return [u for u in e.attended.uses() if u.node is not writer]


def drop_unread_caches(model: ir.Model) -> None:
    """Remove the caches no attention reads any more (dead nodes already swept: only their present
    output does), then number the rest 0..n-1 in model order. Another reader of a removed past
    input (the exporter takes the past length from layer 0's key) reads a kept one of the same
    role instead."""
    entries = cache_entries(model)
    unread = [e for e in entries if not _attention_reads(e)]
    kept = [e for e in entries if e not in unread]
    if unread and not kept:
        raise TailorError("the rewritten decoder reads none of its KV caches: no layer attends any more")
    outputs = model.graph.outputs
    for e in unread:
        replacement = next((k.past for k in kept if k.role == e.role), kept[0].past)
        for use in list(e.past.uses()):
            if use.node is not e.concat:
                use.node.replace_input_with(use.idx, replacement)
        if e.present is not None:
            outputs.pop(list(outputs).index(e.present))
    if unread:
        common_passes.RemoveUnusedNodesPass()(model)  # the Concats, and what fed only them
        inputs = model.graph.inputs
        for e in unread:
            inputs.pop(list(inputs).index(e.past))
    _renumber(model, kept)


def _renumber(model: ir.Model, entries: list[CacheEntry]) -> None:
    layers = sorted({int(PAST.match(e.past.name).group(1)) for e in entries})
    number = {old: new for new, old in enumerate(layers)}
    final = [(e, number[int(PAST.match(e.past.name).group(1))]) for e in entries]
    for e, _ in final:  # first out of the way: a new name may still be an old one's
        e.past.name = f"{e.past.name}.renumbered"
        if e.present is not None:
            e.present.name = f"{e.present.name}.renumbered"
    for e, n in final:
        e.past.name = f"past_key_values.{n}.{e.role}"
        if e.present is not None:
            e.present.name = f"present.{n}.{e.role}"
