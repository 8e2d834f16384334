"""CPU schedule rules for TVM's dlight, for what its own CPU rules (GEMV, Reduction) leave alone.

Without a schedule, Relax lowers every operator to scalar loop nests: MiniLM at 1 × 128 tokens ran
~100× slower than onnxruntime here. TVM ships no CPU rule for matrix products and MetaSchedule
tuning takes minutes per model, so these two rules give every matmul-shaped and elementwise
PrimFunc a plain CPU schedule: tiles whose inner loop is a row of SIMD lanes, the outer loops in
parallel over the cores.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target.codegen import llvm_get_vector_width

# output rows per tile: each loaded weight vector is used this many times. 8 × 2 SIMD rows is 16
# accumulators of AVX-512's 32 registers; against 4, MiniLM's products at 1 × 128 took 14.5 ms
# instead of 17.6 (6 and 12 rows do not divide 128; 16 × 2 and 8 × 4 spill, 22-24 ms)
ROWS = 8


def _lanes(target) -> int:
    """fp32 values per SIMD register on the target (8 for AVX2, 16 for AVX-512)."""
    bits = llvm_get_vector_width(target)
    return max(bits // 32, 4) if bits > 0 else 8


def _split(sch: s_tir.Schedule, loop, want: int):
    """Split off an inner loop of `want` iterations, halved until it divides the extent (so the
    tile needs no bounds checks)."""
    n, f = get_extent(sch, loop), want
    while isinstance(n, int) and n % f and f > 1:
        f //= 2
    return sch.split(loop, [None, f])


def _parallel_vectorized(sch: s_tir.Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    outer, inner = _split(sch, sch.fuse(*loops) if len(loops) > 1 else loops[0], lanes)
    sch.parallel(outer)
    sch.vectorize(inner)


def _inline_all(sch: s_tir.Schedule, infos) -> bool:
    try:
        for b in infos:
            sch.compute_inline(b.block_rv)
    except s_tir.ScheduleError:
        return False
    return True


class Matmul(CPUScheduleRule):
    """out[..., i, j] = Σ_k a[..., i, k] · b[..., k, j] with elementwise work before (inlined)
    and after (its own parallel vectorized loop): tiles of ROWS × 2 SIMD rows, k inside the
    tile loop, tiles in parallel, column panels outermost."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        reductions = [b for b in infos or [] if not b.is_injective()]
        if len(reductions) != 1:
            return None
        mm = reductions[0]
        kinds, at = mm.dom_kind(), infos.index(mm)
        if len(kinds) < 3 or kinds.count("R") != 1 or not kinds.endswith("R"):
            return None
        if not _inline_all(sch, infos[:at]):
            return None
        lanes = _lanes(target)
        *outer, i, j, k = sch.get_loops(mm.block_rv)
        io, ii = _split(sch, i, ROWS)
        jo, ji = _split(sch, j, 2 * lanes)
        # column panels outermost: a panel of the weight (k × 2 SIMD rows) stays in cache while
        # every row tile passes over it (rows outermost streamed the whole weight once per row
        # tile: MiniLM's 384 → 1536 FFN product ran at 160 GFLOP/s)
        sch.reorder(*outer, jo, io, k, ii, ji)
        sch.parallel(sch.fuse(*outer, jo, io))
        sch.vectorize(ji)   # before decompose_reduction: after it the update has no init
        sch.unroll(ii)
        init = sch.decompose_reduction(mm.block_rv, k)
        sch.vectorize(sch.get_loops(init)[-1])
        for b in infos[at + 1:]:
            _parallel_vectorized(sch, b.block_rv, lanes)
        return sch


class Elementwise(CPUScheduleRule):
    """A chain of elementwise blocks: inlined into the last, one parallel vectorized loop."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(b.is_injective() for b in infos):
            return None
        if not _inline_all(sch, infos[:-1]):
            return None
        _parallel_vectorized(sch, infos[-1].block_rv, _lanes(target))
        return sch


def hand_rules() -> list:
    """The rules of an untuned build, in the order dlight tries them on each kernel."""
    return [Matmul(), dl.cpu.GEMV(), dl.cpu.Reduction(), Elementwise()]
