"""Synthetic long-range retrieval: a `key = value` line somewhere in a long context, then a query
for that key. It reveals the heads that read far back, for calibration, and measures whether a
rewritten model still can, as a probe.

The default template is code-shaped, in LongEval's "lines" form: the whole context is such lines
(refllama-16m learned exactly this):
    kamo_ruta = 48213
    zibe_lovo = 907
    ...
    assert zibe_lovo == 907
A pretrained model that never saw the form may not solve it at all (SmolLM2-135M-Instruct: 0 of 8
at 1K tokens), and then the KL at its answers measures noise. The "text" context puts the one
queried line into a window of the calibration text instead (a needle in a haystack), which such
models do answer; `choose_template` keeps the one of TEMPLATES that the dense model answers most.
The queried line sits anywhere in the context. Exact match is teacher-forced: the model's argmax
at every answer position must be the answer's token; this equals greedy decoding's exact match
(greedy produces token k+1 from the same prefix as teacher forcing whenever tokens 1..k matched).
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tailor.core.errors import TailorError

CONTEXTS = ("lines", "text", "filler", "chat")
# the "filler" context: the haystack of passkey tests, these sentences over and over
FILLER_SENTENCES = ("The morning was quiet.", "A bird sang outside.", "The kettle began to boil.",
                    "Someone closed a door.", "The clock ticked on.")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class RetrievalTemplate:
    line: str = "{key} = {value}\n"
    query: str = "assert {key} =="
    answer: str = " {value}"
    max_value: int = 99999
    # "lines": the context is more lines of the template; "text": the queried line alone, inside
    # a window of the calibration text; "filler": alone, inside repeated FILLER_SENTENCES; "chat":
    # that filler and the query as the user's turn of the tokenizer's chat template, `reply` the
    # start of the assistant's (the answer follows it)
    context: str = "lines"
    reply: str = ""

    @classmethod
    def parse(cls, spec: dict) -> "RetrievalTemplate":
        fields = ("line", "query", "answer", "max_value", "context", "reply")
        t = cls(**{k: spec[k] for k in fields if k in spec})
        if t.context not in CONTEXTS:
            raise TailorError(f"retrieval template: context {t.context!r} is one of {', '.join(CONTEXTS)}")
        # a key tells the queried line from the others: a "lines" context needs one
        keyed = ("key",) if t.context == "lines" else ()
        for field, names in (("line", keyed + ("value",)), ("query", keyed), ("answer", ("value",))):
            text = getattr(t, field)
            if any("{" + n + "}" not in text for n in names):
                raise TailorError(f"retrieval template: {field} {text!r} must contain "
                                  + " and ".join("{" + n + "}" for n in names))
        return t


def _name(rng: random.Random) -> str:
    group = lambda k: "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(k))  # noqa: E731
    return "_".join(group(rng.choice((2, 2, 3))) for _ in range(rng.choice((2, 2, 3))))


@dataclass
class RetrievalSample:
    ids: torch.Tensor          # [T] prompt + answer tokens
    answer_start: int          # first answer token's position
    answer_len: int
    form: str = ""             # form_name of the template it was written from

    @property
    def answer_positions(self) -> torch.Tensor:
        """The positions whose next-token logits predict the answer."""
        return torch.arange(self.answer_start - 1, self.answer_start - 1 + self.answer_len)

    def answer_logits(self, run) -> torch.Tensor:
        """run(ids [1, T], positions=P) -> logits [1, |P|, V] at the answer positions, in float32."""
        return _batch_answers(run, [self])[0]

    def answered_by(self, answer_logits: torch.Tensor) -> bool:
        """answer_logits [answer_len, V], at answer_positions: does their argmax give every answer
        token (teacher-forced exact match)?"""
        predicted = answer_logits.argmax(-1).cpu()
        return bool((predicted == self.ids[self.answer_start:self.answer_start + self.answer_len]).all())


_CODE_WORD_QUERY = "\nWhat is the code word for {key}? The code word for {key} is"
# the forms choose_template tries, in order: refllama-16m's own, then one line in the calibration
# text, code-shaped and in prose, then the prose line in filler (passkey tests' haystack), and
# that filler asked about through the chat template (how an instruct model is deployed)
TEMPLATES = (
    RetrievalTemplate(),
    RetrievalTemplate(line="\n{key} = {value}\n", query="\nassert {key} ==", context="text"),
    RetrievalTemplate(line="\nThe code word for {key} is {value}. Remember it.\n", query=_CODE_WORD_QUERY,
                      context="text"),
    RetrievalTemplate(line=" The code word for {key} is {value}. Remember it.", query=_CODE_WORD_QUERY,
                      context="filler"),
    RetrievalTemplate(line=" The code word for {key} is {value}. Remember it.",
                      query="\n\nWhat is the code word for {key}?", context="chat",
                      reply="The code word for {key} is"),
    # the passkey test's shape: one number in filler, said twice, no name to look it up by, asked
    # for through the chat template; what the field probes long context with and DuoAttention
    # calibrates on. SmolLM2-135M answers it at 4K (0.94) where it answers the named code word in
    # chat 0.06: a plan that keeps the one may lose the other
    RetrievalTemplate(line=" The secret number is {value}. Remember it. {value} is the secret number.",
                      query="\n\nThere is a secret number hidden in the text above. "
                            "What is the secret number?",
                      context="chat", reply="The secret number is"),
)
# a form the dense model answers at least this often (choose_template's share) is one the
# held-out check measures plans on
ANSWERED_FORM_SHARE = 0.5


def form_name(template: RetrievalTemplate) -> str:
    return f"{template.context}: {template.line.strip()}"


def make_samples(tokenizer, length: int, count: int, seed: int,
                 template: RetrievalTemplate = RetrievalTemplate(), text=None) -> list[RetrievalSample]:
    """`count` sequences of exactly `length` tokens (so they batch), the queried line anywhere.
    "lines": lines are added until the context is full, then cut at the front to fit; the queried
    line is one that is kept whole. "text": the line is put at a random depth of a window of
    `text` (token ids, at least `length` of them)."""
    rng = random.Random(seed)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    head, tail = bos, ""
    if template.context == "chat":
        head, tail = _chat_turns(tokenizer)
        head = encode(head)
    if template.context in ("filler", "chat"):
        sentences = encode(" " + " ".join(FILLER_SENTENCES))
        text = torch.tensor(sentences * (length // len(sentences) + 2))
    if template.context != "lines":
        return [_in_text(encode, head, tail, length, rng, template, text) for _ in range(count)]
    samples = []
    for _ in range(count):
        keys: dict[str, int] = {}
        lines: list[list[int]] = []
        while sum(map(len, lines)) < length:
            key = _name(rng)
            if key not in keys:
                keys[key] = rng.randint(0, template.max_value)
                lines.append(encode(template.line.format(key=key, value=keys[key])))
        names = list(keys)
        # the query's and answer's lengths depend on the target: try targets until one fits whole
        for target in rng.sample(names, len(names)):
            query = encode(template.query.format(key=target))
            answer = encode(template.answer.format(value=keys[target]))
            room = length - len(bos) - len(query) - len(answer)
            body = [t for line in lines for t in line]
            start = sum(map(len, lines[:names.index(target)]))
            if 0 < room and start >= len(body) - room:
                break
        else:
            raise TailorError(f"retrieval probe: length {length} is too short for the template")
        prompt = bos + body[len(body) - room:] + query
        samples.append(RetrievalSample(torch.tensor(prompt + answer), len(prompt), len(answer),
                                       form_name(template)))
    return samples


def _chat_turns(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after the user's message (the assistant's turn opened)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TailorError("retrieval probe: the \"chat\" context needs a tokenizer with a chat template")
    mark = "\x00MESSAGE\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True,
                                             tokenize=False)
    head, tail = rendered.split(mark)
    return head, tail


def _in_text(encode, head: list[int], tail: str, length: int, rng: random.Random, template: RetrievalTemplate,
             text) -> RetrievalSample:
    if text is None or len(text) < length:
        raise TailorError(f"retrieval probe: the {template.context!r} context needs {length} tokens of text")
    key, value = _name(rng), rng.randint(0, template.max_value)
    line = encode(template.line.format(key=key, value=value))
    query = encode(template.query.format(key=key) + tail + template.reply.format(key=key))
    answer = encode(template.answer.format(value=value))
    room = length - len(head) - len(line) - len(query) - len(answer)
    if room <= 0:
        raise TailorError(f"retrieval probe: length {length} is too short for the template")
    start = rng.randrange(len(text) - room + 1)
    body = torch.as_tensor(text[start:start + room]).tolist()
    at = rng.randrange(room + 1)
    prompt = head + body[:at] + line + body[at:] + query
    return RetrievalSample(torch.tensor(prompt + answer), len(prompt), len(answer), form_name(template))


def answered(run, samples: list[RetrievalSample]) -> float:
    """Share of `samples` whose answer run(ids [1, T], positions=P) -> logits [1, |P|, V] gets
    exactly right (teacher-forced), the head run at the answer positions only."""
    hits = sum(s.answered_by(a[0]) for s, a in zip(samples, answer_logits(run, samples)))
    return hits / max(1, len(samples))


def choose_template(run, tokenizer, length: int, text, seed: int,
                    samples: int = 4) -> tuple[RetrievalTemplate | None, dict[str, float]]:
    """Of TEMPLATES, the one whose `samples` sequences of `length` tokens the dense model `run`
    answers most (the earlier on a tie); None where it answers none (then retrieval calibrates
    nothing). Also each form's share, by its context and line. The most answered, not the first
    answered well enough: SmolLM2-135M answered the code line 3 of 4 times at 1K, yet 1 of the 8
    held-out sequences of 6K and 8K tokens; the prose line 4 of 4 at 1K, and 2 of those 8.
    (Several forms answered: the others are held out, tailor.stages.calibrate.)"""
    shares: dict[str, float] = {}
    best, best_share = None, 0.0
    for i, template in enumerate(TEMPLATES):
        try:
            drawn = make_samples(tokenizer, length, samples, seed + i, template, text)
        except TailorError:  # too short for this form
            continue
        share = answered(run, drawn)
        shares[form_name(template)] = share
        if share > best_share:
            best, best_share = template, share
    return best, shares


def exact_match(logits: torch.Tensor, sample: RetrievalSample) -> bool:
    """logits [T, V] of one sample: does the argmax reproduce every answer token?"""
    return sample.answered_by(logits[sample.answer_positions.to(logits.device)])


def retrieval_accuracy(model, tokenizer, lengths: list[int], samples: int = 32, seed: int = 1234,
                       template: RetrievalTemplate = RetrievalTemplate()) -> dict[int, float]:
    """Exact-match accuracy per context length; model(input_ids [1, T]) -> logits [1, T, V]."""
    out = {}
    with torch.no_grad():
        for n in lengths:
            hits = [exact_match(model(s.ids[None])[0], s)
                    for s in make_samples(tokenizer, n, samples, seed + n, template)]
            out[n] = sum(hits) / len(hits)
    return out


def one_row_each(ids: torch.Tensor) -> list[torch.Tensor]:
    return list(ids.split(1))


def answer_logits(run, samples: list[RetrievalSample], split=one_row_each) -> list[torch.Tensor]:
    """Each sample's answer logits [1, answer_len, V] in float32, as RetrievalSample.answer_logits
    gives them, the samples of one length run together in the batches that `split(ids [n, T])`
    makes (a backend's input_batches): on a GPU a small model's forward costs its kernel launches
    whatever its batch, and SmolLM2-135M's compile on an H100 spent 43 of its 155 s running the
    held-out check's 60 retrieval sequences one at a time."""
    out: list = [None] * len(samples)
    for rows in _by_length(samples).values():
        for batch in _batched(rows, split, samples):
            for i, logits in zip(batch, _batch_answers(run, [samples[i] for i in batch])):
                out[i] = logits
    return out


def answered_sequences(run, candidates: list[RetrievalSample], per_length: int = 0,
                       max_runs: dict[int, int] | None = None, split=one_row_each
                       ) -> tuple[list[RetrievalSample], list[torch.Tensor]]:
    """The first `per_length` of `candidates` of each length (0: all) whose answer `run` gets
    exactly right, and its answer logits [1, answer_len, V] for each; at most `max_runs[length]`
    candidates of a length are run (where given), in the batches `split` makes, none after the
    batch that fills a length's quota."""
    kept: dict[int, torch.Tensor] = {}
    for n, rows in _by_length(candidates).items():
        count = 0
        for batch in _batched(rows[:max_runs.get(n, 0)] if max_runs else rows, split, candidates):
            for i, answer in zip(batch, _batch_answers(run, [candidates[i] for i in batch])):
                if (not per_length or count < per_length) and candidates[i].answered_by(answer[0]):
                    kept[i] = answer
                    count += 1
            if per_length and count >= per_length:
                break
    order = sorted(kept)
    return [candidates[i] for i in order], [kept[i] for i in order]


def _by_length(samples: list[RetrievalSample]) -> dict[int, list[int]]:
    """The indices of `samples` of each length, in order."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(len(s.ids), []).append(i)
    return groups


def _batched(rows: list[int], split, samples: list[RetrievalSample]) -> Iterator[list[int]]:
    """`rows` (indices of samples of one length) in the batches `split` makes of their ids."""
    start = 0
    for ids in split(torch.stack([samples[i].ids for i in rows])) if rows else []:
        yield rows[start:start + len(ids)]
        start += len(ids)


def _batch_answers(run, samples: list[RetrievalSample]) -> list[torch.Tensor]:
    """run on the samples' ids as one batch, the head at the union of their answer positions;
    each sample's own positions picked out."""
    positions = torch.unique(torch.cat([s.answer_positions for s in samples]))
    with torch.no_grad():
        logits = run(torch.stack([s.ids for s in samples]), positions=positions).float()
    return [logits[r:r + 1, torch.searchsorted(positions, s.answer_positions).to(logits.device)]
            for r, s in enumerate(samples)]
