"""`tailor eval` and `tailor bench`: an artifact's quality and latency against its reference."""
from __future__ import annotations

from pathlib import Path

import torch

from tailor.backends.runners import open_model
from tailor.core.errors import TailorError
from tailor.data.text import load_tokenizer
from tailor.pipeline import load
from tailor.quality.metrics import evaluate_pair, time_side_by_side


def evaluate(artifact: Path, text: Path, *, reference: str | None = None, tokenizer: str | None = None,
             seq_len: int = 1024, windows: int = 8, lines: int = 256) -> dict:
    """Quality of an artifact on a text (tailor.quality.metrics.evaluate_pair), never past the
    positions its model takes: report.json's model.max_positions where the report has it, else
    the learned positions of a transformers model's config."""
    compiled = load(artifact)
    info = compiled.report.get("model", {})
    max_len = info.get("max_positions")
    config = getattr(compiled.model, "config", None)
    if max_len is None and info.get("positional") == "learned" and config is not None:
        max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return evaluate_pair(open_model(reference) if reference else None, compiled.model, text,
                         Path(tokenizer) if tokenizer else Path(artifact), info.get("task", ""),
                         seq_len=seq_len, windows=windows, max_len=max_len, lines=lines)


def probe_retrieval(artifact: Path, lengths: list[int], *, samples: int = 32, reference: str | None = None,
                    tokenizer: str | None = None) -> dict:
    """Retrieval exact match per context length, of the artifact and (if given) its reference."""
    from tailor.data.retrieval import retrieval_accuracy

    compiled = load(artifact)
    if compiled.report.get("model", {}).get("task") != "causal-lm":
        raise TailorError("the retrieval probe needs a causal language model")
    tok = load_tokenizer(Path(tokenizer) if tokenizer else Path(artifact))
    out = {f"retrieval@{n}": v for n, v in retrieval_accuracy(compiled.model, tok, lengths, samples).items()}
    if reference:
        ref = retrieval_accuracy(open_model(reference), tok, lengths, samples)
        out.update({f"reference_retrieval@{n}": v for n, v in ref.items()})
    return out


def bench(artifact: Path, reference: str, *, seq_len: int = 128, batch: int = 1, repeats: int = 20,
          runtime: str | None = None) -> dict:
    """Median latency of the artifact (through `runtime`, see tailor.load) and its reference,
    timed alternately in one process; the logits of the last position only where the compile
    priced them so (a torch causal LM, as it is served: Workload.last_logits)."""
    loaded = load(artifact, runtime=runtime)
    vocab = int(loaded.report["model"]["vocab_size"])
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    logits = loaded.report["model"].get("workload", {}).get("logits", "every position")
    t = time_side_by_side({"reference": open_model(reference), "artifact": loaded.model}, ids, repeats,
                          last_logits=logits == "last position")
    r, a = t["reference"], t["artifact"]
    return {"reference_ms": r * 1e3, "artifact_ms": a * 1e3, "ratio": a / r,
            "seq_len": seq_len, "batch": batch, "repeats": repeats, "runtime": runtime or "default",
            "logits": logits}
