"""Process-level speed settings for CPU runs."""
from __future__ import annotations

import ctypes
import os
import sys


def tune_allocator() -> bool:
    """Keep large activation buffers in glibc's heap instead of returning them to the OS every step.

    glibc hands blocks over 32 MB back with munmap and page-faults them in again on the next step;
    raising the mmap and trim thresholds (and disabling mmap) gave 1.1-1.6x on CPU training here (docs/performance.md).
    Set MAE_LITE_MALLOC_TUNING=0 to leave the allocator alone. Returns whether the setting was applied.
    The commands call it for CPU runs only: a GPU run's step does not live in the host heap, and a heap that never
    shrinks would only keep the host memory of its loader and pinned buffers (forked workers inherit it too).
    """
    if os.environ.get("MAE_LITE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
    ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1
    # glibc caps the mmap threshold at 32 MiB, so 38 MB activations (ViT-Tiny, batch 64) would still be
    # mmapped and page-faulted every step: no mmap at all (measured +4-10 %, page faults 90k -> ~0 per step)
    ok = libc.mallopt(m_mmap_max, 0) == 1 and ok
    return bool(libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and ok)
