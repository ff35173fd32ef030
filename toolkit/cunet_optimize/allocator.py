"""Keep freed tensor memory in the process instead of returning it to the kernel.

glibc's malloc serves blocks above its mmap threshold (at most 32 MiB) with fresh mmaps
and returns them on free, so every forward pass of a deep CU-Net faults in its
activations page by page again (a batch of 16 on the N=8 face model holds 33 MB tensors).
Raising the mmap and trim thresholds lets later passes reuse the same pages. An INT8
build of the N=8 face model on 2 shared vCPUs (AMD EPYC, load average 3-4 in both runs)
spent 90.9 s of system time as glibc ships and 15.7 s with the thresholds raised; its
calibration stage (PyTorch forwards at batch 16) took 314 s and 183 s wall
(bench/results/build_time_face_n8_int8_glibc_default.json and
bench/results/build_time_face_n8_int8.json, written by
`python bench/bench_build_time.py --model N8.safetensors --precisions int8`). The cost: the
process keeps its peak heap until it exits, which a command-line run does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 1 << 34


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (see module doc); False where there is no
    glibc (other C libraries keep their own policy)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("glibc malloc thresholds raised: %s", ok)
    return ok
