"""Options estimated from their proxies against every option measured, on refllama-16m.

Compiles of refllama-16m (objective latency, every pass but attn_pattern, prompt 512, calibration
code-calib.txt, no cache, no refit) at each budget, twice: with every option measured alone (what
the profile does while measuring them all fits OPTION_SECONDS of work), and with no allowance at
all (OPTION_SECONDS = 0: MIN_MEASURED_PER_PASS options a pass spread over its proxy's order, a
monotone map for the rest, the search measuring what its plans choose). Printed: options
measured in the profile and in the search, the profile's option seconds, the proxies' Spearman
correlation with the real KL over every option of each pass, and each plan's held-out KL.

    python benchmarks/option_proxy.py [--budgets 0.7,0.5]
"""
from __future__ import annotations

import argparse
import contextlib
import platform
from datetime import date
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import tailor
from tailor.backends import backend_for
from tailor.passes.attention_profile import rank_correlation
from tailor.passes.profile import MIN_MEASURED_PER_PASS, load_cached
from tailor.passes.registry import PASSES
from tailor.rewriter.capture import capture

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / "../shared").resolve()
MODEL = SHARED / "models" / "refllama-16m"
CALIB = SHARED / "data" / "code-calib.txt"
MEASURED = ["layer_skip", "ffn_skip", "ffn_prune", "head_prune", "kv_share"]


def compiled(budget: float, allowance: float | None, cache: Path):
    """A compile; `allowance` None: the default OPTION_SECONDS. The profile is kept in `cache`
    (its option losses are read back), and not reused: each compile's cache is its own."""
    with mock.patch.dict("os.environ", {"TAILOR_CACHE": str(cache)}):
        patch = mock.patch("tailor.passes.profile.OPTION_SECONDS", allowance) if allowance is not None \
            else contextlib.nullcontext()
        with patch:
            c = tailor.compile(MODEL, budget=budget, objective="latency", passes=MEASURED, calib=CALIB,
                               prompt_len=512, refit=False)
        (entry,) = (cache / "profiles").glob("*.json")
        return c, load_cached(entry.stem)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.7,0.5")
    ap.add_argument("--work", default="/tmp/tailor-option-proxy")
    args = ap.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"refllama-16m, passes {','.join(MEASURED)}, objective latency, prompt 512, no refit; "
          f"{machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}")
    graph = backend_for(capture(MODEL)).graph
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        full, full_prof = compiled(budget, None, Path(args.work) / f"full-{budget}")
        proxy, proxy_prof = compiled(budget, 0, Path(args.work) / f"proxy-{budget}")
        if budget == float(args.budgets.split(",")[0]):
            print("\nSpearman of each pass's proxy with the real KL of every one of its options:")
            for name in MEASURED:
                options = PASSES[name].candidates(graph, full_prof.signals)
                p = np.array([PASSES[name].proxy(graph, o, full_prof.signals) for o in options])
                kl = np.array([full_prof.option_kl[o.key] for o in options])
                rho = rank_correlation(p, kl)
                print(f"  {name}: {len(options)} options, Spearman {'-' if rho is None else f'{rho:.3f}'}")
        for name, c in (("every option measured", full), ("proxies", proxy)):
            cal, search = c.report["calibration"], c.report["search"]
            measured = f"{cal['options_measured']} + {search.get('options_measured', 0)}"
            rows.append(f"| {budget} | {name} | {measured} | {cal['profile_seconds']['options']:.0f} s | "
                        f"{search['measured_kl_heldout']:.4f} | {len(c.plan.rewrites)} |")
        ratio = proxy.report["search"]["measured_kl_heldout"] / full.report["search"]["measured_kl_heldout"]
        rows.append(f"| {budget} | proxies / every option | | | **{ratio:.2f}×** | |")
    print(f"\nproxies: {MIN_MEASURED_PER_PASS} options a pass measured in the profile")
    print("\n| budget | options | measured (profile + search) | option seconds | held-out KL | rewrites |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
