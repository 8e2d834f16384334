"""ONNX → TVM Relax → a CPU shared library, with the weights saved beside it.

    model.so                  the compiled Relax VM executable (`export_library`)
    model.tvm.safetensors     its weights, in the order of `params` in tvm.json
    tvm.json                  inputs, the static shape, target, weights order, TVM version
    tvm-tune.json             with tune_trials: the kernels' MetaSchedule records (tailor.codegen.tvm.tune)

The build is for one static input shape, the plan's workload (batch × prompt length): TVM's ONNX
importer cannot follow the shape arithmetic of exported transformers with symbolic sizes, so the
sizes are fixed first and onnxscript's optimizer folds that arithmetic to constants. Shorter
inputs run padded where padding is exact (see tailor.codegen.tvm.module).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from tailor.codegen.tvm.module import MANIFEST, SO, WEIGHTS, TvmModel
from tailor.core.errors import TailorError, first_line

# TVM must reproduce onnxruntime to this, relative to the output's largest magnitude (fp32 sums
# in another order across a dozen layers: ~3e-6 measured on MiniLM and refllama-16m)
RTOL = 1e-4


def host_target():
    """LLVM for this machine's CPU (its SIMD width and cores)."""
    import tvm
    from tvm.target.codegen import llvm_get_system_cpu

    return tvm.target.Target({"kind": "llvm", "mcpu": llvm_get_system_cpu(),
                              "num-cores": len(os.sched_getaffinity(0))})


def static_onnx(path: Path, batch: int, seq_len: int) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """The model with every input fixed to [batch, seq_len], its shape arithmetic folded, and
    integer initializers turned into Constant nodes (TVM would make them runtime parameters, and
    a Reshape or Expand whose shape is a parameter has no static shape)."""
    import onnxscript.optimizer

    model = ir.load(str(path))
    inputs = []
    for v in model.graph.inputs:
        if v.shape is None or len(v.shape) != 2:
            raise TailorError(f"TVM build: input '{v.name}' is not [batch, sequence]; only token-id "
                              f"style inputs are supported")
        v.shape = ir.Shape([batch, seq_len])
        inputs.append((v.name, v.dtype.numpy().name))
    onnxscript.optimizer.optimize(model)
    proto = ir.serde.serialize_model(model)
    shapes = [i for i in proto.graph.initializer
              if i.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)]
    consts = [onnx.helper.make_node("Constant", [], [i.name], value=i) for i in shapes]
    weights = [i for i in proto.graph.initializer if i not in shapes]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(weights)
    nodes = consts + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto, inputs


def build(onnx_path: Path, out: Path, *, batch: int, seq_len: int, causal: bool,
          vocab_size: int, tune_trials: int = 0, records: Path | None = None,
          progress: bool = False) -> dict:
    """Compile `onnx_path` for inputs of [batch, seq_len] into `out`, check it against
    onnxruntime on sample token ids; returns tvm.json's content. With tune_trials > 0 or an
    earlier build's `records` file, kernels take MetaSchedule's schedules (tailor.codegen.tvm.tune):
    the stored ones reused, the others tuned for tune_trials samples in all."""
    import tvm
    import tvm.s_tir.dlight as dl
    from safetensors.numpy import save_file
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from tailor.codegen.tvm.schedules import hand_rules
    from tailor.codegen.tvm.tune import TUNE_DB, check_trials, read_records, tune, write_records

    logging.getLogger("onnxscript").setLevel(logging.ERROR)  # it logs each value it cannot fold
    target = host_target()
    stored = read_records(records, target)
    tuned = check_trials(tune_trials) > 0 or bool(stored)
    try:
        proto, inputs = static_onnx(onnx_path, batch, seq_len)
        mod = from_onnx(proto, shape_dict={n: [batch, seq_len] for n, _ in inputs},
                        dtype_dict=dict(inputs), keep_params_in_input=True)
        mod, params = relax.frontend.detach_params(mod)
        # weights by position in main's signature; keyed by ONNX initializer name in the file
        names = [f"{i}:{v.name}" for i, v in enumerate(mod["main"].params[len(inputs):])]
        with target, tvm.transform.PassContext(opt_level=3):
            # softmax and exp by TVM's fast approximations (softmax 2.4x faster here; still
            # within RTOL of onnxruntime, which the check below enforces)
            mod = relax.transform.FastMathTransform()(mod)
            mod = relax.get_pipeline("zero")(mod)
            if tuned:
                db, kernels, tuning = tune(mod, target, tune_trials, stored, progress=progress)
                with db:
                    mod = relax.transform.MetaScheduleApplyDatabase()(mod)
            mod = dl.ApplyDefaultSchedule(*hand_rules())(mod)   # kernels without a record
            executable = tvm.compile(mod, target=target)
    except TailorError:  # static_onnx's own, already clear
        raise
    except Exception as e:  # the optimizer, importer and compiler raise many types
        raise TailorError(f"TVM build of {onnx_path.name} failed: {first_line(e)}") from None
    executable.export_library(str(out / SO))
    weights = params.get("main", [])
    # np.array, not ascontiguousarray: that turns the 0-d scalars among the weights into 1-d
    save_file({n: np.array(w.numpy(), order="C") for n, w in zip(names, weights)}, str(out / WEIGHTS))
    manifest = {"shape": [batch, seq_len], "inputs": [list(i) for i in inputs], "params": names,
                "causal": causal, "vocab_size": vocab_size, "target": str(target.export()["mcpu"]),
                "tvm": tvm.__version__}
    if tuned:
        write_records(out / TUNE_DB, kernels, target)
        manifest["tuning"] = tuning
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    diff, tol = _check(onnx_path, out, batch, seq_len, vocab_size)
    manifest.update(max_abs_diff_vs_onnxruntime=diff, tolerance=tol)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check(onnx_path: Path, out: Path, batch: int, seq_len: int, vocab: int) -> tuple[float, float]:
    from tailor.backends.runners import OrtModel
    from tailor.rewriter.capture import example_input_ids

    ort_model = OrtModel(onnx_path)
    ids = example_input_ids(vocab, seq_len, batch=batch, seed=1).numpy()
    expected = ort_model.run_numpy(ids)
    got = TvmModel(out).run_numpy(ids)
    tol = RTOL * max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(expected.astype(np.float64) - got).max())
    if not np.isfinite(got).all() or diff > tol:
        raise TailorError(f"TVM build of {onnx_path.name} does not match onnxruntime: max abs diff "
                          f"{diff:.3g} > {tol:.3g}")
    return diff, tol
