"""`tailor eval` and `tailor bench` on real artifacts."""
from __future__ import annotations

import json

import pytest

from tailor.cli.main import main
from tailor.core.errors import TailorError
from tailor.evaluate import evaluate
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
    assert r["logits"] == "every position"   # an ONNX export's graph computes every position's


@needs_shared
def test_bench_times_a_torch_causal_lm_as_served(refllama_artifact, capsys):
    """Its compile priced the head at the last position (Workload.last_logits); bench times so."""
    assert main(["bench", str(refllama_artifact), "--reference", str(REFLLAMA), "--seq-len", "16",
                 "--repeats", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["logits"] == "last position"


@needs_shared
def test_retrieval_probe_on_the_real_model(refllama_artifact, capsys):
    """The dense model retrieves (MODEL.md: 0.95-1.00 at these lengths); a model that only sees
    a short window cannot, so the probe really measures long-range retrieval."""
    import copy

    import torch
    import transformers

    from tailor.backends.runners import HFModel
    from tailor.core.patterns import Pattern
    from tailor.data.retrieval import retrieval_accuracy
    from tailor.data.text import load_tokenizer
    from tailor.rewriter.modules.sparse_attention import install

    assert main(["eval", str(refllama_artifact), "--probe", "retrieval", "--lengths", "384",
                 "--samples", "12", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["retrieval@384"] >= 0.75
    model = transformers.AutoModelForCausalLM.from_pretrained(str(REFLLAMA), dtype=torch.float32).eval()
    local = copy.deepcopy(model)
    for layer in local.model.layers:
        install(local, layer.self_attn, [Pattern(4, 16, 0.0)] * 2)
    acc = retrieval_accuracy(HFModel(local), load_tokenizer(REFLLAMA), [384], samples=12)
    assert acc[384] <= 0.25
    assert main(["eval", str(refllama_artifact)]) == 2  # neither --text nor --probe


@needs_shared
def test_retrieval_samples_have_their_answer_in_context():
    import re

    from tailor.data.retrieval import RetrievalTemplate, make_samples
    from tailor.data.text import load_tokenizer

    tok = load_tokenizer(REFLLAMA)
    for s in make_samples(tok, 300, 6, seed=3):
        assert len(s.ids) == 300
        text = tok.decode(s.ids[:s.answer_start])
        key = re.search(r"assert (\w+) ==$", text).group(1)
        value = tok.decode(s.ids[s.answer_start:]).strip()
        assert f"\n{key} = {value}\n" in text  # the queried line is whole, and only once
        assert text.count(f"{key} = ") == 1
    with pytest.raises(TailorError, match="must contain"):
        RetrievalTemplate.parse({"line": "{key} is here"})


def test_onnxruntime_failures_are_one_clear_line(tiny_onnx):
    """An input the graph cannot take (here more positions than BERT's 128 learned ones) is a
    TailorError naming the runtime and the input's shape, at whatever stage it happens."""
    import torch

    from tailor.backends.runners import OrtModel
    from tailor.core.errors import TailorError

    with pytest.raises(TailorError, match=r"onnxruntime .* input of shape \[1, 200\]") as e:
        OrtModel(tiny_onnx["bert"])(torch.zeros(1, 200, dtype=torch.long))
    assert "\n" not in str(e.value)
