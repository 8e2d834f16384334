"""Validation of an untrusted ONNX file, in a child process.

The onnx checker and onnxruntime are native code, and a corrupt or hostile file can crash them
(fuzzing found a segfault inside onnx.checker.check_model). In a child process such a crash
becomes one clear error instead of killing tailor. The child runs the checker (with strict shape
inference unless the model keeps tensors in external data, which inference cannot read) and then
the model itself once in onnxruntime (its outputs must be finite), so that a graph which passes
the checker but cannot run fails now rather than after minutes of profiling. This module imports
neither torch nor transformers: the child starts in well under a second.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tailor.core.errors import TailorError, first_line

ORT_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
              "tensor(bool)": np.bool_, "tensor(float16)": np.float16}


def input_specs(session) -> list[tuple[str, Any, Any]]:
    """(name, shape, numpy dtype) of an onnxruntime session's inputs."""
    return [(i.name, i.shape, ORT_DTYPES.get(i.type, np.int64)) for i in session.get_inputs()]


def is_past_input(name: str) -> bool:
    """A decoder's KV cache input, as Optimum names them (past_key_values.N.key / .value)."""
    return name.startswith("past_key_values.")


def empty_past(shape, batch: int, dtype, head_size: int | None = None) -> np.ndarray:
    """A KV cache input holding no position: the declared head counts and sizes (numbers), the
    batch first, and 0 for the past length (the one other named dimension). Every position is
    then computed from the token inputs, as when the decoder starts a sequence. `head_size`
    stands for a head size declared as a name (onnxruntime-genai's builder writes kv_cache_dim)."""
    shape = list(shape or [])
    if head_size is not None and len(shape) == 4 and not isinstance(shape[3], int):
        shape[3] = head_size
    dims = [batch if axis == 0 else d if isinstance(d, int) else 0 for axis, d in enumerate(shape)]
    if dims.count(0) != 1:
        raise TailorError(f"a KV cache input of shape {list(shape or [])}: expected one named past "
                          f"length beside fixed head counts and sizes")
    return np.zeros(dims, dtype)


def onnx_feeds(model_inputs: list[tuple[str, Any, Any]], input_ids: np.ndarray,
               head_size: int | None = None, past: dict[str, np.ndarray] | None = None,
               past_len: int = 0) -> dict[str, np.ndarray]:
    """Inputs for an exported transformer from token ids; names as HF exporters write them. A
    decoder's KV cache inputs are fed empty (past length 0; `head_size`: empty_past), or `past`,
    the cache of `past_len` positions the ids follow (their mask and positions then count those)."""
    b, t = input_ids.shape
    feeds = {}
    for name, shape, dtype in model_inputs:
        if is_past_input(name):
            feeds[name] = past[name] if past is not None else empty_past(shape, b, dtype, head_size)
            continue
        if "input_ids" in name:
            arr = input_ids
        elif "attention_mask" in name:
            arr = np.ones((b, past_len + t))
        elif "token_type" in name:
            arr = np.zeros((b, t))
        elif "position_ids" in name:
            arr = np.broadcast_to(np.arange(past_len, past_len + t), (b, t))
        else:
            raise TailorError(f"the ONNX model has an input '{name}' tailor does not know how to "
                              f"fill (expected input_ids, attention_mask, token_type_ids, position_ids, "
                              f"past_key_values.N.key/value)")
        feeds[name] = np.ascontiguousarray(arr).astype(dtype)
    return feeds


# the inputs onnx_feeds fills from token ids, each [B, T] (substrings of the names HF exporters write)
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type", "position_ids")


@dataclass(frozen=True)
class InputShape:
    """The batch and length a graph's token inputs fix (None: any), as exported without dynamic
    axes; and whether positions appended at the end leave the real ones' outputs unchanged
    (`paddable`: a causal model, where no position attends to a later one, or one with an
    attention_mask input, which masks the padding out)."""
    batch: int | None = None
    length: int | None = None
    paddable: bool = False

    @classmethod
    def of(cls, specs: list[tuple[str, Any, Any]], causal: bool = False) -> "InputShape":
        """From (name, shape, dtype) of a graph's inputs: a dimension is fixed where it is a
        number in any token input's shape (a name or None is free)."""
        token = [shape for name, shape, _ in specs if any(t in name for t in TOKEN_INPUTS) and shape]
        def fixed(axis: int) -> int | None:
            return next((d for s in token if len(s) > axis and isinstance(d := s[axis], int)), None)
        masked = any("attention_mask" in name for name, _, _ in specs)
        return cls(fixed(0), fixed(1), causal or masked)

    def takes(self, length: int) -> bool:
        """Whether inputs of `length` tokens can run: any length, the fixed one, or a shorter one
        padded where that is exact."""
        return self.length is None or length == self.length or (length < self.length and self.paddable)

    def example(self, batch: int = 1, length: int = 8) -> tuple[int, int]:
        """(batch, length) of a sample input: the fixed dims where there are, else the given ones."""
        return self.batch or batch, self.length or length

    def padded_feeds(self, specs: list[tuple[str, Any, Any]], input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Feeds for input_ids [b, t] with b ≤ the fixed batch, and t the fixed length or, where
        the graph is paddable, less: rows added are copies of the first one, positions added go
        at the end (masked out where there is a mask). The real ones' outputs are [:b, :t]."""
        b, t = input_ids.shape
        b0, t0 = self.batch or b, self.length or t
        if b > b0 or not self.takes(t):
            raise TailorError(f"the model takes inputs of {self.describe()}; got {b} × {t}")
        ids = np.zeros((b0, t0), dtype=input_ids.dtype)
        ids[:b, :t] = input_ids
        ids[b:, :t] = input_ids[:1]
        feeds = onnx_feeds(specs, ids)
        for name in feeds:
            if "attention_mask" in name:
                feeds[name][:, t:] = 0
        return feeds

    def describe(self) -> str:
        """"1 × 128 tokens" with "any" for a free dimension, and how shorter inputs run."""
        dims = f"{self.batch or 'any'} × {self.length or 'any'} tokens"
        if self.length is None:
            return dims
        return dims + (" (fewer padded)" if self.paddable else " exactly")


RUN_FAILED = 3  # the child's exit code when the checker passed but onnxruntime could not run it


def check_onnx_file(path: Path, *, full_check: bool, timeout: float = 900) -> str | None:
    """Raise TailorError unless the file passes the checker (in a child); return why onnxruntime
    cannot run it, or None when it runs. (The caller decides when to report a failed run: a
    valid graph that is not a transformer is better told as such.)"""
    root = str(Path(__file__).resolve().parents[2])  # where this tailor is imported from
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run([sys.executable, "-m", "tailor.rewriter.onnx_check", str(path),
                               "full" if full_check else "structure"], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TailorError(f"{path}: validating the model took over {timeout:.0f} s; not a model "
                          f"tailor can work with") from None
    if proc.returncode < 0:
        raise TailorError(f"{path}: validating the model crashed onnx/onnxruntime (signal "
                          f"{-proc.returncode}); the file is malformed")
    said = proc.stderr.strip().splitlines()
    problem = f"{path}: {first_line(said[-1]) if said else 'validation failed'}"
    if proc.returncode == RUN_FAILED:
        return problem
    if proc.returncode:
        raise TailorError(problem)
    return None


def checker_problem(path: str, full_check: bool) -> str | None:
    """The onnx checker's objection to a file, or None. An op it knows no schema for is none:
    onnxruntime's contrib ops, which its genai model builder writes even in the default domain
    (SimplifiedLayerNormalization), make a valid model wherever onnxruntime runs it, which the
    caller checks next."""
    import onnx

    try:
        onnx.checker.check_model(path, full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, UnicodeDecodeError) as e:
        return None if "No Op registered for" in str(e) else first_line(e)
    return None


def genai_head_size(path: Path) -> int | None:
    """The head size onnxruntime-genai's genai_config.json beside the model gives (its builder
    declares the caches' head size as a name), or None."""
    import json

    try:
        config = json.loads((path.parent / "genai_config.json").read_text())
        return int(config["model"]["decoder"]["head_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check(path: str, full_check: bool) -> tuple[int, str] | None:
    """In the child: (exit code, what is wrong with the file), or None."""
    import onnxruntime as ort

    problem = checker_problem(path, full_check)
    if problem:
        return 2, f"invalid ONNX model ({problem})"
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        specs = input_specs(session)
        sample = np.zeros(InputShape.of(specs).example(), np.int64)  # the graph's fixed dims, if any
        outputs = session.run(None, onnx_feeds(specs, sample, genai_head_size(Path(path))))
        bad = [o.name for o, v in zip(session.get_outputs(), outputs)
               if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]
        if bad:
            return RUN_FAILED, f"the model's output '{bad[0]}' is NaN or infinite on a plain input"
    except TailorError as e:
        return RUN_FAILED, str(e)
    except Exception as e:  # onnxruntime raises its own exception types
        return RUN_FAILED, f"onnxruntime cannot run the model ({first_line(e)})"
    return None


if __name__ == "__main__":
    problem = _check(sys.argv[1], sys.argv[2] == "full")
    if problem:
        print(problem[1].replace("\n", " "), file=sys.stderr)
        sys.exit(problem[0])
