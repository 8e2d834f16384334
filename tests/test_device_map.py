"""Models bigger than one device go through accelerate (tailor.core.dispatch): a model dispatched
with layers offloaded compiles to the plan it gets whole, stays dispatched and saves; --max-memory
loads through accelerate, and what fits nowhere is refused in one line.

A CPU-only machine has one device, so the split here is the CPU and disk offload (the layers
offloaded run on the CPU, their weights read from files at each forward); the rewrites of those
layers, the weight reads through the hooks and the measurements are the same code as for a split
over GPUs with host offload."""
from __future__ import annotations

import json

import pytest
import torch
from accelerate import dispatch_model

import tailor
from tailor.cli.main import optimize_main
from tailor.core.dispatch import device_map_summary, dispatch, offload_hook, resolve_max_memory, stored_state
from tailor.core.errors import TailorError
from tailor.rewriter.capture import load_hf_directory
from tests.conftest import build_model, ids_for

# layers 1 and 2 offloaded to disk: the plan below rewrites them too
OFFLOADED = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
# head and FFN pruning in every layer, then the sequential refit: slices, compensation and refitted
# weights in the offloaded layers; attention patterns profiled on the dispatched model itself
SETTINGS = dict(passes=["head_prune", "ffn_prune", "attn_pattern"], prompt_len=32, calib_windows=4,
                calib_len=16, use_cache=False)
BUDGET = 0.6


@pytest.fixture(scope="module")
def whole_and_dispatched(tmp_path_factory):
    whole = tailor.compile(build_model("llama"), BUDGET, **SETTINGS)
    model = dispatch_model(build_model("llama"), OFFLOADED,
                           offload_dir=str(tmp_path_factory.mktemp("offload")))
    before = {k: v.clone() for k, v in stored_state(model).items()}
    hooked = hooked_forwards(model)
    dispatched = tailor.compile(model, BUDGET, **SETTINGS)
    assert hooked_forwards(model) == hooked  # accelerate's hooks all still in place
    return whole, dispatched, model, before


def hooked_forwards(model) -> dict[str, object]:
    """Each hooked module's forward (accelerate's wrapper, set on the module itself)."""
    return {name: m.__dict__.get("forward") for name, m in model.named_modules() if hasattr(m, "_hf_hook")}


def test_a_dispatched_model_gets_the_plan_it_gets_whole(whole_and_dispatched):
    whole, dispatched, model, before = whole_and_dispatched
    assert dispatched.plan.rewrites == whole.plan.rewrites
    assert {r["layer"] for r in whole.plan.rewrites} >= {1, 2}  # offloaded layers rewritten
    assert "refit" in dispatched.report
    assert dispatched.report["search"]["measured_kl_heldout"] == \
        pytest.approx(whole.report["search"]["measured_kl_heldout"], rel=1e-6)
    ids = ids_for()
    with torch.no_grad():
        torch.testing.assert_close(dispatched.model(ids), whole.model(ids), atol=1e-5, rtol=1e-5)
    # the user's model: as dispatched, weights untouched
    assert all(torch.equal(before[k], v) for k, v in stored_state(model).items())
    assert dispatched.report["model"]["device_map"] == {
        "cpu": "model.embed_tokens, model.rotary_emb, model.layers.0, model.norm, lm_head",
        "disk, runs on cpu": "model.layers.1-2"}
    assert dispatched.report["model"]["device"] == "cpu"


def test_the_result_stays_dispatched_the_same_way(whole_and_dispatched):
    _, dispatched, model, _ = whole_and_dispatched
    result = dispatched.rewritten.model
    assert result is not model and device_map_summary(result) == device_map_summary(model)
    for name, module in result.named_modules():
        weights = list(module.parameters(recurse=False))
        if not weights:
            continue
        offloaded = name.startswith(("model.layers.1.", "model.layers.2."))
        # rewritten projections too: their new weights offloaded (to host memory) like the old ones
        assert (offload_hook(module) is not None) == offloaded, name
        assert all(w.is_meta == offloaded for w in weights), name


def test_a_dispatched_result_saves_and_reloads(whole_and_dispatched, tmp_path):
    whole, dispatched, _, _ = whole_and_dispatched
    dispatched.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["rewrites"] == whole.plan.rewrites
    reloaded = tailor.load(tmp_path / "out")
    ids = ids_for()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids), whole.model(ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(TailorError, match="dispatched by accelerate"):
        dispatched.generate([[1, 2, 3]], max_new_tokens=2)
    with pytest.raises(TailorError, match="safetensors only"):
        tailor.compile(dispatch_model(build_model("llama"), OFFLOADED, offload_dir=str(tmp_path / "off")),
                       1.0, formats=("onnx",))


def test_max_memory_loads_through_accelerate_and_refuses_what_fits_nowhere(tiny_hf_dirs):
    path = tiny_hf_dirs["llama"]
    loaded = load_hf_directory(path, max_memory=resolve_max_memory("cpu=1GiB"))
    ids = ids_for()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, load_hf_directory(path)(ids).logits)
    with pytest.raises(TailorError, match=r"its weights take 0\.0 GiB in float32, more than the 0\.0 GiB "
                                          r"that --max-memory gives where free \(cpu 0\.0 GiB\)"):
        tailor.compile(path, 0.5, max_memory={"cpu": "1KiB"})
    with pytest.raises(TailorError, match="places a model as it is loaded from files"):
        tailor.compile(build_model("llama"), 0.5, max_memory={"cpu": "1GiB"})


@pytest.mark.parametrize("value, says", [
    ("cpu", "takes DEVICE=SIZE pairs"),
    ("cpu=lots", "'lots' for cpu is no size"),
    ("cpu=0GiB", "is no size"),
    ("disk=1GiB", "'disk' is no device"),
    ("cpu=1KiB", "more than the 0.0 GiB that --max-memory gives"),
] + ([("0=1GiB", "names GPU 0; this machine has no CUDA GPU")] if not torch.cuda.is_available() else []))
def test_cli_max_memory_errors_are_one_line_and_write_nothing(value, says, tiny_hf_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert optimize_main([str(tiny_hf_dirs["llama"]), "--budget", "0.5", "--max-memory", value,
                          "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not out.exists()


def test_dispatch_places_through_accelerate_and_never_on_disk():
    """What benchmarks/compile_scale.py and tailor.load do with a model built in host memory."""
    model = dispatch(build_model("llama"), {"cpu": 2**30})
    assert model.hf_device_map == {"": "cpu"} and not hasattr(model, "_hf_hook")  # one device: no hooks
    with pytest.raises(TailorError, match=r"does not fit in the memory given .*lm_head .*would go to disk"):
        dispatch(build_model("llama"), {"cpu": 150_000})


def test_max_memory_forms():
    assert resolve_max_memory("cpu=1GiB") == {"cpu": 2**30}
    assert resolve_max_memory({"cpu": 1000}) == resolve_max_memory("cpu=1000") == {"cpu": 1000}
    assert resolve_max_memory(None) is None


def test_a_closed_copy_of_a_dispatched_model_is_freed_at_once(tmp_path):
    """accelerate's forward on each module is a partial of the module itself: a copy let go would
    wait, edited weights and all, for the garbage collector's full pass. close() frees it at once
    and leaves the blocks it shares with the original as they were."""
    import gc
    import weakref

    from tailor.backends import backend_for
    from tailor.rewriter.capture import capture

    model = dispatch_model(build_model("llama"), OFFLOADED, offload_dir=str(tmp_path / "offload"))
    dense = backend_for(capture(model))
    hooked, ids = hooked_forwards(model), ids_for(seq=8)
    with torch.no_grad():
        before = model(ids).logits
    gc.collect()
    gc.disable()
    try:
        variant = dense.clone(from_layer=2)
        variant.set_ffn_width(2, 8)
        copy, block = weakref.ref(variant.model), weakref.ref(variant._blocks()[2])
        variant.close()
        del variant
        assert copy() is None and block() is None
    finally:
        gc.enable()
    assert hooked_forwards(model) == hooked
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)
