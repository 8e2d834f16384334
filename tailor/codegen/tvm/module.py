"""Run an artifact's TVM build (tailor.codegen.tvm.build) through relax.VirtualMachine, behind
the same call as the other runtimes: model(input_ids [B, T]) -> tensor.

The library was compiled for one shape [B0, T0]. Smaller inputs are padded up where padding
cannot change the real positions' outputs: extra rows are copies of the first row; extra
positions are appended at the end, which is exact for causal models (no position attends to a
later one) and for models with an attention_mask input (the padding is masked out). Anything
else gets a clear error naming the built shape.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tailor.backends.runners import NumpyModel
from tailor.core.errors import TailorError
from tailor.rewriter.onnx_check import InputShape

# the files of a build, beside the artifact's model.onnx
SO, WEIGHTS, MANIFEST = "model.so", "model.tvm.safetensors", "tvm.json"


class TvmModel(NumpyModel):
    runtime = "TVM"

    def __init__(self, folder: Path):
        super().__init__()
        import tvm
        from safetensors.numpy import load_file
        from tvm import relax

        folder = Path(folder)
        try:
            info = json.loads((folder / MANIFEST).read_text())
            batch, length = (int(n) for n in info["shape"])
            self.specs = [(name, None, np.dtype(dtype)) for name, dtype in info["inputs"]]
            causal, names = bool(info["causal"]), list(info["params"])
            self.vocab_size = int(info["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TailorError(f"{folder}/{MANIFEST}: unreadable TVM manifest ({e})") from None
        if info.get("tvm") != tvm.__version__:
            raise TailorError(f"{folder}/{SO} was built with TVM {info.get('tvm')}; this is TVM "
                              f"{tvm.__version__} (rebuild the artifact)")
        weights = load_file(str(folder / WEIGHTS))
        if set(weights) != set(names):
            raise TailorError(f"{folder}/{WEIGHTS} does not hold the weights {MANIFEST} lists")
        self.params = [tvm.runtime.tensor(weights[n]) for n in names]
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / SO)), tvm.cpu())
        self.input_shape = InputShape(batch, length, InputShape.of(self.specs, causal).paddable)
        self._tensor = tvm.runtime.tensor

    def run_numpy(self, input_ids: np.ndarray) -> np.ndarray:
        b, t = input_ids.shape
        if b > self.input_shape.batch or not self.input_shape.takes(t):
            raise TailorError(f"this TVM build runs inputs of {self.input_shape.describe()}; got {b} × {t}")
        if input_ids.size and not (0 <= input_ids.min() and input_ids.max() < self.vocab_size):
            # TVM's gather does not check indices: out of range would read outside the table
            raise TailorError(f"token ids must lie in [0, {self.vocab_size})")
        feeds = self.input_shape.padded_feeds(self.specs, input_ids)
        out = self.vm["main"](*[self._tensor(feeds[n]) for n, _, _ in self.specs], *self.params)
        out = out if hasattr(out, "numpy") else out[0]
        return out.numpy()[:b, :t]
