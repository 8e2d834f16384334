"""MetaSchedule tuning of a TVM build's kernels, its records kept in the artifact and reused.

TVM 0.27.0.post1 with the tvm-ffi it installs (0.1.15.post2) segfaults in ffi::ToJSONGraph on any
IR node that holds a DataType (IntImm, tirx.Var, PrimType): `tvm.ir.save_json(IntImm(...))`
crashes. MetaSchedule serializes modules through it in its JSON database, in the mutators of its
evolutionary search, in the module copies of the evolutionary and replay-trace strategies and when
its process-pool builder pickles a module, so `relax.pipeline.static_shape_tuning_pipeline` dies
at its first task. What runs: random samples of each kernel's design space (strategy
"replay-func", no mutators), built in this process, timed by the pool runner (it is sent file
paths only), records in memory, written to the artifact by this module as JSON traces keyed by
each kernel's structural hash.

Every sampled kernel is seeded with its hand schedule (tailor.codegen.tvm.schedules), timed by
the same runner, and a sample replaces it only if it is faster again when the two are re-timed in
turn. Records do not know the hand rules they beat: after a change to those rules, tune afresh
(delete tvm-tune.json).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

from tailor.core.errors import TailorError

# the records of a tuned build, beside tvm.json
TUNE_DB = "tvm-tune.json"
# a sample that beat the hand schedule is timed against it again this many times, alternating:
# the two were first timed minutes apart, and on a shared CPU the load moves in between
REMATCH_ROUNDS = 3
# kernels below this share of the model's FLOPs keep their hand schedule untuned: random samples
# are few, and spread over every gather and copy they would leave the products a trial or two each
MIN_FLOP_SHARE = 0.01


def check_trials(trials) -> int:
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise TailorError(f"tune trials must be a whole number ≥ 0 (0: no tuning); got {trials!r}")
    return trials


def read_records(path: Path | None, target) -> dict:
    """The kernels of an earlier tuning, {structural hash: entry}; empty where there is none, or
    where it was tuned by another TVM or for another CPU (its timings do not hold here)."""
    import tvm

    if path is None or not path.is_file():
        return {}
    try:
        stored = json.loads(path.read_text())
        same = stored["tvm"] == tvm.__version__ and stored["target"] == str(target.export()["mcpu"])
        return dict(stored["kernels"]) if same else {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TailorError(f"{path}: unreadable tuning records ({e})") from None


def tune(mod, target, trials: int, stored: dict, *, progress: bool = False):
    """Schedules for `mod`'s heavy kernels (after the zero pipeline): the stored ones where a
    kernel's hash matches, the others tuned for `trials` samples in all from their hand schedule.
    Returns (database of the schedules that beat the hand ones, kernels to store, summary)."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    tasks = {f"{tvm_ffi.structural_hash(t.dispatched[0]):x}": t
             for t in ms.relax_integration.extract_tasks(mod, target)}
    kernels = {key: stored[key] for key in tasks if key in stored}
    fresh = [(key, tasks[key]) for key in _heavy(tasks) if key not in stored]
    start = time.perf_counter()
    if trials and fresh:
        kernels |= _tune_fresh(fresh, target, trials, progress)
    summary = {"trials": trials if trials and fresh else 0, "kernels_tuned": len(fresh) if trials else 0,
               "kernels_reused": len(kernels) - (len(fresh) if trials else 0),
               "seconds": round(time.perf_counter() - start, 1)}
    return _database(tasks, kernels), kernels, summary


def _tune_fresh(fresh, target, trials, progress) -> dict:
    """Each kernel's hand schedule timed, then the random samples; an entry per kernel with the
    winner's record, or none where the hand schedule won (its trace cannot be written: the
    layout maps of dlight's normalization go through the crashing ToJSONGraph)."""
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.MemoryDatabase()
    builder, runner = InProcessBuilder(), ms.runner.LocalRunner()
    hand = {}
    for key, task in fresh:
        hand[key] = _seed_hand_schedule(db, db.commit_workload(task.dispatched[0]), target, builder, runner)
    _search(db, [t for _, t in fresh], target, trials, builder, runner, progress)
    kernels = {}
    for key, task in fresh:
        best = db.get_top_k(db.commit_workload(task.dispatched[0]), 1)
        ms_best = float(best[0].run_secs[0]) if best else None
        ms_hand = hand[key][0] if hand[key] else None
        won = best and (hand[key] is None or not best[0].trace.same_as(hand[key][1]))
        if won and hand[key] is not None:
            ms_hand, ms_best = _rematch(hand[key][2], _scheduled(task, best[0].trace), task, target, builder,
                                        runner)
            won = ms_best < ms_hand
        kernels[key] = {"task": task.task_name, "record": _plain(best[0].as_json()) if won else None,
                        "ms": ms_best * 1e3 if won else ms_hand and ms_hand * 1e3,
                        "hand_ms": ms_hand and ms_hand * 1e3}
    return kernels


def _scheduled(task, trace):
    from tvm import s_tir

    sch = s_tir.Schedule(task.dispatched[0])
    trace.apply_to_schedule(sch, remove_postproc=False)
    return sch.mod


def _rematch(hand_mod, sample_mod, task, target, builder, runner) -> tuple[float, float]:
    """Median seconds of the hand schedule and of a sample, timed in turn."""
    func = task.dispatched[0]["main"]
    times = [[], []]
    for _ in range(REMATCH_ROUNDS):
        for i, mod in enumerate((hand_mod, sample_mod)):
            times[i].append(_time(mod, func, target, builder, runner) or math.inf)
    return statistics.median(times[0]), statistics.median(times[1])


def _database(tasks: dict, kernels: dict):
    """The records that beat the hand schedules, read back from their JSON (so a fresh build
    applies exactly what a reused one will)."""
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.MemoryDatabase()
    for key, entry in kernels.items():
        if entry["record"] is not None:
            workload = db.commit_workload(tasks[key].dispatched[0])
            db.commit_tuning_record(ms.database.TuningRecord.from_json(entry["record"], workload))
    return db


def _heavy(tasks: dict) -> list[str]:
    """The kernels worth samples: at least MIN_FLOP_SHARE of the model's FLOPs (count × each)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    flops = {key: t.weight * estimate_tir_flops(t.dispatched[0]) for key, t in tasks.items()}
    return [key for key, f in flops.items() if f >= MIN_FLOP_SHARE * sum(flops.values())]


def write_records(path: Path, kernels: dict, target) -> None:
    import tvm

    path.write_text(json.dumps({"tvm": tvm.__version__, "target": str(target.export()["mcpu"]),
                                "kernels": kernels}, indent=1) + "\n")


def _seed_hand_schedule(db, workload, target, builder, runner):
    """The first rule of tailor's that schedules the kernel, timed, as a record of the database;
    returns (seconds, its trace, the scheduled module), or None where no rule applies or it does not build."""
    from tvm.s_tir import meta_schedule as ms

    from tailor.codegen.tvm.schedules import hand_rules

    func = workload.mod["main"]
    for rule in hand_rules():
        sch = rule.apply(func, target, False)
        if isinstance(sch, list):
            sch = sch[0] if sch else None
        if sch is None:
            continue
        secs = _time(sch.mod, func, target, builder, runner)
        if secs is not None:
            db.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, workload, [secs], target, ms.arg_info.ArgInfo.from_prim_func(func)))
            return secs, sch.trace, sch.mod
        return None
    return None


def _time(mod, func, target, builder, runner) -> float | None:
    from tvm.s_tir import meta_schedule as ms

    built = builder.build([ms.builder.BuilderInput(mod, target)])[0]
    if built.error_msg:
        return None
    result = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu",
                                               ms.arg_info.ArgInfo.from_prim_func(func))])[0].result()
    Path(built.artifact_path).unlink(missing_ok=True)
    return None if result.error_msg else float(sum(map(float, result.run_secs)) / len(result.run_secs))


def _search(db, tasks, target, trials, builder, runner, progress) -> None:
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

    per_task = max(1, math.ceil(trials / len(tasks)))
    # MetaSchedule logs each round's table at INFO to the console
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as work_dir:
        contexts, weights = extracted_tasks_to_tune_contexts(
            tasks, work_dir, space=ms.space_generator.PostOrderApply(mutator_probs={}),
            strategy="replay-func")
        bar = _progress_bar(trials, progress)
        try:
            ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir,
                               max_trials_global=trials, max_trials_per_task=per_task,
                               num_trials_per_iter=min(16, per_task), builder=builder, runner=runner,
                               database=db, cost_model="random",
                               measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                                  ProgressCallback(bar)])
        finally:
            bar.close()


def _progress_bar(total: int, shown: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="TVM tuning", unit="trial", disable=not shown)


def _plain(obj):
    """An FFI JSON object (arrays, maps, strings, numbers) as plain Python, for json.dumps."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    return [_plain(v) for v in obj]


@functools.cache
def _classes():
    """InProcessBuilder and ProgressCallback, defined on first use: TVM's derived_object needs TVM
    imported, and tailor imports TVM only when it builds."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _InProcessBuilder(PyBuilder):
        """LocalBuilder's build and export, in this process (its pool pickles the module: see
        the module docstring)."""

        def build(self, build_inputs):
            results = []
            for b in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(b.mod, b.target, None)), None))
                except Exception as e:  # a sampled schedule that does not compile: a failed trial
                    results.append(BuilderResult(None, str(e)))
            return results

    @derived_object
    class _ProgressCallback(PyMeasureCallback):
        def __init__(self, bar):
            self.bar = bar

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            # the last round may run past the total
            self.bar.update(min(len(runner_results), self.bar.total - self.bar.n))

    return _InProcessBuilder, _ProgressCallback


def InProcessBuilder():
    return _classes()[0]()


def ProgressCallback(bar):
    return _classes()[1](bar)
