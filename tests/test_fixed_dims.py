"""ONNX graphs exported without dynamic axes (issue 25): every stage runs them at the batch and
length they fix, and a workload they cannot take is one clear error before any work."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import tailor
from tailor.backends.export import export_onnx
from tailor.backends.runners import OrtModel
from tailor.cli.main import optimize_main
from tailor.core.errors import TailorError
from tailor.rewriter.capture import capture_onnx
from tailor.rewriter.onnx_check import InputShape
from tests.conftest import build_model, ids_for
from tests.test_cli_errors import _fails

LENGTH = 128  # long enough that the default attention lengths (64, 128) and validation (96) pad


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """name -> an export of batch 1: "llama" also of fixed length, "llama_batch" of any length,
    "bert" (with an attention_mask input) of fixed length 32."""
    root = tmp_path_factory.mktemp("fixed")
    paths = {}
    exports = (("llama", "llama", (0, 1), LENGTH), ("llama_batch", "llama", (0,), 16),
               ("bert", "bert", (0, 1), 32))
    for name, family, static, length in exports:
        paths[name] = root / name / "model.onnx"
        paths[name].parent.mkdir()
        export_onnx(build_model(family), paths[name], encoder=family == "bert", seq_len=length, batch=1,
                    static_axes=static)
    return paths


def _input_dims(path) -> list[list]:
    return [[d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(path)).graph.input]


def test_fixed_dims_are_read_once_and_recognised(fixed):
    assert _input_dims(fixed["llama"]) == [[1, LENGTH]]
    cap = capture_onnx(fixed["llama"])
    # the export folds the causal comparison into a constant: still a causal LM, so padding is exact
    assert cap.graph.task == "causal-lm"
    assert cap.source.input_shape == InputShape(1, LENGTH, paddable=True)
    assert capture_onnx(fixed["llama_batch"]).source.input_shape == InputShape(1, None, paddable=True)
    assert capture_onnx(fixed["bert"]).source.input_shape == InputShape(1, 32, paddable=True)  # masked


def test_batches_run_a_row_at_a_time_and_short_inputs_padded_exactly(fixed, tiny_models):
    """The fixed-shape graph computes what the torch model does on any batch and shorter length."""
    ids = ids_for(batch=3, seq=100, seed=4)
    with torch.no_grad():
        want = tiny_models["llama"](ids).logits.numpy()
    model = OrtModel(fixed["llama"], causal=True)
    assert np.abs(model.run_numpy(ids.numpy()) - want).max() <= 1e-4
    with pytest.raises(TailorError, match=f"1 × {LENGTH} tokens exactly; got 1 × 100"):
        OrtModel(fixed["llama"]).run_numpy(ids[:1].numpy())  # not known to be causal: no padding
    # intermediate values too come back at the inputs' length (here the graph's output)
    assert np.abs(next(iter(model.run_all(ids.numpy()).values())) - want).max() <= 1e-4
    with pytest.raises(TailorError, match=f"1 × {LENGTH} tokens exactly; got 100 tokens"):
        OrtModel(fixed["llama"]).run_all(ids[:1].numpy())
    bert = OrtModel(fixed["bert"])  # an attention_mask masks the padding out
    with torch.no_grad():
        want = tiny_models["bert"](ids[:, :20]).last_hidden_state.numpy()
    assert np.abs(bert.run_numpy(ids[:, :20].numpy()) - want).max() <= 1e-4


def test_a_padded_encoder_traces_only_its_real_positions(fixed, tiny_onnx):
    """Block traces (signals, refits) of lines shorter than a fixed-length encoder's input: run
    padded, the padded positions cut off, they equal the dynamic export's on the lines as they
    are, flattened layouts included; so such an encoder calibrates on its lines whole."""
    from tailor.backends import backend_for
    from tailor.stages.shapes import shapes_for

    ids = ids_for(batch=3, seq=20, seed=5)

    def traces(path):
        out = {}
        backend_for(capture_onnx(path)).block_traces(ids, lambda i, t: out.setdefault(i, t))
        return out

    got, want = traces(fixed["bert"]), traces(tiny_onnx["bert"])
    assert got.keys() == want.keys()
    for i in want:
        for a, b in zip(got[i], want[i]):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    shape = {"batch": None, "prompt_len": None, "gen_len": 0, "calib_len": None, "attn_lengths": None,
             "validation_len": None}
    assert shapes_for(capture_onnx(fixed["bert"]), **shape).calib_len is None   # its lines whole
    assert shapes_for(capture_onnx(fixed["llama"]), **shape).calib_len == LENGTH  # a decoder: windows


def test_lines_are_cut_at_a_fixed_length():
    from tailor.cli.default_model import minilm_directory
    from tailor.data.calibration import calibration_from_text
    from tailor.data.text import load_tokenizer

    text = "\n".join(("word " * (3 + 4 * (i % 9))).strip() for i in range(40))
    lines = calibration_from_text(text, load_tokenizer(minilm_directory()), None, lambda n: 400 // n, "t",
                                  per_line=True, max_line=16)
    lengths = {len(r) for r in lines.profile_ids.rows + lines.heldout_ids.rows}
    assert max(lengths) == 16 and min(lengths) < 16


def test_optimize_a_decoder_of_fixed_batch_and_length(fixed, tmp_path, monkeypatch, capsys):
    """The issue's run: budget 0.5 priced for a table measured on this CPU (so the model is timed
    too), every stage at 1 × 128 tokens."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    table = tmp_path / "cpu.json"
    table.write_text(json.dumps({"kind": "tailor-target", "name": "t", "flops_per_s": 1e11,
                                 "bytes_per_s": 2e10, "bytes_per_element": 4,
                                 "matmul": [[1e6, 1e10], [1e9, 1e11]]}))
    out = tmp_path / "out"
    assert optimize_main([str(fixed["llama"]), "--budget", "0.5", "--target", str(table), "--calib-windows",
                          "8", "-o", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert plan["workload"] == {"batch": 1, "prompt_len": LENGTH, "gen_len": 0}
    assert plan["rewrites"] and plan["predicted"]["latency"] <= 0.5 + 1e-9
    assert report["calibration"]["data"].endswith(f"of {LENGTH} tokens of uniformly random tokens")
    assert report["cost_model"]["measured_ratios"] and report["measured_latency"]["ratio"] > 0
    assert report["search"]["measured_kl_heldout"] < 0.05
    assert all(c["ok"] for c in report["validation"])
    assert _input_dims(out / "model.onnx") == [[1, LENGTH]]  # the artifact keeps the fixed shape
    # the artifact runs shorter inputs padded, as the compiled model does
    ids = ids_for(batch=2, seq=40, seed=2)
    original, rewritten = OrtModel(fixed["llama"], causal=True), tailor.load(out).model
    with torch.no_grad():
        got = rewritten(ids).numpy()
    assert got.shape == (2, 40, 96)
    kl = _kl(original.run_numpy(ids.numpy()), got)
    assert np.isfinite(kl) and kl < 0.05


def _kl(reference: np.ndarray, logits: np.ndarray) -> float:
    p, q = (torch.log_softmax(torch.from_numpy(x).double(), -1) for x in (reference, logits))
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_compile_fixed_batch_any_length_and_fixed_encoder(fixed, tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    c = tailor.compile(fixed["llama_batch"], 0.5, target="cpu", prompt_len=32, calib_windows=4,
                       passes=["layer_skip", "ffn_skip", "ffn_prune", "head_prune"])
    assert c.plan.workload["batch"] == 1 and c.plan.predicted["latency"] <= 0.5 + 1e-9
    (dims,) = _input_dims(c.save(tmp_path / "a") / "model.onnx")
    assert dims[0] == 1 and isinstance(dims[1], str)  # batch fixed, length free
    bert = tailor.compile(fixed["bert"], 0.5, target="cpu", calib_windows=8,
                          passes=["layer_skip", "ffn_prune", "head_prune"])
    assert bert.plan.workload["prompt_len"] == 32 and bert.plan.predicted["latency"] <= 0.5 + 1e-9
    assert _input_dims(bert.save(tmp_path / "b") / "model.onnx") == [[1, 32], [1, 32]]


@pytest.mark.parametrize("flags, expect", [
    (["--prompt-len", "512"],
     f"model.onnx takes input_ids of fixed length {LENGTH}; --prompt-len 512 is not possible"),
    (["--prompt-len", "64"], "--prompt-len 64 is not possible"),
    (["--batch", "4"], "takes input_ids of fixed batch 1; --batch 4 is not possible"),
    (["--calib-len", "32"], "--calib-len 32 is not possible"),
    (["--attn-lengths", "64,256"], "--attn-lengths 256 is not possible"),
])
def test_a_workload_the_graph_cannot_take_is_one_line(fixed, tmp_path, capsys, monkeypatch, flags, expect):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    _fails([str(fixed["llama"]), "--budget", "0.5", "--target", "cpu", "-o", str(tmp_path / "out"), *flags],
           capsys, expect=expect)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_learned_positions_bound_every_length(tiny_onnx):
    """A model with a table of 128 learned positions (the tiny BERT) gets defaults within it and
    a longer length asked for is one clear error, before any work."""
    from tailor.backends import backend_for
    from tailor.stages.calibrate import calibration
    from tailor.stages.shapes import shapes_for

    cap = capture_onnx(tiny_onnx["bert"])
    assert cap.graph.max_positions == 128
    shapes = shapes_for(cap, batch=None, prompt_len=None, gen_len=0, calib_len=None, attn_lengths=None,
                        validation_len=None)
    assert shapes.workload.prompt_len == 128 and max(shapes.attn_lengths) <= 128
    data_free = calibration(backend_for(cap), cap.source, None, None, None, shapes.calib_len, 0)
    assert data_free.profile_ids.shape[1] == 128
    for flag in ("prompt_len", "calib_len"):
        kwargs = dict(batch=None, prompt_len=None, gen_len=0, calib_len=None, attn_lengths=None,
                      validation_len=None) | {flag: 256}
        with pytest.raises(TailorError, match=f"at most 128 tokens; --{flag.replace('_', '-')} 256 is not"):
            shapes_for(cap, **kwargs)
