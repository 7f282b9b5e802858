"""The decode side: accept senders, check every frame, place chunks where ``expect`` said.

Each connection has one reader thread. For a DATA frame it validates the header against
the request's plan (known request, layer and tensor in range, rows inside the request,
block-aligned, the payload size the codec implies), receives the payload with
``recv_into`` straight into a staging slot, verifies its CRC32C, and only then decodes
it into the destination blocks. Data for a request nobody has ``expect``-ed yet stays
in its slot; the sender gets no credit back for it, so it slows down rather than
overrun the staging budget. A bad frame closes its connection (logged); other
connections and other senders carry on.
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch

import kvwire.codec
from kvwire.blocks import copy_tokens_to_blocks, place_rows
from kvwire.codec import ChunkSpec, Codec
from kvwire.engine.chunks import ChunkRef, chunk_spec
from kvwire.engine.common import (
    check_count,
    check_seconds,
    check_transport,
    layout_summary,
    request_arguments,
    secret_bytes,
)
from kvwire.errors import (
    Cancelled,
    KvwireError,
    PeerLost,
    ProtocolError,
    TransferError,
    TransferTimeout,
)
from kvwire.layout import KVLayout, Selection
from kvwire.proto import Authenticated, Begin, Cancel, Header, ServerConnection, parse_header
from kvwire.proto.frames import DATA_RAW, HEADER_SIZE, FrameType
from kvwire.proto.request import RequestPlan
from kvwire.staging import UNIT as STAGING_UNIT
from kvwire.staging import Slot, StagingPool, StagingTimeout
from kvwire.transport import ByteStream
from kvwire.transport.tcp import SocketOptions, TcpListener, parse_address

if TYPE_CHECKING:
    from kvwire.transport.ucx import UcxListener

log = logging.getLogger("kvwire.receiver")

DEFAULT_STAGING_BYTES = 256 << 20
DEFAULT_SLOT_BYTES = (4 << 20) + (64 << 10)  # a 4 MiB chunk plus the lz4 stage's worst-case headers
REAPER_PERIOD_S = 0.05
# What a peer can make this side hold is bounded; these are the defaults (docs/api.md).
DEFAULT_MAX_PENDING_CONNECTIONS = 64  # not yet authenticated: each holds a thread until its deadline
DEFAULT_MAX_CONNECTIONS = 1024  # authenticated: each holds a reader thread
DEFAULT_MAX_REQUESTS_PER_SESSION = 1024  # requests a sender may have open at once
# Tags of ended requests remembered per session, so late frames for them are dropped
# quietly: a sender stops sending a request's chunks when it ends, so only the frames
# already in flight (a credit window's worth) can come late.
ENDED_TAGS_REMEMBERED = 1024
# A reader waits this long at most for staging room; slots are held only while a chunk
# is placed (parked data has its own, smaller bound), so this is only ever hit by a bug
# or a machine too overloaded to place a chunk in that time.
STAGING_WAIT_S = 30.0


@dataclass(eq=False)
class _RConn:
    stream: ByteStream
    proto: ServerConnection
    host: str  # the peer's address without the port: pending connections are capped per host
    handshake_deadline: float
    session: _Session | None = None
    alive: bool = True
    cut: str | None = None  # why this side closed it (the handshake deadline passed)
    owed: int = 0  # payload bytes released but not yet returned to the sender as credit
    owed_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def joined(self) -> _Session:
        """The session: frames after the handshake are read only once it is joined."""
        assert self.session is not None
        return self.session

    def owe(self, nbytes: int, batch: int) -> bytes | None:
        """Add released bytes; return a CREDIT frame once ``batch`` bytes are owed.

        Batching cuts the wake-ups of the sender's ack thread several times over; the
        sender keeps ``window - batch`` >= one chunk of credit, so it never waits on a
        batch that cannot fill."""
        if not self.alive:
            return None
        with self.owed_lock:
            self.owed += nbytes
            if self.owed < batch:
                return None
            owed, self.owed = self.owed, 0
        return self.proto.credit(owed)

    def send(self, frame: bytes) -> bool:
        """Queue a control frame; never waits for the peer (safe under the receiver's lock)."""
        try:
            self.stream.send_control(frame)
            return True
        except PeerLost:
            return False


@dataclass(eq=False)
class _Session:
    id: str
    peer: str
    codec: Codec
    conns: list = field(default_factory=list)
    tags: dict = field(default_factory=dict)  # open requests: tag -> _Incoming
    ended: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # recent ended tags
    parked_bytes: int = 0  # staging held by this sender's chunks that wait for an expect

    def any_conn(self) -> _RConn | None:
        return next((c for c in self.conns if c.alive), None)

    def end(self, tag: int) -> None:
        """Forget an ended request, remembering its tag (boundedly) to drop late frames."""
        self.tags.pop(tag, None)
        self.ended[tag] = None
        while len(self.ended) > ENDED_TAGS_REMEMBERED:
            self.ended.popitem(last=False)


class _DeviceSlot:
    """A payload received straight into GPU memory (UCX with CUDA): held like a staging
    slot until it is placed. Its memory is bounded by the credit window, as slots are."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor: torch.Tensor | None = tensor

    def release(self) -> None:
        self.tensor = None


@dataclass(eq=False)
class _Parked:
    ref: ChunkRef
    spec: ChunkSpec
    slot: Slot | _DeviceSlot
    length: int
    conn: _RConn
    parked_bytes: int = 0  # counted against the parking bounds until placed or dropped


@dataclass(eq=False)
class _Incoming:
    """A request announced by a sender's BEGIN, matched (or not yet) with an ``expect``."""

    session: _Session
    tag: int
    request_id: str
    num_tokens: int
    plan: RequestPlan
    created: float
    handle: ReceiveHandle | None = None
    parked: list = field(default_factory=list)
    writing: collections.Counter = field(default_factory=collections.Counter)  # layer -> writes under way
    finished: bool = False


class _KernelsByCodec:
    """The CUDA kernel backend for each codec a session uses, or None where the kernels
    do not cover it (then the CPU reference decodes and the result is copied over)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self._device, self._dtype = device, dtype
        self._cache: dict[str, object] = {}

    def get(self, descriptor: str):
        if descriptor not in self._cache:
            from kvwire.engine.sender import _gpu_kernels

            self._cache[descriptor] = _gpu_kernels(self._device, kvwire.codec.get(descriptor), self._dtype)
        return self._cache[descriptor]


class ReceiveHandle:
    """Where one request lands, and how to wait for it. Create with :meth:`Receiver.expect`."""

    def __init__(self, receiver: Receiver, request_id: str, sel: Selection, states, deadline: float) -> None:
        self._receiver = receiver
        self.request_id = request_id
        self.selection = sel
        self.states: dict[int, torch.Tensor] = dict(states or {})
        self.deadline = deadline
        self._incoming: _Incoming | None = None
        self._error: TransferError | None = None
        self._finished = False
        self.t_expected = time.monotonic()
        self.t_first_byte: float | None = None
        self.t_done: float | None = None
        self.wire_bytes = 0
        self.logical_bytes = 0
        self.chunks = 0
        self.duplicates = 0
        self.layer_done_at: dict[int, float] = {}

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
        inc = self._incoming
        if self._finished:
            return True
        return inc is not None and inc.plan.layer_complete(layer) and not inc.writing[layer]


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
        window_bytes: credit per connection: payload bytes a sender may have outstanding.
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
    ) -> None:
        check_transport(transport, tls)
        if check_terms is not None and not callable(check_terms):
            raise TypeError(f"check_terms: expected a callable, got {type(check_terms).__name__}")
        self._check_terms = check_terms
        check_seconds(unclaimed_timeout, "unclaimed_timeout")
        check_seconds(handshake_timeout, "handshake_timeout")
        self._max_pending = check_count(max_pending_connections, "max_pending_connections")
        self._max_pending_per_host = max(1, self._max_pending // 4)
        self._max_connections = check_count(max_connections, "max_connections")
        self._max_requests = check_count(max_requests_per_session, "max_requests_per_session")
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
        self._caches = [dict(c) for c in kv_caches]
        first = next((t for c in self._caches for t in c.values()), None)
        self._device = first.device if first is not None else torch.device("cpu")
        self._side_stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        self._kernels = _KernelsByCodec(self._device, layout.dtype) if self._device.type == "cuda" else None
        # Byte views of contiguous CPU caches, [num_blocks, block_bytes], for the raw fast path.
        self._np_caches = [
            {
                name: t.view(t.shape[0], -1).view(torch.uint8).numpy()
                for name, t in layer.items()
                if t.device.type == "cpu" and t.is_contiguous()
            }
            for layer in self._caches
        ]
        self._accepted_codecs = None if codecs is None else {kvwire.codec.get(c).descriptor for c in codecs}
        self._pool = StagingPool(staging_bytes, slot_bytes)
        self._window = window_bytes or max(slot_bytes, self._pool.budget_bytes // 8)
        if self._window < slot_bytes:
            raise ValueError(f"window_bytes: {self._window} is less than one slot ({slot_bytes})")
        self._slot_bytes = slot_bytes
        self._credit_batch = min(self._window // 4, self._window - slot_bytes)
        self._unclaimed_timeout = unclaimed_timeout
        self._handshake_timeout = handshake_timeout
        self._codecs: dict[str, kvwire.codec.Codec] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sessions: dict[str, _Session] = {}
        self._by_id: dict[str, _Incoming] = {}
        self._expected: dict[str, ReceiveHandle] = {}
        self._cancelled_ids: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._conns: list[_RConn] = []
        self._pending: list[_RConn] = []  # accepted, handshake not finished
        self._parked_bytes = 0
        self._rejected: collections.deque = collections.deque(maxlen=32)
        self._last_reject_log = float("-inf")
        self._unlogged_rejects = 0
        self._counters: collections.Counter[str] = collections.Counter(
            {k: 0 for k in ("frames", "wire_bytes", "parked_chunks", "completed", "failed", "protocol_errors",
                            "rejected_connections", "refused_connections", "refused_requests", "late_frames")}
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
            threading.Thread(target=self._accept_loop, name="kvwire-accept", daemon=True),
            threading.Thread(target=self._reap_loop, name="kvwire-reaper", daemon=True),
        ]
        for t in self._threads:
            t.start()

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
        handle = ReceiveHandle(self, request_id, sel, states, time.monotonic() + deadline)
        with self._lock:
            if request_id in self._expected or (
                request_id in self._by_id and self._by_id[request_id].handle is not None
            ):
                raise ValueError(f"request_id: {request_id!r} is already expected")
            reason = self._cancelled_ids.pop(request_id, None)
            if reason is not None:
                self._finish(handle, None, Cancelled(f"request {request_id!r} was cancelled by the sender: {reason}"))
                return handle
            inc = self._by_id.get(request_id)
            if inc is not None and not inc.finished:
                parked, actions = self._bind(inc, handle)
            else:
                self._expected[request_id] = handle
                parked, actions = [], []
        self._run(actions)
        self._place_parked(handle._incoming, parked)
        return handle

    def stats(self) -> dict:
        with self._lock:
            conns = [c.stream.stats() | {"alive": c.alive} for c in self._conns if c.alive]
            return {
                "connections": conns,
                "sessions": len(self._sessions),
                "pending_connections": len(self._pending),
                "parked_bytes": self._parked_bytes,
                "pending_expect": len(self._expected),
                "staging": self._pool.stats(),
                "rejected": list(self._rejected),
                **dict(self._counters),
            }

    def census(self) -> dict:
        """How many per-request records this receiver holds now: a diagnostic for leak
        checks (every count returns to zero once requests end, ``cancelled_ids`` and
        ``ended_tags`` are bounded memories)."""
        with self._lock:
            tags = sum(len(s.tags) for s in self._sessions.values())
            parked = sum(len(i.parked) for i in self._by_id.values())
            return {
                "requests": len(self._by_id),
                "tags": tags,
                "expected": len(self._expected),
                "parked_chunks": parked,
                "parked_bytes": self._parked_bytes,
                "cancelled_ids": len(self._cancelled_ids),
                "ended_tags": sum(len(s.ended) for s in self._sessions.values()),
                "sessions": len(self._sessions),
                "connections": len(self._conns),
                "pending_connections": len(self._pending),
            }

    def close(self) -> None:
        """Stop listening, close every connection; open requests fail with ``Cancelled``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handles = list(self._expected.values()) + [i.handle for i in self._by_id.values() if i.handle]
            for h in handles:
                self._finish(h, None, Cancelled(f"request {h.request_id!r}: the receiver was closed"))
            for inc in self._by_id.values():
                self._release_parked(inc)
            conns = list(self._conns) + list(self._pending)
            self._cond.notify_all()
        self._listener.close()
        for c in conns:
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
                threading.Thread(target=self._serve, args=(conn,), name="kvwire-recv", daemon=True).start()

    def _admit(self, stream: ByteStream) -> _RConn | None:
        """Register a new connection, or close it at once when the caps are reached: a
        flood of idle sockets costs a counter, not a thread each."""
        host = stream.peer.rpartition(":")[0] or stream.peer
        proto = ServerConnection(
            self._secret,
            fingerprint=self.layout.fingerprint(),
            layout=layout_summary(self.layout),
            check_codec=self._check_codec,
            window=self._window,
            max_payload=self._slot_bytes,
            device_payloads=self._takes_device_payloads if self.transport == "ucx" else None,
            check_terms=self._check_terms,
        )
        conn = _RConn(stream, proto, host, time.monotonic() + self._handshake_timeout)
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

    def _check_codec(self, descriptor: str) -> str | None:
        try:
            codec = kvwire.codec.get(descriptor)
            codec.check_dtype(self.layout.dtype)
        except ValueError as exc:
            return str(exc)
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
            while conn.session is None:
                header = parse_header(stream.recv_exact(HEADER_SIZE))
                n = proto.on_header(header)
                events = proto.on_payload(header, stream.recv_exact(n))
                stream.send_parts([proto.data_to_send()])
                for e in events:
                    if isinstance(e, Authenticated):
                        self._join_session(conn, e)
                        stream.device_payloads = proto.device_payloads
            stream.settimeout(None)
            while True:
                self._read_frame(conn)
        except (KvwireError, OSError) as exc:
            out = proto.data_to_send()  # a REJECT explaining why, if the handshake failed
            if out:
                conn.send(out)
            if conn.session is None:
                self._reject(stream.peer, conn.cut or str(exc))
            elif not isinstance(exc, PeerLost):
                self._counters["protocol_errors"] += 1
                log.warning("closing connection from %s: %s", stream.peer, exc)
        finally:
            stream.close()
            self._connection_closed(conn)

    def _takes_device_payloads(self, codec: str) -> bool:
        """Whether this receiver takes ``codec``'s payloads in GPU memory: GPU caches, kernels
        for the codec, no host-side lz4 stage, and a UCX with CUDA transports."""
        if self._kernels is None or kvwire.codec.get(codec).has_lossless_stage or self._kernels.get(codec) is None:
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
            now = time.monotonic()
            if now - self._last_reject_log < 1.0:
                self._unlogged_rejects += 1
                return
            self._last_reject_log, unlogged, self._unlogged_rejects = now, self._unlogged_rejects, 0
        more = f" ({unlogged} more refused in the last second, not logged)" if unlogged else ""
        log.warning("refused a connection from %s: %s%s", peer or "?", reason, more)

    def _join_session(self, conn: _RConn, event: Authenticated) -> None:
        hello = event.hello
        self._codecs.setdefault(hello.codec, kvwire.codec.get(hello.codec))
        with self._lock:
            if conn.cut is not None or self._closed:
                raise PeerLost(conn.cut or "the receiver is closed")
            if len(self._conns) >= self._max_connections:
                raise ProtocolError(f"{self._max_connections} connections are already open")
            session = self._sessions.get(hello.session)
            if session is None:
                session = _Session(hello.session, conn.stream.peer, codec=self._codecs[hello.codec])
                self._sessions[hello.session] = session
            session.conns.append(conn)
            session.codec = self._codecs[hello.codec]
            conn.session = session
            self._pending.remove(conn)
            self._conns.append(conn)

    def _connection_closed(self, conn: _RConn) -> None:
        with self._lock:
            conn.alive = False
            if conn in self._pending:
                self._pending.remove(conn)
            if conn in self._conns:
                self._conns.remove(conn)
            session = conn.session
            if session is None or session.any_conn() is not None:
                return
            self._sessions.pop(session.id, None)
            for inc in list(session.tags.values()):
                if not inc.finished:
                    self._fail(inc, PeerLost(f"request {inc.request_id!r}: the sender's connections are all gone"))
                self._retire(inc)
            self._cond.notify_all()

    # -- frames --------------------------------------------------------------------------
    def _read_frame(self, conn: _RConn) -> None:
        stream, proto = conn.stream, conn.proto
        header = parse_header(stream.recv_exact(HEADER_SIZE))
        n = proto.on_header(header)
        if header.type != FrameType.DATA:
            for event in proto.on_payload(header, stream.recv_exact(n)):
                if isinstance(event, Begin):
                    self._on_begin(conn, event)
                elif isinstance(event, Cancel):
                    self._on_cancel(conn, event)
            return
        checked = self._check_data(conn, header)
        if checked is None:  # a request that ended: read the payload past and give the credit back
            self._skip_payload(conn, header, n)
            return
        inc, ref, spec = checked
        parked_bytes = self._reserve_parking(conn, inc, n)
        slot: Slot | _DeviceSlot
        try:
            if proto.device_payloads:
                slot = self._receive_on_device(conn, header, n)
            else:
                slot = host = self._acquire(n)
                try:
                    view = host.view(n)
                    stream.recv_into_exact(view)
                    proto.on_payload(header, view)  # checks the CRC: nothing is used before this passes
                except BaseException:
                    host.release()
                    raise
        except BaseException:
            self._unpark(conn.joined, parked_bytes)
            raise
        self._counters["frames"] += 1
        self._counters["wire_bytes"] += n
        parked = _Parked(ref, spec, slot, n, conn, parked_bytes)
        with self._lock:
            if inc.finished:
                drop = True
            elif inc.handle is None and parked_bytes:
                inc.parked.append(parked)
                self._counters["parked_chunks"] += 1
                return
            else:
                drop = False
        self._unpark(conn.joined, parked.parked_bytes)
        parked.parked_bytes = 0
        if drop:
            self._release(parked)
        else:
            self._place(inc, parked)

    def _acquire(self, nbytes: int) -> Slot:
        try:
            return self._pool.acquire(nbytes, timeout=STAGING_WAIT_S)
        except StagingTimeout:
            raise TransferError(f"no staging room for {nbytes} bytes within {STAGING_WAIT_S:.0f} s") from None

    def _skip_payload(self, conn: _RConn, header: Header, n: int) -> None:
        """Read a late DATA payload (for a request that already ended) and drop it."""
        if conn.proto.device_payloads:
            slot: Slot | _DeviceSlot = self._receive_on_device(conn, header, n)
        else:
            slot = self._acquire(n)
            conn.stream.recv_into_exact(slot.view(n))
        self._counters["late_frames"] += 1
        self._release(_Parked(None, None, slot, n, conn))  # type: ignore[arg-type]

    def _reserve_parking(self, conn: _RConn, inc: _Incoming, nbytes: int) -> int:
        """Bytes this chunk counts against the parking bounds (0 when its request is
        already expected). While this sender (or all senders together) park too much,
        wait: this connection is read no further, so this sender alone is slowed, until
        an ``expect`` claims its data or the unclaimed timeout refuses it."""
        session = conn.joined
        held = -(-nbytes // STAGING_UNIT) * STAGING_UNIT
        with self._lock:
            while inc.handle is None and not inc.finished and not self._closed:
                over_peer = session.parked_bytes and session.parked_bytes + held > self._max_parked_per_peer
                over_all = self._parked_bytes and self._parked_bytes + held > self._max_parked
                if not over_peer and not over_all:
                    session.parked_bytes += held
                    self._parked_bytes += held
                    return held
                self._counters["parking_waits"] += 1
                remaining = inc.created + self._unclaimed_timeout - time.monotonic()
                self._cond.wait(max(remaining, 0) + REAPER_PERIOD_S)  # the reaper refuses it at the deadline
            return 0

    def _unpark(self, session: _Session, nbytes: int) -> None:
        if nbytes:
            with self._lock:
                session.parked_bytes -= nbytes
                self._parked_bytes -= nbytes
                self._cond.notify_all()  # a reader may be waiting for parking room

    def _receive_on_device(self, conn: _RConn, header: Header, n: int) -> _DeviceSlot:
        """Receive a DATA payload into GPU memory and check its CRC32C there.

        UCX writes the buffer outside stream order, so it comes from
        ``kernels.receive_buffer``: memory no queued kernel still uses, released only after
        the side-stream work that reads it (the CRC here, the decode in ``_write_on_gpu``)."""
        from kvwire.cuda import kernels

        buffer = kernels.receive_buffer(n, self._device, self._side_stream)
        conn.stream.recv_device_into(buffer)  # returns once the bytes are in device memory
        assert self._kernels is not None  # device payloads are agreed only with kernels
        backend = self._kernels.get(conn.joined.codec.descriptor)  # one CuPy backend runs every codec
        conn.proto.on_device_payload(header, kernels.crc32c(backend, buffer, stream=self._side_stream))
        self._counters["device_payloads"] += 1
        return _DeviceSlot(buffer)

    def _check_data(self, conn: _RConn, header: Header) -> tuple[_Incoming, ChunkRef, ChunkSpec] | None:
        """Everything about a DATA frame that can be checked before its payload is read.
        None for a frame of a request that ended (it is read and dropped)."""
        session = conn.joined
        with self._lock:
            inc = session.tags.get(header.tag)
            ended = inc is None and header.tag in session.ended
        if ended:
            return None
        if inc is None:
            raise ProtocolError(f"DATA for tag {header.tag} before its BEGIN")
        t = inc.plan.check(header.layer, header.tensor, header.start, header.count)
        spec = chunk_spec(self.layout, t, header.count)
        ref = ChunkRef(header.layer, header.tensor, t.name, header.start, header.count, bool(header.flags & DATA_RAW))
        codec = ref.codec(session.codec)
        size = codec.encoded_size(spec)
        variable = codec.variable_size  # compressed chunks vary in size, up to a bound
        if header.length > size or (not variable and header.length != size):
            raise ProtocolError(
                f"DATA of {header.length} bytes for {header.count} rows of layer {header.layer} {t.name!r}; "
                f"{codec.descriptor} needs {'at most ' if variable else ''}{size}"
            )
        return inc, ref, spec

    def _on_begin(self, conn: _RConn, event: Begin) -> None:
        session = conn.joined
        actions: list = []
        parked: list = []
        capacity = self._num_blocks * self.layout.block_size
        with self._lock:
            known = session.tags.get(event.tag)
            if known is not None:
                if (known.request_id, known.num_tokens) != (event.request_id, event.num_tokens):
                    raise ProtocolError(f"BEGIN for tag {event.tag} changed its request")
                return
            if event.tag in session.ended:
                return  # the request ended already; this is its BEGIN on another connection
            # Checked before anything is allocated for the request: its coverage map grows
            # with num_tokens, and a peer may announce as many requests as it likes.
            refused = None
            if not 0 < event.num_tokens <= capacity:
                refused = (
                    f"request {event.request_id!r}: {event.num_tokens} tokens do not fit this receiver "
                    f"({self._num_blocks} blocks of {self.layout.block_size}: at most {capacity} tokens)"
                )
            elif len(session.tags) >= self._max_requests:
                refused = (
                    f"request {event.request_id!r}: this sender already has {self._max_requests} open requests "
                    f"(max_requests_per_session)"
                )
            if refused is not None:
                self._counters["refused_requests"] += 1
                session.end(event.tag)
                actions.append((conn, conn.proto.ack(event.tag, False, refused)))
                log.warning("refused a request from %s: %s", session.peer, refused)
            else:
                inc = _Incoming(
                    session, event.tag, event.request_id, event.num_tokens,
                    RequestPlan(self.layout, event.num_tokens), time.monotonic(),
                )  # fmt: skip
                session.tags[event.tag] = inc
                reason = self._cancelled_ids.pop(event.request_id, None)
                if reason is not None:
                    inc.finished = True
                    self._retire(inc)
                    actions.append((conn, conn.proto.cancel(event.tag, reason)))
                elif event.request_id in self._by_id:
                    inc.finished = True
                    self._retire(inc)
                    message = f"request id {event.request_id!r} is already being received from another transfer"
                    actions.append((conn, conn.proto.ack(event.tag, False, message)))
                else:
                    self._by_id[event.request_id] = inc
                    handle = self._expected.pop(event.request_id, None)
                    if handle is not None:
                        parked, actions = self._bind(inc, handle)
        self._run(actions)
        self._place_parked(session.tags.get(event.tag), parked)

    def _on_cancel(self, conn: _RConn, event: Cancel) -> None:
        with self._lock:
            inc = conn.joined.tags.get(event.tag)
            if inc is None or inc.finished:
                return
            self._fail(inc, Cancelled(f"request {inc.request_id!r} cancelled by the sender: {event.reason}"))
            if inc.handle is None:
                self._remember_cancel(inc.request_id, event.reason)
            self._cond.notify_all()

    # -- matching and placing ------------------------------------------------------------
    def _bind(self, inc: _Incoming, handle: ReceiveHandle) -> tuple[list, list]:
        """Join a sender's request with an expect (lock held). Returns (parked, actions)."""
        if inc.num_tokens != handle.selection.num_tokens:
            message = f"sender sends {inc.num_tokens} tokens, the receiver expects {handle.selection.num_tokens}"
            inc.handle = handle
            handle._incoming = inc
            return [], self._fail(inc, TransferError(f"request {inc.request_id!r}: {message}"))
        inc.handle = handle
        handle._incoming = inc
        parked, inc.parked = inc.parked, []
        actions = self._maybe_complete(inc)
        return parked, actions

    def _place_parked(self, inc: _Incoming | None, parked: list[_Parked]) -> None:
        if not parked:
            return
        assert inc is not None  # parked chunks always belong to a request
        for i, p in enumerate(parked):
            try:
                self._place(inc, p)
            except ProtocolError as exc:
                log.warning("closing connection from %s: %s", p.conn.stream.peer, exc)
                p.conn.stream.close()
                for rest in parked[i + 1 :]:
                    self._release(rest)
                return

    def _place(self, inc: _Incoming, p: _Parked) -> None:
        ref = p.ref
        with self._lock:
            handle = inc.handle
            if inc.finished or handle is None:
                drop = True
            else:
                try:
                    drop = inc.plan.is_duplicate(ref.layer, ref.tensor, ref.start, ref.count)
                except ProtocolError:
                    self._release_locked(p)
                    raise
                if drop:
                    handle.duplicates += 1
                else:
                    inc.plan.mark(ref.layer, ref.tensor, ref.start, ref.count)
                    inc.writing[ref.layer] += 1
                    handle.t_first_byte = handle.t_first_byte or time.monotonic()
        if drop:
            self._release(p)
            return
        assert handle is not None  # not dropped: the request has a handle
        error = None
        try:
            self._write(p.ref.codec(inc.session.codec), handle, p)
        except Exception as exc:  # a decode failure must fail the request, not the thread
            log.exception("placing a chunk of %r failed", inc.request_id)
            error = TransferError(f"request {inc.request_id!r}: placing layer {ref.layer} {ref.name} failed: {exc}")
        self._release(p)
        with self._lock:
            inc.writing[ref.layer] -= 1
            handle.chunks += 1
            handle.wire_bytes += p.length
            handle.logical_bytes += p.spec.raw_nbytes
            if error is not None:
                actions = self._fail(inc, error)  # wakes the waiters
            else:
                if not inc.writing[ref.layer] and inc.plan.layer_complete(ref.layer):
                    handle.layer_done_at.setdefault(ref.layer, time.monotonic())
                    self._cond.notify_all()  # for wait_layer; waking waiters per chunk cost GIL hand-offs
                actions = self._maybe_complete(inc)
        self._run(actions)

    def _write(self, codec, handle: ReceiveHandle, p: _Parked) -> None:
        assert p.slot.tensor is not None  # not released before it is written
        data = p.slot.tensor[: p.length]
        spec = p.spec
        kernels_backend = self._kernels.get(codec.descriptor) if self._kernels is not None else None
        if kernels_backend is not None:
            self._write_on_gpu(kernels_backend, codec, handle, p, data)
            return
        if codec.name == "raw" and p.ref.name in self._np_caches[p.ref.layer]:
            self._write_raw(handle, p)
            return
        if codec.name == "raw":
            rows = data.view(spec.dtype).view(spec.shape)
        else:
            rows = codec.decode_bytes(data, spec)
        caches = self._caches[p.ref.layer]
        state = handle.states.get(p.ref.layer)
        if self._side_stream is not None:
            with torch.cuda.stream(self._side_stream):
                place_rows(caches, state, handle.selection, self.layout.block_size, p.ref, rows)
            self._side_stream.synchronize()  # the slot is reused after this returns
        else:
            place_rows(caches, state, handle.selection, self.layout.block_size, p.ref, rows)

    def _write_raw(self, handle: ReceiveHandle, p: _Parked) -> None:
        """raw into a contiguous CPU cache: straight from the slot's bytes, through numpy views
        made once (torch views per frame were a measurable cost)."""
        bs = self.layout.block_size
        ids = handle.selection.block_ids[p.ref.start // bs :]
        assert isinstance(p.slot, Slot)  # CPU caches: payloads in host staging
        copy_tokens_to_blocks(self._np_caches[p.ref.layer][p.ref.name], p.slot.array[: p.length], ids, p.ref.count, bs)

    def _write_on_gpu(self, backend, codec, handle: ReceiveHandle, p: _Parked, data: torch.Tensor) -> None:
        """Copy the payload to the GPU on the side stream and decode + scatter it there.

        Stream order, all on the side stream: the payload's copy to the device (or, for a
        device payload, the CRC that read it), the transfer's block table (copied there once
        per transfer), then the decode; the host returns only after an event recorded after
        the decode, because the slot is reused and the ACK promises the bytes are there."""
        from kvwire.cuda import kernels

        if codec.has_lossless_stage:  # +lz4: the lossless stage runs on the host
            data = torch.from_numpy(codec.unpack(data, p.spec))
        ref = p.ref
        side = self._side_stream
        if ref.name == "state":
            chunk = kernels.Chunk.state(backend, handle.states[ref.layer], ref.start, ref.count)
        else:
            table = backend.tables.get(handle, handle.selection.block_ids, self._device, side)
            chunk = kernels.Chunk.paged(self._caches[ref.layer][ref.name], table, ref.start, ref.count,
                                        self.layout.block_size)  # fmt: skip
        with torch.cuda.stream(side):
            on_device = data.to(self._device, non_blocking=True)  # allocated and copied on side
        kernels.decode(backend, codec, on_device, chunk, p.spec.role, stream=side)
        kernels.wait_on_host(side)  # (None: the kernels' host emulation, in tests: already done)

    def _maybe_complete(self, inc: _Incoming) -> list:
        """(lock held) Finish the request if every chunk is in place; return what to do next.

        The ACK goes out *before* the handle reports success: otherwise a caller that
        closes the receiver as soon as ``wait`` returns could cut the ACK off, and the
        sender would see a lost peer for a request that had in fact arrived."""
        if inc.finished or inc.handle is None or not inc.plan.complete or any(inc.writing.values()):
            return []
        inc.finished = True  # no further chunk is accepted for it
        self._counters["completed"] += 1
        conn = inc.session.any_conn()
        actions: list = [(conn, conn.proto.ack(inc.tag, True))] if conn else []
        return actions + [partial(self._finish_now, inc.handle, inc)]

    def _finish_now(self, handle: ReceiveHandle, inc: _Incoming) -> None:
        with self._lock:
            self._finish(handle, inc, None)

    def _fail(self, inc: _Incoming, error: TransferError) -> list:
        """(lock held) End a request with ``error``; return frames that tell the sender."""
        if inc.finished:
            return []
        if inc.handle is not None:
            self._finish(inc.handle, inc, error)
        else:
            inc.finished = True
            self._retire(inc)
            self._cond.notify_all()  # a reader may be waiting to park data for it
        self._release_parked(inc)
        self._counters["failed"] += 1
        conn = inc.session.any_conn()
        if conn is None or isinstance(error, PeerLost):
            return []
        if isinstance(error, Cancelled) and "by the sender" in str(error):
            return []
        return [(conn, conn.proto.ack(inc.tag, False, str(error)))]

    def _finish(self, handle: ReceiveHandle, inc: _Incoming | None, error: TransferError | None) -> None:
        if handle._finished:
            return
        handle._error = error
        handle._finished = True
        handle.t_done = time.monotonic()
        if inc is not None:
            inc.finished = True
            self._retire(inc)
        self._expected.pop(handle.request_id, None)
        self._cond.notify_all()

    def _retire(self, inc: _Incoming) -> None:
        """(lock held) Forget an ended request: its id, and its tag (which its session
        remembers, boundedly, so that frames already in flight for it are dropped)."""
        if inc.session.tags.get(inc.tag) is inc:
            inc.session.end(inc.tag)
        if self._by_id.get(inc.request_id) is inc:
            del self._by_id[inc.request_id]

    def _remember_cancel(self, request_id: str, reason: str) -> None:
        self._cancelled_ids[request_id] = reason
        while len(self._cancelled_ids) > 4096:
            self._cancelled_ids.popitem(last=False)

    def _release_parked(self, inc: _Incoming) -> None:
        parked, inc.parked = inc.parked, []
        for p in parked:
            self._release_locked(p)

    def _release_locked(self, p: _Parked) -> None:
        """(lock held) Free a chunk's staging, stop counting it as parked, and owe its
        bytes back to the sender as credit (queued: sending never waits for the peer)."""
        if p.parked_bytes:
            session = p.conn.joined
            session.parked_bytes -= p.parked_bytes
            self._parked_bytes -= p.parked_bytes
            p.parked_bytes = 0
            self._cond.notify_all()  # a reader may be waiting for parking room
        p.slot.release()
        frame = p.conn.owe(p.length, self._credit_batch)
        if frame is not None:
            p.conn.send(frame)

    def _release(self, p: _Parked) -> None:
        with self._lock:
            self._release_locked(p)

    @staticmethod
    def _run(actions: list) -> None:
        """Send frames ``(conn, bytes)`` and run callbacks, in order, without the lock."""
        for action in actions:
            if callable(action):
                action()
            elif action[0] is not None:
                action[0].send(action[1])

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
        if not ready():
            if time.monotonic() >= handle.deadline:
                self._expire(handle)
                raise handle._error or TransferTimeout(f"request {handle.request_id!r}: deadline passed")
            raise TransferTimeout(f"request {handle.request_id!r}: not complete within {timeout:.3g} s")

    def _expire(self, handle: ReceiveHandle) -> None:
        self._end_handle(handle, TransferTimeout(f"request {handle.request_id!r}: deadline passed"))

    def _cancel(self, handle: ReceiveHandle, reason: str) -> None:
        self._end_handle(handle, Cancelled(f"request {handle.request_id!r} {reason}"), reason)

    def _end_handle(self, handle: ReceiveHandle, error: TransferError, reason: str | None = None) -> None:
        actions = []
        with self._lock:
            if handle._finished:
                return
            inc = handle._incoming
            if inc is not None and inc.finished and inc.plan.complete:
                return  # it completed: the ACK is on its way and the handle finishes next
            if inc is None:
                self._finish(handle, None, error)
                if reason is not None:
                    self._remember_cancel(handle.request_id, reason)
            else:
                self._finish(handle, inc, error)
                self._release_parked(inc)
                conn = inc.session.any_conn()
                if conn is not None:
                    actions.append((conn, conn.proto.cancel(inc.tag, str(error))))
        self._run(actions)

    def _reap_loop(self) -> None:
        """Every ``REAPER_PERIOD_S``: cut handshakes past their deadline, expire requests
        past theirs, refuse data nobody claimed in time, and send queued control frames
        that found the socket full."""
        while not self._closed:
            time.sleep(REAPER_PERIOD_S)
            now = time.monotonic()
            with self._lock:
                overdue = [c for c in self._pending if c.handshake_deadline <= now and c.cut is None]
                for c in overdue:
                    c.cut = f"handshake not finished within {self._handshake_timeout:.3g} s"
                expired = [h for h in self._expected.values() if h.deadline <= now]
                expired += [i.handle for i in self._by_id.values() if i.handle and i.handle.deadline <= now]
                unclaimed = [
                    i for i in self._by_id.values() if i.handle is None and now - i.created > self._unclaimed_timeout
                ]
                actions = []
                for inc in unclaimed:
                    actions += self._fail(
                        inc, TransferError(f"no expect() for {inc.request_id!r} within {self._unclaimed_timeout} s")
                    )
                conns = list(self._conns)
            for c in overdue:
                c.stream.close()  # the thread reading its handshake gets an error and reports why
            self._run(actions)
            for h in expired:
                self._expire(h)
            for c in conns:
                try:
                    c.stream.flush_control()
                except PeerLost:
                    pass  # its reader sees the connection fail
