"""Peak memory of a compile as the calibration file grows: refllama-16m calibrated on
code-calib.txt (841 KB) and on a file 10× larger (the same text 10 times), each compile in a
fresh process whose peak RSS (ru_maxrss) is read at its end. Calibration keeps a fixed number
of windows, so memory should not grow with the file.

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
            out = subprocess.run([sys.executable, "-c", CHILD, str(MODEL), str(path)], capture_output=True,
                                 text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
            if out.returncode:
                sys.exit(out.stderr)
            rss_kb, secs, data = out.stdout.strip().splitlines()[-1].split(" ", 2)
            rows.append({"scale": scale, "file_mb": round(path.stat().st_size / 1e6, 2),
                         "peak_rss_mb": round(int(rss_kb) / 1024, 1), "seconds": round(float(secs), 1),
                         "calibration": data})
            print(f"calib ×{scale:<3} {rows[-1]['file_mb']:7.2f} MB file → peak RSS "
                  f"{rows[-1]['peak_rss_mb']:7.1f} MB ({rows[-1]['seconds']} s)")
    base = rows[0]["peak_rss_mb"]
    for r in rows:
        r["rss_vs_first"] = round(r["peak_rss_mb"] / base, 3)
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "date": date.today().isoformat(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
