"""End to end on a GPU, from the plan tailor's own search makes there: a model is compiled on
CUDA in bf16 (tailor.compile, every pass, --budget 0.5, objective latency, prompt 16K, target h100,
data-free calibration, measured profile), then the rewritten model it returns is run with tailor's
runtime beside the dense one.

    python benchmarks/end_to_end_gpu.py --model llama1b --out DIR
    python benchmarks/end_to_end_gpu.py --model smollm2 --smollm2 HF_DIR --out DIR

Models: `llama1b`, Llama-3.2-1B's shape (16 layers, 32 heads, 8 KV heads, hidden 2048, head_dim 64;
random weights, seed 0: its times are real, its KL means nothing); `smollm2`, SmolLM2-135M-Instruct
(real weights; an HF folder made by `benchmarks/compile_scale.py --convert-gguf`). Measured:
- the compile: seconds, its plan (saved as plan.json in --out), predicted ratios, held-out KL;
- prefill of 16K tokens: dense model (transformers, SDPA) vs the rewritten model through tailor's
  runtime (block-sparse Triton prefill), both eager and both through torch.compile (the dense
  one layer by layer, see regionally_compiled); target ≤ 0.6× dense;
- decode tokens/s at a 32K context, batch 1 and 8: dense (transformers' DynamicCache + SDPA, and
  tailor's runtime with an all-dense cache) vs the rewritten model (per-head ring cache, split-K
  decode), eager, with the decode step replayed as a CUDA graph, and compiled (torch.compile
  fuses the step's elementwise kernels) then replayed; target ≥ 1.8× dense;
- KV-cache bytes, rewritten vs dense; target ≤ 0.55×;
- the cost model's predicted latency ratio beside the measured prefill ratio (target: within 20%).
`--plan plan.json` replays a saved plan instead of searching (the rewrites without the refit).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from datetime import date
from pathlib import Path

import torch
import transformers as tf

PROMPT, CONTEXT = 16384, 32768


def build(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                            max_position_embeddings=131072, tie_word_embeddings=True, use_cache=False)
    with torch.device(device):
        model = tf.LlamaForCausalLM(config).to(dtype).eval()
    return model


def dense_model(name: str, smollm2: Path | None, dtype=torch.bfloat16, device="cuda"):
    if name == "llama1b":
        return build(dtype, device)
    return tf.AutoModelForCausalLM.from_pretrained(smollm2, dtype=dtype, device_map=device).eval()


def compiled(dense, out: Path) -> tuple[torch.nn.Module, dict]:
    """tailor's searched plan for `dense` where it sits (default options, no profile cache): the
    rewritten module, and what the compile reported."""
    import tailor

    started = time.perf_counter()
    result = tailor.compile(dense, 0.5, objective="latency", prompt_len=PROMPT, target="h100",
                            use_cache=False, progress=True)
    seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(result.plan.to_json(), indent=1))
    report = result.report
    return result.rewritten.model, {
        "seconds": round(seconds, 1), "rewrites": len(result.plan.rewrites),
        "labels": [r["label"] for r in result.plan.rewrites], "predicted": result.plan.predicted,
        "kl_heldout": report.get("search", {}).get("measured_kl_heldout"),
        "stages": report.get("stages")}


def rewritten(dense, plan: dict):
    """The plan's rewrites applied to a copy of `dense` that shares its weights (no refit)."""
    from tailor.backends.torch_backend import TorchBackend
    from tailor.passes.registry import apply_options, options_from_plan
    from tailor.rewriter.capture import capture

    graph = capture(dense).graph
    variant = TorchBackend(dense, graph).clone()
    apply_options(variant, options_from_plan(graph, plan["rewrites"]), None)
    return variant.model


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


STEPS = 16


def hf_decode_rate(model, prompts: list[list[int]]) -> float:
    """Tokens/s of transformers' own decoding (DynamicCache + SDPA) after a prefill of the prompts."""
    past = tf.DynamicCache(config=model.config)
    logits = model(input_ids=torch.tensor(prompts, device="cuda"), past_key_values=past, use_cache=True,
                   logits_to_keep=1).logits
    tok = [logits[:, -1].argmax(-1, keepdim=True)]

    def step():
        o = model(input_ids=tok[0], past_key_values=past, use_cache=True, logits_to_keep=1)
        tok[0] = o.logits[:, -1].argmax(-1, keepdim=True)
    rate = len(prompts) / timed(step, STEPS)
    torch.cuda.empty_cache()
    return rate


VARIANTS = {"eager": {}, "graph": {"cuda_graph": True},
            "compiled": {"cuda_graph": True, "compiled": True}}


def tailor_decode_rate(model, prompts: list[list[int]], variant: str) -> tuple[float, int]:
    """Tokens/s of tailor's runtime after a prefill of the prompts, and its KV-cache bytes."""
    from tailor.runtime.generate import Generator, kv_cache_bytes

    runner = Generator(model, len(prompts), len(prompts[0]) + 2 * STEPS + 4, **VARIANTS[variant])
    nxt = [runner.prefill(prompts).argmax(-1)]

    def step():
        nxt[0] = runner.step(nxt[0]).argmax(-1)
    rate = len(prompts) / timed(step, STEPS)
    kv = kv_cache_bytes(runner.state)
    torch.cuda.empty_cache()
    return rate, kv


def profile_decode(dense, ours, out: Path, batch: int = 1) -> None:
    """Where a decode step's time goes at a 32K context: torch.profiler over eager steps and over
    CUDA-graph replays, dense (tailor's runtime, all-dense cache) and rewritten; one table each."""
    from torch.profiler import ProfilerActivity, profile

    from tailor.runtime.generate import Generator

    gen = torch.Generator().manual_seed(1)
    out.mkdir(parents=True, exist_ok=True)
    for name, model in (("tailor", ours), ("dense", dense)):
        context = torch.randint(0, model.config.vocab_size, (CONTEXT,), generator=gen).tolist()
        with torch.no_grad():
            for graph in (False, True):
                runner = Generator(model, batch, CONTEXT + 3 * STEPS + 4, cuda_graph=graph)
                nxt = [runner.prefill([context] * batch).argmax(-1)]
                for _ in range(3):
                    nxt[0] = runner.step(nxt[0]).argmax(-1)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(STEPS):
                        nxt[0] = runner.step(nxt[0]).argmax(-1)
                    torch.cuda.synchronize()
                step_ms = timed(lambda: runner.step(nxt[0]), STEPS) * 1e3
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30,
                                                  max_name_column_width=70)
                text = f"{name} {'graph' if graph else 'eager'} B={batch}: {step_ms:.3f} ms/step\n{table}"
                (out / f"profile_decode_{name}_{'graph' if graph else 'eager'}_b{batch}.txt").write_text(text)
                print(text[:6000], flush=True)
                torch.cuda.empty_cache()


def profile_prefill(dense, ours, out: Path, variants: list[str]) -> None:
    """Where a 16K prefill's time goes: torch.profiler over one dense prefill (transformers, SDPA)
    and one through tailor's runtime, eager and (if in variants) compiled; per run the ms per
    call, the host's time to issue it (it returns before the GPU is done unless something syncs),
    the CUDA kernels' total, and the top ops by CUDA and by host time. The first device sync
    inside the call is reported with its stack."""
    import traceback
    import warnings

    from torch.profiler import ProfilerActivity, profile

    from tailor.runtime.generate import Generator

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, dense.config.vocab_size, (PROMPT,), generator=gen).tolist()
    ids = torch.tensor([prompt], device="cuda")
    out.mkdir(parents=True, exist_ok=True)
    for variant in ("eager", "compiled"):
        if variant not in variants:
            continue
        compiled = variant == "compiled"
        runner = Generator(ours, 1, PROMPT + 8, compiled=compiled)
        calls = {"dense": lambda: dense(input_ids=ids, use_cache=False, logits_to_keep=1),
                 "tailor": lambda: runner.prefill([prompt])}
        for name, fn in calls.items():
            with torch.no_grad(), regionally_compiled(dense, compiled and name == "dense"):
                ms = timed(fn, 5) * 1e3
                torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                issued = (time.perf_counter() - start) * 1e3
                torch.cuda.synchronize()
                syncs: dict[str, str] = {}

                def note(message, *args, **kwargs):  # one entry per place that syncs
                    stack = traceback.format_stack(limit=12)[:-2]
                    syncs.setdefault(stack[-1].strip().splitlines()[0], "".join(stack))
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("always")
                        warnings.showwarning = note
                        fn()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
            events = prof.key_averages()
            kernels = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3
            text = (f"{name} {variant} prefill {PROMPT}: {ms:.2f} ms/call, "
                    f"host issues it in {issued:.2f} ms, "
                    f"CUDA kernels {kernels:.2f} ms; {len(syncs)} places that sync the device\n"
                    + "".join(f"--- sync:\n{v}" for v in list(syncs.values())[:4])
                    + events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=80)
                    + events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=80))
            (out / f"profile_prefill_{name}_{variant}.txt").write_text(text)
            print(text[:2500], flush=True)
            torch.cuda.empty_cache()
        if compiled:
            from torch._dynamo.utils import counters

            print("dynamo counters:", {k: dict(v) for k, v in counters.items() if v}, flush=True)


@contextlib.contextmanager
def regionally_compiled(model, on: bool):
    """The dense baseline with each decoder layer through torch.compile. Not the whole model: on
    torch < 2.14 transformers then materialises the causal mask (16K × 16K) and SDPA leaves its
    flash path (measured 1.8× slower than eager); built outside the layers the mask stays None."""
    layers = list(model.model.layers) if on else []
    for layer in layers:
        layer.compile()
    try:
        yield model
    finally:
        for layer in layers:  # later runs use the plain model
            layer._compiled_call_impl = None


def measure(dense, ours, rows: dict, out: Path, variants: list[str], batches: list[int]) -> None:
    from tailor.runtime.generate import Generator

    vocab = dense.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (PROMPT,), generator=gen).tolist()

    with torch.no_grad():
        ids = torch.tensor([prompt], device="cuda")
        prefill: dict = {}
        for variant, compiled in (("eager", False), ("compiled", True)):
            if variant == "compiled" and variant not in variants:
                continue
            with regionally_compiled(dense, compiled):
                prefill[f"dense_{variant}_s"] = timed(
                    lambda: dense(input_ids=ids, use_cache=False, logits_to_keep=1), 5)
            runner = Generator(ours, 1, PROMPT + 8, compiled=compiled)
            prefill[f"tailor_{variant}_s"] = timed(lambda: runner.prefill([prompt]), 5)
            prefill[f"ratio_{variant}"] = prefill[f"tailor_{variant}_s"] / prefill[f"dense_{variant}_s"]
            torch.cuda.empty_cache()
        rows["prefill_16k"] = prefill
        print(json.dumps(rows["prefill_16k"]), flush=True)

        context = torch.randint(0, vocab, (CONTEXT,), generator=gen).tolist()
        for batch in batches:
            row = {"hf_dense_tok_s": hf_decode_rate(dense, [context] * batch)}
            for name, model in (("dense", dense), ("tailor", ours)):
                for variant in variants:
                    rate, kv = tailor_decode_rate(model, [context] * batch, variant)
                    row[f"{name}_{variant}_tok_s"] = rate
                    row[f"{name}_kv_bytes"] = kv
                    print(name, variant, batch, f"{rate:.1f} tok/s", flush=True)
            row["kv_ratio"] = row["tailor_kv_bytes"] / row["dense_kv_bytes"]
            for variant in variants:
                row[f"decode_speedup_vs_dense_{variant}"] = (row[f"tailor_{variant}_tok_s"]
                                                             / row[f"dense_{variant}_tok_s"])
            best = max(row[f"tailor_{v}_tok_s"] for v in variants)
            row["decode_speedup_vs_hf"] = best / row["hf_dense_tok_s"]
            rows[f"decode_32k_b{batch}"] = row
            print(json.dumps(row), flush=True)
    rows["prefill_ratio_vs_predicted"] = (rows["prefill_16k"]["ratio_eager"]
                                          / rows["compile"]["predicted"]["latency"])
    rows["meta"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "date": date.today().isoformat()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "end_to_end_gpu.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("llama1b", "smollm2"), default="llama1b")
    ap.add_argument("--smollm2", type=Path, help="SmolLM2-135M HF folder (compile_scale.py --convert-gguf)")
    ap.add_argument("--plan", type=Path, help="replay this plan.json instead of searching")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--variants", default="eager,graph,compiled",
                    help=f"decode runs of tailor's runtime to time, from {','.join(VARIANTS)}")
    ap.add_argument("--batches", default="1,8", help="decode batch sizes ('' for none: prefill only)")
    ap.add_argument("--profile-decode", action="store_true",
                    help="only profile decode steps (tables in --out)")
    ap.add_argument("--profile-prefill", action="store_true",
                    help="only profile one 16K prefill, dense and tailor's, eager and compiled if "
                         "in --variants (tables in --out)")
    args = ap.parse_args()
    dense = dense_model(args.model, args.smollm2)
    if args.plan:
        saved = json.loads(args.plan.read_text())
        saved = saved.get("plan", saved) | {"predicted": saved["predicted"]}  # also the 2026-11-22 layout
        ours, rows = rewritten(dense, saved), {"compile": {"predicted": saved["predicted"], "replayed": True}}
    else:
        ours, info = compiled(dense, args.out)
        rows = {"compile": info}
        print(json.dumps(info), flush=True)
    rows["model"] = args.model
    if args.profile_decode:
        profile_decode(dense, ours, args.out)
    elif args.profile_prefill:
        profile_prefill(dense, ours, args.out, args.variants.split(","))
    else:
        measure(dense, ours, rows, args.out, args.variants.split(","),
                [int(b) for b in args.batches.split(",") if b])


if __name__ == "__main__":
    main()
