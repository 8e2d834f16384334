"""GGUF files as input: tiny Llama and Qwen2 files written with the gguf package's writer (weights
of a random torch model, a byte-level BPE trained here, a chat template) load as that model, and
inspect, optimize and load work on them; bad files are one line and exit 2."""
from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import torch
import transformers as tf

import tailor
from tailor.cli.default_model import CALIB_MODULES, docstring_sentences
from tailor.cli.main import main, optimize_main
from tailor.data.text import load_tokenizer
from tailor.rewriter import capture as capture_module
from tailor.rewriter.capture import load_gguf, read_gguf_header
from tests.conftest import ids_for, perturb_vectors
from tests.test_cli_errors import _fails
from tests.test_no_pickle import SMALL, no_unpickling  # noqa: F401 (a fixture)

gguf = pytest.importorskip("gguf")

Q8_0 = gguf.GGMLQuantizationType.Q8_0
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SENTENCES = docstring_sentences(CALIB_MODULES[:6])


def train_tokenizer():
    """A byte-level BPE of ~300 tokens (the special ones first), trained on English docstrings."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert script reorders Llama's q/k rows (rotary halves interleaved); transformers
    undoes it on load."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build(family: str, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=False, **common))
    else:  # with q/k/v biases and tied embeddings: both kinds covered
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=True, **common))
    return perturb_vectors(model).eval()


def write_gguf(model: torch.nn.Module, tok, path, quantized: bool = False) -> None:
    """The model's weights under llama.cpp's tensor names (F32, or matrices in Q8_0 blocks where
    `quantized`), its shape and tokenizer as the metadata llama.cpp's convert script writes."""
    c = model.config
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[c.model_type]
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), c.model_type)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m
                        for m in json.loads(tok.to_str())["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(SPECIAL.index("<|im_end|>"))
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # a tied head is the embedding: a file without output.weight
        if c.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = llama_cpp_permute(t, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        base, suffix = name.rsplit(".", 1)
        gguf_name, data = f"{names.get_name(base)}.{suffix}", t.float().numpy().copy()
        if quantized and data.ndim == 2:  # norms and biases stay F32, as llama.cpp keeps them
            w.add_tensor(gguf_name, gguf.quants.quantize(data, Q8_0), raw_dtype=Q8_0)
        else:
            w.add_tensor(gguf_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """family -> (the torch model, its .gguf, the tokenizer it holds)."""
    root = tmp_path_factory.mktemp("gguf")
    tok = train_tokenizer()
    out = {}
    for family in ("llama", "qwen2"):
        model = build(family, tok.get_vocab_size())
        write_gguf(model, tok, root / f"{family}.gguf")
        out[family] = (model, root / f"{family}.gguf", tok)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_loads_as_the_model_it_was_written_from(family, tiny_gguf):
    from tailor.backends.runners import open_model

    model, path, tok = tiny_gguf[family]
    loaded = load_gguf(path)
    assert type(loaded) is type(model) and loaded.dtype == torch.float32
    assert not hasattr(loaded.config, "quantization_config") and loaded.hf_quantizer is None
    ids = ids_for(vocab=model.config.vocab_size)
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(open_model(path)(ids), want, rtol=0, atol=1e-5)  # eval/bench --reference
    text = " ".join(SENTENCES[:3])
    from_file = load_tokenizer(path)
    assert from_file(text)["input_ids"] == tok.encode(text).ids
    assert from_file.decode(from_file(text)["input_ids"]) == text
    chat = from_file.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


def test_a_load_parses_the_file_once(tiny_gguf, monkeypatch):
    """transformers alone parses a file for its config and again for its weights, and builds
    gguf's name table once a module: the load hands it one parse and one table, then puts gguf
    back as it was."""
    parses, tables = [], []
    parse, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parses.append(a) or parse(*a, **k))
    monkeypatch.setattr(gguf, "get_tensor_name_map", lambda *a: tables.append(a) or name_map(*a))
    counting = gguf.GGUFReader, gguf.get_tensor_name_map
    model, path, tok = tiny_gguf["qwen2"]
    loaded = load_gguf(path)
    assert len(parses) == 1 and len(tables) == 1
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == counting
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    # the tokenizer was built on the same parse, and is kept for the file as it is
    text = "def f(x):\n    return x"
    assert load_tokenizer(path)(text)["input_ids"] == tok.encode(text).ids and len(parses) == 1
    path.touch()
    load_tokenizer(path)
    assert len(parses) == 2


def test_quantized_blocks_are_dequantized(tiny_gguf, tmp_path):
    model, _, tok = tiny_gguf["llama"]
    path = tmp_path / "q8.gguf"
    write_gguf(model, tok, path, quantized=True)
    assert read_gguf_header(path).stored == torch.bfloat16  # what --dtype auto loads it in on a GPU
    loaded = load_gguf(path).state_dict()
    assert all(t.dtype == torch.float32 for t in loaded.values())
    for name, want in model.state_dict().items():
        # Q8_0: 32 weights share one fp16 scale, max |w| of the block / 127
        err = (loaded[name] - want).abs().max()
        assert err <= want.abs().max() / 127, (name, err)
    assert not torch.equal(loaded["lm_head.weight"], model.lm_head.weight)  # blocks were written


def test_inspect(tiny_gguf, capsys):
    assert main(["inspect", str(tiny_gguf["qwen2"][1]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 2 and info["task"] == "causal-lm" and info["tied_embeddings"]
    assert [(b["heads"], b["kv_heads"], b["head_dim"]) for b in info["blocks"]] == [(4, 2, 16)] * 2


def test_optimize_writes_a_loadable_artifact(tiny_gguf, tmp_path, monkeypatch, no_unpickling):  # noqa: F811
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    model, path, _ = tiny_gguf["llama"]
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "out"
    # three passes keep it short: what is tested is the way in and out, not the search
    assert optimize_main([str(path), "-o", str(out), *SMALL, "--calib", str(calib),
                          "--passes", "layer_skip,ffn_prune,head_prune"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["rewrites"]
    assert plan["model_hash"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()  # the file's
    report = json.loads((out / "report.json").read_text())
    assert report["validation"] and all(c["ok"] for c in report["validation"])  # reloaded == compiled
    loaded = tailor.load(out)
    with torch.no_grad():
        assert torch.isfinite(loaded.model(ids_for(vocab=model.config.vocab_size))).all()
    # the tokenizer the GGUF held, written beside the model: the artifact stands alone
    text = " ".join(SENTENCES[:3])
    assert load_tokenizer(out)(text)["input_ids"] == load_tokenizer(path)(text)["input_ids"]
    assert "im_start" in load_tokenizer(out).chat_template


def _truncated(tmp_path, tiny_gguf, monkeypatch):
    data = tiny_gguf["llama"][1].read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: len(data) // 2])


def _not_gguf(tmp_path, tiny_gguf, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"\x08\x01\x12\x04onnx not gguf")


def _unsupported(tmp_path, tiny_gguf, monkeypatch):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _no_gguf_package(tmp_path, tiny_gguf, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(tiny_gguf["llama"][1].read_bytes())
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError


def _too_big(tmp_path, tiny_gguf, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(tiny_gguf["llama"][1].read_bytes())
    monkeypatch.setattr(capture_module, "host_available", lambda: 1024)


@pytest.mark.parametrize("make, expect", [
    (_truncated, "truncated or corrupt"),
    (_not_gguf, "not a GGUF file"),
    (_unsupported, "architecture 'bert', which transformers"),
    (_no_gguf_package, "pip install 'gguf>=0.10'"),
    (_too_big, "more than the"),
])
def test_bad_gguf_is_one_line_and_exit_2(make, expect, tiny_gguf, tmp_path, monkeypatch, capsys):
    make(tmp_path, tiny_gguf, monkeypatch)
    err = _fails([str(tmp_path / "m.gguf"), "-o", str(tmp_path / "out"), *SMALL], capsys, expect=expect)
    assert str(tmp_path / "m.gguf") in err
    if make is _unsupported:
        assert "llama" in err and "qwen2" in err  # the architectures it does load
    assert not (tmp_path / "out").exists()
    assert _fails(["inspect", str(tmp_path / "m.gguf")], capsys, expect=expect, fn=main)


@pytest.mark.slow
def test_inspect_real_smollm2(smollm2_gguf, capsys):
    assert main(["inspect", str(smollm2_gguf), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 30 and info["vocab_size"] == 49152 and info["tied_embeddings"]
    assert {(b["heads"], b["kv_heads"], b["head_dim"]) for b in info["blocks"]} == {(9, 3, 64)}
