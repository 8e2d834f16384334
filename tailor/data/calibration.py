"""Calibration data: what the profile, the search and the refit run the model on.

Windows of a text's tokens spread over the whole file, an encoder's lines whole, a JSON file of
token ids, or data-free sequences sampled from the model; every 4th input held out for the
search's refine loop; for attention profiling, windows of each profiled length and synthetic
retrieval sequences.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tailor.core.devices import attention_for_changing_shapes, module_device
from tailor.core.errors import TailorError

DEFAULT_CALIB_LEN = 512  # tokens per calibration window, unless the inputs say otherwise


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


# tokens per batch at most (rows of long windows go fewer at a time): one batch's logits of a
# 49K-token vocabulary at 4 × 3072 tokens took 2.4 GiB in float32 on the GPU
BATCH_TOKENS = 2048


def batches(ids: Inputs, size: int, tokens: int = BATCH_TOKENS) -> list[torch.Tensor]:
    """[b, T] batches of calibration inputs, windows or lines: `size` rows, fewer where that
    would pass `tokens` tokens."""
    if isinstance(ids, Lines):
        return ids.batches(size)
    size = max(1, min(size, tokens // max(1, ids.shape[-1])))
    return [ids[i:i + size] for i in range(0, len(ids), size)]


@dataclass
class Calibration:
    profile_ids: Inputs           # windows (or lines) the signals and option losses are measured on
    heldout_ids: Inputs           # windows (or lines) the search's refine loop measures plans on
    source: str                   # human-readable: file and hash, or "data-free"
    digest: str
    stream: torch.Tensor | None = None   # all calibration tokens, for longer windows
    # attention profiling: windows per length, retrieval sequences per length (profile) and at
    # the held-out lengths (the refine loop), and the weight of retrieval in every loss
    attn_texts: dict[int, torch.Tensor] = field(default_factory=dict)
    heldout_long_ids: torch.Tensor | None = None    # text windows at the validation length
    retrieval: dict[int, list] = field(default_factory=dict)
    # candidates at each held-out length, in order; the search keeps the first
    # heldout_retrieval_per_length of each length that the dense model answers (stages.search.HeldOut)
    heldout_retrieval: list = field(default_factory=list)
    heldout_retrieval_per_length: int = 0
    # candidates a length always run for the dense model, however costly (more where the device
    # affords them: stages.search.HeldOut)
    heldout_retrieval_runs: int = 0
    retrieval_weight: float = 0.0
    # retrieval sequences of the longest profiled length that the retrieval gates are fitted on
    # (tailor.backends.retrieval_gates)
    gate_retrieval: list = field(default_factory=list)


def spread_windows(stream: torch.Tensor, length: int, count: int, between: bool = False) -> torch.Tensor:
    """[count, length] windows spread evenly over the whole stream (not its first pages); with
    `between`, offset by half a spacing so they sit between the windows of the plain spread."""
    if between:
        starts = ((len(stream) - length) / count * (np.arange(count) + 0.5)).astype(int)
    else:
        starts = np.linspace(0, len(stream) - length, count).astype(int)
    return torch.stack([stream[s:s + length] for s in starts])


def calibration_from_text(pieces: str | Iterable[str], tokenizer, window: int | None, windows, name: str, *,
                          per_line: bool = False, max_line: int | None = None) -> Calibration:
    """Windows of `window` tokens spread over the tokenized text (a string, or pieces of a long
    file: tailor.quality.metrics.read_text_pieces); `windows` is a count or a function of the
    window length. With `per_line` (encoders, whose inputs are single sentences or passages),
    each line is tokenized on its own, with the special tokens the tokenizer adds (BERT's
    [CLS] … [SEP]); then with `window` None every input is a whole line, as the model will see
    them ([CLS] at position 0, [SEP] at its end, every length), about count(median) × median
    tokens of lines spread over the text, each cut at `max_line` tokens (a graph's fixed length) or
    the tokenizer's limit; with a `window`, windows that begin where a line does.
    On MiniLM at budget 0.75 (nominal cpu target; benchmarks/encoder_calibration.py), windows of
    the median length gave an embedding cosine of 0.949, whole lines 0.951 on as many tokens and
    0.956 on twice as many (0.951 / 0.953 / 0.960 refitted in sequence); windows of 32 tokens cut
    anywhere had given 0.944 and 128-token ones 0.912."""
    from tailor.data.text import tokenize_lines, tokenize_pieces

    pieces = [pieces] if isinstance(pieces, str) else pieces
    count = windows if callable(windows) else (lambda n: windows)
    if per_line:
        ids, starts = tokenize_lines(pieces, tokenizer)
        if window is None:
            lengths = np.diff(np.append(starts, len(ids)))
            median = max(2, int(np.median(lengths))) if len(lengths) else 2
            return _calibration_from_lines(ids, starts, count(median) * median, name,
                                           min(_max_len(tokenizer), max_line or MAX_LINE_TOKENS))
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


Sampler = Callable[[torch.Tensor, int], torch.Tensor]   # (first tokens [n, 1], new tokens) -> [n, 1 + new]


def calibration_data_free(model, vocab: int, window: int, windows: int, seed: int,
                          sample: Sampler | None = None) -> Calibration:
    """Sequences sampled from the model itself, starting from random tokens (no user data); for
    encoders, and for ONNX models (which cannot be sampled from without a KV cache), random tokens.
    `sample`: how to sample (temperature 1, no top-k), seeded by the caller; default transformers'
    `generate`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (windows, 1), generator=gen)
    sampled = hasattr(model, "generate") and getattr(model.config, "is_decoder", True) is not False
    if sampled:
        out = (sample or _transformers_sampler(model, seed))(ids, window - 1).cpu()
    else:
        out = torch.randint(0, vocab, (windows, window), generator=gen)
    held = max(1, windows // 4)
    how = "sampled from the model" if sampled else "of uniformly random tokens"
    return Calibration(out[: windows - held], out[windows - held:],
                       f"data-free: {windows} sequences of {window} tokens {how}",
                       f"free-{seed}-{windows}-{window}", stream=out[: windows - held].reshape(-1))


def _transformers_sampler(model, seed: int) -> Sampler:
    def sample(ids: torch.Tensor, new: int) -> torch.Tensor:
        import transformers

        # transformers' sampling draws from torch's global generators: seeded inside a fork of
        # their state (the CPU's and the model's GPU's), so the caller's random stream is as it
        # was; a dispatched model's inputs go where its embedding runs
        device = module_device(model)
        cuda = [device] if device.type == "cuda" else []
        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # padding advice irrelevant to unpadded sampling
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=cuda), attention_for_changing_shapes():
                torch.manual_seed(seed)
                ids = ids.to(device)
                return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                      max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        finally:
            transformers.logging.set_verbosity(level)
    return sample


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


def text_of_length(cal: Calibration, length: int) -> torch.Tensor:
    """The calibration tokens, repeated where they are fewer than `length`."""
    stream = cal.stream
    return stream.repeat(-(-length // len(stream))) if len(stream) < length else stream


def add_attention_data(cal: Calibration, lengths: list[int], validation_len: int, tokenizer, *,
                       forms: list | None = None, windows_tokens: int = 2048, samples: int = 4,
                       gate_samples: int = 16, retrieval_weight: float = 0.25, seed: int = 0,
                       heldout_draws: int = 4) -> None:
    """Windows of each profiled length spread over the calibration tokens, and synthetic
    retrieval sequences (when there is a tokenizer to write them with) of the retrieval `forms`
    (default: the first of TEMPLATES): of the first form, `samples` a profiled length and
    `gate_samples` for the retrieval gates; for the held-out check, `heldout_draws` × `samples`
    candidates of each form a held-out length, the forms taking turns, of which the check keeps
    the first `samples` × the forms that the dense model answers (running at least 2 × `samples`
    of them over the held-out lengths, more where the device affords it)."""
    from tailor.data.retrieval import TEMPLATES, make_samples

    forms = forms or [TEMPLATES[0]]
    stream = text_of_length(cal, max(*lengths, validation_len))
    def count(n: int) -> int:
        return max(1, min(windows_tokens // n, len(stream) // n))

    for n in lengths:
        cal.attn_texts[n] = spread_windows(stream, n, count(n))
    # validation windows sit between the profiled ones
    cal.heldout_long_ids = spread_windows(stream, validation_len, count(validation_len), between=True)
    if tokenizer is not None:
        # the profile and the gates are fitted on the first form alone: fitted on every form
        # SmolLM2-135M answers, in turn, both rankings lost more of the passkey at 4K (the
        # profile's 0.88 -> 0.28 at attention 0.25; docs/BENCHMARKS.md, thirteenth session)
        cal.retrieval = {n: make_samples(tokenizer, n, samples, seed + n, forms[0], stream) for n in lengths}
        # held out: at the shortest profiled length, the validation length and the longest
        # profiled one (the workload's), so that a plan which reads far enough at one but not at
        # another is seen (SmolLM2-135M at attention 0.25: a plan kept the 4K passkey, 0.89, that
        # a check at 6K and 8K only, where every plan had lost it, could not tell apart). More are
        # drawn than kept: SmolLM2-135M answers 1 in 3 at 8K, which left the check's retrieval
        # part 2 sequences of the 8 drawn
        heldout_lengths = sorted({min(lengths), validation_len, max(lengths)})
        cal.heldout_retrieval = [
            s for n in heldout_lengths
            for turn in zip(*(make_samples(tokenizer, n, samples * heldout_draws, seed + 7919 + n + 613 * i,
                                           form, stream) for i, form in enumerate(forms)))
            for s in turn]
        cal.heldout_retrieval_per_length = samples * len(forms)
        # the few always run, however costly: 2 × samples in all, as when two lengths were held
        # out. On 2 CPU cores these are what a length costs (SmolLM2-135M's compile: 833 s with
        # two lengths, 880 with three, against 15 minutes allowed; docs/BENCHMARKS.md)
        cal.heldout_retrieval_runs = -(-2 * samples // len(heldout_lengths))
        cal.gate_retrieval = make_samples(tokenizer, max(lengths), gate_samples, seed + 104729, forms[0],
                                          stream)
        cal.retrieval_weight = retrieval_weight
