"""The prompt write of the per-head KV cache (one gather per tensor) against the layout's slot rule,
position by position: sinks, rings that wrap, prompts shorter than a head's span, dense heads."""
from __future__ import annotations

import pytest
import torch

from tailor.core.patterns import Pattern
from tailor.runtime.kv_cache import HeadLayout, LayerCache

LAYOUTS = [[Pattern(4, 8, 0.0), None, Pattern(2, 3, 0.25)], [Pattern(3, 5, 0.0)] * 3,
           [Pattern(0, 5, 0.0), Pattern(16, 1, 0.0)]]


@pytest.mark.parametrize("patterns", LAYOUTS)
@pytest.mark.parametrize("n", [1, 3, 9, 12, 21, 37])
@pytest.mark.parametrize("layout_of_kv", ["heads_first", "positions_first"])
def test_write_prompt_puts_each_kept_position_in_its_slot(patterns, n, layout_of_kv):
    torch.manual_seed(n)
    layout = HeadLayout.for_patterns(patterns, 40)
    heads = layout.kv_heads
    if layout_of_kv == "heads_first":
        k, v = (torch.randn(heads, n, 8) for _ in range(2))
    else:  # what a transformers attention hands over: [N, H, D] memory viewed as [H, N, D]
        k, v = (torch.randn(n, heads, 8).transpose(0, 1) for _ in range(2))
    cache = LayerCache(layout, 2, 8, torch.float32, "cpu")
    cache.k.fill_(7.0), cache.v.fill_(7.0)
    cache.write_prompt(1, k, v)
    want_k, want_v = torch.full_like(cache.k[1], 7.0), torch.full_like(cache.v[1], 7.0)
    for h in range(heads):
        for p in layout.kept_positions(h, n) if layout.window(h, n) < n else range(n):
            want_k[layout.slot(h, p)], want_v[layout.slot(h, p)] = k[h, p], v[h, p]
    # positions the ring keeps: its last `ring` ones (window(n) can be narrower than the ring)
    for h, (s, r) in enumerate(zip(layout.sinks, layout.rings)):
        for p in range(max(s, n - r), n):
            want_k[layout.slot(h, p)], want_v[layout.slot(h, p)] = k[h, p], v[h, p]
    assert torch.equal(cache.k[1], want_k) and torch.equal(cache.v[1], want_v)
    assert torch.equal(cache.k[0], torch.full_like(cache.k[0], 7.0))   # other rows untouched
