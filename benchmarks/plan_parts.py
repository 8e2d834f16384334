"""A compiled plan replayed in parts on this CPU: which of its rewrites the cost model mispriced.

One of `onnx_inputs.py`'s input kinds is made and compiled at --budget (as that benchmark does),
then, in one process and timed side by side in onnxruntime (alternating calls, medians): the
input, the whole plan, the plan without its INT8 rewrites, its INT8 rewrites alone, and every
branch INT8 (the cost fit's own int8_all variant). Each beside the cost model's prediction, from
the model fitted for this run (the same fit a compile makes: tailor.stages.cost.cost_model_for).
Shapes only: timing does not depend on the weights, so the parts are built without signals.

    python benchmarks/plan_parts.py --model minilm --kind optimum [--budget 0.5] [--repeats 30]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import tailor
from benchmarks.onnx_inputs import base_models, make_kind
from tailor.backends import backend_for
from tailor.backends.runners import OrtModel
from tailor.passes.cost import Workload
from tailor.passes.registry import PASSES, apply_options, options_from_plan, takes
from tailor.passes.search import structure_of
from tailor.rewriter.capture import capture
from tailor.runtime.target_table import measure_cpu
from tailor.stages.cost import cost_model_for, time_on_workload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("minilm", "refllama"), default="minilm")
    ap.add_argument("--kind", default="optimum")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    (model,) = base_models([args.model])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        target = work / "target.json"
        target.write_text(json.dumps(measure_cpu(args.threads)))
        path, _ = make_kind(model, args.kind, work)
        opt = tailor.compile(path, args.budget, objective="latency", target=str(target),
                             prompt_len=model.prompt_len, calib=model.calib, calib_len=model.calib_len,
                             progress=True, formats=("onnx",))
        cap = capture(path)
        dense = backend_for(cap)
        cost_model = cost_model_for(cap, dense, Workload(**opt.plan.workload), str(target))
        chosen = options_from_plan(cap.graph, opt.plan.rewrites, "plan", dense)
        int8_all = [o for o in PASSES["int8"].candidates(cap.graph, None) if takes(dense, o)]
        parts = {"plan": chosen,
                 "plan without INT8": [o for o in chosen if o.pass_name != "int8"],
                 "the plan's INT8 alone": [o for o in chosen if o.pass_name == "int8"],
                 "every branch INT8": int8_all}
        runnables = {"input": OrtModel(path, args.threads)}
        for name, options in parts.items():
            if options:
                runnables[name] = apply_options(dense.clone(), options, None).runnable()
        times = time_on_workload(runnables, cap.graph, cost_model.workload, repeats=args.repeats,
                                 progress="timing the plan's parts")
        scales = {k: round(v, 3) for k, v in cost_model.scales.items()}
        print(f"\n{model.name} {args.kind}, budget {args.budget:g}; fitted scales {scales}, "
              f"baseline {cost_model.baseline:.3f}\n")
        print("| part | rewrites | measured vs input | predicted |")
        print("|---|---|---|---|")
        for name, options in parts.items():
            if name in runnables:
                predicted = cost_model.ratio(structure_of(cap.graph, options), "latency")
                print(f"| {name} | {len(options)} | {times[name] / times['input']:.3f} | {predicted:.3f} |")


if __name__ == "__main__":
    main()
