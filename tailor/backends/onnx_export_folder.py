"""The configs beside a rewritten ONNX model made from an exporter's folder (Optimum's layout:
model.onnx, config.json, generation_config.json, tokenizer files), so that the runtimes that load
such folders load the artifact: Optimum's ORTModel classes read config.json, onnxruntime-genai
reads genai_config.json (written for decoders with a KV cache).

The config says the rewritten shape where one number can say it for every layer: layers kept,
KV heads, FFN width. num_attention_heads stays as exported even where heads were pruned: Optimum
sizes the empty cache it starts with as hidden_size / num_attention_heads per head, and the head
size is what pruning keeps. Where the KV heads differ between layers no config can size the
cache; the report says so, and which runtimes can then not start a sequence.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx_ir as ir

from tailor.core.errors import TailorError
from tailor.rewriter import onnx_surgery
from tailor.rewriter.graph import TransformerGraph
from tailor.rewriter.onnx_kv_cache import cache_entries

CONFIG, GENAI_CONFIG, GENERATION_CONFIG = "config.json", "genai_config.json", "generation_config.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TailorError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TailorError(f"{path}: expected a JSON object")
    return data


def rewritten_shape(model: ir.Model, graph: TransformerGraph, skipped: set[int]) -> dict[str, Any]:
    """What the rewritten model is, read from its weights and cache inputs: layers kept, FFN
    widths of the FFNs left, and the KV heads of each cache left (decoders with a cache)."""
    nodes = onnx_surgery.nodes_by_name(model)
    kept = [b for b in graph.blocks if b.index not in skipped]
    widths = [onnx_surgery.projection_arrays(model, b.ffn.down)[0].shape[1] for b in kept
              if b.ffn.down.node in nodes]
    heads = [onnx_surgery.projection_arrays(model, b.attn.q)[0].shape[0] // b.attn.head_dim for b in kept
             if b.attn.q.node in nodes]
    caches = [e for e in cache_entries(model) if e.role == "key"]
    return {"layers": len(kept), "ffn_widths": widths, "ffns_skipped": len(kept) - len(widths),
            "heads": heads, "attentions_dropped": len(kept) - len(heads),
            "cache_kv_heads": [int(e.past.shape[1]) for e in caches]}


def updated_config(config: dict[str, Any], shape: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """config.json with the rewritten shape where one number says it; and what it cannot say."""
    config, unsaid = dict(config), []
    config["num_hidden_layers"] = shape["layers"]
    widths, heads = set(shape["ffn_widths"]), set(shape["cache_kv_heads"])
    if len(widths) == 1 and not shape["ffns_skipped"]:
        config["intermediate_size"] = widths.pop()
    elif widths or shape["ffns_skipped"]:
        unsaid.append(f"FFN widths {sorted(widths)} with {shape['ffns_skipped']} FFNs skipped")
    if set(shape["heads"]) - {config.get("num_attention_heads")} or shape["attentions_dropped"]:
        unsaid.append(f"query heads per layer {shape['heads']} with {shape['attentions_dropped']} attentions "
                      f"dropped (num_attention_heads also gives the head size, which pruning keeps)")
    if len(heads) == 1:
        config["num_key_value_heads"] = heads.pop()
    elif heads:
        unsaid.append(f"KV heads per layer {shape['cache_kv_heads']}: no runtime that sizes the first step's "
                      f"empty cache from the config (Optimum, onnxruntime-genai) can start a sequence")
    return config, unsaid


def genai_config(config: dict[str, Any], generation: dict[str, Any], shape: dict[str, Any],
                 input_names: list[str]) -> dict[str, Any]:
    """onnxruntime-genai's config for a decoder with a KV cache in Optimum's names: its caches grow
    by concatenation (no shared past/present buffer)."""
    head_size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    context = config.get("max_position_embeddings", 2048)
    inputs = {name: name for name in ("input_ids", "attention_mask", "position_ids") if name in input_names}
    inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    # genai reads each as a number (or eos as a list): one the configs leave null is left out
    token = {k: v for k in ("bos_token_id", "eos_token_id", "pad_token_id")
             if (v := generation.get(k, config.get(k))) is not None}
    return {
        "model": {
            **token,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": head_size,
                "hidden_size": config["hidden_size"],
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": config["num_attention_heads"],
                "num_hidden_layers": len(shape["cache_kv_heads"]),
                "num_key_value_heads": shape["cache_kv_heads"][0],
            },
            "type": config.get("model_type", "llama"),
            "vocab_size": config["vocab_size"],
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "early_stopping": True,
                   "length_penalty": 1.0, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1,
                   "top_p": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def write_export_configs(model: ir.Model, graph: TransformerGraph, skipped: set[int], source: Path,
                         out: Path) -> dict[str, Any] | None:
    """config.json updated, and genai_config.json for a decoder with a uniform KV cache, into
    `out` from the export folder `source`; what was written and what the config cannot say (None:
    the source has no config.json, it is no exporter's folder)."""
    if not (source / CONFIG).is_file():
        return write_builder_config(model, graph, skipped, source, out)
    shape = rewritten_shape(model, graph, skipped)
    config, unsaid = updated_config(read_json(source / CONFIG), shape)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    written = [CONFIG]
    heads = set(shape["cache_kv_heads"])
    if len(heads) == 1:
        generation = read_json(source / GENERATION_CONFIG) if (source / GENERATION_CONFIG).is_file() else {}
        names = [v.name for v in model.graph.inputs]
        genai = genai_config(config, generation, shape, names)
        (out / GENAI_CONFIG).write_text(json.dumps(genai, indent=2) + "\n")
        written.append(GENAI_CONFIG)
    return {"written": written, "shape": shape, "config_cannot_say": unsaid}


def write_builder_config(model: ir.Model, graph: TransformerGraph, skipped: set[int], source: Path,
                         out: Path) -> dict[str, Any] | None:
    """onnxruntime-genai's model builder's genai_config.json, updated to the rewritten decoder,
    into `out` (None: `source` holds none). Its layers and KV heads are the caches left; the
    caches now grow by concatenation (the unfused attention appends to past), so no shared
    past/present buffer. Where the KV heads differ between layers no config sizes the cache: none
    is written, and the report says so."""
    if not (source / GENAI_CONFIG).is_file():
        return None
    shape = rewritten_shape(model, graph, skipped)
    heads = set(shape["cache_kv_heads"])
    if len(heads) != 1:
        return {"written": [], "shape": shape, "config_cannot_say": [
            f"KV heads per layer {shape['cache_kv_heads']}: onnxruntime-genai sizes one cache for every "
            f"layer, so {GENAI_CONFIG} is not written"]}
    genai = read_json(source / GENAI_CONFIG)
    try:
        decoder = genai["model"]["decoder"]
        decoder["num_hidden_layers"] = len(shape["cache_kv_heads"])
        decoder["num_key_value_heads"] = heads.pop()
        genai.setdefault("search", {})["past_present_share_buffer"] = False
    except (KeyError, TypeError):
        raise TailorError(f"{source / GENAI_CONFIG}: no model.decoder section, not onnxruntime-genai's "
                          f"config") from None
    (out / GENAI_CONFIG).write_text(json.dumps(genai, indent=4) + "\n")
    return {"written": [GENAI_CONFIG], "shape": shape, "config_cannot_say": []}


def genai_continuation(folder: Path, prompt: list[int], n: int) -> list[int]:
    """The n tokens onnxruntime-genai generates greedily after `prompt` from an artifact folder
    (its genai_config.json): how a user's runtime continues it, to compare with tailor's."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n, min_length=len(prompt) + n)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):]
