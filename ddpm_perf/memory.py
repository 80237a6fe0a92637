"""Keep freed heap memory in the process instead of handing it back to the OS (glibc).

glibc serves large allocations with mmap (above a threshold that adapts up to 32 MiB) and returns
freed memory to the OS (trimming). A U-Net step allocates and frees its activations every time,
so every step faults them back in, page by page: ~32,000 minor faults per cifar10 sampling step
at batch 8 (~120 MiB), ~28,000 per training step at batch 16, 3-8% of a step measured
(docs/performance.md, "Page faults"). With the mmap threshold at its maximum and trimming off,
the heap keeps that memory and reuses it: no faults, the same peak RSS. The cost: a process does
not shrink after its peak, which is what a sampling or training run wants anyway.

The CLI applies this at start-up (``DDPM_PERF_KEEP_FREED_MEMORY=0`` turns it off); API users call
:func:`keep_freed_memory` themselves. It is process-wide, so the baseline of every comparison
gets it too.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest allowed value on 64-bit: HEAP_MAX_SIZE / 2
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: as good as never trimming

_status: str | None = None


def keep_freed_memory() -> str:
    """Apply the setting (once per process); returns what was done, or why nothing was."""
    global _status
    if _status is None:
        _status = _apply()
    return _status


def status() -> str:
    """What :func:`keep_freed_memory` did in this process, for ``ddpm-perf info``."""
    return _status or "not applied (the CLI applies it at start-up)"


def _apply() -> str:
    if os.environ.get("DDPM_PERF_KEEP_FREED_MEMORY", "1").lower() in ("0", "false", "no", "off"):
        return "off (DDPM_PERF_KEEP_FREED_MEMORY=0)"
    if not sys.platform.startswith("linux"):
        return f"not applied: the allocator of {sys.platform} is not glibc's"
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return "not applied: this C library is not glibc"
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return f"not applied: glibc {version} refused mallopt"
    return f"freed memory kept (glibc {version}: mmap threshold 32 MiB, no trimming)"
