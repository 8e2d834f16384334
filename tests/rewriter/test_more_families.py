"""Beyond the five reference families: fused gate_up (Phi-3), QK-norm (Qwen3), (1 + w) norms
and scaled embeddings (Gemma), ReLU MLP with offset positions (OPT) — torch and ONNX form —
and a clear refusal for parallel attention/FFN blocks (GPT-NeoX)."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from tailor.backends.export import export_onnx
from tailor.core.errors import UnrecognizedModel
from tailor.rewriter.capture import capture
from tests.conftest import perturb_vectors

C = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    "phi3": lambda: tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **C),
    "qwen3": lambda: tf.Qwen3Config(num_key_value_heads=2, head_dim=16, **C),
    "gemma": lambda: tf.GemmaConfig(num_key_value_heads=2, head_dim=16, **C),
    "opt": lambda: tf.OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                num_attention_heads=4, word_embed_proj_dim=64, pad_token_id=1),
}
# heads, kv heads, ffn kind, activation, positional
EXPECTED = {
    "phi3": (4, 2, "gated", "silu", "rope"),
    "qwen3": (4, 2, "gated", "silu", "rope"),
    "gemma": (4, 2, "gated", "gelu", "rope"),
    "opt": (4, 4, "mlp", "relu", "learned"),
}


def _model(name):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    cfg.use_cache = False
    return perturb_vectors(tf.AutoModelForCausalLM.from_config(cfg)).eval()


@pytest.fixture(scope="module")
def models():
    return {name: _model(name) for name in CONFIGS}


def _check(g, name):
    heads, kv, kind, act, pos = EXPECTED[name]
    assert g.num_layers == 2 and g.task == "causal-lm" and g.positional == pos
    for b in g.blocks:
        assert (b.attn.num_heads, b.attn.num_kv_heads, b.attn.head_dim) == (heads, kv, 16)
        assert (b.ffn.kind, b.ffn.activation, b.ffn.width) == (kind, act, 96)
    if name == "phi3":
        f, a = g.blocks[0].ffn, g.blocks[0].attn
        assert f.gate.weight.name == f.up.weight.name
        assert (f.gate.columns, f.up.columns) == ((0, 96), (96, 192))
        assert (a.q.columns, a.k.columns, a.v.columns) == ((0, 64), (64, 96), (96, 128))
    if name == "qwen3":
        assert len(g.blocks[0].attn.qk_norms) == 2
    if name == "gemma" and g.backend == "torch":
        assert all(n.weight_offset == 1.0 for n in g.blocks[0].norms)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch(name, models):
    _check(capture(models[name]).graph, name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_onnx(name, models, tmp_path):
    path = tmp_path / "model.onnx"
    export_onnx(models[name], path, encoder=False)
    g = capture(path).graph
    _check(g, name)
    assert g.params == capture(models[name]).graph.params


def test_parallel_blocks_refused_clearly():
    cfg = tf.GPTNeoXConfig(use_cache=False, **C)
    with pytest.raises(UnrecognizedModel, match="parallel attention and FFN"):
        capture(tf.AutoModelForCausalLM.from_config(cfg).eval())
