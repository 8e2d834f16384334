"""Faults: a run killed with SIGKILL at any point leaves no partial artifact and no corrupt cache;
the rerun finishes (reusing the profile when it was stored); two runs to one output do not race."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tailor.cli.main import optimize_main
from tailor.passes.profile import load_cached
from tailor.runtime.artifact import output_lock, verify_artifact

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--budget", "0.6", "--calib-windows", "4", "--calib-len", "32", "--prompt-len", "64"]


def _start(args: list[str], cache: Path) -> subprocess.Popen:
    env = dict(os.environ, TAILOR_CACHE=str(cache), PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "tailor", "optimize", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != "cache")


def _cache_entries(cache: Path) -> list[Path]:
    return sorted((cache / "profiles").glob("*.json")) if (cache / "profiles").is_dir() else []


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    start = time.monotonic()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_while_writing_then_rerun_reuses_profile(tiny_hf_dirs, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [str(tiny_hf_dirs["llama"]), "-o", str(out), *SMALL]
    proc = _start(args, cache)
    _kill_when(proc, lambda: any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()))
    assert not out.exists()
    assert len(_cache_entries(cache)) == 1  # the profile was stored before writing began
    rerun = _start(args, cache)
    assert rerun.wait(300) == 0, rerun.communicate()
    verify_artifact(out)
    assert json.loads((out / "report.json").read_text())["calibration"]["cached"] is True
    assert _beside(out) == ["out"]  # the killed run's temp dir and the lock are gone


def test_kill_while_profiling_leaves_nothing(tiny_hf_dirs, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [str(tiny_hf_dirs["llama"]), "-o", str(out), *SMALL]
    proc = _start(args, cache)
    lines: list[str] = []

    def profiling() -> bool:  # the capture stage has finished: profiling is under way
        lines.append(proc.stdout.readline())
        return lines[-1].strip().startswith("capture")

    _kill_when(proc, profiling)
    assert not out.exists() and _beside(out) in ([], [".out.lock"])
    for entry in _cache_entries(cache):  # whatever is on disk is whole
        assert load_cached(entry.stem) is not None
    rerun = _start(args, cache)
    assert rerun.wait(300) == 0, rerun.communicate()
    verify_artifact(out)
    assert _beside(out) == ["out"]


def test_concurrent_runs_to_one_output(tiny_onnx, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    procs = [_start([str(tiny_onnx["gpt2"]), "-o", str(out)], cache) for _ in range(2)]
    results = [(p.wait(300), p.communicate()[1]) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2).strip()
    assert len(loser.splitlines()) == 1 and loser.startswith("error:"), loser
    assert "another tailor run is writing it" in loser or "already exists" in loser
    verify_artifact(out)
    assert _beside(out) == ["out"]


def test_lock_refuses_a_second_holder_and_cleans_stale_temps(tmp_path, tiny_onnx):
    out = tmp_path / "out"
    # what a run killed mid-swap (--force over an old artifact) leaves: the old one aside, no out
    assert optimize_main([str(tiny_onnx["gpt2"]), "-o", str(tmp_path / "first")]) == 0
    aside = tmp_path / ".out.old-x1"
    aside.mkdir()
    os.replace(tmp_path / "first", aside / "out")
    (tmp_path / ".out.tmp-x2").mkdir()
    with output_lock(out):
        assert (out / "manifest.json").is_file()  # put back
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]
        other = subprocess.run([sys.executable, "-c", "from tailor.runtime.artifact import output_lock\n"
                                f"with output_lock({str(out)!r}): pass"], cwd=REPO, capture_output=True,
                               text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert "another tailor run is writing it" in other.stderr
        with output_lock(out):  # the holder itself may nest (the CLI run, then the artifact write)
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("damage", ["json", "arrays"])
def test_corrupt_cache_entry_is_recomputed(tiny_hf_dirs, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    args = [str(tiny_hf_dirs["llama"]), *SMALL]
    assert optimize_main([*args, "-o", str(tmp_path / "a")]) == 0
    entry = _cache_entries(tmp_path / "cache")[0]
    victim = entry if damage == "json" else entry.with_suffix(".safetensors")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert load_cached(entry.stem) is None
    assert optimize_main([*args, "-o", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "report.json").read_text())["calibration"]["cached"] is False
    assert load_cached(entry.stem) is not None
    a, b = (json.loads((tmp_path / d / "plan.json").read_text()) for d in "ab")
    assert a == b
