"""Attention patterns on refllama-16m at a context of about 1500 tokens: tailor's per-KV-head
plan beside uniform and binary baselines at the same attention density.

Density = attention entries kept / dense causal entries at N = 1536 (the cost model's
`attention` objective). Rows, each at or under the density:
- StreamingLLM: every head sink 64 + the widest uniform window that fits;
- DuoAttention-style: the KV heads with the most long-range attention mass (on retrieval and
  text sequences) dense, the others sink 64 + window 256; as many dense heads as fit;
- tailor: `tailor.compile(..., objective="attention", passes=["attn_pattern"])`, calibrated on
  code-calib.txt (patterns profiled at 512 and 1536, plans validated at 1024).
Quality: retrieval exact match on synthetic sequences of 1500 tokens (seeds never used in
calibration), perplexity and KL to dense on the first 12 windows of 1536 tokens of code-eval.txt.

    python benchmarks/attention_patterns.py [--densities 0.5,0.25] [--samples 100]
"""
from __future__ import annotations

import argparse
import copy
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import transformers

import tailor
from tailor.backends.runners import HFModel
from tailor.core.patterns import Pattern, density
from tailor.data.retrieval import make_samples, retrieval_accuracy
from tailor.data.text import load_tokenizer, read_text, token_windows
from tailor.quality.metrics import lm_metrics
from tailor.rewriter.modules.sparse_attention import install

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / "../shared").resolve()
MODEL = SHARED / "models" / "refllama-16m"
N = 1536
SINK = 64


def with_patterns(model, per_layer: list[list[Pattern | None]]):
    m = copy.deepcopy(model)
    for layer, pats in zip(m.model.layers, per_layer):
        install(m, layer.self_attn, pats)
    return m


def long_range_mass(model, seqs: list[torch.Tensor], window: int) -> np.ndarray:
    """Per [layer, kv_head]: mean attention mass on keys beyond the sink and `window` back."""
    m = copy.deepcopy(model)
    m.config._attn_implementation = "eager"
    kv = m.config.num_key_value_heads
    groups = m.config.num_attention_heads // kv
    out = np.zeros((m.config.num_hidden_layers, kv))
    with torch.no_grad():
        for ids in seqs:
            att = m(input_ids=ids[None], output_attentions=True).attentions
            n = ids.shape[0]
            i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
            far = (j >= SINK) & (i - j >= window)
            for layer, a in enumerate(att):
                mass = (a[0] * far).sum(-1).mean(-1)  # per query head
                out[layer] += mass.view(kv, groups).mean(1).numpy() / len(seqs)
    return out


def streaming(layers: int, kv: int, d: float) -> list[list[Pattern]]:
    w = max(w for w in range(1, N) if density([Pattern(SINK, w, 0)], N) <= d + 1e-12)
    return [[Pattern(SINK, w, 0)] * kv for _ in range(layers)]


def duo(mass: np.ndarray, d: float) -> tuple[list[list[Pattern | None]], int, int]:
    """The most dense heads that fit, the others sink 64 + window 256; where not even one dense
    head fits with window 256, the widest of 128 and 64 that does."""
    layers, kv = mass.shape
    order = np.argsort(-mass.ravel(), kind="stable")
    for window in (256, 128, 64):
        best = None
        for k in range(1, layers * kv + 1):
            dense = set(order[:k].tolist())
            pats = [[None if layer * kv + h in dense else Pattern(SINK, window, 0) for h in range(kv)]
                    for layer in range(layers)]
            if density([p for row in pats for p in row], N) <= d + 1e-12:
                best = (pats, k, window)
        if best:
            return best
    raise SystemExit(f"no DuoAttention-style plan fits density {d}")


def evaluate(name, model, ref_logits, windows, tok, samples, seed) -> dict:
    hf = HFModel(model)
    with torch.no_grad():
        logits = torch.cat([hf(w[None]) for w in windows])
    q = lm_metrics(logits, windows, ref_logits)
    acc = retrieval_accuracy(hf, tok, [1500], samples=samples, seed=seed)[1500]
    return {"method": name, "retrieval": acc, "perplexity": q["perplexity"],
            "kl": q.get("kl_to_reference", 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--densities", default="0.5,0.25")
    ap.add_argument("--samples", type=int, default=100)
    args = ap.parse_args()
    densities = [float(x) for x in args.densities.split(",")]
    tok = load_tokenizer(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()
    layers, kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    windows = token_windows(tok(read_text(SHARED / "data" / "code-eval.txt"))["input_ids"], N, 12)
    with torch.no_grad():
        ref_logits = torch.cat([HFModel(model)(w[None]) for w in windows])
    seed = 424242  # retrieval seeds disjoint from calibration's (seed + length)
    rows = [evaluate("dense", model, ref_logits, windows, tok, args.samples, seed) | {"density": 1.0}]
    print(rows[-1], flush=True)
    calib_ids = tok(read_text(SHARED / "data" / "code-calib.txt"))["input_ids"]
    probe = [s.ids for s in make_samples(tok, N, 4, 99)] + [torch.tensor(calib_ids[k * 40000:k * 40000 + N])
                                                             for k in range(2)]
    mass = long_range_mass(model, probe, 256)
    for d in densities:
        pats = streaming(layers, kv, d)
        rows.append(evaluate(f"StreamingLLM ({pats[0][0]})", with_patterns(model, pats), ref_logits, windows,
                             tok, args.samples, seed) | {"density": density(sum(pats, []), N)})
        print(rows[-1], flush=True)
        pats, k, window = duo(mass, d)
        rows.append(evaluate(f"DuoAttention-style ({k} dense heads, rest sink 64 + window {window})",
                             with_patterns(model, pats), ref_logits, windows, tok, args.samples, seed)
                    | {"density": density(sum(pats, []), N)})
        print(rows[-1], flush=True)
        t0 = time.time()
        c = tailor.compile(str(MODEL), budget=d, objective="attention", passes=["attn_pattern"], prompt_len=N,
                           calib=str(SHARED / "data" / "code-calib.txt"), attn_lengths=[512, N],
                           validation_len=1024, progress=True)
        spent = time.time() - t0
        plan = [r["label"] for r in c.plan.rewrites]
        rows.append(evaluate("tailor", c.model.inner, ref_logits, windows, tok, args.samples, seed)
                    | {"density": c.plan.predicted["attention"], "compile_s": spent, "plan": plan})
        print(rows[-1], flush=True)

    dense = rows[0]
    print(f"\n## Attention patterns — refllama-16m, N = {N} ({date.today()}, {platform.machine()} CPU, "
          f"torch {torch.__version__})\n")
    print("| method | density | retrieval @1500 | ppl | ppl / dense | KL to dense |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['density']:.3f} | {r['retrieval']:.2f} | {r['perplexity']:.3f} | "
              f"{r['perplexity'] / dense['perplexity']:.3f} | {r['kl']:.4f} |")
    for r in rows:
        if "plan" in r:
            print(f"\ntailor at density {r['density']:.3f} (compile {r['compile_s']:.0f} s):")
            for line in r["plan"]:
                print(f"- {line}")


if __name__ == "__main__":
    main()
