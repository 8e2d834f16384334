"""The block-sparse prefill kernel against its plain-torch reference, over shapes and patterns
(Triton's interpreter on the CPU; the compiled kernel where CUDA is available)."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from tailor.codegen.triton.prefill import sparse_prefill  # noqa: E402
from tailor.codegen.triton.reference import DENSE_WINDOW, prefill_reference, span_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = DENSE_WINDOW

# (queries, keys), per-KV-head (sink, window): dense heads, windows narrower and wider than a
# block, sinks that end inside a block, a window of one (the diagonal only)
CASES = [((40, 40), [(4, 8), (0, D)]), ((37, 53), [(3, 17), (16, 5)]), ((1, 30), [(4, 8), (0, D)]),
         ((64, 64), [(0, 1), (32, 33)]), ((50, 50), [(0, D), (0, D)])]


@pytest.mark.parametrize("shape,spans", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("groups", [1, 3])
def test_prefill_matches_reference(shape, spans, causal, groups):
    m, n = shape
    if not causal and m != n:
        pytest.skip("bidirectional attention is over the whole sequence")
    torch.manual_seed(m * n + groups)
    hkv = len(spans)
    q = torch.randn(2, hkv * groups, m, 16, device=DEVICE)
    k, v = (torch.randn(2, hkv, n, 16, device=DEVICE) for _ in range(2))
    sinks = torch.tensor([s for s, _ in spans], dtype=torch.int32, device=DEVICE)
    windows = torch.tensor([w for _, w in spans], dtype=torch.int32, device=DEVICE)
    out = sparse_prefill(q, k, v, sinks, windows, causal)
    ref = prefill_reference(q, k, v, sinks, windows, causal)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4), (out - ref).abs().max()


def test_prefill_half_precision_and_strided_inputs():
    torch.manual_seed(1)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    qkv = torch.randn(1, 48, 3, 4, 16, device=DEVICE, dtype=dtype)      # [B, T, 3, H, D] like a fused proj
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))           # non-contiguous [B, H, T, D]
    kv_k, kv_v = k[:, :2], v[:, :2]
    sinks = torch.tensor([4, 0], dtype=torch.int32, device=DEVICE)
    windows = torch.tensor([12, D], dtype=torch.int32, device=DEVICE)
    out = sparse_prefill(q, kv_k, kv_v, sinks, windows)
    ref = prefill_reference(q.float(), kv_k.float(), kv_v.float(), sinks, windows)
    assert torch.allclose(out.float(), ref, atol=2e-3 if dtype == torch.float16 else 2e-5)


def test_span_mask_is_the_pattern_definition():
    keep = span_mask(torch.tensor([2]), torch.tensor([3]), 6, 6, causal=True)[0]
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    assert torch.equal(keep, (j <= i) & ((j < 2) | (i - j < 3)))
    both = span_mask(torch.tensor([2]), torch.tensor([3]), 6, 6, causal=False)[0]
    assert torch.equal(both, (j < 2) | ((i - j).abs() < 3))


def test_unsupported_shapes_are_refused():
    q = torch.randn(1, 3, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="unsupported shapes"):
        sparse_prefill(q, k, k, torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))


def test_windows_past_dense_are_dense():
    """A window wider than DENSE_WINDOW (up to int32's largest) is a dense head: the kernel bounds
    it itself (nothing overflows int32 in its key-span arithmetic), with no clamp launched."""
    torch.manual_seed(2)
    q = torch.randn(1, 2, 40, 16, device=DEVICE)
    k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(2))
    sinks = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    wide = torch.tensor([2 ** 31 - 1, 2 ** 31 - 1], dtype=torch.int32, device=DEVICE)
    dense = torch.tensor([D, D], dtype=torch.int32, device=DEVICE)
    for causal in (True, False):
        out = sparse_prefill(q, k, v, sinks, wide, causal)
        ref = prefill_reference(q, k, v, sinks, dense, causal)
        assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4), (out - ref).abs().max()
