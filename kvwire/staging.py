"""A fixed budget of host memory, handed out in right-sized slots with backpressure.

Every payload that crosses the host on its way between a GPU (or a CPU cache) and the
network passes through a slot, so the memory kvwire uses is bounded by configuration
whatever the size of the requests: when no room is free, :meth:`StagingPool.acquire`
waits (up to a deadline). With CUDA the pool is pinned (page-locked), so copies to and
from the GPU run asynchronously at full speed; without it, it is page-aligned anonymous
memory, which the kernel commits only as it is touched.

A slot is as large as the payload it holds, rounded up to a page (``UNIT``): a 4 KiB
chunk holds 4 KiB, not a whole ``max_slot_bytes``. The pool is one buffer cut into
extents; large slots are taken from its low end and small ones from its high end, so
long-lived small slots (data parked before its ``expect``) do not fragment the room
that large ones need.

>>> pool = StagingPool(budget_bytes=8 << 20, slot_bytes=1 << 20, pinned=False)
>>> slot = pool.acquire(4096)
>>> slot.tensor.numel(), pool.stats()["in_use_bytes"]
(4096, 4096)
>>> slot.release(); pool.stats()["high_water_bytes"]
4096
"""

from __future__ import annotations

import bisect
import mmap
import threading
import time

import torch

from kvwire.errors import KvwireError

UNIT = 4096  # allocation granule: one page, so every slot starts page-aligned


class StagingTimeout(TimeoutError):
    """No room became free before the deadline."""


class StagingClosed(KvwireError):
    """The pool was closed (its owner is shutting down) while waiting for room."""


class Slot:
    """Room for one payload: ``tensor`` is a uint8 view of ``nbytes``; give it back with :meth:`release`."""

    __slots__ = ("pool", "start", "units", "tensor", "array", "_released")

    def __init__(self, pool: StagingPool, start: int, units: int, nbytes: int) -> None:
        self.pool = pool
        self.start = start  # first unit of the extent
        self.units = units
        lo = start * UNIT
        self.tensor = pool._memory[lo : lo + nbytes]
        self.array = pool._array[lo : lo + nbytes]  # the same bytes as a numpy uint8 array
        self._released = False

    @property
    def held_bytes(self) -> int:
        """Memory this slot takes from the budget (its size rounded up to a page)."""
        return self.units * UNIT

    def view(self, nbytes: int) -> memoryview:
        """A writable memoryview of the first ``nbytes`` (for ``recv_into``)."""
        return self.array[:nbytes].data

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._release(self)


def check_budget(budget_bytes: int, slot_bytes: int) -> None:
    """ValueError unless ``budget_bytes`` holds one slot of ``slot_bytes`` (what a
    :class:`StagingPool` needs; callers that must refuse before any other work check first)."""
    if slot_bytes <= 0:
        raise ValueError(f"slot_bytes: must be positive, got {slot_bytes}")
    if budget_bytes < slot_bytes:
        raise ValueError(f"staging_bytes: budget of {budget_bytes} bytes is less than one slot ({slot_bytes})")


class StagingPool:
    """``budget_bytes`` of host memory; one :meth:`acquire` takes at most ``slot_bytes``."""

    def __init__(self, budget_bytes: int, slot_bytes: int, *, pinned: bool | None = None) -> None:
        check_budget(budget_bytes, slot_bytes)
        self.slot_bytes = slot_bytes
        self._units = -(-budget_bytes // UNIT)
        self.budget_bytes = self._units * UNIT
        self.pinned = torch.cuda.is_available() if pinned is None else pinned
        if self.pinned:
            self._memory = torch.empty(self.budget_bytes, dtype=torch.uint8, pin_memory=True)
            self._mmap = None
        else:
            self._mmap = mmap.mmap(-1, self.budget_bytes)  # page-aligned, committed lazily
            self._memory = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self._array = self._memory.numpy()  # one numpy view; slots slice it (cheap per frame)
        self._large = max(1, slot_bytes // 4 // UNIT)  # slots of this many units or more count as large
        # Free extents as two sorted parallel lists: start unit -> length in units.
        self._free_starts: list[int] = [0]
        self._free_lengths: list[int] = [self._units]
        self._cond = threading.Condition()
        self._in_use = 0  # units
        self._high_water = 0
        self._slots_in_use = 0
        self._waits = 0
        self._wait_seconds = 0.0
        self._closed = False

    def acquire(self, nbytes: int | None = None, timeout: float | None = None) -> Slot:
        """Take room for ``nbytes`` (default: ``slot_bytes``), waiting up to ``timeout``
        seconds (forever if None). Raises :class:`StagingTimeout` or :class:`StagingClosed`."""
        nbytes = self.slot_bytes if nbytes is None else nbytes
        if not 0 < nbytes <= self.slot_bytes:
            raise ValueError(f"nbytes: {nbytes} outside 1..{self.slot_bytes}")
        units = -(-nbytes // UNIT)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            start = self._take(units)
            if start is None:
                self._waits += 1
                t0 = time.monotonic()
                while start is None and not self._closed:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        self._wait_seconds += time.monotonic() - t0
                        raise StagingTimeout(f"no {nbytes} bytes of staging free within {timeout:.3g} s")
                    self._cond.wait(remaining)
                    start = self._take(units)
                self._wait_seconds += time.monotonic() - t0
            if self._closed:
                if start is not None:
                    self._give_back(start, units)
                raise StagingClosed("staging pool is closed")
            assert start is not None
            self._in_use += units
            self._slots_in_use += 1
            self._high_water = max(self._high_water, self._in_use)
        return Slot(self, start, units, nbytes)

    def _take(self, units: int) -> int | None:
        """(lock held) Cut ``units`` from a free extent: first fit from the low end for large
        slots, from the high end for small ones. None when no extent is long enough."""
        starts, lengths = self._free_starts, self._free_lengths
        order = range(len(starts)) if units >= self._large else range(len(starts) - 1, -1, -1)
        for i in order:
            length = lengths[i]
            if length < units:
                continue
            if units >= self._large:
                start = starts[i]
                if length == units:
                    del starts[i], lengths[i]
                else:
                    starts[i] += units
                    lengths[i] -= units
            else:
                start = starts[i] + length - units
                if length == units:
                    del starts[i], lengths[i]
                else:
                    lengths[i] -= units
            return start
        return None

    def _give_back(self, start: int, units: int) -> None:
        """(lock held) Return an extent, merging it with free neighbours."""
        starts, lengths = self._free_starts, self._free_lengths
        i = bisect.bisect_left(starts, start)
        merge_left = i > 0 and starts[i - 1] + lengths[i - 1] == start
        merge_right = i < len(starts) and start + units == starts[i]
        if merge_left and merge_right:
            lengths[i - 1] += units + lengths[i]
            del starts[i], lengths[i]
        elif merge_left:
            lengths[i - 1] += units
        elif merge_right:
            starts[i] = start
            lengths[i] += units
        else:
            starts.insert(i, start)
            lengths.insert(i, units)

    def _release(self, slot: Slot) -> None:
        with self._cond:
            self._give_back(slot.start, slot.units)
            self._in_use -= slot.units
            self._slots_in_use -= 1
            self._cond.notify_all()  # waiters want different sizes: each checks its own

    def close(self) -> None:
        """Wake every waiter with an error; memory is freed when the last view goes."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            return {
                "budget_bytes": self.budget_bytes,
                "max_slot_bytes": self.slot_bytes,
                "slots_in_use": self._slots_in_use,
                "in_use_bytes": self._in_use * UNIT,
                "high_water_bytes": self._high_water * UNIT,
                "largest_free_bytes": max(self._free_lengths, default=0) * UNIT,
                "waits": self._waits,
                "wait_seconds": round(self._wait_seconds, 6),
                "pinned": self.pinned,
            }
