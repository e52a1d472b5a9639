"""Freed host memory kept in the process for the next step (keep_freed_host_memory), on CPU runs with glibc.

A training step allocates and frees the same large tensors every step (activations, logits, gradients). glibc's
malloc hands blocks above its mmap threshold (at most 32 MB) to the kernel on free, and trims the top of its heap
when much of it is free; the next step's tensors then fault those pages in again, each one zeroed by the kernel:
about 400,000 page faults per SmolLM2 step in float32 on a 2-core CPU. Served from a heap that is never trimmed,
the same tensors reuse pages the process already holds (docs/BENCHMARKS.md: 12-43% more tokens/s in float32).

No torch here: the decision and the call, testable in a bare interpreter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM_BYTES = 2**31 - 1  # mallopt takes an int: the largest free heap top glibc keeps without trimming


def keep_freed_memory() -> str | None:
    """Tell glibc's malloc to serve every block from its heap (no mmap) and never to trim it. None when done, else
    why it could not be (not glibc: musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'libc'})"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM_BYTES) != 1:
        return "glibc's mallopt refused the settings"
    return None


def configure_host_memory(keep: bool, trains_on_cpu: bool) -> str:
    """Apply keep_freed_host_memory; return the log line that says what was chosen and why."""
    if not keep:
        return "keep_freed_host_memory=false: glibc returns freed memory to the system"
    if not trains_on_cpu:
        # On a GPU the step's tensors live in the device's caching allocator; host memory is loading and data,
        # which a kept heap would hold for the whole run (a model loaded on the CPU first, then moved).
        return "keep_freed_host_memory: not applied (the model trains on a GPU)"
    why_not = keep_freed_memory()
    if why_not:
        return f"keep_freed_host_memory: not applied ({why_not})"
    return "keep_freed_host_memory: freed memory stays in the process for the next step (glibc: no trim, no mmap)"
