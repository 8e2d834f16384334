"""Lossless clean-ups (tailor.rewriter.cleanup) against the graphs they came from, run by
onnxruntime: the same outputs, fully masked rows included."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from tailor.backends.runners import cpu_session
from tailor.rewriter.capture import capture
from tailor.rewriter.cleanup import clean
from tests.conftest import ids_for


def _guarded_attention(fill: float) -> onnx.ModelProto:
    """p = softmax(scores); where(isnan(p), fill, p) @ v, as torch.onnx writes it."""
    nodes = [helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
             helper.make_node("IsNaN", ["p"], ["nan"]),
             helper.make_node("Where", ["nan", "fill", "p"], ["guarded"]),
             helper.make_node("MatMul", ["guarded", "v"], ["out"])]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2, 3, 4]),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2, 4, 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 3, 5])],
        [helper.make_tensor("fill", TensorProto.FLOAT, [], [fill])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _run(proto: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return cpu_session(proto.SerializeToString(), 1).run(None, feeds)[0]


def test_nan_guard_moves_after_the_product_and_zeroes_the_same_rows():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    scores[0, 1, 2] = -np.inf          # a query whose every key is masked: NaN probabilities
    scores[0, 0, 1, :2] = -np.inf      # partly masked: finite
    feeds = {"scores": scores, "v": rng.standard_normal((1, 2, 4, 5)).astype(np.float32)}
    proto = _guarded_attention(0.0)
    model = ir.serde.deserialize_model(proto)
    assert clean(model) == {"nan_guard_after_product": 1}
    cleaned = ir.serde.serialize_model(model)
    ops = [n.op_type for n in cleaned.graph.node]
    assert ops.index("MatMul") < ops.index("IsNaN")  # the guard now reads [queries, head_dim]
    expected, got = _run(proto, feeds), _run(cleaned, feeds)
    assert np.array_equal(got[0, 1, 2], np.zeros(5, np.float32))
    np.testing.assert_array_equal(got, expected)


def test_a_guard_that_fills_with_something_else_is_left_alone():
    model = ir.serde.deserialize_model(_guarded_attention(1.0))
    assert clean(model) == {}
    assert [n.op_type for n in model.graph][:2] == ["Softmax", "IsNaN"]


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_exported_models_are_cleaned_at_capture_and_compute_the_same(tiny_onnx, name):
    cap = capture(tiny_onnx[name])
    layers = cap.graph.num_layers
    assert cap.source.cleaned == {"nan_guard_after_product": layers}
    ids = ids_for(batch=2, seq=12).numpy()
    feeds = {"input_ids": ids}
    if "attention_mask" in cap.source.input_names:
        mask = np.ones_like(ids)
        mask[1, 7:] = 0  # a padded sequence
        feeds["attention_mask"] = mask
    original = cpu_session(str(tiny_onnx[name]), 1).run(None, feeds)[0]
    cleaned_bytes = ir.serde.serialize_model(cap.source.model).SerializeToString()
    cleaned = cpu_session(cleaned_bytes, 1).run(None, feeds)[0]
    np.testing.assert_allclose(cleaned, original, rtol=1e-6, atol=1e-6)


def test_a_measured_target_times_the_cleaned_model_against_the_input(tiny_onnx, tmp_path, monkeypatch):
    """The budget stays a fraction of the input as given: the fit measures what the clean-ups
    saved (CostModel.baseline) and the search spends only the rest on lossy rewrites."""
    import json

    from tailor.backends import backend_for
    from tailor.passes.cost import Structure, Workload
    from tailor.passes.search import search
    from tailor.stages.cost import cost_model_for

    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    table = tmp_path / "cpu.json"
    table.write_text(json.dumps({"kind": "tailor-target", "name": "t", "flops_per_s": 1e11,
                                 "bytes_per_s": 2e10, "bytes_per_element": 4,
                                 "matmul": [[1e6, 1e10], [1e9, 1e11]]}))
    cap = capture(tiny_onnx["llama"])
    cm = cost_model_for(cap, backend_for(cap), Workload(1, 32, 0), str(table))
    assert 0.3 < cm.baseline < 3 and cm.baseline != 1.0
    assert cm.ratio(Structure.dense(cap.graph), "latency") == pytest.approx(cm.baseline)
    assert cm.ratio(Structure.dense(cap.graph), "flops") == 1.0  # the guard is no FLOP
    # a budget the cleaned model already meets needs no lossy rewrite
    cm.baseline = 0.9
    assert search([], cm, 0.95, "latency", None).chosen == []


def test_the_artifact_holds_the_cleaned_model_it_reports(tiny_onnx, tmp_path, monkeypatch):
    """With no lossy rewrite (a budget the clean-up alone meets, or 1.0) the artifact is the
    cleaned graph that was timed and reported, not the input's bytes: every NaN guard reads the
    attention's output (p @ v), none the probabilities."""
    import tailor

    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    c = tailor.compile(str(tiny_onnx["llama"]), budget=1.0)
    assert c.report["clean_ups"] and not c.plan.rewrites
    written = onnx.load(c.save(tmp_path / "a") / "model.onnx")
    producers = {o: n.op_type for n in written.graph.node for o in n.output}
    guards = [producers.get(n.input[0]) for n in written.graph.node if n.op_type == "IsNaN"]
    assert guards and set(guards) == {"MatMul"}, guards
    ids = ids_for(batch=1, seq=12, seed=2)
    got = cpu_session(str(tmp_path / "a" / "model.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    assert np.abs(got - c.model(ids).numpy()).max() <= 1e-5


def test_parameters_read_through_identity_get_an_initializer_each():
    """As torch.onnx's TorchScript exporter writes two equal biases: one initializer, the second
    layer's read through Identity. Each becomes its own, the outputs unchanged."""
    bias = helper.make_tensor("layer0.bias", TensorProto.FLOAT, [3], [0.5, -1.0, 2.0])
    nodes = [helper.make_node("Identity", ["layer0.bias"], ["layer1.bias"]),
             helper.make_node("Add", ["x", "layer0.bias"], ["h"]),
             helper.make_node("Add", ["h", "layer1.bias"], ["out"])]
    x, out = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 3]) for name in ("x", "out"))
    graph = helper.make_graph(nodes, "shared", [x], [out], [bias])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    assert clean(model) == {"shared_parameters": 1}
    assert sorted(model.graph.initializers) == ["layer0.bias", "layer1.bias"]
    assert [n.op_type for n in model.graph] == ["Add", "Add"]
    x = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    np.testing.assert_array_equal(_run(ir.serde.serialize_model(model), x), _run(proto, x))
