"""Bad input: one clear line on stderr, exit code 2, nothing written, input unchanged."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from tailor.cli.main import main, optimize_main


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails(argv, capsys, *, expect: str, fn=optimize_main):
    assert fn(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and expect in err, err
    return err


def _mlp_onnx(path: Path) -> Path:
    """A valid ONNX model that is not a transformer."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.1] * 16)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]),
                               helper.make_node("Relu", ["h"], ["y"])], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    onnx.save(helper.make_model(graph), path)
    return path


def test_missing_path(tmp_path, capsys):
    _fails([str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "out")], capsys, expect="no such file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"garbage \x00\x01 not onnx", "truncated"])
def test_corrupt_onnx(content, tmp_path, capsys, tiny_onnx):
    bad = tmp_path / "bad.onnx"
    if content == "truncated":
        data = tiny_onnx["llama"].read_bytes()
        content = data[: len(data) // 3]
    bad.write_bytes(content)
    _fails([str(bad), "-o", str(tmp_path / "out")], capsys, expect=str(bad))
    assert not (tmp_path / "out").exists()
    assert bad.read_bytes() == content


def test_name_that_is_not_utf8_text(tmp_path, capsys, tiny_onnx):
    """protobuf hands a string that is not UTF-8 back as bytes; the checker and onnxruntime let it
    pass, writing the model back failed (found by tests/test_fuzz.py)."""
    data = tiny_onnx["llama"].read_bytes()
    name = onnx.load(str(tiny_onnx["llama"])).graph.node[0].name.encode()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data.replace(name, b"\x80" + name[1:], 1))
    _fails([str(bad), "-o", str(tmp_path / "out")], capsys, expect="NodeProto.name b")
    assert not (tmp_path / "out").exists()


def test_not_a_transformer(tmp_path, capsys):
    path = _mlp_onnx(tmp_path / "mlp.onnx")
    err = _fails([str(path), "-o", str(tmp_path / "out")], capsys, expect="no attention found")
    assert "MatMul" in err  # says what it did find
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("budget", ["0", "-0.5", "1.5", "nan", "abc"])
def test_bad_budget(budget, tiny_onnx, tmp_path, capsys):
    _fails([str(tiny_onnx["llama"]), "--budget", budget, "-o", str(tmp_path / "out")], capsys,
           expect="budget")
    assert not (tmp_path / "out").exists()


def test_unreachable_budget_names_the_smallest(tiny_hf_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    _fails([str(tiny_hf_dirs["llama"]), "--budget", "0.05", "--passes", "ffn_prune", "--calib-windows",
            "4", "--calib-len", "32", "-o", str(tmp_path / "out")], capsys,
           expect="smallest reachable budget is 0.")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails([str(tiny_onnx["gpt2"]), "-o", str(out)], capsys, expect="--force")
    assert _snapshot(out) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}
    assert optimize_main([str(tiny_onnx["gpt2"]), "-o", str(out), "--force"]) == 0
    assert (out / "model.onnx").is_file() and not (out / "keep.txt").exists()
    # nothing left behind beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_remote_code_refused(tiny_hf_dirs, tmp_path, capsys):
    d = tmp_path / "remote"
    d.mkdir()
    for p in tiny_hf_dirs["llama"].iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    before = _snapshot(d)
    _fails([str(d), "-o", str(tmp_path / "out")], capsys, expect="remote code")
    assert _snapshot(d) == before


def test_pickle_weights_refused(tiny_hf_dirs, tmp_path, capsys):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_bytes((tiny_hf_dirs["llama"] / "config.json").read_bytes())
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    _fails([str(d), "-o", str(tmp_path / "out")], capsys, expect="never loaded")


def test_mismatched_weights(tiny_hf_dirs, tmp_path, capsys):
    d = tmp_path / "mismatch"
    d.mkdir()
    (d / "model.safetensors").write_bytes((tiny_hf_dirs["llama"] / "model.safetensors").read_bytes())
    cfg = json.loads((tiny_hf_dirs["llama"] / "config.json").read_text())
    cfg["hidden_size"], cfg["intermediate_size"] = 128, 64
    (d / "config.json").write_text(json.dumps(cfg))
    _fails([str(d), "-o", str(tmp_path / "out")], capsys, expect="could not load")


@pytest.mark.parametrize("where", ["../secret.bin", "/etc/hostname", "link.bin", "sub/../../secret.bin"])
def test_external_data_escaping_folder_refused(tiny_onnx, tmp_path, capsys, where):
    model = onnx.load(str(tiny_onnx["llama"]))
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (tmp_path / "secret.bin").write_bytes(init.raw_data)  # present: refused for where it is
    init.data_location = TensorProto.EXTERNAL
    del init.external_data[:]
    init.external_data.add(key="location", value=where)
    init.ClearField("raw_data")
    sub = tmp_path / "m"
    sub.mkdir()
    (sub / "link.bin").symlink_to(tmp_path / "secret.bin")  # a link inside, to a file outside
    onnx.save(model, str(sub / "model.onnx"))
    before = _snapshot(sub)
    _fails([str(sub / "model.onnx"), "-o", str(tmp_path / "out")], capsys,
           expect="outside the model's folder")
    assert _snapshot(sub) == before and not (tmp_path / "out").exists()


def test_external_data_inside_folder_is_carried(tiny_onnx, tmp_path):
    """A model saved with external data (as models over 2 GB must be) compiles, and an unchanged
    one (already clean: no lossless clean-up left to make) is carried byte for byte with its data
    files."""
    import onnx_ir as ir

    from tailor.rewriter.capture import capture

    sub = tmp_path / "m"
    sub.mkdir()
    ir.save(capture(tiny_onnx["llama"]).source.model, sub / "model.onnx", external_data="weights.data")
    assert optimize_main([str(sub / "model.onnx"), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.onnx").read_bytes() == (sub / "model.onnx").read_bytes()
    assert (tmp_path / "out" / "weights.data").read_bytes() == (sub / "weights.data").read_bytes()


def test_inspect_bad_input(tmp_path, capsys):
    _fails(["inspect", str(_mlp_onnx(tmp_path / "mlp.onnx"))], capsys, expect="not a transformer", fn=main)


def test_bad_config_file(tiny_onnx, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('budget = 1.0\nbudjet = 0.5\n')
    _fails([str(tiny_onnx["llama"]), "--config", str(cfg)], capsys, expect="unknown option(s) budjet")


def test_debug_shows_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tailor", "optimize", str(tmp_path / "x.onnx"), "--debug"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tailor", "optimize", str(tmp_path / "x.onnx")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'x.onnx'}: no such file or directory"]
