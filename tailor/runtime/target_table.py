"""A cost-model target measured on this machine: `tailor calibrate-target -o cpu.json`.

Vendor peaks overstate what small matrix products reach on a CPU (a 128 × 384 × 384 product runs
far below the peak of a 2048-wide one), so the roofline's compute time is taken from a table of
matrix products timed with onnxruntime, the runtime the CPU artifacts run on: achieved FLOP/s by
the product's FLOPs, interpolated in log space. Memory bandwidth comes from a large elementwise
add. Products of low arithmetic intensity (few tokens against a large weight: below the
machine's measured FLOP/byte balance) stay out of the rates: the roofline's bytes term prices
them, and as FLOP rates they made mid-sized products look 3× slower than they are. The same
products are timed once more with their weights quantized as the int8 pass quantizes them
(tailor.rewriter.onnx_quantize: INT8 weights, activations quantized on the fly, their
quantization timed with the product): the INT8 rates that price that pass's options. The table
is JSON (`--target cpu.json`).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import date

import numpy as np

# (tokens, in features, out features): transformer projection shapes, small to large
MATMUL_SHAPES = [(m, k, n) for m in (16, 128, 512) for k, n in ((256, 256), (384, 1536), (1024, 1024),
                                                               (2048, 2048), (2048, 8192))]
ADD_ELEMENTS = 8 * 1024 * 1024    # 32 MB per fp32 operand: well past the caches


def _graph(op: str, a_shape, b_shape, out_shape, b_value=None) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape)]
    inits = []
    if b_value is not None:  # a weight, as in a model: a constant the runtime can prepack
        inits.append(numpy_helper.from_array(b_value, "b"))
    else:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, b_shape))
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"], name=op)], op, inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=10).SerializeToString()


def _median_seconds(run, min_seconds: float = 0.2, min_repeats: int = 5) -> float:
    run()
    times, start = [], time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_cpu(threads: int | None = None) -> dict:
    """Time matrix products and a memory-bound add with onnxruntime; the target as JSON data."""
    import onnx

    from tailor.backends.runners import cpu_session
    from tailor.rewriter.onnx_quantize import quantize_proto

    threads = threads or len(os.sched_getaffinity(0))
    rng = np.random.default_rng(0)
    add = cpu_session(_graph("Add", [ADD_ELEMENTS], [ADD_ELEMENTS], [ADD_ELEMENTS]), threads)
    a, b = (rng.standard_normal(ADD_ELEMENTS, dtype=np.float32) for _ in range(2))
    bandwidth = 3 * 4 * ADD_ELEMENTS / _median_seconds(lambda: add.run(None, {"a": a, "b": b}))
    timed = []
    for m, k, n in MATMUL_SHAPES:
        graph = _graph("MatMul", [m, k], None, [m, n], rng.standard_normal((k, n), dtype=np.float32))
        session = cpu_session(graph, threads)
        int8 = cpu_session(quantize_proto(onnx.load_from_string(graph), ["MatMul"]).SerializeToString(),
                           threads)
        a = rng.standard_normal((m, k), dtype=np.float32)
        flops = 2.0 * m * k * n
        timed.append((flops, flops / (4.0 * (k * n + m * k + m * n)),
                      flops / _median_seconds(lambda: session.run(None, {"a": a})),
                      flops / _median_seconds(lambda: int8.run(None, {"a": a}))))
    balance = max(rate for _, _, rate, _ in timed) / bandwidth   # FLOPs per byte where the two meet
    rows = sorted([f, r] for f, intensity, r, _ in timed if intensity >= balance)
    # the same products: what the float table's rows are, for the same shapes in INT8
    int8_rows = sorted([f, r] for f, intensity, _, r in timed if intensity >= balance)
    memory_bound = sorted([f, r] for f, intensity, r, _ in timed if intensity < balance)
    return {"name": f"measured-cpu-{platform.machine()}-{threads}t", "kind": "tailor-target", "version": 1,
            "flops_per_s": max(r for _, r in rows), "bytes_per_s": bandwidth,
            "bytes_per_element": 4, "matmul": rows, "memory_bound_matmul": memory_bound,
            "int8_matmul": int8_rows,
            "threads": threads,
            "machine": platform.processor() or platform.machine(), "date": date.today().isoformat(),
            "runtime": "onnxruntime"}
