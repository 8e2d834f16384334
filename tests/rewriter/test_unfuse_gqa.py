"""GroupQueryAttention (tailor.rewriter.unfuse.group_query_attention) against onnxruntime's op:
packed q/k/v from one MatMul and three separate inputs, with an empty and a non-empty past."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from tailor.backends.runners import cpu_session
from tailor.rewriter.unfuse import unfuse, unsupported_ops

HIDDEN, HEADS, KV_HEADS, D, POSITIONS = 64, 4, 2, 16, 64
RNG = np.random.default_rng(0)
FLOAT = TensorProto.FLOAT


def _tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return helper.make_tensor(name, FLOAT, array.shape, array.astype(np.float32).ravel())


def _gqa_model(packed: bool, **attrs) -> onnx.ModelProto:
    """x -> MatMul(s) -> GroupQueryAttention (its mask subgraph as the builder writes it) -> out."""
    widths = {"q": HEADS * D, "k": KV_HEADS * D, "v": KV_HEADS * D}
    if packed:
        weights = [_tensor("qkv.weight", RNG.standard_normal((HIDDEN, sum(widths.values()))) * 0.3)]
        matmuls = [helper.make_node("MatMul", ["x", "qkv.weight"], ["qkv"], name="qkv_proj")]
        qkv = ["qkv", "", ""]
    else:
        weights = [_tensor(f"{p}.weight", RNG.standard_normal((HIDDEN, w)) * 0.3) for p, w in widths.items()]
        matmuls = [helper.make_node("MatMul", ["x", f"{p}.weight"], [p], name=f"{p}_proj") for p in widths]
        qkv = list(widths)
    inv = 1.0 / 10000 ** (np.arange(0, D, 2) / D)
    angles = np.outer(np.arange(POSITIONS), inv)
    weights += [_tensor("cos_cache", np.cos(angles)), _tensor("sin_cache", np.sin(angles))]
    mask = [
        helper.make_node("ReduceSum", ["attention_mask", "one"], ["sum"], keepdims=0),
        helper.make_node("Sub", ["sum", "one"], ["last"]),
        helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one_scalar"], ["total"], axis=0),
        helper.make_node("Cast", ["total"], ["total_length"], to=TensorProto.INT32),
    ]
    weights += [helper.make_tensor("one", TensorProto.INT64, [1], [1]),
                helper.make_tensor("one_scalar", TensorProto.INT64, [], [1])]
    gqa = helper.make_node(
        "GroupQueryAttention", [*qkv, "past_key", "past_value", "seqlens_k", "total_length", "cos_cache",
                                "sin_cache"], ["out", "present_key", "present_value"], name="gqa",
        domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS,
        **({"do_rotary": 1, "scale": 0.3, "local_window_size": -1, "softcap": 0.0} | attrs))
    cache = ["batch", KV_HEADS, "past", "kv_cache_dim"]  # as the builder declares them
    graph = helper.make_graph(
        [*mask, *matmuls, gqa], "gqa",
        [helper.make_tensor_value_info("x", FLOAT, ["batch", "length", HIDDEN]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
         helper.make_tensor_value_info("past_key", FLOAT, cache),
         helper.make_tensor_value_info("past_value", FLOAT, cache)],
        [helper.make_tensor_value_info("out", FLOAT, ["batch", "length", HEADS * D]),
         helper.make_tensor_value_info("present_key", FLOAT, ["batch", KV_HEADS, "total", D]),
         helper.make_tensor_value_info("present_value", FLOAT, ["batch", KV_HEADS, "total", D])],
        weights)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=opsets, ir_version=10))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
@pytest.mark.parametrize("past, length", [(0, 5), (6, 1), (4, 3)])
def test_the_unfused_attention_computes_what_onnxruntime_does(packed, past, length):
    proto = _gqa_model(packed)
    model = ir.serde.deserialize_model(proto)
    assert unfuse(model) == {"group_query_attention": 1}
    assert unsupported_ops(model) is None
    unfused = ir.serde.serialize_model(model)
    # onnxruntime's op takes a prompt after a past at batch 1 only
    feeds = _feeds(1 if past and length > 1 else 2, past, length)
    fused = cpu_session(proto.SerializeToString(), 1).run(None, feeds)
    standard = cpu_session(unfused.SerializeToString(), 1).run(None, feeds)
    for theirs, ours in zip(fused, standard):
        assert theirs.shape == ours.shape
        np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-5)
    # the packed weight is read as three projections; the mask's seqlens_k, unread, is swept
    assert sum(n.op_type == "MatMul" and n.inputs[0].name == "x" for n in model.graph) == 3
    assert not any(n.op_type == "ReduceSum" for n in model.graph)
    assert "qkv.weight" not in model.graph.initializers


@pytest.mark.parametrize("attrs", [{"softcap": 30.0}, {"local_window_size": 16}, {"rotary_interleaved": 1},
                                   {"do_rotary": 0}])
def test_attributes_the_form_does_not_compute_leave_the_op_named(attrs):
    model = ir.serde.deserialize_model(_gqa_model(True, **attrs))
    assert unfuse(model) == {}
    assert unsupported_ops(model) == "operators no rule writes back (com.microsoft:GroupQueryAttention ×1)"


def _feeds(batch: int, past: int, length: int) -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((batch, length, HIDDEN)).astype(np.float32),
            "attention_mask": np.ones((batch, past + length), np.int64),
            "past_key": RNG.standard_normal((batch, KV_HEADS, past, D)).astype(np.float32),
            "past_value": RNG.standard_normal((batch, KV_HEADS, past, D)).astype(np.float32)}


def test_a_packed_4_bit_projection_is_cut_into_three_exactly():
    """The int4 build: q, k and v packed in one MatMulNBits, cut into three by whole rows of blocks."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(_gqa_model(True), block_size=16, is_symmetric=True)
    quantizer.process()
    proto = quantizer.model.model
    model = ir.serde.deserialize_model(proto)
    assert unfuse(model) == {"group_query_attention": 1}
    assert [n.attributes.get_int("N") for n in model.graph if n.op_type == "MatMulNBits"] == \
        [HEADS * D, KV_HEADS * D, KV_HEADS * D]
    feeds = _feeds(1, 4, 3)
    fused = cpu_session(proto.SerializeToString(), 1).run(None, feeds)
    standard = cpu_session(ir.serde.serialize_model(model).SerializeToString(), 1).run(None, feeds)
    for theirs, ours in zip(fused, standard):
        np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("zero_points", [False, True], ids=["symmetric", "zero points"])
def test_a_4_bit_table_lookup_is_a_gather_of_the_dequantized_table(zero_points):
    rows, width, block = 40, 64, 16
    packed = RNG.integers(0, 256, (rows, width // 2), dtype=np.uint8)
    scales = RNG.random((rows, width // block)).astype(np.float32)
    weights = [helper.make_tensor("table", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True),
               _tensor("scales", scales)]
    inputs = ["table", "ids", "scales"]
    if zero_points:
        zeros = RNG.integers(0, 256, (rows, width // block // 2), dtype=np.uint8)
        weights.append(helper.make_tensor("zeros", TensorProto.UINT8, zeros.shape, zeros.tobytes(), raw=True))
        inputs.append("zeros")
    node = helper.make_node("GatherBlockQuantized", inputs, ["out"], domain="com.microsoft", bits=4,
                            block_size=block, gather_axis=0, quantize_axis=1)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])
    out = helper.make_tensor_value_info("out", FLOAT, [2, 5, width])
    graph = helper.make_graph([node], "lookup", [ids], [out], weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    assert unfuse(model) == {"gather_block_quantized": 1}
    assert unsupported_ops(model) is None
    feeds = {"ids": RNG.integers(0, rows, (2, 5))}
    theirs = cpu_session(proto.SerializeToString(), 1).run(None, feeds)[0]
    ours = cpu_session(ir.serde.serialize_model(model).SerializeToString(), 1).run(None, feeds)[0]
    np.testing.assert_array_equal(ours, theirs)
