"""A rewritten transformers model as a standard checkpoint: the model's own architecture, its
config saying the rewritten shape, weights under their standard names. Such a folder loads with
`AutoModelForCausalLM.from_pretrained` without tailor, so vLLM, SGLang or TGI can serve it.

What a standard config can say differs by architecture (Llama's `attention_bias` puts a bias on
o_proj, Qwen2's leaves o_proj without one whatever the config says), so it is asked of
transformers itself: the architecture is built on the meta device from a config and its weights'
names and shapes are compared with the rewritten model's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tailor.core.errors import TailorError

# where a standard checkpoint sits inside an artifact
HF_DIR = "hf"
# the FFN width architecture() builds its probe with
PROBE_WIDTH = 8
# architectures whose layer kind (`layer_types`) changes only the attention mask, which a
# `sliding_attention` layer limits to `sliding_window` keys (read in transformers 5.2x: Gemma3 and
# Olmo3 also pick a RoPE per kind, Cohere2 applies RoPE on sliding layers only, Mistral and the MoE
# Qwens slide every layer whatever the kind): there a plan's sliding windows are the same function
SLIDING_BY_LAYER_KIND = ("qwen2", "qwen3")


@dataclass(frozen=True)
class StandardShape:
    """A rewritten decoder as a standard config says it: layers kept, one FFN width, one head
    layout, and biases on the output projections where the rewrites' compensation added them."""
    kept_layers: tuple[int, ...]   # indices in the input model
    ffn_width: int
    kv_heads: int
    heads: int
    head_dim: int
    out_bias: bool    # attention output projection (head pruning's least-squares refit)
    down_bias: bool   # FFN down projection (FFN pruning's refit)
    sliding_window: int | None = None     # the one window of the layers that slide
    sliding_layers: tuple[int, ...] = ()  # kept layers (indices in the input) that slide


@dataclass(frozen=True)
class StandardArchitecture:
    """What this architecture's standard config can say beyond layer counts and widths."""
    name: str
    out_bias: bool    # a config can put a bias on every attention output projection
    down_bias: bool   # ... on every FFN down projection
    widths: bool      # the config names the FFN width and the head counts (intermediate_size, ...)
    # the config lists each layer's kind (layer_types), which changes only the mask, and one
    # sliding_window for those that slide (SLIDING_BY_LAYER_KIND)
    sliding: bool = False
    sliding_window: int | None = None   # the window the input's sliding layers already have
    slides: tuple[int, ...] = ()        # the input's layers that slide already


def _meta_model(config) -> nn.Module:
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _layer_weights(model: nn.Module, layer: int = 0) -> dict[str, tuple[int, ...]]:
    """Weight names of one decoder layer (relative to it) and their shapes."""
    prefix = f"layers.{layer}."
    return {k.split(prefix, 1)[1]: tuple(v.shape) for k, v in model.state_dict().items() if prefix in k}


def _projection(weights: dict[str, tuple[int, ...]], suffix: str) -> str | None:
    return next((k.removesuffix(".weight") for k in weights if k.endswith(f"{suffix}.weight")), None)


def _with_biases(config, on: bool):
    config = copy.deepcopy(config)
    for attr in ("attention_bias", "mlp_bias"):
        if hasattr(config, attr):
            setattr(config, attr, on)
    return config


def architecture(module: nn.Module) -> StandardArchitecture:
    """Probe the model's architecture with a one-layer config of another shape (one query head per
    KV head, an FFN 8 wide, attention_bias and mlp_bias set where it has them): do its weights take
    that shape, and do the output and down projections get a bias."""
    config = copy.deepcopy(module.config)
    name = type(module).__name__
    try:
        kv = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        probe_config = _with_biases(config, True)
        probe_config.num_hidden_layers, probe_config.num_attention_heads = 1, kv
        probe_config.head_dim, probe_config.intermediate_size = head_dim, PROBE_WIDTH
        if isinstance(getattr(probe_config, "layer_types", None), list):
            probe_config.layer_types = probe_config.layer_types[:1]
        probe = _layer_weights(_meta_model(probe_config))
    except Exception:  # a config without these names, or an architecture AutoModelForCausalLM lacks
        return StandardArchitecture(name, False, False, False)
    q, out, down = (_projection(probe, p) for p in ("q_proj", "o_proj", "down_proj"))
    widths = q is not None and down is not None and probe[f"{q}.weight"][0] == kv * head_dim \
        and probe[f"{down}.weight"][1] == PROBE_WIDTH
    types = getattr(config, "layer_types", None)
    sliding = getattr(config, "model_type", None) in SLIDING_BY_LAYER_KIND and isinstance(types, list)
    slides = tuple(i for i, t in enumerate(types or []) if t == "sliding_attention") if sliding else ()
    window = config.sliding_window if slides else None
    return StandardArchitecture(name, out is not None and f"{out}.bias" in probe,
                                down is not None and f"{down}.bias" in probe, widths, sliding, window, slides)


def standard_config(module: nn.Module, shape: StandardShape):
    """The input model's config saying the rewritten shape (a copy; the input's is untouched):
    layers renumbered (each kept layer keeps its kind where the config lists `layer_types`, or
    slides where the plan put a sliding window on it)."""
    config = copy.deepcopy(module.config)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = ["sliding_attention" if i in shape.sliding_layers else config.layer_types[i]
                              for i in shape.kept_layers]
    if shape.sliding_layers:
        config.sliding_window = shape.sliding_window
        if hasattr(config, "use_sliding_window"):  # Qwen2's: without it, loading drops the window
            config.use_sliding_window = True
        sliding = [i in shape.sliding_layers for i in shape.kept_layers]
        first = sliding.index(True)
        if hasattr(config, "max_window_layers") and all(sliding[first:]):
            # loaders older than layer_types slide the layers from max_window_layers on: where the
            # plan's are those, they read the same model (elsewhere only layer_types says it)
            config.max_window_layers = first
    config.num_hidden_layers = len(shape.kept_layers)
    config.intermediate_size, config.num_key_value_heads = shape.ffn_width, shape.kv_heads
    config.num_attention_heads, config.head_dim = shape.heads, shape.head_dim
    if shape.out_bias:
        config.attention_bias = True
    if shape.down_bias:
        config.mlp_bias = True
    return config


def save_standard(rewritten: nn.Module, source: nn.Module, shape: StandardShape, folder: Path) -> None:
    """Write `rewritten` (a transformers model tailor edited) as a standard checkpoint of
    `source`'s architecture into `folder`: config.json, model.safetensors, generation_config.json
    (through transformers' save_pretrained). Weights the standard model has and the rewritten one
    lacks are biases a config switches on for all projections of a kind (Llama's attention_bias
    covers q, k, v and o): they are zeros. Any other difference is an error naming it."""
    config = standard_config(source, shape)
    target = _meta_model(config)
    want = {k: (tuple(v.shape), v.dtype) for k, v in target.state_dict().items()}
    have = rewritten.state_dict()
    dtype = next(iter(have.values())).dtype
    wrong = [f"{k} {tuple(have[k].shape)} (standard {want[k][0]})" for k in sorted(set(have) & set(want))
             if tuple(have[k].shape) != want[k][0]]
    extra = sorted(set(have) - set(want))
    missing = sorted(k for k in set(want) - set(have) if not k.endswith(".bias"))
    if wrong or extra or missing:
        raise TailorError(f"the rewritten model does not fit a standard {type(source).__name__} config "
                          f"(shapes {wrong[:2]}, not in the standard model {extra[:2]}, "
                          f"missing {missing[:2]})")
    state = {k: have[k].detach().to("cpu") if k in have else torch.zeros(want[k][0], dtype=dtype)
             for k in want}
    target.load_state_dict(state, strict=True, assign=True)
    target.tie_weights()
    target = target.to(dtype).eval()
    target.generation_config = copy.deepcopy(source.generation_config)
    folder.mkdir(parents=True, exist_ok=True)
    target.save_pretrained(folder, safe_serialization=True)
