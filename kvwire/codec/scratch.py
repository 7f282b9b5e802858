"""Work buffers the CPU codecs reuse from chunk to chunk.

A CPU codec's temporaries (the fp32 copy of a chunk, its rotated rows, its codes) are as
large as the chunk or four times larger. Allocated afresh for every chunk, each one can be
a new ``mmap`` from glibc, paid for again in page faults on its first touch, which costs
more than the arithmetic. ``python3 bench/codec_micro.py --codecs int4h --interleave
[--tune]`` (one thread, a 2 MiB chunk, other allocations between calls as in an engine):
values took 5.5-5.6 ms to encode with fresh temporaries, 4.3-4.4 ms with glibc's thresholds
raised (``kvwire.tune_process``), and 2.3-2.4 ms with these buffers (and the factored
rotation) either way (``docs/benchmarks.md``, "CPU codecs").

Every :meth:`Codec.encode` and :meth:`Codec.decode_bytes` runs inside :func:`workspace`:
it takes a set of buffers from a process-wide pool for the call and gives it back after,
so the memory held follows how many chunks are being coded at once, not how many threads
(a receiver has one per connection) have ever coded one. A set grows to what the largest
chunk it has served needed: for a 2 MiB bf16 chunk 10.5 MiB (``int4``) to 18.5 MiB
(``int4h``), 22.5 MiB once every codec has used it (``python3 bench/codec_parts.py``). At
most ``IDLE_WORKSPACES`` sets are kept between calls, the others freed.

A buffer from :func:`scratch` is valid until the call that took it returns: a codec uses it
inside that call and never returns it (or a view of it) to its caller. Outside a codec
call, :func:`scratch` allocates a new tensor.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch

IDLE_WORKSPACES = 4  # buffer sets kept between calls (each 5-11x the largest chunk)


class Workspace:
    """One set of named buffers, used by one codec call at a time."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        key = (name, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            self.buffers[key] = buf
        return buf[:n].view(shape)

    def held_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


_idle: list[Workspace] = []
_idle_lock = threading.Lock()
_current = threading.local()


@contextlib.contextmanager
def workspace() -> Iterator[Workspace]:
    """This thread's workspace for the duration of one codec call (the outer one's, when
    calls nest)."""
    ws = getattr(_current, "ws", None)
    if ws is not None:
        yield ws
        return
    with _idle_lock:
        ws = _idle.pop() if _idle else Workspace()
    _current.ws = ws
    try:
        yield ws
    finally:
        _current.ws = None
        with _idle_lock:
            if len(_idle) < IDLE_WORKSPACES:
                _idle.append(ws)


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Buffer ``name`` of the current codec call as an uninitialised contiguous tensor of
    ``shape`` (a new tensor outside a codec call)."""
    ws = getattr(_current, "ws", None)
    if ws is None:
        return torch.empty(shape, dtype=dtype)
    return ws.take(name, shape, dtype)


def drop_idle() -> None:
    """Free the idle workspaces (tests and measurements start from an empty pool)."""
    with _idle_lock:
        _idle.clear()


def idle_bytes() -> int:
    """Bytes the idle workspaces hold (for tests and reports)."""
    with _idle_lock:
        return sum(ws.held_bytes() for ws in _idle)
