"""Shared fixtures: tiny random models of every supported family, in torch and ONNX form.

ONNX exports take seconds each, so they are made once per session and cached.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers as tf

# Triton kernels run on the CPU through Triton's interpreter (tests/codegen); it must be chosen
# before any kernel module is imported. On a CUDA machine the same tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / "../shared").resolve()
REFLLAMA = SHARED / "models" / "refllama-16m"

needs_shared = pytest.mark.skipif(not REFLLAMA.is_dir(),
                                  reason=f"../shared/models/refllama-16m not found at {REFLLAMA}")


@pytest.fixture
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF, where scripts/fetch_smollm2.py puts it."""
    from scripts.fetch_smollm2 import gguf_path

    path = gguf_path()
    if not path.is_file():
        pytest.skip(f"{path} not found: python scripts/fetch_smollm2.py puts it there")
    return path


_COMMON = dict(vocab_size=96, num_hidden_layers=3)


def family_config(name: str):
    if name == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, **_COMMON)
    if name == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, **_COMMON)
    if name == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=8,
                                num_key_value_heads=2, head_dim=8, **_COMMON)
    if name == "gpt2":
        return tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                             bos_token_id=0, eos_token_id=0)
    if name == "bert":
        return tf.BertConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                             max_position_embeddings=128, **_COMMON)
    raise KeyError(name)


FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "bert"]


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = family_config(name)
    config.use_cache = False
    model = tf.BertModel(config) if name == "bert" else tf.AutoModelForCausalLM.from_config(config)
    return perturb_vectors(model).eval()


def perturb_vectors(model: torch.nn.Module) -> torch.nn.Module:
    """Random init leaves norms at 1 and biases at 0 (which exporters fold away or merge);
    perturb them so that every weight is distinct and a mix-up would show."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_models():
    return {name: build_model(name) for name in FAMILIES}


@pytest.fixture(scope="session")
def tiny_onnx(tiny_models, tmp_path_factory):
    """name -> path of the model exported with torch.onnx.export(dynamo=True)."""
    from tailor.backends.export import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name, model in tiny_models.items():
        path = root / name / "model.onnx"
        path.parent.mkdir()
        export_onnx(model, path, encoder=name == "bert")
        paths[name] = path
    return paths


@pytest.fixture(scope="session")
def tiny_hf_dirs(tiny_models, tmp_path_factory):
    """name -> an HF directory (config.json + model.safetensors) of the model."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name, model in tiny_models.items():
        model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def ids_for(vocab: int = 96, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
