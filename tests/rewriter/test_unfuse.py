"""onnxruntime's fused ops written back as standard ONNX ops (tailor.rewriter.unfuse): each rule
against the contrib op it replaces, run by onnxruntime; a BERT fused by onnxruntime's transformers
optimizer captured as its unfused export is; quantized graphs tailor does not read refused in one line."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from tailor.backends.runners import cpu_session
from tailor.core.errors import TailorError
from tailor.rewriter.capture import capture
from tailor.rewriter.onnx_check import checker_problem
from tailor.rewriter.unfuse import unfuse, unsupported_ops

H = 8
RNG = np.random.default_rng(0)


def _weight(name: str, *shape) -> onnx.TensorProto:
    values = RNG.standard_normal(shape).astype(np.float32).ravel()
    return helper.make_tensor(name, TensorProto.FLOAT, shape, values)


def _model(node: onnx.NodeProto, inputs: list[str], outputs: list[str], weights: list[onnx.TensorProto]):
    graph = helper.make_graph(
        [node], "fused", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, H]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, H]) for n in outputs], weights)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _outputs(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return cpu_session(proto.SerializeToString(), 1).run(None, feeds)


def _unfused(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    model = ir.serde.deserialize_model(proto)
    done = unfuse(model)
    assert not any(n.domain == "com.microsoft" for n in model.graph)
    return ir.serde.serialize_model(model), done


SUM = ["out", "", "", "sum"]  # the norm, no mean / inverse std, the residual sum
CASES = {
    "SkipLayerNormalization": (["x", "skip", "gamma", "beta", "bias"], SUM, {"epsilon": 1e-5}),
    "SkipSimplifiedLayerNormalization": (["x", "skip", "gamma", "bias"], SUM, {"epsilon": 1e-6}),
    "BiasGelu": (["x", "bias"], ["out"], {}),
    "FastGelu": (["x", "bias"], ["out"], {}),
    "Gelu": (["x"], ["out"], {}),
}


@pytest.mark.parametrize("op", list(CASES))
def test_each_rule_computes_what_the_contrib_op_does(op):
    inputs, outputs, attrs = CASES[op]
    node = helper.make_node(op, inputs, outputs, domain="com.microsoft", **attrs)
    weights = [_weight(n, H) for n in ("gamma", "beta", "bias") if n in inputs]
    data = [n for n in ("x", "skip") if n in inputs]
    proto = _model(node, data, [o for o in outputs if o], weights)
    feeds = {n: RNG.standard_normal((2, 3, H)).astype(np.float32) * 3 for n in data}
    unfused, done = _unfused(proto)
    assert sum(done.values()) == 1
    for fused, standard in zip(_outputs(proto, feeds), _outputs(unfused, feeds)):
        np.testing.assert_allclose(standard, fused, atol=2e-5, rtol=1e-5)


def test_a_skip_norm_whose_statistics_are_read_stays_and_is_named():
    node = helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma"], ["out", "mean"],
                            domain="com.microsoft")
    model = ir.serde.deserialize_model(_model(node, ["x", "skip"], ["out", "mean"], [_weight("gamma", H)]))
    assert unfuse(model) == {}
    assert unsupported_ops(model) == "operators no rule writes back (com.microsoft:SkipLayerNormalization ×1)"


def test_a_bert_fused_by_onnxruntime_is_captured_as_its_export(tiny_onnx, tmp_path):
    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(str(tiny_onnx["bert"]), model_type="bert", num_heads=4, hidden_size=64)
    path = tmp_path / "model.onnx"
    fused.save_model_to_file(str(path))
    assert {"SkipLayerNormalization", "BiasGelu"} <= {n.op_type for n in fused.model.graph.node}
    plain, cap = capture(tiny_onnx["bert"]), capture(path)
    assert _named_weights(cap.graph.to_json()) == _named_weights(plain.graph.to_json())
    assert cap.source.cleaned["skip_norm"] == 6 and cap.source.cleaned["gelu"] == 3
    ids = RNG.integers(0, 96, (2, 12))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    names = [i.name for i in cpu_session(str(path), 1).get_inputs()]
    feeds = {k: v for k, v in feeds.items() if k in names}
    written = ir.serde.serialize_model(cap.source.model).SerializeToString()
    np.testing.assert_allclose(cpu_session(written, 1).run(None, feeds)[0],
                               cpu_session(str(path), 1).run(None, feeds)[0], atol=1e-5)


def _named_weights(x):
    """A captured graph's JSON without its node names (which differ between the two graphs):
    every projection, norm and head by its weights' names and shapes."""
    if isinstance(x, dict):
        return {k: _named_weights(v) for k, v in x.items() if k not in ("node", "nodes")}
    return [_named_weights(v) for v in x] if isinstance(x, (list, tuple)) else x


def test_quantized_graphs_tailor_does_not_read_are_refused_naming_the_ops(tiny_onnx, tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_static

    path = tmp_path / "model.onnx"  # the QOperator format: QLinearMatMul and other integer ops
    quantize_static(str(tiny_onnx["llama"]), str(path), _Feeds([{"input_ids": RNG.integers(0, 96, (1, 12))}]),
                    quant_format=QuantFormat.QOperator)
    with pytest.raises(TailorError, match=r"quantized weights \(.*QLinearMatMul ×\d+.*the float model"):
        capture(path)
    # beside onnxruntime-genai's config: a builder's output, whose source model is what to give
    (tmp_path / "genai_config.json").write_text("{}")
    with pytest.raises(TailorError, match=r"quantized weights.*the Hugging Face model its builder read"):
        capture(path)


class _Feeds:
    """quantize_static's calibration reader over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self.rows = iter(feeds)

    def get_next(self):
        return next(self.rows, None)


def test_the_checker_lets_pass_an_op_it_has_no_schema_for_but_not_a_broken_graph(tmp_path):
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["out"], epsilon=1e-6)
    proto = _model(node, ["x"], ["out"], [_weight("gamma", H)])
    proto.opset_import.pop(1)  # the genai builder writes it in the default domain only
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    assert checker_problem(str(path), full_check=True) is None
    assert _outputs(proto, {"x": np.ones((2, 3, H), np.float32)})[0].shape == (2, 3, H)
    proto.graph.node[0].input[1] = "missing"
    onnx.save(proto, path)
    assert "missing" in checker_problem(str(path), full_check=True)
