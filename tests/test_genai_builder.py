"""Decoders written by onnxruntime-genai's model builder in, artifacts onnxruntime-genai loads out
(issue 25): a tiny tied Llama built here by the builder (offline, from a local HF folder) is
captured through its GroupQueryAttention and SkipSimplifiedLayerNormalization ops, rewritten
with its KV cache kept consistent, and the artifact keeps the builder's folder with its
genai_config.json updated, so onnxruntime-genai continues a prompt as tailor's runtime does."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import tailor
from tailor.backends.onnx_export_folder import genai_continuation
from tailor.backends.runners import OrtModel
from tailor.core.plan import Plan
from tailor.rewriter.capture import capture
from tests.conftest import REFLLAMA, SHARED, family_config, perturb_vectors

CALIB = SHARED / "data" / "code-calib.txt"
PROMPT = [5, 17, 30, 42, 7, 9, 12, 80]
NEW_TOKENS = 10

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
pytestmark = pytest.mark.skipif(not REFLLAMA.is_dir(),
                                reason=f"refllama-16m (its tokenizer) not found at {REFLLAMA}")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The builder's folder (model.onnx, genai_config.json, tokenizer) for a tiny tied Llama, fp32."""
    import transformers as tf

    root = tmp_path_factory.mktemp("genai")
    config = family_config("llama")  # head size 16: onnxruntime's GroupQueryAttention takes multiples of 16
    config.tie_word_embeddings = True
    # the builder takes the first linear as wide as the vocabulary for the lm_head: not the FFN's
    config.intermediate_size = 128
    config.vocab_size = 8192  # refllama's tokenizer reads the calibration text
    model = perturb_vectors(tf.LlamaForCausalLM(config)).eval()
    model.save_pretrained(root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFLLAMA / name, root / "hf" / name)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(root / "hf"),
                    "-o", str(root / "built"), "-p", "fp32", "-e", "cpu"], check=True, capture_output=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    return root / "built"


def _cache_heads(path: Path) -> list[int]:
    inputs = onnx.load(str(path), load_external_data=False).graph.input
    return [i.type.tensor_type.shape.dim[1].dim_value for i in inputs if i.name.endswith(".key")]


def _greedy(path: Path, prompt: list[int], n: int, cached: bool, head_size: int) -> list[int]:
    """Greedy continuation by onnxruntime, the present outputs fed back as past (cached), or the
    whole sequence again every step with empty caches."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    empty = {i.name: np.zeros([1, i.shape[1], 0, head_size], np.float32)
             for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    ids, step, done, past = list(prompt), list(prompt), 0, dict(empty)
    for _ in range(n):
        if not cached:
            step, done, past = ids, 0, dict(empty)
        feeds = {"input_ids": np.asarray([step]), "attention_mask": np.ones((1, done + len(step)), np.int64),
                 **past}
        out = dict(zip(outputs, session.run(None, feeds)))
        ids.append(int(out["logits"][0, -1].argmax()))
        past = {k: out[k.replace("past_key_values", "present")] for k in past}
        done, step = done + len(step), [ids[-1]]
    return ids[len(prompt):]


def test_the_builder_decoder_is_captured_as_a_causal_lm(built):
    cap = capture(built)
    assert cap.graph.task == "causal-lm" and cap.graph.num_layers == 3
    assert cap.source.cleaned["group_query_attention"] == 3
    assert cap.source.cleaned["table_read_transposed"] == 1
    assert all(b.attn.rope and b.attn.causal and (b.attn.num_heads, b.attn.num_kv_heads) == (4, 2)
               for b in cap.graph.blocks)
    assert cap.graph.lm_head.weight.name == cap.graph.embedding.token.name  # tied, as built


def _skip(layer):
    return {"pass": "layer_skip", "layer": layer, "choice": {}, "label": "layer_skip"}


def _heads(layer, kv, queries):
    return {"pass": "head_prune", "layer": layer, "choice": {"kv_heads": kv, "queries": queries},
            "label": "head_prune"}


def _share(layer, source):
    return {"pass": "kv_share", "layer": layer, "choice": {"source": source}, "label": "kv_share"}



def _int8(layer, branch):
    return {"pass": "int8", "layer": layer, "choice": {"branch": branch}, "label": "int8"}


def test_tailor_decodes_a_decoder_artifact_with_its_cache_as_the_runtimes_do(built, tmp_path, monkeypatch):
    """INT8 quantizes activations per call, so one token a call (a cached decode) and the whole
    sequence a call round differently: tailor's generate on a decoder with its cache as inputs
    runs it as onnxruntime-genai and Optimum do, the prompt once and then one token a step."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    cap = capture(built)
    rewrites = [_int8(i, branch) for i in range(3) for branch in ("attn", "ffn")] + [_int8(3, "lm_head")]
    # a table that prices INT8 (what lets a plan name it)
    table = tmp_path / "int8-cpu.json"
    table.write_text(json.dumps({"kind": "tailor-target", "version": 1, "name": "int8-cpu",
                                 "bytes_per_element": 4, "flops_per_s": 1e10, "bytes_per_s": 1e15,
                                 "matmul": [[1e3, 1e10], [1e12, 1e10]],
                                 "int8_matmul": [[1e3, 2e10], [1e12, 2e10]]}))
    plan = Plan(cap.model_hash, 0.5, "latency", {"batch": 1, "prompt_len": 32, "gen_len": 0}, str(table),
                rewrites)
    out = tmp_path / "artifact"
    tailor.compile(built, plan=plan, target=str(table), calib=CALIB, calib_windows=2, calib_len=32).save(out)
    loaded = tailor.load(out)
    assert loaded.model.has_cache

    def whole_sequence(*args):
        raise AssertionError("the whole sequence run again for a token")

    monkeypatch.setattr(OrtModel, "run_numpy", whole_sequence)
    ours = loaded.generate([PROMPT], NEW_TOKENS)[0]
    head_size = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    assert ours == _greedy(out / "model.onnx", PROMPT, NEW_TOKENS, True, head_size)
    assert ours == genai_continuation(out, PROMPT, NEW_TOKENS)

def _patterns(layer, spans):
    return {"pass": "attn_pattern", "layer": layer, "choice": {"spans": spans}, "label": "attn_pattern"}


# a sink and window of a few keys: the 8-token prompt and its new tokens run past them
NARROW, WIDER = [2, 3.0, 0.0], [1, 5.0, 0.0]


@pytest.mark.parametrize("rewrites, layers, kv_heads", [
    ([_heads(i, [1], [[0, 1]]) for i in range(3)], 3, 1),
    ([_skip(0), _share(2, 1)], 1, 2),
    ([_patterns(1, [NARROW, None]), _patterns(2, [WIDER, WIDER])], 3, 2),
], ids=["a KV head pruned in every layer", "a layer skipped, a cache shared", "attention patterns"])
def test_genai_loads_the_artifact_and_generates_as_tailor_does(built, tmp_path, monkeypatch, rewrites, layers,
                                                               kv_heads):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    cap = capture(built)
    workload = {"batch": 1, "prompt_len": 32, "gen_len": 0}
    plan = Plan(cap.model_hash, 0.5, "kv_memory", workload, "cpu", rewrites)
    out = tmp_path / "artifact"
    tailor.compile(built, plan=plan, calib=CALIB, calib_windows=2, calib_len=32).save(out)
    # the builder's layout (the weights inside model.onnx where they fit: no external data file)
    assert {p.name for p in built.iterdir()} - {"model.onnx.data"} <= {p.name for p in out.iterdir()}
    assert _cache_heads(out / "model.onnx") == [kv_heads] * layers
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"]) == (layers, kv_heads)
    head_size = decoder["head_size"]
    cached = _greedy(out / "model.onnx", PROMPT, NEW_TOKENS, True, head_size)
    assert cached == _greedy(out / "model.onnx", PROMPT, NEW_TOKENS, False, head_size)
    ours = tailor.load(out).generate([PROMPT], NEW_TOKENS)[0]
    assert cached == ours
    assert genai_continuation(out, PROMPT, NEW_TOKENS) == ours
    ids = np.asarray([PROMPT])  # the plan changed the model (a random one repeats a token either way)
    logits = [OrtModel(folder / "model.onnx").run_numpy(ids) for folder in (out, built)]
    assert np.abs(logits[0] - logits[1]).max() > 1e-3
