"""SharedKVAttention: a layer's own queries and output projection over another layer's keys and
values (installed by tailor.passes.kv_share)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tailor.rewriter.graph import Block
from tailor.rewriter.modules.decoding import active_state


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SharedKVAttention(nn.Module):
    """Attention with its own q/o projections over another layer's keys and values.

    The source layer's k/v projection outputs are caught by forward hooks (bound methods of this
    module, so a deepcopy of the model rewires them to the copy) in the same forward pass."""

    def __init__(self, own: nn.Module, own_block: Block, source_k: nn.Module, source_v: nn.Module,
                 q_name: str, o_name: str):
        super().__init__()
        self.q_proj = own.get_submodule(q_name)
        self.o_proj = own.get_submodule(o_name)
        self.head_dim = own_block.attn.head_dim
        self.groups = own_block.attn.num_heads // own_block.attn.num_kv_heads
        self.scaling = getattr(own, "scaling", self.head_dim ** -0.5)
        self.is_causal = own_block.attn.causal
        self.rope = own_block.attn.rope
        self._source = [source_k, source_v]  # a list: not submodules of this layer
        self._kv: list[torch.Tensor | None] = [None, None]
        source_k.register_forward_hook(self._catch_k)
        source_v.register_forward_hook(self._catch_v)

    def _catch_k(self, module, args, out):
        self._kv[0] = out

    def _catch_v(self, module, args, out):
        self._kv[1] = out

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        # the source layer may run on another GPU (a model split by accelerate)
        k, v = (x.to(q.device).view(b, t, -1, self.head_dim).transpose(1, 2) for x in self._kv)
        if self.rope and position_embeddings is not None:
            cos, sin = (c.unsqueeze(1) for c in position_embeddings)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        state = active_state()
        if state is not None and id(self) in state.caches:  # generating: read the source's cache
            out = state.attend(self, q, k, v, self.scaling, self.is_causal)
            return self.o_proj(out.reshape(b, t, -1)), None
        if self.groups > 1:
            k, v = k.repeat_interleave(self.groups, 1), v.repeat_interleave(self.groups, 1)
        causal = self.is_causal and attention_mask is None and t > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=causal,
                                             scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None
