"""Synthetic long-range retrieval: many `key = value` lines, then a query for one key
(LongEval "lines"-like). It reveals the heads that read far back, for calibration, and measures
whether a rewritten model still can, as a probe.

The default template is code-shaped (refllama-16m learned exactly this):
    kamo_ruta = 48213
    zibe_lovo = 907
    ...
    assert zibe_lovo == 907
The queried line sits anywhere in the context. Exact match is teacher-forced: the model's argmax
at every answer position must be the answer's token; this equals greedy decoding's exact match
(greedy produces token k+1 from the same prefix as teacher forcing whenever tokens 1..k matched).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tailor.core.errors import TailorError

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class RetrievalTemplate:
    line: str = "{key} = {value}\n"
    query: str = "assert {key} =="
    answer: str = " {value}"
    max_value: int = 99999

    @classmethod
    def parse(cls, spec: dict) -> "RetrievalTemplate":
        t = cls(**{k: spec[k] for k in ("line", "query", "answer", "max_value") if k in spec})
        for field, names in (("line", ("key", "value")), ("query", ("key",)), ("answer", ("value",))):
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


def make_samples(tokenizer, length: int, count: int, seed: int,
                 template: RetrievalTemplate = RetrievalTemplate()) -> list[RetrievalSample]:
    """`count` sequences of exactly `length` tokens (so they batch), the queried line anywhere.
    Lines are added until the context is full, then cut at the front to fit; the queried line is
    one that is kept whole."""
    rng = random.Random(seed)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
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
        samples.append(RetrievalSample(torch.tensor(prompt + answer), len(prompt), len(answer)))
    return samples


def exact_match(logits: torch.Tensor, sample: RetrievalSample) -> bool:
    """logits [T, V] of one sample: does the argmax reproduce every answer token?"""
    s, n = sample.answer_start, sample.answer_len
    predicted = logits[s - 1:s - 1 + n].argmax(-1)
    return bool((predicted == sample.ids[s:s + n]).all())


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
