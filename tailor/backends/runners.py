"""Runnable models with one calling convention: model(input_ids [B, T]) -> tensor.

Causal LMs return logits [B, T, V]; encoders and bare decoders return hidden states [B, T, H].
"""
from __future__ import annotations

import abc
import functools
import inspect
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from tailor.core.devices import module_device
from tailor.core.dispatch import is_dispatched
from tailor.core.errors import TailorError
from tailor.rewriter.capture import is_onnx_export, load_gguf, load_hf_directory, load_onnx
from tailor.rewriter.onnx_check import InputShape, genai_head_size, input_specs, is_past_input, onnx_feeds


class HFModel(torch.nn.Module):
    """A transformers model, returning its main output tensor."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.eval()  # the wrapper too: a later .train(mode) restore must not turn dropout on

    @property
    def config(self):
        return self.inner.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None):
        """Inputs from anywhere (calibration ids live on the host) run where the model is; the
        output stays there. `positions`: the sequence positions whose outputs are wanted (all
        where None); the head computes only theirs where the model takes logits_to_keep."""
        device = module_device(self.inner)
        kwargs = {}
        if positions is not None and takes_logits_to_keep(type(self.inner)):
            kwargs["logits_to_keep"] = kept_positions(self.inner, positions)
        mask = None if attention_mask is None else attention_mask.to(device)
        out = self.inner(input_ids=input_ids.to(device), use_cache=False, attention_mask=mask, **kwargs)
        t = out.logits if getattr(out, "logits", None) is not None else out[0]
        return t[:, positions.to(t.device)] if positions is not None and not kwargs else t


def kept_positions(model: torch.nn.Module, positions: torch.Tensor) -> torch.Tensor | list[int]:
    """`positions` as the model's logits_to_keep: a tensor where its inputs go; for a model
    dispatched by accelerate, a list of ints. Its first hook moves every tensor argument to the
    first device, while the head indexes the last layer's output where that ran, and a tensor on
    one GPU cannot index one on another (a list indexes anywhere)."""
    return positions.tolist() if is_dispatched(model) else positions.to(module_device(model))


@functools.cache
def takes_logits_to_keep(model_class) -> bool:
    """Whether a transformers model computes its head on chosen positions only (asked once per
    class: the profile's inner loop asks)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def cpu_session(source: str | bytes, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session (a path or serialized model) on `threads` intra-op threads."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # stale shape hints of rewritten graphs are not the user's concern
    # tailor keeps several sessions (original, rewrites) side by side: idle threads spinning in
    # one would steal the cores of the next one timed or measured
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


class NumpyModel(torch.nn.Module, abc.ABC):
    """A model a native runtime runs on numpy arrays (`run_numpy`), behind the nn.Module call."""

    runtime = "this runtime"

    @abc.abstractmethod
    def run_numpy(self, input_ids: np.ndarray) -> np.ndarray:
        """Output of the runtime for input_ids [B, T]."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(f"padding masks are not supported through {self.runtime} yet; "
                             "pass unpadded batches")
        out = torch.from_numpy(self.run_numpy(input_ids.cpu().numpy()))
        return out if positions is None else out[:, positions]


class OrtModel(NumpyModel):
    """An ONNX model run by onnxruntime, behind the same nn.Module call: from a file, or from an
    onnx_ir model in memory (a rewrite being measured). A graph exported with a fixed batch runs
    larger batches that many rows at a time; one of a fixed length runs shorter inputs padded
    where that is exact (`causal`, or an attention_mask input: InputShape)."""

    runtime = "onnxruntime"

    def __init__(self, model: Path | ir.Model, threads: int | None = None, *, causal: bool = False):
        super().__init__()
        if isinstance(model, ir.Model):
            self.path = None
            source = ir.serde.serialize_model(model).SerializeToString()
        else:
            self.path = Path(model)
            source = str(model)
        try:
            self.session = cpu_session(source, threads)
        except Exception as e:  # onnxruntime raises its own exception types
            raise TailorError(f"onnxruntime cannot run {self.path or 'the rewritten model'}: "
                              f"{str(e).splitlines()[0]}") from None
        self.input_specs = input_specs(self.session)
        head_size = genai_head_size(self.path) if self.path is not None else None
        if head_size is not None:  # onnxruntime-genai's builder names the caches' head size
            self.input_specs = [(n, [*s[:3], head_size] if is_past_input(n) and len(s) == 4 else s, t)
                                for n, s, t in self.input_specs]
        self.input_shape = InputShape.of(self.input_specs, causal)

    def run_all(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Every graph output by name. Profiling adds intermediate values as outputs, which are
        position-wise ([B, T, ...] or flattened [B·T, ...]): inputs shorter than a fixed length run
        padded where that is exact, and the values come back at the inputs' length, the padded
        positions cut off (they would bias every statistic taken over positions)."""
        length, fixed = input_ids.shape[1], self.input_shape.length
        if not self.input_shape.takes(length):
            raise TailorError(f"{self.path or 'the model'} takes inputs of {self.input_shape.describe()}; "
                              f"got {length} tokens")
        names = [o.name for o in self.session.get_outputs()]
        out = self._run(names, input_ids)
        if fixed in (None, length):
            return dict(zip(names, out))
        return {n: _unpadded(o, len(input_ids), fixed, length, n) for n, o in zip(names, out)}

    def run_numpy(self, input_ids: np.ndarray) -> np.ndarray:
        out, length = self._run(None, input_ids)[0], input_ids.shape[1]
        return out if self.input_shape.length in (None, length) else out[:, :length]  # padded

    @functools.cached_property
    def has_cache(self) -> bool:
        """Whether the graph takes its KV cache as inputs (past_key_values.N.*) and returns each
        as the present output of the same name, and its length is free (a step of one token)."""
        outputs = {o.name for o in self.session.get_outputs()}
        past = [name for name, _, _ in self.input_specs if is_past_input(name)]
        return bool(past) and self.input_shape.length is None and self.input_shape.batch in (None, 1) and \
            all(name.replace("past_key_values", "present") in outputs for name in past)

    def run_cached(self, input_ids: np.ndarray, past: dict[str, np.ndarray] | None = None,
                   past_len: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The logits of `input_ids` [B, t] following the `past_len` positions cached in `past`
        (None: none), and the cache that then holds all of them: the present outputs, fed back as
        the next call's past, as the runtimes that load a decoder with a cache run it."""
        if not self.has_cache:
            raise TailorError(f"{self.path or 'the model'} takes no KV cache of its own that a step of "
                              f"one token can run with")
        feeds = onnx_feeds(self.input_specs, input_ids, past=past, past_len=past_len)
        outputs = [o.name for o in self.session.get_outputs()]
        try:
            out = dict(zip(outputs, self.session.run(None, feeds)))
        except Exception as e:  # onnxruntime raises its own exception types
            where = self.path or "the rewritten model"
            raise TailorError(f"onnxruntime failed on {where} at a cached step of {input_ids.shape[1]} "
                              f"tokens after {past_len}: {str(e).splitlines()[0]}") from None
        return out.get("logits", out[outputs[0]]), {name: out[name.replace("past_key_values", "present")]
                                                    for name in feeds if is_past_input(name)}

    def _run(self, names: list[str] | None, input_ids: np.ndarray) -> list[np.ndarray]:
        """The outputs on all rows, a fixed batch's rows at a time (the last chunk padded);
        concatenated on the first axis, where every output keeps its rows, whole ([B, ...]) or
        flattened with the positions ([B·T, ...])."""
        rows = self.input_shape.batch or max(1, len(input_ids))
        parts = [self._run_rows(names, input_ids[i:i + rows], rows)
                 for i in range(0, max(1, len(input_ids)), rows)]
        return parts[0] if len(parts) == 1 else [np.concatenate(p) for p in zip(*parts)]

    def _run_rows(self, names: list[str] | None, input_ids: np.ndarray, rows: int) -> list[np.ndarray]:
        feeds = self.input_shape.padded_feeds(self.input_specs, input_ids)
        try:
            out = self.session.run(names, feeds)
        except Exception as e:  # onnxruntime raises its own exception types
            raise TailorError(f"onnxruntime failed on {self.path or 'the rewritten model'} with an input of "
                              f"shape {list(input_ids.shape)}: {str(e).splitlines()[0]}") from None
        return out if len(input_ids) == rows else [o[:len(o) * len(input_ids) // rows] for o in out]


def _unpadded(value: np.ndarray, rows: int, fixed: int, length: int, name: str) -> np.ndarray:
    """A position-wise value of `rows` inputs padded from `length` to `fixed` positions, at `length`."""
    rest = value.shape[1:]
    if value.shape[0] == rows * fixed:
        return value.reshape(rows, fixed, *rest)[:, :length].reshape(rows * length, *rest)
    if value.ndim >= 2 and value.shape[:2] == (rows, fixed):
        return value[:, :length]
    raise TailorError(f"the value {name} {list(value.shape)} is not laid out by position; it cannot be read "
                      f"on inputs shorter than the graph's fixed {fixed} tokens")


def as_runnable(model) -> torch.nn.Module:
    """model(input_ids) -> tensor for what the passes work on: a transformers model, an onnx_ir
    model, or something already runnable."""
    if isinstance(model, ir.Model):
        return OrtModel(model)
    if isinstance(model, (HFModel, OrtModel)):
        return model
    return HFModel(model)


def open_model(path: str | Path) -> torch.nn.Module:
    """A runnable model from an HF directory, a .gguf or an .onnx file, without capturing it."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and not is_onnx_export(path):
        return HFModel(load_hf_directory(path))
    if path.is_file() and path.suffix == ".gguf":
        return HFModel(load_gguf(path))
    if path.is_dir() and (path / "model.onnx").is_file():
        path = path / "model.onnx"
    if path.is_file():
        load_onnx(path)  # the same checks as capture: readable, external data inside the folder
        return OrtModel(path)
    raise TailorError(f"{path}: no such model (an HF directory, a .gguf or an .onnx file)")
