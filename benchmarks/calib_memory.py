"""Peak memory as the calibration file grows: refllama-16m calibrated on code-calib.txt (841 KB)
and on a file 10× larger (the same text 10 times). Each measurement is a fresh process whose
peak RSS (ru_maxrss) is read at its end: a whole compile (passes ffn_skip, layer_skip), and the
calibration stage alone, streamed as tailor reads --calib or from the whole text at once (what
tailor did before). Calibration keeps a fixed number of windows, so memory should not grow with
the file.

    python benchmarks/calib_memory.py [--scales 1,10] [--out benchmarks/results/calib_memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / "../shared").resolve()
MODEL = SHARED / "models" / "refllama-16m"
CALIB = SHARED / "data" / "code-calib.txt"

# the calibration stage alone, streamed (as tailor reads --calib) or the whole text at once
CALIBRATION_ONLY = """
import resource, sys
from pathlib import Path
from tailor.passes.profile import calibration_from_text
from tailor.quality.metrics import load_tokenizer, read_text_pieces
tok = load_tokenizer(Path(sys.argv[1]))
text = read_text_pieces(Path(sys.argv[2])) if sys.argv[3] == "pieces" else Path(sys.argv[2]).read_text()
cal = calibration_from_text(text, tok, 512, 16, "calib")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 0, cal.source)
"""

# one compile, in its own process: passes without per-option measurement keep it short
CHILD = """
import resource, sys, time
import tailor
start = time.time()
c = tailor.compile(sys.argv[1], 0.9, calib=sys.argv[2], passes=["ffn_skip", "layer_skip"],
                   use_cache=False, prompt_len=512, calib_windows=16, calib_len=512)
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak_kb, time.time() - start, c.report["calibration"]["data"])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1,10")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/calib_memory.json"))
    args = ap.parse_args()
    if not MODEL.is_dir():
        sys.exit(f"needs {MODEL}")
    text = CALIB.read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (int(s) for s in args.scales.split(",")):
            path = Path(tmp) / f"calib-x{scale}.txt"
            path.write_text(text * scale, encoding="utf-8")
            runs = [("compile", [CHILD, str(MODEL), str(path)]),
                    ("calibration, streamed", [CALIBRATION_ONLY, str(MODEL), str(path), "pieces"]),
                    ("calibration, whole text", [CALIBRATION_ONLY, str(MODEL), str(path), "whole"])]
            for what, argv in runs:
                out = subprocess.run([sys.executable, "-c", *argv], capture_output=True, text=True, cwd=REPO,
                                     env=dict(os.environ, PYTHONPATH=str(REPO)))
                if out.returncode:
                    sys.exit(out.stderr)
                rss_kb, secs, data = out.stdout.strip().splitlines()[-1].split(" ", 2)
                rows.append({"what": what, "scale": scale, "file_mb": round(path.stat().st_size / 1e6, 2),
                             "peak_rss_mb": round(int(rss_kb) / 1024, 1), "seconds": round(float(secs), 1),
                             "calibration": data})
                print(f"{what:<24} calib ×{scale:<3} {rows[-1]['file_mb']:7.2f} MB file → peak RSS "
                      f"{rows[-1]['peak_rss_mb']:7.1f} MB", flush=True)
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "date": date.today().isoformat(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
