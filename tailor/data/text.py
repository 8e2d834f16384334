"""Text files and tokenizers: reading long files in pieces, tokenizing them as one stream or line
by line, and the model's own tokenizer (never another model's)."""
from __future__ import annotations

import codecs
import functools
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from tailor.core.errors import TailorError, first_line


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


def has_tokenizer(path: Path) -> bool:
    """A folder with tokenizer files, or a GGUF file (its metadata holds the tokenizer)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return path.is_file()
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def load_tokenizer(path: Path):
    """The tokenizer in a folder, or the one (with its chat template) a GGUF file carries (built
    once a file and version of it: see _gguf_tokenizer)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not has_tokenizer(path):
        raise TailorError(f"{path}: no tokenizer files; pass --tokenizer DIR")
    if path.suffix != ".gguf":
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    stat = path.stat()
    return _gguf_tokenizer(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: Path, size: int, mtime_ns: int):
    """A GGUF's tokenizer, kept for the file as it is (its size and time of change in the key):
    transformers parses the whole file's metadata for it, 11 of a SmolLM2-135M compile's 99 s on
    an H100 host, and a compile wants it for calibration, retrieval probes and the artifact
    (tailor.rewriter.capture builds it while its own parse of the file is at hand)."""
    from transformers import AutoTokenizer

    try:  # the absolute path: transformers looks a relative gguf_file up in the working directory first
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path),
                                             local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for files it cannot read
        raise TailorError(f"{path}: no tokenizer could be built from the GGUF ({first_line(e)}); "
                          f"pass --tokenizer DIR") from None
