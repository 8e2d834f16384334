"""Synthetic retrieval for calibration: the needle-in-text form, and the choice of the form the
dense model answers (on refllama-16m, trained on the lines form, and on stand-in models that
answer only some forms)."""
from __future__ import annotations

import re

import pytest
import torch

from tailor.core.errors import TailorError
from tailor.data.retrieval import (
    TEMPLATES,
    RetrievalTemplate,
    answer_logits,
    answered,
    answered_sequences,
    choose_template,
    make_samples,
)
from tailor.data.text import load_tokenizer
from tests.conftest import REFLLAMA, needs_shared


class Oracle(torch.nn.Module):
    """Answers exactly the samples whose prompt holds a line matching `answers`: logits that put
    each next true token first, wrong ones everywhere else."""

    def __init__(self, samples, answers: bool, vocab: int = 8192):
        super().__init__()
        self.known = {tuple(s.ids.tolist()) for s in samples} if answers else set()
        self.vocab = vocab

    def forward(self, ids, positions):
        rows = [row[positions + 1] if tuple(row.tolist()) in self.known
                else (row[positions + 1] + 1) % self.vocab for row in ids]
        return torch.nn.functional.one_hot(torch.stack(rows), self.vocab).float()


@needs_shared
def test_needle_in_text_holds_its_line_once_at_the_length():
    tok = load_tokenizer(REFLLAMA)
    text = torch.tensor(tok((REFLLAMA / "MODEL.md").read_text() * 3, add_special_tokens=False)["input_ids"])
    for template in (t for t in TEMPLATES if t.context in ("text", "filler")):
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
def test_the_chat_form_asks_through_the_chat_template():
    tok = load_tokenizer(REFLLAMA)
    chat = next(t for t in TEMPLATES if t.context == "chat")
    with pytest.raises(TailorError, match="needs a tokenizer with a chat template"):
        make_samples(tok, 300, 1, seed=0, template=chat)
    tok.chat_template = ("{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}"
                         "{% if add_generation_prompt %}<bot>{% endif %}")
    for s in make_samples(tok, 300, 3, seed=4, template=chat):
        assert len(s.ids) == 300
        prompt, answer = tok.decode(s.ids[:s.answer_start]), tok.decode(s.ids[s.answer_start:]).strip()
        key = re.search(r"What is the code word for (\w+)\?", prompt).group(1)
        assert prompt.startswith("<user>") and prompt.count(f"The code word for {key} is {answer}.") == 1
        assert prompt.endswith(f"?</user><bot>The code word for {key} is")
    # the passkey-shaped form: one number, said twice, no key to look it up by
    secret = TEMPLATES[-1]
    for s in make_samples(tok, 300, 3, seed=4, template=secret):
        prompt, answer = tok.decode(s.ids[:s.answer_start]), tok.decode(s.ids[s.answer_start:]).strip()
        assert len(s.ids) == 300 and answer.isdigit()
        line = f"The secret number is {answer}. Remember it. {answer} is the secret number."
        assert prompt.count(line) == 1
        assert prompt.endswith("What is the secret number?</user><bot>The secret number is")
    # a key is needed only where the context is more lines of the form
    assert RetrievalTemplate.parse({"line": "X is {value}.", "query": "X?", "context": "filler"}).line
    with pytest.raises(TailorError, match="must contain"):
        RetrievalTemplate.parse({"line": "X is {value}.", "query": "X?"})


@needs_shared
def test_held_out_sequences_are_the_first_answered_of_each_length():
    tok = load_tokenizer(REFLLAMA)
    candidates = make_samples(tok, 200, 8, seed=1) + make_samples(tok, 300, 8, seed=2)
    # the model answers every other candidate of the first length and only the last of the second
    oracle = Oracle(candidates[0:8:2] + candidates[15:], answers=True)
    runs = []
    run = lambda ids, positions: (runs.append(len(ids[0])), oracle(ids, positions))[1]  # noqa: E731
    kept, answers = answered_sequences(run, candidates, per_length=2)
    kept_all = [candidates[0], candidates[2], candidates[15]]
    assert kept == kept_all
    assert all(s.answered_by(a[0]) for s, a in zip(kept, answers))
    # past the quota of 2 at length 200 nothing more is run; every candidate of 300 is
    assert runs == [200] * 3 + [300] * 8
    assert answered_sequences(run, candidates, per_length=0)[0] == candidates[0:8:2] + candidates[15:]
    # a device that affords 2 runs of length 200 and 7 of 300 finds 1 and none
    runs.clear()
    kept, _ = answered_sequences(run, candidates, per_length=2, max_runs={200: 2, 300: 7})
    assert kept == [candidates[0]] and runs == [200] * 2 + [300] * 7
    # in batches of 3 rows: the same kept, and the batch that fills a quota is the last run
    batched = []
    run3 = lambda ids, positions: (batched.append(ids.shape), oracle(ids, positions))[1]  # noqa: E731
    kept3, answers3 = answered_sequences(run3, candidates, per_length=2, split=lambda ids: list(ids.split(3)))
    assert kept3 == kept_all[:2] + kept_all[-1:] and batched == [(3, 200), (3, 300), (3, 300), (2, 300)]
    assert all(torch.equal(a, b) for a, b in zip(answers3, answers))


@needs_shared
def test_answer_logits_in_batches_match_one_at_a_time():
    from tailor.backends import backend_for
    from tailor.rewriter.capture import capture

    tok = load_tokenizer(REFLLAMA)
    backend = backend_for(capture(REFLLAMA))
    # two lengths, interleaved: each sample's logits come back in its own place
    samples = [*make_samples(tok, 96, 3, seed=1), *make_samples(tok, 128, 2, seed=2),
               *make_samples(tok, 96, 2, seed=3)]
    run = backend.runnable()
    one = [s.answer_logits(run) for s in samples]
    batched = answer_logits(run, samples, split=lambda ids: list(ids.split(2)))
    assert [b.shape for b in batched] == [o.shape for o in one]
    for a, b in zip(one, batched):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@needs_shared
def test_the_check_draws_every_answered_form_in_turn():
    from tailor.data.calibration import Calibration, add_attention_data

    tok = load_tokenizer(REFLLAMA)
    stream = torch.tensor(tok((REFLLAMA / "MODEL.md").read_text() * 3, add_special_tokens=False)["input_ids"])
    cal = Calibration(stream[None, :256], stream[None, 256:512], "test", "0", stream=stream)
    add_attention_data(cal, [256, 512], 384, tok, forms=[TEMPLATES[0], TEMPLATES[3]], samples=2,
                       gate_samples=5, heldout_draws=3)
    # 2 × 3 candidates of each form at the shortest profiled length, the validation length and
    # the longest, forms alternating
    assert [len(s.ids) for s in cal.heldout_retrieval] == [256] * 12 + [384] * 12 + [512] * 12
    def in_filler(samples):
        return [tok.decode(s.ids).count("The kettle began to boil.") > 3 for s in samples]

    assert in_filler(cal.heldout_retrieval) == [False, True] * 18
    assert cal.heldout_retrieval_per_length == 4
    assert cal.heldout_retrieval_runs == 2  # 2 × 2 over three lengths, rounded up
    # the profile and the gates keep to the first form
    assert in_filler(cal.retrieval[256]) == in_filler(cal.retrieval[512]) == [False, False]
    assert in_filler(cal.gate_retrieval) == [False] * 5
    assert [len(s.ids) for s in cal.gate_retrieval] == [512] * 5


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
    samples = {i: make_samples(tok, 512, 4, 0 + i, t, text) for i, t in enumerate(TEMPLATES[:4])}
    prose_only = Oracle(samples[2], answers=True)
    template, shares = choose_template(prose_only, tok, 512, text, seed=0)
    # no chat form: the tokenizer has no chat template
    assert template == TEMPLATES[2] and list(shares.values()) == [0.0, 0.0, 1.0, 0.0], shares
    # one that answers nothing calibrates no retrieval
    assert choose_template(Oracle([], answers=False), tok, 512, text, seed=0)[0] is None
    assert answered(prose_only, samples[0]) == 0.0 and answered(prose_only, samples[2]) == 1.0


def test_the_summary_says_what_retrieval_was_calibrated_on(tmp_path, capsys):
    from types import SimpleNamespace

    from tailor.cli.main import print_summary

    plan = SimpleNamespace(rewrites=[], predicted={"kv_memory": 1.0}, objective="kv_memory")
    secret = {"line": TEMPLATES[-1].line, "context": "chat"}
    shares = {"lines: {key} = {value}": 0.0, "text: The code word for {key} is {value}. Remember it.": 1.0,
              f"chat: {secret['line'].strip()}": 0.75}
    chosen = {"line": TEMPLATES[2].line, "context": "text"}
    for form, warned in ((chosen, False), (None, True)):
        forms = [form, secret] if form else []
        report = {"calibration": {"dense_answered": shares, "retrieval_forms": forms,
                                  "heldout_retrieval_answered": 3 if form else 0}}
        if form:  # two plans measured: the closer one's retrieval is said
            report["search"] = {"iterations": [
                {"iteration": 0, "options": [], "measured_kl": 0.2, "retrieval_answered": 1},
                {"iteration": "StreamingLLM", "options": [], "measured_kl": 0.1, "retrieval_answered": 2}]}
        print_summary(SimpleNamespace(plan=plan, report=report), tmp_path)
        out = capsys.readouterr().out
        words = " ".join(re.sub("[│┃]", " ", out).split())  # the cell may wrap
        assert ("it answers 2 of the 3 retrieval sequences the original does" in words) == bool(form)
        assert "retrieval calibrated on" in out
        assert ("The code word for" in out) == (form is not None)
        # the form fitted on first, then those the check also draws, each with its share
        assert ("(answered 100% at ≤ 1K tokens); checked also on chat: The secret number is" in words) \
            == (form is not None)
        assert ("(answered 75% at" in words) == (form is not None)
        assert ("answered none of the synthetic retrieval forms" in out) == warned
