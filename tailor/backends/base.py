"""The backend interface: one captured model in its format, and everything format-specific.

A pass, the profile, the search and the refit speak to a `Backend` only: run a batch, trace the
residual stream block by block, read a projection's weights, apply a structural edit (the small
vocabulary below, in which every rewrite pass is written once), measure attention patterns head
by head, refit a branch, write the model out. Two implementations: `TorchBackend` (a transformers
module) and `OnnxBackend` (an onnx_ir model run by onnxruntime). A new input format is a new
backend, not edits in every pass.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from tailor.core.errors import TailorError
from tailor.core.patterns import Pattern
from tailor.data.calibration import Inputs, batches
from tailor.rewriter.graph import Projection, TransformerGraph
from tailor.rewriter.least_squares import add_cross, add_gram, compute_device, float64

# the two residual branches of a block
BRANCHES = ("attn", "ffn")


class BlockTrace(NamedTuple):
    """One block on one batch: the residual stream in and out [B, T, H], each branch's output
    (before its residual add), the inputs of the output and down projections, the keys."""
    input: torch.Tensor
    output: torch.Tensor
    ffn_out: torch.Tensor
    attn_out: torch.Tensor
    o_in: torch.Tensor
    down_in: torch.Tensor
    key: torch.Tensor


# logits a comparison with the dense model keeps, at most (elements, over every window): past it,
# evenly spaced positions of each window stand for all of them. SmolLM2's 6144 calibration tokens
# of a 49K vocabulary held 1.2 GB in float32, and their head and KL took more than half of each
# option's measurement on 2 CPU cores.
LOGIT_ELEMENTS = 2 ** 27


def compared_positions(graph, ids: Inputs) -> torch.Tensor | None:
    """The positions of each window a causal LM's outputs are compared at: all (None) while the
    windows' logits fit LOGIT_ELEMENTS, else every k-th, ending at the last."""
    if graph.task != "causal-lm" or not isinstance(ids, torch.Tensor) or graph.vocab_size is None:
        return None
    stride = -(-ids.numel() * graph.vocab_size // LOGIT_ELEMENTS)
    return None if stride <= 1 else torch.arange(ids.shape[1] - 1, -1, -stride).flip(0)


class HeadInput(NamedTuple):
    """A causal LM's logits not computed yet: the head's input [..., H] and the head, which maps
    rows of it to logits [..., V] where the head's weights are. What a comparison keeps instead of
    the logits where a backend can split its head off (Backend.stream's `head_inputs`): SmolLM2
    holds 576 values a position instead of 49K, and `divergence` runs the head on a chunk of
    positions at a time (a 4096-token window's logits at its compared positions took 0.5 GB)."""
    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]
    vocab_size: int

    def to(self, device) -> "HeadInput":
        return self._replace(hidden=self.hidden.to(device))


# float64 elements one step of `divergence` holds per temporary (three at once: 96 MiB): a batch
# of 2048 tokens of a 128K-token vocabulary (Llama 3) would otherwise take 2 GiB per temporary.
# Small chunks also stay in the CPU's caches: 2^22 took half the time of 2^24 on 2048 positions
# of a 49K vocabulary
DIVERGENCE_CHUNK = 2 ** 22
# on a GPU a step's cost is its launches: 2^25 (768 MiB of temporaries) is one step for the
# compared positions of SmolLM2's 12 windows where 2^22 took 24
DIVERGENCE_CHUNK_GPU = 2 ** 25


def _as_logits(x: torch.Tensor) -> torch.Tensor:
    """The head of logits already computed."""
    return x


def _positions(x: torch.Tensor | HeadInput) -> HeadInput:
    """x as rows, one a position, of a head's input (logits already computed: with no head)."""
    if isinstance(x, HeadInput):
        return x._replace(hidden=x.hidden.reshape(-1, x.hidden.shape[-1]))
    return HeadInput(x.reshape(-1, x.shape[-1]), _as_logits, x.shape[-1])


# bytes of reference logits a comparison made many times over keeps computed (the option meter's,
# hundreds of comparisons against one reference): compared_positions bounds a comparison's logits
# at LOGIT_ELEMENTS, 512 MiB in float32, so this holds them all
REFERENCE_LOGITS_BYTES = 512 << 20


def _chunk_rows(vocab: int, device: torch.device) -> int:
    """Positions `divergence` takes a step at a time."""
    return max(1, (DIVERGENCE_CHUNK if device.type == "cpu" else DIVERGENCE_CHUNK_GPU) // vocab)


def with_logits(reference: list[torch.Tensor | HeadInput],
                budget: int = REFERENCE_LOGITS_BYTES) -> list[torch.Tensor | HeadInput]:
    """The reference with its head run once, for the items whose logits fit `budget` bytes in all
    (the rest stay as they are): `divergence` then reads them instead of running the head again at
    each comparison (on SmolLM2's 2-core CPU compile the reference's half of the head was 35 s of
    the options' 280). Computed in the chunks `divergence` takes, so the same values."""
    out = []
    for ref in reference:
        rows = _positions(ref) if isinstance(ref, HeadInput) else None
        if rows is None or budget <= 0:
            out.append(ref)
            continue
        step = _chunk_rows(ref.vocab_size, rows.hidden.device)
        first = rows.head(rows.hidden[:step])
        size = first.element_size() * len(rows.hidden) * ref.vocab_size
        if size > budget:
            out.append(ref)
            continue
        budget -= size
        out.append(torch.cat([first] + [rows.head(rows.hidden[s:s + step])
                                        for s in range(step, len(rows.hidden), step)]))
    return out


def divergence(reference: list[torch.Tensor | HeadInput], outputs: Iterable[torch.Tensor | HeadInput],
               is_lm: bool) -> float:
    """Mean per-token KL(reference || output) for LMs; 1 - cosine of hidden states otherwise.
    In float64, on the outputs' device, a bounded number of tokens at a time (logits given as
    HeadInput are computed those tokens at a time), summed there (one wait for the device a
    comparison, not one a step)."""
    total, count = 0.0, 0
    for ref, out in zip(reference, outputs):
        ref, out = _positions(ref), _positions(out)
        device = out.hidden.device
        rows = _chunk_rows(ref.vocab_size, device)
        for start in range(0, len(ref.hidden), rows):
            r = ref.head(ref.hidden[start:start + rows]).to(device)
            o = out.head(out.hidden[start:start + rows]).to(device)
            if is_lm:
                # in place where it can be: three chunks alive at once, not seven (the naive
                # expression's temporaries held 1.8 GB at once on the CPU)
                lp_ref = torch.log_softmax(r.double(), -1)
                diff = torch.log_softmax(o.double(), -1).neg_().add_(lp_ref)   # lp_ref - lp
                kl = torch.einsum("ij,ij->i", lp_ref.exp_(), diff)
            else:
                kl = 1 - torch.cosine_similarity(r.double(), o.double(), dim=-1)
            total = total + kl.sum()
            count += kl.numel()
    return float(total) / max(count, 1)


@dataclass
class ProfileBatch:
    """Inputs the attention profile measures a pattern on, with the dense model's outputs."""
    ids: torch.Tensor                    # [B, T], every row the same length
    weight: float                        # of this batch's mean divergence in the loss
    answer_lens: list[int] | None        # retrieval: answers are the last tokens of each row
    reference: torch.Tensor | HeadInput | None = None
    block_outputs: list | None = None    # the dense blocks' outputs, where a backend replays them
    proxy: np.ndarray | None = None      # [layers, kv_heads, patterns], where the runner computes one
    positions: torch.Tensor | None = None  # text: the positions compared (compared_positions)

    @property
    def keep(self) -> int:
        """Logits needed: all for text, the answers' last few for retrieval (saves the head)."""
        return 0 if self.answer_lens is None else max(self.answer_lens) + 1

    def divergence(self, out: torch.Tensor | HeadInput, is_lm: bool) -> float:
        """Over every token for text, over each row's answer tokens for retrieval."""
        ref = self.reference
        if self.answer_lens is None:
            return divergence([ref], [out], is_lm)
        t = ref.shape[1]  # the positions that predict each row's answer tokens
        return float(np.mean([divergence([ref[r:r + 1, t - c - 1:t - 1]], [out[r:r + 1, t - c - 1:t - 1]],
                                         is_lm) for r, c in enumerate(self.answer_lens)]))

    def proxy_rows(self, max_rows: int, block: int, device) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """The query rows the attention proxy is computed on, as blocks [start, stop) of at most
        `block` rows, and each row's weight [B, T] on `device` (zero off the blocks), weighted as
        `divergence` weighs positions: every row of text equally (past `max_rows` rows a
        sequence, max_rows // block blocks spread evenly from the first row to the last), for
        retrieval the rows predicting each row's answer, each row's answer as much as another's."""
        n, t = self.ids.shape
        weights = torch.zeros(n, t, dtype=torch.float32, device=device)
        if self.answer_lens is not None:
            for r, c in enumerate(self.answer_lens):
                weights[r, t - c - 1:t - 1] = 1 / (n * c)
            return [(t - max(self.answer_lens) - 1, t - 1)], weights
        if t <= max_rows:
            starts = range(0, t, block)
        else:  # the last block ends at the last row: the rows the narrowest patterns change most
            starts = np.linspace(0, t - block, max(2, max_rows // block)).round().astype(int).tolist()
        blocks = [(s, min(s + block, t)) for s in starts]
        for s, e in blocks:
            weights[:, s:e] = 1
        return blocks, weights / weights.sum()


class PatternRunner(abc.ABC):
    """Measures what one layer's attention patterns cost (tailor.passes.attention_profile)."""

    @abc.abstractmethod
    def active(self):
        """A context in which patterns can be measured."""

    @abc.abstractmethod
    def runs_patterns(self, layer: int) -> bool:
        """Whether this layer's attention can run per-head patterns at all."""

    @abc.abstractmethod
    def record(self, batch: ProfileBatch, grid: list[Pattern] | None = None) -> None:
        """The dense model's outputs on the batch (and whatever the runner replays); with `grid`,
        where the runner has one, each (layer, KV head, pattern)'s proxy as batch.proxy."""

    @abc.abstractmethod
    def loss(self, layer: int, patterns: list[Pattern | None], batches: list[ProfileBatch]) -> float:
        """Σ weight × divergence with `layer` on `patterns`, the other layers dense."""

    def fit_gates(self, samples: list, pattern: Pattern, steps: int, progress: bool):
        """[layers, kv_heads] retrieval gates (tailor.backends.retrieval_gates) fitted on the
        retrieval samples, or None where the runner cannot take gradients (onnxruntime)."""
        return None


class BranchSums:
    """E[x̃x̃ᵀ] and E[t x̃ᵀ] over batches (x̃ = [x; 1]): what a least-squares refit needs. Summed in
    float64 on the device of the first x given (a CUDA model's refit stays on CUDA; numpy batches,
    from onnxruntime, on the CPU)."""

    def __init__(self):
        self.gram = self.cross = None
        self.tokens = 0

    def add(self, x, t) -> None:
        """x [..., n] and t [..., out] over the same tokens, numpy or torch."""
        device = compute_device(self.gram, x)
        x = float64(x, device)
        x = x.reshape(-1, x.shape[-1])
        t = float64(t, device).reshape(len(x), -1)
        self.gram, self.cross = add_gram(self.gram, x), add_cross(self.cross, t, x)
        self.tokens += len(x)

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gram / self.tokens, self.cross / self.tokens


class Branches(abc.ABC):
    """The branches of a rewritten model beside the dense one (tailor.passes.refit): for branch
    `kind` of `layer`, the rewritten model's inputs to its last projection and the target
    t = r + y − r' (dense stream + dense branch − rewritten stream)."""

    @abc.abstractmethod
    def present(self, layer: int, kind: str) -> bool:
        """Whether the branch still ends in its projection and residual add (not skipped)."""

    @abc.abstractmethod
    def statistics(self, layer: int, kind: str, ids: Inputs, batch: int) -> BranchSums:
        ...

    @abc.abstractmethod
    def weights(self, layer: int, kind: str) -> tuple[Any, Any]:
        """The projection's weight [out, in] and bias (None where it has none), as the format
        holds them (tensors on the model's device, or numpy arrays)."""

    @abc.abstractmethod
    def write(self, layer: int, kind: str, w, b) -> None:
        """New weights, of the kind `weights` gave (least_squares.ridge_fit returns that kind)."""


def branch_projection(graph: TransformerGraph, layer: int, kind: str) -> Projection:
    """The last projection of a branch: the attention's output, or the FFN's down projection."""
    b = graph.blocks[layer]
    return b.attn.o if kind == "attn" else b.ffn.down


class Backend(abc.ABC):
    """One model in its format, with the graph recognised on it. Edits change `model` in place;
    `clone()` first to keep the original."""

    format: ClassVar[str]
    # What the format's surgery can do, asked by passes instead of the format's name:
    # a post-norm block's branch replaced or rewired alone (on torch the attention module of a
    # post-norm block holds its residual add and norm, so it cannot)
    edits_post_norm_branches: ClassVar[bool]
    # projections stored [in, out] (GPT-2's Conv1D) sliced
    slices_in_out_layout: ClassVar[bool]
    # the attention profile replays the layers before the one measured (else it runs the whole
    # model per layer, head and pattern, and is offered only where patterns can pay for it)
    profiles_patterns_cheaply: ClassVar[bool]
    # projections run on INT8 weights with dynamically quantized activations (the int8 pass): by
    # which method (for the report), and which artifact formats then hold the INT8 model
    quantizes_int8: ClassVar[bool] = False
    int8_method: ClassVar[str] = ""
    int8_formats: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: Any, graph: TransformerGraph):
        self.model, self.graph = model, graph

    # ---- running ----

    @abc.abstractmethod
    def clone(self, from_layer: int = 0) -> "Backend":
        """An independent copy to rewrite from layer `from_layer` on: the layers before it may be
        this model's own (what an option measured alone, which changes nothing before its
        `first_layer`, needs)."""

    def close(self) -> None:
        """Called on a copy (`clone`) no longer needed: whatever it holds that its last reference
        would not free is let go now. The copy is not used after."""

    @abc.abstractmethod
    def runnable(self) -> torch.nn.Module:
        """model(input_ids [B, T]) -> logits or hidden states."""

    def outputs(self, ids: Inputs, batch: int = 4) -> list[torch.Tensor]:
        """The model's outputs on calibration inputs, in batches, as float32."""
        return [o.float() for o in self.stream(ids, batch)]

    def stream(self, ids: Inputs, batch: int = 4, replay: tuple[Any, int] | None = None,
               positions: torch.Tensor | None = None,
               head_inputs: bool = False) -> Iterator[torch.Tensor | HeadInput]:
        """`outputs` one batch at a time: what a comparison with a stored reference needs (one
        batch of a 128K vocabulary's logits alive, not all of them). `replay` = (a
        `record_blocks` of the dense model on the same ids, layer): the blocks before that layer,
        which an edit there leaves as they were, may return their recorded outputs instead of
        computing (a backend that cannot replay computes them: the outputs are the same).
        `positions`: only those sequence positions' outputs (compared_positions). `head_inputs`:
        a causal LM's logits as HeadInput where the backend can split its head off (this one
        cannot: logits). In the model's dtype: `divergence` widens them a chunk at a time."""
        run = self.runnable()
        for b in self.input_batches(ids, batch):
            with torch.no_grad():
                yield run(b) if positions is None else run(b, positions=positions)

    def input_batches(self, ids: Inputs, batch: int = 4) -> list[torch.Tensor]:
        """How `stream` and `record_blocks` split `ids`: `batch` rows, fewer where they would
        pass BATCH_TOKENS tokens."""
        return batches(ids, batch)

    def replay_start(self, layer: int) -> int:
        """The first block `stream(..., replay=(record, layer))` computes: the ones before it
        return recorded outputs (0: this backend runs every block)."""
        return 0

    def record_blocks(self, ids: Inputs, batch: int = 4) -> Any:
        """What `stream(..., replay=...)` replays, or None where this backend does not replay."""
        return None

    def reference_with_record(self, ids: Inputs, positions: torch.Tensor | None = None,
                              batch: int = 4) -> tuple[list, Any]:
        """What a comparison against this model on `ids` needs: `stream(ids, positions=positions,
        head_inputs=True)` as a list, and `record_blocks(ids)`; one forward where the backend
        records as it streams."""
        reference = list(self.stream(ids, batch, positions=positions, head_inputs=True))
        return reference, self.record_blocks(ids, batch)

    @abc.abstractmethod
    def block_traces(self, ids: Inputs, visit: Callable[[int, BlockTrace], None]) -> None:
        """visit(i, BlockTrace of block i) for every block of every batch, in the forward's order
        (the profile's signals are sums over them). Each backend batches as its memory allows."""

    @abc.abstractmethod
    def projection_weight(self, p: Projection) -> np.ndarray:
        """A projection's weight [out, in], float64."""

    # ---- structural edits: the vocabulary the passes are written in ----

    @abc.abstractmethod
    def remove_blocks(self, layers: list[int]) -> None:
        """Whole blocks out; the stream goes from each one's input to its output's users."""

    @abc.abstractmethod
    def constant_branch(self, layer: int, kind: str, mean) -> None:
        """A branch ("attn" | "ffn") becomes a constant: `mean` [H], or zeros (shapes only)."""

    @abc.abstractmethod
    def keep_outputs(self, p: Projection, rows) -> None:
        """Keep output channels `rows` of a projection (its bias alike)."""

    @abc.abstractmethod
    def keep_inputs(self, p: Projection, cols, gram: np.ndarray | None) -> None:
        """Keep input channels `cols` of a projection: the kept weights and a bias refitted by
        least squares on `gram` (E[x̃x̃ᵀ] of its full input), or with `gram` None plainly sliced
        with a zero bias (shapes only: a reload, whose weights come after, or a timing variant)."""

    @abc.abstractmethod
    def set_heads(self, layer: int, kv_heads: int, queries_per_group: int) -> None:
        """The attention's head counts after its projections were sliced."""

    @abc.abstractmethod
    def set_ffn_width(self, layer: int, width: int) -> None:
        """The FFN's width after its projections were sliced."""

    @abc.abstractmethod
    def share_kv(self, layer: int, source: int) -> None:
        """`layer` attends over the keys and values of the earlier layer `source`."""

    @abc.abstractmethod
    def runs_patterns(self, layer: int) -> bool:
        """Whether the layer's attention can run per-KV-head patterns."""

    @property
    def graph_kv_cache(self) -> bool:
        """Whether the model carries its own KV cache (an ONNX decoder's past inputs and present
        outputs), which the runtimes loading the artifact decode from. It keeps every key, so
        attention patterns limit what a step reads, not the cache; and only windows of a fixed
        size are offered: one growing with the length would make those runtimes (each cached
        position computed under its own step's window) and a rerun of the whole sequence (the
        plan's measurement, tailor's check) disagree."""
        return False

    @abc.abstractmethod
    def set_patterns(self, layer: int, patterns: list[Pattern | None]) -> None:
        """Per-KV-head attention patterns (None: dense)."""

    def int8_refusal(self, projections: list[Projection]) -> str | None:
        """Why these projections cannot run on INT8 weights here (None: they can)."""
        return f"INT8 is not offered for {self.format} models"

    def int8_projections(self, projections: list[Projection]) -> None:
        """Run these projections on INT8 weights with dynamically quantized activations, once
        every structural edit is done: what runs and what is saved is quantized, while edits and
        refits keep working on the float weights. Only where int8_refusal says None."""
        raise TailorError(self.int8_refusal(projections))

    def finish(self) -> None:
        """After a set of edits: whatever the format needs to stay consistent."""

    # ---- measuring and refitting ----

    @abc.abstractmethod
    def pattern_runner(self) -> PatternRunner:
        ...

    @abc.abstractmethod
    def branches(self, dense: "Backend", removed: set[int]) -> Branches:
        """This (rewritten) model's branches beside `dense`; `removed`: the layers it skips."""

    # ---- writing ----

    @abc.abstractmethod
    def save(self, folder: Path, formats: tuple[str, ...]) -> None:
        """Write the model into an artifact folder in `formats`."""
