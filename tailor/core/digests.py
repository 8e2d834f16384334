"""Digests of files: artifact manifests, model hashes of ONNX inputs, profile-cache checksums."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over the files' bytes in order, read in chunks (weights can be large)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_files([path])
