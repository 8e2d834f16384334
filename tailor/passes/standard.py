"""Which plans a standard transformers config can say (`--format hf`, `--hf-compatible`).

A config says how many layers there are, one FFN width, one count of query and KV heads, and
for some architectures a bias on every attention output or FFN down projection (what head and
FFN pruning's least-squares refit adds: tailor.backends.hf_checkpoint probes which). So:
  - layer_skip: always (the layers are renumbered);
  - ffn_prune, head_prune: where the architecture can say the bias, at one width / one head
    layout on every kept layer: joint constraints (search.Uniform), not a property of one option;
  - attn_pattern: where the config lists each layer's kind and the kind changes only the mask
    (`layer_types` of Qwen2, Qwen3: hf_checkpoint.SLIDING_BY_LAYER_KIND), a full layer whose KV
    heads all take one sliding window without sinks (`sliding_attention`), the
    same window on every layer that slides (one `sliding_window`; the input's own where it has
    sliding layers already): a Uniform that a layer may leave, keeping full attention;
  - ffn_skip (the FFN becomes a constant while attention stays), head_prune of every head (the
    attention becomes a constant), kv_share and other attention patterns (sinks, windows
    growing with the length, heads of a layer apart) cannot be said.

A decoder exported with its KV cache as graph inputs (Optimum's past_key_values.N.*) is run by
clients that size every layer's empty cache from one config value, num_key_value_heads
(Optimum's ORTModelForCausalLM, onnxruntime-genai): its plans keep one KV head count in every
cache they keep (`one_cache_shape`). Caches dropped whole (a layer skipped, its attention
dropped, its cache shared from another layer) and query heads pruned are free.
"""
from __future__ import annotations

from tailor.backends.hf_checkpoint import StandardArchitecture, StandardShape
from tailor.core.errors import TailorError
from tailor.passes.base import Option
from tailor.passes.search import REMOVED, Uniform
from tailor.rewriter.graph import TransformerGraph


def ffn_width(option: Option):
    if option.pass_name == "layer_skip":
        return REMOVED
    return len(option.choice["channels"]) if option.pass_name == "ffn_prune" else None


def head_layout(option: Option):
    """(KV heads, query heads per KV head) the option leaves."""
    if option.pass_name == "layer_skip":
        return REMOVED
    if option.pass_name == "head_prune":
        return len(option.choice["kv_heads"]), len(option.choice["queries"][0])
    return None


def one_cache_shape(graph: TransformerGraph) -> tuple[Uniform, ...]:
    """One KV head count in every cache a decoder keeps (the module's docstring)."""
    def cache_heads(option: Option):
        if option.pass_name in ("layer_skip", "kv_share"):
            return REMOVED
        if option.pass_name != "head_prune":
            return None
        kept = len(option.choice["kv_heads"])
        if kept == 0:
            return REMOVED
        # the layer's own count is what its dense neighbours keep: not a value to agree on
        return None if kept == graph.blocks[option.layer].attn.num_kv_heads else kept
    return (Uniform("KV heads of a cache", cache_heads, graph.num_layers),)


def sliding_window(option: Option):
    """The window of a layer whose KV heads all slide alike without sinks (a standard config's
    `sliding_attention`), else None (any other pattern: `unsayable` refuses it)."""
    if option.pass_name == "layer_skip":
        return REMOVED
    if option.pass_name != "attn_pattern":
        return None
    spans = {None if s is None else tuple(s) for s in option.choice["spans"]}
    if len(spans) != 1 or None in spans:
        return None
    sink, window, growth = spans.pop()
    return int(window) if sink == 0 and growth == 0 and window == int(window) else None


def uniform(graph: TransformerGraph) -> tuple[Uniform, ...]:
    return (Uniform("FFN width", ffn_width, graph.num_layers),
            Uniform("head count", head_layout, graph.num_layers),
            Uniform("sliding window", sliding_window, graph.num_layers, every_layer=False))


def unsayable(option: Option, arch: StandardArchitecture) -> str | None:
    """Why a standard config of this architecture cannot say the option (None: it can, given
    the Uniform constraints hold)."""
    name = arch.name
    if option.pass_name == "layer_skip":
        return None
    if option.pass_name == "ffn_prune":
        if not arch.widths:
            return f"FFN pruning (a {name} config names no intermediate_size)"
        return None if arch.down_bias else \
            f"FFN pruning (its refit biases the down projection; a {name} config cannot say that bias)"
    if option.pass_name == "head_prune":
        if not option.choice["kv_heads"]:
            return "attention dropped while the FFN stays"
        if not arch.widths:
            return f"head pruning (a {name} config names no head counts)"
        return None if arch.out_bias else \
            f"head pruning (its refit biases the output projection; a {name} config cannot say that bias)"
    if option.pass_name == "attn_pattern":
        window = sliding_window(option)
        if not arch.sliding:
            return f"attention patterns (a {name} config says no per-layer sliding window)"
        if option.layer in arch.slides:
            return "attention patterns on a layer that slides already"
        if window is None:
            return ("attention patterns other than one sliding window on all of a layer's KV heads "
                    "(a standard sliding window has no sink and does not grow)")
        if arch.sliding_window not in (None, window):
            return f"a sliding window of {window} (the model's sliding layers have {arch.sliding_window})"
        return None
    return {"ffn_skip": "FFN skipped while attention stays",
            "kv_share": "KV cache shared across layers",
            }.get(option.pass_name, option.pass_name)


def sayable(options: list[Option], arch: StandardArchitecture) -> list[Option]:
    """The options a standard config can say, each alone (the search adds `uniform`)."""
    return [o for o in options if unsayable(o, arch) is None]


def _layers(layers) -> str:
    layers = sorted(layers)
    return f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"


def standard_shape(graph: TransformerGraph, options: list[Option],
                   arch: StandardArchitecture) -> StandardShape:
    """The plan as a standard config says it; a TailorError naming every rewrite it cannot say."""
    reasons: dict[str, list[int]] = {}
    for o in options:
        why = unsayable(o, arch)
        if why is not None:
            reasons.setdefault(why, []).append(o.layer)
    problems = [f"{why} on {_layers(layers)}" for why, layers in reasons.items()]
    kept = [b.index for b in graph.blocks
            if not any(o.layer == b.index and o.pass_name == "layer_skip" for o in options)]
    by_layer = {i: [o for o in options if o.layer == i] for i in kept}
    a = graph.blocks[0].attn
    dense = {"FFN width": lambda i: graph.blocks[i].ffn.width,
             "head count": lambda i: (graph.blocks[i].attn.num_kv_heads,
                                      graph.blocks[i].attn.num_heads // graph.blocks[i].attn.num_kv_heads),
             "sliding window": lambda i: None}   # a layer the plan leaves keeps its own kind
    values = {}
    for u in uniform(graph):
        per_layer = {}
        for i in kept:
            given = [u.value(o) for o in by_layer[i] if u.value(o) is not None]
            per_layer[i] = given[0] if given else dense[u.name](i)
        seen: dict = {}
        for i, v in per_layer.items():
            if v is not None:
                seen.setdefault(v, []).append(i)
        if len(seen) > 1:
            problems.append(f"{u.name}s differ across layers (" +
                            "; ".join(f"{_value(v)} on {_layers(ls)}" for v, ls in seen.items()) + ")")
        values[u.name] = next(iter(seen), None)
        if u.name == "sliding window":  # the layers the plan slides (the Uniform's values)
            values["sliding layers"] = tuple(i for i, v in per_layer.items() if v is not None)
    if not kept:
        problems.append("every layer removed")
    if problems:
        raise TailorError("a standard transformers config cannot say this plan: " + "; ".join(problems) +
                          " (search only what it can say with --hf-compatible)")
    kv, per_group = values["head count"]
    return StandardShape(tuple(kept), values["FFN width"], kv, kv * per_group, a.head_dim,
                         out_bias=any(o.pass_name == "head_prune" for o in options),
                         down_bias=any(o.pass_name == "ffn_prune" for o in options),
                         sliding_window=values["sliding window"], sliding_layers=values["sliding layers"])


def _value(v) -> str:
    return f"{v[0]} KV × {v[1]} q heads" if isinstance(v, tuple) else str(v)
