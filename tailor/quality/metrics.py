"""Quality of a rewritten model against its original: perplexity, KL, top-1 agreement for LMs;
cosine of hidden states for encoders. And side-by-side latency."""
from __future__ import annotations

import functools
import itertools
import math
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from tailor.core.devices import synchronize
from tailor.core.errors import TailorError
from tailor.data.text import load_tokenizer, read_text_pieces, token_windows, tokenize_pieces


def lm_metrics(logits: torch.Tensor, ids: torch.Tensor, ref_logits: torch.Tensor | None) -> dict:
    logp = torch.log_softmax(logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    out = {"perplexity": float(nll.exp())}
    if ref_logits is not None:
        ref = torch.log_softmax(ref_logits.double(), -1)
        out["kl_to_reference"] = float((ref.exp() * (ref - logp)).sum(-1).mean())
        out["top1_agreement"] = float((ref.argmax(-1) == logp.argmax(-1)).double().mean())
        out["reference_perplexity"] = float((-ref[:, :-1].gather(-1, ids[:, 1:, None]).mean()).exp())
    return out


def pooled_cosines(hidden: torch.Tensor, ref_hidden: torch.Tensor) -> torch.Tensor:
    """Cosine of the mean-pooled embeddings [B] of hidden states [B, T, H] and their reference."""
    return torch.cosine_similarity(hidden.double().mean(1), ref_hidden.double().mean(1), -1)


def encoder_metrics(hidden: torch.Tensor, ref_hidden: torch.Tensor | None) -> dict:
    if ref_hidden is None:
        return {}
    return {"mean_cosine_to_reference": float(pooled_cosines(hidden, ref_hidden).mean())}


# a tokenizer without a stated limit gives model_max_length = int(1e30); beyond this it is not one
_NO_LIMIT = 1 << 20


def line_limit(tokenizer, max_len: int | None) -> int | None:
    """The most tokens an encoder's line may have: the model's positions (max_len) or the
    tokenizer's model_max_length, whichever is smaller; None where neither is known."""
    stated = getattr(tokenizer, "model_max_length", None)
    limits = [n for n in (max_len, stated) if isinstance(n, int) and 2 <= n < _NO_LIMIT]
    return min(limits) if limits else None


def encoder_lines(pieces, tokenizer, count: int, limit: int | None) -> list[torch.Tensor]:
    """The first `count` non-empty lines of a text, each one input with its special tokens
    ([CLS] … [SEP]), as calibration makes them (tailor.data.text.tokenize_lines); cut to `limit`
    tokens by the tokenizer (so a cut line still ends with [SEP])."""
    rows: list[torch.Tensor] = []
    kwargs = {"truncation": True, "max_length": limit} if limit else {}
    for piece in pieces:
        lines = [line for line in piece.splitlines() if line.strip()][: count - len(rows)]
        if lines:
            encoded = tokenizer(lines, **kwargs)["input_ids"]
            rows += [torch.as_tensor(ids, dtype=torch.int64) for ids in encoded]
        if len(rows) >= count:
            break
    return rows


def evaluate_pair(reference, candidate, text: Path, tokenizer_path: Path | None, task: str, *,
                  seq_len: int = 1024, windows: int = 12, max_len: int | None = None,
                  lines: int = 256, batch: int = 16) -> dict:
    """Quality of `candidate` (model(input_ids) -> tensor) on a text, against `reference` if given:
    the same inputs for both. `max_len` is the most positions the model takes (learned absolute
    positions), where known. A causal LM is measured on the first `windows` windows of
    min(seq_len, max_len) tokens of the text as one stream; an encoder line by line, as it is
    calibrated: each of the first `lines` non-empty lines one input with its special tokens, cut
    to max_len (or the tokenizer's model_max_length where smaller), lines of equal length
    batched `batch` at a time; its metric is the embedding cosine averaged over the lines."""
    if tokenizer_path is None:
        raise TailorError("evaluating on a text needs a tokenizer: pass --tokenizer DIR")
    tokenizer = load_tokenizer(tokenizer_path)
    if task == "encoder":
        return _evaluate_lines(reference, candidate, text, tokenizer, lines, line_limit(tokenizer, max_len),
                               batch)
    if max_len is not None:
        seq_len = min(seq_len, max_len)
    ids = text_windows(text, tokenizer, seq_len, windows)
    result = {"text": str(text), "windows": int(ids.shape[0]), "seq_len": seq_len}
    if task == "causal-lm":
        references = None if reference is None else (reference(row[None]) for row in ids)
        return result | windowed_lm_metrics(candidate, ids, references)
    with torch.no_grad():
        out = torch.cat([candidate(row[None]) for row in ids])
        ref = torch.cat([reference(row[None]) for row in ids]) if reference is not None else None
    return result | encoder_metrics(out, ref)


def text_windows(text: Path, tokenizer, seq_len: int, windows: int) -> torch.Tensor:
    """The first `windows` windows [n, seq_len] of a text's tokens as one stream."""
    stream = tokenize_pieces(read_text_pieces(text), tokenizer, limit=seq_len * windows)
    return token_windows(stream, seq_len, windows)


def windowed_lm_metrics(candidate, ids: torch.Tensor, references: Iterable[torch.Tensor] | None) -> dict:
    """lm_metrics of `candidate` (model(input_ids) -> logits) over the windows ids [n, T], one
    window at a time (memory: one window's logits, not all), against the reference's logits of
    each window where given. Windows of equal length: the mean of their means is the mean."""
    logs = {"perplexity": [], "reference_perplexity": []}  # averaged in log: per-token NLL
    means: dict[str, list[float]] = {"kl_to_reference": [], "top1_agreement": []}
    refs = iter(references) if references is not None else None
    with torch.no_grad():
        for row in ids:
            ref = next(refs).cpu() if refs is not None else None
            m = lm_metrics(candidate(row[None]).cpu(), row[None], ref)
            for k, v in m.items():
                (logs[k] if k in logs else means[k]).append(math.log(v) if k in logs else v)
    out = {k: math.exp(statistics.fmean(v)) for k, v in logs.items() if v}
    return out | {k: statistics.fmean(v) for k, v in means.items() if v}


def _evaluate_lines(reference, candidate, text: Path, tokenizer, count: int, limit: int | None,
                    batch: int) -> dict:
    rows = encoder_lines(read_text_pieces(text), tokenizer, count, limit)
    if not rows:
        raise TailorError(f"{text} has no non-empty line: too short to evaluate an encoder on "
                          f"(each line is one input)")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))   # equal lengths side by side
    cosines = []
    with torch.no_grad():
        for _, same in itertools.groupby(order, key=lambda i: len(rows[i])):
            same = list(same)
            for k in range(0, len(same), batch):
                ids = torch.stack([rows[i] for i in same[k:k + batch]])
                out = candidate(ids)
                if reference is not None:
                    cosines.append(pooled_cosines(out, reference(ids)))
    result = {"text": str(text), "lines": len(rows), "tokens": int(sum(len(r) for r in rows))}
    if limit is not None:
        result["max_len"] = limit
    if cosines:
        c = torch.cat(cosines)
        result.update({"mean_cosine_to_reference": float(c.mean()),
                       "min_cosine_to_reference": float(c.min())})
    return result


def time_side_by_side(models: dict[str, torch.nn.Module], ids: torch.Tensor, repeats: int = 20,
                      warmup: int = 1, progress: str | None = None, last_logits: bool = False) -> dict:
    """Median seconds per call of each model on `ids`, timed in turn in one process (so that
    machine noise hits them alike), after `warmup` calls each; `progress`: a bar of that title
    where the timing lasts more than a few seconds (a 135M model's fit on two cores: minutes);
    `last_logits`: each sequence's last position's outputs only, as a causal LM is served (the
    runners' `positions`)."""
    from tqdm import tqdm

    if last_logits:
        last = torch.tensor([ids.shape[1] - 1])
        models = {name: functools.partial(m, positions=last) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad(), tqdm(total=(warmup + repeats) * len(models), desc=progress, unit="call",
                               disable=progress is None, delay=2.0) as bar:
        for m in models.values():
            for _ in range(warmup):
                m(ids)
                bar.update()
        for _ in range(repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                synchronize(m(ids).device)  # a GPU model returns before its kernels finish
                times[name].append(time.perf_counter() - t0)
                bar.update()
    return {name: statistics.median(t) for name, t in times.items()}


