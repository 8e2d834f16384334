"""The ONNX backend: an onnx_ir model, run by onnxruntime, edited through
tailor.rewriter.onnx_surgery (and onnx_sparse_attention for patterns), its chosen projections
quantized by onnxruntime (tailor.rewriter.onnx_quantize) whenever it is run or saved.

Signals come from the intermediate values made graph outputs of a copy; a pattern is measured by
rewriting a copy and running it whole (no frozen prefix as on torch).
"""
from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from tailor.backends.base import (
    Backend,
    BlockTrace,
    Branches,
    BranchSums,
    PatternRunner,
    ProfileBatch,
    branch_projection,
)
from tailor.backends.export import save_onnx
from tailor.backends.runners import OrtModel
from tailor.core.errors import TailorError
from tailor.core.patterns import Pattern
from tailor.data.calibration import Inputs, batches
from tailor.rewriter import onnx_kv_cache, onnx_surgery
from tailor.rewriter.capture import OnnxSource, is_causal
from tailor.rewriter.graph import Projection, TransformerGraph
from tailor.rewriter.onnx_quantize import METHOD as QUANTIZATION_METHOD
from tailor.rewriter.onnx_quantize import has_constant_weight, quantized
from tailor.rewriter.onnx_sparse_attention import sparse_core, substitute
from tailor.rewriter.quantized.weights import quantized_linear


class OnnxBackend(Backend):
    format = "onnx"
    edits_post_norm_branches = True
    profiles_patterns_cheaply = False
    slices_in_out_layout = True
    quantizes_int8 = True
    int8_method = QUANTIZATION_METHOD
    int8_formats = ("onnx",)

    def __init__(self, model: ir.Model, graph: TransformerGraph, source: OnnxSource | None = None, *,
                 edited: bool = False, int8: frozenset[str] = frozenset()):
        """`source`: the file the model was read from, written byte for byte while nothing (not
        even a lossless clean-up) changed the model. `int8`: the MatMul nodes that run on INT8
        weights (quantized from the float model when it is run or saved)."""
        super().__init__(model, graph)
        self.source, self.edited, self.int8 = source, edited, int8
        self._quantized: ir.Model | None = None  # the float model's quantized copy, until it changes

    def clone(self, from_layer: int = 0) -> "OnnxBackend":
        return OnnxBackend(onnx_surgery.clone(self.model), self.graph, self.source, edited=self.edited,
                           int8=self.int8)

    def deployed(self) -> ir.Model:
        """The model as it runs and is saved: the float model with the int8 nodes quantized."""
        if not self.int8:
            return self.model
        if self._quantized is None:
            self._quantized = quantized(self.model, sorted(self.int8))
        return self._quantized

    def runnable(self) -> OrtModel:
        return OrtModel(self.deployed(), causal=is_causal(self.graph))

    def block_traces(self, ids: Inputs, visit: Callable[[int, BlockTrace], None]) -> None:
        probe = onnx_surgery.clone(self.model)
        nodes = onnx_surgery.nodes_by_name(probe)
        values = onnx_surgery.block_values(probe, self.graph)
        wanted = []
        for b, v in zip(self.graph.blocks, values):
            k = onnx_surgery.linear_output(nodes[b.attn.k.node])
            wanted.append([v.input, v.output, v.ffn_out, v.attn_out, nodes[b.attn.o.node].inputs[0],
                           nodes[b.ffn.down.node].inputs[0], k])
        onnx_surgery.expose(probe, [x for row in wanted for x in row])
        run = OrtModel(probe)
        # onnxruntime returns every layer's traces of a batch at once: batches stay small
        for chunk in batches(ids, 4):
            out = run.run_all(chunk.numpy())
            for i, row in enumerate(wanted):
                visit(i, BlockTrace(*(torch.from_numpy(out[v.name]) for v in row)))

    def projection_weight(self, p: Projection) -> np.ndarray:
        w, _ = onnx_surgery.projection_arrays(self.model, p)
        return np.array(w, dtype=np.float64)  # [out, in]

    # ---- edits ----

    def _edit(self) -> ir.Model:
        self.edited, self._quantized = True, None
        return self.model

    def remove_blocks(self, layers: list[int]) -> None:
        model = self._edit()
        values = onnx_surgery.block_values(model, self.graph)
        # found before any bypass, and applied last first: a skipped block's input may be the
        # output of the skipped block before it
        ends = [(values[i].output, values[i].input) for i in sorted(layers, reverse=True)]
        for output, block_input in ends:
            onnx_surgery.bypass(model, output, block_input)

    def constant_branch(self, layer: int, kind: str, mean) -> None:
        model = self._edit()
        values = onnx_surgery.block_values(model, self.graph)[layer]
        mean = mean if mean is not None else np.zeros(self.graph.hidden_size)
        onnx_surgery.replace_with_constant(model, values.attn_out if kind == "attn" else values.ffn_out, mean)

    def keep_outputs(self, p: Projection, rows) -> None:
        onnx_surgery.slice_projection(self._edit(), p, rows=np.asarray(rows))

    def keep_inputs(self, p: Projection, cols, gram: np.ndarray | None) -> None:
        model = self._edit()
        if gram is not None:
            onnx_surgery.reconstruct_inputs(model, p, cols, gram)
        else:
            onnx_surgery.drop_inputs(model, p, np.asarray(cols))

    def set_heads(self, layer: int, kv_heads: int, queries_per_group: int) -> None:
        """Head counts in the attention's shapes, and in its KV cache's declared shapes where the
        decoder has one."""
        model, block = self._edit(), self.graph.blocks[layer]
        onnx_surgery.set_head_counts(model, block, kv_heads * queries_per_group, kv_heads)
        onnx_kv_cache.set_cache_heads(model, self._attention_nodes(layer), kv_heads)

    def _attention_nodes(self, layer: int) -> set:
        a = self.graph.blocks[layer].attn
        return set(onnx_surgery.region(self.model, [a.q, a.k, a.v], a.o))

    def set_ffn_width(self, layer: int, width: int) -> None:
        onnx_surgery.set_ffn_width(self._edit(), self.graph.blocks[layer], width)

    def share_kv(self, layer: int, source: int) -> None:
        """The layer's key and value projections' outputs are replaced by the source's: it still
        applies its own position encoding and head layout to them, as SharedKVAttention does. A
        decoder with a KV cache attends over the source's cache (the same keys: one position
        encoding, one head layout, which kv_share requires) and its own cache I/O goes."""
        model = self._edit()
        nodes = onnx_surgery.nodes_by_name(model)
        own, src = self.graph.blocks[layer].attn, self.graph.blocks[source].attn
        # found before the bypass, which cuts the layer's own keys and values off its attention
        own_nodes, source_nodes = self._attention_nodes(layer), self._attention_nodes(source)
        for mine, theirs in ((own.k, src.k), (own.v, src.v)):
            onnx_surgery.bypass(model, onnx_surgery.linear_output(nodes[mine.node]),
                                onnx_surgery.linear_output(nodes[theirs.node]))
        # with a KV cache: the source's whole cache, so that the layer's own goes (finish)
        onnx_kv_cache.read_other_cache(model, own_nodes, source_nodes)

    def runs_patterns(self, layer: int) -> bool:
        """Whether the layer's attention has a block-sparse form (with a KV cache too: a decode
        step's query reads its pattern's keys of the cache)."""
        try:
            sparse_core(self.model, self.graph.blocks[layer].attn)
        except TailorError:
            return False
        return True

    @property
    def graph_kv_cache(self) -> bool:
        return onnx_kv_cache.has_cache(self.model)

    def set_patterns(self, layer: int, patterns: list[Pattern | None]) -> None:
        """The layer's decomposed attention core becomes block-sparse ONNX ops (the products
        cover only the kept blocks: tailor.rewriter.onnx_sparse_attention)."""
        substitute(self._edit(), self.graph.blocks[layer].attn, patterns)

    def int8_refusal(self, projections: list[Projection]) -> str | None:
        nodes = onnx_surgery.nodes_by_name(self.model)
        for p in projections:
            node = nodes.get(p.node)
            if node is None:
                continue  # a rewrite removed it (a skipped branch): nothing to quantize
            if quantized_linear(node) is not None:
                return f"the model's projections are quantized already ({p.node} is a {node.op_type})"
            if node.op_type != "MatMul" or not has_constant_weight(node):
                # quantize_dynamic's integer ops take MatMul with a constant weight, not Gemm
                return f"INT8 runs MatMul projections on constant weights; {p.node} is a {node.op_type}"
            # a MatMul's inputs share one type, and the constant weight's is always known
            activation = node.inputs[0].dtype or node.inputs[1].dtype
            if activation not in (None, ir.DataType.FLOAT):
                # DynamicQuantizeLinear, which quantizes each call's activations, takes float32 only
                return f"INT8 quantizes float32 activations; {p.node} reads {activation.name.lower()}"
        return None

    def int8_projections(self, projections: list[Projection]) -> None:
        refusal = self.int8_refusal(projections)
        if refusal is not None:
            raise TailorError(refusal)
        self._edit()
        self.int8 = self.int8 | {p.node for p in projections}

    def finish(self) -> None:
        self._quantized = None
        onnx_surgery.finish(self.model)

    # ---- measuring and refitting ----

    def pattern_runner(self) -> PatternRunner:
        return OnnxPatternRunner(self)

    def branches(self, dense: Backend, removed: set[int]) -> Branches:
        return OnnxBranches(dense.model, self, self.graph)

    # ---- writing ----

    def save(self, folder: Path, formats: tuple[str, ...]) -> None:
        """model.onnx: the input file itself, byte for byte with its external data, while nothing
        changed the model; else the model as it is now."""
        src = self.source
        if self.edited or src is None:
            save_onnx(self.deployed(), folder / "model.onnx")
            return
        shutil.copyfile(src.path, folder / "model.onnx")
        for loc in src.data_files:
            (folder / loc).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src.path.parent / loc, folder / loc)


class OnnxPatternRunner(PatternRunner):
    """Each measurement rewrites a copy (onnx_sparse_attention) and runs it whole."""

    def __init__(self, backend: OnnxBackend):
        self.backend, self.is_lm = backend, backend.graph.task == "causal-lm"
        self._dense = None  # one onnxruntime session of the dense model for every reference

    def active(self):
        return contextlib.nullcontext()

    def runs_patterns(self, layer: int) -> bool:
        return self.backend.runs_patterns(layer)

    def record(self, batch: ProfileBatch, grid: list[Pattern] | None = None) -> None:
        """No proxy: every pattern is measured (tailor.passes.attention_profile)."""
        if self._dense is None:
            self._dense = self.backend.runnable()
        batch.reference = self._dense(batch.ids, positions=batch.positions).float()

    def loss(self, layer: int, patterns: list[Pattern | None], batches: list[ProfileBatch]) -> float:
        variant = self.backend.clone()
        variant.set_patterns(layer, patterns)
        run = variant.runnable()
        return sum(b.weight * b.divergence(run(b.ids, positions=b.positions).float(), self.is_lm)
                   for b in batches)


def _residual(values: onnx_surgery.BlockValues, kind: str):
    """(the residual Add, the branch it reads, the stream it adds to) of one branch."""
    return values.attn_residual if kind == "attn" else values.ffn_residual


class OnnxBranches(Branches):
    """A rewritten ONNX model's branches beside the dense one, run by onnxruntime."""

    def __init__(self, dense: ir.Model, rewritten: OnnxBackend, graph: TransformerGraph):
        self.rewritten, self.graph = rewritten, graph
        probe = onnx_surgery.clone(dense)
        values = onnx_surgery.block_values(probe, graph)
        self.sums = {(i, kind): _residual(v, kind)[0].outputs[0].name
                     for i, v in enumerate(values) for kind in ("attn", "ffn")}
        onnx_surgery.expose(probe, [_residual(v, kind)[0].outputs[0] for v in values
                                    for kind in ("attn", "ffn")])
        self.dense = OrtModel(probe)

    @property
    def model(self) -> ir.Model:
        return self.rewritten.model

    def present(self, layer: int, kind: str) -> bool:
        if branch_projection(self.graph, layer, kind).node not in onnx_surgery.nodes_by_name(self.model):
            return False
        try:
            _residual(onnx_surgery.block_values(self.model, self.graph)[layer], kind)
        except TailorError:
            return False
        return True

    def statistics(self, layer: int, kind: str, ids: Inputs, batch: int) -> BranchSums:
        probe = onnx_surgery.clone(self.model)
        x = onnx_surgery.nodes_by_name(probe)[branch_projection(self.graph, layer, kind).node].inputs[0]
        _, _, stream = _residual(onnx_surgery.block_values(probe, self.graph)[layer], kind)
        onnx_surgery.expose(probe, [x, stream])
        # run as deployed: the branch's inputs and the stream carry the INT8 error of the
        # projections before it, which the refit then takes up as it does the rewrites'
        int8 = sorted(self.rewritten.int8)
        run, sums = OrtModel(quantized(probe, int8) if int8 else probe), BranchSums()
        for chunk in batches(ids, batch):
            dense, out = self.dense.run_all(chunk.numpy()), run.run_all(chunk.numpy())
            sums.add(out[x.name], dense[self.sums[(layer, kind)]] - out[stream.name])
        return sums

    def weights(self, layer: int, kind: str):
        return onnx_surgery.projection_arrays(self.model, branch_projection(self.graph, layer, kind))

    def write(self, layer: int, kind: str, w: np.ndarray, b: np.ndarray | None) -> None:
        old, _ = self.weights(layer, kind)
        onnx_surgery.set_projection(self._edited(), branch_projection(self.graph, layer, kind),
                                    w.astype(old.dtype), None if b is None else b.astype(old.dtype))

    def _edited(self) -> ir.Model:
        return self.rewritten._edit()
