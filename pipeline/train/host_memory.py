"""Freed CPU tensors kept in the process heap for the next step, instead of handed back to the OS.

Why: glibc's malloc serves a request above its mmap threshold (32 MiB at most) with a fresh `mmap` and
unmaps it on free. A training step on the CPU frees and reallocates the same large tensors every step (the
tied embedding's [vocab, hidden] gradient, the LM head's logits), so every step faults those pages in again
and the kernel zeroes them. Measured on the general bench's student step (2 threads): 0.51-0.57 s with
glibc's defaults against 0.47-0.53 s with the heap kept, three pairs of processes side by side.

`keep_freed_buffers()` turns off malloc's use of mmap and raises the trim threshold, once per process, where
the C library is glibc; elsewhere (musl, macOS, Windows) nothing changes. The cost: memory freed inside the
heap is reused by the process rather than returned to the OS, so a process's resident size stays near its
peak. The trainer calls it when it trains on the CPU (`keep_host_memory`, on by default).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 1 << 30
"""Free space at the top of the heap is returned to the OS only beyond 1 GiB."""

_kept = False


def keep_freed_buffers() -> bool:
    """Keep freed buffers in this process's heap (glibc only; idempotent). True when the setting holds."""
    global _kept
    if _kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _kept = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _kept
