"""The decode side: accept senders, check every frame, place chunks where ``expect`` said.

Each connection has one reader thread. For a DATA frame it checks the header against
the request (known request, layer and tensor in range, rows inside the request, aligned,
the payload size the codec implies), receives the payload with ``recv_into`` into a
staging slot, verifies its CRC32C, and only then hands it to the placement
(``engine/placement.py``), which writes it into the destination blocks. Data for a
request nobody has ``expect``-ed yet waits in its slot, within the parking bounds; the
sender gets no credit back for it, so it slows down rather than overrun the staging
budget. A bad frame closes its connection (logged); other connections and senders carry on.

What a request goes through (expected, announced, bound, complete, failed...) is the
sans-I/O table of ``engine/requests.py``; this module feeds it events under one lock and
carries out the actions it returns after releasing the lock.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import kvwire.codec
from kvwire import scatter
from kvwire.codec import ChunkSpec, Codec
from kvwire.engine import lane, requests
from kvwire.engine.channel import Channel, server_handshake
from kvwire.engine.chunks import ChunkRef, encoded_size, spec_of
from kvwire.engine.common import (
    LogLimit,
    check_checksum,
    check_codec_fits,
    check_count,
    check_seconds,
    check_transport,
    layout_summary,
    request_arguments,
    secret_bytes,
)
from kvwire.engine.placement import Destination, GpuPlacement, HostPlacement, Placement, gpu_kernels
from kvwire.engine.requests import Placement as Arrival
from kvwire.engine.requests import Request, RequestTable
from kvwire.errors import KvwireError, PeerLost, ProtocolError, TransferError, TransferTimeout
from kvwire.layout import KVLayout, TensorParallel
from kvwire.proto import Authenticated, Begin, Cancel, Data, Header, ServerConnection
from kvwire.proto.frames import DATA_RAW, HEADER_SIZE, FrameType
from kvwire.proto.request import PartSpec, carries
from kvwire.sharding import Part, check_part, tp_of
from kvwire.staging import UNIT as STAGING_UNIT
from kvwire.staging import Slot, StagingPool, StagingTimeout
from kvwire.threads import Thread
from kvwire.transport import ByteStream
from kvwire.transport.tcp import SocketOptions, TcpListener, TcpStream, parse_address

if TYPE_CHECKING:
    from kvwire.transport.ucx import UcxListener

log = logging.getLogger("kvwire.receiver")

DEFAULT_STAGING_BYTES = 256 << 20
DEFAULT_SLOT_BYTES = (4 << 20) + (64 << 10)  # a 4 MiB chunk plus the lz4 stage's worst-case headers
# Over UCX each of a sender's sends is one message: DATA frames whose payloads fit its
# credit (the window), gathered on short paths, each perhaps behind its BEGIN. Headers and
# BEGINs on top of the window's payload bytes take at most this much.
UCX_FRAMING_SLACK = 1 << 20
REAPER_PERIOD_S = 0.05
# A request that ended while a payload was being received into its rows waits for that
# receive; one that stalls this long (a sender stopped inside a frame) has its
# connection closed, so that wait() never returns while its rows may still be written.
DRAIN_LIMIT_S = 2.0
# A payload of a request nobody has expected yet holds a share of the parking bounds while
# it is read; a sender that stops inside it (a byte, then nothing) would hold that share for
# good, and enough such connections would park every other sender. Its connection is
# closed if the read takes longer than this (a 4 MiB chunk needs it only below ~1 Mbit/s).
PARKED_READ_LIMIT_S = 30.0
OUTCOMES_KEPT = 64  # per connection (see _RConn.outcomes)
MAX_WINDOW_BYTES = (1 << 32) - 1  # credit returned comes in batches of a quarter window, each a 32-bit count
# What a peer can make this side hold is bounded; these are the defaults (docs/api.md).
DEFAULT_MAX_PENDING_CONNECTIONS = 64  # not yet authenticated: each holds a thread until its deadline
DEFAULT_MAX_CONNECTIONS = 1024  # authenticated: each holds a reader thread
DEFAULT_MAX_REQUESTS_PER_SESSION = 1024  # requests a sender may have open at once
# A reader waits this long at most for staging room; slots are held only while a chunk
# is placed (parked data has its own, smaller bound), so this is only ever hit by a bug
# or a machine too overloaded to place a chunk in that time.
STAGING_WAIT_S = 30.0
SKIP_BUFFER_BYTES = 256 << 10  # a payload read past (a late frame) goes through this much at a time


@dataclass(eq=False)
class _Session:
    """One sender (its connections share a session id), with what it parks here."""

    id: str
    peer: str
    codec: Codec
    tp: TensorParallel  # the sender's tensor parallelism (which heads it holds)
    block_size: int  # the sender's block size: its chunks are cut on it, int4 keys grouped by it
    conns: list = field(default_factory=list)
    parked_bytes: int = 0  # staging held by its chunks that wait for an expect
    lanes: dict = field(default_factory=dict)  # tag -> the receive lane of its bound request (kvwire/engine/lane.py)
    last_data: _RConn | None = None  # the connection that last carried a payload

    def any_conn(self, besides: _RConn | None = None) -> _RConn | None:
        return next((c for c in self.conns if c.alive and c is not besides), None)

    def reply_conns(self, besides: _RConn | None = None) -> list[_RConn]:
        """Where an ACK or CANCEL goes (never on ``besides``): the oldest live
        connection, which the sender reads without waiting behind a send, and also the one
        that last carried a payload, which the sender was writing to then. The oldest alone
        is not enough: one the sender has given up on may still look alive from here (a
        middlebox that never passes its close on). The sender ignores the repeat."""
        first, last = self.any_conn(besides), self.last_data
        conns = [first] if first is not None else []
        if last is not None and last.alive and last is not first and last is not besides:
            conns.append(last)
        return conns

    @property
    def who(self) -> str:
        """How errors name this sender."""
        if self.tp.size == 1:
            return f"the sender at {self.peer}"
        return f"the sender at {self.peer} (tensor-parallel rank {self.tp.rank} of {self.tp.size})"


@dataclass(eq=False)
class _RConn:
    channel: Channel
    host: str  # the peer's address without the port: pending connections are capped per host
    handshake_deadline: float
    session: _Session | None = None
    alive: bool = True
    cut: str | None = None  # why this side closed it (the handshake deadline passed)
    parked_read_until: float | None = None  # reading a payload that holds parking: the time it must end by
    owed: int = 0  # payload bytes released but not yet returned to the sender as credit
    owed_lock: threading.Lock = field(default_factory=threading.Lock)
    head: bytearray = field(default_factory=lambda: bytearray(HEADER_SIZE))  # the receive lane's header
    bounce: bytearray | None = None  # the receive lane's bounce buffer (lane.bounce_buffer), made on first use
    # The request whose rows this connection's reader is receiving a payload into (Python's
    # path), and the lane whose claimed rows it is (the receive lane sets and clears it).
    writing_into: Any = None
    lane_claim: Any = None
    # The last outcomes (ACK, CANCEL) sent on this connection: sent again on another of the
    # session's if this one breaks, as the bytes may have died with it.
    outcomes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=OUTCOMES_KEPT))

    @property
    def stream(self) -> ByteStream:
        return self.channel.stream

    @property
    def proto(self) -> ServerConnection:
        proto = self.channel.proto
        assert isinstance(proto, ServerConnection)
        return proto

    @property
    def joined(self) -> _Session:
        """The session: frames after the handshake are read only once it is joined."""
        assert self.session is not None
        return self.session

    def owe(self, nbytes: int, batch: int) -> None:
        """Add released bytes; send a CREDIT frame once ``batch`` bytes are owed (queued:
        sending never waits for the peer).

        Batching cuts the wake-ups of the sender's ack thread several times over; the
        sender keeps ``window - batch`` >= one chunk of credit, so it never waits on a
        batch that cannot fill."""
        if not self.alive:
            return
        with self.owed_lock:
            self.owed += nbytes
            if self.owed < batch:
                return
            owed, self.owed = self.owed, 0
        self.send(self.proto.credit(owed))

    def send(self, frame: bytes) -> bool:
        """Queue a control frame; never waits for the peer (safe under the receiver's lock)."""
        try:
            self.stream.send_control(frame)
            return True
        except PeerLost:
            return False


class _DeviceSlot:
    """A payload received straight into GPU memory (UCX with CUDA): held like a staging
    slot until it is placed. Its memory is bounded by the credit window, as slots are."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor: torch.Tensor | None = tensor

    def release(self) -> None:
        self.tensor = None


@dataclass(eq=False)
class _Chunk:
    """A received chunk: where its payload is, and what it holds of the receiver's bounds."""

    ref: ChunkRef | None
    spec: ChunkSpec | None
    slot: Slot | _DeviceSlot
    length: int
    conn: _RConn
    parked_bytes: int = 0  # counted against the parking bounds until placed or dropped


class ReceiveHandle:
    """Where one request lands, and how to wait for it. Create with :meth:`Receiver.expect`."""

    def __init__(self, receiver: Receiver, request_id: str, dest: Destination, deadline: float) -> None:
        self._receiver = receiver
        self.request_id = request_id
        self.destination = dest
        self.deadline = deadline
        self._request: Request | None = None
        self._error: TransferError | None = None
        self._finished = False
        self.t_expected = time.monotonic()
        self.t_done: float | None = None
        self.wire_bytes = 0
        self.logical_bytes = 0
        self.chunks = 0
        self.duplicates = 0
        self.layer_done_at: dict[int, float] = {}

    @property
    def selection(self):
        return self.destination.selection

    @property
    def states(self) -> dict[int, torch.Tensor]:
        return self.destination.states

    def wait_layer(self, layer: int, timeout: float | None = None) -> None:
        """Block until every tensor of ``layer`` is in place (or raise the transfer's error)."""
        if not 0 <= layer < self._receiver.layout.num_layers:
            raise ValueError(f"layer: {layer} out of range for {self._receiver.layout.num_layers} layers")
        timeout = check_seconds(timeout, "timeout", optional=True, zero=True)
        self._receiver._wait(self, lambda: self._layer_ready(layer), timeout)

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the whole request is in place; return its statistics."""
        timeout = check_seconds(timeout, "timeout", optional=True, zero=True)
        self._receiver._wait(self, lambda: self._finished, timeout)
        return self.stats()

    def done(self) -> bool:
        """True once the request ended, successfully or not. Never blocks, never cancels:
        the way to poll (a short ``wait(timeout)`` raises ``TransferTimeout`` instead)."""
        return self._finished

    def ok(self) -> bool:
        return self._finished and self._error is None

    def cancel(self, reason: str = "cancelled by the receiver") -> None:
        """Stop receiving; the sender's ``finish`` raises ``Cancelled``."""
        self._receiver._cancel(self, reason)

    @property
    def t_first_byte(self) -> float | None:
        """When the request's first DATA header was read (before this expect, if its data
        came first and parked), or None."""
        return None if self._request is None else self._request.first_byte

    def stats(self) -> dict:
        return {
            "request_id": self.request_id,
            "num_tokens": self.selection.num_tokens,
            "wire_bytes": self.wire_bytes,
            "logical_bytes": self.logical_bytes,
            "chunks": self.chunks,
            "duplicates": self.duplicates,
            "ok": self.ok(),
            "error": None if self._error is None else str(self._error),
            "receive_ms": None if self.t_done is None or self.t_first_byte is None
            else (self.t_done - self.t_first_byte) * 1e3,
        }  # fmt: skip

    def _layer_ready(self, layer: int) -> bool:
        return self._finished or (self._request is not None and self._request.layer_ready(layer))

    def _end(self, error: TransferError | None, at: float | None = None) -> None:
        """(receiver lock held) The request ended (at ``at``, default now): wake whoever waits for it."""
        if self._finished:
            return
        self._error = error
        self._finished = True
        self.t_done = time.monotonic() if at is None else at


class Receiver:
    """Accepts :class:`~kvwire.Sender` connections and places their KV into ``kv_caches``.

    Args:
        layout: the KV layout; senders with another layout are refused at handshake.
        listen: ``"host:port"`` or ``(host, port)``; port 0 picks a free port (see ``address``).
        secret: shared secret (bytes or str, >= 8 bytes); default ``$KVWIRE_SECRET``.
        kv_caches: this side's paged caches, one dict per layer.
        staging_bytes: host memory for payloads between the network and the caches; data
            that arrives before ``expect`` waits here.
        slot_bytes: the largest payload a sender may put in one frame.
        window_bytes: credit per connection: payload bytes a sender may have outstanding
            (default: an eighth of ``staging_bytes``, at least one slot, at most 4 GiB).
        codecs: codec names accepted (default: all).
        unclaimed_timeout: seconds a request may wait for ``expect`` before it is refused.
        tls: an ``ssl.SSLContext`` (server side).
        handshake_timeout: seconds a new connection has to finish its whole handshake
            (TLS included); past it, the connection is closed.
        transport: ``"tcp"`` (default) or ``"ucx"`` (through UCXX).
        max_pending_connections: connections not yet authenticated, at most (a quarter
            of them from one host); beyond it new ones are closed at once and counted.
        max_connections: authenticated connections, at most.
        max_requests_per_session: requests one sender may have open at once; a BEGIN
            beyond it is refused (the sender's transfer fails with the reason).
        max_parked_bytes: staging that data for requests not yet ``expect``-ed may hold,
            over all senders (default: half of ``staging_bytes``).
        max_parked_bytes_per_peer: the same for one sender (default: an eighth of
            ``staging_bytes``); past it, that sender's connection is read no further until
            its data is claimed or refused: other senders are unaffected.
        check_terms: called with each sender's ``terms`` (a dict, empty if it stated none)
            after it authenticated; returns None to accept, or the reason to refuse it
            (the sender's constructor raises ``LayoutMismatch`` with that reason).
        checksum: how DATA payloads are checked: ``"crc32c"`` or ``"none"``; default
            ``"none"`` with TLS (its AEAD authenticates every byte already), else
            ``"crc32c"``. Both sides must agree (a mismatch is refused at the handshake).
        kernels: a CUDA kernel backend to decode with (``kvwire.cuda.kernels``); default:
            the GPU's, when the caches are on one. Tests pass the kernels' host emulation
            here to run the GPU data path on CPU tensors.
        receive_lane: take the raw frames that land in place in host caches in the
            compiled receive loop (kvwire/engine/lane.py; TCP without TLS, the helper
            built), returning to Python only for what changes state; False: every frame
            through the Python loop (for comparisons). Default True.

    Example::

        receiver = kvwire.Receiver(layout, listen="0.0.0.0:7400", secret=key, kv_caches=caches)
        h = receiver.expect("req-1", block_ids=[0, 1, 5], num_tokens=40)
        h.wait_layer(0)      # layer 0 is usable
        h.wait(timeout=10)   # every layer is
    """

    def __init__(
        self,
        layout: KVLayout,
        listen: str | tuple[str, int] = ("127.0.0.1", 0),
        *,
        secret: bytes | str | None = None,
        kv_caches: Sequence[Mapping[str, torch.Tensor]],
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        window_bytes: int | None = None,
        codecs: Sequence[str] | None = None,
        unclaimed_timeout: float = 60.0,
        tls: ssl.SSLContext | None = None,
        socket_options: SocketOptions | None = None,
        handshake_timeout: float = 10.0,
        transport: str = "tcp",
        max_pending_connections: int = DEFAULT_MAX_PENDING_CONNECTIONS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_requests_per_session: int = DEFAULT_MAX_REQUESTS_PER_SESSION,
        max_parked_bytes: int | None = None,
        max_parked_bytes_per_peer: int | None = None,
        check_terms: Callable[[dict], str | None] | None = None,
        kernels=None,
        checksum: str | None = None,
        receive_lane: bool = True,
    ) -> None:
        check_transport(transport, tls)
        self.checksum = check_checksum(checksum, tls)
        if check_terms is not None and not callable(check_terms):
            raise TypeError(f"check_terms: expected a callable, got {type(check_terms).__name__}")
        self._check_terms = check_terms
        check_seconds(unclaimed_timeout, "unclaimed_timeout")
        check_seconds(handshake_timeout, "handshake_timeout")
        self._max_pending = check_count(max_pending_connections, "max_pending_connections")
        self._max_pending_per_host = max(1, self._max_pending // 4)
        self._max_connections = check_count(max_connections, "max_connections")
        self._max_parked = check_count(
            staging_bytes // 2 if max_parked_bytes is None else max_parked_bytes, "max_parked_bytes"
        )
        self._max_parked_per_peer = check_count(
            staging_bytes // 8 if max_parked_bytes_per_peer is None else max_parked_bytes_per_peer,
            "max_parked_bytes_per_peer",
        )
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout: expected KVLayout, got {type(layout).__name__}")
        self.layout = layout
        self._secret = secret_bytes(secret)
        self._num_blocks = layout.check_caches(kv_caches)
        self._tp = tp_of(layout)
        self._has_kv = any(p.name != "kv" for layer in layout.layers for p in layer.paged)
        self._caches = [dict(c) for c in kv_caches]
        self._placement = self._choose_placement(kernels)
        if isinstance(self._placement, HostPlacement):  # raw payloads land as spans of the cache
            self._placement.spans = transport == "tcp" and tls is None and scatter.available()
        self._lanes = bool(receive_lane) and getattr(self._placement, "spans", False) and lane.available()
        self._accepted_codecs = None if codecs is None else {kvwire.codec.get(c).descriptor for c in codecs}
        self._pool = StagingPool(staging_bytes, slot_bytes)
        if window_bytes is None:
            self._window = min(max(slot_bytes, self._pool.budget_bytes // 8), MAX_WINDOW_BYTES)
        else:
            self._window = check_count(window_bytes, "window_bytes")
        if self._window < slot_bytes:
            raise ValueError(f"window_bytes: {self._window} is less than one slot ({slot_bytes})")
        if self._window > MAX_WINDOW_BYTES:
            raise ValueError(f"window_bytes: at most {MAX_WINDOW_BYTES} (CREDIT frames count in 32 bits), "
                             f"got {self._window}")  # fmt: skip
        self._slot_bytes = slot_bytes
        self._credit_batch = min(self._window // 4, self._window - slot_bytes)
        self._unclaimed_timeout = unclaimed_timeout
        self._handshake_timeout = handshake_timeout
        self._codecs: dict[str, kvwire.codec.Codec] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._table = RequestTable(
            layout,
            capacity_tokens=self._num_blocks * layout.block_size,
            max_requests_per_session=check_count(max_requests_per_session, "max_requests_per_session"),
        )
        self._sessions: dict[str, _Session] = {}
        self._conns: list[_RConn] = []
        self._pending: list[_RConn] = []  # accepted, handshake not finished
        self._parked_bytes = 0
        # Requests that ended with payloads still being received into their rows, by id:
        # (request, since when); their handles end once those receives do.
        self._draining: dict[int, tuple[Request, float]] = {}
        self._rejected: collections.deque = collections.deque(maxlen=32)
        self._log_limit = LogLimit(log)
        self._counters: collections.Counter[str] = collections.Counter(
            {k: 0 for k in ("frames", "lane_frames", "lane_credits", "wire_bytes", "protocol_errors",
                            "rejected_connections", "refused_connections", "late_frames", "parking_waits",
                            "device_payloads")}
        )  # fmt: skip
        self._closed = False
        self._ucx_cuda: bool | None = None  # whether UCX here moves GPU memory (asked once)
        self.transport = transport
        self._listener: TcpListener | UcxListener
        if transport == "ucx":
            from kvwire.transport.ucx import UcxListener

            self._listener = UcxListener(parse_address(listen, "listen"))
        else:
            self._listener = TcpListener(parse_address(listen, "listen"), socket_options or SocketOptions(), tls)
        self._threads = [
            Thread(self._accept_loop, "kvwire-accept"),
            Thread(self._reap_loop, "kvwire-reaper"),
        ]
        for t in self._threads:
            t.start()

    def _choose_placement(self, kernels) -> Placement:
        """The data path for these caches, chosen once: the CPU's, or the GPU's (kernels
        per codec, the CPU reference for codecs without them)."""
        first = next((t for c in self._caches for t in c.values()), None)
        device = first.device if first is not None else torch.device("cpu")
        if device.type != "cuda" and kernels is None:
            return HostPlacement(self.layout, self._caches)
        side = torch.cuda.Stream(device) if device.type == "cuda" else None
        dtype = self.layout.dtype
        if kernels is not None:
            from kvwire.cuda import kernels as launchers

            return GpuPlacement(self.layout, self._caches, device, side,
                                lambda codec: kernels if launchers.supports(codec, dtype) else None)  # fmt: skip
        return GpuPlacement(self.layout, self._caches, device, side, lambda codec: gpu_kernels(device, codec, dtype))

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` this receiver listens on."""
        return self._listener.address

    # -- the public surface --------------------------------------------------------------
    def expect(
        self,
        request_id: str | int,
        block_ids: Sequence[int] | torch.Tensor,
        num_tokens: int,
        *,
        states: Mapping[int, torch.Tensor] | None = None,
        deadline: float = 60.0,
    ) -> ReceiveHandle:
        """Name where request ``request_id`` lands: ``num_tokens`` tokens into ``block_ids``
        (in token order; the last block may be partial) and, for layers with a state, into
        ``states[layer]``. Data that arrived earlier is placed now. ``deadline``: seconds
        from now within which the request must complete, else ``TransferTimeout``."""
        if self._closed:
            raise ValueError("expect: the receiver is closed")
        request_id, sel = request_arguments(
            request_id, block_ids, num_tokens, deadline, self.layout.block_size, self._num_blocks
        )
        self.layout.check_states(states)
        for i, t in (states or {}).items():
            if not t.is_contiguous():
                raise ValueError(f"states[{i}]: must be contiguous")
        handle = ReceiveHandle(self, request_id, Destination(sel, dict(states or {})), time.monotonic() + deadline)
        with self._lock:
            if self._closed:  # checked again under the lock: close() may have run meanwhile
                raise ValueError("expect: the receiver is closed")
            request, actions = self._table.expect(request_id, handle, sel.num_tokens, handle.deadline)
            handle._request = request
            self._run_locked(actions)
            self._cond.notify_all()  # a reader may wait for parking room for this request's sender
        self._run(actions)
        return handle

    def stats(self) -> dict:
        with self._lock:
            conns = [c.stream.stats() | {"alive": c.alive} for c in self._conns if c.alive]
            census = self._table.census()
            return {
                "connections": conns,
                "sessions": len(self._sessions),
                "pending_connections": len(self._pending),
                "parked_bytes": self._parked_bytes,
                "pending_expect": census["expected"],
                "staging": self._pool.stats(),
                # raw host payloads land as spans of the cache (kvwire._scatter), or through
                # views of it, and chunks of some heads of each token through a staging copy
                "spans": bool(getattr(self._placement, "spans", False)),
                "rejected": list(self._rejected),
                **dict(self._counters),
                **dict(self._table.counters),
            }

    def census(self) -> dict:
        """How many per-request records this receiver holds now: a diagnostic for leak
        checks (every count returns to zero once requests end, ``cancelled_ids`` and
        ``ended_tags`` are bounded memories)."""
        with self._lock:
            return self._table.census() | {
                "parked_bytes": self._parked_bytes,
                "sessions": len(self._sessions),
                "lanes": sum(len(s.lanes) for s in self._sessions.values()),
                "connections": len(self._conns),
                "pending_connections": len(self._pending),
            }

    def close(self) -> None:
        """Stop listening, close every connection; open requests fail with ``Cancelled``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            actions = self._table.close()
            self._run_locked(actions)
            conns = list(self._conns) + list(self._pending)
            self._cond.notify_all()
        self._run(actions)
        self._listener.close()
        for c in conns:
            try:
                c.stream.flush_control()  # control frames queued behind a busy writer, if they fit now
            except PeerLost:
                pass
            c.stream.close()
        self._pool.close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- connections ---------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                stream = self._listener.accept()
            except OSError:
                return  # the listener was closed
            conn = self._admit(stream)
            if conn is not None:
                Thread(self._serve, "kvwire-recv", (conn,)).start()

    def _admit(self, stream: ByteStream) -> _RConn | None:
        """Register a new connection, or close it at once when the caps are reached: a
        flood of idle sockets costs a counter, not a thread each."""
        host = stream.peer.rpartition(":")[0] or stream.peer
        proto = ServerConnection(
            self._secret,
            fingerprint=self.layout.model_fingerprint(),
            layout=layout_summary(self.layout),
            check_codec=self._check_codec,
            window=self._window,
            max_payload=self._slot_bytes,
            device_payloads=self._takes_device_payloads if self.transport == "ucx" else None,
            check_terms=self._check_terms,
            checksum=self.checksum,
            tp=(self._tp.rank, self._tp.size, self._tp.kv_heads),
            block_size=self.layout.block_size,
            check_shard=self._check_shard,
        )
        conn = _RConn(Channel(stream, proto), host, time.monotonic() + self._handshake_timeout)
        with self._lock:
            from_host = sum(1 for c in self._pending if c.host == host)
            if self._closed:
                why = "the receiver is closed"
            elif len(self._pending) >= self._max_pending:
                why = f"{self._max_pending} connections are already in their handshake"
            elif from_host >= self._max_pending_per_host:
                why = f"{from_host} connections from {host} are already in their handshake"
            elif len(self._conns) >= self._max_connections:
                why = f"{self._max_connections} connections are already open"
            else:
                self._pending.append(conn)
                return conn
            self._counters["refused_connections"] += 1
        log.debug("refused a connection from %s: %s", stream.peer, why)
        stream.close()
        return None

    def _check_shard(self, hello) -> str | None:
        """Why a sender's tensor parallelism cannot pair with this receiver's, or None (the
        model itself is checked by its fingerprint)."""
        rank, size, kv_heads = hello.tp
        try:
            TensorParallel(rank, size, kv_heads or self._tp.kv_heads)
        except ValueError as exc:
            return f"the sender's tensor parallelism: {exc}"
        if kv_heads and kv_heads != self._tp.kv_heads:
            return f"the sender's model has {kv_heads} KV heads, this receiver's {self._tp.kv_heads}"
        if hello.block_size <= 0:
            return f"the sender's block size {hello.block_size}"
        return None

    def _check_codec(self, descriptor: str) -> str | None:
        try:
            codec = kvwire.codec.get(descriptor)
            codec.check_dtype(self.layout.dtype)
            check_codec_fits(codec, self.layout)
        except ValueError as exc:
            return str(exc)
        if codec.descriptor != descriptor:  # one spelling per codec: the receiver keeps codecs by it
            return f"{descriptor!r} is spelt {codec.descriptor!r} on the wire"
        if self._accepted_codecs is not None and codec.descriptor not in self._accepted_codecs:
            return f"accepted codecs are {sorted(self._accepted_codecs)}"
        return None

    def _serve(self, conn: _RConn) -> None:
        stream, proto = conn.stream, conn.proto
        try:
            # The whole handshake (TLS included) has one deadline, enforced by the reaper,
            # which closes the stream when it passes: a peer sending a byte now and then
            # cannot hold the connection (each read's own timeout alone would not stop it).
            self._listener.finish_accept(stream, self._handshake_timeout)  # type: ignore[arg-type]
            stream.settimeout(self._handshake_timeout)
            server_handshake(stream, proto, lambda event: self._join_session(conn, event))
            stream.device_payloads = proto.device_payloads
            if hasattr(stream, "max_message"):  # UCX: a message holds what one send of the sender holds
                stream.max_message = self._window + UCX_FRAMING_SLACK
            stream.settimeout(None)
            lanes = self._lanes and not proto.device_payloads
            while True:
                self._read_frame(conn, self._lane_frames(conn) if lanes else None)
        except (KvwireError, OSError) as exc:
            out = proto.data_to_send()  # a REJECT explaining why, if the handshake failed
            if out:
                conn.send(out)
            if conn.session is None:
                self._reject(stream.peer, conn.cut or str(exc))
            elif not isinstance(exc, PeerLost):
                self._counters["protocol_errors"] += 1
                self._log_limit.warning("closing", "closing connection from %s: %s", stream.peer, exc)
        except Exception:  # out of memory, or a bug: said in kvwire's log, the connection closed below
            log.exception("closing connection from %s: its reader failed", stream.peer)
        finally:
            stream.close()
            self._connection_closed(conn)

    def _takes_device_payloads(self, descriptor: str) -> bool:
        """Whether this receiver takes ``codec``'s payloads in GPU memory: GPU caches, kernels
        for the codec, no host-side lz4 stage, and a UCX with CUDA transports."""
        if not self._placement.takes_device_payloads(kvwire.codec.get(descriptor)):
            return False
        if self._ucx_cuda is None:
            from kvwire.transport import ucx

            self._ucx_cuda = ucx.moves_device_memory()
        return self._ucx_cuda

    def _reject(self, peer: str | None, reason: str) -> None:
        """Count and record a failed handshake; log it, at most once a second (a flood of
        bad connections must not become a flood of log lines)."""
        with self._lock:
            self._counters["rejected_connections"] += 1
            self._rejected.append({"peer": peer, "reason": reason, "time": time.time()})
        self._log_limit.warning("connection", "refused a connection from %s: %s", peer or "?", reason)

    def _join_session(self, conn: _RConn, event: Authenticated) -> None:
        hello = event.hello
        for descriptor in hello.session_codecs:
            self._codecs.setdefault(descriptor, kvwire.codec.get(descriptor))
        with self._lock:
            if conn.cut is not None or self._closed:
                raise PeerLost(conn.cut or "the receiver is closed")
            if len(self._conns) >= self._max_connections:
                raise ProtocolError(f"{self._max_connections} connections are already open")
            session = self._sessions.get(hello.session)
            if session is None:
                rank, size, kv_heads = hello.tp
                tp = TensorParallel(rank, size, kv_heads or self._tp.kv_heads)
                session = _Session(hello.session, conn.stream.peer, self._codecs[hello.codec], tp, hello.block_size)
                self._sessions[hello.session] = session
            session.conns.append(conn)
            session.codec = self._codecs[hello.codec]
            conn.session = session
            self._pending.remove(conn)
            self._conns.append(conn)

    def _connection_closed(self, conn: _RConn) -> None:
        actions: list = []
        with self._lock:
            conn.alive = False
            if conn in self._pending:
                self._pending.remove(conn)
            if conn in self._conns:
                self._conns.remove(conn)
            session = conn.session
            if session is not None:  # a sender's connections come and go for as long as it runs
                if conn in session.conns:
                    session.conns.remove(conn)
                if session.last_data is conn:
                    session.last_data = None
            others = session.reply_conns() if session is not None else []
            for other in others:  # outcomes sent here may have died with it: the sender ignores repeats
                for frame in conn.outcomes:
                    other.send(frame)
            conn.outcomes.clear()
            if session is None or others:
                return
            self._sessions.pop(session.id, None)
            actions = self._table.session_lost(session.id, session.who)
            self._run_locked(actions)
        self._run(actions)

    # -- frames --------------------------------------------------------------------------
    def _read_frame(self, conn: _RConn, head: bytes | None = None) -> None:
        """One frame: its header read here, or already read (``head``) by the receive lane."""
        header, n = conn.channel.read_header() if head is None else conn.channel.take_header(head)
        if header.type != FrameType.DATA:
            for event in conn.channel.read_control(header, n):
                if isinstance(event, Begin | Cancel):
                    self._on_event(conn, event)
            return
        if conn.session is not None:
            conn.session.last_data = conn
        self._read_data(conn, header, n)

    def _lane_frames(self, conn: _RConn) -> bytes:
        """Let the receive lane take frames until one needs Python; that frame's header.
        The lane returns with a chunk of its own only for what changes state, finished here
        as ``_receive_in_place`` finishes one."""
        stream, session, batch = conn.stream, conn.joined, self._credit_batch
        assert isinstance(stream, TcpStream)  # lanes are for plain TCP only
        checked = conn.proto.checksum != "none"
        max_payload = conn.proto.max_payload
        if conn.bounce is None:
            conn.bounce = lane.bounce_buffer()
        bounce, head, lanes, counters = conn.bounce, conn.head, session.lanes, self._counters
        while True:
            fd = stream.hold()  # the socket's until the call returns, however it is closed meanwhile
            try:
                status, lane_of, received, owed, error = lane.receive(
                    fd, head, lanes, self._lock, batch, max_payload, checked, counters, stream, conn, bounce
                )
            finally:
                stream.release()
            stream.bytes_received += received
            if received:
                session.last_data = conn
            if owed:
                conn.owe(owed, batch)
            if status == lane.CREDIT:
                continue
            if status == lane.PYTHON:
                return bytes(conn.head)
            lost: BaseException | None = None
            if status == lane.FAILED:  # a Python error in the lane: the frame's claim is undone below
                lost = error
            elif status == lane.LOST:
                why = f"lost while receiving: {os.strerror(error)}" if error else "closed by the peer"
                lost = PeerLost(f"connection to {stream.peer} {why}")
                if lane_of is None:  # between frames: nothing of a request to undo
                    raise lost
            assert lane_of is not None  # every other status names the lane of the frame in head
            header, _ = conn.channel.take_header(bytes(conn.head))
            request = lane_of.request  # perhaps no longer bound: its chunk is finished all the same
            if status == lane.HANDOFF:
                self._written_in_place(request, header.layer, None)
                continue
            with self._lock:  # a checksum mismatch, the stream broke inside the payload, or a Python error
                actions = self._table.unwrite(request, session.id, header.layer, header.tensor, header.start,
                                              header.count)  # fmt: skip
                self._run_locked(actions)
            self._run(actions)
            if lost is not None:
                self._ask_elsewhere(conn, header, request)
                raise lost
            self._checksum_failed(conn, header, request)

    def _read_data(self, conn: _RConn, header: Header, n: int) -> None:
        """A DATA frame: its header checked, its payload received into the destination rows
        when it can go there as it is, else into staging; verified before it counts."""
        checked = self._check_data(conn, header)
        if checked is None:  # a request that ended: read the payload past and give the credit back
            self._skip_payload(conn, header, n)
            return
        request, ref, spec = checked
        codec = ref.codec(request.codec_of(conn.joined.id))
        with self._lock:  # the receive lane counts its frames under the lock too
            self._counters["frames"] += 1
            self._counters["wire_bytes"] += n
        if self._receive_in_place(conn, header, n, request, ref, spec, codec):
            return
        parked_bytes = self._reserve_parking(conn, request, n)
        if parked_bytes:
            conn.parked_read_until = time.monotonic() + PARKED_READ_LIMIT_S  # the reaper closes it after
        try:
            slot, ok = self._receive_payload(conn, header, n, codec)
        except BaseException:
            with self._lock:
                self._unpark_locked(conn.joined, parked_bytes)
            raise
        finally:
            conn.parked_read_until = None
        chunk = _Chunk(ref, spec, slot, n, conn, parked_bytes)
        if not ok:
            self._release(chunk)
            self._checksum_failed(conn, header, request)
            return
        with self._lock:
            arrival = self._table.arrived(request, chunk)
            if arrival is Arrival.PARK:
                return  # it waits, counted, until an expect claims it or the request ends
            self._release_parking_locked(chunk)
        if arrival is Arrival.DROP:
            self._release(chunk)
        else:
            self._place(request, chunk)

    def _receive_in_place(self, conn: _RConn, header: Header, n: int, request: Request, ref: ChunkRef,
                          spec: ChunkSpec, codec: Codec) -> bool:  # fmt: skip
        """Receive a payload straight into its destination rows, where the placement can
        take it as it is (raw into contiguous host memory): no staging, no copy. The rows
        belong to this request alone until it ends; they count as arrived only once the
        checksum passed. False when the payload must go through staging instead."""
        # Bound first: an expect() that did not bind (fewer tokens than the BEGIN, as a decline
        # is) also sets a handle, whose rows this chunk's are not. Once bound, the handle and
        # its rows are fixed; if the request ends meanwhile, start_write says so.
        if request.state is not requests.State.BOUND or n != spec.raw_nbytes:
            return False
        handle = request.handle  # set once by expect(), with the destination it names
        assert handle is not None
        views = self._placement.destination_views(codec, ref, handle.destination)  # outside the lock
        if views is None:
            return False
        with self._lock:
            write = self._table.start_write(request, conn.joined.id, ref.layer, ref.tensor, ref.start, ref.count)
            if write is None:  # not bound (yet, or any more): through staging, which parks or drops it
                return False
            if write is False:  # an exact repeat: read it past
                handle.duplicates += 1
        if write is False:
            self._skip_payload(conn, header, n, late=False)
            return True
        conn.writing_into = request
        try:
            conn.stream.recv_into_views(views)
        except BaseException:
            with self._lock:
                actions = self._table.unwrite(request, conn.joined.id, ref.layer, ref.tensor, ref.start, ref.count)
                self._run_locked(actions)
            self._run(actions)
            self._ask_elsewhere(conn, header, request)
            raise
        finally:
            conn.writing_into = None
        ok = conn.proto.verify_data(header, views)
        conn.owe(n, self._credit_batch)
        if ok:
            lane_ok = self._lanes and request.codec_of(conn.joined.id).name == "raw"  # every frame of it is raw
            self._written_in_place(request, ref.layer, n, lane_ok, conn.joined, header.tag)
            return True
        with self._lock:
            actions = self._table.unwrite(request, conn.joined.id, ref.layer, ref.tensor, ref.start, ref.count)
            self._run_locked(actions)
        self._run(actions)
        self._checksum_failed(conn, header, request)
        return True

    def _written_in_place(self, request: Request, layer: int, nbytes: int | None, lane_ok: bool = False,
                          session: _Session | None = None, tag: int = 0) -> None:  # fmt: skip
        """A raw chunk of ``nbytes`` received in place and verified (None: counted by the
        receive lane already): its write is done. With ``session``, the first such chunk of
        this sender's part opens the part's receive lane."""
        with self._lock:
            if nbytes is not None:  # under the lock, as the lane counts: the two may run at once
                handle = request.handle
                handle.chunks += 1
                handle.wire_bytes += nbytes
                handle.logical_bytes += nbytes
            actions, layer_ready = self._table.written(request, layer, None)
            if layer_ready:
                request.handle.layer_done_at.setdefault(layer, time.monotonic())
                self._cond.notify_all()
            if session is not None and lane_ok and tag not in session.lanes and request.state is requests.State.BOUND:
                self._open_lane(request, session, tag)
            self._run_locked(actions)
        self._run(actions)

    def _open_lane(self, request: Request, session: _Session, tag: int) -> None:
        """(lock held) The receive lane of ``session``'s part of a bound request."""
        assert request.plan is not None and request.handle is not None
        opened = lane.build(request, request.part_of(session.id), self._placement, tag, session.id, session.lanes)
        if opened is not None:
            session.lanes[tag] = opened
            request.lanes.append(opened)

    def _ask_elsewhere(self, conn: _RConn, header: Header, request: Request) -> None:
        """A payload received in place broke off with its connection: its rows are missing
        again. The sender sends what a lost connection carried again on its others, but a
        copy that came while this one was still being received was read past as a repeat;
        so the chunk is asked for on another of the sender's connections, if it has one (a
        copy that arrives twice is read past)."""
        with self._lock:
            bound = request.state is requests.State.BOUND
            # One connection (each NACK is a resend): the one the sender last wrote to, else the oldest.
            others = conn.joined.reply_conns(besides=conn) if bound else []
        if others:
            other = others[-1]
            other.send(other.proto.nack(header, "its connection broke inside the payload"))

    def _checksum_failed(self, conn: _RConn, header: Header, request: Request) -> None:
        """Ask for a chunk again, or fail its request once too many have failed."""
        where = f"layer {header.layer} tensor {header.tensor} rows {header.start}..{header.start + header.count}"
        self._log_limit.warning("checksum", "payload checksum mismatch from %s (%s of %r): asking for it again",
                                conn.stream.peer, where, request.request_id)  # fmt: skip
        with self._lock:  # (a request of several senders: the error names the one whose payload it was)
            actions, again = self._table.checksum_failed(request, f"{where}, from {conn.joined.who}", conn.joined.id)
            self._run_locked(actions)
        self._run(actions)
        if again:
            conn.send(conn.proto.nack(header, f"payload checksum mismatch ({where})"))

    def _receive_payload(self, conn: _RConn, header: Header, n: int, codec: Codec) -> tuple[Slot | _DeviceSlot, bool]:
        """The payload, received where it will be used (staging, or GPU memory), and
        whether it passed its checksum: nothing is used before this passes."""
        if conn.proto.device_payloads:
            assert isinstance(self._placement, GpuPlacement)  # device payloads are agreed only then
            checked = conn.proto.checksum != "none"
            buffer, crc = self._placement.receive_device_payload(conn.stream, codec, n, checked)
            self._counters["device_payloads"] += 1
            return _DeviceSlot(buffer), conn.proto.verify_device_data(header, crc)
        slot = self._acquire(n)
        try:
            view = slot.view(n)
            conn.stream.recv_into_exact(view)
            events = conn.proto.on_payload(header, view)
            assert len(events) == 1 and isinstance(events[0], Data)
        except BaseException:
            slot.release()
            raise
        return slot, conn.proto.verify_data(header, [view])

    def _acquire(self, nbytes: int) -> Slot:
        try:
            return self._pool.acquire(nbytes, timeout=STAGING_WAIT_S)
        except StagingTimeout:
            raise TransferError(f"no staging room for {nbytes} bytes within {STAGING_WAIT_S:.0f} s") from None

    def _skip_payload(self, conn: _RConn, header: Header, n: int, late: bool = True) -> None:
        """Read a DATA payload past (a request that ended, an exact repeat) and drop it.
        Through a small buffer of its own, not staging: with staging taken by parked
        chunks, waiting for room would hold up everything behind it on this connection."""
        if late:
            self._counters["late_frames"] += 1
        if conn.proto.device_payloads:
            slot = self._receive_payload(conn, header, n, conn.joined.codec)[0]
            self._release(_Chunk(None, None, slot, n, conn))
            return
        scratch = memoryview(bytearray(min(n, SKIP_BUFFER_BYTES)))
        left = n
        while left:
            piece = scratch[: min(left, len(scratch))]
            conn.stream.recv_into_exact(piece)
            left -= len(piece)
        conn.owe(n, self._credit_batch)  # its window room comes back as a released chunk's

    def _check_data(self, conn: _RConn, header: Header) -> tuple[Request, ChunkRef, ChunkSpec] | None:
        """Everything about a DATA frame that can be checked before its payload is read.
        None for a frame of a request that ended (it is read and dropped)."""
        session = conn.joined
        request = self._table.find(session.id, header.tag)  # no lock round trip per frame
        if request is None:
            with self._lock:  # an ended tag, or one never begun (a ProtocolError)
                request = self._table.lookup(session.id, header.tag)
            if request is None:
                return None
        if request.first_byte is None:  # its first DATA header: the first byte of its receive time
            request.first_byte = time.monotonic()
        assert request.plan is not None  # a request known by its tag has its plan
        t = request.plan.check(header.layer, header.tensor, header.start, header.count)
        part = request.part_of(session.id)
        if not carries(part, t):
            raise ProtocolError(f"DATA for layer {header.layer} {t.name!r}, which this sender did not announce")
        heads = t.heads if t.whole or part.heads == t.heads else (part.first_head, part.heads)
        ref = ChunkRef(header.layer, header.tensor, t.name, header.start, header.count, bool(header.flags & DATA_RAW),
                       None if isinstance(heads, int) else heads)  # fmt: skip
        codec = ref.codec(request.codec_of(session.id))
        # The chunk as the sender cut it: its heads, and its block size (int4 groups keys by it).
        spec = spec_of(header.count, t.heads if t.whole else part.heads, t.head_dim, self.layout.dtype, t.name,
                       session.block_size)  # fmt: skip
        size = encoded_size(codec, spec)
        if header.length > size or (not codec.variable_size and header.length != size):
            raise ProtocolError(
                f"DATA of {header.length} bytes for {header.count} rows of layer {header.layer} {t.name!r}; "
                f"{codec.descriptor} needs {'at most ' if codec.variable_size else ''}{size}"
            )
        if size > conn.proto.max_payload:  # a chunk a sender cuts fits a slot whatever lz4 makes of it
            raise ProtocolError(
                f"DATA for {header.count} rows of layer {header.layer} {t.name!r}: {codec.descriptor} codes them in "
                f"up to {size} bytes, more than the largest payload agreed ({conn.proto.max_payload})"
            )
        return request, ref, spec

    def _reserve_parking(self, conn: _RConn, request: Request, nbytes: int) -> int:
        """Bytes this chunk counts against the parking bounds (0 when its request is
        already expected). While this sender (or all senders together) park too much,
        wait: this connection is read no further, so this sender alone is slowed, until
        an ``expect`` claims its data or the unclaimed timeout refuses it."""
        session = conn.joined
        held = -(-nbytes // STAGING_UNIT) * STAGING_UNIT
        with self._lock:
            while request.state is requests.State.ANNOUNCED and not self._closed:
                over_peer = session.parked_bytes and session.parked_bytes + held > self._max_parked_per_peer
                over_all = self._parked_bytes and self._parked_bytes + held > self._max_parked
                if not over_peer and not over_all:
                    session.parked_bytes += held
                    self._parked_bytes += held
                    return held
                self._counters["parking_waits"] += 1
                remaining = request.created + self._unclaimed_timeout - time.monotonic()
                self._cond.wait(max(remaining, 0) + REAPER_PERIOD_S)  # the reaper refuses it at the deadline
            return 0

    def _on_event(self, conn: _RConn, event: Begin | Cancel) -> None:
        session = conn.joined
        with self._lock:
            if isinstance(event, Begin):
                hello = conn.proto.hello
                assert hello is not None  # frames are read once the handshake is done
                codec = self._codecs[hello.session_codecs[event.codec]]  # the index was checked against it
                part = self._part_of(session, event)
                unit = math.gcd(self.layout.block_size, session.block_size)
                actions = self._table.begin(session.id, event.tag, event.request_id, event.num_tokens,
                                            time.monotonic(), part, unit, codec)  # fmt: skip
                refused = [a for a in actions if isinstance(a, requests.SendAck) and not a.ok]
            else:
                actions = self._table.cancel_from_peer(session.id, event.tag, event.reason, session.who)
                refused = []
            self._run_locked(actions)
        for a in refused:
            self._log_limit.warning("request", "refused a request from %s: %s", session.peer, a.message)
        self._run(actions)

    def _part_of(self, session: _Session, begin: Begin) -> PartSpec:
        """What a sender's BEGIN says its chunks carry, checked against both shards."""
        held = self._tp.heads[1] if self._has_kv else 0
        if begin.heads is None:  # every head this side holds, from the heads the sender holds
            part = PartSpec(held, 0, begin.whole)
            first = self._tp.heads[0] - session.tp.heads[0]
            if held and not (0 <= first and first + held <= session.tp.heads[1]):
                raise ProtocolError(f"BEGIN: the sender does not hold all {held} heads this receiver holds")
            return part
        part = PartSpec(begin.heads, begin.first_head, begin.whole)
        sender_first = self._tp.heads[0] + begin.first_head - session.tp.heads[0]
        why = check_part(Part(begin.heads, sender_first, begin.first_head, begin.whole), session.tp, self._tp)
        if why is not None or (begin.heads and not self._has_kv):
            raise ProtocolError(f"BEGIN for tag {begin.tag}: {why or 'k/v heads for a layout without k/v'}")
        return part

    # -- placing -------------------------------------------------------------------------
    def _claim_all_locked(self, place: requests.Place) -> None:
        """(lock held) Claim the rows of a bound request's parked chunks, in order. One that
        is refused (it overlaps earlier data) condemns its connection: the chunks parked
        after it from that connection are dropped with it (its sender resends them on
        another), those of the request's other connections and senders are claimed."""
        refused: set[_RConn] = set()
        for chunk in place.chunks:
            if chunk.conn in refused:
                self._release_parking_locked(chunk)
                place.claims.append(None)  # dropped, unclaimed
                continue
            try:
                place.claims.append(self._claim_locked(place.request, chunk))
            except ProtocolError as exc:
                place.claims.append(exc)
                refused.add(chunk.conn)

    def _place_all(self, place: requests.Place) -> None:
        """Write the chunks :meth:`_claim_all_locked` claimed; close the connection of a
        refused one (it was released when it was refused) and drop what was not claimed."""
        assert len(place.claims) == len(place.chunks), "a Place action runs under the lock first"
        for chunk, claim in zip(place.chunks, place.claims):
            if isinstance(claim, ProtocolError):
                log.warning("closing connection from %s: %s", chunk.conn.stream.peer, claim)
                chunk.conn.stream.close()
                continue
            self._write(place.request, chunk, claim)

    def _place(self, request: Request, chunk: _Chunk) -> None:
        with self._lock:
            claim = self._claim_locked(request, chunk)
        self._write(request, chunk, claim)

    def _claim_locked(self, request: Request, chunk: _Chunk) -> bool | None:
        """(lock held) Count a chunk's rows as under way: True to write it, False for an exact
        repeat (counted), None when its request is no longer bound. ProtocolError (the chunk
        released) for one that overlaps earlier data."""
        ref = chunk.ref
        assert ref is not None
        self._release_parking_locked(chunk)
        try:
            write = self._table.start_write(request, chunk.conn.joined.id, ref.layer, ref.tensor, ref.start,
                                            ref.count)  # fmt: skip
        except ProtocolError:
            self._release_locked(chunk)
            raise
        if write is False:
            request.handle.duplicates += 1
        return write

    def _write(self, request: Request, chunk: _Chunk, claim: bool | None) -> None:
        """Write a claimed chunk into the destination (or drop it, unclaimed), then count it."""
        if not claim:
            self._release(chunk)
            return
        ref, spec, handle = chunk.ref, chunk.spec, request.handle
        assert ref is not None and spec is not None
        error = None
        try:
            assert chunk.slot.tensor is not None  # not released before it is written
            codec = ref.codec(request.codec_of(chunk.conn.joined.id))
            self._placement.place(codec, ref, spec, chunk.slot.tensor[: chunk.length], handle.destination)
        except Exception as exc:  # a decode failure must fail the request, not the thread
            where = (
                f"layer {ref.layer} {ref.name} rows {ref.start}..{ref.start + ref.count}, from {chunk.conn.joined.who}"
            )
            if isinstance(exc, ValueError):  # the codec refused the payload's bytes: the peer's doing, not a bug
                self._log_limit.warning(
                    "decode", "a chunk of %r did not decode (%s): %s", request.request_id, where, exc
                )
            else:
                log.exception("placing a chunk of %r failed (%s)", request.request_id, where)
            error = TransferError(f"request {request.request_id!r}: placing {where} failed: {exc}")
        with self._lock:
            self._release_locked(chunk)
            handle.chunks += 1
            handle.wire_bytes += chunk.length
            handle.logical_bytes += spec.raw_nbytes
            actions, layer_ready = self._table.written(request, ref.layer, error)
            if layer_ready:
                handle.layer_done_at.setdefault(ref.layer, time.monotonic())
                self._cond.notify_all()  # for wait_layer; waking waiters per chunk cost GIL hand-offs
            self._run_locked(actions)
        self._run(actions)

    def _release_parking_locked(self, chunk: _Chunk) -> None:
        self._unpark_locked(chunk.conn.joined, chunk.parked_bytes)
        chunk.parked_bytes = 0

    def _unpark_locked(self, session: _Session, nbytes: int) -> None:
        if nbytes:
            session.parked_bytes -= nbytes
            self._parked_bytes -= nbytes
            self._cond.notify_all()  # a reader may be waiting for parking room

    def _release_locked(self, chunk: _Chunk) -> None:
        """(lock held) Free a chunk's staging, stop counting it as parked, and owe its
        bytes back to the sender as credit (queued: sending never waits for the peer)."""
        self._release_parking_locked(chunk)
        chunk.slot.release()
        chunk.conn.owe(chunk.length, self._credit_batch)

    def _release(self, chunk: _Chunk) -> None:
        with self._lock:
            self._release_locked(chunk)

    # -- actions -------------------------------------------------------------------------
    def _run_locked(self, actions: list) -> None:
        """(lock held) The actions that must happen under the lock, in order: frames to the
        sender (queued, never waiting for the peer), then handles finish (and their waiters
        wake) in the critical section the table decided it in. An ACK is on its way before
        wait() returns: a caller that closes the receiver at once does not cut it off. A
        handle's ``t_done`` is the moment the table decided, not the later one its ACK left."""
        decided = time.monotonic() if actions else 0.0
        for action in actions:
            if isinstance(action, requests.SendAck | requests.SendCancel):
                self._send_locked(action)
            elif isinstance(action, requests.Finish):
                action.handle._end(action.error, decided)
                self._draining.pop(id(action.handle._request), None)
                self._cond.notify_all()
            elif isinstance(action, requests.Drain):
                self._draining[id(action.request)] = (action.request, time.monotonic())
            elif isinstance(action, requests.Release):
                for chunk in action.chunks:
                    self._release_locked(chunk)
            elif isinstance(action, requests.Place):
                self._claim_all_locked(action)

    def _send_locked(self, action: requests.SendAck | requests.SendCancel) -> None:
        session = self._sessions.get(action.session)
        for conn in session.reply_conns() if session is not None else ():
            if isinstance(action, requests.SendAck):
                frame = conn.proto.ack(action.tag, action.ok, action.message, action.checksum)
            else:
                frame = conn.proto.cancel(action.tag, action.reason)
            conn.outcomes.append(frame)
            conn.send(frame)

    def _run(self, actions: list) -> None:
        """The rest, in order, without the lock: chunks to place."""
        for action in actions:
            if isinstance(action, requests.Place):
                self._place_all(action)

    # -- waiting, deadlines, cancellation -------------------------------------------------
    def _wait(self, handle: ReceiveHandle, ready, timeout: float | None) -> None:
        end = handle.deadline if timeout is None else min(handle.deadline, time.monotonic() + timeout)
        with self._lock:
            while not ready():
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            error = handle._error
        if error is not None:
            raise error
        if ready():
            return
        if time.monotonic() < handle.deadline:
            raise TransferTimeout(f"request {handle.request_id!r}: not complete within {timeout:.3g} s")
        self._expire(handle)
        # It may have completed meanwhile; or it ended with payloads still being received into
        # its rows, which are not the caller's before those end (DRAIN_LIMIT_S bounds them).
        give_up = time.monotonic() + DRAIN_LIMIT_S + 5.0  # a bug must not make wait() hang for good
        with self._lock:
            while not handle._finished and not ready() and time.monotonic() < give_up:
                self._cond.wait(REAPER_PERIOD_S)
        if handle._error is not None:
            raise handle._error
        if not ready():  # cannot happen: a request that ends without an error is complete
            log.error("request %r: its writes did not end %.3g s after its deadline", handle.request_id,
                      DRAIN_LIMIT_S + 5.0)  # fmt: skip
            raise TransferTimeout(f"request {handle.request_id!r}: deadline passed")

    def _stalled_writers_locked(self, now: float) -> list[tuple[_RConn, str]]:
        """(lock held) Connections receiving a payload into the rows of a request that ended
        more than ``DRAIN_LIMIT_S`` ago: its handle waits for them."""
        late = {key: request for key, (request, since) in self._draining.items() if now - since > DRAIN_LIMIT_S}
        if not late:
            return []
        found = []
        for c in self._conns:
            if getattr(c.stream, "closed", False):
                continue  # closed at an earlier pass: its reader is on its way out
            lane_of = c.lane_claim
            request = c.writing_into if c.writing_into is not None else getattr(lane_of, "request", None)
            if request is not None and id(request) in late and late[id(request)] is request:
                found.append((c, request.request_id))
        return found

    def _who(self, session_id: str) -> str:
        """A sender as errors name it (under the lock)."""
        session = self._sessions.get(session_id)
        return session.who if session is not None else "a sender whose connections are gone"

    def _expire(self, handle: ReceiveHandle) -> None:
        request = handle._request
        if request is None:
            return
        with self._lock:
            actions = self._table.expire(request, self._who)
            self._run_locked(actions)
        self._run(actions)

    def _cancel(self, handle: ReceiveHandle, reason: str) -> None:
        request = handle._request
        if request is None:
            return
        with self._lock:
            actions = self._table.cancel(request, reason)
            self._run_locked(actions)
        self._run(actions)

    def _reap_loop(self) -> None:
        """Every ``REAPER_PERIOD_S``: cut handshakes past their deadline, expire requests
        past theirs, refuse data nobody claimed in time, close connections stalled inside a
        payload that holds parking room (``PARKED_READ_LIMIT_S``), and send queued control
        frames that found the socket full."""
        while not self._closed:
            time.sleep(REAPER_PERIOD_S)
            now = time.monotonic()
            with self._lock:
                overdue = [c for c in self._pending if c.handshake_deadline <= now and c.cut is None]
                for c in overdue:
                    c.cut = f"handshake not finished within {self._handshake_timeout:.3g} s"
                actions = self._table.refuse_unclaimed(now, self._unclaimed_timeout)
                for request in self._table.due(now):
                    actions += self._table.expire(request, self._who)
                self._run_locked(actions)
                conns = list(self._conns)
                stalled = self._stalled_writers_locked(now)
            slow = [c for c in conns if c.parked_read_until is not None and c.parked_read_until <= now]
            for c in slow:
                log.warning("closing connection from %s: a payload of a request nobody expected yet took more than "
                            "%.3g s to arrive, holding parking room", c.stream.peer, PARKED_READ_LIMIT_S)  # fmt: skip
                c.stream.close()  # its reader gives the parking room back
            for c in overdue:
                c.stream.close()  # the thread reading its handshake gets an error and reports why
            for c, request_id in stalled:
                log.warning("closing connection from %s: a payload into request %r, which has ended, stalled "
                            "for %.3g s", c.stream.peer, request_id, DRAIN_LIMIT_S)  # fmt: skip
                c.stream.close()  # its reader undoes the chunk, and the request's handle ends
            self._run(actions)
            for c in conns:
                try:
                    c.stream.flush_control()
                except PeerLost:
                    pass  # its reader sees the connection fail
