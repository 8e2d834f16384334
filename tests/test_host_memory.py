"""glibc's mmap threshold fixed at compile start: large tensors freed leave the RSS."""
from __future__ import annotations

import sys

import pytest
import torch

from tailor.core import host_memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc on Linux")
def test_freed_large_tensors_leave_the_rss():
    assert host_memory.return_large_frees()
    # a 16 MiB block mapped and freed first: had the threshold not been fixed, glibc would now
    # serve the 4 MiB tensors below from its heap, where the small tensors kept between them pin
    # every freed one in the RSS (256 MiB of 256 measured so)
    torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
    before = _rss_bytes()
    tensors, kept = [], []
    for _ in range(64):  # 4 MiB each, 256 MiB in all, touched
        tensors.append(torch.ones(1 << 20))
        kept.append(torch.ones(16))
    assert _rss_bytes() - before > 200 << 20
    del tensors
    assert _rss_bytes() - before < 32 << 20


def test_never_fatal_where_the_c_library_cannot(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert host_memory.return_large_frees() is False
