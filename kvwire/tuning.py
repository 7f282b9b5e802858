"""Process-wide settings that help a process running kvwire, applied only on request.

kvwire never changes the host process by itself; a serving process (or a benchmark)
calls :func:`tune_process` once it has imported its models:

* ``gc.freeze()``: torch brings ~10^5 long-lived objects and every full garbage
  collection walks them all; frozen, they are skipped (about 5% of all CPU time in the
  loopback benchmark).
* glibc's mmap and trim thresholds raised to 1 GiB: megabyte allocations are then served
  from the heap instead of fresh ``mmap``s, so memory freed is reused without page faults.
  The CPU codecs needed this until they kept their own work buffers
  (``kvwire/codec/scratch.py``); they run as fast without it now (``python3
  bench/codec_micro.py [--tune]``, one thread, a 2 MiB chunk: fp8 decode 6.4 ms untuned
  and 2.8 ms tuned before, 0.71 ms either way after). It still helps whatever else in the
  process allocates megabytes per call. Freed memory then stays in the process for reuse.
* glibc's arenas capped at the CPU count: glibc gives each new thread its own malloc arena
  (up to 8 per CPU), and a new arena's heap is fresh memory, every page a fault on first
  touch. A receiver starts a reader thread for every connection a sender opens, and the
  sender's connection policy opens and retires connections as it probes, so a long run
  kept making fresh arenas: in a 1 Gbit/s `int4a` run four reader threads came in 10 s,
  and 87% of the receiver's page faults were in arena heaps grown from empty
  (docs/development.md). Capped, new threads share the arenas there are.
"""

from __future__ import annotations

import ctypes
import gc
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


INT_MAX = (1 << 31) - 1  # mallopt takes a C int


def _c_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not 1 <= value <= INT_MAX:
        raise ValueError(f"{name}: expected 1 to {INT_MAX} (a C int), got {value}")
    return value


def tune_malloc(threshold: int = 1 << 30, arenas: int | None = None) -> bool:
    """Raise glibc's mmap/trim thresholds to ``threshold`` bytes and cap its arenas at
    ``arenas`` (default: the CPUs this process may run on); whether glibc took all three
    (False where the C library is not glibc)."""
    if arenas is None:
        arenas = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threshold, arenas = _c_int(threshold, "threshold"), _c_int(arenas, "arenas")
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    took = [bool(mallopt(option, value)) for option, value in
            ((M_MMAP_THRESHOLD, threshold), (M_TRIM_THRESHOLD, threshold), (M_ARENA_MAX, arenas))]  # fmt: skip
    return all(took)


def tune_process(*, freeze_gc: bool = True, malloc: bool = True) -> None:
    """Apply the settings above to this process (see the module docstring for why)."""
    if malloc:
        tune_malloc()
    if freeze_gc:
        gc.freeze()
