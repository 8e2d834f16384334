"""Synthetic retrieval for calibration: the needle-in-text form, and the choice of the form the
dense model answers (on refllama-16m, trained on the lines form, and on stand-in models that
answer only some forms)."""
from __future__ import annotations

import re

import pytest
import torch

from tailor.core.errors import TailorError
from tailor.data.retrieval import TEMPLATES, answered, choose_template, make_samples
from tailor.data.text import load_tokenizer
from tests.conftest import REFLLAMA, needs_shared


class Oracle(torch.nn.Module):
    """Answers exactly the samples whose prompt holds a line matching `answers`: logits that put
    each next true token first, wrong ones everywhere else."""

    def __init__(self, samples, answers: bool, vocab: int = 8192):
        super().__init__()
        self.known = {tuple(s.ids[:s.answer_start].tolist()): s for s in samples} if answers else {}
        self.vocab = vocab

    def forward(self, ids, positions):
        s = self.known.get(tuple(ids[0, :positions[0] + 1].tolist()))
        target = ids[0, positions + 1] if s is not None else (ids[0, positions + 1] + 1) % self.vocab
        return torch.nn.functional.one_hot(target, self.vocab).float()[None]


@needs_shared
def test_needle_in_text_holds_its_line_once_at_the_length():
    tok = load_tokenizer(REFLLAMA)
    text = torch.tensor(tok((REFLLAMA / "MODEL.md").read_text() * 3, add_special_tokens=False)["input_ids"])
    for template in TEMPLATES[1:]:
        query = re.escape(template.query.strip()).replace(re.escape("{key}"), r"(\w+)", 1)
        query = query.replace(re.escape("{key}"), r"\w+")
        for s in make_samples(tok, 400, 5, seed=2, template=template, text=text):
            assert len(s.ids) == 400
            prompt = tok.decode(s.ids[:s.answer_start])
            key = re.search(query + "$", prompt).group(1)
            value = tok.decode(s.ids[s.answer_start:]).strip()
            assert prompt.count(template.line.format(key=key, value=value).strip()) == 1
    # too little text for the window: a clear error
    with pytest.raises(TailorError, match="needs 400 tokens of text"):
        make_samples(tok, 400, 1, seed=0, template=TEMPLATES[1], text=text[:100])


@needs_shared
def test_the_form_the_dense_model_answers_is_chosen():
    from transformers import AutoModelForCausalLM

    from tailor.backends.runners import HFModel

    tok = load_tokenizer(REFLLAMA)
    text = torch.tensor(tok((REFLLAMA / "MODEL.md").read_text() * 4, add_special_tokens=False)["input_ids"])
    model = HFModel(AutoModelForCausalLM.from_pretrained(REFLLAMA, dtype=torch.float32).eval())
    # refllama-16m learned the lines form: chosen first, and answered
    template, shares = choose_template(model, tok, 512, text, seed=0)
    assert template == TEMPLATES[0] and list(shares.values())[0] >= 0.75, shares

    # a model that answers only the prose needle gets it (the earlier forms measured, and passed by)
    samples = {i: make_samples(tok, 512, 4, 0 + i, t, text) for i, t in enumerate(TEMPLATES)}
    prose_only = Oracle(samples[2], answers=True)
    template, shares = choose_template(prose_only, tok, 512, text, seed=0)
    assert template == TEMPLATES[2] and list(shares.values()) == [0.0, 0.0, 1.0], shares
    # one that answers nothing calibrates no retrieval
    assert choose_template(Oracle([], answers=False), tok, 512, text, seed=0)[0] is None
    assert answered(prose_only, samples[0]) == 0.0 and answered(prose_only, samples[2]) == 1.0


def test_the_summary_says_what_retrieval_was_calibrated_on(tmp_path, capsys):
    from types import SimpleNamespace

    from tailor.cli.main import print_summary

    plan = SimpleNamespace(rewrites=[], predicted={"kv_memory": 1.0}, objective="kv_memory")
    shares = {"lines: {key} = {value}": 0.0, "text: The code word for {key} is {value}. Remember it.": 1.0}
    chosen = {"line": TEMPLATES[2].line, "context": "text"}
    for form, warned in ((chosen, False), (None, True)):
        report = {"calibration": {"dense_answered": shares, "retrieval_template": form,
                                  "heldout_retrieval_answered": 3 if form else 0}}
        print_summary(SimpleNamespace(plan=plan, report=report), tmp_path)
        out = capsys.readouterr().out
        assert "retrieval calibrated on" in out
        assert ("The code word for" in out) == (form is not None)
        assert ("answered none of the synthetic retrieval forms" in out) == warned
