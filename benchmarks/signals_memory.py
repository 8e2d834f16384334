"""Peak host memory and time of the profile's signals phase (tailor.passes.profile.collect_signals)
on a causal LM in float32 on the CPU: the phase that sets the floor of a CPU compile's peak
(docs/BENCHMARKS.md, issue 23). Calibration: windows of 512 tokens of a text file.

    python benchmarks/signals_memory.py --model HF_DIR [--calib FILE] [--windows 16]

For SmolLM2-135M, HF_DIR is made by `benchmarks/compile_scale.py --convert-gguf FILE DIR`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tailor.backends import backend_for
from tailor.core.devices import PeakMemory
from tailor.data.calibration import calibration_from_text
from tailor.data.text import load_tokenizer
from tailor.passes.profile import collect_signals
from tailor.rewriter.capture import capture

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="HF folder of a causal LM")
    ap.add_argument("--calib", type=Path, default=SHARED / "data" / "code-calib.txt")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backend = backend_for(capture(args.model, device="cpu", dtype="float32"))
    cal = calibration_from_text(args.calib.read_text()[:300_000], load_tokenizer(args.model), 512,
                                args.windows, str(args.calib))
    meter, t0 = PeakMemory(), time.perf_counter()
    with meter():
        collect_signals(backend, cal.profile_ids)
    print(json.dumps({"model": str(args.model), "profile_windows": len(cal.profile_ids), "window": 512,
                      "threads": args.threads, "signals_seconds": round(time.perf_counter() - t0, 1),
                      "peak_host_gib": meter.host_gib}))


if __name__ == "__main__":
    main()
