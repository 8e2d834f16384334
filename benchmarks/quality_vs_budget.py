"""Quality vs budget on refllama-16m: tailor's plan beside single-technique baselines.

Objective latency (target h100 unless --target, prompt 1024, no decode), calibration on
code-calib.txt (16 windows of 512 tokens; attention profiled at 512 and 1024 tokens with the
default synthetic retrieval sequences, as `tailor.compile` does), evaluation on the first 12
windows of 1024 tokens of code-eval.txt (the same windows for every row). tailor searches every
pass (attention patterns included); baselines, each cut down to the same predicted cost:
- ShortGPT: drop the layers of lowest block influence until the budget is met;
- FLAP uniform: the same (KV groups, query heads per group) in every layer, the mildest that
  meets the budget, with the same least-squares compensation tailor uses;
- FFN skip: drop the FFNs of lowest contribution until the budget is met.
A baseline that cannot reach a budget says so.

    python benchmarks/quality_vs_budget.py [--budgets 0.9,0.75,0.5] [--target h100]
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import torch

from tailor.backends import backend_for
from tailor.core.targets import get_target
from tailor.data.calibration import add_attention_data, calibration_from_text
from tailor.data.text import load_tokenizer, read_text, token_windows
from tailor.passes.attention_profile import MEASURED_PER_LENGTH
from tailor.passes.attn_pattern import default_grid
from tailor.passes.baselines import greedy, shortgpt, uniform_heads
from tailor.passes.cost import CostModel, Workload
from tailor.passes.profile import run_profile
from tailor.passes.registry import PASSES, apply_options
from tailor.passes.search import price, search, structure_of
from tailor.quality.metrics import lm_metrics
from tailor.rewriter.capture import capture
from tailor.stages.search import HeldOut

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / "../shared").resolve()
MODEL = SHARED / "models" / "refllama-16m"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.9,0.75,0.5")
    ap.add_argument("--target", default="h100", help="cost-model target (h100, a100, cpu, ...)")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    t0 = time.time()
    cap = capture(MODEL)
    dense, graph = backend_for(cap), cap.graph
    tok = load_tokenizer(MODEL)
    cal = calibration_from_text(read_text(SHARED / "data" / "code-calib.txt"), tok, 512, 16, "code-calib.txt")
    lengths = [512, 1024]
    add_attention_data(cal, lengths, 768, tok)
    settings = {"windows": 16, "len": 512, "seed": 0,
                "attn": {"lengths": lengths, "grid": [g.to_json() for g in default_grid(max(lengths))],
                         "retrieval": cal.retrieval_weight, "measured": MEASURED_PER_LENGTH}}
    prof, options, _ = run_profile(dense, cal, list(PASSES), model_hash=cap.model_hash, settings=settings,
                                   progress=True)
    for o in options:
        o.loss = prof.loss(o)
    cm = CostModel(graph, Workload(1, 1024, 0), get_target(args.target))
    price(options, cm)
    eval_ids = token_windows(tok(read_text(SHARED / "data" / "code-eval.txt"))["input_ids"], 1024, 12)
    dense_logits = torch.cat(dense.outputs(eval_ids, batch=1))
    heldout = HeldOut(dense, cal)

    def measure(chosen):
        return heldout.divergence(apply_options(dense.clone(), chosen, prof.signals))

    rows = []

    def row(budget, method, chosen):
        if chosen is None:
            rows.append(f"| {budget} | {method} | unreachable | | | | |")
            return
        variant = apply_options(dense.clone(), chosen, prof.signals)
        m = lm_metrics(torch.cat(variant.outputs(eval_ids, batch=1)), eval_ids, dense_logits)
        ratio = cm.ratio(structure_of(graph, chosen), "latency")
        what = ", ".join(sorted({o.pass_name for o in chosen})) or "—"
        rows.append(f"| {budget} | {method} | {ratio:.3f} | {m['perplexity']:.3f} | "
                    f"{m['perplexity'] / dense_ppl:.3f} | {m['kl_to_reference']:.4f} | "
                    f"{m['top1_agreement']:.3f} | {what} ({len(chosen)} rewrites) |")

    dense_ppl = lm_metrics(dense_logits, eval_ids, None)["perplexity"]
    rows.append(f"| 1.0 | dense | 1.000 | {dense_ppl:.3f} | 1.000 | 0 | 1.000 | — |")
    ffns = [o for o in options if o.pass_name == "ffn_skip"]
    contrib = prof.signals.ffn_contribution
    for b in budgets:
        row(b, "**tailor**", search(options, cm, b, "latency", measure).chosen)
        row(b, "ShortGPT (layer skip by block influence)", shortgpt(cm, prof.signals, b, "latency"))
        row(b, "FLAP uniform head pruning", uniform_heads(cm, prof.signals, b, "latency"))
        row(b, "FFN skip by contribution", greedy(ffns, lambda o: contrib[o.layer], cm, b, "latency"))
    print(f"# quality vs budget, refllama-16m, target {args.target}, {date.today()}, "
          f"{platform.machine()} CPU, torch {torch.__version__}, {time.time() - t0:.0f} s "
          f"(profile cached: {prof.extra['cached']})")
    print("| budget | method | predicted latency ratio | ppl | ppl / dense | KL to dense | top-1 agreement "
          "| rewrites |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
