"""Quality of a rewritten model against its original: perplexity, KL, top-1 agreement for LMs;
cosine of hidden states for encoders. And side-by-side latency."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from tailor.errors import TailorError
from tailor.runtime.session import open_model


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TailorError(f"{path}: no such text file") from None
    except UnicodeDecodeError as e:
        raise TailorError(f"{path}: not UTF-8 text (byte {e.start})") from None


def token_windows(token_ids: list[int], seq_len: int, windows: int) -> torch.Tensor:
    """The first `windows` non-overlapping windows of seq_len tokens: the same for every model."""
    n = min(windows, len(token_ids) // seq_len)
    if n < 1:
        raise TailorError(f"the text has {len(token_ids)} tokens: too short for one window of {seq_len}")
    return torch.tensor(token_ids[: n * seq_len]).view(n, seq_len)


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


def evaluate(artifact: Path, text: Path, *, reference: str | None = None, tokenizer: str | None = None,
             seq_len: int = 1024, windows: int = 8) -> dict:
    from transformers import AutoTokenizer

    import tailor

    compiled = tailor.load(artifact)
    tok_dir = Path(tokenizer) if tokenizer else artifact
    if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer_config.json").is_file():
        raise TailorError(f"{tok_dir}: no tokenizer files; pass --tokenizer DIR")
    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True, trust_remote_code=False)
    ids = token_windows(tok(read_text(text))["input_ids"], seq_len, windows)
    ref_model = open_model(reference) if reference else None
    outs, refs = [], []
    with torch.no_grad():
        for row in ids:
            outs.append(compiled.model(row[None]))
            if ref_model is not None:
                refs.append(ref_model(row[None]))
    out = torch.cat(outs)
    ref = torch.cat(refs) if refs else None
    task = compiled.report.get("model", {}).get("task", "")
    result = {"windows": int(ids.shape[0]), "seq_len": seq_len}
    if task == "causal-lm":
        result.update(lm_metrics(out, ids, ref))
    else:
        result.update(encoder_metrics(out, ref))
    return result


def bench(artifact: Path, reference: str, *, seq_len: int = 128, batch: int = 1, repeats: int = 20) -> dict:
    """Median latency of the artifact and its reference, timed alternately in one process."""
    import tailor

    loaded = tailor.load(artifact)
    art, ref = loaded.model, open_model(reference)
    vocab = int(loaded.report["model"]["vocab_size"])
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times = {"artifact": [], "reference": []}
    with torch.no_grad():
        for m in (art, ref):
            m(ids)  # warm-up
        for _ in range(repeats):
            for name, m in (("reference", ref), ("artifact", art)):
                t0 = time.perf_counter()
                m(ids)
                times[name].append(time.perf_counter() - t0)
    r, a = statistics.median(times["reference"]), statistics.median(times["artifact"])
    return {"reference_ms": r * 1e3, "artifact_ms": a * 1e3, "ratio": a / r,
            "seq_len": seq_len, "batch": batch, "repeats": repeats,
            "spread_artifact": float(np.std(times["artifact"]) / a)}
