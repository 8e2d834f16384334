"""INT8 weights with dynamic activations for chosen MatMul nodes of an ONNX model, by
onnxruntime.quantization.quantize_dynamic (the library's quantizer: tailor writes none).

Per output channel, signed 8-bit weights, full range: on this project's CPU (AVX-512 VNNI)
MiniLM quantized whole kept an embedding cosine of 0.9937 to the float model on held-out
sentences, 0.9918 with reduce_range's 7-bit weights and 0.963 per tensor, all at the same speed.
(reduce_range exists for CPUs without VNNI, whose u8 × s8 products can saturate.)
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import numpy_helper

from tailor.core.errors import TailorError

PER_CHANNEL = True
REDUCE_RANGE = False
METHOD = ("onnxruntime quantize_dynamic: signed 8-bit weights per output channel (full range), "
          "activations quantized at run time")
# protobuf cannot hold a model over 2 GB: past this size the quantizer writes its weights beside it
EXTERNAL_DATA_BYTES = 1 << 30


@contextlib.contextmanager
def _quiet():
    """quantize_dynamic logs a hint to run its pre-processing on every call (through the root
    logger), which is not the user's concern here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def has_constant_weight(node: ir.Node) -> bool:
    """Whether a MatMul's weight is constant for quantize_dynamic: an initializer, or the
    transpose of one (a head tied to the embedding table, which the Gather reads as it is:
    `with_transposes_folded` gives the head a transposed copy of its own)."""
    weight = node.inputs[1]
    if weight is None or weight.is_initializer():
        return weight is not None
    producer = weight.producer()
    if producer is None or producer.op_type != "Transpose" or producer.inputs[0] is None:
        return False
    perm = list(producer.attributes.get_ints("perm", [1, 0]))
    return producer.inputs[0].is_initializer() and perm == [1, 0]


def with_transposes_folded(model: onnx.ModelProto, nodes: set[str]) -> onnx.ModelProto:
    """`model` (changed in place) with each of `nodes` that reads its weight through a Transpose
    of an initializer reading a transposed initializer instead, which quantize_dynamic can
    quantize; a Transpose left unread goes."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    transposes = {n.output[0]: n for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    for node in graph.node:
        if node.name in nodes and node.op_type == "MatMul" and node.input[1] in transposes:
            source = inits[transposes[node.input[1]].input[0]]
            folded = numpy_helper.from_array(numpy_helper.to_array(source).T.copy(),
                                             f"{source.name}.transposed.{node.name}")
            graph.initializer.append(folded)
            node.input[1] = folded.name
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for name, t in transposes.items():
        if name not in read:
            graph.node.remove(t)
    return model


def quantize_proto(model: onnx.ModelProto, nodes: list[str]) -> onnx.ModelProto:
    """`model` with the MatMul nodes named in `nodes` (those still in the graph) on INT8 weights
    and dynamically quantized activations; every other node as it was."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    present = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    wanted = sorted(set(nodes) & present)
    if not wanted:
        return model
    model = with_transposes_folded(model, set(wanted))
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        out = Path(tmp) / "quantized.onnx"
        try:
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], per_channel=PER_CHANNEL,
                             reduce_range=REDUCE_RANGE, weight_type=QuantType.QInt8, nodes_to_quantize=wanted,
                             use_external_data_format=large)
        except Exception as e:  # the quantizer raises whatever its graph walk meets
            raise TailorError(f"onnxruntime's quantize_dynamic failed: {str(e).splitlines()[0]}") from None
        return onnx.load(str(out))  # external data read in before the folder goes


def quantized(model: ir.Model, nodes: list[str]) -> ir.Model:
    """quantize_proto on an onnx_ir model (a new model; `model` is left as it was)."""
    return ir.serde.deserialize_model(quantize_proto(ir.serde.serialize_model(model), nodes))
