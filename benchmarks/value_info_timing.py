"""Does onnxruntime run a graph slower with its intermediate values' shapes (value_info) written
in? Each model: the input file, the dense model as tailor serializes it (with the shapes its
inference adds, as value_info), and the same without them, two onnxruntime sessions of each,
timed side by side (2 threads, alternating calls, medians), against the mean of the input's two.

    python benchmarks/value_info_timing.py [--repeats 30]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from benchmarks.onnx_inputs import base_models, make_kind
from tailor.backends import backend_for
from tailor.backends.runners import OrtModel
from tailor.passes.cost import Workload
from tailor.rewriter.capture import capture
from tailor.stages.cost import time_on_workload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    models = base_models(["minilm", "refllama"])
    print("| model | export | value_info in the input / as tailor wrote it | tailor's graph with value_info "
          "/ input | without / input |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for kind in ("dynamo", "optimum"):
                work = Path(tmp) / kind
                path, base = make_kind(model, "optimum" if kind == "optimum" else "int8_dynamic", work)
                path = path if kind == "optimum" else base
                dense = backend_for(capture(path))
                with_shapes = ir.serde.serialize_model(dense.model)
                onnx.save(with_shapes, str(work / f"{model.name}_with.onnx"))
                without = ir.serde.serialize_model(dense.model)
                del without.graph.value_info[:]
                onnx.save(without, str(work / f"{model.name}_without.onnx"))
                given = len(onnx.load(str(path), load_external_data=False).graph.value_info)
                # two sessions of each file: a session's own speed can differ from another's of
                # the same file, which one session each would take for the file's
                files = {"input": path, "with": work / f"{model.name}_with.onnx",
                         "without": work / f"{model.name}_without.onnx"}
                sessions = {f"{name} {k}": OrtModel(f, 2) for name, f in files.items() for k in (1, 2)}
                t = time_on_workload(sessions, dense.graph, Workload(1, model.prompt_len, 0),
                                     repeats=args.repeats)
                base = (t["input 1"] + t["input 2"]) / 2
                with_, without = (", ".join(f"{t[f'{name} {k}'] / base:.3f}" for k in (1, 2))
                                  for name in ("with", "without"))
                print(f"| {model.name} | {kind} | {given} / {len(with_shapes.graph.value_info)} | {with_} "
                      f"| {without} |", flush=True)


if __name__ == "__main__":
    main()
