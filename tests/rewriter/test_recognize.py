"""Recognition finds the same structure in the torch and ONNX form of every family."""
from __future__ import annotations

import pytest

from tailor.rewriter.capture import capture
from tests.conftest import FAMILIES

# family -> (heads, kv heads, head_dim, ffn kind, ffn width, positional, task, residual)
EXPECTED = {
    "llama": (4, 2, 16, "gated", 96, "rope", "causal-lm", "pre_norm"),
    "qwen2": (4, 2, 16, "gated", 96, "rope", "causal-lm", "pre_norm"),
    "mistral": (8, 2, 8, "gated", 96, "rope", "causal-lm", "pre_norm"),
    "gpt2": (4, 4, 16, "mlp", 256, "learned", "causal-lm", "pre_norm"),
    "bert": (4, 4, 16, "mlp", 96, "learned", "encoder", "post_norm"),
}


def _check(graph, name):
    heads, kv, hd, ffn, width, pos, task, residual = EXPECTED[name]
    assert graph.num_layers == 3
    assert graph.task == task
    assert graph.positional == pos
    assert graph.hidden_size == 64 and graph.vocab_size == 96
    for b in graph.blocks:
        a = b.attn
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (heads, kv, hd)
        assert a.causal == (task == "causal-lm")
        assert a.rope == (pos == "rope")
        assert (b.ffn.kind, b.ffn.width) == (ffn, width)
        assert b.residual == residual
        assert len(b.norms) == 2
        assert (b.ffn.gate is not None) == (ffn == "gated")
    return graph


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_structure(name, tiny_models):
    g = _check(capture(tiny_models[name]).graph, name)
    a = g.blocks[1].attn
    if name in ("llama", "qwen2", "mistral"):
        assert a.q.weight.name == "model.layers.1.self_attn.q_proj.weight"
        assert g.blocks[1].ffn.gate.weight.name == "model.layers.1.mlp.gate_proj.weight"
        assert g.blocks[1].ffn.activation == "silu"
    if name == "qwen2":
        assert a.q.bias is not None and a.k.bias is not None and a.o.bias is None
    if name == "gpt2":
        # one fused c_attn weight, three column ranges
        assert a.q.weight.name == a.k.weight.name == a.v.weight.name == "transformer.h.1.attn.c_attn.weight"
        assert (a.q.columns, a.k.columns, a.v.columns) == ((0, 64), (64, 128), (128, 192))
        assert g.tied_embeddings and g.embedding.position.shape == (128, 64)
    if name == "bert":
        assert g.embedding.norm is not None and g.embedding.extra  # LayerNorm, token types
        assert g.lm_head is None


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_structure(name, tiny_onnx, tiny_models):
    g = _check(capture(tiny_onnx[name]).graph, name)
    torch_g = capture(tiny_models[name]).graph
    # same parameter count from initializers as from the state dict
    assert g.params == torch_g.params
    assert g.tied_embeddings == torch_g.tied_embeddings
    if name == "gpt2":
        a = g.blocks[0].attn
        assert (a.q.columns, a.k.columns, a.v.columns) == ((0, 64), (64, 128), (128, 192))
    if name == "qwen2":
        assert g.blocks[0].attn.q.bias is not None


def test_networkx_view(tiny_models):
    g = capture(tiny_models["llama"]).graph
    nxg = g.to_networkx()
    import networkx as nx
    path = nx.shortest_path(nxg, "embedding", "head")
    assert path == ["embedding"] + [f"layer{i}.{p}" for i in range(3) for p in ("attn", "ffn")] + ["head"]
    assert nxg.nodes["layer0.attn"]["kv_heads"] == 2


def test_torchscript_exported_bert(tiny_models, tmp_path):
    """The legacy TorchScript exporter (as used by many published .onnx files) writes no
    intermediate shapes and a different decomposition; recognition still finds the structure."""
    import torch

    from tailor.backends.runners import HFModel

    path = tmp_path / "legacy_bert.onnx"
    ids = torch.randint(0, 96, (2, 12))
    torch.onnx.export(HFModel(tiny_models["bert"]), (ids,), str(path), dynamo=False,
                      input_names=["input_ids"], output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}}, opset_version=17)
    _check(capture(path).graph, "bert")



def test_onnx_tied_head_read_through_transpose(tiny_onnx, tmp_path):
    """Exporters write a large lm_head tied to the embedding as MatMul(x, Transpose(table)) (the
    constant folder leaves big weights alone): it must still be the LM head, else the model is a
    headless "decoder" whose logits are compared by cosine and whose head goes unpriced."""
    import onnx_ir as ir

    model = ir.load(tiny_onnx["llama"])
    g = capture(tiny_onnx["llama"]).graph
    table = next(v for v in model.graph.initializers.values() if v.name == g.embedding.token.name)
    head = next(n for n in model.graph if n.name == g.lm_head.node)
    transpose = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, name="tied_head_t")
    model.graph.insert_before(head, transpose)
    head.replace_input_with(1, transpose.outputs[0])
    ir.save(model, tmp_path / "model.onnx")
    tied = _check(capture(tmp_path / "model.onnx").graph, "llama")
    assert tied.lm_head.layout == "out_in" and tied.lm_head.weight.name == g.embedding.token.name
    assert (tied.lm_head.in_features, tied.lm_head.out_features) == (64, 96)
    assert tied.tied_embeddings
