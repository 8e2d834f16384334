"""The int8 pass on ONNX models: a branch's projections on INT8 weights (onnxruntime's quantize_dynamic),
priced from a target table's measured INT8 rates, combined with pruning of the same branch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tailor
from tailor.backends import backend_for
from tailor.backends.runners import OrtModel
from tailor.core.errors import TailorError
from tailor.core.targets import Target, get_target
from tailor.passes.base import Option
from tailor.passes.cost import CostModel, Structure, Workload
from tailor.passes.profile import neutral_signals
from tailor.passes.registry import PASSES, apply_options, candidates_for, options_from_plan, takes
from tailor.passes.search import pair_costs, price, search, smallest_ratio, solve, structure_of
from tailor.rewriter.capture import capture
from tests.conftest import ids_for

# a CPU whose INT8 products run 3× its float ones, and bandwidth enough that products are compute-bound
FLOAT_RATE, INT8_RATE = 1e10, 3e10
TABLE = {"kind": "tailor-target", "version": 1, "name": "int8-cpu", "bytes_per_element": 4,
         "flops_per_s": FLOAT_RATE, "bytes_per_s": 1e15, "matmul": [[1e3, FLOAT_RATE], [1e12, FLOAT_RATE]],
         "int8_matmul": [[1e3, INT8_RATE], [1e12, INT8_RATE]]}


@pytest.fixture(scope="module")
def llama(tiny_onnx):
    cap = capture(tiny_onnx["llama"])
    return cap, backend_for(cap)


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "int8-cpu.json"
    path.write_text(json.dumps(TABLE))
    return str(path)


def _option(graph, layer: int, branch: str) -> Option:
    return PASSES["int8"].from_plan(graph, layer, {"branch": branch})


def test_quantized_branches_stay_close_to_float_in_onnxruntime(llama):
    """Every branch INT8: MatMulInteger nodes in the graph that runs, outputs within INT8's error of
    the float model's, and the float weights kept for edits (the model itself is not quantized)."""
    cap, dense = llama
    variant = apply_options(dense.clone(), PASSES["int8"].candidates(cap.graph, None), None)
    ops = [n.op_type for n in variant.deployed().graph]
    assert ops.count("MatMulInteger") == sum(len(b.attn.projections) + len(b.ffn.projections)
                                             for b in cap.graph.blocks) + 1  # and the LM head
    assert "MatMulInteger" not in [n.op_type for n in variant.model.graph]
    ids = ids_for(cap.graph.vocab_size, batch=2, seq=16)
    ref, out = dense.runnable()(ids).double(), variant.runnable()(ids).double()
    error = float((out - ref).norm() / ref.norm())
    assert 0 < error < 0.05  # quantized (not identical), yet close: per-channel 8-bit weights
    one = apply_options(dense.clone(), [_option(cap.graph, 0, "ffn")], None)
    quantized = [n.op_type for n in one.deployed().graph].count("MatMulInteger")
    assert quantized == len(cap.graph.blocks[0].ffn.projections)


def test_int8_option_cost_comes_from_the_tables_int8_rate(llama, table):
    """A compute-bound branch in INT8 costs its float time × float rate / INT8 rate."""
    cap, _ = llama
    cm = CostModel(cap.graph, Workload(1, 64, 0), get_target(table))
    dense = Structure.dense(cap.graph)
    shape = dense.copy().layers[0]
    shape.int8 = ("ffn",)
    float_ffn, int8_ffn = cm.ffn(0, dense.layers[0]), cm.ffn(0, shape)
    assert int8_ffn.latency == pytest.approx(float_ffn.latency * FLOAT_RATE / INT8_RATE)
    option = _option(cap.graph, 0, "ffn")
    price([option], cm)
    assert option.cost["latency"] == pytest.approx(int8_ffn.latency - float_ffn.latency)
    assert option.cost["flops"] == 0.0  # the same products, only faster
    with pytest.raises(ValueError, match="no INT8 figure"):
        CostModel(cap.graph, Workload(1, 64, 0), get_target("cpu")).ffn(0, shape)


def test_lm_head_int8_is_an_option_after_the_last_block(llama, table):
    """The head's option names the layer after the last block: priced at the INT8 rate over the
    head's products, named by a plan there and only there, and applied alone it quantizes the
    head's one product."""
    cap, dense = llama
    graph, n = cap.graph, cap.graph.num_layers
    head = [o for o in PASSES["int8"].candidates(graph, None) if o.layer == n]
    assert [o.choice for o in head] == [{"branch": "lm_head"}]
    cm = CostModel(graph, Workload(1, 64, 0), get_target(table))
    price(head, cm)
    whole = cm.head(Structure.dense(graph).head).latency
    assert head[0].cost["latency"] == pytest.approx(whole * (FLOAT_RATE / INT8_RATE - 1))
    assert cm.ratio(structure_of(graph, head), "latency") < 1
    assert options_from_plan(graph, [{"pass": "int8", "layer": n, "choice": {"branch": "lm_head"}}])
    with pytest.raises(TailorError, match="after the last block"):
        options_from_plan(graph, [{"pass": "int8", "layer": 0, "choice": {"branch": "lm_head"}}])
    with pytest.raises(TailorError, match=f"layers 0..{n - 1}; is the plan"):  # no head for ffn_prune
        options_from_plan(graph, [{"pass": "ffn_prune", "layer": n, "choice": {"channels": [0]}}])
    variant = apply_options(dense.clone(), head, None)
    assert [n.op_type for n in variant.deployed().graph].count("MatMulInteger") == 1
    ids = ids_for(graph.vocab_size, batch=2, seq=16)
    ref, out = dense.runnable()(ids).double(), variant.runnable()(ids).double()
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.05


def test_a_tied_lm_head_runs_int8_on_a_transposed_copy(tmp_path):
    """An exported head tied to the embedding reads the table through a Transpose: it is offered
    INT8 all the same, and the quantized model gives the head an INT8 copy of its own while the
    embedding lookup stays float."""
    import onnx

    from tailor.backends.export import export_onnx
    from tailor.passes.registry import offered
    from tests.conftest import build_model

    model = build_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    export_onnx(model, tmp_path / "tied.onnx", encoder=False)
    # the exporter folds a small table's Transpose into a copy (refllama-16m's 8192 × 384 keeps it):
    # read the table through a Transpose again, as a large tied model's export does
    proto = onnx.load(str(tmp_path / "tied.onnx"))
    table = next(n for n in proto.graph.node if n.op_type == "Gather").input[0]
    head = [n for n in proto.graph.node if n.op_type == "MatMul"][-1]
    at = list(proto.graph.node).index(head)
    proto.graph.node.insert(at, onnx.helper.make_node("Transpose", [table], ["table_t"], perm=[1, 0]))
    head.input[1] = "table_t"
    onnx.save(onnx.shape_inference.infer_shapes(proto), str(tmp_path / "model.onnx"))
    cap = capture(tmp_path / "model.onnx")
    dense = backend_for(cap)
    head_node = {n.name: n for n in dense.model.graph}[cap.graph.lm_head.node]
    assert head_node.inputs[1].producer().op_type == "Transpose"   # the tied form this test is about
    head = [o for o in offered(dense, None, ["int8"]) if o.choice["branch"] == "lm_head"]
    assert len(head) == 1
    variant = apply_options(dense.clone(), head, None)
    ops = [n.op_type for n in variant.deployed().graph]
    assert ops.count("MatMulInteger") == 1 and "Gather" in ops
    ids = ids_for(cap.graph.vocab_size, batch=2, seq=16)
    ref, out = dense.runnable()(ids).double(), variant.runnable()(ids).double()
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.05
    assert [n.op_type for n in dense.model.graph].count("Transpose") >= 1   # the float model untouched


def test_int8_and_pruning_of_one_ffn_combine_and_are_priced_jointly(llama, table):
    """INT8 claims a part of its own: it combines with pruning the same FFN, and the pair's joint
    saving (less than the two savings added) is what the search counts."""
    cap, _ = llama
    cm = CostModel(cap.graph, Workload(1, 64, 0), get_target(table))
    graph = cap.graph
    width = graph.blocks[0].ffn.width
    prune = PASSES["ffn_prune"].from_plan(graph, 0, {"channels": list(range(width // 2))})
    int8 = _option(graph, 0, "ffn")
    options_from_plan(graph, [{"pass": o.pass_name, "layer": 0, "choice": o.choice} for o in (prune, int8)])
    price([prune, int8], cm)
    pairs = pair_costs([prune, int8], cm)
    joint = cm.total(structure_of(graph, [prune, int8])).latency - cm.total(Structure.dense(graph)).latency
    assert pairs[(int8.key, prune.key)]["latency"] == pytest.approx(
        joint - prune.cost["latency"] - int8.cost["latency"])
    assert pairs[(int8.key, prune.key)]["latency"] > 0  # the sum would overstate the saving
    dense_cost = cm.total(Structure.dense(graph)).latency
    reach = smallest_ratio([prune, int8], "latency", dense_cost, pairs=pairs)
    assert reach == pytest.approx(cm.ratio(structure_of(graph, [prune, int8]), "latency"))
    # a budget the two reach only if their savings added up: the solver must not take both
    added = 1 + (prune.cost["latency"] + int8.cost["latency"]) / dense_cost
    limit = (added + reach) / 2 - 1
    assert solve([prune, int8], np.zeros(2), "latency", limit, dense_cost, pairs=pairs) is None
    assert len(solve([prune, int8], np.zeros(2), "latency", limit, dense_cost)) == 2  # unpaired: wrong


def test_search_with_int8_stays_within_budget(llama, table):
    cap, _ = llama
    cm = CostModel(cap.graph, Workload(1, 64, 0), get_target(table))
    options = candidates_for(cap.graph, neutral_signals(cap.graph), ["ffn_prune", "head_prune", "int8"])
    price(options, cm)
    rng = np.random.default_rng(0)
    for o in options:
        o.loss = float(rng.random()) * (0.1 if o.pass_name == "int8" else 1.0)
    for budget in (0.8, 0.5, 0.35):
        chosen = search(options, cm, budget, "latency", measure=None).chosen
        assert cm.ratio(structure_of(cap.graph, chosen), "latency") <= budget + 1e-6
        assert any(o.pass_name == "int8" for o in chosen)
    # at the tightest budget some FFN is both pruned and INT8
    int8_ffns = {o.layer for o in chosen if o.pass_name == "int8" and o.choice["branch"] == "ffn"}
    assert int8_ffns & {o.layer for o in chosen if o.pass_name == "ffn_prune"}


def test_compile_with_int8_and_pruning_runs_in_onnxruntime(tiny_onnx, table, tmp_path, monkeypatch):
    """A measured CPU table with an INT8 figure: INT8 is on by default, a plan mixing it with
    pruning is found within budget, validated and saved, and the artifact runs quantized."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    # priced by the table alone, no fit: timing this tiny model's variants is noise (under load
    # the fitted prices once left no pruning in the plan), and its INT8 products may run slower
    # quantized than in float (then no plan has INT8, rightly)
    from tailor.stages import cost

    monkeypatch.setattr(cost, "fit_variants", lambda graph, workload, int8=False: {})
    path = tiny_onnx["llama"]
    compiled = tailor.compile(path, 0.45, target=table, prompt_len=64, calib_windows=4, calib_len=32,
                              refit=False)
    passes = {r["pass"] for r in compiled.plan.rewrites}
    assert "int8" in passes and passes & {"ffn_prune", "head_prune"}, compiled.plan.rewrites
    assert compiled.plan.predicted["latency"] <= 0.45 + 1e-6
    out = compiled.save(tmp_path / "artifact")
    saved = OrtModel(out / "model.onnx")
    import onnx
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    ids = ids_for(compiled.graph.vocab_size, batch=1, seq=64)
    assert torch.equal(saved(ids), compiled.model(ids))
    assert torch.isfinite(tailor.load(out).model(ids)).all()
    # left out with passes; and on a target without an INT8 figure, asking for it is one clear error
    without = tailor.compile(path, 0.6, target=table, prompt_len=64, calib_windows=4, calib_len=32,
                             refit=False, passes=["ffn_prune", "head_prune"])
    assert "int8" not in {r["pass"] for r in without.plan.rewrites}
    with pytest.raises(TailorError, match="no measured INT8 figure"):
        tailor.compile(path, 0.6, target="cpu", prompt_len=64, passes=["int8", "ffn_prune"])


def test_int8_not_offered_where_it_cannot_run(llama, table):
    """A plan naming a branch INT8 does not have is refused; a built-in target (no INT8 figure)
    leaves the pass out by default, saying why, as does a TVM build."""
    cap, dense = llama
    with pytest.raises(TailorError, match="branch must be one of"):
        options_from_plan(cap.graph, [{"pass": "int8", "layer": 0, "choice": {"branch": "norm"}}])
    from tailor.passes.int8 import int8_refusal

    workload = Workload(1, 64, 0)
    assert int8_refusal(dense, CostModel(cap.graph, workload, get_target(table))) is None
    assert "calibrate-target" in int8_refusal(dense, CostModel(cap.graph, workload, get_target("h100")))
    assert "TVM" in int8_refusal(dense, CostModel(cap.graph, workload, get_target(table)), ("onnx", "tvm"))
    assert not Target("x", 1e9, 1e9, 4).int8_rates


def test_int8_not_offered_on_a_float16_graph(tiny_onnx, table, tmp_path):
    """onnxruntime's DynamicQuantizeLinear quantizes float32 activations only: an fp16 graph (its
    I/O kept float32) is not offered INT8, rather than failing to load once rewritten."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from tailor.passes.int8 import int8_refusal

    path = tmp_path / "fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(tiny_onnx["llama"])), keep_io_types=True), str(path))
    cap = capture(path)
    dense = backend_for(cap)
    refusal = int8_refusal(dense, CostModel(cap.graph, Workload(1, 64, 0), get_target(table)))
    assert refusal is not None and "float32 activations" in refusal and "float16" in refusal
    assert not [o for o in PASSES["int8"].candidates(cap.graph, None) if takes(dense, o)]


def test_fit_prices_int8_products_as_the_model_ran_them(llama, table):
    """Where the target prices INT8, the fit times a variant with every branch INT8 and scales the
    INT8 products to it, below 1 as well (the table's products were timed alone); a plan mixing
    INT8 and pruning is then priced as the model the ratios came from prices it."""
    from tailor.stages.cost import fit_variants

    cap, _ = llama
    graph, workload = cap.graph, Workload(1, 64, 0)
    assert "int8_all" not in fit_variants(graph, workload)
    variants = {n: structure_of(graph, o) for n, o in fit_variants(graph, workload, int8=True).items()}
    assert all(s.int8 == ("attn", "ffn") for s in variants["int8_all"].layers)
    assert variants["int8_all"].head.int8 == ("lm_head",)
    truth = CostModel(graph, workload, get_target(table))
    truth.scales |= {"branch_passes": 3.0, "attention_core": 1.5, "int8_products": 0.6}
    fitted = CostModel(graph, workload, get_target(table))
    scales = fitted.fit_to_measured({n: (s, truth.ratio(s, "latency")) for n, s in variants.items()})
    assert scales["int8_products"] == pytest.approx(0.6, rel=1e-3)
    width = graph.blocks[0].ffn.width
    plan = [_option(graph, 0, "ffn"), _option(graph, 1, "attn"),
            PASSES["ffn_prune"].from_plan(graph, 0, {"channels": list(range(width // 2))})]
    assert fitted.ratio(structure_of(graph, plan), "latency") == pytest.approx(
        truth.ratio(structure_of(graph, plan), "latency"), rel=1e-4)
