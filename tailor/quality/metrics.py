"""Quality of a rewritten model against its original: perplexity, KL, top-1 agreement for LMs;
cosine of hidden states for encoders. And side-by-side latency."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

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


def encoder_metrics(hidden: torch.Tensor, ref_hidden: torch.Tensor | None) -> dict:
    if ref_hidden is None:
        return {}
    emb, ref = hidden.double().mean(1), ref_hidden.double().mean(1)
    return {"mean_cosine_to_reference": float(torch.cosine_similarity(emb, ref, -1).mean())}


def evaluate_pair(reference, candidate, text: Path, tokenizer_dir: Path | None, task: str, *,
                  seq_len: int = 1024, windows: int = 12) -> dict:
    """Quality of `candidate` (model(input_ids) -> tensor) on a text, against `reference` if given:
    the same windows for both."""
    if tokenizer_dir is None:
        raise TailorError("evaluating on a text needs a tokenizer: pass --tokenizer DIR")
    stream = tokenize_pieces(read_text_pieces(text), load_tokenizer(tokenizer_dir), limit=seq_len * windows)
    ids = token_windows(stream, seq_len, windows)
    with torch.no_grad():
        out = torch.cat([candidate(row[None]) for row in ids])
        ref = torch.cat([reference(row[None]) for row in ids]) if reference is not None else None
    result = {"text": str(text), "windows": int(ids.shape[0]), "seq_len": seq_len}
    result.update(lm_metrics(out, ids, ref) if task == "causal-lm" else encoder_metrics(out, ref))
    return result


def time_side_by_side(models: dict[str, torch.nn.Module], ids: torch.Tensor, repeats: int = 20,
                      warmup: int = 1) -> dict:
    """Median seconds per call of each model on `ids`, timed in turn in one process (so that
    machine noise hits them alike), after `warmup` calls each."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for m in models.values():
            for _ in range(warmup):
                m(ids)
        for _ in range(repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(ids)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


