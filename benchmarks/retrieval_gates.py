"""The retrieval gates' fit (tailor.backends.retrieval_gates) on a real-size model: seconds and
peak device memory of a step with the streaming branch in window blocks (`attend_streaming`, what
tailor runs) against the whole-mask path it replaced, and how the gates' order settles with the
number of steps (top-k overlap with the longest fit, gates left at 0 and at 1), and, with
--passkey N, what each fit's order is worth: the passkey accuracy (N prompts a length, through the
chat template, greedy over tailor's KV cache) with the heads the gates rank highest kept dense and
the others streaming on the fitted pattern, as many dense as half the KV cache at the longest
length allows (DuoAttention's plan at kv_memory 0.5). With --mix F1,F2,..: plans from the last
fit that keep a share F of the heads dense, in the gates' order, and give the others the widest
sink 64 + window that keeps the cache at half of dense at the longest length (F = 0: StreamingLLM
with 64 sinks).

    python benchmarks/retrieval_gates.py --model SmolLM2-135M-Instruct.Q4_1.gguf --device cuda \
        --lengths 4096,8192 --steps 48,150,400 --passkey 50 --calib code-calib.txt

Without --model: a randomly initialised model of SmolLM2-135M's shape and random sequences (for
time and memory only; the order of random gates means nothing).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import transformers as tf

from tailor.backends.retrieval_gates import fit_gates
from tailor.backends.torch_backend import split_head
from tailor.core.devices import resolve_device
from tailor.core.patterns import Pattern
from tailor.data.long_context import passkey_samples
from tailor.data.retrieval import RetrievalSample, choose_template, make_samples
from tailor.data.text import load_tokenizer
from tailor.passes.attention_profile import GATE_PATTERN
from tailor.quality.long_context import passkey_accuracy
from tailor.rewriter.capture import load_gguf, load_hf_directory
from tailor.rewriter.modules import sparse_attention
from tailor.rewriter.modules.sparse_attention import IMPLEMENTATION, dispatching_module, register

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=True)


def whole_mask(query, key, value, pattern, scaling):
    """The streaming branch as it ran before: every score computed, the pattern as a mask."""
    patterns = [pattern] * key.shape[1]
    return sparse_attention._attend_masked(query, key, value, patterns, None, True, scaling, 0.0)


def load(args, device, dtype):
    if args.model is None:
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(tf.LlamaConfig(**SMOLLM2_SHAPE)).to(device, dtype).eval(), None
    if args.model.suffix == ".gguf":
        model = load_gguf(args.model, device=device, dtype=dtype)
    else:
        model = load_hf_directory(args.model, device=device, dtype=dtype)
    return model.eval(), load_tokenizer(args.model)


def samples_at(args, model, tokenizer, length: int) -> list[RetrievalSample]:
    if tokenizer is None:
        g = torch.Generator().manual_seed(length)
        return [RetrievalSample(torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (length,), generator=g),
                                length - 6, 5) for _ in range(args.samples)]
    text = torch.tensor(tokenizer(args.calib.read_text(), add_special_tokens=False)["input_ids"])

    def run(ids, positions):
        with torch.no_grad():
            return model(input_ids=ids.to(model.device)).logits[:, positions.to(model.device)]
    template, _ = choose_template(run, tokenizer, 1024, text, args.seed)
    return make_samples(tokenizer, length, args.samples, args.seed + length, template, text)


def timed_fit(model, attns, kv_heads, samples, steps, device) -> tuple[np.ndarray, float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    gates = fit_gates(model, attns, kv_heads, samples, GATE_PATTERN, steps, split=split_head(model))
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return gates, time.perf_counter() - start, peak


def order_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    top = lambda g: set(np.argsort(-g.ravel(), kind="stable")[:k].tolist())  # noqa: E731
    return len(top(a) & top(b)) / k


def dense_heads(kv_heads: int, length: int, budget: float = 0.5) -> int:
    """KV heads that can stay dense with the others on GATE_PATTERN, the cache at `budget` of dense."""
    span = GATE_PATTERN.span(length)
    return int((budget * length - span) / (length - span) * kv_heads)


def mixed_pattern(kv_heads: int, keep: int, length: int, budget: float = 0.5) -> Pattern:
    """Sink 64 + the widest window with `keep` of `kv_heads` heads dense within `budget` of the cache."""
    return Pattern(64, int((budget * kv_heads * length - keep * length) / (kv_heads - keep)) - 64, 0.0)


def passkey_with(model, attns, tokenizer, probes: dict, gates: np.ndarray | None, keep: int,
                 pattern: Pattern = GATE_PATTERN) -> dict:
    """Passkey accuracy per length with the `keep` heads of highest gate dense and the others on
    `pattern` (gates None: all dense)."""
    order = [] if gates is None else np.argsort(-gates.ravel(), kind="stable")[keep:]
    streaming = {divmod(int(k), gates.shape[1]) for k in order}
    for i, a in enumerate(attns):
        spans = [pattern.to_json() if (i, h) in streaming else None for h in range(len(gates[i]))] \
            if gates is not None else None
        a.tailor_spans = spans if spans and any(spans) else None
    try:
        return {n: passkey_accuracy(model, tokenizer, s) for n, s in probes.items()}
    finally:
        for a in attns:
            a.tailor_spans = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="HF folder or .gguf (default: SmolLM2's shape, random)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--timing-steps", type=int, default=8, help="steps each path is timed over")
    ap.add_argument("--steps", default="", help="comma list: fits whose orders are compared (longest last)")
    ap.add_argument("--passkey", type=int, default=0, help="passkey prompts a length per fit (0: none)")
    ap.add_argument("--mix", default="", help="comma list of shares of heads kept dense (see above)")
    ap.add_argument("--calib", type=Path, default=Path(__file__).parents[2] / "shared/data/code-calib.txt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = resolve_device(args.device)
    model, tokenizer = load(args, device, getattr(torch, args.dtype))
    register()
    model.config._attn_implementation = IMPLEMENTATION
    attns = [dispatching_module(layer.self_attn) for layer in model.model.layers]
    kv_heads = model.config.num_key_value_heads
    lengths = [int(n) for n in args.lengths.split(",")]
    probes = {n: passkey_samples(tokenizer, n, args.passkey, args.seed + n) for n in lengths} \
        if args.passkey and tokenizer is not None else {}
    keep = dense_heads(len(attns) * kv_heads, max(lengths))
    dense = passkey_with(model, attns, tokenizer, probes, None, 0) if probes else {}
    if dense:
        print(f"dense passkey {dense}; {keep} of {len(attns) * kv_heads} KV heads dense in the plans",
              flush=True)
    rows = []
    for length in lengths:
        samples = samples_at(args, model, tokenizer, length)
        row = {"length": length}
        branches = (("window_blocks", sparse_attention.attend_streaming), ("whole_mask", whole_mask))
        for name, branch in branches:
            sparse_attention.attend_streaming, kept = branch, sparse_attention.attend_streaming
            try:
                timed_fit(model, attns, kv_heads, samples, 2, device)  # warm-up
                _, seconds, peak = timed_fit(model, attns, kv_heads, samples, args.timing_steps, device)
            except torch.OutOfMemoryError:
                seconds, peak = float("nan"), float("inf")
            finally:
                sparse_attention.attend_streaming = kept
            row[name] = {"seconds_per_step": seconds / args.timing_steps, "peak_gib": peak}
            torch.cuda.empty_cache() if device.type == "cuda" else None
        if args.steps:
            fits = {}
            for steps in [int(s) for s in args.steps.split(",")]:
                gates, seconds, peak = timed_fit(model, attns, kv_heads, samples, steps, device)
                fits[steps] = {"gates": gates.round(4).tolist(), "seconds": seconds, "peak_gib": peak,
                               "at_0": int((gates <= 0.01).sum()), "at_1": int((gates >= 0.99).sum())}
                if probes:
                    fits[steps]["passkey"] = passkey_with(model, attns, tokenizer, probes, gates, keep)
            last = np.asarray(fits[max(fits)]["gates"])
            for steps, fit in fits.items():
                g = np.asarray(fit["gates"])
                fit["top_half_overlap_with_longest"] = order_overlap(g, last, g.size // 2)
            row["fits"] = fits
            if args.mix and probes and length == max(lengths):
                gates, heads = np.asarray(fits[max(fits)]["gates"]), len(attns) * kv_heads
                row["mix"] = []
                for share in [float(f) for f in args.mix.split(",")]:
                    k = round(share * heads)
                    pattern = mixed_pattern(heads, k, length)
                    row["mix"].append({"dense_share": share, "dense_heads": k, "pattern": pattern.to_json(),
                                       "passkey": passkey_with(model, attns, tokenizer, probes, gates, k,
                                                               pattern)})
                    print(f"  {k} dense, others {pattern}: passkey {row['mix'][-1]['passkey']}", flush=True)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "fits"}), flush=True)
        for steps, fit in row.get("fits", {}).items():
            print(f"  {steps} steps: {fit['seconds']:.1f} s, at 0: {fit['at_0']}, at 1: {fit['at_1']}, "
                  f"top-half overlap with the longest fit {fit['top_half_overlap_with_longest']:.2f}"
                  f"{', passkey ' + str(fit['passkey']) if 'passkey' in fit else ''}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model or "SmolLM2 shape, random"),
                                        "device": str(torch.cuda.get_device_name() if device.type == "cuda"
                                                      else "cpu"),
                                        "dtype": args.dtype, "pattern": GATE_PATTERN.to_json(),
                                        "dense_passkey": dense, "dense_heads_in_plans": keep,
                                        "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
