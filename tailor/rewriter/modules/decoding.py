"""The hook between rewritten models and tailor's generation runtime.

While tailor.runtime.generate drives a model it sets the active decode state here; the attention
modules that rewrites install (sparse attention, shared-KV attention) then attend over its per-head
KV cache through `state.attend(module, q, k, v, scale, causal)` instead of computing attention
themselves. It lives here, below the runtime, so that those modules need not import it.
"""
from __future__ import annotations

import contextvars
from typing import Any

ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("tailor_decode", default=None)


def active_state() -> Any:
    """The runtime's DecodeState while it generates, else None."""
    return ACTIVE.get()
