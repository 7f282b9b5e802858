"""The receive lane: the receiver's frame loop, compiled, for the frames that need no Python.

Most frames of a large transfer are raw DATA of a bound request whose destination rows
take the payload as it is (host caches, the compiled helper built). For each of them the
receiver's Python loop did the same few things: read and check the header, claim the
rows in the request's plan, receive the payload into the rows, check its CRC32C, count
it, owe the credit back. ``_scatter.lane_recv`` (kvwire/_scatter.c) does exactly that for
such frames, frame after frame, and returns to Python only for what changes state: a
frame it does not take (any control frame, a tag it has no lane for, anything irregular,
which Python then reads as before and names what is wrong with), a layer that may be
ready or a request that ended while its chunk was written, a checksum mismatch, a lost
stream, or credit to give back.

A :class:`Lane` is one sender's share (its *part*) of one bound request, as a table the
helper reads: per layer and tensor, where its rows lie in the cache and the plan's
coverage tables it claims them in. The helper claims under the receiver's lock, in the
same tables :class:`~kvwire.proto.request.RequestPlan` uses, so a chunk claimed by the
lane and one claimed by Python can never both take the same rows; it takes only chunks
whose rows no chunk has claimed (a repeat or an overlap goes to Python, which drops the
one and refuses the other), and only while the request is bound: the lane is closed,
under the lock, as the request leaves that state (``Lane.close``), and a chunk being
written then is finished by Python like any other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvwire.engine.chunks import ChunkRef
from kvwire.engine.placement import Placement
from kvwire.layout import STATE_NAME
from kvwire.proto.request import PartSpec, RequestPlan
from kvwire.scatter import _scatter

# What ``receive`` returns to Python for (kvwire/_scatter.c, "The receive lane")
PYTHON, HANDOFF, CHECKSUM, LOST, CREDIT, FAILED = range(6)
# The table's layout: a header, then an entry per (layer, tensor) position.
_LIVE, _LAYERS, _TENSORS, _IDS, _NIDS, _MISSING, _WRITING = range(7)
HEAD = 8
FIELDS = 12
BOUNCE = 256 << 10  # bytes a payload is received through at a time (bounce_buffer)


class Lane:
    """One sender's share of one bound request, as the helper reads it (see the module)."""

    __slots__ = ("table", "request", "handle", "tag", "session", "lanes", "_keep")

    def __init__(self, table: np.ndarray, request: Any, tag: int, session: str, lanes: dict, keep: list) -> None:
        self.table = table
        self.request = request  # (the receiver's Request) a chunk being written finishes in it after the lane closed
        self.handle = request.handle  # the receive handle: the helper counts chunks in its statistics
        self.tag = tag
        self.session = session
        self.lanes = lanes  # the session's lanes by tag, where this one is registered
        self._keep = keep  # the arrays the table points into

    def close(self) -> None:
        """(receiver lock held) Take no more frames: the request is no longer bound."""
        self.table[_LIVE] = 0
        if self.lanes.get(self.tag) is self:
            del self.lanes[self.tag]


def available() -> bool:
    """Whether the helper is built with the lane (and checks CRC32C with the CPU's instruction)."""
    if _scatter is None or not _scatter.hardware():
        return False
    built = (_scatter.LANE_PYTHON, _scatter.LANE_HANDOFF, _scatter.LANE_CHECKSUM, _scatter.LANE_LOST,
             _scatter.LANE_CREDIT, getattr(_scatter, "LANE_FAILED", None), _scatter.LANE_HEAD,
             _scatter.LANE_FIELDS, hasattr(_scatter, "STREAMING_STORES"))  # fmt: skip
    if built != (PYTHON, HANDOFF, CHECKSUM, LOST, CREDIT, FAILED, HEAD, FIELDS, True):
        raise ImportError("kvwire._scatter was built from another version of kvwire/_scatter.c: reinstall kvwire")
    return True


def bounce_buffer() -> bytearray:
    """A connection's buffer for ``receive``'s ``bounce``: BOUNCE bytes where the helper
    copies out with stores that bypass the cache (x86-64), else none (empty): payloads are
    then received straight into their rows. See kvwire/_scatter.c, recv_bounced."""
    return bytearray(BOUNCE if _scatter.STREAMING_STORES else 0)


def receive(fd: int, head: bytearray, lanes: dict, lock, batch: int, max_payload: int, checked: bool,
            counters, stream=None, conn=None, bounce=None) -> tuple[int, Lane | None, int, int, Any]:  # fmt: skip
    """Frames off ``fd`` until one needs Python: (status, lane, bytes received, payload
    bytes owed as credit, errno; for FAILED, the exception). Given ``stream`` (the
    TcpStream of ``fd``), the lane returns credit itself when it can without waiting
    (``counters["lane_credits"]``) and comes back with CREDIT only when it cannot. Given
    ``conn`` (``owed``, ``owed_lock``: the receiver's connection), what the lane owes joins
    the connection's one count of credit owed before the lane waits for a frame. See
    kvwire/_scatter.c, "The receive lane". Given a non-empty ``bounce`` (bounce_buffer), each
    payload goes through it a piece at a time, checked there, and is copied out to its rows
    with stores that bypass the cache."""
    return _scatter.lane_recv(fd, head, lanes, lock, batch, max_payload, checked, counters, stream, conn, bounce)


def build(request: Any, part: PartSpec, placement: Placement, tag: int, session: str,
          lanes: dict) -> Lane | None:  # fmt: skip
    """A lane for ``part`` of a bound request (the receiver's Request: its plan, and its
    handle's destination blocks), or None when no tensor of the part lands as spans (the
    receiver's Python path then takes every frame)."""
    plan: RequestPlan = request.plan
    block_ids = request.handle.destination.selection.ids
    layout = plan.layout
    ids = np.ascontiguousarray(block_ids, dtype=np.int64)
    n_tensors = 1 + max(t.index for plans in plan.tensors for t in plans)
    table = np.zeros(HEAD + plan.layout.num_layers * n_tensors * FIELDS, dtype=np.int64)
    keep: list = [ids, plan.missing, plan.writing]
    enabled = 0
    for layer, plans in enumerate(plan.tensors):
        for t in plans:
            if t.name == STATE_NAME or (t.whole and not part.whole) or (not t.whole and not part.heads):
                continue
            heads = None if t.whole or part.heads == t.heads else (part.first_head, part.heads)
            geometry = placement.span_geometry(ChunkRef(layer, t.index, t.name, 0, t.unit, True, heads))
            row_bytes = (t.heads if t.whole else part.heads) * t.head_dim * layout.itemsize
            if geometry is None or geometry[4] != row_bytes:
                continue  # its chunks go through Python's path
            covered, counts = plan.coverage(layer, t.index, part)
            keep += [covered, counts]
            at = HEAD + (layer * n_tensors + t.index) * FIELDS
            weight = 1 if t.whole else part.heads
            table[at : at + FIELDS] = [1, t.rows, t.unit, weight, *geometry, layout.block_size,
                                       covered.ctypes.data, counts.ctypes.data]  # fmt: skip
            enabled += 1
    if not enabled:
        return None
    table[_LIVE], table[_LAYERS], table[_TENSORS] = 1, layout.num_layers, n_tensors
    table[_IDS], table[_NIDS] = ids.ctypes.data, len(ids)
    table[_MISSING], table[_WRITING] = plan.missing.ctypes.data, plan.writing.ctypes.data
    return Lane(table, request, tag, session, lanes, keep)
