"""Does the fitted cost model predict structures it was not fitted on? refllama-16m exported to
ONNX, 1 × 512 tokens, on this CPU: the target measured first (as `tailor calibrate-target`
does), the cost model fitted as compile fits it (tailor.stages.cost.cost_model_for: the dense model beside
its four fit variants), then each held-out structure below built shape-only (weights left as
sliced: timing does not depend on them), timed side by side with the dense model and compared
with the model's prediction.

    python benchmarks/cost_fit_check.py [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cpu_onnx import refllama_onnx

from tailor.backends import backend_for
from tailor.backends.runners import OrtModel
from tailor.core.patterns import Pattern
from tailor.passes.attn_pattern import default_grid
from tailor.passes.cost import Workload
from tailor.passes.registry import PASSES, apply_options
from tailor.passes.search import structure_of
from tailor.rewriter.capture import capture
from tailor.runtime.target_table import measure_cpu
from tailor.stages.cost import cost_model_for, time_on_workload


def held_out(graph) -> dict[str, list]:
    """Structures none of the fit's variants is: skips, dropped attentions, other widths and
    patterns, and a plan mixing them."""
    layers = range(graph.num_layers)
    a = graph.blocks[0].attn
    kv, q_per = a.num_kv_heads, a.num_heads // a.num_kv_heads
    grid = default_grid(512)
    sink = grid[0].sink

    def patterns(at, p):
        return [PASSES["attn_pattern"].from_plan(graph, i, {"spans": [p.to_json()] * kv}) for i in at]

    def heads(at, kept_kv):
        return [PASSES["head_prune"].from_plan(graph, i, {"kv_heads": list(range(kept_kv)),
                                                          "queries": [list(range(q_per))] * kept_kv})
                for i in at]

    def ffn(at, fraction):
        widths = {i: int(graph.blocks[i].ffn.width * fraction) for i in at}
        return [PASSES["ffn_prune"].from_plan(graph, i, {"channels": list(range(w))})
                for i, w in widths.items()]

    last = graph.num_layers - 2
    return {
        "skip layers 2, 5": [PASSES["layer_skip"].from_plan(graph, i, {}) for i in (2, 5)],
        f"skip FFNs 2, 4, {last}": [PASSES["ffn_skip"].from_plan(graph, i, {}) for i in (2, 4, last)],
        "half the KV heads everywhere": heads(layers, kv // 2),
        "attention dropped in layers 2, 4": heads([2, 4], 0),
        "FFNs at a quarter width": ffn(layers, 0.25),
        f"every head sink {sink} + window {2 * sink} + N/8": patterns(layers, Pattern(sink, 2 * sink, 0.125)),
        "patterns on every other layer": patterns(range(0, graph.num_layers, 2), grid[0]),
        "a mixed plan": ([PASSES["layer_skip"].from_plan(graph, last, {})] + patterns([1, 3, 5], grid[0])
                         + heads([2, 4], kv // 2) + ffn([i for i in layers if i != last], 0.75)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        table = Path(work) / "target.json"
        table.write_text(json.dumps(measure_cpu(args.threads)))
        cap = capture(refllama_onnx())
        workload = Workload(1, 512, 0)
        cm = cost_model_for(cap, backend_for(cap), workload, str(table), use_cache=False)
    fitted = cm.to_json()
    print("fitted scales:", {k: round(v, 2) for k, v in fitted["scales"].items()},
          "from", {k: round(v, 3) for k, v in fitted["measured_ratios"].items()})
    original = OrtModel(cap.source.path, args.threads)
    print("\n| structure | predicted latency | measured latency | off by |\n|---|---|---|---|")
    for name, options in held_out(cap.graph).items():
        variant = apply_options(backend_for(cap).clone(), options, None).runnable()
        t = time_on_workload({"original": original, "variant": variant}, cap.graph, workload, repeats=30)
        predicted = cm.ratio(structure_of(cap.graph, options), "latency")
        measured = t["variant"] / t["original"]
        print(f"| {name} | {predicted:.3f} | {measured:.3f} | {abs(predicted / measured - 1):.1%} |",
              flush=True)


if __name__ == "__main__":
    main()
