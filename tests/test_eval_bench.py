"""`tailor eval` and `tailor bench` on real artifacts."""
from __future__ import annotations

import json

import pytest

from tailor.cli.main import main
from tailor.errors import TailorError
from tailor.quality.metrics import evaluate
from tests.conftest import REFLLAMA, SHARED, needs_shared


@pytest.fixture(scope="module")
def refllama_artifact(tmp_path_factory):
    import tailor

    out = tmp_path_factory.mktemp("rl") / "art"
    tailor.compile(REFLLAMA).save(out)
    return out


@needs_shared
def test_eval_identity_matches_reference(refllama_artifact, capsys):
    text = SHARED / "data" / "code-eval.txt"
    assert main(["eval", str(refllama_artifact), "--text", str(text), "--reference", str(REFLLAMA),
                 "--seq-len", "256", "--windows", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["windows"] == 2
    assert r["kl_to_reference"] < 1e-9 and r["top1_agreement"] == 1.0
    assert r["perplexity"] == pytest.approx(r["reference_perplexity"], rel=1e-9)
    assert 1.0 < r["perplexity"] < 200.0  # a trained model, not a random one (vocab 8192)


@needs_shared
def test_eval_text_errors(refllama_artifact, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    with pytest.raises(TailorError, match="too short"):
        evaluate(refllama_artifact, short, seq_len=256, windows=1)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café = 1\n".encode("latin-1") * 200)
    with pytest.raises(TailorError, match="not UTF-8"):
        evaluate(refllama_artifact, latin, seq_len=16, windows=1)


def test_bench_side_by_side(tiny_onnx, tmp_path, capsys):
    import tailor

    out = tailor.compile(tiny_onnx["llama"]).save(tmp_path / "a")
    assert main(["bench", str(out), "--reference", str(tiny_onnx["llama"]), "--seq-len", "16",
                 "--repeats", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["reference_ms"] > 0 and r["artifact_ms"] > 0 and r["ratio"] > 0
