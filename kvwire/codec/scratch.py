"""Work buffers the CPU codecs reuse from chunk to chunk, one set per thread.

A CPU codec's temporaries (the fp32 copy of a chunk, its rotated rows, its codes) are as
large as the chunk or four times larger. Allocated afresh for every chunk, each one can be
a new ``mmap`` from glibc, paid for again in page faults on its first touch, which costs
more than the arithmetic: ``int4h`` values of a 2 MiB chunk, encoded on one thread between
other allocations, ran at 0.21 GB/s with fresh temporaries, 0.41-0.44 GB/s with glibc's
thresholds raised (``kvwire.tune_process``), and 0.76-0.77 GB/s with these buffers (and
the factored rotation) either way (``docs/benchmarks.md``, "CPU codecs"). So each thread
keeps one buffer per purpose, grown to the largest chunk it has seen and never shrunk: a
few times the chunk size per encoding or decoding thread.

A buffer handed out here is valid until the same thread asks for the same name again: a
codec uses it inside one call and never returns it (or a view of it) to its caller.
"""

from __future__ import annotations

import math
import threading

import torch


class _Buffers(threading.local):
    def __init__(self) -> None:
        self.by_name: dict[tuple[str, torch.dtype], torch.Tensor] = {}


_buffers = _Buffers()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This thread's buffer ``name`` as an uninitialised contiguous tensor of ``shape``."""
    n = math.prod(shape)
    key = (name, dtype)
    buf = _buffers.by_name.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        _buffers.by_name[key] = buf
    return buf[:n].view(shape)


def held_bytes() -> int:
    """Bytes this thread's buffers hold (for tests and reports)."""
    return sum(b.numel() * b.element_size() for b in _buffers.by_name.values())
