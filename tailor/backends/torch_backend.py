"""The torch backend: a transformers model, edited through tailor.rewriter.torch_surgery.

Modules are found from the weight names recognition recorded. Signals come from forward hooks;
attention patterns run through transformers' attention interface (rewriter.modules.sparse_attention)
and are measured with the layers before the one measured replaying their recorded outputs.
"""
from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tailor.backends.attention_proxy import PROXY_BLOCK, PROXY_ROWS, output_factor, pattern_errors
from tailor.backends.base import (
    Backend,
    BlockTrace,
    Branches,
    BranchSums,
    HeadInput,
    PatternRunner,
    ProfileBatch,
    branch_projection,
)
from tailor.backends.export import export_onnx
from tailor.backends.retrieval_gates import fit_gates
from tailor.backends.runners import HFModel, kept_positions, takes_logits_to_keep
from tailor.core.devices import module_device
from tailor.core.dispatch import execution_device, is_dispatched, shared_hook_state, tensor
from tailor.core.errors import TailorError
from tailor.core.patterns import Pattern
from tailor.data.calibration import Inputs, batches
from tailor.rewriter.graph import Projection, TransformerGraph
from tailor.rewriter.modules.int8_linear import METHOD as INT8_METHOD
from tailor.rewriter.modules.shared_kv import SharedKVAttention
from tailor.rewriter.modules.sparse_attention import IMPLEMENTATION, dispatching_module, install, register
from tailor.rewriter.torch_surgery import (
    add_bias,
    attention_path,
    block_path,
    clone_modules,
    ffn_path,
    module_path,
    reconstruct_inputs,
    remove_layers,
    replace_weights,
    replace_with_constant,
    set_module,
    slice_linear,
    to_int8,
)

# the original architecture of a rewritten model: tailor.load rebuilds it and replays the plan
BASE_CONFIG = "base_config.json"
# tokens a block trace's batch takes at most. Larger than calibration's BATCH_TOKENS, which bounds
# logits: the traces run the head on one position. Fewer batches mean fewer per-batch grams
# copied to the host and summed there (an 8B model's 32 down-projection grams are 26 GB a batch)
TRACE_TOKENS = 8192


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class TorchBackend(Backend):
    format = "torch"
    edits_post_norm_branches = False
    profiles_patterns_cheaply = True
    slices_in_out_layout = False
    quantizes_int8 = True
    int8_method = INT8_METHOD
    int8_formats = ("safetensors",)   # float weights, quantized again by tailor.load (plan.json)

    def __init__(self, model: nn.Module, graph: TransformerGraph, *, edited: bool = False):
        super().__init__(model, graph)
        self.edited = edited
        self._not_own: set[int] = set()   # ids of the modules a clone shares with its original

    def clone(self, from_layer: int = 0) -> "TorchBackend":
        """A copy whose modules are new but whose Parameters are this model's own: a variant costs
        only the weights its edits replace (an 8B model measured option by option would otherwise
        hold two copies). Safe because no edit writes into a Parameter (tailor.rewriter.torch_surgery).
        A dispatched model's copy keeps accelerate's hooks, and shares the weights they hold. The
        blocks before `from_layer` stay this model's own modules in the copy's list: half the copying
        of an option measured alone, on average."""
        shared = {id(p): p for p in self.model.parameters()} | shared_hook_state(self.model)
        blocks = self._blocks()
        kept = blocks[:from_layer] if len(blocks) == self.graph.num_layers else []
        shared |= {id(b): b for b in kept}
        copy = TorchBackend(clone_modules(self.model, shared), self.graph, edited=self.edited)
        copy._not_own = {id(m) for b in kept for m in b.modules()}
        return copy

    def close(self) -> None:
        """Frees a copy now: accelerate gives each module of a dispatched model a forward that is
        a partial of the module itself (and keeps the old one, bound to it), a reference cycle, so
        a dropped copy of one, edited weights and all, waited for the garbage collector's next full
        pass (in the two-GPU split of the 8B shape the search held 66 GiB against 31 unsplit).
        Only the modules this copy made: the blocks it shares with its original keep theirs."""
        for module in self.model.modules():
            if id(module) not in self._not_own:
                for name in ("forward", "_old_forward"):
                    module.__dict__.pop(name, None)

    def runnable(self) -> nn.Module:
        return HFModel(self.model)

    def block_traces(self, ids: Inputs, visit: Callable[[int, BlockTrace], None]) -> None:
        model, graph = self.model, self.graph
        seen: dict[str, list] = {k: [None] * graph.num_layers
                                 for k in ("in", "ffn", "attn", "o", "down", "k")}
        main = module_device(model)

        def save_input(kind, i):
            def hook(mod, args, kwargs):
                seen[kind][i] = args[0] if args else kwargs["hidden_states"]
            return hook

        def save_output(kind, i):
            def hook(mod, args, out):
                seen[kind][i] = _first(out)
            return hook

        def block_done(i):
            # the block's last hook: its trace is whole, visited and dropped before the next block
            # runs, so a forward holds one layer's tensors, not every layer's (SmolLM2's 30 layers
            # of 4 × 512 tokens: 1.1 GB)
            def hook(mod, args, out):
                out = _first(out)
                # a block's input arrives from where the block before ran (a model split by
                # accelerate moves it inside the block's forward, after the hooks here saw it):
                # each layer's values where the layer runs; keys, compared across layers, on one device
                here = out.device
                trace = BlockTrace(seen["in"][i].to(here), out,
                                   *(seen[k][i].to(here) for k in ("ffn", "attn", "o", "down")),
                                   seen["k"][i].to(main))
                for values in seen.values():
                    values[i] = None
                visit(i, trace)
            return hook

        hooks = []
        for b in graph.blocks:
            i, sub = b.index, model.get_submodule
            block = sub(block_path(model, b))
            o, down = sub(module_path(b.attn.o.weight.name)), sub(module_path(b.ffn.down.weight.name))
            hooks += [
                block.register_forward_pre_hook(save_input("in", i), with_kwargs=True),
                o.register_forward_pre_hook(save_input("o", i), with_kwargs=True),
                down.register_forward_pre_hook(save_input("down", i), with_kwargs=True),
                # the branches' outputs are their last projections' outputs (not the modules
                # around them, which in post-norm models include the residual add and the norm)
                down.register_forward_hook(save_output("ffn", i)),
                o.register_forward_hook(save_output("attn", i)),
                sub(module_path(b.attn.k.weight.name)).register_forward_hook(save_output("k", i)),
                block.register_forward_hook(block_done(i)),
            ]
        run = self.runnable()
        try:
            for chunk in batches(ids, len(ids), tokens=TRACE_TOKENS):
                with torch.no_grad():  # the head on one position: nothing here reads the logits
                    run(chunk, positions=torch.tensor([chunk.shape[1] - 1]))
        finally:
            for h in hooks:
                h.remove()

    def _blocks(self) -> list[nn.Module]:
        """The blocks in order (of a model with some removed: those kept)."""
        path = block_path(self.model, self.graph.blocks[0])
        parent, _, idx = path.rpartition(".")
        blocks = self.model.get_submodule(parent) if idx.isdigit() else None
        return list(blocks) if isinstance(blocks, nn.ModuleList) else []

    def input_batches(self, ids: Inputs, batch: int = 4) -> list[torch.Tensor]:
        """On the host, `batch` rows of at most BATCH_TOKENS tokens; on a GPU, as many rows as
        TRACE_TOKENS allow: there a forward costs its kernel launches whatever its batch
        (SmolLM2-135M on an H200: 31 ms for 4 × 512 tokens, 30 ms for 12 × 512), and a compile
        measures its options by the hundred."""
        if module_device(self.model).type == "cpu":
            return batches(ids, batch)
        return batches(ids, max(batch, len(ids)), tokens=TRACE_TOKENS)

    def replay_start(self, layer: int) -> int:
        return replayed_before(layer) if len(self._blocks()) == self.graph.num_layers else 0

    def record_blocks(self, ids: Inputs, batch: int = 4) -> list[list] | None:
        """Per batch, the block outputs a replay starts from (`_recorded_outputs`): the base model
        run, not the head (a 49K vocabulary's logits of 2048 tokens were a quarter of the work)."""
        if len(self._blocks()) != self.graph.num_layers:
            return None
        record: list = []
        for _ in self.stream(ids, batch, head_inputs=True, record=record):
            pass
        return record

    def reference_with_record(self, ids: Inputs, positions: torch.Tensor | None = None,
                              batch: int = 4) -> tuple[list, list[list] | None]:
        if len(self._blocks()) != self.graph.num_layers:
            return super().reference_with_record(ids, positions, batch)
        record: list = []
        return list(self.stream(ids, batch, positions=positions, head_inputs=True, record=record)), record

    def stream(self, ids: Inputs, batch: int = 4, replay: tuple[list, int] | None = None,
               positions: torch.Tensor | None = None, head_inputs: bool = False,
               record: list | None = None) -> Iterator[torch.Tensor | HeadInput]:
        """`record`: a list each batch's block outputs are appended to as they are computed
        (what `record_blocks` gives), where the model's blocks are known."""
        split = split_head(self.model) if head_inputs and self.graph.task == "causal-lm" else None
        run = self.runnable() if split is None else functools.partial(head_input, *split)
        replayed, layer = replay if replay is not None else (None, 0)
        blocks = self._blocks() if replayed is not None or record is not None else []
        for i, chunk in enumerate(self.input_batches(ids, batch)):
            frozen = (contextlib.nullcontext() if replayed is None
                      else _frozen_prefix(blocks, layer, replayed[i]))
            recording = contextlib.nullcontext() if record is None else _recorded_outputs(blocks)
            with torch.no_grad(), frozen, recording as outputs:
                out = run(chunk, positions=positions)
            if record is not None:
                record.append(outputs)
            yield out

    def projection_weight(self, p: Projection) -> np.ndarray:
        # to the CPU in the model's dtype (half the bytes of float64), then widened
        w = tensor(self.model.get_submodule(module_path(p.weight.name)), "weight", "cpu").double()
        return (w if p.layout == "out_in" else w.T).numpy()

    # ---- edits ----

    def _edit(self) -> nn.Module:
        self.edited = True
        return self.model

    def remove_blocks(self, layers: list[int]) -> None:
        model = self._edit()
        remove_layers(model, [block_path(model, self.graph.blocks[i]) for i in layers])

    def constant_branch(self, layer: int, kind: str, mean) -> None:
        model, b = self._edit(), self.graph.blocks[layer]
        path = attention_path(model, b) if kind == "attn" else ffn_path(model, b)
        # HF attention modules return (output, weights); MLPs return the output
        replace_with_constant(model, path, self.graph.hidden_size, returns_tuple=kind == "attn", mean=mean)

    def keep_outputs(self, p: Projection, rows) -> None:
        slice_linear(self._edit(), p, rows=torch.as_tensor(rows, dtype=torch.long))

    def keep_inputs(self, p: Projection, cols, gram: np.ndarray | None) -> None:
        model, cols = self._edit(), torch.as_tensor(cols, dtype=torch.long)
        if gram is not None:
            reconstruct_inputs(model, p, cols, gram)
        else:
            slice_linear(model, p, cols=cols)
            add_bias(model, p, torch.zeros(p.out_features))

    def set_heads(self, layer: int, kv_heads: int, queries_per_group: int) -> None:
        a = self.graph.blocks[layer].attn
        attn = self._edit().get_submodule(attention_path(self.model, self.graph.blocks[layer]))
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = queries_per_group
        elif queries_per_group != a.num_heads // a.num_kv_heads:
            raise TailorError(f"layer {layer}: {type(attn).__name__} has no num_key_value_groups; "
                              f"only whole KV groups can be pruned there")

    def set_ffn_width(self, layer: int, width: int) -> None:
        """Nothing to do: the FFN's modules take their widths from their weights."""

    def share_kv(self, layer: int, source: int) -> None:
        model = self._edit()
        own, src = self.graph.blocks[layer], self.graph.blocks[source]
        path = attention_path(model, own)
        rel = len(path) + 1
        shared = SharedKVAttention(model.get_submodule(path), own,
                                   model.get_submodule(module_path(src.attn.k.weight.name)),
                                   model.get_submodule(module_path(src.attn.v.weight.name)),
                                   module_path(own.attn.q.weight.name)[rel:],
                                   module_path(own.attn.o.weight.name)[rel:])
        set_module(model, path, shared)

    def runs_patterns(self, layer: int) -> bool:
        attn = self.model.get_submodule(attention_path(self.model, self.graph.blocks[layer]))
        return dispatching_module(attn) is not None

    def set_patterns(self, layer: int, patterns: list[Pattern | None]) -> None:
        model = self._edit()
        install(model, model.get_submodule(attention_path(model, self.graph.blocks[layer])), patterns)

    def int8_refusal(self, projections: list[Projection]) -> str | None:
        engine = torch.backends.quantized.engine
        if engine not in ("x86", "fbgemm", "onednn"):
            return f"PyTorch's INT8 kernels run on x86 CPUs (engine x86, fbgemm or onednn), not {engine}"
        if is_dispatched(self.model):
            return "INT8 runs torch models on the CPU (PyTorch's dynamic quantization), not dispatched ones"
        device = module_device(self.model)
        if device.type != "cpu":
            return f"INT8 runs torch models on the CPU (PyTorch's dynamic quantization), not on {device}"
        for p, module in self._present(projections):
            if not isinstance(module, nn.Linear):
                path, kind = module_path(p.weight.name), type(module).__name__
                return f"INT8 runs nn.Linear projections; {path} is a {kind}"
            if module.weight.dtype != torch.float32:
                return f"INT8 quantizes float32 weights; this model is in {module.weight.dtype}"
        return None

    def _present(self, projections: list[Projection]) -> list[tuple[Projection, nn.Module]]:
        """The projections still in the model, with their modules (a rewrite removed the others:
        a skipped layer, a branch made constant)."""
        out = []
        for p in projections:
            with contextlib.suppress(AttributeError):
                out.append((p, self.model.get_submodule(module_path(p.weight.name))))
        return out

    def int8_projections(self, projections: list[Projection]) -> None:
        refusal = self.int8_refusal(projections)
        if refusal is not None:
            raise TailorError(refusal)
        model = self._edit()
        for p, _ in self._present(projections):
            to_int8(model, p)

    # ---- measuring and refitting ----

    def pattern_runner(self) -> PatternRunner:
        return TorchPatternRunner(self.model, self.graph)

    def branches(self, dense: Backend, removed: set[int]) -> Branches:
        return TorchBranches(dense.model, self.model, self.graph, removed)

    # ---- writing ----

    def save(self, folder: Path, formats: tuple[str, ...], *, base_config: dict | None = None) -> None:
        """safetensors (+ config.json; a rewritten model also `base_config`, the original
        architecture, as BASE_CONFIG) and/or model.onnx."""
        if "safetensors" in formats:
            self.model.save_pretrained(folder, safe_serialization=True)
            if self.edited and base_config is not None:
                (folder / BASE_CONFIG).write_text(json.dumps(base_config, indent=2, default=str))
        if "onnx" in formats:
            export_onnx(self.model, folder / "model.onnx", encoder=self.graph.task == "encoder")


# config values of transformers models that change the logits after the head (Gemma 2's soft
# capping, Cohere's scale, Granite's divisor): their logits are not the head's output alone
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(the base model, the LM head) of a transformers causal LM whose logits are the head of the
    base model's last hidden state; None where that is not known to hold (a model dispatched by
    accelerate, whose hooks move inputs from the top module down, included)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    config = getattr(model, "config", None)
    if (not isinstance(head, nn.Linear) or not isinstance(base, nn.Module) or is_dispatched(model)
            or any(getattr(config, k, None) is not None for k in _LOGIT_TRANSFORMS)):
        return None
    return base, head


def _project(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return head(hidden.to(head.weight.device))


def head_input(base: nn.Module, head: nn.Linear, ids: torch.Tensor,
               positions: torch.Tensor | None = None) -> HeadInput:
    """What the model's logits on ids [B, T] (at `positions` only, where given) would be computed
    from: the base model's last hidden state there, and the head."""
    hidden = base(input_ids=ids.to(module_device(base)), use_cache=False)[0]
    if positions is not None:
        hidden = hidden[:, positions.to(hidden.device)]
    return HeadInput(hidden, functools.partial(_project, head), head.weight.shape[0])


# ---- attention patterns, measured head by head -----------------------------------------------------

def _run(model, batch: ProfileBatch, is_lm: bool) -> torch.Tensor | HeadInput:
    """The outputs a batch compares: text at its compared positions (as HeadInput where the
    model's head splits off), retrieval rows' last `keep` (the head computes no more where the
    model takes logits_to_keep)."""
    split = split_head(model) if is_lm and batch.answer_lens is None else None
    if split is not None:
        with torch.no_grad():
            return head_input(*split, batch.ids, positions=batch.positions)
    device, takes = module_device(model), takes_logits_to_keep(type(model))
    keep = kept_positions(model, batch.positions) if batch.positions is not None else batch.keep or None
    kwargs = {"logits_to_keep": keep} if keep is not None and takes else {}
    with torch.no_grad():
        out = model(input_ids=batch.ids.to(device), use_cache=False, **kwargs)
    t = out.logits if getattr(out, "logits", None) is not None else out[0]
    if batch.positions is not None and not takes:
        t = t[:, batch.positions.to(t.device)]
    return t.float()


# one block output in REPLAY_EVERY is recorded for replay; the blocks between a recorded one and
# the layer measured are computed again. SmolLM2's 30 layers recorded whole at 5 × 4096 tokens
# held 1.4 GB through the attention profile; every 4th, a quarter, for ~1.5 blocks more a cell
REPLAY_EVERY = 4


def replayed_before(layer: int) -> int:
    """The blocks before this index return their recorded output when `layer` is measured."""
    return layer - layer % REPLAY_EVERY


@contextlib.contextmanager
def _recorded_outputs(blocks: list):
    """A list that the forward run inside fills with the outputs (return values) of the blocks
    a replay starts after, every REPLAY_EVERY-th, and of the last block; None elsewhere."""
    outputs: list = [None] * len(blocks)
    kept = [i for i in range(len(blocks)) if (i + 1) % REPLAY_EVERY == 0 or i == len(blocks) - 1]
    hooks = [blocks[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
             for i in kept]
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _frozen_prefix(blocks: list, layer: int, outputs: list):
    """The blocks before `replayed_before(layer)` return the last one's recorded dense output
    instead of computing (each ignores the input its frozen predecessor hands it); the blocks
    from there to `layer` compute as the dense model did. A forward set on the block itself
    (accelerate's hooks in a dispatched model) is put back after."""
    start = replayed_before(layer)
    own = [blocks[i].__dict__.get("forward") for i in range(start)]
    for i in range(start):
        blocks[i].forward = lambda *a, _out=outputs[start - 1], **k: _out
    try:
        yield
    finally:
        for i, forward in enumerate(own):
            if forward is None:
                del blocks[i].forward
            else:
                blocks[i].forward = forward


class TorchPatternRunner(PatternRunner):
    """Patterns installed through transformers' attention interface; the layers before the one
    measured replay their recorded dense outputs."""

    def __init__(self, model: nn.Module, graph: TransformerGraph):
        self.model, self.is_lm = model, graph.task == "causal-lm"
        self.blocks = [model.get_submodule(block_path(model, b)) for b in graph.blocks]
        self.attns = [dispatching_module(model.get_submodule(attention_path(model, b))) for b in graph.blocks]
        self.o_projs = [(model.get_submodule(module_path(b.attn.o.weight.name)), b.attn.o.layout)
                        for b in graph.blocks]
        self.kv_heads = graph.blocks[0].attn.num_kv_heads
        self.o_factors: dict[int, torch.Tensor] = {}  # per layer, for the proxy: made once, on its device

    @contextlib.contextmanager
    def active(self):
        register()
        saved = self.model.config._attn_implementation
        self.model.config._attn_implementation = IMPLEMENTATION
        try:
            yield
        finally:
            self.model.config._attn_implementation = saved

    def runs_patterns(self, layer: int) -> bool:
        return self.attns[layer] is not None

    def record(self, batch: ProfileBatch, grid: list[Pattern] | None = None) -> None:
        proxy = _ProxyObserver(self, batch, grid) if grid is not None else contextlib.nullcontext()
        with _recorded_outputs(self.blocks) as outputs, proxy:
            batch.reference = _run(self.model, batch, self.is_lm)
        batch.block_outputs = outputs
        if grid is not None:
            batch.proxy = proxy.result(outputs[-1])

    def loss(self, layer: int, patterns: list[Pattern | None], batches: list[ProfileBatch]) -> float:
        self.attns[layer].tailor_spans = [None if p is None else p.to_json() for p in patterns]
        try:
            total = 0.0
            for b in batches:
                with _frozen_prefix(self.blocks, layer, b.block_outputs):
                    out = _run(self.model, b, self.is_lm)
                total += b.weight * b.divergence(out, self.is_lm)
            return total
        finally:
            self.attns[layer].tailor_spans = None

    def fit_gates(self, samples: list, pattern: Pattern, steps: int, progress: bool) -> np.ndarray:
        return fit_gates(self.model, self.attns, self.kv_heads, samples, pattern, steps,
                         split=split_head(self.model) if self.is_lm else None, progress=progress)


class _ProxyObserver:
    """While the dense recording pass runs: each patterned layer's attention proxy on the batch
    (tailor.backends.attention_proxy) from the query, key and value its attention sees; per row
    over the squared norm of the stream leaving the last block, summed with the rows' weights.
    Patterns dense at the batch's length are left at zero."""

    def __init__(self, runner: TorchPatternRunner, batch: ProfileBatch, grid: list[Pattern]):
        self.runner, self.batch, self.grid = runner, batch, grid
        self.columns = [k for k, p in enumerate(grid) if not p.is_dense_at(batch.ids.shape[1])]
        self.rows: tuple | None = None  # the batch's proxy rows, made on the model's device
        self.errors: dict[int, torch.Tensor] = {}

    def __enter__(self):
        for i, attn in enumerate(self.runner.attns):
            if attn is not None:
                attn.tailor_observer = functools.partial(self._observe, i)
        return self

    def __exit__(self, *exc):
        for attn in self.runner.attns:
            if attn is not None:
                del attn.tailor_observer

    def _observe(self, layer: int, query, key, value, attention_mask, scaling, causal) -> None:
        factors = self.runner.o_factors
        if layer not in factors:
            proj, layout = self.runner.o_projs[layer]
            weight = tensor(proj, "weight")  # an offloaded one is not in place until its own forward
            factors[layer] = output_factor(weight if layout == "out_in" else weight.T, key.shape[1])
        if self.rows is None:
            self.rows = self.batch.proxy_rows(PROXY_ROWS, PROXY_BLOCK, query.device)
        self.errors[layer] = pattern_errors(
            query, key, value, [self.grid[k] for k in self.columns], scaling=scaling, causal=causal,
            attention_mask=attention_mask, o_factor=factors[layer], blocks=self.rows[0])

    def result(self, last_output) -> np.ndarray:
        """[layers, kv_heads, patterns] float64, from the last block's output; NaN for layers
        whose attention runs no patterns."""
        out = np.full((len(self.runner.blocks), self.runner.kv_heads, len(self.grid)), np.nan)
        if not self.errors:
            return out
        blocks, weights = self.rows
        rows = torch.cat([torch.arange(a, b, device=weights.device) for a, b in blocks])
        # the layers of a split model ran on several devices: summed on the first one's
        stream_sq = _first(last_output).to(weights.device).float().square().sum(-1)[:, rows]
        per_row = weights[:, rows] / stream_sq.clamp_min(torch.finfo(torch.float32).tiny)
        layers = list(self.errors)
        proxy = (torch.stack([self.errors[i].to(weights.device) for i in layers]) * per_row).sum((-2, -1))
        out[layers] = 0.0
        out[np.ix_(layers, range(self.runner.kv_heads), self.columns)] = proxy.double().cpu().numpy()
        return out


# ---- branches for the sequential refit -----------------------------------------------------------

def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    """A block's recorded call with another residual stream in place of its input."""
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


class TorchBranches(Branches):
    """A rewritten transformers model's branches beside the dense one, by forward hooks. Skipped
    layers left their ModuleList, so a layer's modules are found at its index among those kept.

    Block by block: each block's call (masks, position embeddings: what the model passes it) is
    recorded from one forward of each model per batch; after that both residual streams are
    carried from block to block, so the statistics of a layer's branch cost one run of that
    block, not a forward of the whole model (the refit of a 30-layer model: ~5 forwards' worth
    instead of 120). The rewritten stream is advanced with the branches already refitted."""

    def __init__(self, dense: nn.Module, rewritten: nn.Module, graph: TransformerGraph, removed: set[int]):
        self.dense, self.rewritten, self.graph, self.removed = dense, rewritten, graph, set(removed)
        self._inputs: Inputs | None = None
        self._states: list[dict] = []   # per batch: streams and recorded calls at layer self._at
        self._at = 0

    def _path(self, layer: int, name: str) -> str:
        """Where the dense model's module `name` of `layer` sits in the rewritten model."""
        block = block_path(self.dense, self.graph.blocks[layer])
        parent, _, idx = block.rpartition(".")
        shift = sum(1 for r in self.removed if r < layer)
        return f"{parent}.{int(idx) - shift}{name[len(block):]}" if idx.isdigit() else name

    def _module(self, model: nn.Module, layer: int, name: str) -> nn.Module | None:
        with contextlib.suppress(AttributeError):
            return model.get_submodule(self._path(layer, name) if model is self.rewritten else name)
        return None

    def _names(self, layer: int, kind: str) -> tuple[str, str, str]:
        """Module paths (dense model) of the block, the branch's projection, and the FFN's input
        projection."""
        b = self.graph.blocks[layer]
        projection = branch_projection(self.graph, layer, kind)
        return (block_path(self.dense, b), module_path(projection.weight.name),
                module_path(b.ffn.up.weight.name))

    def present(self, layer: int, kind: str) -> bool:
        if layer in self.removed:
            return False
        return isinstance(self._module(self.rewritten, layer, self._names(layer, kind)[1]), nn.Linear)

    def _block(self, model: nn.Module, layer: int) -> nn.Module | None:
        """The block of `layer` in `model` (None: the rewritten model skips it)."""
        if model is self.rewritten and layer in self.removed:
            return None
        return self._module(model, layer, self._names(layer, "attn")[0])

    def _record(self, model: nn.Module, chunk: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The first block's input and every block's call (args, kwargs), from one forward."""
        calls: list = [None] * self.graph.num_layers

        def keep(layer):
            def hook(mod, args, kwargs):
                calls[layer] = (args, kwargs)
            return hook

        hooks = [blk.register_forward_pre_hook(keep(i), with_kwargs=True)
                 for i in range(self.graph.num_layers) if (blk := self._block(model, i)) is not None]
        try:
            with torch.no_grad():  # the head on one position: only the blocks' calls are kept
                HFModel(model)(chunk, positions=torch.tensor([chunk.shape[1] - 1]))
        finally:
            for h in hooks:
                h.remove()
        args, kwargs = next(c for c in calls if c is not None)
        return (args[0] if args else kwargs["hidden_states"]), calls

    def _start(self, ids: Inputs, batch: int) -> None:
        self._inputs, self._at, self._states = ids, 0, []
        for chunk in batches(ids, batch):
            h_dense, calls_dense = self._record(self.dense, chunk)
            h_rew, calls_rew = self._record(self.rewritten, chunk)
            self._states.append({"dense": h_dense, "rewritten": h_rew,
                                 "calls": {"dense": calls_dense, "rewritten": calls_rew}})

    def _run_block(self, which: str, state: dict, layer: int, hooks=()) -> torch.Tensor:
        model = self.dense if which == "dense" else self.rewritten
        block = self._block(model, layer)
        if block is None:
            return state[which]
        # the stream where the block runs (the branch statistics combine it with the block's values)
        state[which] = state[which].to(execution_device(block))
        args, kwargs = _with_hidden(*state["calls"][which][layer], state[which])
        handles = [register(mod) for mod, register in hooks]
        try:
            with torch.no_grad():
                return _first(block(*args, **kwargs))
        finally:
            for h in handles:
                h.remove()

    def _advance(self, ids: Inputs, batch: int, layer: int) -> None:
        """Both streams at the input of `layer` (recorded afresh for new inputs or a step back)."""
        if ids is not self._inputs or layer < self._at:
            self._start(ids, batch)
        for at in range(self._at, layer):
            for state in self._states:
                state["dense"] = self._run_block("dense", state, at)
                state["rewritten"] = self._run_block("rewritten", state, at)
        self._at = layer

    def _branch(self, which: str, state: dict, layer: int, kind: str):
        """(projection input, the stream the branch adds to, the branch) in one run of the block."""
        model = self.dense if which == "dense" else self.rewritten
        _, proj_name, up_name = self._names(layer, kind)
        seen: dict[str, torch.Tensor] = {}

        def keep_input(key):
            def hook(mod, args, kwargs):
                seen[key] = args[0] if args else kwargs["hidden_states"]
            return hook

        def keep_output(key):
            def hook(mod, args, out):
                seen[key] = _first(out)
            return hook

        proj = self._module(model, layer, proj_name)
        hooks = [(proj, lambda m: m.register_forward_pre_hook(keep_input("x"), with_kwargs=True)),
                 (proj, lambda m: m.register_forward_hook(keep_output("y")))]
        post_norm_ffn = kind == "ffn" and self.graph.blocks[layer].residual == "post_norm"
        if post_norm_ffn:
            up = self._module(model, layer, up_name)
            hooks.append((up, lambda m: m.register_forward_pre_hook(keep_input("ffn_in"), with_kwargs=True)))
        out = self._run_block(which, state, layer, hooks)
        if kind == "attn":
            stream = state[which]        # the block's input
        elif post_norm_ffn:
            stream = seen["ffn_in"]      # BERT: the FFN adds to its own input, then norms
        else:
            stream = out - seen["y"]     # pre-norm: the block ends with the FFN's add
        return seen["x"], stream, seen["y"]

    def statistics(self, layer: int, kind: str, ids: Inputs, batch: int) -> BranchSums:
        self._advance(ids, batch, layer)
        sums = BranchSums()
        for state in self._states:
            _, r, y = self._branch("dense", state, layer, kind)
            x2, r2, _ = self._branch("rewritten", state, layer, kind)
            # in float64: in a bf16 model the streams r and r' nearly cancel
            sums.add(x2, r.double() + y.double() - r2.double())
        return sums

    def weights(self, layer: int, kind: str):
        lin = self._module(self.rewritten, layer, self._names(layer, kind)[1])
        return tensor(lin, "weight"), None if lin.bias is None else tensor(lin, "bias")

    def write(self, layer: int, kind: str, w: torch.Tensor, b: torch.Tensor | None) -> None:
        replace_weights(self.rewritten, self._path(layer, self._names(layer, kind)[1]), w, b)
