"""int8: a branch's projections (attention q/k/v/o, or the FFN's up/gate/down), or the LM head,
on INT8 weights with dynamically quantized activations, per output channel, by the model's own
runtime: ONNX models through onnxruntime's quantize_dynamic (tailor.rewriter.onnx_quantize),
torch models on the CPU through PyTorch's dynamic quantization (tailor.rewriter.modules.int8_linear). Offered
where a measured target table prices INT8 products (`tailor calibrate-target`).

Quantization changes how a branch's products run, not its shape, so it combines with the
structural options of the same branch: a pruned FFN can be INT8 too. Its options claim a resource
of their own (`int8:ffn:3`), never `ffn:3`; what INT8 saves on a part that pruning already shrank
is less than the two savings added, and the search prices such pairs jointly (Pass.composes). The
head's option names the layer after the last block (Option.layer); a decoder's head is a large
share of its products (a 49K vocabulary: a fifth of SmolLM2-135M's at every position) that no
structural option touches. The backend quantizes after every structural edit, whenever the model
is run or written, so it is applied last whatever the order of the passes.
"""
from __future__ import annotations

from tailor.backends import BACKENDS
from tailor.backends.base import Backend
from tailor.passes.base import Option, Pass, exact_keys
from tailor.passes.cost import CostModel, HeadShape, LayerShape
from tailor.rewriter.graph import Projection, TransformerGraph

BRANCHES = {"attn": "attention projections", "ffn": "FFN projections"}
HEAD = "lm_head"


def branch_projections(graph: TransformerGraph, layer: int, branch: str) -> list[Projection]:
    if branch == HEAD:
        return [graph.lm_head]
    b = graph.blocks[layer]
    return list(b.attn.projections if branch == "attn" else b.ffn.projections)


def int8_refusal(backend: Backend, cost_model: CostModel, formats: tuple[str, ...] = ()) -> str | None:
    """Why INT8 options are not offered for this model on this target, into an artifact of
    `formats` (None: they are)."""
    if "tvm" in formats:  # TVM's ONNX importer fails on DynamicQuantizeLinear + MatMulInteger
        return "the TVM build (format tvm) runs no INT8 yet; leave format tvm out for INT8"
    # hf included: a standard config cannot say INT8 (passes.standard would refuse the plan)
    unheld = [f for f in formats if f not in backend.int8_formats]
    if unheld:
        return (f"INT8 of a {backend.format} model is written in format {', '.join(backend.int8_formats)}, "
                f"not {', '.join(unheld)}; leave {', '.join(unheld)} out for INT8")
    if not cost_model.prices_int8:
        return (f"the target {cost_model.target.name} has no measured INT8 figure (GPU targets and "
                f"vendor peaks: none yet); measure this CPU with `tailor calibrate-target -o cpu.json` "
                f"and pass --target cpu.json")
    projections = [p for b in backend.graph.blocks for branch in BRANCHES
                   for p in branch_projections(backend.graph, b.index, branch)]
    return backend.int8_refusal(projections)


def _int8(layer: int, branch: str) -> Option:
    if branch == HEAD:
        return Option(Int8.name, layer, {"branch": HEAD}, (f"int8:{HEAD}",), label="LM head INT8")
    return Option(Int8.name, layer, {"branch": branch}, (f"int8:{branch}:{layer}",),
                  label=f"layer {layer}: {BRANCHES[branch]} INT8")


class Int8(Pass):
    name = "int8"
    composes = True
    reaches_head = True

    def candidates(self, graph: TransformerGraph, signals) -> list[Option]:
        # whether this model's projections and the target can take them is the pipeline's check
        # (Backend.int8_refusal, a measured INT8 figure), made before anything is measured; the
        # head's, which the model may hold in another form (a Gemm), is `check`ed per option
        if not BACKENDS[graph.backend].quantizes_int8:
            return []
        head = [_int8(graph.num_layers, HEAD)] if graph.lm_head is not None else []
        return [_int8(b.index, branch) for b in graph.blocks for branch in BRANCHES] + head

    def from_plan(self, graph: TransformerGraph, layer: int, choice: dict) -> Option:
        exact_keys(choice, {"branch"})
        if not BACKENDS[graph.backend].quantizes_int8:
            raise ValueError(f"INT8 is not offered for {graph.backend} models")
        if choice["branch"] not in (*BRANCHES, HEAD):
            raise ValueError(f"branch must be one of {', '.join((*BRANCHES, HEAD))}")
        if (layer == graph.num_layers) != (choice["branch"] == HEAD):
            raise ValueError(f"branch {HEAD} is the layer after the last block ({graph.num_layers}), "
                             f"and only it")
        return _int8(layer, choice["branch"])

    def check(self, backend: Backend, option: Option) -> None:
        projections = branch_projections(backend.graph, option.layer, option.choice["branch"])
        refusal = backend.int8_refusal(projections)
        if refusal is not None:
            raise ValueError(refusal)

    def reshape(self, option: Option, shape: LayerShape | HeadShape) -> None:
        shape.int8 = tuple(sorted({*shape.int8, option.choice["branch"]}))

    def apply(self, backend: Backend, options: list[Option], signals) -> None:
        backend.int8_projections([p for o in options
                                  for p in branch_projections(backend.graph, o.layer, o.choice["branch"])])
