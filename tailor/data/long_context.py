"""Long-context probes on real prompts: passkey retrieval through a chat template, and repeated
random tokens.

Passkey (Mohtashami & Jaggi 2023, as long-context papers use it): a random 5-digit key sits at
a random depth in repetitive filler; the user's turn ends by asking for it; the model answers in
its own words, greedily, and is right when the first number of its reply is the key.

Repeated random tokens: a random sequence of half the length, then the same again; from the
second copy's first token on, every next token can be read off the first copy (induction
heads do), and nothing else predicts it.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = ("There is a pass key hidden in the text above. Find it and memorize it. "
            "What is the pass key? Answer with the number only.")


@dataclass
class PasskeySample:
    ids: list[int]        # the prompt, through the chat template, ready for the reply
    key: str
    depth: float          # where the key line sits in the filler: 0 first, 1 last


def _filler_sentences(count: int) -> list[str]:
    sentences = [s + "." for s in FILLER.rstrip(".").split(". ")]
    return [sentences[k % len(sentences)] for k in range(count)]


def _prompt(tokenizer, sentences: list[str], key_line: str, at: int) -> list[int]:
    text = " ".join(sentences[:at] + [key_line] + sentences[at:]) + "\n\n" + QUESTION
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def passkey_samples(tokenizer, length: int, count: int, seed: int) -> list[PasskeySample]:
    """`count` prompts of at most `length` tokens (within a filler sentence of it), each with its
    own key and depth, drawn from `seed`."""
    rng = random.Random(seed)
    sample = " ".join(_filler_sentences(100))
    per_sentence = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 100
    samples = []
    for _ in range(count):
        key, depth = str(rng.randint(10000, 99999)), rng.random()
        line = KEY_LINE.format(key=key)
        overhead = len(_prompt(tokenizer, [], line, 0))
        n = max(0, int((length - overhead) / per_sentence))
        while True:  # the estimate from the mean sentence is close: step to the longest that fits
            ids = _prompt(tokenizer, _filler_sentences(n), line, round(depth * n))
            if len(ids) <= length or n == 0:
                break
            n -= 1
        while n and len(longer := _prompt(tokenizer, _filler_sentences(n + 1), line,
                                          round(depth * (n + 1)))) <= length:
            n, ids = n + 1, longer
        samples.append(PasskeySample(ids, key, depth))
    return samples


def passkey_correct(reply: str, key: str) -> bool:
    """The first number in the reply is the key, exactly."""
    found = re.search(r"\d+", reply)
    return found is not None and found.group() == key


def repeated_tokens(tokenizer, length: int, count: int, seed: int) -> tuple[torch.Tensor, int]:
    """[count, length] sequences: the tokenizer's BOS (where it has one), then a random run of
    ordinary tokens (no special ones) and the same run again; and where the second copy starts."""
    rng = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([t for t in range(tokenizer.vocab_size) if t not in special])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    half = (length - len(bos)) // 2
    rows = []
    for _ in range(count):
        run = ordinary[torch.randint(len(ordinary), (half,), generator=rng)].tolist()
        rows.append(bos + run + run + run[:length - len(bos) - 2 * half])  # odd room: one more copied
    return torch.tensor(rows), len(bos) + half


def copy_accuracy(predicted: torch.Tensor, ids: torch.Tensor, start: int) -> float:
    """Share of the second copy's tokens after its first that the model predicts:
    `predicted` [B, T - 1 - start] holds the argmax at positions start .. T - 2."""
    return float((predicted.cpu() == ids[:, start + 1:]).double().mean())
