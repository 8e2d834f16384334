"""Profile: one calibration run that collects every signal the passes and the search need.

Signals (forward hooks on the modules the TransformerGraph points to):
- block influence per layer: 1 - cos(block input, block output) of the residual stream (ShortGPT);
- FFN contribution: |FFN output| / |block input|, and the FFN's mean output (for ffn_skip);
- the attention branch's mean output (for dropping attention);
- per output-projection input channel: mean and variance, and the weight-column norms (FLAP);
- per layer pair: cosine similarity of their keys (KVSharer-style ranking).
Then every candidate option of every pass is applied alone to a copy of the model and its real
KL to the dense model is measured on the calibration tokens: the search's loss estimates.

Results are cached on disk, keyed by (model hash, data hash, settings), with a checksum, so a
second compile at another budget costs no calibration.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from tqdm import tqdm

from tailor.errors import TailorError
from tailor.passes.attention_profile import AttentionInfluence, profile_attention
from tailor.passes.base import Option
from tailor.passes.obs import removal_importance
from tailor.rewriter import onnx_surgery
from tailor.rewriter.graph import TransformerGraph
from tailor.rewriter.torch_surgery import RIDGE, block_path, module_path
from tailor.runtime.artifact import sha256_file
from tailor.runtime.attention_patterns import Pattern
from tailor.runtime.session import as_runnable

PROFILE_VERSION = 3
DEFAULT_CALIB_LEN = 512  # tokens per calibration window, unless the inputs say otherwise


@dataclass
class Signals:
    block_influence: list[float]
    ffn_contribution: list[float]
    ffn_mean: list[list[float]]
    attn_mean: list[list[float]]
    kv_similarity: list[list[float]]
    # per query head (output projection) and per FFN channel (down projection): when a greedy
    # optimal brain surgeon, refitting the rest, would remove it (tailor.passes.obs); higher
    # matters more. What head and FFN pruning rank by.
    o_importance: list[list[float]]
    down_importance: list[list[float]]
    # E[x̃ x̃ᵀ] of the inputs of the output and down projections, x̃ = [x; 1]: what least-squares
    # compensation of pruned channels needs. Kept out of JSON (cached in safetensors).
    o_gram: list[np.ndarray] = field(default_factory=list, repr=False)
    down_gram: list[np.ndarray] = field(default_factory=list, repr=False)
    # per (layer, KV head, pattern): the measured cost of sparse attention (attn_pattern)
    attention: AttentionInfluence | None = None

    GRAMS = ("o_gram", "down_gram")


@dataclass
class Profile:
    signals: Signals
    option_kl: dict[str, float]
    data: str                      # where the calibration tokens came from
    tokens: int
    key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(replace(self, signals=replace(self.signals, o_gram=[], down_gram=[], attention=None)))
        for g in Signals.GRAMS:
            d["signals"].pop(g)
        att = self.signals.attention
        d["signals"]["attention"] = att.to_json() if att is not None else None
        return d

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"{g}.{i}": np.ascontiguousarray(a) for g in Signals.GRAMS
                for i, a in enumerate(getattr(self.signals, g))}

    @classmethod
    def from_json(cls, d: dict, arrays: dict[str, np.ndarray]) -> "Profile":
        n = len(d["signals"]["block_influence"])
        grams = {g: [arrays[f"{g}.{i}"] for i in range(n)] for g in Signals.GRAMS}
        att = d["signals"].pop("attention", None)
        grams["attention"] = AttentionInfluence.from_json(att) if att is not None else None
        return cls(Signals(**d["signals"], **grams), {k: float(v) for k, v in d["option_kl"].items()},
                   d["data"], int(d["tokens"]), d.get("key", ""), d.get("extra", {}))


def neutral_signals(graph: TransformerGraph) -> Signals:
    """Flat statistics: enough to enumerate every pass's candidates and price them before any
    calibration (costs depend on shapes only)."""
    n, h = graph.num_layers, graph.hidden_size
    return Signals([0.0] * n, [0.0] * n, [[0.0] * h] * n, [[0.0] * h] * n, [[0.0] * n] * n,
                   [[0.0] * b.attn.num_heads for b in graph.blocks],
                   [[0.0] * b.ffn.width for b in graph.blocks])


# ---- calibration data ----------------------------------------------------------------------------

class Lines:
    """Calibration inputs each of its own length (an encoder's lines, whole, as it will see them),
    grouped by length so that every batch is a plain [b, T] tensor."""

    def __init__(self, rows: list[torch.Tensor]):
        self.rows = sorted(rows, key=len)   # stable: equal lengths keep the text's order

    def __len__(self) -> int:
        return len(self.rows)

    def numel(self) -> int:
        return sum(len(r) for r in self.rows)

    def batches(self, size: int) -> list[torch.Tensor]:
        out = []
        for _, same in itertools.groupby(self.rows, key=len):
            same = list(same)
            out += [torch.stack(same[i:i + size]) for i in range(0, len(same), size)]
        return out


Inputs = torch.Tensor | Lines   # [N, T] windows, or whole lines


def batches(ids: Inputs, size: int) -> list[torch.Tensor]:
    """[b, T] batches of calibration inputs, windows or lines."""
    if isinstance(ids, Lines):
        return ids.batches(size)
    return [ids[i:i + size] for i in range(0, len(ids), size)]


@dataclass
class Calibration:
    profile_ids: Inputs           # windows (or lines) the signals and option losses are measured on
    heldout_ids: Inputs           # windows (or lines) the search's refine loop measures plans on
    source: str                   # human-readable: file and hash, or "data-free"
    digest: str
    stream: torch.Tensor | None = None   # all calibration tokens, for longer windows
    # attention profiling: windows per length, retrieval sequences per length (profile) and at
    # the validation length (the refine loop), and the weight of retrieval in every loss
    attn_texts: dict[int, torch.Tensor] = field(default_factory=dict)
    heldout_long_ids: torch.Tensor | None = None    # text windows at the validation length
    retrieval: dict[int, list] = field(default_factory=dict)
    heldout_retrieval: list = field(default_factory=list)
    retrieval_weight: float = 0.0


def spread_windows(stream: torch.Tensor, length: int, count: int, between: bool = False) -> torch.Tensor:
    """[count, length] windows spread evenly over the whole stream (not its first pages); with
    `between`, offset by half a spacing so they sit between the windows of the plain spread."""
    if between:
        starts = ((len(stream) - length) / count * (np.arange(count) + 0.5)).astype(int)
    else:
        starts = np.linspace(0, len(stream) - length, count).astype(int)
    return torch.stack([stream[s:s + length] for s in starts])


def calibration_from_text(pieces: str | Iterable[str], tokenizer, window: int | None, windows, name: str, *,
                          per_line: bool = False) -> Calibration:
    """Windows of `window` tokens spread over the tokenized text (a string, or pieces of a long
    file: tailor.quality.metrics.read_text_pieces); `windows` is a count or a function of the
    window length. With `per_line` (encoders, whose inputs are single sentences or passages),
    each line is tokenized on its own, with the special tokens the tokenizer adds (BERT's
    [CLS] … [SEP]); then with `window` None every input is a whole line, as the model will see
    them ([CLS] at position 0, [SEP] at its end, every length), about count(median) × median
    tokens of lines spread over the text; with a `window`, windows that begin where a line does.
    On MiniLM at budget 0.75 (nominal cpu target; benchmarks/encoder_calibration.py), windows of
    the median length gave an embedding cosine of 0.949, whole lines 0.951 on as many tokens and
    0.956 on twice as many (0.951 / 0.953 / 0.960 refitted in sequence); windows of 32 tokens cut
    anywhere had given 0.944 and 128-token ones 0.912."""
    from tailor.quality.metrics import tokenize_lines, tokenize_pieces

    pieces = [pieces] if isinstance(pieces, str) else pieces
    count = windows if callable(windows) else (lambda n: windows)
    if per_line:
        ids, starts = tokenize_lines(pieces, tokenizer)
        if window is None:
            lengths = np.diff(np.append(starts, len(ids)))
            median = max(2, int(np.median(lengths))) if len(lengths) else 2
            return _calibration_from_lines(ids, starts, count(median) * median, name,
                                           _max_len(tokenizer))
        return _calibration_from_stream(ids, window, count(window), name, "calibration text", starts=starts)
    window = window or DEFAULT_CALIB_LEN
    ids = tokenize_pieces(pieces, tokenizer)
    return _calibration_from_stream(ids, window, count(window), name, "calibration text")


# lines longer than the tokenizer's limit (or than this, where it states none) are cut: calibrating
# on a line's first 512 tokens says as much about the weights as on all of it
MAX_LINE_TOKENS = 512


def _max_len(tokenizer) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 2 <= limit < MAX_LINE_TOKENS else MAX_LINE_TOKENS


def _calibration_from_lines(ids: np.ndarray, starts: np.ndarray, tokens: int, name: str,
                            max_len: int) -> Calibration:
    """Whole lines spread evenly over the text until about `tokens` tokens; every 4th held out."""
    stream = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    ends = np.append(starts[1:], len(ids))
    lengths = np.minimum(ends - starts, max_len)
    if len(starts) < 2:
        raise TailorError(f"calibration text {name} has {len(starts)} non-empty line(s): an encoder "
                          f"calibrates on its lines, one input each; need at least 2")
    n = int(np.clip(round(tokens / max(lengths.mean(), 1)), 2, len(starts)))
    chosen = np.unique(np.linspace(0, len(starts) - 1, n).astype(int))
    rows = [stream[starts[i]:starts[i] + lengths[i]] for i in chosen]
    held = _held_out(len(rows))
    digest = hashlib.sha256(b"".join(r.numpy().tobytes() + b"|" for r in rows)).hexdigest()[:16]
    total = int(sum(len(r) for r in rows))
    return Calibration(Lines([r for r, h in zip(rows, held) if not h]),
                       Lines([r for r, h in zip(rows, held) if h]),
                       f"{name} ({len(rows)} whole lines, {total} tokens, of {len(starts)})", digest,
                       stream=stream)


def _held_out(n: int) -> np.ndarray:
    """Which of n calibration inputs the search's refine loop keeps for itself: every 4th."""
    return np.arange(n) % 4 == 3 if n >= 4 else np.arange(n) == n - 1


def _calibration_from_stream(ids: list[int] | np.ndarray, window: int, windows: int, name: str,
                             what: str, starts: np.ndarray | None = None) -> Calibration:
    """Windows spread over a token stream (at offsets chosen among `starts` when given); every 4th
    one held out for the search."""
    stream = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    eligible = None if starts is None else starts[starts + window <= len(ids)]
    n = min(windows, len(ids) // window if eligible is None else len(eligible))
    if n < 2:
        raise TailorError(f"{what} {name} has {len(ids)} tokens: need at least "
                          f"{2 * window} (two windows of {window})")
    if eligible is None:
        t = spread_windows(stream, window, n)
    else:
        chosen = eligible[np.linspace(0, len(eligible) - 1, n).astype(int)]
        t = torch.stack([stream[s:s + window] for s in chosen])
    held = _held_out(n)
    # the windows themselves, not just the stream: how they are cut is part of the data
    digest = hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
    return Calibration(t[torch.from_numpy(~held)], t[torch.from_numpy(held)],
                       f"{name} ({n} windows of {window} tokens spread over {len(ids)})", digest,
                       stream=stream)


def calibration_data_free(model, vocab: int, window: int, windows: int, seed: int) -> Calibration:
    """Sequences sampled from the model itself, starting from random tokens (no user data); for
    encoders, and for ONNX models (which cannot be sampled from without a KV cache), random tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (windows, 1), generator=gen)
    torch.manual_seed(seed)
    sampled = hasattr(model, "generate") and getattr(model.config, "is_decoder", True) is not False
    with torch.no_grad():
        if sampled:
            import transformers

            level = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # padding advice irrelevant to unpadded sampling
            try:
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                     max_new_tokens=window - 1, min_new_tokens=window - 1, pad_token_id=0)
            finally:
                transformers.logging.set_verbosity(level)
        else:
            out = torch.randint(0, vocab, (windows, window), generator=gen)
    held = max(1, windows // 4)
    how = "sampled from the model" if sampled else "of uniformly random tokens"
    return Calibration(out[: windows - held], out[windows - held:],
                       f"data-free: {windows} sequences of {window} tokens {how}",
                       f"free-{seed}-{windows}-{window}", stream=out[: windows - held].reshape(-1))


def calibration_from_ids(path: Path, vocab: int, window: int, windows: int) -> Calibration:
    """Calibration from a JSON file of token ids (a list of ints, or of lists: concatenated), for
    models that come without a tokenizer."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TailorError(f"{path}: not a JSON file of token ids ({type(e).__name__})") from None
    flat = [x for row in data for x in (row if isinstance(row, list) else [row])] \
        if isinstance(data, list) else None
    if not flat or not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
        raise TailorError(f"{path}: expected a JSON list of token ids (ints), or a list of such lists")
    bad = [x for x in flat if not 0 <= x < vocab]
    if bad:
        raise TailorError(f"{path}: token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
    return _calibration_from_stream(flat, window, windows, str(path), "calibration ids")


def add_attention_data(cal: Calibration, lengths: list[int], validation_len: int, tokenizer, *,
                       template=None, windows_tokens: int = 2048, samples: int = 4,
                       retrieval_weight: float = 0.25, seed: int = 0) -> None:
    """Windows of each profiled length spread over the calibration tokens, and synthetic
    retrieval sequences (when there is a tokenizer to write them with)."""
    from tailor.quality.retrieval import RetrievalTemplate, make_samples

    template = template or RetrievalTemplate()
    stream = cal.stream
    longest = max(*lengths, validation_len)
    if len(stream) < longest:  # short calibration data: repeated to the longest length
        stream = stream.repeat(-(-longest // len(stream)))
    def count(n: int) -> int:
        return max(1, min(windows_tokens // n, len(stream) // n))

    for n in lengths:
        cal.attn_texts[n] = spread_windows(stream, n, count(n))
    # validation windows sit between the profiled ones
    cal.heldout_long_ids = spread_windows(stream, validation_len, count(validation_len), between=True)
    if tokenizer is not None:
        cal.retrieval = {n: make_samples(tokenizer, n, samples, seed + n, template) for n in lengths}
        cal.heldout_retrieval = make_samples(tokenizer, validation_len, samples, seed + 7919 + validation_len,
                                             template)
        cal.retrieval_weight = retrieval_weight


# ---- measuring ---------------------------------------------------------------------------------

def model_outputs(model, ids: Inputs, batch: int = 4) -> list[torch.Tensor]:
    """Logits (LMs) or hidden states of a transformers or onnx_ir model, in batches."""
    run = as_runnable(model)
    with torch.no_grad():
        return [run(b).float() for b in batches(ids, batch)]


def clone(model):
    """An independent copy to rewrite: a transformers model or an onnx_ir model."""
    return onnx_surgery.clone(model) if isinstance(model, ir.Model) else copy.deepcopy(model)


def divergence(reference: list[torch.Tensor], outputs: list[torch.Tensor], is_lm: bool) -> float:
    """Mean per-token KL(reference || output) for LMs; 1 - cosine of hidden states otherwise."""
    total, count = 0.0, 0
    for ref, out in zip(reference, outputs):
        if is_lm:
            lp_ref, lp = torch.log_softmax(ref.double(), -1), torch.log_softmax(out.double(), -1)
            kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
        else:
            kl = 1 - torch.cosine_similarity(ref.double(), out.double(), dim=-1)
        total += float(kl.sum())
        count += kl.numel()
    return total / max(count, 1)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """Σ x̃ x̃ᵀ over tokens, x̃ = [x; 1]."""
    flat = x.reshape(-1, x.shape[-1])
    aug = torch.cat([flat, torch.ones(len(flat), 1, dtype=flat.dtype)], 1)
    return aug.T @ aug


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class SignalSums:
    """Running sums of the profile's statistics, fed by torch hooks or onnxruntime outputs."""

    def __init__(self, n: int):
        self.n = n
        self.acc: dict[str, list] = {k: [None] * n for k in
                                     ("bi", "ffn_norm", "ffn_sum", "attn_sum", "o_gram", "d_gram", "tok")}
        self.keys: list = [None] * n

    def _add(self, dst, i, val):
        self.acc[dst][i] = val if self.acc[dst][i] is None else self.acc[dst][i] + val

    def block(self, i: int, x: torch.Tensor, y: torch.Tensor, ffn_out: torch.Tensor, attn_out: torch.Tensor):
        """Block input and output [B, T, H] and its two branches' outputs."""
        x, y, f = x.double(), y.double(), ffn_out.double()
        self._add("bi", i, float((1 - torch.cosine_similarity(x, y, dim=-1)).sum()))
        self._add("tok", i, x.shape[0] * x.shape[1])
        self._add("ffn_norm", i, float((f.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-9)).sum()))
        self._add("ffn_sum", i, f.sum((0, 1)))
        self._add("attn_sum", i, attn_out.double().sum((0, 1)))

    def projection_inputs(self, i: int, o_in: torch.Tensor, down_in: torch.Tensor):
        for name, x in (("o", o_in.double()), ("d", down_in.double())):
            self._add(f"{name}_gram", i, _gram(x))

    def key(self, i: int, k: torch.Tensor):
        self.keys[i] = k.double().flatten(0, 1)  # last batch only: enough for a ranking

    def signals(self, o_weights: list[torch.Tensor], down_weights: list[torch.Tensor],
                head_dims: list[int]) -> Signals:
        """The weights in out_in layout: the output and down projection of every layer."""
        acc, n, tok = self.acc, self.n, self.acc["tok"]
        o_gram = [(acc["o_gram"][i] / tok[i]).numpy() for i in range(n)]
        down_gram = [(acc["d_gram"][i] / tok[i]).numpy() for i in range(n)]
        ks = self.keys
        sim = [[float(torch.cosine_similarity(ks[i], ks[j], dim=-1).mean()) if ks[i].shape == ks[j].shape
                else 0.0 for j in range(n)] for i in range(n)]
        return Signals(
            block_influence=[acc["bi"][i] / tok[i] for i in range(n)],
            ffn_contribution=[acc["ffn_norm"][i] / tok[i] for i in range(n)],
            ffn_mean=[(acc["ffn_sum"][i] / tok[i]).tolist() for i in range(n)],
            attn_mean=[(acc["attn_sum"][i] / tok[i]).tolist() for i in range(n)],
            kv_similarity=sim,
            o_importance=[removal_importance(w.numpy(), gm, d, RIDGE).tolist()
                          for w, gm, d in zip(o_weights, o_gram, head_dims)],
            down_importance=[removal_importance(w.numpy(), gm, 1, RIDGE).tolist()
                             for w, gm in zip(down_weights, down_gram)],
            o_gram=o_gram, down_gram=down_gram)


def collect_signals(model, graph: TransformerGraph, ids: Inputs) -> Signals:
    """The profile's statistics from a transformers model (forward hooks) or an onnx_ir model
    (its intermediate values made graph outputs, run by onnxruntime)."""
    if isinstance(model, ir.Model):
        return _collect_onnx(model, graph, ids)
    sums = SignalSums(graph.num_layers)
    seen: dict[str, list] = {k: [None] * graph.num_layers for k in ("in", "ffn", "attn", "o", "down")}

    def save_input(kind, i):
        def hook(mod, args, kwargs):
            seen[kind][i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def save_output(kind, i):
        def hook(mod, args, out):
            seen[kind][i] = _first(out)
        return hook

    def block_done(i):
        def hook(mod, args, out):
            sums.block(i, seen["in"][i], _first(out), seen["ffn"][i], seen["attn"][i])
            sums.projection_inputs(i, seen["o"][i], seen["down"][i])
        return hook

    def key(i):
        def hook(mod, args, out):
            sums.key(i, out)
        return hook

    hooks = []
    for b in graph.blocks:
        i, sub = b.index, model.get_submodule
        block = sub(block_path(model, b))
        hooks += [
            block.register_forward_pre_hook(save_input("in", i), with_kwargs=True),
            sub(module_path(b.attn.o.weight.name)).register_forward_pre_hook(save_input("o", i),
                                                                             with_kwargs=True),
            sub(module_path(b.ffn.down.weight.name)).register_forward_pre_hook(save_input("down", i),
                                                                               with_kwargs=True),
            # the branches' outputs are their last projections' outputs (not the modules around
            # them, which in post-norm models include the residual add and the norm)
            sub(module_path(b.ffn.down.weight.name)).register_forward_hook(save_output("ffn", i)),
            sub(module_path(b.attn.o.weight.name)).register_forward_hook(save_output("attn", i)),
            sub(module_path(b.attn.k.weight.name)).register_forward_hook(key(i)),
            block.register_forward_hook(block_done(i)),
        ]
    try:
        model_outputs(model, ids)
    finally:
        for h in hooks:
            h.remove()

    def weight(p):
        w = model.get_submodule(module_path(p.weight.name)).weight.detach().double()
        return w if p.layout == "out_in" else w.T

    return sums.signals([weight(b.attn.o) for b in graph.blocks], [weight(b.ffn.down) for b in graph.blocks],
                        [b.attn.head_dim for b in graph.blocks])


def _collect_onnx(model: ir.Model, graph: TransformerGraph, ids: Inputs, batch: int = 4) -> Signals:
    probe = onnx_surgery.clone(model)
    nodes = onnx_surgery.nodes_by_name(probe)
    values = onnx_surgery.block_values(probe, graph)
    wanted = []
    for b, v in zip(graph.blocks, values):
        k = onnx_surgery.linear_output(nodes[b.attn.k.node])
        wanted.append([v.input, v.output, v.ffn_out, v.attn_out, nodes[b.attn.o.node].inputs[0],
                       nodes[b.ffn.down.node].inputs[0], k])
    onnx_surgery.expose(probe, [x for row in wanted for x in row])
    run = as_runnable(probe)
    sums = SignalSums(graph.num_layers)
    for chunk in batches(ids, batch):
        out = run.run_all(chunk.numpy())
        for i, row in enumerate(wanted):
            x, y, f, a, o_in, d_in, k = (torch.from_numpy(out[v.name]) for v in row)
            sums.block(i, x, y, f, a)
            sums.projection_inputs(i, o_in, d_in)
            sums.key(i, k)

    def weight(p):
        w, _ = onnx_surgery.projection_arrays(model, p)
        return torch.from_numpy(np.array(w, dtype=np.float64))  # [out, in]

    return sums.signals([weight(b.attn.o) for b in graph.blocks], [weight(b.ffn.down) for b in graph.blocks],
                        [b.attn.head_dim for b in graph.blocks])


def apply_options(model, graph: TransformerGraph, options: list[Option], signals: Signals | None):
    """Apply options of several passes to `model` in place, in the order that keeps indices valid."""
    from tailor.passes.registry import APPLY_ORDER, PASSES

    onnx = isinstance(model, ir.Model)
    for name in APPLY_ORDER:
        chosen = [o for o in options if o.pass_name == name]
        if chosen:
            apply = getattr(PASSES[name], "apply_onnx" if onnx else "apply_torch", None)
            if apply is None:
                raise TailorError(f"pass {name} has no ONNX rewrite yet")
            apply(model, graph, chosen, signals)
    return onnx_surgery.finish(model) if onnx else model


def measure_options(model, graph: TransformerGraph, options: list[Option], signals: Signals,
                    ids: torch.Tensor, reference: list[torch.Tensor], progress: bool) -> dict[str, float]:
    from tailor.passes.registry import PASSES

    is_lm = graph.task == "causal-lm"
    result = {}
    options = [o for o in options if getattr(PASSES[o.pass_name], "MEASURED", True)]
    for o in tqdm(options, desc="measuring options", disable=not progress, unit="opt"):
        variant = apply_options(clone(model), graph, [o], signals)
        result[o.key] = divergence(reference, model_outputs(variant, ids), is_lm)
    return result


# ---- cache -----------------------------------------------------------------------------------------

def cache_path(key: str) -> Path:
    from tailor.cli.default_model import cache_dir

    return cache_dir() / "profiles" / f"{key}.json"


def profile_key(model_hash: str, data_digest: str, settings: dict) -> str:
    blob = json.dumps({"model": model_hash, "data": data_digest, "settings": settings,
                       "version": PROFILE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_cached(key: str) -> Profile | None:
    from safetensors.numpy import load_file

    path = cache_path(key)
    try:
        d = json.loads(path.read_text())
        body = json.dumps(d["profile"], sort_keys=True)
        arrays_path = path.with_suffix(".safetensors")
        if hashlib.sha256(body.encode()).hexdigest() != d["checksum"] or \
                sha256_file(arrays_path) != d["arrays_checksum"]:
            return None  # corrupt: recompute
        return Profile.from_json(d["profile"], load_file(str(arrays_path)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(profile: Profile) -> None:
    from safetensors.numpy import save_file

    path = cache_path(profile.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = path.with_suffix(".safetensors")
    tmp_arrays = path.with_suffix(f".{os.getpid()}.tmp.safetensors")
    save_file(profile.arrays(), str(tmp_arrays))
    body = profile.to_json()
    data = {"checksum": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(),
            "arrays_checksum": sha256_file(tmp_arrays), "profile": body}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp_arrays, arrays)
    os.replace(tmp, path)


def run_profile(model, graph: TransformerGraph, calib: Calibration, passes: list[str], *,
                model_hash: str, settings: dict, progress: bool = True,
                use_cache: bool = True) -> tuple[Profile, list[Option]]:
    """Signals, the candidate options of `passes`, and each option's measured KL."""
    from tailor.passes.registry import PASSES, candidates_for

    # everything that changes a measured number is part of the key
    key = profile_key(model_hash, calib.digest, {**settings, "passes": sorted(passes), "ridge": RIDGE})
    cached = load_cached(key) if use_cache else None
    if cached is not None:
        cached.extra["cached"] = True
        candidates = candidates_for(graph, cached.signals, passes)
        # candidates a newer tailor offers that this entry has not measured: measure them now
        # rather than let the search take an unmeasured option for free
        missing = [o for o in candidates if o.key not in cached.option_kl
                   and getattr(PASSES[o.pass_name], "MEASURED", True)]
        if missing:
            reference = model_outputs(model, calib.profile_ids)
            cached.option_kl.update(measure_options(model, graph, missing, cached.signals,
                                                    calib.profile_ids, reference, progress))
            store(cached)
        return cached, candidates
    signals = collect_signals(model, graph, calib.profile_ids)
    if "attn_pattern" in passes:
        grid = [Pattern.from_json(p) for p in settings["attn"]["grid"]]
        signals.attention = profile_attention(model, graph, calib.attn_texts, calib.retrieval, grid,
                                              progress=progress,
                                              retrieval_weight=calib.retrieval_weight)
    candidates = candidates_for(graph, signals, passes)
    reference = model_outputs(model, calib.profile_ids)
    option_kl = measure_options(model, graph, candidates, signals, calib.profile_ids, reference, progress)
    prof = Profile(signals, option_kl, calib.source, int(calib.profile_ids.numel()), key)
    if use_cache:
        store(prof)
    prof.extra["cached"] = False
    return prof, candidates
