"""Dry runs, config replay, and artifact integrity."""
from __future__ import annotations

import json

import pytest
import yaml

import tailor
from tailor.cli.main import optimize_main
from tailor.core.errors import TailorError
from tailor.core.plan import SCHEMA_VERSION, Plan
from tailor.runtime.artifact import write_artifact


def test_dry_run_writes_nothing(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "out"
    assert optimize_main([str(tiny_onnx["mistral"]), "-o", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run" in text and "3 layers" in text
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_config_replays_a_run(tiny_onnx, tmp_path):
    first = tmp_path / "first"
    assert optimize_main([str(tiny_onnx["llama"]), "-o", str(first), "--seq-len", "256"]) == 0
    run = yaml.safe_load((first / "run.yaml").read_text())
    assert run["model"] == str(tiny_onnx["llama"]) and run["prompt_len"] == 256 and run["budget"] == 1.0
    # replay from the recorded config, overriding only the output
    second = tmp_path / "second"
    assert optimize_main(["--config", str(first / "run.yaml"), "-o", str(second)]) == 0
    plan1 = json.loads((first / "plan.json").read_text())
    plan2 = json.loads((second / "plan.json").read_text())
    assert plan1 == plan2 and plan1["workload"]["prompt_len"] == 256
    assert (first / "model.onnx").read_bytes() == (second / "model.onnx").read_bytes()


def test_toml_config(tiny_onnx, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{tiny_onnx["gpt2"]}"\nbudget = 1.0\nobjective = "flops"\n')
    assert optimize_main(["--config", str(cfg), "-o", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["objective"] == "flops"


def test_tampered_artifact_refused(tiny_onnx, tmp_path):
    out = tailor.compile(tiny_onnx["llama"]).save(tmp_path / "a")
    tailor.load(out)
    with open(out / "model.onnx", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(TailorError, match="does not match its sha256"):
        tailor.load(out)


def test_manifest_path_escape_refused(tiny_onnx, tmp_path):
    out = tailor.compile(tiny_onnx["llama"]).save(tmp_path / "a")
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["../outside"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TailorError, match="outside the artifact"):
        tailor.load(out)


def test_newer_plan_schema_refused():
    with pytest.raises(TailorError, match="newer"):
        Plan.from_json({"schema_version": SCHEMA_VERSION + 1, "model_hash": "x", "budget": 1.0})


def test_failed_write_leaves_nothing(tmp_path):
    def write(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_artifact(tmp_path / "out", write)
    assert list(tmp_path.iterdir()) == []


def test_failed_validation_keeps_old_artifact(tmp_path):
    out = tmp_path / "out"
    write_artifact(out, lambda t: (t / "a.txt").write_text("old"))

    def check(tmp):
        raise TailorError("validation failed")

    with pytest.raises(TailorError):
        write_artifact(out, lambda t: (t / "a.txt").write_text("new"), force=True, check=check)
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_summary_names_the_winning_plan_and_warns_on_a_large_kl(tmp_path):
    """The summary says which measured plan won and warns where its held-out KL is large."""
    from types import SimpleNamespace

    from rich.console import Console

    from tailor.cli import main as cli
    from tailor.core.plan import Plan

    iterations = [{"iteration": 0, "options": ["a"], "predicted_kl": 0.1, "measured_kl": 0.3},
                  {"iteration": "DuoAttention-style", "options": ["b"], "predicted_kl": None,
                   "measured_kl": 0.2}]
    for kl, warned in ((0.2, True), (0.01, False)):
        report = {"search": {"measured_kl_heldout": kl, "iterations": iterations}}
        compiled = SimpleNamespace(plan=Plan("sha256:x", 0.5, "latency", {}, predicted={"latency": 0.5}),
                                   report=report)
        saved, cli.console = cli.console, Console(record=True, width=200)
        try:
            cli.print_summary(compiled, tmp_path)
            text = cli.console.export_text()
        finally:
            cli.console = saved
        assert "2 (closest: DuoAttention-style plan)" in text
        assert ("warning: KL 0.200" in text) is warned
