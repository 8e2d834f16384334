"""The split-K decode kernel over the per-head ring cache, against its reference (which works from
the slots' side, independently of the kernel's walk over positions), and cached decoding against
recomputing attention over the whole sequence."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from tailor.codegen.triton.decode import sparse_decode  # noqa: E402
from tailor.codegen.triton.reference import decode_reference, prefill_reference  # noqa: E402
from tailor.core.patterns import Pattern  # noqa: E402
from tailor.runtime.kv_cache import HeadLayout, LayerCache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = [[Pattern(4, 8, 0.0), None, Pattern(2, 3, 0.25)], [None, None],
           [Pattern(0, 5, 0.0), Pattern(16, 1, 0.0)]]


@pytest.mark.parametrize("patterns", LAYOUTS)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("groups", [1, 4])
def test_decode_matches_reference(patterns, splits, groups):
    torch.manual_seed(len(patterns) * splits + groups)
    layout = HeadLayout.for_patterns(patterns, 60)
    cache = LayerCache(layout, 3, 16, torch.float32, DEVICE)
    cache.k.normal_(), cache.v.normal_()
    q = torch.randn(3, layout.kv_heads * groups, 16, device=DEVICE)
    lengths = torch.tensor([5, 37, 60], dtype=torch.int32, device=DEVICE)
    out = sparse_decode(q, cache.k, cache.v, cache.t, lengths, splits=splits)
    ref = decode_reference(q, cache.k, cache.v, cache.t, lengths)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4), (out - ref).abs().max()


def test_ring_cache_decoding_equals_recomputing():
    """Write a prompt, then token after token (the ring wraps several times); at every step the
    kernel over the cache equals attention of the last query over the whole sequence so far."""
    torch.manual_seed(3)
    patterns = [Pattern(3, 5, 0.0), None]
    total, prompt = 40, 9
    layout = HeadLayout.for_patterns(patterns, total)
    k, v = (torch.randn(1, 2, total, 16, device=DEVICE) for _ in range(2))
    q = torch.randn(1, 4, total, 16, device=DEVICE)
    cache = LayerCache(layout, 1, 16, torch.float32, DEVICE)
    cache.write_prompt(0, k[0, :, :prompt], v[0, :, :prompt])
    sinks = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    windows = torch.tensor([5, 1 << 30], dtype=torch.int32, device=DEVICE)
    for n in range(prompt + 1, total + 1):
        lengths = torch.tensor([n], dtype=torch.int32, device=DEVICE)
        cache.write_token(k[:, :, n - 1], v[:, :, n - 1], lengths)
        out = sparse_decode(q[:, :, n - 1], cache.k, cache.v, cache.t, lengths, splits=2)
        full = prefill_reference(q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n], sinks, windows)[:, :, 0]
        assert torch.allclose(out, full, atol=2e-5), (n, (out - full).abs().max())


def test_cache_holds_only_the_kept_spans():
    layout = HeadLayout.for_patterns([Pattern(4, 8, 0.0), None, Pattern(2, 3, 0.25)], 100)
    assert layout.rings == (8, 100, 28) and layout.slots == 4 + 8 + 100 + 2 + 28
    assert layout.kept_positions(0, 50) == [0, 1, 2, 3] + list(range(42, 50))
    assert layout.kept_positions(2, 20) == [0, 1] + list(range(12, 20))   # window 3 + 0.25 * 20 = 8
