"""Freed host memory given back to the system, where the C library is glibc (Linux).

glibc's malloc serves a request of at least its mmap threshold with a mapping of its own,
unmapped when freed (gone from the process's RSS); smaller requests come from heaps it seldom
gives back. The threshold starts at 128 KiB, and unless it is set, each mapped block freed raises
it to that block's size, up to 32 MiB. A compile frees large tensors early (a checkpoint's
dequantized weights, the calibration's batches), so afterwards every tensor of up to 32 MiB (the
activations of a 4096-token forward, chunks of logits) came from a heap whose RSS stayed at its
high-water mark. Setting the threshold fixes it.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt's parameter number for the mmap threshold (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
# requests of this many bytes or more get their own mapping: every activation of a forward
# (SmolLM2's hidden state of one 512-token window is 1.2 MB) while the page faults of mapping
# them stay small beside the arithmetic on them
MMAP_THRESHOLD = 1 << 20


def return_large_frees(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fixes glibc's mmap threshold at `threshold` bytes for this process. True where it was
    set; False where the C library has no mallopt or refuses (not Linux, musl, ...): the
    compile then runs as before, with a higher RSS."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
