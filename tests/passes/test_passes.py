"""Each pass against its reference behaviour on tiny models: exact where the math says so."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tailor
from tailor.backends import backend_for
from tailor.passes.base import Option
from tailor.passes.profile import (
    KEY_ROWS,
    MIN_MEASURED_PER_PASS,
    OptionMeter,
    SignalSums,
    collect_signals,
    load_cached,
    neutral_signals,
    store,
)
from tailor.passes.registry import apply_options
from tailor.rewriter.capture import capture
from tests.conftest import REFLLAMA, build_model, ids_for


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _calib_ids():
    return ids_for(batch=4, seq=32, seed=5)


def _apply(model, options):
    dense = backend_for(capture(model))
    signals = collect_signals(dense, _calib_ids())
    return apply_options(dense.clone(), options, signals).model


def test_a_bfloat16_model_gives_finite_signals_that_rank_like_its_float32_self():
    """The profile on a bf16 model: statistics in float64, grams kept as float32, the same head
    and channel importances as the float32 model with the same (rounded) weights, up to the
    activations' rounding."""
    bf16 = build_model("llama").to(torch.bfloat16)
    ids = _calib_ids()
    s16 = collect_signals(backend_for(capture(bf16)), ids)
    s32 = collect_signals(backend_for(capture(copy.deepcopy(bf16).float())), ids)
    for field in ("block_influence", "ffn_contribution", "ffn_mean", "attn_mean", "kv_similarity",
                  "o_importance", "down_importance"):
        assert np.isfinite(np.asarray(getattr(s16, field))).all(), field
    for a, b in zip(s16.o_gram + s16.down_gram, s32.o_gram + s32.down_gram):
        assert a.dtype == np.float32 and np.isfinite(a).all()
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
    assert s16.o_importance == s32.o_importance
    for a, b in zip(s16.down_importance, s32.down_importance):  # ranks 0..95: their correlation
        assert np.corrcoef(a, b)[0, 1] > 0.99
    rewritten = apply_options(backend_for(capture(bf16)).clone(),
                              [Option("ffn_prune", 0, {"channels": list(range(0, 96, 2))}, ())], s16)
    assert torch.isfinite(_out(rewritten.model, ids).float()).all()


def test_key_similarity_compares_the_same_subsampled_tokens_in_every_layer():
    sums = SignalSums(2)
    keys = torch.randn(2, 16, 1000, 8)  # more rows than KEY_ROWS: subsampled
    sums.key(0, keys[0])
    sums.key(1, keys[0] + 0.1 * keys[1])
    assert sums.keys[0].shape == (KEY_ROWS, 8) and sums.keys[0].dtype == torch.float64
    kept = torch.linspace(0, 15999, KEY_ROWS, dtype=torch.float64).long()
    assert torch.equal(sums.keys[1], (keys[0] + 0.1 * keys[1]).flatten(0, 1)[kept].double())
    full = torch.cosine_similarity(keys[0].flatten(0, 1), (keys[0] + 0.1 * keys[1]).flatten(0, 1), dim=-1)
    sub = torch.cosine_similarity(sums.keys[0], sums.keys[1], dim=-1)
    assert abs(float(sub.mean()) - float(full.mean())) < 0.01


def test_skipping_an_identity_block_changes_nothing():
    model = build_model("llama")
    with torch.no_grad():  # block 1 adds nothing to the residual stream
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ids = ids_for()
    rewritten = _apply(model, [Option("layer_skip", 1, {}, ())])
    assert len(rewritten.model.layers) == 2 and rewritten.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in rewritten.model.layers] == [0, 1]
    assert (_out(rewritten, ids) - _out(model, ids)).abs().max() <= 1e-5


def test_pruning_zeroed_heads_changes_nothing():
    model = build_model("llama")  # 4 query heads in 2 KV groups, head_dim 16
    with torch.no_grad():  # the second query head of each group writes nothing through o_proj
        w = model.model.layers[0].self_attn.o_proj.weight
        w[:, 16:32] = 0
        w[:, 48:64] = 0
    ids = ids_for()
    rewritten = _apply(model, [Option("head_prune", 0, {"kv_heads": [0, 1], "queries": [[0], [0]]}, ())])
    attn = rewritten.model.layers[0].self_attn
    assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 32
    assert attn.num_key_value_groups == 1
    assert (_out(rewritten, ids) - _out(model, ids)).abs().max() <= 1e-4
    with pytest.raises(tailor.TailorError, match="same number of query heads"):
        _apply(model, [Option("head_prune", 0, {"kv_heads": [0, 1], "queries": [[0], [0, 1]]}, ())])


def test_pruning_a_whole_zeroed_group_is_exact():
    model = build_model("llama")
    with torch.no_grad():  # KV group 1 = query heads 2, 3: they write nothing
        model.model.layers[2].self_attn.o_proj.weight[:, 32:64] = 0
    ids = ids_for()
    rewritten = _apply(model, [Option("head_prune", 2, {"kv_heads": [0], "queries": [[0, 1]]}, ())])
    assert rewritten.model.layers[2].self_attn.k_proj.out_features == 16
    assert (_out(rewritten, ids) - _out(model, ids)).abs().max() <= 1e-4


def test_compensation_is_exact_for_a_constant_head_output():
    """Qwen2 has v biases: with zero v weights a KV group's heads output their v bias whatever
    they attend to; pruning them moves that constant into the o_proj bias, exactly."""
    model = build_model("qwen2")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[16:32] = 0  # KV group 1's values
    ids = ids_for()
    rewritten = _apply(model, [Option("head_prune", 1, {"kv_heads": [0], "queries": [[0, 1]]}, ())])
    assert rewritten.model.layers[1].self_attn.o_proj.bias is not None
    assert (_out(rewritten, ids) - _out(model, ids)).abs().max() <= 1e-4


def test_pruning_dead_ffn_channels_is_exact():
    model = build_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 48:] = 0  # channels 48.. write nothing
    ids = ids_for()
    rewritten = _apply(model, [Option("ffn_prune", 0, {"channels": list(range(48))}, ())])
    assert rewritten.model.layers[0].mlp.down_proj.in_features == 48
    assert (_out(rewritten, ids) - _out(model, ids)).abs().max() <= 1e-4


def test_ffn_skip_keeps_the_mean():
    model = build_model("llama")
    with torch.no_grad():  # an FFN whose output is a constant: its bias
        down = model.model.layers[1].mlp.down_proj
        down.weight.zero_()
        model.model.layers[1].mlp.down_proj = torch.nn.Linear(96, 64, bias=True)
        model.model.layers[1].mlp.down_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.bias.normal_()
    ids = ids_for()
    rewritten = _apply(model, [Option("ffn_skip", 1, {}, ())])
    assert (_out(rewritten, ids) - _out(model, ids)).abs().max() <= 1e-4


def test_compile_smoke_budget_met_and_reload_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    model = build_model("llama")
    kwargs = dict(prompt_len=256, calib_windows=4, calib_len=32, target="h100")
    c = tailor.compile(model, budget=0.6, **kwargs)
    assert c.plan.rewrites and c.plan.predicted["latency"] <= 0.6 + 1e-9
    assert c.report["calibration"]["data"].startswith("data-free") and not c.report["calibration"]["cached"]
    ids = ids_for()
    with torch.no_grad():
        out = c.model(ids)
    assert torch.isfinite(out).all()
    loaded = tailor.load(c.save(tmp_path / "art"))
    with torch.no_grad():
        assert (loaded.model(ids) - out).abs().max() <= 1e-5
    # a second compile at another budget reuses the profile
    c2 = tailor.compile(model, budget=0.8, **kwargs)
    assert c2.report["calibration"]["cached"] and c2.plan.predicted["latency"] <= 0.8 + 1e-9
    # an entry without an option that a newer candidate list offers measures just that one
    (entry,) = (tmp_path / "cache" / "profiles").glob("*.json")
    prof = load_cached(entry.stem)
    dropped = sorted(prof.option_kl)[0]
    measured = prof.option_kl.pop(dropped)
    store(prof)
    c2b = tailor.compile(model, budget=0.8, **kwargs)
    assert c2b.report["calibration"]["cached"]
    assert load_cached(entry.stem).option_kl[dropped] == pytest.approx(measured, rel=1e-6)
    # a corrupted cache entry is detected and recomputed
    for f in (tmp_path / "cache" / "profiles").glob("*.json"):
        f.write_text(f.read_text().replace('"block_influence": [', '"block_influence": [9, ', 1))
    c3 = tailor.compile(model, budget=0.8, **kwargs)
    assert not c3.report["calibration"]["cached"]
    assert [r["label"] for r in c3.plan.rewrites] == [r["label"] for r in c2.plan.rewrites]


def test_options_beyond_the_allowance_are_estimated_and_measured_once_chosen(tmp_path, monkeypatch):
    """With no time for measuring options one by one, each pass measures a few spread over its
    proxy's order and a monotone map estimates the rest; whatever the plan chooses is measured
    before it is kept (and remembered in the profile cache)."""
    from tailor.passes.registry import PASSES

    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("tailor.passes.profile.OPTION_SECONDS", 0)
    model = build_model("llama")
    c = tailor.compile(model, budget=0.6, prompt_len=256, calib_windows=4, calib_len=32, target="h100",
                       refit=False, passes=["layer_skip", "ffn_prune", "head_prune"])
    cal = c.report["calibration"]
    assert cal["options_estimated"] > 0 and cal["options_measured"] >= 3 * MIN_MEASURED_PER_PASS - 6
    assert c.plan.rewrites and c.plan.predicted["latency"] <= 0.6 + 1e-9
    (entry,) = (tmp_path / "cache" / "profiles").glob("*.json")
    prof = load_cached(entry.stem)
    chosen = {Option(r["pass"], r["layer"], r["choice"], ()).key for r in c.plan.rewrites}
    assert chosen <= set(prof.option_kl)               # measured, in the profile or by the search
    graph = backend_for(capture(model)).graph
    for name in ("ffn_prune", "head_prune"):
        options = [o for o in PASSES[name].candidates(graph, prof.signals)]
        measured = [prof.option_kl[o.key] for o in options if o.key in prof.option_kl]
        estimated = [(PASSES[name].proxy(graph, o, prof.signals), prof.option_estimate[o.key])
                     for o in options if o.key in prof.option_estimate]
        assert estimated, name
        # the map passes through measured points: estimates lie within them, ordered as the proxy
        assert all(min(measured) - 1e-12 <= kl <= max(measured) + 1e-12 for _, kl in estimated)
        kls = [kl for _, kl in sorted(estimated)]
        assert all(a <= b + 1e-12 for a, b in zip(kls, kls[1:]))


def test_an_options_work_counts_the_blocks_the_backend_runs(tiny_models, tiny_onnx, monkeypatch):
    """What measuring an option costs the allowance: the blocks from its layer on where the backend
    replays the ones before (a transformers model, here recording every block's output), the
    whole forward where it runs them (ONNX)."""
    monkeypatch.setattr("tailor.backends.torch_backend.REPLAY_EVERY", 1)
    ids = ids_for(batch=2, seq=16)
    for model, replays in ((tiny_models["llama"], True), (tiny_onnx["llama"], False)):
        backend = backend_for(capture(model))
        last_layer = backend.graph.num_layers - 1
        assert backend.replay_start(last_layer) == (last_layer if replays else 0)
        meter = OptionMeter(backend, neutral_signals(backend.graph), ids, progress=False)
        first, last = (Option("layer_skip", i, {}, ()) for i in (0, last_layer))
        assert meter.work(first) == meter.work_from[0]
        assert (meter.work(last) < meter.work(first)) == replays


def test_compiles_with_other_passes_share_one_profile(tmp_path, monkeypatch):
    """The profile cache holds one entry per model and data whatever the passes: a compile with a
    pass the entry lacks measures that pass's options only, into the same entry; one with fewer
    passes measures nothing."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    model = build_model("llama")
    kwargs = dict(prompt_len=256, calib_windows=4, calib_len=32, target="h100", refit=False)
    first = tailor.compile(model, budget=0.7, passes=["layer_skip", "ffn_skip"], **kwargs)
    assert not first.report["calibration"]["cached"]
    (entry,) = (tmp_path / "cache" / "profiles").glob("*.json")
    before = load_cached(entry.stem)
    wider = tailor.compile(model, budget=0.7, passes=["layer_skip", "ffn_skip", "head_prune"], **kwargs)
    assert wider.report["calibration"]["cached"]
    assert [e.stem for e in (tmp_path / "cache" / "profiles").glob("*.json")] == [entry.stem]
    after = load_cached(entry.stem)
    added = set(after.option_kl) - set(before.option_kl)
    assert added and {k.split(":")[0] for k in added} == {"head_prune"}
    assert all(after.option_kl[k] == before.option_kl[k] for k in before.option_kl)  # not measured again
    assert wider.report["calibration"]["options_measured"] == len(added)
    narrower = tailor.compile(model, budget=0.7, passes=["layer_skip"], **kwargs)
    assert narrower.report["calibration"]["cached"]
    assert narrower.report["calibration"]["options_measured"] == 0


def test_passes_selection_and_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    model = build_model("llama")
    kwargs = dict(prompt_len=128, calib_windows=4, calib_len=32)
    c = tailor.compile(model, budget=0.8, passes=["ffn_prune"], **kwargs)
    assert {r["pass"] for r in c.plan.rewrites} == {"ffn_prune"}
    with pytest.raises(tailor.TailorError, match="smallest reachable budget"):
        tailor.compile(model, budget=0.05, passes=["ffn_prune"], **kwargs)
    with pytest.raises(tailor.TailorError, match="unknown pass"):
        tailor.compile(model, budget=0.8, passes=["magic"], **kwargs)
    assert np.isfinite(c.report["search"]["measured_kl_heldout"])


def test_cli_sweep_writes_artifacts_and_plots(tiny_hf_dirs, tmp_path, monkeypatch):
    import json

    from tailor.cli.main import optimize_main

    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    assert optimize_main([str(tiny_hf_dirs["llama"]), "--sweep", "0.9,0.7", "--calib-windows", "4",
                          "--calib-len", "32", "--prompt-len", "128", "-o", str(out)]) == 0
    points = json.loads((out / "sweep.json").read_text())
    tailor_points = {p["budget"]: p for p in points if p["method"] == "tailor"}
    assert set(tailor_points) == {0.9, 0.7}
    assert (out / "pareto.png").stat().st_size > 1000
    for b in ("0.9", "0.7"):
        plan = json.loads((out / f"budget-{b}" / "plan.json").read_text())
        assert plan["budget"] == float(b) and plan["predicted"]["latency"] <= float(b) + 1e-9
        assert (out / f"budget-{b}" / "plan.png").is_file()


@pytest.mark.parametrize("name", ["qwen2", "mistral", "gpt2", "bert"])
def test_every_family_compiles_under_budget(name, tmp_path, monkeypatch):
    """Encoders (post-norm: no FFN skip), fused projections (GPT-2: only whole blocks and FFNs)
    and GQA variants all get a plan that meets the budget, runs, and reloads exactly."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    c = tailor.compile(build_model(name), budget=0.75, prompt_len=128, calib_windows=4, calib_len=32)
    assert c.plan.rewrites and c.plan.predicted["latency"] <= 0.75 + 1e-9
    ids = ids_for()
    with torch.no_grad():
        out = c.model(ids)
        assert torch.isfinite(out).all()
        assert (tailor.load(c.save(tmp_path / "a")).model(ids) - out).abs().max() <= 1e-5
    if name == "bert":
        assert all(r["pass"] != "ffn_skip" for r in c.plan.rewrites)


def test_kv_share_is_exact_when_the_source_computes_the_same_keys():
    """Layer 1 adds nothing and has layer 2's input norm and k/v weights: layer 2 reading layer
    1's keys and values is then exactly what it computed itself."""
    model = build_model("llama")
    with torch.no_grad():
        src, dst = model.model.layers[1], model.model.layers[2]
        src.self_attn.o_proj.weight.zero_()
        src.mlp.down_proj.weight.zero_()
        src.input_layernorm.weight.copy_(dst.input_layernorm.weight)
        src.self_attn.k_proj.weight.copy_(dst.self_attn.k_proj.weight)
        src.self_attn.v_proj.weight.copy_(dst.self_attn.v_proj.weight)
    ids = ids_for()
    rewritten = _apply(model, [Option("kv_share", 2, {"source": 1}, ())])
    assert not hasattr(rewritten.model.layers[2].self_attn, "k_proj")
    assert (_out(rewritten, ids) - _out(model, ids)).abs().max() <= 1e-5
    # a copy of the rewritten model is wired to its own source layer
    twin = copy.deepcopy(rewritten)
    with torch.no_grad():
        twin.model.layers[1].self_attn.k_proj.weight.mul_(2)
    assert (_out(twin, ids) - _out(rewritten, ids)).abs().max() > 1e-4
    assert (_out(rewritten, ids) - _out(model, ids)).abs().max() <= 1e-5


def test_kv_share_saves_kv_memory_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    model = build_model("llama")
    c = tailor.compile(model, budget=0.7, objective="kv_memory", passes=["kv_share"], prompt_len=128,
                       calib_windows=4, calib_len=32)
    assert {r["pass"] for r in c.plan.rewrites} == {"kv_share"}
    assert c.plan.predicted["kv_memory"] <= 0.7 + 1e-9
    ids = ids_for()
    with torch.no_grad():
        assert (tailor.load(c.save(tmp_path / "a")).model(ids) - c.model(ids)).abs().max() <= 1e-5


def test_rewritten_model_exports_to_onnx(tmp_path, monkeypatch):
    """A budgeted torch plan can ship as ONNX: onnxruntime runs the rewritten model, same outputs."""
    from tailor.backends.runners import OrtModel

    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    c = tailor.compile(build_model("qwen2"), budget=0.7, prompt_len=128, calib_windows=4, calib_len=32,
                       passes=["head_prune", "ffn_prune", "kv_share"], formats=("safetensors", "onnx"))
    out = c.save(tmp_path / "a")
    ids = ids_for(batch=1)
    with torch.no_grad():
        expected = c.model(ids).numpy()
    assert np.abs(OrtModel(out / "model.onnx").run_numpy(ids.numpy()) - expected).max() <= 1e-4


def test_encoder_calibration_keeps_special_tokens_per_line():
    """Encoders see [CLS] … [SEP] around every input, [CLS] first: per-line calibration windows
    carry them and begin where an input does."""
    from tailor.cli.default_model import minilm_directory
    from tailor.data.calibration import calibration_from_text
    from tailor.data.text import load_tokenizer

    tok = load_tokenizer(minilm_directory())
    text = "\n".join(f"Sentence number {i} is about calibration data." for i in range(60))
    per_line = calibration_from_text(text, tok, 32, 8, "t", per_line=True)
    whole = calibration_from_text(text, tok, 32, 8, "t")
    assert int((per_line.stream == tok.cls_token_id).sum()) == 60
    assert int((whole.stream == tok.cls_token_id).sum()) == 1
    windows = torch.cat([per_line.profile_ids, per_line.heldout_ids])
    assert len(windows) == 8 and bool((windows[:, 0] == tok.cls_token_id).all())
    assert not bool((torch.cat([whole.profile_ids, whole.heldout_ids])[1:, 0] == tok.cls_token_id).all())
    # no window length given: the lines whole, [CLS] … [SEP] each, about count(median) × median
    # tokens of them, batched by length
    varied = "\n".join(("word " * (3 + i % 7)).strip() for i in range(60))
    lines = calibration_from_text(varied, tok, None, lambda n: 120 // n, "t", per_line=True)
    rows = lines.profile_ids.rows + lines.heldout_ids.rows
    assert all(int(r[0]) == tok.cls_token_id and int(r[-1]) == tok.sep_token_id for r in rows)
    assert len({len(r) for r in rows}) >= 4 and {len(r) for r in rows} <= {5 + k for k in range(7)}
    assert 90 <= lines.profile_ids.numel() + lines.heldout_ids.numel() <= 150
    assert len(lines.heldout_ids) == len(rows) // 4
    for b in lines.profile_ids.batches(4):
        assert b.ndim == 2 and len(b) <= 4


def test_text_read_in_pieces_tokenizes_like_the_whole(tmp_path):
    """A long calibration file is read and tokenized piece by piece (cut at line ends, multi-byte
    characters intact): no text lost or repeated, and one piece is exactly the whole text's
    tokens; bad UTF-8 is named with its byte offset."""
    from tailor.cli.default_model import minilm_directory
    from tailor.core.errors import TailorError
    from tailor.data.text import load_tokenizer, read_text_pieces, tokenize_pieces

    tok = load_tokenizer(REFLLAMA if REFLLAMA.is_dir() else minilm_directory())
    text = "".join(f"def f{i}(x):\n    return x * {i}  # ünïcödé ✓\n\n" for i in range(400))
    path = tmp_path / "calib.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(read_text_pieces(path, piece_bytes=1000))
    assert len(pieces) > 10 and "".join(pieces) == text
    streamed = tokenize_pieces(pieces, tok)
    whole = np.asarray(tok(text)["input_ids"])
    assert tok.decode(streamed, skip_special_tokens=True) == tok.decode(whole, skip_special_tokens=True)
    assert abs(len(streamed) - len(whole)) <= 2 * len(pieces)  # only at piece boundaries
    np.testing.assert_array_equal(tokenize_pieces(read_text_pieces(path), tok), whole)
    assert len(tokenize_pieces(read_text_pieces(path, piece_bytes=1000), tok, limit=50)) < len(whole)
    path.write_bytes(text.encode() + b"\n\xff\xfe latin-1 \xe9")
    with pytest.raises(TailorError, match=rf"not UTF-8 text \(byte {len(text.encode()) + 1}\)"):
        list(read_text_pieces(path, piece_bytes=1000))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("replay_every", [1, 2])
def test_options_measured_with_the_dense_prefix_replayed_equal_a_full_run(family, replay_every, monkeypatch):
    """measure_options replays the blocks before an option's first layer (its source, for
    kv_share) from the last recorded block output (every `replay_every`-th), computing those
    between: the divergence must be exactly that of running the whole variant."""
    from tailor.backends.base import divergence

    monkeypatch.setattr("tailor.backends.torch_backend.REPLAY_EVERY", replay_every)
    from tailor.passes.profile import collect_signals
    from tailor.passes.registry import PASSES, candidates_for

    dense = backend_for(capture(build_model(family)))
    ids = ids_for(seq=16, batch=6)  # two batches of unequal size
    signals = collect_signals(dense, ids)
    # INT8 (measured like the rest) where the model's projections take it: not GPT-2's Conv1D
    measured = [p for p in PASSES if PASSES[p].measured and (p != "int8" or family != "gpt2")]
    options = candidates_for(dense.graph, signals, measured)
    assert {"kv_share", "ffn_prune", "layer_skip"} <= {o.pass_name for o in options} or family == "gpt2"
    assert len(options) >= 6
    reference, record = dense.outputs(ids), dense.record_blocks(ids)
    streamed, recorded = dense.reference_with_record(ids)
    assert record is not None and len(recorded) == len(record)
    for o in options:
        variant = apply_options(dense.clone(), [o], signals)
        is_lm = dense.graph.task == "causal-lm"
        replay = (record, PASSES[o.pass_name].first_layer(o))
        full = divergence(reference, variant.stream(ids), is_lm)
        replayed = divergence(reference, variant.stream(ids, replay=replay), is_lm)
        assert replayed == pytest.approx(full, rel=1e-9, abs=1e-12), o.key
        # the option meter's one forward: the reference as head inputs, recorded as it streams
        outputs = variant.stream(ids, replay=(recorded, replay[1]), head_inputs=True)
        together = divergence(streamed, outputs, is_lm)
        assert together == pytest.approx(full, rel=1e-6, abs=1e-9), o.key


def test_divergence_is_the_mean_kl_per_token_whatever_the_chunks(monkeypatch):
    """The in-place chunked KL against torch's kl_div on the whole set, and the encoders' 1 - cosine."""
    from tailor.backends import base

    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(3, 5, 50, generator=gen) * 3, torch.randn(2, 5, 50, generator=gen)]
    out = [r + torch.randn(r.shape, generator=gen) for r in ref]
    flat_ref = torch.cat([r.reshape(-1, 50) for r in ref])
    flat_out = torch.cat([o.reshape(-1, 50) for o in out])
    expected = torch.nn.functional.kl_div(torch.log_softmax(flat_out.double(), -1),
                                          torch.log_softmax(flat_ref.double(), -1),
                                          log_target=True, reduction="batchmean")
    for chunk in (2 ** 25, 7 * 50, 50):  # one chunk, a few rows, one row at a time
        monkeypatch.setattr(base, "DIVERGENCE_CHUNK", chunk)
        assert base.divergence(ref, out, True) == pytest.approx(float(expected), rel=1e-12)
    cosine = 1 - torch.cosine_similarity(flat_ref.double(), flat_out.double(), dim=-1).mean()
    assert base.divergence(ref, out, False) == pytest.approx(float(cosine), rel=1e-12)


@pytest.mark.parametrize("source", ["llama", "gpt2", "llama.onnx"])
def test_divergence_from_head_inputs_is_the_divergence_of_the_logits(source, tiny_onnx, monkeypatch):
    """Comparisons that keep the head's inputs (HeadInput) and run the head a chunk of positions
    at a time give the KL of the whole logits, at compared positions and replayed; a backend
    that cannot split its head off (ONNX) streams its logits as before."""
    from tailor.backends import base
    from tailor.backends.base import HeadInput, compared_positions

    family, _, onnx = source.partition(".")
    dense = backend_for(capture(tiny_onnx[family] if onnx else build_model(family)))
    variant = dense.clone()
    variant.remove_blocks([1])
    ids = ids_for(seq=16, batch=6)
    monkeypatch.setattr(base, "LOGIT_ELEMENTS", 96 * 16)
    for positions in (None, compared_positions(dense.graph, ids)):
        reference = list(dense.stream(ids, positions=positions))
        expected = base.divergence(reference, variant.stream(ids, positions=positions), True)
        assert expected > 1e-4
        kept = [o.to("cpu") for o in dense.stream(ids, positions=positions, head_inputs=True)]
        assert all(isinstance(o, HeadInput) for o in kept) == (not onnx)
        for chunk in (2 ** 22, 3 * 96, 1):  # one chunk, a few positions, one position at a time
            monkeypatch.setattr(base, "DIVERGENCE_CHUNK", chunk)
            outputs = variant.stream(ids, positions=positions, head_inputs=True)
            once = base.divergence(kept, outputs, True)
            assert once == pytest.approx(expected, rel=1e-6)
            # the reference's head run once for every batch, the first only, none: the same KL
            first = kept[0].hidden[..., 0].numel() * kept[0].vocab_size * 4 if not onnx else 0
            for budget in (1 << 30, first, 0):
                cached = base.with_logits(kept, budget)
                assert sum(isinstance(r, HeadInput) for r in cached) == (
                    0 if budget > first or onnx else len(kept) - 1 if budget else len(kept))
                outputs = variant.stream(ids, positions=positions, head_inputs=True)
                assert base.divergence(cached, outputs, True) == once
        record = dense.record_blocks(ids)
        if record is not None:
            replayed = dense.clone().stream(ids, replay=(record, 2), positions=positions, head_inputs=True)
            assert base.divergence(reference, replayed, True) < 1e-9


@pytest.mark.parametrize("source", ["llama", "gpt2", "llama.onnx"])
def test_outputs_at_compared_positions_are_the_full_outputs_there(source, tiny_onnx, monkeypatch):
    """Past LOGIT_ELEMENTS, comparisons keep every k-th position of each window (the last one
    included): the head runs on those only (logits_to_keep) and gives what the full run gives
    there, with and without the dense prefix replayed."""
    from tailor.backends.base import compared_positions, divergence

    family, _, onnx = source.partition(".")
    dense = backend_for(capture(tiny_onnx[family] if onnx else build_model(family)))
    ids = ids_for(seq=16, batch=6)
    assert compared_positions(dense.graph, ids) is None  # 9216 logits: all kept
    monkeypatch.setattr("tailor.backends.base.LOGIT_ELEMENTS", 96 * 16)
    positions = compared_positions(dense.graph, ids)
    assert positions.tolist() == [3, 9, 15]
    full = torch.cat(list(dense.stream(ids)))
    torch.testing.assert_close(torch.cat(list(dense.stream(ids, positions=positions))), full[:, positions],
                               rtol=1e-5, atol=1e-5)
    record = dense.record_blocks(ids)
    if record is not None:
        replayed = torch.cat(list(dense.stream(ids, replay=(record, 1), positions=positions)))
        torch.testing.assert_close(replayed, full[:, positions], rtol=1e-5, atol=1e-5)
    reference = [out[:, positions] for out in dense.stream(ids)]  # per batch, as divergence takes them
    assert divergence(reference, dense.stream(ids, positions=positions), True) < 1e-9
