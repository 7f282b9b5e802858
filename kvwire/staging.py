"""A fixed budget of host memory, handed out in slots with backpressure.

Every payload that crosses the host on its way between a GPU (or a CPU cache) and the
network passes through a slot, so the memory kvwire uses is bounded by configuration
whatever the size of the requests: when all slots are taken, :meth:`StagingPool.acquire`
waits. With CUDA the pool is pinned (page-locked), so copies to and from the GPU run
asynchronously at full speed; without it, it is page-aligned anonymous memory, which
the kernel commits only as it is touched.

>>> pool = StagingPool(budget_bytes=8 << 20, slot_bytes=1 << 20, pinned=False)
>>> slot = pool.acquire()
>>> slot.tensor.numel()
1048576
>>> slot.release(); pool.stats()["high_water_bytes"]
1048576
"""

from __future__ import annotations

import mmap
import threading
import time

import torch

from kvwire.errors import KvwireError


class StagingTimeout(TimeoutError):
    """No slot became free before the deadline."""


class StagingClosed(KvwireError):
    """The pool was closed (its owner is shutting down) while waiting for a slot."""


class Slot:
    """One slot: ``tensor`` is a uint8 view of ``slot_bytes``; give it back with :meth:`release`."""

    __slots__ = ("pool", "index", "tensor", "array", "_released")

    def __init__(self, pool: StagingPool, index: int, tensor: torch.Tensor, array) -> None:
        self.pool = pool
        self.index = index
        self.tensor = tensor
        self.array = array  # the same bytes as a numpy uint8 array (made once per slot)
        self._released = False

    def view(self, nbytes: int) -> memoryview:
        """A writable memoryview of the first ``nbytes`` (for ``recv_into``)."""
        return self.array[:nbytes].data

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._release(self)


class StagingPool:
    def __init__(self, budget_bytes: int, slot_bytes: int, *, pinned: bool | None = None) -> None:
        if slot_bytes <= 0:
            raise ValueError(f"slot_bytes: must be positive, got {slot_bytes}")
        if budget_bytes < slot_bytes:
            raise ValueError(f"staging_bytes: budget of {budget_bytes} bytes is less than one slot ({slot_bytes})")
        self.slot_bytes = slot_bytes
        self.num_slots = budget_bytes // slot_bytes
        self.budget_bytes = self.num_slots * slot_bytes
        self.pinned = torch.cuda.is_available() if pinned is None else pinned
        if self.pinned:
            self._memory = torch.empty(self.budget_bytes, dtype=torch.uint8, pin_memory=True)
            self._mmap = None
        else:
            self._mmap = mmap.mmap(-1, self.budget_bytes)  # page-aligned, committed lazily
            self._memory = torch.frombuffer(self._mmap, dtype=torch.uint8)
        # Per-slot views made once: building them per frame was measurable per-frame cost.
        self._views = [
            (t, t.numpy()) for t in (self._memory[i * slot_bytes : (i + 1) * slot_bytes] for i in range(self.num_slots))
        ]
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._cond = threading.Condition()
        self._in_use = 0
        self._high_water = 0
        self._waits = 0
        self._wait_seconds = 0.0
        self._closed = False

    def acquire(self, timeout: float | None = None) -> Slot:
        """Take a free slot, waiting up to ``timeout`` seconds (forever if None)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if not self._free:
                self._waits += 1
                t0 = time.monotonic()
                while not self._free and not self._closed:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        self._wait_seconds += time.monotonic() - t0
                        raise StagingTimeout(f"no staging slot free within {timeout:.3g} s")
                    self._cond.wait(remaining)
                self._wait_seconds += time.monotonic() - t0
            if self._closed:
                raise StagingClosed("staging pool is closed")
            index = self._free.pop()
            self._in_use += 1
            self._high_water = max(self._high_water, self._in_use)
        return Slot(self, index, *self._views[index])

    def _release(self, slot: Slot) -> None:
        with self._cond:
            self._free.append(slot.index)
            self._in_use -= 1
            self._cond.notify()

    def close(self) -> None:
        """Wake every waiter with an error; memory is freed when the last view goes."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            return {
                "budget_bytes": self.budget_bytes,
                "slot_bytes": self.slot_bytes,
                "slots": self.num_slots,
                "in_use_bytes": self._in_use * self.slot_bytes,
                "high_water_bytes": self._high_water * self.slot_bytes,
                "waits": self._waits,
                "wait_seconds": round(self._wait_seconds, 6),
                "pinned": self.pinned,
            }
