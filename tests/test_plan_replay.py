"""optimize --plan: a saved plan replays on the model it was made for, and only there; every
rewrite of an untrusted plan is checked against the model before anything is applied."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tailor
from tailor.cli.main import optimize_main
from tailor.core.errors import TailorError
from tailor.passes.registry import options_from_plan
from tailor.rewriter.capture import capture
from tests.conftest import ids_for
from tests.test_cli_errors import _fails

SMALL = ["--calib-windows", "4", "--calib-len", "32", "--prompt-len", "64"]


@pytest.fixture(scope="module")
def searched(tiny_hf_dirs, tmp_path_factory):
    """An artifact of the tiny Llama at budget 0.6 (searched), with its plan."""
    out = tmp_path_factory.mktemp("searched") / "art"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TAILOR_CACHE", str(out.parent / "cache"))
        assert optimize_main([str(tiny_hf_dirs["llama"]), "--budget", "0.6", "-o", str(out), *SMALL]) == 0
    return out


def test_replayed_plan_reproduces_the_searched_model(searched, tiny_hf_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "replayed"
    assert optimize_main([str(tiny_hf_dirs["llama"]), "--plan", str(searched / "plan.json"), "-o", str(out),
                          *SMALL]) == 0
    a, b = json.loads((searched / "plan.json").read_text()), json.loads((out / "plan.json").read_text())
    assert a["rewrites"] and [(r["pass"], r["layer"], r["choice"]) for r in a["rewrites"]] == \
        [(r["pass"], r["layer"], r["choice"]) for r in b["rewrites"]]
    assert b["predicted"]["latency"] == pytest.approx(a["predicted"]["latency"])
    ids = ids_for()
    with torch.no_grad():
        want = tailor.load(searched).model(ids).float().numpy()
        got = tailor.load(out).model(ids).float().numpy()
    # same calibration windows, same compensation fit: the same model
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_plan_of_another_model_refused(searched, tiny_hf_dirs, tmp_path, capsys):
    _fails([str(tiny_hf_dirs["qwen2"]), "--plan", str(searched / "plan.json"), "-o", str(tmp_path / "o")],
           capsys, expect="made for another model")
    assert not (tmp_path / "o").exists()


def _plan_with(searched, tmp_path, rewrites) -> str:
    plan = json.loads((searched / "plan.json").read_text())
    plan["rewrites"] = rewrites
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(plan))
    return str(path)


@pytest.mark.parametrize("rewrites, expect", [
    ([{"pass": "layer_skip", "layer": 7, "choice": {}}], "layers 0..2"),
    ([{"pass": "warp_drive", "layer": 0, "choice": {}}], "unknown pass"),
    ([{"pass": "ffn_prune", "layer": 0, "choice": {"channels": [5, 3]}}], "ascending"),
    ([{"pass": "ffn_prune", "layer": 0, "choice": {"channels": list(range(96))}}], "between 1 and 95"),
    ([{"pass": "head_prune", "layer": 1, "choice": {"kv_heads": [0], "queries": [[0], [1]]}}],
     "one list of query heads per kept KV head"),
    ([{"pass": "kv_share", "layer": 1, "choice": {"source": 2}}], "earlier layer"),
    ([{"pass": "attn_pattern", "layer": 0, "choice": {"spans": [[4, -1, 0], None]}}], "alpha ≥ 1"),
    ([{"pass": "layer_skip", "layer": 1, "choice": {}}, {"pass": "ffn_skip", "layer": 1, "choice": {}}],
     "conflicts with rewrite 0"),
    ([{"pass": "layer_skip", "layer": 1, "choice": {"extra": 1}}], "exactly the keys"),
    # a JSON boolean is not layer 1 (it slipped past the conflict check: the claim "attn:True")
    ([{"pass": "head_prune", "layer": True, "choice": {"kv_heads": [1], "queries": [[0]]}},
      {"pass": "kv_share", "layer": 2, "choice": {"source": 1}}], "layer must be a whole number"),
])
def test_bad_rewrites_refused(searched, tiny_hf_dirs, tmp_path, capsys, rewrites, expect):
    _fails([str(tiny_hf_dirs["llama"]), "--plan", _plan_with(searched, tmp_path, rewrites),
            "-o", str(tmp_path / "o")], capsys, expect=expect)
    assert not (tmp_path / "o").exists()


def test_every_candidate_round_trips_through_a_plan(tiny_models):
    """What the search can choose, a plan can name: each candidate of each pass is accepted
    back by its pass's from_plan check, claims and all."""
    from tailor.passes.attention_profile import AttentionInfluence
    from tailor.passes.attn_pattern import default_grid
    from tailor.passes.profile import neutral_signals
    from tailor.passes.registry import PASSES, candidates_for

    for name in ("llama", "gpt2", "bert"):
        graph = capture(tiny_models[name]).graph
        signals = neutral_signals(graph)
        signals.attention = AttentionInfluence.unmeasured(graph, [32, 64], default_grid(64))
        options = candidates_for(graph, signals, list(PASSES))
        assert {o.pass_name for o in options} >= {"layer_skip", "attn_pattern"}
        for o in options:
            back = options_from_plan(graph, [o.to_json()])[0]
            assert (back.key, back.claims) == (o.key, o.claims)
        with pytest.raises(TailorError, match="layers 0..2"):
            options_from_plan(graph, [{"pass": "layer_skip", "layer": 3, "choice": {}}])


def test_replay_honours_refit_cache_and_progress(searched, tiny_hf_dirs, tmp_path, monkeypatch, capsys):
    """A replayed plan runs the same stages as a search: refit only if asked, the profile cache
    (signals) unless told not to, progress bars when asked."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    model, kw = str(tiny_hf_dirs["llama"]), dict(plan=searched / "plan.json", calib_windows=4, calib_len=32)
    assert "refit" not in tailor.compile(model, refit=False, **kw).report
    shown = tailor.compile(model, progress=True, **kw)
    assert "refit" in shown.report and "refitting in sequence" in capsys.readouterr().err
    assert shown.report["calibration"]["cached"] is True     # the first replay stored the signals
    assert tailor.compile(model, use_cache=False, **kw).report["calibration"]["cached"] is False


def test_plan_patterns_refused_where_the_layer_cannot_run_them(tiny_onnx):
    """The graph alone cannot tell whether a layer runs patterns (a fused attention op cannot):
    the backend is asked before anything is applied."""
    import copy

    from tailor.backends.onnx_backend import OnnxBackend

    co = capture(tiny_onnx["llama"])
    graph, block = copy.copy(co.graph), copy.copy(co.graph.blocks[1])
    block.attn = copy.copy(block.attn)
    block.attn.kind = "sdpa"   # as one fused attention op is recognised
    graph.blocks = [b if b.index != 1 else block for b in co.graph.blocks]
    rewrite = {"pass": "attn_pattern", "layer": 1,
               "choice": {"spans": [[4, 8.0, 0.0]] * graph.blocks[1].attn.num_kv_heads}}
    assert options_from_plan(graph, [rewrite])
    with pytest.raises(TailorError, match="layer 1.*cannot run per-head patterns"):
        options_from_plan(graph, [rewrite], "plan", OnnxBackend(co.source.model, graph))
