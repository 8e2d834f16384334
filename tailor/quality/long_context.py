"""Long-context accuracy of a causal LM (model(input_ids) -> logits, a transformers model inside):
passkey retrieval by greedy generation over tailor's per-head KV cache (so that a plan's
patterns, shared and pruned caches act as they will deployed), and next-token accuracy on the
second copy of repeated random tokens (teacher-forced, one forward)."""
from __future__ import annotations

import torch

from tailor.data.long_context import PasskeySample, copy_accuracy, passkey_correct
from tailor.runtime.generate import generate

# greedy tokens generated for a passkey reply: "The pass key is 12345." with digits one token each
PASSKEY_REPLY_TOKENS = 16


def passkey_accuracy(model, tokenizer, samples: list[PasskeySample], batch: int = 8) -> float:
    """Share of samples whose greedy reply names the key first (tailor.data.long_context)."""
    correct = 0
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        replies = generate(model, [s.ids for s in chunk], PASSKEY_REPLY_TOKENS,
                           eos_token_id=tokenizer.eos_token_id)
        correct += sum(passkey_correct(tokenizer.decode(r, skip_special_tokens=True), s.key)
                       for r, s in zip(replies, chunk))
    return correct / len(samples)


def repeat_accuracy(model, ids: torch.Tensor, start: int) -> float:
    """Mean over the rows of ids [B, T] (tailor.data.long_context.repeated_tokens) of the share
    of the second copy predicted, one row per forward; only the positions scored get logits."""
    positions = torch.arange(start, ids.shape[1] - 1)
    with torch.no_grad():
        predicted = torch.cat([model(row[None], positions=positions).argmax(-1).cpu() for row in ids])
    return copy_accuracy(predicted, ids, start)
