"""Where two ONNX models' time goes, side by side in onnxruntime: wall time per call (timed in
turn, medians), the kernels' time by op type (onnxruntime's profiler) and node counts. For a
rewritten artifact against its input: whether a miss of the cost model is in the kernels (what
the cost model prices) or around them (what it does not).

    python benchmarks/ort_profile.py INPUT.onnx ARTIFACT.onnx --tokens 512 --threads 2 [--rounds 3]

Sessions are made as tailor makes its own (idle threads not spinning) unless --spinning is given
(onnxruntime's default); --rounds times the wall that many times, each with fresh sessions.

Feeds: input_ids of 1 × --tokens, an all-ones attention_mask, and an empty KV cache for every
past_key_values input (its fixed dims read from whichever of the two files fixes them).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def session(path: Path, threads: int, profile_prefix: str | None = None,
            spinning: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix:
        so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feeds(sessions: list[ort.InferenceSession], tokens: int) -> list[dict[str, np.ndarray]]:
    """Each session's feeds; a past input's symbolic dims other than batch and length are taken
    from the session that fixes them, else from any past input that does (a builder writes its
    head size as 'kv_cache_dim'; a rewrite that drops a layer's cache leaves only the input's)."""
    fixed: dict[str, list] = {}
    any_fixed: dict[int, int] = {}
    for s in sessions:
        for i in s.get_inputs():
            if "past" in i.name:
                known = fixed.setdefault(i.name, list(i.shape))
                fixed[i.name] = [k if isinstance(k, int) else d for k, d in zip(known, i.shape)]
                for n, d in enumerate(i.shape):
                    if isinstance(d, int):
                        any_fixed.setdefault(n, d)
    for dims in fixed.values():
        dims[1:] = [d if isinstance(d, int) or n == 2 else any_fixed.get(n, d)
                    for n, d in enumerate(dims[1:], 1)]
    out = []
    for s in sessions:
        f: dict[str, np.ndarray] = {}
        for i in s.get_inputs():
            if i.name == "input_ids":
                f[i.name] = np.random.default_rng(0).integers(0, 1000, (1, tokens), dtype=np.int64)
            elif i.name == "attention_mask":
                f[i.name] = np.ones((1, tokens), np.int64)
            elif "past" in i.name:
                dims = fixed[i.name]
                shape = [1, *(d if isinstance(d, int) else 0 for d in dims[1:])]
                if not all(isinstance(d, int) for d in (dims[1], dims[3])):
                    raise SystemExit(f"{i.name}: neither file fixes its heads and head size ({dims})")
                f[i.name] = np.zeros(shape, np.float32)
            else:
                raise SystemExit(f"input {i.name!r}: no feed for it")
        out.append(f)
    return out


def kernel_ms(path: Path, feed: dict, threads: int, runs: int, work: Path,
              spinning: bool) -> collections.Counter:
    """Mean kernel milliseconds per call by op type, from onnxruntime's profiler."""
    s = session(path, threads, str(work / path.stem), spinning)
    for _ in range(runs):
        s.run(None, feed)
    events = json.loads(Path(s.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / runs / 1000
    return by_op


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", type=Path)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=1, help="wall timings, each with fresh sessions")
    ap.add_argument("--spinning", action="store_true",
                    help="idle intra-op threads spin (onnxruntime's default)")
    args = ap.parse_args()
    paths = {"input": args.input, "artifact": args.artifact}
    for round_ in range(args.rounds):
        wall, feed = wall_ms(paths, args)
        print(f"round {round_ + 1}: wall input {wall['input']:.2f} ms, artifact {wall['artifact']:.2f} ms, "
              f"ratio {wall['artifact'] / wall['input']:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        kernels = {k: kernel_ms(p, feed[k], args.threads, args.repeats // 2, Path(tmp), args.spinning)
                   for k, p in paths.items()}
    nodes = {k: collections.Counter(n.op_type for n in onnx.load(p, load_external_data=False).graph.node)
             for k, p in paths.items()}
    a, b = kernels["input"], kernels["artifact"]
    print("| op | input kernel ms | input nodes | artifact kernel ms | artifact nodes |")
    print("|---|---|---|---|---|")
    ops = set(a) | set(b) | set(nodes["input"]) | set(nodes["artifact"])
    for op in sorted(ops, key=lambda o: -(a[o] + b[o])):
        print(f"| {op} | {a[op]:.2f} | {nodes['input'][op]} | {b[op]:.2f} | {nodes['artifact'][op]} |")
    ka, kb = sum(a.values()), sum(b.values())
    na, nb = sum(nodes["input"].values()), sum(nodes["artifact"].values())
    print(f"| **kernels** | {ka:.2f} | {na} | {kb:.2f} | {nb} |")
    print(f"| **wall per call** | {wall['input']:.2f} | | {wall['artifact']:.2f} | |")
    print(f"\nwall ratio {wall['artifact'] / wall['input']:.3f}; kernel ratio {kb / ka:.3f}; outside the "
          f"kernels {wall['input'] - ka:.1f} ms (input) and {wall['artifact'] - kb:.1f} ms (artifact)")


def wall_ms(paths: dict[str, Path], args) -> tuple[dict[str, float], dict[str, dict]]:
    """Median wall milliseconds per call of fresh sessions of each model, timed in turn after 10
    warm-up calls each; and the feeds."""
    sessions = {k: session(p, args.threads, spinning=args.spinning) for k, p in paths.items()}
    feed = dict(zip(paths, feeds(list(sessions.values()), args.tokens)))
    for k, s in sessions.items():
        for _ in range(10):
            s.run(None, feed[k])
    walls: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed[k])
            walls[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in walls.items()}, feed


if __name__ == "__main__":
    main()
