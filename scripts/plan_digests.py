"""Pin what the search decides: the sha256 of plan.json for fixed inputs and seed.

A structural refactor must leave these unchanged (same inputs, same seed, same machine and
libraries: byte-identical plan.json but for the model hash, see plan_digest). A fix that changes
plans updates the pins in its own commit.

    python scripts/plan_digests.py            # compute and compare with scripts/plan_digests.json
    python scripts/plan_digests.py --write    # pin the digests computed now

Cases (nominal targets, so no timing enters the plan; the profile cache is off):
- refllama-16m from its HF directory (torch), every pass, budget 0.6, prompt 256;
- refllama-16m exported to ONNX, every pass with an ONNX rewrite, budget 0.6, prompt 256;
- all-MiniLM-L6-v2 as ONNX (the demo's model), budget 0.75, prompt 128, docstring calibration.
About six minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFLLAMA = (REPO / "../shared/models/refllama-16m").resolve()
CALIB = (REPO / "../shared/data/code-calib.txt").resolve()
PINS = Path(__file__).with_suffix(".json")


def cases(work: Path) -> dict[str, dict]:
    from tailor.backends.export import export_onnx
    from tailor.cli.default_model import default_calibration, minilm_onnx
    from tailor.rewriter.capture import load_hf_directory

    refllama_onnx = work / "refllama" / "model.onnx"
    refllama_onnx.parent.mkdir()
    export_onnx(load_hf_directory(REFLLAMA), refllama_onnx, encoder=False)
    lm = dict(budget=0.6, target="cpu", prompt_len=256, calib=str(CALIB), tokenizer=str(REFLLAMA),
              calib_windows=16, calib_len=128, attn_lengths=[128, 256], seed=0)
    return {
        "refllama-torch": dict(model=str(REFLLAMA), **lm),
        "refllama-onnx": dict(model=str(refllama_onnx), **lm),
        "minilm-onnx": dict(model=str(minilm_onnx(log=lambda m: None)), budget=0.75, target="cpu",
                            prompt_len=128, calib=str(default_calibration()), seed=0),
    }


def plan_digest(plan) -> str:
    """sha256 of plan.json without the model's hash: an ONNX export's bytes (hence its hash)
    carry the exporting code's file paths, so the same model exported from another checkout
    hashes differently while every decision in the plan is the same."""
    data = plan.to_json() | {"model_hash": ""}
    return hashlib.sha256((json.dumps(data, indent=2, sort_keys=True) + "\n").encode()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="pin the digests computed now")
    ap.add_argument("--only", help="comma-separated case names")
    ap.add_argument("--save", type=Path, help="also write each case's plan.json and report.json here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TAILOR_CACHE"] = str(Path(tmp) / "cache")
        import tailor

        digests = {}
        for name, kwargs in cases(Path(tmp)).items():
            if args.only and name not in args.only.split(","):
                continue
            t0 = time.perf_counter()
            model = kwargs.pop("model")
            opt = tailor.compile(model, use_cache=False, refit=True, **kwargs)
            digests[name] = plan_digest(opt.plan)
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                (args.save / f"{name}.plan.json").write_text(opt.plan.dumps())
                (args.save / f"{name}.report.json").write_text(json.dumps(opt.report, indent=1, default=str))
            print(f"{name}: {digests[name]}  ({len(opt.plan.rewrites)} rewrites, "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
    if args.write or not PINS.is_file():
        pins = json.loads(PINS.read_text()) if PINS.is_file() else {}
        PINS.write_text(json.dumps(pins | digests, indent=2, sort_keys=True) + "\n")
        return 0
    pins = json.loads(PINS.read_text())
    unpinned = [n for n in digests if n not in pins]
    changed = [n for n, d in digests.items() if n in pins and pins[n] != d]
    if unpinned:
        print(f"no pin yet (pin with --write): {', '.join(unpinned)}")
    print("plan.json unchanged" if not changed else f"plan.json changed: {', '.join(changed)}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
