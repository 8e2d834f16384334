"""Int8Linear: an nn.Linear whose product runs on INT8 weights with its input quantized at run
time, by PyTorch's own dynamic quantization (the `quantized::linear_dynamic` kernel that
torch.ao's dynamic Linear runs: fbgemm / oneDNN on x86). Installed by the int8 pass on CPU models.

Its Parameters stay the float weight and bias, so the edits, refits and state dicts that follow
see an nn.Linear (a refit's new weights replace the module and keep the class:
torch_surgery._put_linear), and an artifact stores float weights that `tailor.load` quantizes the
same way again. The packed INT8 weight is made at the first forward after the weights change.

Weights per output channel, symmetric, full signed 8-bit range; activations per call over the
whole range, as the ONNX side's onnxruntime quantize_dynamic (tailor.rewriter.onnx_quantize, whose
docstring has the measurements behind full range on VNNI CPUs).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.quantization.observer import PerChannelMinMaxObserver

# False: 8-bit activations (reduce_range's 7 bits are for CPUs without VNNI, whose u8 x s8 products saturate)
REDUCE_RANGE = False
METHOD = ("PyTorch dynamic quantization (quantized::linear_dynamic): signed 8-bit weights per output "
          "channel (full range), activations quantized at run time")


def packed_weight(weight: torch.Tensor, bias: torch.Tensor | None):
    """The INT8 weight (per output channel) and float bias as the kernel takes them."""
    w = weight.detach().float().contiguous()
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    observer(w)
    scales, zeros = observer.calculate_qparams()
    with warnings.catch_warnings():
        # quantized tensors are deprecated in favour of torchao (pytorch#184982); they are still what
        # the kernel packs from, and the user can do nothing about the warning
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        q = torch.quantize_per_channel(w, scales.double(), zeros.long(), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())


class Int8Linear(nn.Linear):
    """On the CPU, y = x W^T + b with W in INT8 and x quantized per call; elsewhere (a model
    loaded onto a GPU) the float product of the same weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.out_features == 0 or self.in_features == 0:
            return super().forward(x)
        # the weights' identity and version: an in-place change (load_state_dict) packs again
        key = tuple((t.data_ptr(), t._version) for t in (self.weight, self.bias) if t is not None)
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            cached = (key, packed_weight(self.weight, self.bias))
            self.__dict__["_packed"] = cached
        flat = x.reshape(-1, self.in_features).float().contiguous()
        y = torch.ops.quantized.linear_dynamic(flat, cached[1], REDUCE_RANGE)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

