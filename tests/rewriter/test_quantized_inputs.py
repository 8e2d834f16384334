"""Quantized ONNX inputs (issue 25): graphs quantized by onnxruntime from the tiny float models
(quantize_dynamic per channel and per tensor, quantize_static's QDQ per channel, MatMulNBits
4-bit blocks of 32), rewritten with the
float model's plan, must stay quantized and compute what the float model's rewrite computes, within
what quantization explains; the cuts that keep whole quantization groups are exact; what tailor
does not read is refused in one line with nothing written."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from tailor.backends import backend_for
from tailor.backends.runners import OrtModel
from tailor.cli.main import optimize_main
from tailor.passes.base import Option
from tailor.passes.profile import collect_signals
from tailor.passes.registry import apply_options
from tailor.rewriter import onnx_surgery
from tailor.rewriter.capture import capture
from tailor.rewriter.quantized.weights import quantized_linear
from tests.conftest import ids_for

FORMS = ["int8_per_channel", "uint8_per_tensor", "int8_qdq", "int4_blocks"]
OP = {"int4_blocks": "MatMulNBits", "int8_qdq": "MatMul"}  # else DynamicQuantizeMatMul


class _Feeds:
    """quantize_static's calibration reader: random token windows of the tiny vocabulary."""

    def __init__(self, names: list[str]):
        rows = [ids_for(batch=1, seq=24, seed=s).numpy() for s in range(16)]
        self.rows = iter({n: ids if n == "input_ids" else (np.ones_like(ids) if n == "attention_mask"
                                                            else np.zeros_like(ids)) for n in names}
                         for ids in rows)

    def get_next(self):
        return next(self.rows, None)


def quantize(float_path, form: str, out):
    """The float model quantized by onnxruntime in `form`."""
    if form == "int8_qdq":
        from onnxruntime.quantization import QuantFormat, quantize_static

        names = [i.name for i in onnx.load(str(float_path)).graph.input]
        quantize_static(str(float_path), str(out), _Feeds(names), quant_format=QuantFormat.QDQ,
                        per_channel=True)
        return out
    if form == "int4_blocks":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(float_path)), block_size=32, is_symmetric=True)
        quantizer.process()
        onnx.save(quantizer.model.model, str(out))
        return out
    from onnxruntime.quantization import QuantType, quantize_dynamic

    per_channel = form == "int8_per_channel"
    quantize_dynamic(str(float_path), str(out), per_channel=per_channel,
                     weight_type=QuantType.QInt8 if per_channel else QuantType.QUInt8)
    return out


@pytest.fixture(scope="module")
def quantized(tiny_onnx, tmp_path_factory):
    """(family, form) -> path of the quantized tiny model."""
    root = tmp_path_factory.mktemp("quantized")
    return {(name, form): quantize(tiny_onnx[name], form, root / f"{name}_{form}.onnx")
            for name in ("llama", "bert") for form in FORMS}


def _projections(graph):
    return [p for b in graph.blocks for p in b.attn.projections + b.ffn.projections]


def _plan(name: str) -> list[Option]:
    """A head and FFN channels pruned, a layer skipped (llama: KV head 1's two queries kept in layer 0)."""
    heads = {"kv_heads": [1], "queries": [[0, 1]]} if name == "llama" else \
        {"kv_heads": [0, 2], "queries": [[0], [0]]}
    return [Option("head_prune", 0, heads, ()),
            Option("ffn_prune", 0, {"channels": list(range(0, 96, 2))}, ()),
            Option("ffn_prune", 2, {"channels": list(range(64))}, ()),
            Option("layer_skip", 1, {}, ())]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_quantized_model_is_recognised_as_its_float_export(tiny_onnx, quantized, name, form):
    plain, cap = capture(tiny_onnx[name]), capture(quantized[(name, form)])
    assert len(cap.graph.blocks) == len(plain.graph.blocks)
    for a, b in zip(cap.graph.blocks, plain.graph.blocks):
        assert (a.attn.num_heads, a.attn.num_kv_heads, a.attn.head_dim, a.ffn.width) == \
            (b.attn.num_heads, b.attn.num_kv_heads, b.attn.head_dim, b.ffn.width)
    nodes = onnx_surgery.nodes_by_name(cap.source.model)
    assert {nodes[p.node].op_type for p in _projections(cap.graph)} == {OP.get(form, "DynamicQuantizeMatMul")}
    assert all(quantized_linear(nodes[p.node]) is not None for p in _projections(cap.graph))
    # read as it was written: the captured graph computes what the file does
    ids = ids_for(batch=2, seq=12, seed=1).numpy()
    np.testing.assert_allclose(OrtModel(cap.source.model).run_numpy(ids),
                               OrtModel(quantized[(name, form)]).run_numpy(ids), atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_cuts_of_whole_quantization_groups_are_exact(quantized, form):
    cap = capture(quantized[("llama", form)])
    model, block = onnx_surgery.clone(cap.source.model), cap.graph.blocks[0]
    up, down = block.ffn.up, block.ffn.down
    w_up, _ = onnx_surgery.projection_arrays(model, up)
    w_down, _ = onnx_surgery.projection_arrays(model, down)
    rows = np.arange(0, 96, 3)
    cols = np.r_[0:32, 64:96]  # whole blocks of 32 for MatMulNBits
    onnx_surgery.slice_projection(model, up, rows=rows)
    onnx_surgery.slice_projection(model, down, cols=cols)
    # dequantized with the scales (and zero points) cut alongside: per channel they would not broadcast
    np.testing.assert_array_equal(onnx_surgery.projection_arrays(model, up)[0], w_up[rows])
    np.testing.assert_array_equal(onnx_surgery.projection_arrays(model, down)[0], w_down[:, cols])


def test_a_cut_that_splits_blocks_is_quantized_again_in_the_inputs_scheme(quantized):
    cap = capture(quantized[("llama", "int4_blocks")])
    model, down = onnx_surgery.clone(cap.source.model), cap.graph.blocks[0].ffn.down
    w, _ = onnx_surgery.projection_arrays(model, down)
    cols = np.arange(0, 96, 2)  # every other channel: each block of 32 loses half its values
    onnx_surgery.slice_projection(model, down, cols=cols)
    node = onnx_surgery.nodes_by_name(model)[down.node]
    assert node.op_type == "MatMulNBits" and node.attributes.get_int("K") == 48
    # two blocks a row, and still no zero points: symmetric
    assert node.inputs[1].const_value.shape == (64, 2, 16) and len(node.inputs) == 3
    again, _ = onnx_surgery.projection_arrays(model, down)
    # in the new blocks of 32 (the second one half full), one more 4-bit rounding: within an
    # eighth of the block's largest value (symmetric: scale = largest / 8, at most half a step off,
    # or one step where the largest positive value clips to 7)
    blocks = lambda x: np.pad(x, ((0, 0), (0, 16))).reshape(64, 2, 32)  # noqa: E731
    step = np.abs(blocks(w[:, cols])).max(-1, keepdims=True) / 8
    assert (np.abs(blocks(again - w[:, cols])) <= step + 1e-6).all()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_plan_rewrites_the_quantized_model_as_it_rewrites_the_float_one(tiny_onnx, quantized, name, form):
    """With compensation (the signals' grams: new float weights, quantized again) and without
    (shapes only: exact cuts), the rewritten quantized model stays within the input's own
    quantization error of the rewritten float model, and its projections stay quantized."""
    plain, cap = capture(tiny_onnx[name]), capture(quantized[(name, form)])
    ids = ids_for(batch=4, seq=24, seed=3)
    dense_error = np.abs(OrtModel(cap.source.model).run_numpy(ids.numpy())
                         - OrtModel(plain.source.model).run_numpy(ids.numpy())).max()
    signals = {"float": collect_signals(backend_for(plain), ids),
               "quantized": collect_signals(backend_for(cap), ids)}
    for compensated in (True, False):
        rewritten = {}
        for kind, c in (("float", plain), ("quantized", cap)):
            backend = apply_options(backend_for(c).clone(), _plan(name),
                                    signals[kind] if compensated else None)
            backend.finish()
            rewritten[kind] = backend.model
        got = OrtModel(rewritten["quantized"]).run_numpy(ids.numpy())
        want = OrtModel(rewritten["float"]).run_numpy(ids.numpy())
        error = np.abs(got - want).max()
        assert error <= 2 * dense_error, (compensated, error, dense_error)
        # 2 of 3 layers left, 6 (bert) or 7 (llama) projections each, and the llama's lm head
        assert sum(quantized_linear(n) is not None for n in rewritten["quantized"].graph) == \
            (15 if name == "llama" else 12)
        assert not any(n.op_type == "MatMul" and n.inputs[1].is_initializer()
                       for n in rewritten["quantized"].graph)


def test_a_quantized_model_compiles_into_a_quantized_artifact(quantized, tmp_path, monkeypatch):
    """The CLI end to end on the int8 llama: searched, validated, written, and still int8."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    path = quantized[("llama", "int8_per_channel")]
    assert optimize_main([str(path), "--budget", "0.6", "--target", "cpu", "--calib-windows", "8",
                          "--passes", "layer_skip,ffn_skip,ffn_prune,head_prune", "-o", str(out)]) == 0
    artifact = onnx.load(str(out / "model.onnx"))
    weights = {t.name for t in artifact.graph.initializer}
    assert any(n.op_type == "DynamicQuantizeMatMul" for n in artifact.graph.node)
    assert not any(n.op_type == "MatMul" and n.input[1] in weights for n in artifact.graph.node)
    assert (out / "model.onnx").stat().st_size < path.stat().st_size


def test_a_quantized_form_tailor_does_not_read_is_refused_in_one_line(tiny_onnx, tmp_path, capsys):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(tiny_onnx["llama"])), block_size=32, bits=8)
    quantizer.process()
    path = tmp_path / "model.onnx"
    onnx.save(quantizer.model.model, str(path))
    out = tmp_path / "out"
    assert optimize_main([str(path), "--budget", "0.6", "--target", "cpu", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantized weights (MatMulNBits with 8-bit weights ×" in err[0]
    assert "quantize_dynamic" in err[0]
    assert not out.exists()


def test_a_tvm_build_of_onnxruntime_quantized_ops_is_refused_before_any_work(quantized, tmp_path, capsys):
    out = tmp_path / "out"
    path = quantized[("llama", "int4_blocks")]
    argv = [str(path), "--budget", "0.6", "--target", "cpu", "--format", "onnx,tvm", "-o", str(out)]
    assert optimize_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TVM's ONNX importer has no MatMulNBits" in err[0]
    assert not out.exists()

