"""The attention profile's proxy on refllama-16m: every cell measured, beside the proxy with a few
measured.

Two compiles of refllama-16m (budget 0.5, objective kv_memory, passes attn_pattern, prompt 512:
patterns profiled at 256 and 512 tokens, calibration code-calib.txt, no cache, no refit): one
measuring the real KL of every (length, layer, KV head, pattern) cell, one measuring at most
MEASURED_PER_LENGTH cells a length and mapping the proxy for the rest
(tailor.passes.attention_profile). Printed: the attention profile's time in each, the proxy's
Spearman rank correlation with the real KL over every cell, and the plan each search picks with
its held-out KL (the proxy's should stay within ~1.2× the full one's).

    python benchmarks/attention_proxy.py [--budget 0.5] [--measured 48]
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import tailor
from tailor.passes.attention_profile import MEASURED_PER_LENGTH, profile_attention, rank_correlation
from tailor.stages import calibrate

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / "../shared").resolve()
MODEL = SHARED / "models" / "refllama-16m"
CALIB = SHARED / "data" / "code-calib.txt"


def compiled(budget: float, measured: int | None):
    """The compile with `measured` cells a length (None: every cell), and the seconds its attention
    profile took. compile has no knob for the count (the profile's settings come from
    calibrate.attention_data): the benchmark sets it there. No refit: what the profile decides is
    the search's plan, and the refit took longer than both profiles on this machine."""
    def data(*args, **kwargs):
        out = calibrate.attention_data(*args, **kwargs, measure_all=measured is None)
        if measured is not None and out:
            out["attn"]["measured"] = measured
        return out

    seconds = []

    def timed(*args, **kwargs):
        started = time.perf_counter()
        out = profile_attention(*args, **kwargs)
        seconds.append(time.perf_counter() - started)
        return out

    with mock.patch("tailor.pipeline.attention_data", data), \
            mock.patch("tailor.passes.profile.profile_attention", timed):
        c = tailor.compile(MODEL, budget=budget, objective="kv_memory", passes=["attn_pattern"], calib=CALIB,
                           prompt_len=512, use_cache=False, refit=False)
    return c, seconds[0]


def cells(profile: dict, key: str) -> dict[int, np.ndarray]:
    return {int(n): np.asarray(v, dtype=float) for n, v in profile[key].items()}


def plan_lines(c) -> list[str]:
    return [f"    layer {r['layer']}: " + ", ".join("dense" if s is None else f"{s[0]}+{s[1]:g}+{s[2]:g}N"
                                                    for s in r["choice"]["spans"]) for r in c.plan.rewrites]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--measured", type=int, default=MEASURED_PER_LENGTH)
    args = ap.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"refllama-16m, attn_pattern, kv_memory budget {args.budget}, prompt 512; {machine}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    runs = {"full": compiled(args.budget, None), "proxy": compiled(args.budget, args.measured)}
    full = runs["full"][0].report["attention_profile"]
    true, proxy = cells(full, "loss"), cells(full, "proxy")
    for name, (c, seconds) in runs.items():
        prof = c.report["attention_profile"]
        loss = cells(prof, "loss")
        print(f"\n{name}: attention profile {seconds:.1f} s, {prof['measured']} cells measured")
        for n in sorted(true):
            # patterns dense at n are zero whatever the method: only the cells there is to know
            real = np.isfinite(true[n]) & (proxy[n] > 0)
            rho = rank_correlation(proxy[n][real], true[n][real])
            est = rank_correlation(loss[n][real], true[n][real])
            own = prof["spearman"].get(str(n))
            print(f"  length {n}: {int(real.sum())} cells; Spearman proxy vs real KL {rho:.3f}, "
                  f"this profile's losses vs real KL {est:.3f}; on its measured cells "
                  f"{'-' if own is None else f'{own:.3f}'}")
        print(f"  held-out KL of the plan: {c.report['search']['measured_kl_heldout']:.4f} "
              f"(predicted {c.report['search']['predicted_kl']:.4f}), kv_memory "
              f"{c.plan.predicted['kv_memory']:.3f}")
        print("\n".join(plan_lines(c)))
    ratio = runs["proxy"][0].report["search"]["measured_kl_heldout"] / \
        runs["full"][0].report["search"]["measured_kl_heldout"]
    print(f"\nheld-out KL proxy / full: {ratio:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
