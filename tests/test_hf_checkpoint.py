"""--format hf and --hf-compatible: a standard transformers checkpoint that loads where tailor is
not installed, refused for plans a standard config cannot say; a search restricted to plans it
can say, whose cost against the unrestricted plan the report states."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers

import tailor
from tailor.backends.hf_checkpoint import HF_DIR, StandardShape, architecture, standard_config
from tailor.cli.main import optimize_main
from tailor.core.plan import Plan
from tailor.passes.base import Option
from tailor.passes.search import REMOVED, Uniform, solve
from tailor.passes.standard import sliding_window, unsayable
from tailor.rewriter.capture import capture
from tests.conftest import ids_for
from tests.test_cli_errors import _fails
from tests.test_plan_replay import _plan_with

SMALL = ["--calib-windows", "4", "--calib-len", "32", "--prompt-len", "64"]
RESTRICTED = {"layer_skip", "ffn_prune", "head_prune"}

# runs in a fresh interpreter: transformers alone, as a server (vLLM, SGLang, TGI) would load it
WITHOUT_TAILOR = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from transformers import AutoModelForCausalLM
    folder, ids_file, out = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.from_numpy(np.load(ids_file))
    with torch.no_grad():
        logits = model(ids).logits.numpy()
        tokens = model.generate(ids[:1], max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert "tailor" not in sys.modules, "tailor was imported"
    np.save(out + ".npy", logits)
    result = {"tokens": tokens[0, ids.shape[1]:].tolist(), "modules": sorted(sys.modules)}
    json.dump(result, open(out + ".json", "w"))
""")


def _without_tailor(folder, ids: torch.Tensor, tmp_path) -> tuple[np.ndarray, list[int]]:
    script, ids_file, out = tmp_path / "load.py", tmp_path / "ids.npy", tmp_path / "result"
    script.write_text(WITHOUT_TAILOR)
    np.save(ids_file, ids.numpy())
    # the repository is not on the child's path: `import tailor` there would fail
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(script), str(folder), str(ids_file), str(out)], check=True,
                   cwd=tmp_path, env=env, timeout=120)
    result = json.loads((tmp_path / "result.json").read_text())
    assert not any(m == "tailor" or m.startswith("tailor.") for m in result["modules"])
    return np.load(tmp_path / "result.npy"), result["tokens"]


@pytest.fixture(scope="module")
def restricted(tiny_hf_dirs, tmp_path_factory):
    """The tiny Llama searched at budget 0.6 with --hf-compatible."""
    out = tmp_path_factory.mktemp("restricted") / "art"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TAILOR_CACHE", str(out.parent / "cache"))
        assert optimize_main([str(tiny_hf_dirs["llama"]), "--budget", "0.6", "-o", str(out),
                              "--hf-compatible", *SMALL]) == 0
    return out


def _ffn(layer: int, keep: int) -> dict:
    return {"pass": "ffn_prune", "layer": layer, "choice": {"channels": list(range(0, 2 * keep, 2))}}


def _heads(layer: int) -> dict:
    return {"pass": "head_prune", "layer": layer, "choice": {"kv_heads": [1], "queries": [[0, 1]]}}


@pytest.mark.slow  # ~20 s: a child interpreter imports torch and transformers
def test_standard_checkpoint_loads_and_matches_without_tailor(restricted, tiny_hf_dirs, tmp_path,
                                                              monkeypatch):
    # every rewrite a standard config can say, on a plan given rather than searched
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    rewrites = [{"pass": "layer_skip", "layer": 1, "choice": {}},
                _ffn(0, 48), _ffn(2, 48), _heads(0), _heads(2)]
    out = tmp_path / "art"
    assert optimize_main([str(tiny_hf_dirs["llama"]), "--plan", _plan_with(restricted, tmp_path, rewrites),
                     "-o", str(out), "--format", "hf", *SMALL]) == 0
    config = json.loads((out / HF_DIR / "config.json").read_text())
    assert (config["architectures"], config["num_hidden_layers"], config["intermediate_size"]) == \
        (["LlamaForCausalLM"], 2, 48)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 16)
    assert (out / HF_DIR / "generation_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # hf alone: tailor.load reads hf/
    compiled = tailor.load(out)
    ids = ids_for()
    with torch.no_grad():
        want = compiled.model(ids).float().numpy()
    got, tokens = _without_tailor(out / HF_DIR, ids, tmp_path)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert tokens == compiled.generate(ids[:1].tolist(), max_new_tokens=8)[0]
    # the rewritten model tailor keeps beside it is the same function
    report = json.loads((out / "report.json").read_text())
    assert report["hf_checkpoint"]["kept_layers"] == [0, 2]
    assert all(c["ok"] for c in report["validation"]) and any(c["name"].startswith("hf_") for c in
                                                              report["validation"])


def _window(layer: int, window: int, kv_heads: int = 2) -> dict:
    """Every KV head of the layer on one sliding window without sinks."""
    return {"pass": "attn_pattern", "layer": layer, "choice": {"spans": [[0, window, 0.0]] * kv_heads}}


@pytest.mark.slow  # ~20 s: a child interpreter imports torch and transformers
def test_sliding_windows_load_without_tailor_where_the_config_lists_layer_kinds(tiny_hf_dirs, tmp_path,
                                                                                monkeypatch):
    """Qwen2's config lists each layer's kind: layers whose KV heads all slide by one window
    become `sliding_attention` layers, and transformers alone computes what tailor's rewritten
    model does (the CLI's validation compares them too)."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    folder = tiny_hf_dirs["qwen2"]
    plan = Plan(capture(folder).model_hash, 0.7, "kv_memory", {"batch": 1, "prompt_len": 64, "gen_len": 0},
                "cpu", [_window(0, 4), _window(2, 4)])
    (tmp_path / "plan.json").write_text(plan.dumps())
    out = tmp_path / "art"
    assert optimize_main([str(folder), "--plan", str(tmp_path / "plan.json"), "-o", str(out),
                          "--format", "safetensors,hf", *SMALL]) == 0
    config = json.loads((out / HF_DIR / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert (config["sliding_window"], config["use_sliding_window"]) == (4, True)
    report = json.loads((out / "report.json").read_text())
    assert all(c["ok"] for c in report["validation"]) and any(c["name"].startswith("hf_") for c in
                                                              report["validation"])
    written = report["hf_checkpoint"]
    assert (written["sliding_window"], written["sliding_layers"]) == (4, [0, 2])
    ids = ids_for()  # 12 tokens: the windows of 4 cut keys
    with torch.no_grad():
        ours = tailor.load(out).model(ids).float().numpy()   # tailor's runtime, from model.safetensors
        dense = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits.numpy()
    got, _ = _without_tailor(out / HF_DIR, ids, tmp_path)
    np.testing.assert_allclose(got, ours, atol=1e-5, rtol=1e-5)
    assert np.abs(got - dense).max() > 1e-3  # the windows changed the model


def test_hf_compatible_search_offers_one_sliding_window_where_the_config_can_say_it(tiny_hf_dirs, tmp_path,
                                                                                    monkeypatch):
    """Searched with --hf-compatible for KV memory, Qwen2 (whose config cannot say pruning's
    biases) reaches the budget with sliding windows: one window, on whole layers, no sinks."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "art"
    assert optimize_main([str(tiny_hf_dirs["qwen2"]), "--budget", "0.7", "--objective", "kv_memory",
                          "--hf-compatible", "-o", str(out), *SMALL]) == 0
    plan = json.loads((out / "plan.json").read_text())
    windows = {tuple(map(tuple, r["choice"]["spans"])) for r in plan["rewrites"]
               if r["pass"] == "attn_pattern"}
    assert len(windows) == 1 and plan["predicted"]["kv_memory"] <= 0.7 + 1e-9
    (spans,) = windows
    assert len(set(spans)) == 1 and spans[0][0] == 0 and spans[0][2] == 0
    config = json.loads((out / HF_DIR / "config.json").read_text())
    sliding = [r["layer"] for r in plan["rewrites"] if r["pass"] == "attn_pattern"]
    assert config["sliding_window"] == spans[0][1] and \
        [i for i, t in enumerate(config["layer_types"]) if t == "sliding_attention"] == sliding


def test_unsayable_plan_refused_and_nothing_written(restricted, tiny_hf_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    rewrites = [_ffn(0, 48), _ffn(1, 24), {"pass": "ffn_skip", "layer": 2, "choice": {}}]
    plan = _plan_with(restricted, tmp_path, rewrites)
    out = tmp_path / "o"
    err = _fails([str(tiny_hf_dirs["llama"]), "--plan", plan, "-o", str(out), "--format", "hf", *SMALL],
                 capsys, expect="a standard transformers config cannot say this plan")
    assert "FFN skipped while attention stays on layer 2" in err and "FFN widths differ" in err
    assert "--hf-compatible" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "edited.json"]


def test_hf_compatible_plan_is_sayable_within_budget_and_reports_its_cost(restricted):
    plan = json.loads((restricted / "plan.json").read_text())
    assert plan["rewrites"] and {r["pass"] for r in plan["rewrites"]} <= RESTRICTED
    assert plan["predicted"]["latency"] <= 0.6 + 1e-9
    kept = {r["layer"] for r in plan["rewrites"] if r["pass"] != "layer_skip"} - \
        {r["layer"] for r in plan["rewrites"] if r["pass"] == "layer_skip"}
    widths = {len(r["choice"]["channels"]) for r in plan["rewrites"] if r["pass"] == "ffn_prune"}
    assert len(widths) <= 1 and (not widths or kept <= {r["layer"] for r in plan["rewrites"]
                                                       if r["pass"] == "ffn_prune"})
    report = json.loads((restricted / "report.json").read_text())
    cost = report["hf_compatible"]
    assert cost["measured_kl_heldout"] >= 0 and cost["unrestricted_measured_kl_heldout"] >= 0
    assert cost["unrestricted_plan"] and "before the sequential refit" in cost["measured"]
    assert report["hf_checkpoint"]["layers"] == 3 - sum(r["pass"] == "layer_skip" for r in plan["rewrites"])
    # --hf-compatible adds hf to the default safetensors
    assert (restricted / HF_DIR / "model.safetensors").is_file()
    assert (restricted / "model.safetensors").is_file()


def _option(layer: int, width: int | None, cost: float, loss: float) -> Option:
    cost = {"latency": cost}
    if width is None:
        return Option("layer_skip", layer, {}, (f"ffn:{layer}", f"layer:{layer}"), cost, loss)
    return Option("ffn_prune", layer, {"channels": list(range(width))}, (f"ffn:{layer}",), cost, loss)


def test_uniform_width_is_a_joint_constraint():
    # alone, layer 0 is best at width 4 and layer 1 at width 2; one width for both: 4
    options = [_option(0, 4, -0.3, 0.1), _option(0, 2, -0.5, 5.0), _option(1, 4, -0.3, 1.0),
               _option(1, 2, -0.5, 0.1)]
    losses = np.array([o.loss for o in options])

    def chosen(result):
        return None if result is None else {(o.pass_name, o.layer, width(o)) for o in result}

    def width(o):
        return REMOVED if o.pass_name == "layer_skip" else len(o.choice["channels"])

    assert chosen(solve(options, losses, "latency", -0.6, 1.0)) == {("ffn_prune", 0, 4), ("ffn_prune", 1, 2)}
    assert chosen(solve(options, losses, "latency", -0.6, 1.0, (Uniform("FFN width", width, 2),))) == \
        {("ffn_prune", 0, 4), ("ffn_prune", 1, 4)}
    # a third layer with no width option keeps its own: no other width is possible, nor the budget
    assert solve(options, losses, "latency", -0.6, 1.0, (Uniform("FFN width", width, 3),)) is None
    # ... unless it is removed
    skip = _option(2, None, -0.1, 0.5)
    assert chosen(solve(options + [skip], np.append(losses, 0.5), "latency", -0.6, 1.0,
                        (Uniform("FFN width", width, 3),))) == \
        {("ffn_prune", 0, 4), ("ffn_prune", 1, 4), ("layer_skip", 2, REMOVED)}


def test_one_sliding_window_joins_the_layers_that_slide_and_leaves_the_others_full():
    def window(layer: int, w: int, cost: float, loss: float) -> Option:
        return Option("attn_pattern", layer, {"spans": [[0, w, 0.0]] * 2}, (f"attn:{layer}",),
                      {"latency": cost}, loss)

    options = [window(0, 4, -0.3, 0.1), window(0, 8, -0.2, 0.3),
               window(1, 4, -0.3, 1.0), window(1, 8, -0.2, 0.1)]
    losses = np.array([o.loss for o in options])
    one = (Uniform("sliding window", sliding_window, 2, every_layer=False),)

    def chosen(result):
        return sorted((o.layer, o.choice["spans"][0][1]) for o in result)

    assert chosen(solve(options, losses, "latency", -0.4, 1.0)) == [(0, 4), (1, 8)]
    assert chosen(solve(options, losses, "latency", -0.4, 1.0, one)) == [(0, 8), (1, 8)]
    # a layer may stay full: one window on layer 0 alone
    assert chosen(solve(options, losses, "latency", -0.3, 1.0, one)) == [(0, 4)]
    every = (Uniform("sliding window", sliding_window, 2),)
    assert chosen(solve(options, losses, "latency", -0.3, 1.0, every)) == [(0, 8), (1, 8)]


def test_what_each_architecture_can_say(tiny_models):
    llama, qwen2 = architecture(tiny_models["llama"]), architecture(tiny_models["qwen2"])
    assert (llama.out_bias, llama.down_bias, llama.widths) == (True, True, True)
    # Qwen2's o_proj has no bias whatever the config says, and its MLP none either
    assert (qwen2.out_bias, qwen2.down_bias) == (False, False)
    heads = Option("head_prune", 0, {"kv_heads": [0], "queries": [[0, 1]]}, ("attn:0",))
    assert unsayable(heads, llama) is None and "Qwen2ForCausalLM config cannot say" in unsayable(heads, qwen2)
    assert unsayable(Option("head_prune", 0, {"kv_heads": [], "queries": []}, ("attn:0",)), llama) == \
        "attention dropped while the FFN stays"
    # a layer's kind says a sliding window where it changes only the mask (Qwen2's), not in Llama's
    # config (no kinds) nor Mistral's (its window applies to every layer whatever the kind)
    window = Option("attn_pattern", 1, {"spans": [[0, 4, 0.0]] * 2}, ("attn:1",))
    mistral = architecture(tiny_models["mistral"])
    assert (llama.sliding, qwen2.sliding, mistral.sliding) == (False, True, False)
    assert unsayable(window, qwen2) is None and "no per-layer sliding window" in unsayable(window, llama)
    sink = Option("attn_pattern", 1, {"spans": [[2, 4, 0.0]] * 2}, ("attn:1",))
    assert "has no sink" in unsayable(sink, qwen2)
    slides = copy.deepcopy(tiny_models["qwen2"])  # layers 1 and 2 slide already, by 8
    slides.config.layer_types = ["full_attention", "sliding_attention", "sliding_attention"]
    slides.config.sliding_window = 8
    arch = architecture(slides)
    assert (arch.slides, arch.sliding_window) == ((1, 2), 8)
    assert unsayable(window, arch) == "attention patterns on a layer that slides already"
    other = Option("attn_pattern", 0, {"spans": [[0, 4, 0.0]] * 2}, ("attn:0",))
    assert "the model's sliding layers have 8" in unsayable(other, arch)


def test_max_window_layers_says_sliding_layers_where_they_are_the_last(tiny_models):
    """Loaders older than `layer_types` slide the layers from `max_window_layers` on: set where
    the plan's sliding layers are those, left where only `layer_types` can say them."""
    qwen2 = tiny_models["qwen2"]  # 3 layers

    def config(sliding):
        return standard_config(qwen2, StandardShape((0, 1, 2), 96, 2, 4, 16, False, False, 4, sliding))

    last = config((1, 2))
    assert last.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert (last.max_window_layers, last.sliding_window, last.use_sliding_window) == (1, 4, True)
    first = config((0,))
    assert first.layer_types[0] == "sliding_attention"
    assert first.max_window_layers == qwen2.config.max_window_layers


def test_hf_requests_refused(restricted, tiny_hf_dirs, tiny_onnx, tmp_path, capsys):
    _fails([str(tiny_hf_dirs["llama"]), "--plan", str(restricted / "plan.json"), "--hf-compatible",
            "-o", str(tmp_path / "a")], capsys, expect="a replayed plan is not searched")
    _fails([str(tiny_onnx["llama"]), "--format", "hf", "-o", str(tmp_path / "b")], capsys,
           expect="ONNX input can only produce an ONNX artifact")
    _fails([str(tiny_onnx["llama"]), "--hf-compatible", "--budget", "0.6", "-o", str(tmp_path / "c")], capsys,
           expect="it needs a transformers model")
    _fails([str(tiny_hf_dirs["bert"]), "--format", "hf", "-o", str(tmp_path / "d")], capsys,
           expect="format hf writes causal LMs")
    assert list(tmp_path.iterdir()) == []
