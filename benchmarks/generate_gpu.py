"""Generation on the GPU from a tailor artifact (issue 24): time to first token and decode
tokens/s of the rewritten model through tailor's runtime (Triton kernels, per-head KV cache),
against the dense model in transformers (SDPA, static cache, decode steps through torch.compile),
with the same plan's quality figures beside them.

    python benchmarks/generate_gpu.py --model SmolLM2.gguf --config kv_memory:0.5 \
        --calib code-calib.txt --eval-text code-eval.txt --artifact /tmp/art --out generate.json

1. The plan: `tailor.compile(model, budget, objective, prompt_len=--prompt-len, target h100)` on
   CUDA in the model's dtype, saved as an artifact in --artifact (an artifact already there is
   reused: the compile is skipped), then `tailor.load(--artifact, device="cuda")`: what a user ships.
2. Quality of that artifact against the dense model: perplexity, KL and top-1 agreement on the
   first --eval-windows windows of 512 tokens of --eval-text, and passkey retrieval at each of
   --lengths (--samples prompts through the chat template, greedy replies over tailor's cache).
3. Speed at each prompt length × batch (random token prompts, greedy, --new-tokens tokens forced):
   - dense: `model.generate` with a StaticCache preallocated for the longest run (one shape, so
     one compiled decode step), transformers compiling the decode step itself;
   - tailor eager: `Generator` (prefill one sequence at a time, decode the batch);
   - tailor compiled: the same with torch.compile and the decode step replayed as a CUDA graph.
   Time to first token: from the call to the first tokens of the whole batch (median of
   --repeats, after a warm-up of the same shape). Decode: generated tokens per second after them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers as tf

import tailor
from tailor.data.long_context import passkey_samples
from tailor.data.text import load_tokenizer
from tailor.quality.long_context import passkey_accuracy
from tailor.quality.metrics import text_windows, windowed_lm_metrics
from tailor.rewriter.capture import load_gguf, load_hf_directory
from tailor.runtime.generate import Generator, kv_cache_bytes

SHARED = (Path(__file__).resolve().parent.parent / "../shared").resolve()
EVAL_LEN = 512


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="HF folder or .gguf")
    ap.add_argument("--config", default="kv_memory:0.5", help="objective:budget of the compile")
    ap.add_argument("--prompt-len", type=int, default=8192, help="the compile's workload")
    ap.add_argument("--artifact", type=Path, required=True, help="where the artifact is written / reused")
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    ap.add_argument("--samples", type=int, default=20, help="passkey prompts per length (0: none)")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--calib", type=Path, default=SHARED / "data" / "code-calib.txt")
    ap.add_argument("--eval-text", type=Path, default=SHARED / "data" / "code-eval.txt")
    ap.add_argument("--skip", default="", help="comma list of parts to leave out: quality, speed")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.lengths = [int(n) for n in args.lengths.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.objective, budget = args.config.split(":")
    args.budget = float(budget)
    args.skip = set(filter(None, args.skip.split(",")))
    return args


def log(*what) -> None:
    print(*what, file=sys.stderr, flush=True)


def plan_artifact(args) -> dict:
    """Compile and save unless the artifact is there; what the compile reported."""
    if (args.artifact / "plan.json").exists():
        return {"reused": str(args.artifact)}
    started = time.perf_counter()
    compiled = tailor.compile(args.model, args.budget, objective=args.objective, prompt_len=args.prompt_len,
                              target="h100", calib=args.calib, device="cuda", progress=True)
    seconds = time.perf_counter() - started
    compiled.save(args.artifact)
    return {"seconds": round(seconds, 1), "rewrites": [r["label"] for r in compiled.plan.rewrites],
            "kl_heldout": compiled.report.get("search", {}).get("measured_kl_heldout")}


def synced(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def dense_rates(model, prompts: torch.Tensor, new_tokens: int, cache, repeats: int) -> dict:
    """Time to first token and decode tokens/s of transformers' generate over `cache` (a
    StaticCache, reset before every call), greedy, exactly new_tokens tokens."""
    def run(n: int):
        cache.reset()
        return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                              past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)
    run(1), run(new_tokens)  # warm-up: the prefill's kernels, the decode step's compile
    first = statistics.median(synced(lambda: run(1))[0] for _ in range(repeats))
    whole = statistics.median(synced(lambda: run(new_tokens))[0] for _ in range(repeats))
    return {"ttft_s": first, "decode_tok_s": prompts.shape[0] * (new_tokens - 1) / (whole - first)}


def tailor_rates(model, prompts: list[list[int]], new_tokens: int, repeats: int, **variant) -> dict:
    """Time to first token (the batch's prefill and its first tokens) and decode tokens/s of
    tailor's runtime; its KV-cache bytes."""
    runner = Generator(model, len(prompts), len(prompts[0]) + new_tokens + 4, **variant)

    def first():
        return runner.prefill(prompts).argmax(-1)

    def decode(token):
        for _ in range(new_tokens - 1):
            token = runner.step(token).argmax(-1)
        return token

    decode(first())  # warm-up: compile, graph capture
    ttft, decode_s = [], []
    for _ in range(repeats):
        seconds, token = synced(first)
        ttft.append(seconds)
        decode_s.append(synced(lambda: decode(token))[0])
    return {"ttft_s": statistics.median(ttft),
            "decode_tok_s": len(prompts) * (new_tokens - 1) / statistics.median(decode_s),
            "kv_bytes": kv_cache_bytes(runner.state)}


def speed(dense, ours, args) -> list[dict]:
    rows, caches = [], {}
    gen = torch.Generator().manual_seed(1)
    vocab = dense.config.vocab_size
    longest = max(args.lengths) + args.new_tokens + 8
    for length in args.lengths:
        for batch in args.batches:
            # one cache per batch size for every length: one shape, one compiled decode step
            if batch not in caches:
                caches[batch] = tf.StaticCache(config=dense.config, max_cache_len=longest)
            ids = torch.randint(100, vocab, (batch, length), generator=gen)
            row = {"prompt": length, "batch": batch}
            with torch.no_grad():
                row["dense_hf_static_compiled"] = dense_rates(dense, ids.cuda(), args.new_tokens,
                                                              caches[batch], args.repeats)
                torch.cuda.empty_cache()
                prompts = ids.tolist()
                for name, variant in (("tailor_eager", {}),
                                      ("tailor_compiled_graph", {"compiled": True, "cuda_graph": True})):
                    row[name] = tailor_rates(ours, prompts, args.new_tokens, args.repeats, **variant)
                    torch.cuda.empty_cache()
                dense_kv = kv_cache_bytes(Generator(dense, batch, length + args.new_tokens + 4).state)
            best = max(row["tailor_eager"]["decode_tok_s"], row["tailor_compiled_graph"]["decode_tok_s"])
            fastest = min(row["tailor_eager"]["ttft_s"], row["tailor_compiled_graph"]["ttft_s"])
            row["ttft_ratio"] = fastest / row["dense_hf_static_compiled"]["ttft_s"]
            row["decode_speedup"] = best / row["dense_hf_static_compiled"]["decode_tok_s"]
            row["kv_ratio"] = row["tailor_compiled_graph"]["kv_bytes"] / dense_kv
            log(json.dumps(row))
            rows.append(row)
    return rows


def quality(dense, ours, tokenizer, args) -> dict:
    ids = text_windows(args.eval_text, tokenizer, EVAL_LEN, args.eval_windows)
    with torch.no_grad():
        reference = [dense(input_ids=row[None].cuda()).logits.float().cpu() for row in ids]
    out = {"code": windowed_lm_metrics(lambda x: ours(x.cuda()), ids, reference)}
    kept = iter(reference)
    out["dense_code_perplexity"] = windowed_lm_metrics(lambda _: next(kept), ids, None)["perplexity"]
    if args.samples:
        out["passkey"] = {}
        for n in args.lengths:
            samples = passkey_samples(tokenizer, n, args.samples, n)
            out["passkey"][n] = {"dense": passkey_accuracy(dense, tokenizer, samples),
                                 "tailor": passkey_accuracy(ours, tokenizer, samples)}
            log("passkey", n, out["passkey"][n])
    return out


def main() -> None:
    args = parse_args()
    result = {"command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": tf.__version__, "new_tokens": args.new_tokens}
    result["compile"] = plan_artifact(args)
    artifact = tailor.load(args.artifact, device="cuda")
    ours = artifact.model
    result["compile"]["predicted"] = artifact.plan.predicted
    log(json.dumps(result["compile"]))
    loaded = load_gguf if args.model.suffix == ".gguf" else load_hf_directory
    dense = loaded(args.model, device="cuda").eval()
    result["dtype"] = str(next(dense.parameters()).dtype)
    if "quality" not in args.skip:
        result["quality"] = quality(dense, ours, load_tokenizer(args.model), args)
        log(json.dumps(result["quality"]))
    if "speed" not in args.skip:
        result["speed"] = speed(dense, ours, args)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
