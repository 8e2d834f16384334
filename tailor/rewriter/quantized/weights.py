"""A quantized linear's weight as one group: the integer tensor with its scale and zero point
(and, for MatMulNBits, its block layout), read, sliced and written together.

Cuts that keep whole quantization groups are exact: output channels of any form (a per-channel
scale and zero point are cut with them, a per-tensor one is left as it is), input channels of an
int8 weight (every scale is per output channel or per tensor), input channels of a MatMulNBits
weight where the cut keeps whole blocks. New float weights (least-squares compensation, the refit)
and MatMulNBits input cuts that split blocks are quantized again by onnxruntime's own quantizers,
in the scheme the input used (per channel or per tensor, symmetric or not, the block size).
"""
from __future__ import annotations

import abc

import numpy as np
import onnx_ir as ir

MICROSOFT = "com.microsoft"
DYNAMIC_MATMUL = "DynamicQuantizeMatMul"
NBITS_MATMUL = "MatMulNBits"


def _const(node: ir.Node, i: int) -> np.ndarray | None:
    v = node.inputs[i] if i < len(node.inputs) else None
    return None if v is None or v.const_value is None else v.const_value.numpy()


class QuantizedLinear(abc.ABC):
    """A linear node whose weight is held quantized, in the inputs of `holder` (the node itself,
    or the DequantizeLinear that makes a QDQ weight). Arrays are keyed by the holder's input index."""

    def __init__(self, node: ir.Node, holder: ir.Node | None = None):
        self.node, self.holder = node, holder or node

    @property
    @abc.abstractmethod
    def out_features(self) -> int:
        """The weight's output channels."""

    @abc.abstractmethod
    def dequantized(self) -> np.ndarray:
        """The weight as float32, [out, in]."""

    @abc.abstractmethod
    def sliced(self, rows: np.ndarray | None, cols: np.ndarray | None) -> dict[int, np.ndarray] | None:
        """The group with output channels `rows` and input channels `cols` kept, exactly; None
        where the cut splits a quantization group."""

    @abc.abstractmethod
    def quantized(self, w: np.ndarray) -> dict[int, np.ndarray]:
        """`w` [out, in] quantized in this linear's scheme."""

    def attributes(self, out_features: int, in_features: int) -> dict[str, int]:
        """The node's attributes that say its shape."""
        return {}


class Int8Linear(QuantizedLinear):
    """An int8/uint8 weight [in, out] with its scale and zero point, per output channel or per
    tensor, as the holder's inputs `first`, +1, +2: com.microsoft DynamicQuantizeMatMul(A, B,
    b_scale, b_zero_point) (the form quantize_dynamic's MatMulInteger chains are read as), or
    the DequantizeLinear(W, scale, zero point, axis=1) a QDQ MatMul reads its weight through."""

    def __init__(self, node: ir.Node, holder: ir.Node, first: int):
        super().__init__(node, holder)
        self.first = first

    @property
    def out_features(self) -> int:
        return int(_const(self.holder, self.first).shape[1])

    @property
    def _parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q, scale, zero = (_const(self.holder, self.first + i) for i in range(3))
        return q, scale, np.zeros_like(scale, dtype=q.dtype) if zero is None else zero

    def dequantized(self) -> np.ndarray:
        q, scale, zero = self._parts
        return ((q.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)).T

    def sliced(self, rows, cols) -> dict[int, np.ndarray]:
        q, scale, zero = self._parts
        first = self.first
        out = {first: q[:, rows] if rows is not None else q}
        if cols is not None:
            out[first] = out[first][cols]
        if rows is not None and scale.size > 1:  # per output channel
            out[first + 1] = scale[rows]
            if _const(self.holder, first + 2) is not None:
                out[first + 2] = zero[rows]
        return {i: np.ascontiguousarray(a) for i, a in out.items()}

    def quantized(self, w: np.ndarray) -> dict[int, np.ndarray]:
        from onnxruntime.quantization.quant_utils import quantize_data

        q, scale, zero = self._parts
        qtype = ir.DataType.INT8 if q.dtype == np.int8 else ir.DataType.UINT8
        symmetric = q.dtype == np.int8 and not zero.any()
        # reduce_range (7-bit weights, for CPUs without VNNI) shows as values that never pass 64
        reduce_range = bool(np.abs(q.astype(np.int32) - zero.astype(np.int32)).max() <= 64)
        w_in_out = np.asarray(w, np.float32).T
        columns = [w_in_out[:, j] for j in range(w_in_out.shape[1])] if scale.size > 1 else [w_in_out]
        parts = [quantize_data(c, int(qtype), symmetric, reduce_range) for c in columns]
        q_new = np.stack([p[2] for p in parts], axis=1).reshape(w_in_out.shape).astype(q.dtype)
        scales = np.asarray([p[1] for p in parts], scale.dtype).reshape(-1 if scale.size > 1 else scale.shape)
        zeros = np.asarray([p[0] for p in parts], q.dtype).reshape(scales.shape)
        out = {self.first: q_new, self.first + 1: scales}
        if _const(self.holder, self.first + 2) is not None:
            out[self.first + 2] = zeros
        return out


class NBitsLinear(QuantizedLinear):
    """com.microsoft MatMulNBits(A, B [N, blocks, blob] uint8, scales [N, blocks], zero_points?):
    4-bit weights in blocks of `block_size` input channels, packed two to a byte (low nibble first),
    each block with its scale and zero point (8 where there are none: symmetric)."""

    @property
    def block(self) -> int:
        return self.node.attributes.get_int("block_size")

    @property
    def k(self) -> int:
        return self.node.attributes.get_int("K")

    @property
    def n(self) -> int:
        return self.node.attributes.get_int("N")

    @property
    def out_features(self) -> int:
        return self.n

    def _codes(self) -> np.ndarray:
        """The 4-bit values, [N, blocks · block_size]."""
        packed = _const(self.node, 1).reshape(self.n, -1)
        return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(self.n, -1)

    def _scales(self) -> np.ndarray:
        return _const(self.node, 2).reshape(self.n, -1)

    def _zeros(self) -> np.ndarray | None:
        """Zero points per block [N, blocks], None where the input has none (8 for each)."""
        packed = _const(self.node, 3)
        if packed is None:
            return None
        blocks = self._scales().shape[1]
        return np.stack([packed.reshape(self.n, -1) & 0x0F, packed.reshape(self.n, -1) >> 4],
                        axis=-1).reshape(self.n, -1)[:, :blocks]

    def dequantized(self) -> np.ndarray:
        zeros = self._zeros()
        zeros = np.full(self._scales().shape, 8, np.uint8) if zeros is None else zeros
        per_value = np.repeat(zeros, self.block, axis=1).astype(np.float32)
        scales = np.repeat(self._scales().astype(np.float32), self.block, axis=1)
        return ((self._codes().astype(np.float32) - per_value) * scales)[:, : self.k]

    def sliced(self, rows, cols) -> dict[int, np.ndarray] | None:
        blocks = np.arange(self._scales().shape[1])
        if cols is not None:
            cols = np.asarray(cols)
            kept = np.unique(cols // self.block)
            whole = np.concatenate([np.arange(b * self.block, min((b + 1) * self.block, self.k))
                                    for b in kept])
            if not np.array_equal(np.sort(cols), whole):
                return None  # the cut splits a block: its scale served the values cut away too
            blocks = kept
        rows = np.arange(self.n) if rows is None else np.asarray(rows)
        packed = _const(self.node, 1).reshape(self.n, len(self._scales()[0]), -1)
        out = {1: packed[rows][:, blocks], 2: _const(self.node, 2).reshape(self.n, -1)[rows][:, blocks]}
        zeros = self._zeros()
        if zeros is not None:
            out[3] = _pack_nibbles(zeros[rows][:, blocks])
        return {i: np.ascontiguousarray(a) for i, a in out.items()}

    def quantized(self, w: np.ndarray) -> dict[int, np.ndarray]:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        symmetric = _const(self.node, 3) is None
        config = DefaultWeightOnlyQuantConfig(block_size=self.block, is_symmetric=symmetric,
                                              bits=self.node.attributes.get_int("bits", 4))
        packed, scales, zeros = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
            np.ascontiguousarray(np.asarray(w, np.float32).T))
        out = {1: packed, 2: scales.astype(_const(self.node, 2).dtype).reshape(
            scales.shape if _const(self.node, 2).ndim == 2 else (-1,))}
        if not symmetric:
            out[3] = zeros.reshape(zeros.shape if _const(self.node, 3).ndim == 2 else (-1,))
        return out

    def attributes(self, out_features: int, in_features: int) -> dict[str, int]:
        return {"N": out_features, "K": in_features}


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """[rows, n] 4-bit values packed two to a byte, low nibble first (rows padded to even n)."""
    if values.shape[1] % 2:
        values = np.pad(values, ((0, 0), (0, 1)))
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)


def nbits_refusal(node: ir.Node) -> str | None:
    """Why a MatMulNBits node is not read as a linear (None: it is)."""
    bits = node.attributes.get_int("bits", 4)
    if bits != 4:
        return f"{bits}-bit weights"
    if len(node.inputs) > 4 and any(v is not None for v in node.inputs[4:]):
        return "a g_idx or bias input"
    if any(_const(node, i) is None for i in (1, 2)) or (len(node.inputs) > 3 and node.inputs[3] is not None
                                                       and _const(node, 3) is None):
        return "weights that are not constants"
    if _const(node, 2).dtype != np.float32:
        return "scales that are not float32"
    return None


def qdq_weight(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear a QDQ MatMul reads its weight through: of a constant int8/uint8
    matrix, per tensor or per output channel (axis 1); None where the MatMul has none."""
    w = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
    dq = w.producer() if w is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or (dq.domain or "") not in ("", "ai.onnx"):
        return None
    q, scale = _const(dq, 0), _const(dq, 1)
    if q is None or scale is None or q.dtype not in (np.int8, np.uint8) or q.ndim != 2 \
            or (len(dq.inputs) > 2 and dq.inputs[2] is not None and _const(dq, 2) is None):
        return None
    per_tensor, axis = scale.size == 1, dq.attributes.get_int("axis", 1)
    return dq if per_tensor or (axis in (1, -1) and scale.shape == (q.shape[1],)) else None


def quantized_linear(node: ir.Node) -> QuantizedLinear | None:
    """The node's quantized weight group, where it is a linear tailor reads quantized."""
    if node.domain == MICROSOFT and node.op_type == DYNAMIC_MATMUL \
            and all(_const(node, i) is not None for i in (1, 2)):
        return Int8Linear(node, node, 1)
    if node.domain == MICROSOFT and node.op_type == NBITS_MATMUL and nbits_refusal(node) is None:
        return NBitsLinear(node)
    dq = qdq_weight(node) if (node.domain or "") in ("", "ai.onnx") else None
    return Int8Linear(node, dq, 0) if dq is not None else None
