"""A cost-model target measured on this machine (tailor calibrate-target): the table's rates
drive the roofline, and a bad table is one clear error."""
from __future__ import annotations

import json

import pytest

import tailor
from tailor.backends import backend_for
from tailor.cli.main import main
from tailor.core.errors import TailorError
from tailor.core.targets import Target, get_target
from tailor.passes.cost import CostModel, Structure, Workload
from tailor.rewriter.capture import capture


def _table(path, rows, flops_per_s=1e11, bytes_per_s=1e10):
    path.write_text(json.dumps({"kind": "tailor-target", "version": 1, "name": "t", "bytes_per_element": 4,
                                "flops_per_s": flops_per_s, "bytes_per_s": bytes_per_s, "matmul": rows}))
    return path


def test_rates_interpolate_in_log_space_and_clamp(tmp_path):
    t = get_target(str(_table(tmp_path / "t.json", [[1e6, 1e9], [1e8, 1e11], [1e6, 4e9]])))
    (small, small_rate), (big, big_rate) = t.matmul_rates
    assert (small, big) == (1e6, 1e8) and big_rate == pytest.approx(1e11)
    assert small_rate == pytest.approx(2e9)  # one size measured twice: the geometric mean
    assert t.compute_seconds(1e6) == pytest.approx(1e6 / 2e9)
    assert t.compute_seconds(1e10) == pytest.approx(1e10 / 1e11)          # clamped at the top
    mid = 1e7 / t.compute_seconds(1e7)                                     # halfway in log space
    assert mid == pytest.approx((2e9 * 1e11) ** 0.5, rel=1e-6)
    dip = get_target(str(_table(tmp_path / "dip.json", [[1e6, 5e9], [1e7, 1e9], [1e8, 8e9]])))
    assert [r for _, r in dip.matmul_rates] == pytest.approx([5e9, 5e9, 8e9])  # a slower larger one: noise


def test_small_products_cost_more_per_flop_under_a_measured_table(tiny_models):
    """Products too small to reach the peak: a table that says so makes a plan that removes small
    matrices save less than the peak roofline predicts."""
    graph = capture(tiny_models["llama"]).graph
    peak = Target("peak", 1e11, 1e13, 4)
    slow_small = Target("slow", 1e11, 1e13, 4, matmul_rates=((1e3, 1e9), (1e9, 1e11)))
    ratios = []
    for target in (peak, slow_small):
        cm = CostModel(graph, Workload(1, 64, 0), target)
        s = Structure.dense(graph)
        for layer in s.layers:
            layer.ffn = False
        ratios.append(cm.ratio(s, "latency"))
    assert ratios[0] != pytest.approx(ratios[1])


@pytest.mark.parametrize("content,match", [
    ("{", "not a readable target table"),
    ('{"kind": "other"}', "not a target table"),
    ('{"kind": "tailor-target", "name": "t"}', "malformed"),
    ('{"kind": "tailor-target", "name": "t", "flops_per_s": 1, "bytes_per_s": 1, "bytes_per_element": 4, '
     '"matmul": [[1e6, -5]]}', "positive and finite"),
    ('{"kind": "tailor-target", "name": "t", "flops_per_s": 1, "bytes_per_s": 1, "bytes_per_element": 4, '
     '"matmul": []}', "positive and finite"),
])
def test_bad_tables_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TailorError, match=match):
        get_target(str(path))
    with pytest.raises(TailorError, match="no such file|not a readable"):
        get_target(str(tmp_path / "missing.json"))


def test_calibrate_target_writes_a_table_the_cost_model_loads(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["calibrate-target", "-o", str(out), "--threads", "1"]) == 0
    target = get_target(str(out))
    assert target.flops_per_s > 1e8 and target.bytes_per_s > 1e8 and len(target.matmul_rates) >= 5
    assert "GFLOP/s" in capsys.readouterr().out
    assert main(["calibrate-target", "-o", str(tmp_path / "cpu.txt")]) == 2
    assert main(["calibrate-target", "-o", str(tmp_path / "nodir" / "cpu.json")]) == 2


def test_a_measured_table_fits_the_cost_model_to_the_model_timed_here(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cpu.json"
    assert main(["calibrate-target", "-o", str(out), "--threads", "1"]) == 0
    c = tailor.compile(tiny_models["llama"], budget=0.7, target=str(out), prompt_len=64, calib_windows=4,
                       calib_len=32, passes=["layer_skip", "ffn_prune"])
    fitted = c.report["cost_model"]
    assert sorted(fitted["measured_ratios"]) == ["ffn_half", "heads_half"]
    assert all(0 < r < 1.5 for r in fitted["measured_ratios"].values())
    assert all(1.0 <= k <= 100 for k in fitted["scales"].values())
    assert c.plan.predicted["latency"] <= 0.7 + 1e-9
    # the measured ratio is cached: compiling again prices (and so plans) the same
    again = tailor.compile(tiny_models["llama"], budget=0.7, target=str(out), prompt_len=64, calib_windows=4,
                           calib_len=32, passes=["layer_skip", "ffn_prune"])
    assert again.report["cost_model"] == fitted and again.plan.rewrites == c.plan.rewrites
    timed = c.report["measured_latency"]  # and the result timed here, beside the original
    assert timed["original_ms"] > 0
    assert timed["ratio"] == pytest.approx(timed["rewritten_ms"] / timed["original_ms"])
    # a built-in target has nominal, not measured, seconds: nothing to fit
    nominal = tailor.compile(tiny_models["llama"], budget=0.7, target="cpu", prompt_len=64, calib_windows=4,
                             calib_len=32, passes=["layer_skip"])
    assert nominal.report["cost_model"]["measured_ratios"] == {}


def test_a_fit_that_cannot_build_its_variant_is_skipped_and_said(tiny_models, tmp_path, monkeypatch):
    import tailor.stages.cost

    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    table = tmp_path / "cpu.json"
    table.write_text(json.dumps({"kind": "tailor-target", "name": "t", "flops_per_s": 1e11,
                                 "bytes_per_s": 2e10, "bytes_per_element": 4,
                                 "matmul": [[1e6, 1e10], [1e9, 1e11]]}))

    def unbuildable(*args, **kwargs):
        raise TailorError("no residual Add consumes x")

    monkeypatch.setattr(tailor.stages.cost, "apply_options", unbuildable)
    cap = capture(tiny_models["llama"])
    cm = tailor.stages.cost.cost_model_for(cap, backend_for(cap), Workload(1, 32, 0), str(table))
    assert set(cm.scales.values()) == {1.0} and "no residual Add" in cm.to_json()["fit_skipped"]


def test_a_variant_that_cannot_be_built_is_left_out_and_the_others_fit(tiny_models, tmp_path, monkeypatch):
    """One unbuildable variant (an ONNX decoder with a KV cache cannot take patterns) once left
    the whole fit out, and the refllama int4 builder decoder's plan measured 0.620 for a
    predicted 0.494; now the variants that build are fitted and the report names the one left out."""
    import tailor.stages.cost

    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    table = tmp_path / "cpu.json"
    table.write_text(json.dumps({"kind": "tailor-target", "name": "t", "flops_per_s": 1e11,
                                 "bytes_per_s": 2e10, "bytes_per_element": 4,
                                 "matmul": [[1e6, 1e10], [1e9, 1e11]]}))
    build = tailor.stages.cost.apply_options

    def no_ffn_slices(backend, options, signals):
        if any(o.pass_name == "ffn_prune" for o in options):
            raise TailorError("no FFN here can be sliced")
        return build(backend, options, signals)

    monkeypatch.setattr(tailor.stages.cost, "apply_options", no_ffn_slices)
    cap = capture(tiny_models["llama"])
    cm = tailor.stages.cost.cost_model_for(cap, backend_for(cap), Workload(1, 32, 0), str(table))
    said = cm.to_json()
    assert "fit_skipped" not in said and set(said["fit_left_out"]) == {"ffn_half"}
    assert set(cm.measured_ratios) == {"heads_half"} and 0 < cm.measured_ratios["heads_half"] < 10
    # cached as fitted: the same model again reads the cache, the variant still left out
    again = tailor.stages.cost.cost_model_for(cap, backend_for(cap), Workload(1, 32, 0), str(table))
    assert again.measured_ratios == cm.measured_ratios and again.fit_left_out == cm.fit_left_out
