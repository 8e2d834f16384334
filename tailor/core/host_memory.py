"""Freed host memory given back to the system, where the C library is glibc (Linux).

glibc's malloc serves a request of at least its mmap threshold with a mapping of its own,
unmapped when freed (gone from the process's RSS); smaller requests come from heaps it seldom
gives back. The threshold starts at 128 KiB, and each mapped block freed raises it to that
block's size, up to 32 MiB. A compile frees large tensors early (a checkpoint's dequantized
weights, the calibration's batches), so afterwards every tensor of up to 32 MiB (the activations
of a 4096-token forward, chunks of logits) comes from a heap, where small live blocks between
them keep freed ones in the RSS. Fixing the threshold low unmaps them, but every large tensor is
then mapped and zero-faulted afresh: the 2-core CPU compile of SmolLM2 took 1.6x as long. So the
heap stays, and its free pages are given back between units of work instead.
"""
from __future__ import annotations

import ctypes
import functools
import sys


def release_free_memory() -> bool:
    """Gives the heap's free pages back to the system now (glibc's malloc_trim(0): every whole
    free page, between live blocks too). Called after each unit of repeated work (an option
    measured, an attention cell, a plan checked, a branch refitted), so that what one unit freed
    does not stay in the RSS under the next; cheaper than a low mmap threshold, which maps and
    zero-faults every large tensor afresh (a SmolLM2 forward 1.3x slower). False where there is
    no glibc."""
    trim = _malloc_trim() if sys.platform.startswith("linux") else None
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():
    """The C library's malloc_trim, looked up once (it is called hundreds of times a compile), or
    None where it has none (musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim
