"""Assemble a TransformerGraph from a Dataflow with the recognition rules.

Reads top-down: find norms and attention cores, then per attention core follow the residual
stream — projections, residual add, FFN, residual add — and finally the embedding and head.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from tailor.core.errors import UnrecognizedModel
from tailor.rewriter import dataflow as df
from tailor.rewriter.dataflow import Dataflow
from tailor.rewriter.graph import FFN, Attention, Block, Embedding, Norm, Projection, TransformerGraph
from tailor.rewriter.rules.attention import AttentionSite, find_attention
from tailor.rewriter.rules.embedding import RULE as EMBEDDING
from tailor.rewriter.rules.ffn import RULE as FFN_RULE
from tailor.rewriter.rules.norm import NormSite, find_norms
from tailor.rewriter.rules.projection import trace_projection


class _Recognizer:
    def __init__(self, g: Dataflow):
        self.g = g
        self.norms = find_norms(g)
        self.norm_by_output = {id(s.output): s for s in self.norms}
        self.norm_by_input = {}
        for s in self.norms:
            self.norm_by_input.setdefault(id(g.skip_views_back(s.input)), s)

    # -- helpers --------------------------------------------------------------------------
    def projection(self, value, what: str, layer: int):
        t = trace_projection(self.g, value, self.norm_by_output)
        if len(t.sources) != 1:
            found = "none" if not t.sources else f"{len(t.sources)} linear layers"
            raise UnrecognizedModel(
                f"layer {layer}: the attention {what} input should come from one linear projection; "
                f"found {found}")
        (src,) = t.sources
        node = src.linear
        return Projection.of(self.g.linear(node), self.g.node_name(node), src.columns), node, t

    def linear_projection(self, node, columns=None) -> Projection:
        return Projection.of(self.g.linear(node), self.g.node_name(node), columns)

    def norm_after(self, value) -> NormSite | None:
        return self.norm_by_input.get(id(self.g.skip_views_back(value)))

    def norm_before(self, value) -> NormSite | None:
        return self.norm_by_output.get(id(self.g.skip_views_back(value)))

    def head_dim(self, site: AttentionSite, layer: int) -> int:
        for v in (site.q, site.out, site.v):
            shape = self.g.shape(v)
            if shape and len(shape) == 4 and shape[-1]:
                return int(shape[-1])
        raise UnrecognizedModel(f"layer {layer}: cannot tell head_dim: the attention inputs have "
                                f"no static last dimension (run shape inference on the model)")

    # -- one block --------------------------------------------------------------------------
    def block(self, i: int, site: AttentionSite):
        g = self.g
        q, q_node, tq = self.projection(site.q, "query", i)
        k, _, tk = self.projection(site.k, "key", i)
        v, _, _ = self.projection(site.v, "value", i)
        o_node = next((c for c, _ in g.view_consumers(site.out) if g.op(c) == df.LINEAR), None)
        if o_node is None:
            raise UnrecognizedModel(f"layer {i}: no output projection after the attention")
        o = self.linear_projection(o_node)
        hd = self.head_dim(site, i)
        if q.out_features % hd or k.out_features % hd or k.out_features != v.out_features:
            raise UnrecognizedModel(f"layer {i}: projections q={q.out_features}, k={k.out_features},"
                                    f" v={v.out_features} do not split into heads of {hd}")
        n_heads, n_kv = q.out_features // hd, k.out_features // hd
        if n_heads % n_kv:
            raise UnrecognizedModel(f"layer {i}: {n_heads} query heads do not group over {n_kv} KV heads")
        attn = Attention(q, k, v, o, n_heads, n_kv, hd, tq.rope and tk.rope, site.causal, site.kind,
                         site.nodes, [n.norm for n in tq.norms + tk.norms])

        attn_in = g.data_inputs(q_node)[0]
        res1 = next((c for c, _ in g.view_consumers(g.output(o_node)) if g.op(c) == df.ADD), None)
        if res1 is None:
            raise UnrecognizedModel(f"layer {i}: the attention output is not added to the residual stream")
        # pre-norm: the residual add reads the norm's input; post-norm: the attention's own input
        pre = self.norm_before(attn_in)
        norms: list[Norm] = []
        if pre is not None and any(g.same_value(x, pre.input) for x in g.data_inputs(res1)):
            residual, stream_in = "pre_norm", g.skip_views_back(pre.input)
            norms.append(pre.norm)
        elif any(g.same_value(x, attn_in) for x in g.data_inputs(res1)):
            residual, stream_in = "post_norm", g.skip_views_back(attn_in)
        else:
            raise UnrecognizedModel(f"layer {i}: the residual add after attention reads neither the "
                                    f"attention input nor its norm's input (parallel attention and "
                                    f"FFN, as in GPT-NeoX, GPT-J and Falcon, is not supported yet)")
        stream = g.output(res1)
        if residual == "post_norm":
            post = self.norm_after(stream)
            if post is None:
                raise UnrecognizedModel(f"layer {i}: no pre-attention norm and no norm after the "
                                        f"residual add; cannot place the block's norms")
            norms.append(post.norm)
            stream = post.output
        ffn_site = FFN_RULE.match(g, stream, set())
        if ffn_site is None:
            raise UnrecognizedModel(f"layer {i}: found attention but no feed-forward branch closing "
                                    f"with a residual add after it (parallel or MoE blocks are not "
                                    f"supported yet)")
        up = self.linear_projection(ffn_site.up, ffn_site.up_columns)
        gate = self.linear_projection(ffn_site.gate, ffn_site.gate_columns) \
            if ffn_site.gate is not None else None
        ffn = FFN(ffn_site.kind, ffn_site.activation, up.out_features, up, gate,
                  self.linear_projection(ffn_site.down), ffn_site.nodes)
        out = g.output(ffn_site.residual_add)
        if residual == "pre_norm":
            ffn_norm = self.norm_before(g.data_inputs(ffn_site.up)[0])
            if ffn_norm is not None:
                norms.append(ffn_norm.norm)
        else:
            post = self.norm_after(out)
            if post is None:
                raise UnrecognizedModel(f"layer {i}: post-norm block without a norm after the FFN")
            norms.append(post.norm)
            out = post.output
        return Block(i, attn, ffn, norms, residual), stream_in, out

    # -- the whole model ----------------------------------------------------------------------
    def run(self) -> TransformerGraph:
        g = self.g
        sites = find_attention(g)
        if not sites:
            ops = Counter(getattr(n, "op_type", None) or g.op(n) for n in g.nodes())
            common = ", ".join(f"{k}×{v}" for k, v in ops.most_common(8))
            raise UnrecognizedModel(
                "not a transformer: no attention found (looked for scaled_dot_product_attention / "
                f"ONNX Attention, or softmax between two matmuls); the graph has {common}")
        blocks, prev_out = [], None
        for i, site in enumerate(sites):
            block, stream_in, out = self.block(i, site)
            if prev_out is not None and not g.same_value(stream_in, prev_out):
                raise UnrecognizedModel(f"layer {i} does not read layer {i - 1}'s output "
                                        f"(parallel or unusual residual wiring)")
            blocks.append(block)
            prev_out = out
            if i == 0:
                first_in = stream_in

        first_node = g.producer(sites[0].q) or g.nodes()[0]
        emb = EMBEDDING.match(g, first_node)
        if emb is None:
            raise UnrecognizedModel("no token embedding: no table lookup indexed by the model's "
                                    "token-id input")
        emb_norm = self.norm_before(first_in)
        embedding = Embedding(emb.token, emb.position, emb.extra, emb_norm.norm if emb_norm else None)

        final = self.norm_after(prev_out)
        head_in = final.output if final is not None else prev_out
        vocab, hidden = emb.token.shape
        head_node = next((c for c, _ in g.view_consumers(head_in) if g.op(c) == df.LINEAR
                          and g.linear(c).out_features == vocab), None)
        lm_head = self.linear_projection(head_node) if head_node is not None else None
        tied = lm_head is not None and self._tied(lm_head, emb.token)
        causal = all(b.attn.causal for b in blocks)
        task = ("causal-lm" if lm_head else "decoder") if causal else "encoder"
        positional = "rope" if any(b.attn.rope for b in blocks) else \
            "learned" if emb.position is not None else "none"
        return TransformerGraph(g.backend, task, hidden, vocab, positional, embedding, blocks,
                                final.norm if final is not None else None, lm_head, tied, g)

    def _tied(self, head: Projection, token) -> bool:
        """Tied: one weight, or two equal ones (an export may hold a tied weight twice). Without
        values (a structure traced from the config) only one weight counts."""
        if head.weight.name == token.name:
            return True
        if head.weight.numel != token.numel or not self.g.holds_values:
            return False
        w = self.g.param_array(head.weight)
        w = w if head.layout == "out_in" else w.T
        return w.shape == token.shape and np.array_equal(w, self.g.param_array(token))


def recognize(g: Dataflow) -> TransformerGraph:
    return _Recognizer(g).run()
