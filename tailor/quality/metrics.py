"""Quality of a rewritten model against its original: perplexity, KL, top-1 agreement for LMs;
cosine of hidden states for encoders. And side-by-side latency."""
from __future__ import annotations

import codecs
import statistics
import time
from collections.abc import Iterable, Iterator
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


def read_text_pieces(path: Path, piece_bytes: int = 1 << 20) -> Iterator[str]:
    """A UTF-8 text file in pieces of about piece_bytes, so that a long file is tokenized piece by
    piece instead of being held whole, with its tokenizer encodings, in memory. Pieces end at line
    ends; a tokenizer may merge across a line end (runs of newlines), so the stream can differ
    from tokenizing the whole text by a token or so at each piece boundary (one per MB)."""
    try:
        f = open(path, "rb")
    except (FileNotFoundError, IsADirectoryError):
        raise TailorError(f"{path}: no such text file") from None
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with f:
        while True:
            block = f.read(piece_bytes)
            block += f.readline(piece_bytes) if block else b""
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise TailorError(f"{path}: not UTF-8 text (byte {offset + e.start})") from None
            if text:
                yield text
            if not block:
                return
            offset += len(block)


def tokenize_pieces(pieces: Iterable[str], tokenizer, *, limit: int | None = None) -> np.ndarray:
    """One stream of token ids from a text given in pieces; the tokenizer's special tokens (a BOS)
    start the stream once. Stops once `limit` tokens are read."""
    out, count = [], 0
    for k, piece in enumerate(pieces):
        ids = tokenizer(piece, add_special_tokens=k == 0)["input_ids"]
        out.append(np.asarray(ids, dtype=np.int64))
        count += len(ids)
        if limit is not None and count >= limit:
            break
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def tokenize_lines(pieces: Iterable[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Each non-empty line an input of its own (encoders, whose inputs are single sentences or
    passages), with the special tokens the tokenizer adds ([CLS] … [SEP]): the stream of all
    inputs' ids and the offset where each input starts."""
    out = []
    for piece in pieces:
        lines = [line for line in piece.splitlines() if line.strip()]
        out += tokenizer(lines)["input_ids"] if lines else []
    lengths = np.array([len(row) for row in out], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if out else np.zeros(0, np.int64)
    stream = np.asarray([t for row in out for t in row], dtype=np.int64)
    return stream, starts


def token_windows(token_ids: list[int] | np.ndarray, seq_len: int, windows: int) -> torch.Tensor:
    """The first `windows` non-overlapping windows of seq_len tokens: the same for every model."""
    n = min(windows, len(token_ids) // seq_len)
    if n < 1:
        raise TailorError(f"the text has {len(token_ids)} tokens: too short for one window of {seq_len}")
    return torch.as_tensor(token_ids[: n * seq_len]).view(n, seq_len)


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


def has_tokenizer(folder: Path) -> bool:
    return (Path(folder) / "tokenizer.json").is_file() or (Path(folder) / "tokenizer_config.json").is_file()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not has_tokenizer(folder):
        raise TailorError(f"{folder}: no tokenizer files; pass --tokenizer DIR")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


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


def evaluate(artifact: Path, text: Path, *, reference: str | None = None, tokenizer: str | None = None,
             seq_len: int = 1024, windows: int = 8) -> dict:
    import tailor

    compiled = tailor.load(artifact)
    task = compiled.report.get("model", {}).get("task", "")
    return evaluate_pair(open_model(reference) if reference else None, compiled.model, text,
                         Path(tokenizer) if tokenizer else Path(artifact), task,
                         seq_len=seq_len, windows=windows)


def probe_retrieval(artifact: Path, lengths: list[int], *, samples: int = 32, reference: str | None = None,
                    tokenizer: str | None = None) -> dict:
    """Retrieval exact match per context length, of the artifact and (if given) its reference."""
    import tailor
    from tailor.quality.retrieval import retrieval_accuracy

    compiled = tailor.load(artifact)
    if compiled.report.get("model", {}).get("task") != "causal-lm":
        raise TailorError("the retrieval probe needs a causal language model")
    tok = load_tokenizer(Path(tokenizer) if tokenizer else Path(artifact))
    out = {f"retrieval@{n}": v for n, v in retrieval_accuracy(compiled.model, tok, lengths, samples).items()}
    if reference:
        ref = retrieval_accuracy(open_model(reference), tok, lengths, samples)
        out.update({f"reference_retrieval@{n}": v for n, v in ref.items()})
    return out


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


def bench(artifact: Path, reference: str, *, seq_len: int = 128, batch: int = 1, repeats: int = 20,
          runtime: str | None = None) -> dict:
    """Median latency of the artifact (through `runtime`, see tailor.load) and its reference,
    timed alternately in one process."""
    import tailor

    loaded = tailor.load(artifact, runtime=runtime)
    vocab = int(loaded.report["model"]["vocab_size"])
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    t = time_side_by_side({"reference": open_model(reference), "artifact": loaded.model}, ids, repeats)
    r, a = t["reference"], t["artifact"]
    return {"reference_ms": r * 1e3, "artifact_ms": a * 1e3, "ratio": a / r,
            "seq_len": seq_len, "batch": batch, "repeats": repeats, "runtime": runtime or "default"}
