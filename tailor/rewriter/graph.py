"""TransformerGraph: the semantic view of a captured model that every pass works on.

Each element keeps the names of the backend nodes it was recognised from and the weight
tensors it owns (state-dict keys on torch, initializer names on ONNX), so a pass can go from
"head 3 of layer 5" to the exact tensors to slice, on either backend.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import networkx as nx

from tailor.rewriter.dataflow import Dataflow, LinearInfo, ParamRef


@dataclass
class Projection:
    """One linear layer, or a column range of a fused one (GPT-2's c_attn)."""

    weight: ParamRef
    bias: ParamRef | None
    layout: str                       # "out_in" | "in_out"
    in_features: int
    out_features: int                 # of this projection (the slice, for fused ones)
    columns: tuple[int, int] | None   # output columns of the fused weight, else None
    node: str

    @classmethod
    def of(cls, info: LinearInfo, node: str, columns: tuple[int, int] | None = None) -> "Projection":
        out = columns[1] - columns[0] if columns else info.out_features
        return cls(info.weight, info.bias, info.layout, info.in_features, out, columns, node)

    @property
    def params(self) -> int:
        frac = self.out_features / (self.weight.shape[0] if self.layout == "out_in" else self.weight.shape[1])
        return round(self.weight.numel * frac) + (round(self.bias.numel * frac) if self.bias else 0)


@dataclass
class Norm:
    kind: str                 # "rms" | "layer"
    weight: ParamRef | None
    bias: ParamRef | None
    nodes: list[str]
    weight_offset: float = 0.0   # the scale is (offset + weight): Gemma's norms use 1 + w

    @property
    def params(self) -> int:
        return sum(p.numel for p in (self.weight, self.bias) if p is not None)


@dataclass
class Attention:
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool
    causal: bool
    kind: str                 # "sdpa" (one fused op) | "decomposed" (matmul/softmax/matmul)
    nodes: list[str]
    qk_norms: list[Norm] = field(default_factory=list)   # per-head q/k norms (Qwen3, Gemma 3)

    @property
    def projections(self) -> list[Projection]:
        return [self.q, self.k, self.v, self.o]

    @property
    def params(self) -> int:
        return sum(p.params for p in self.projections) + sum(n.params for n in self.qk_norms)


@dataclass
class FFN:
    kind: str                 # "gated" (SwiGLU/GeGLU) | "mlp"
    activation: str           # "silu" | "gelu" | "gelu_tanh" | "relu" | ...
    width: int
    up: Projection
    gate: Projection | None
    down: Projection
    nodes: list[str]

    @property
    def projections(self) -> list[Projection]:
        return [p for p in (self.gate, self.up, self.down) if p is not None]

    @property
    def params(self) -> int:
        return sum(p.params for p in self.projections)


@dataclass
class Block:
    index: int
    attn: Attention
    ffn: FFN
    norms: list[Norm]
    residual: str             # "pre_norm" | "post_norm"

    @property
    def params(self) -> int:
        return self.attn.params + self.ffn.params + sum(n.params for n in self.norms)


@dataclass
class Embedding:
    token: ParamRef
    position: ParamRef | None          # learned absolute positions
    extra: list[ParamRef] = field(default_factory=list)   # e.g. BERT token types
    norm: Norm | None = None

    @property
    def params(self) -> int:
        return sum(p.numel for p in [self.token, self.position, *self.extra] if p is not None) + \
            (self.norm.params if self.norm else 0)


@dataclass
class TransformerGraph:
    backend: str                     # "torch" | "onnx"
    task: str                        # "causal-lm" | "encoder"
    hidden_size: int
    vocab_size: int
    positional: str                  # "rope" | "learned" | "none"
    embedding: Embedding
    blocks: list[Block]
    final_norm: Norm | None
    lm_head: Projection | None
    tied_embeddings: bool
    dataflow: Dataflow | None = field(default=None, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def max_positions(self) -> int | None:
        """The most tokens an input can have: the rows of a learned position table (an upper
        bound: RoBERTa's first two rows are never a position), None where positions are
        computed (RoPE) or absent."""
        position = self.embedding.position
        return position.shape[0] if self.positional == "learned" and position is not None else None

    @property
    def params(self) -> int:
        head = self.lm_head.params if self.lm_head and not self.tied_embeddings else 0
        return self.embedding.params + sum(b.params for b in self.blocks) + head + \
            (self.final_norm.params if self.final_norm else 0)

    def to_json(self) -> dict[str, Any]:
        d = asdict(replace(self, dataflow=None))
        d.pop("dataflow")
        return d

    def to_networkx(self) -> nx.DiGraph:
        """Residual-stream view: embedding -> (attn -> ffn) per block -> head.

        Node attributes carry the element's kind and size, so analyses (what reads which KV
        cache, what a skipped block disconnects) are ordinary graph queries.
        """
        g = nx.DiGraph()
        g.add_node("embedding", kind="embedding", params=self.embedding.params)
        prev = "embedding"
        for b in self.blocks:
            a, f = f"layer{b.index}.attn", f"layer{b.index}.ffn"
            g.add_node(a, kind="attention", layer=b.index, heads=b.attn.num_heads,
                       kv_heads=b.attn.num_kv_heads, head_dim=b.attn.head_dim, params=b.attn.params)
            g.add_node(f, kind="ffn", layer=b.index, ffn_kind=b.ffn.kind, width=b.ffn.width,
                       params=b.ffn.params)
            g.add_edge(prev, a, stream="residual")
            g.add_edge(a, f, stream="residual")
            prev = f
        g.add_node("head", kind="lm_head" if self.lm_head else "hidden_states")
        g.add_edge(prev, "head", stream="residual")
        return g
