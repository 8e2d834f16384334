"""GatherBlockQuantized: a lookup in a table of 4-bit values in blocks along the hidden axis, each
block with its scale (and zero point; 8 where there are none), as onnxruntime-genai's model builder
writes an int4 model's token embedding (reading the tied lm_head's packed weight):

    out = (codes[indices] - zero) · scale      codes: two to a byte, low nibble first

Written back as a Gather of the dequantized table, float in the scales' type: the values the op
returns, looked up as an exporter's embedding is (recognition reads the table; the rewrites
never cut the vocabulary). The table is stored in float: it no longer shares the lm_head's
quantized bytes."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tailor.rewriter.unfuse.base import UnfuseRule, given

DATA, INDICES, SCALES, ZERO_POINTS = range(4)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """A constant's array, also through a Reshape of one to a constant shape (how the builder
    reads the lm_head's [N, blocks, blob] weight as the table's [vocab, hidden / 2] bytes)."""
    if value is None:
        return None
    const = ir.convenience.get_const_tensor(value)  # an initializer, or a Constant node's value
    if const is not None:
        return const.numpy()
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    data, shape = (_constant(v) for v in reshape.inputs[:2])
    return None if data is None or shape is None else data.reshape([int(d) for d in shape])


class GatherBlockQuantized(UnfuseRule):
    op_types = ("GatherBlockQuantized",)

    def check(self, node: ir.Node) -> str | None:
        attrs = node.attributes
        if attrs.get_int("bits", 4) != 4 or attrs.get_int("gather_axis", 0) != 0:
            return "other than 4-bit codes gathered along the first axis"
        data, scales = _constant(node.inputs[DATA]), _constant(node.inputs[SCALES])
        if data is None or scales is None or data.dtype != np.uint8 or data.ndim != 2:
            return "a table that is not a constant [rows, columns / 2] of packed bytes"
        if attrs.get_int("quantize_axis", 1) not in (1, -1):
            return "blocks along the rows"
        if given(node, ZERO_POINTS) is not None and _constant(node.inputs[ZERO_POINTS]) is None:
            return "zero points that are not constants"
        return None

    def rewrite(self, tape: ir.tape.Tape, node: ir.Node) -> list[ir.Value | None]:
        table = dequantized(_constant(node.inputs[DATA]), _constant(node.inputs[SCALES]),
                            _constant(given(node, ZERO_POINTS)), node.attributes.get_int("block_size", 128))
        name = f"{node.name}.table"
        return [tape.op("Gather", [tape.initializer(ir.tensor(table, name=name)), node.inputs[INDICES]])]


def dequantized(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, block: int) -> np.ndarray:
    """The float table [rows, columns] of 4-bit codes packed two to a byte (low nibble first)."""
    rows = packed.shape[0]
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1).astype(np.float32)
    scales = scales.reshape(rows, -1)
    if zeros is None:
        zero = np.full(scales.shape, 8, np.float32)
    else:
        zero = np.stack([zeros & 0x0F, zeros >> 4], axis=-1).reshape(rows, -1)[:, : scales.shape[1]]
    per_value = np.repeat(zero.astype(np.float32), block, axis=1)[:, : codes.shape[1]]
    scale = np.repeat(scales.astype(np.float32), block, axis=1)[:, : codes.shape[1]]
    return ((codes - per_value) * scale).astype(scales.dtype)
