"""The prefill side: stream a request's KV, layer by layer, to one receiver.

Threads (all daemon, all ended by :meth:`Sender.close`):

* one *encoder*: takes ``(transfer, layer)`` jobs in the order ``send_layer`` was
  called, cuts the layer into chunks, gathers and encodes each into a staging slot (or,
  for ``raw`` from a contiguous CPU cache, points at the cache itself: zero copies),
  and queues it;
* per connection, a *writer* that takes the next queued chunk when the receiver has
  granted this connection credit for it, and a *reader* for acknowledgements, credits
  and cancellations; on plain TCP only the connection the receiver acknowledges on
  (the oldest) has a reader: the others' writers read those frames between their sends
  and while they wait (``_duplex_loop``).

Chunks leave in queue order, so layer i is on the wire before layer i+1. When a
connection dies, the chunks it carried for unacknowledged transfers are encoded again
from the cache and sent on the others (the receiver drops exact repeats); when the
last one dies, every open transfer fails with :class:`~kvwire.errors.PeerLost`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import math
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

import kvwire.codec
from kvwire import scatter
from kvwire.engine.channel import Channel, client_handshake
from kvwire.engine.chunks import ChunkRef, chunk_spec, plan_chunks
from kvwire.engine.common import (
    MAX_SECONDS,
    check_checksum,
    check_codec_fits,
    check_seconds,
    check_terms,
    check_transport,
    layout_summary,
    request_arguments,
    secret_bytes,
)
from kvwire.engine.placement import Encoder, GpuDirectEncoder, GpuStagedEncoder, HostEncoder, Payload, gpu_kernels
from kvwire.engine.sender_link import AUTO, SHORT_PATH_RTT_S, LinkFollower, auto_codecs
from kvwire.errors import (
    Cancelled,
    ChecksumMismatch,
    KvwireError,
    PeerLost,
    ProtocolError,
    TransferError,
    TransferTimeout,
    TransferWouldMissDeadline,
)
from kvwire.layout import KVLayout, Selection, TensorParallel
from kvwire.link import LinkState
from kvwire.planning import Choice, Estimate, choose_codec
from kvwire.proto import Ack, Cancel, ClientConnection, Credit, Nack
from kvwire.proto.request import TensorPlan, check_rows, tensor_plans
from kvwire.sharding import Part, kinds, part_for, tp_of
from kvwire.staging import StagingClosed, StagingPool, check_budget
from kvwire.threads import Thread
from kvwire.transport import ByteStream
from kvwire.transport.tcp import SocketOptions, connect, parse_address

log = logging.getLogger("kvwire.sender")

DEFAULT_STREAMS = 4  # loopback and a 40 ms / 2 Gbit/s link both saturate at 4-8; see docs/benchmarks.md
DEFAULT_MAX_STREAMS = 16  # connections grow up to this while goodput grows (TCP; see kvwire/planning.py)
DEFAULT_CHUNK_BYTES = 2 << 20  # big enough that per-frame costs vanish, small enough to stripe a layer
# On a short path (the handshakes' RTT under SHORT_PATH_RTT_S: loopback, one datacenter)
# the CPU per frame, not the link, is what limits, and a layer striped over fewer
# connections costs nothing: chunks of this size there, when ``chunk_bytes`` is not given
# (docs/benchmarks.md, "4 MiB on short paths").
SHORT_PATH_CHUNK_BYTES = 4 << 20
SLOT_HEADROOM = 64 * 1024  # a staging slot holds a chunk and the lz4 stage's worst-case headers
DEFAULT_STAGING_BYTES = 64 << 20
# A writer gathers up to this many queued chunks (this many bytes) into one sendmsg while
# no other connection waits for one: a sendmsg per 2 MiB frame cost the sender 0.140-0.155
# CPU s/GB on loopback, 8 frames per sendmsg 0.121-0.123 (bench/sendmsg_sizes.py); the
# engine's writers went from 0.157-0.176 to 0.128-0.134 (bench/thread_cpu.py).
GATHER_CHUNKS = 8
GATHER_BYTES = 16 << 20
# After a failed send, how long the connection's reader may take to read what the peer
# sent before it closed (an acknowledgement) and meet the end of the stream.
WRITER_LOSS_GRACE_S = 2.0
FORGET_WAIT_S = 5.0  # finish() waits at most this for an ended transfer's records to be dropped
# Chunks of one transfer the receiver may ask for again before the transfer fails (the
# receiver gives up sooner, after 8: this bounds a receiver that would ask forever).
MAX_NACKS_PER_TRANSFER = 64


@dataclass
class _OutChunk:
    """A chunk ready for the network: its transfer, which rows, and its payload."""

    transfer: SendHandle
    ref: ChunkRef
    payload: Payload
    logical_bytes: int
    resend: bool = False  # sent before on a connection that died: it goes out first
    nbytes: int = field(init=False)  # the payload's, read a few times per chunk under the lock

    def __post_init__(self) -> None:
        self.nbytes = self.payload.nbytes


class _Wakeup:
    """What a connection's writer waits on when it also reads the connection's control
    frames (``_Conn.duplex``), in place of a condition: a :meth:`notify` from another
    thread (an eventfd) or bytes to read on the socket, whichever comes first. Notified
    and closed under the sender's lock, as the condition is notified, so that a
    notification never reaches a descriptor closed meanwhile."""

    def __init__(self) -> None:
        self.fd = -1  # opened by the writer's thread as it starts (open), closed as it stops

    def open(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def notify(self) -> None:
        if self.fd >= 0:
            os.eventfd_write(self.fd, 1)

    def wait(self, stream) -> None:
        """Until notified, or ``stream`` has bytes to read (PeerLost once it is closed)."""
        stream.wait_readable(self.fd)
        try:
            os.eventfd_read(self.fd)  # notified: cleared for the next wait
        except BlockingIOError:
            pass  # woken by the socket

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_CONN_SERIALS = itertools.count()


@dataclass
class _Conn:
    index: int
    channel: Channel
    credit: int
    wake: threading.Condition | _Wakeup  # on the sender's lock: this connection's writer waits here
    # Its writer reads its control frames too, between sends and while it waits (plain TCP):
    # no reader thread woken for each credit. Every connection but the one the receiver
    # acknowledges on (its oldest), where an acknowledgement must not wait behind a send.
    duplex: bool = False
    # (duplex) the connection that had a reader was lost and this one is now the oldest:
    # its writer hands reading to a thread of its own (Sender._duplex_loop)
    hand_over: bool = False
    alive: bool = True
    retiring: bool = False  # takes no new chunk; closed once its transfers ended (fewer connections)
    opened: float = field(default_factory=time.monotonic)
    waiting: bool = False  # its writer is waiting for a chunk it has credit for
    data_frames: int = 0  # DATA frames written ...
    data_sends: int = 0  # ... in this many sends (several are gathered into one when they queue)
    begun: set = field(default_factory=set)
    inflight: dict = field(default_factory=lambda: collections.defaultdict(list))
    threads: list = field(default_factory=list)
    # Never reused (index is, and so may id() be once a lost one is freed): the link model
    # keeps each connection's counters by it.
    serial: int = field(default_factory=lambda: next(_CONN_SERIALS))

    @property
    def stream(self) -> ByteStream:
        return self.channel.stream

    def counts(self) -> dict:
        return {"alive": self.alive, "credit": self.credit, "data_frames": self.data_frames,
                "data_sends": self.data_sends}  # fmt: skip

    @property
    def proto(self) -> ClientConnection:
        proto = self.channel.proto
        assert isinstance(proto, ClientConnection)
        return proto


def _begin_frames(conn: _Conn, handle: SendHandle) -> list[bytes]:
    """The BEGIN that must precede a request's first frame on ``conn``, if not sent there yet."""
    if handle.tag in conn.begun:
        return []
    conn.begun.add(handle.tag)
    return [handle._sender._begin(conn, handle)]


class SendHandle:
    """One request on its way. Create with :meth:`Sender.transfer`.

    Call :meth:`send_layer` for every layer as soon as it is computed (it returns at once),
    then :meth:`finish` to wait for the receiver's acknowledgement.
    """

    def __init__(self, sender: Sender, tag: int, request_id: str, sel: Selection, states, deadline: float,
                 codec: kvwire.codec.Codec | None = None, codec_index: int = 0, plan=None) -> None:  # fmt: skip
        self._sender = sender
        self.codec = codec if codec is not None else sender.codec  # this transfer's (codec="auto" chooses)
        self.codec_index = codec_index  # its number in the session's codecs (BEGIN says it)
        self.plan_choice = plan  # a kvwire.planning.Choice when the transfer was planned
        self.tag = tag
        self.request_id = request_id
        self.selection = sel
        # What this transfer's chunks carry (the heads the receiver gets from this sender),
        # per layer by tensor index.
        self.tensors: list[dict[int, TensorPlan]] = [
            {t.index: t for t in layer}
            for layer in tensor_plans(
                sender.layout, sel.num_tokens, kv_heads=sender.part.heads, whole=sender.part.whole
            )  # fmt: skip
        ]
        self.states: dict[int, torch.Tensor] = dict(states or {})
        self._deadline = deadline
        self._sent_layers: set[int] = set()
        self._done = threading.Event()
        # Set once the sender has dropped every record of this ended transfer: finish()
        # returns only then, so a census taken after it sees none of them.
        self._forgotten = threading.Event()
        self._ending = threading.Lock()  # one outcome: an ACK racing a cancel or a timeout
        self._error: TransferError | None = None
        self.logical_bytes = 0
        self.wire_bytes = 0
        self.chunks = 0
        self.resent_chunks = 0
        self.nacked_chunks = 0  # chunks the receiver asked for again (a payload failed its checksum, or broke off)
        self.t_created = time.monotonic()
        self.t_first_layer: float | None = None
        self.t_last_layer: float | None = None
        self.t_acked: float | None = None
        self.layer_sent_at: dict[int, float] = {}
        self._ended_by_caller = False  # cancel() was called: a later send_layer is a mistake
        self.alone = False  # no other transfer was open when it started
        # The same number on the transfers of one request to every decode rank a
        # ShardedSender serves: their chunks' CRCs are computed together (RowChecksums).
        self.row_group: int | None = None
        # Called (outside every lock) once the transfer fails: a ShardedTransfer cancels
        # the other decode ranks' parts then, whether or not its caller is looking.
        self.on_failure: Callable[[SendHandle], object] | None = None

    def send_layer(self, layer: int, state: torch.Tensor | None = None) -> None:
        """Queue layer ``layer`` (its paged tensors, and its state if it has one); returns at once.

        The blocks must keep their contents until :meth:`finish` returns: kvwire reads them
        in the background. With CUDA tensors, the read is ordered after the work already
        queued on the current stream.

        Once the transfer has failed (the receiver refused or cancelled it, the peer was
        lost...), a layer is taken and dropped: the failure is :meth:`finish`'s to raise,
        so a prefill that streams layer by layer computes on and learns why at the end.
        After the caller's own :meth:`cancel` it is a ValueError.
        """
        self._take_layer(layer, state, self._check_layer(layer, state))

    def _take_layer(self, layer: int, state: torch.Tensor | None, drop: bool) -> None:
        """send_layer once :meth:`_check_layer` passed: the layer queued, or, with ``drop``
        (the transfer failed), counted as sent and dropped."""
        if drop:
            self._sent_layers.add(layer)
            return
        if state is not None:
            self.states[layer] = state  # checked by _check_layer
        event = None
        if self._sender._device.type == "cuda":
            # On the caches' device: with caches on cuda:1 and cuda:0 current, a bare
            # record() would order the read after cuda:0's work, not the layer's producer.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._sender._device))
        now = time.monotonic()
        self.t_first_layer = self.t_first_layer or now
        self.t_last_layer = now
        self.layer_sent_at[layer] = now
        self._sent_layers.add(layer)
        self._sender._enqueue_layer(self, layer, event)

    def _check_layer(self, layer: int, state: torch.Tensor | None) -> bool:
        """send_layer's refusals, with nothing changed: True when the layer is to be
        dropped (the transfer failed, not by the caller's cancel)."""
        L = self._sender.layout.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
        if not 0 <= layer < L:
            raise ValueError(f"layer: {layer} out of range for {L} layers")
        if self._done.is_set():
            if self._error is not None and not self._ended_by_caller:
                return True
            raise ValueError(f"send_layer: transfer {self.request_id!r} has already ended")
        if layer in self._sent_layers:
            raise ValueError(f"layer: {layer} was already sent for {self.request_id!r}")
        layout = self._sender.layout
        if state is not None:
            layout.check_state(layer, state, "state")
        elif layer not in self.states and layout.layers[layer].state is not None and self._sender.part.whole:
            raise ValueError(f"state: layer {layer} has a state; pass it here or in transfer(states=...)")
        return False

    def finish(self, timeout: float | None = None) -> dict:
        """Wait for the receiver's acknowledgement; return this transfer's statistics.

        Raises ``ValueError`` if a layer was never sent, or a :class:`TransferError`:
        ``TransferTimeout`` (the transfer is then cancelled), ``PeerLost``, ``Cancelled``...
        """
        timeout = check_seconds(timeout, "timeout", optional=True, zero=True)
        self._check_all_sent()
        remaining = self._deadline - time.monotonic()
        wait = remaining if timeout is None else min(timeout, remaining)
        if not self._done.wait(max(wait, 0)):
            self._sender._cancel(self, f"sender gave up after {wait:.3g} s", TransferTimeout)
        # The thread that ended it drops its records right after (under the sender's lock,
        # which nothing holds for long); bounded all the same.
        self._forgotten.wait(FORGET_WAIT_S)
        if self._error is not None:
            raise self._error
        return self.stats()

    def cancel(self, reason: str = "cancelled by the sender") -> None:
        """Stop sending; the receiver's handle fails with ``Cancelled``."""
        self._ended_by_caller = True
        self._sender._cancel(self, reason, Cancelled)

    def _check_all_sent(self) -> None:
        """Before waiting for the acknowledgement: a layer never sent is the caller's error."""
        missing = sorted(set(range(self._sender.layout.num_layers)) - self._sent_layers)
        if missing and not self._done.is_set():
            raise ValueError(f"finish: layers {missing} of {self.request_id!r} were never sent")

    def done(self) -> bool:
        """True once the transfer ended (acknowledged, failed or cancelled). Never blocks,
        never cancels: the way to poll (a short ``finish(timeout)`` cancels the transfer)."""
        return self._done.is_set()

    def stats(self) -> dict:
        exposed = None
        if self.t_acked is not None and self.t_last_layer is not None:
            exposed = (self.t_acked - self.t_last_layer) * 1e3
        return {
            "request_id": self.request_id,
            "num_tokens": self.selection.num_tokens,
            "logical_bytes": self.logical_bytes,
            "wire_bytes": self.wire_bytes,
            "chunks": self.chunks,
            "resent_chunks": self.resent_chunks,
            "nacked_chunks": self.nacked_chunks,
            "exposed_ms": exposed,
            "total_ms": None if self.t_acked is None else (self.t_acked - self.t_created) * 1e3,
            "codec": self.codec.descriptor,
            **({} if self.plan_choice is None else {"plan": self.plan_choice.as_dict()}),
            "error": None if self._error is None else str(self._error),
        }

    def _complete(self, error: TransferError | None) -> None:
        with self._ending:
            if self._done.is_set():
                return
            self._error = error
            self.t_acked = time.monotonic()
            self._done.set()
        try:
            self._sender._forget(self)
        finally:
            self._forgotten.set()
        if error is None:
            self._sender._follower.completed(self)
        elif self.on_failure is not None:
            try:
                self.on_failure(self)
            except Exception:  # noqa: BLE001 - a reader or writer thread must go on
                log.exception("transfer %r: its failure hook failed", self.request_id)


class Sender:
    """Streams KV caches to one :class:`~kvwire.Receiver` over ``streams`` connections
    (TCP, optionally with TLS, or UCX).

    Args:
        layout: the KV layout; the receiver must have the same (checked at connect).
        peer: the receiver's ``"host:port"`` or ``(host, port)``.
        secret: shared secret (bytes or str, >= 8 bytes); default ``$KVWIRE_SECRET``.
        kv_caches: this side's paged caches, one dict per layer (see ``KVLayout.allocate``).
        streams: connections to open first (1..64); chunks are striped over them.
        max_streams: the most connections the sender opens while goodput grows with them
            (TCP; default 16, or ``streams`` if more; equal to ``streams`` to keep it fixed;
            ``stats()["streams_policy"]`` says why the count is what it is).
        codec: ``raw``, ``fp8``, ``int4`` or any of them ``+lz4`` (see ``kvwire.codec``), or
            ``"auto"``: each transfer takes the least lossy of ``codecs`` whose predicted
            exposed time meets its target (``max_exposed_ms``); the receiver must accept
            every one of them.
        codecs: with ``codec="auto"``, the codecs it may choose, least lossy first
            (default raw, int8h, int4a; int4h for a head_dim int4a cannot take).
        max_exposed_ms: the default target of ``transfer(max_exposed_ms=...)``: exposed
            milliseconds (last layer produced to acknowledgement) a transfer should stay within.
        layers_per_s: the default prefill pace the predictions assume (layers produced per
            second; None: every layer is ready when the transfer starts).
        group_size: channels per int4 value group (32, 64 or 128).
        staging_bytes: host memory for encoded chunks waiting for the network.
        chunk_bytes: target encoded size of one frame (at most the receiver's ``slot_bytes``);
            None: 2 MiB, or 4 MiB on a short path (TCP, the handshakes' RTT under 2 ms) where
            the receiver's ``slot_bytes`` and ``staging_bytes`` take it.
        tls: an ``ssl.SSLContext`` (client side) to encrypt the connections (TCP only).
        socket_options: a :class:`~kvwire.SocketOptions` for every TCP connection.
        connect_timeout: seconds each connection has to connect and finish its handshake.
        transport: ``"tcp"`` (default) or ``"ucx"`` (through UCXX: ``pip install 'kvwire[ucx]'``).
        encode_threads: threads that run a CPU codec in parallel (1 disables the pool).
        exact_tokens: with a lossy codec, the first tokens of every transfer travel raw
            (rounded up to whole blocks): a prompt's first tokens (the attention sink)
            carry the largest values and matter most; see docs/fidelity.md.
        terms: the application's own terms, stated at the handshake (a small dict of
            names to str/int/float/bool, e.g. a tensor-parallel rank): a receiver whose
            ``check_terms`` refuses them refuses the connection (``LayoutMismatch``).
        checksum: how DATA payloads are checked: ``"crc32c"`` or ``"none"`` (the receiver
            must say the same); default ``"none"`` with TLS, else ``"crc32c"``.
        whole_from: with tensor parallelism, which prefill rank sends a decode rank the
            tensors held whole on every rank (MLA latent, states): ``whole_from(decode_rank,
            prefill_size)``; default ``decode_rank % prefill_size`` (docs/api.md).
        kernels: a CUDA kernel backend to encode with (``kvwire.cuda.kernels``); default:
            the GPU's, when the caches are on one and the kernels cover the codec. Tests
            pass the kernels' host emulation here to run the GPU data path on CPU tensors.

    Example::

        sender = kvwire.Sender(layout, "decode-host:7400", secret=key, kv_caches=caches)
        t = sender.transfer("req-1", block_ids=[4, 9, 2], num_tokens=40)
        for i in range(layout.num_layers):
            ...                      # compute layer i
            t.send_layer(i)          # returns at once
        t.finish(timeout=10)         # the receiver has every byte in place
    """

    def __init__(
        self,
        layout: KVLayout,
        peer: str | tuple[str, int],
        *,
        secret: bytes | str | None = None,
        kv_caches: Sequence[Mapping[str, torch.Tensor]],
        streams: int = DEFAULT_STREAMS,
        codec: str = "raw",
        group_size: int = 64,
        codecs: Sequence[str] | None = None,
        max_streams: int | None = None,
        max_exposed_ms: float | None = None,
        layers_per_s: float | None = None,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        chunk_bytes: int | None = None,
        tls: ssl.SSLContext | None = None,
        socket_options: SocketOptions | None = None,
        connect_timeout: float = 10.0,
        transport: str = "tcp",
        encode_threads: int = 1,
        exact_tokens: int = 0,
        terms: Mapping[str, str | int | float | bool] | None = None,
        kernels=None,
        checksum: str | None = None,
        whole_from: Callable[[int, int], int] | None = None,
    ) -> None:
        check_transport(transport, tls)
        self.checksum = check_checksum(checksum, tls)
        self._whole_from = whole_from
        check_seconds(connect_timeout, "connect_timeout")
        self._terms = check_terms(terms)
        if isinstance(exact_tokens, bool) or not isinstance(exact_tokens, int) or exact_tokens < 0:
            raise ValueError(f"exact_tokens: expected an int >= 0, got {exact_tokens!r}")
        self._exact_tokens = exact_tokens
        self.transport = transport
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout: expected KVLayout, got {type(layout).__name__}")
        if isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams <= 64:
            raise ValueError(f"streams: expected an int in 1..64, got {streams!r}")
        if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                        or chunk_bytes < 4096):  # fmt: skip
            raise ValueError(f"chunk_bytes: an int of at least 4096, or None, got {chunk_bytes!r}")
        self.layout = layout
        self.auto = codec == AUTO
        if self.auto:
            widths = {p.head_dim for layer in layout.layers for p in layer.paged}
            widths |= {layer.state.shape[-1] for layer in layout.layers if layer.state is not None}
            head_dims = sorted(widths)
            self.codecs = auto_codecs(codecs, layout.dtype, group_size, head_dims)
        elif codecs is not None:
            raise ValueError("codecs: only with codec='auto' (a fixed codec is the only one a sender uses)")
        else:
            self.codecs = [kvwire.codec.get(codec, group_size=group_size)]
        self.codec = self.codecs[0]  # the session's first codec; a transfer's own is SendHandle.codec
        self.codec.check_dtype(layout.dtype)  # an fp8 cache travels raw
        if max_streams is None:
            max_streams = streams if transport != "tcp" else max(streams, DEFAULT_MAX_STREAMS)
        if isinstance(max_streams, bool) or not isinstance(max_streams, int) or not streams <= max_streams <= 64:
            raise ValueError(f"max_streams: expected an int in streams..64 ({streams}..64), got {max_streams!r}")
        self._max_exposed_s = _milliseconds(max_exposed_ms, "max_exposed_ms")
        self._layers_per_s = _rate(layers_per_s, "layers_per_s")
        for candidate in self.codecs:  # e.g. int4 groups that do not divide head_dim: say so now
            try:
                check_codec_fits(candidate, layout)
            except ValueError as exc:
                raise ValueError(f"codec: {exc}") from None
        self._secret = secret_bytes(secret)
        self._address = parse_address(peer, "peer")
        self._num_blocks = layout.check_caches(kv_caches)
        self._tp = tp_of(layout)
        self._has_kv = any(p.name != "kv" for layer in layout.layers for p in layer.paged)
        self.receiver_tp: TensorParallel | None = None  # learnt at the handshake
        self.receiver_block_size = 0
        self.part = Part(0, 0, 0, True)
        self._kv_heads: tuple[int, int] | None = None
        self._begin_heads: int | None = None
        self._caches = [dict(c) for c in kv_caches]
        first = next((t for c in self._caches for t in c.values()), None)
        self._device = first.device if first is not None else torch.device("cpu")
        self._chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        check_budget(staging_bytes, self._chunk_bytes + SLOT_HEADROOM)  # before connecting
        self._lock = threading.Lock()
        self._jobs: collections.deque = collections.deque()
        self._jobs_cond = threading.Condition(self._lock)
        # Chunks ready for the network. Writers are woken one at a time, only one that has
        # credit for the next chunk (waking all of them per chunk cost a GIL hand-off each);
        # the encoder waits on ``_space`` for the queue to drain below ``_out_limit``.
        self._out: collections.deque[_OutChunk] = collections.deque()
        # Chunks sent again after a connection died go out before any new one: they are
        # older, and the decode side may be waiting for their layer.
        self._resends: collections.deque[_OutChunk] = collections.deque()
        self._space = threading.Condition(self._lock)
        self._next_writer = 0
        self.gather = False  # whether writers may gather chunks (set by the link follower: a short path)
        self._out_bytes = 0
        self._out_limit = staging_bytes  # zero-copy chunks are bounded by bytes too
        self._transfers: dict[int, SendHandle] = {}
        self._next_tag = 1
        self._closed = False
        self._session = os.urandom(16).hex()
        self._side_stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        if kernels is None:  # the GPU's kernels, if they cover every codec this sender may use
            found = [gpu_kernels(self._device, c, layout.dtype) for c in self.codecs]
            kernels = found[0] if all(k is not None for k in found) else None
        self._kernels = kernels
        # GPU caches over UCX with CUDA transports: payloads may go from GPU memory straight
        # to the network, if the receiver agrees at the handshake (the lz4 stage runs on the host).
        self._device_payloads = (
            transport == "ucx"
            and self._kernels is not None
            and not any(c.has_lossless_stage for c in self.codecs)
            and _ucx_cuda(self._address[0])
        )
        if isinstance(encode_threads, bool) or not isinstance(encode_threads, int) or encode_threads < 1:
            raise ValueError(f"encode_threads: expected a positive int, got {encode_threads!r}")
        # CPU codecs encode chunk by chunk in torch, which releases the GIL: a small pool keeps
        # more than one core busy. raw from a CPU cache is zero-copy and gains nothing from it.
        self._encode_threads = encode_threads
        self._encoders = None
        if encode_threads > 1 and any(c.name != "raw" for c in self.codecs) and self._kernels is None:
            self._encoders = concurrent.futures.ThreadPoolExecutor(encode_threads, thread_name_prefix="kvwire-encode")
        self.max_payload = 0
        self._conns: list[_Conn] = []
        self._lost_conns = 0
        self._connect_args = (tls, socket_options or SocketOptions(), connect_timeout)
        try:
            for i in range(streams):
                self._conns.append(self._open(i, streams, *self._connect_args))
        except BaseException:
            for c in self._conns:
                c.stream.close()
            raise
        if chunk_bytes is None and self._short_path() and self.max_payload >= SHORT_PATH_CHUNK_BYTES \
                and staging_bytes >= SHORT_PATH_CHUNK_BYTES + SLOT_HEADROOM:  # fmt: skip
            self._chunk_bytes = SHORT_PATH_CHUNK_BYTES
        if self._chunk_bytes > self.max_payload:  # said aloud when it was asked for, not just the default
            log.log(logging.INFO if chunk_bytes is None else logging.WARNING,
                    "chunk_bytes %d is more than the receiver takes in one frame (its slot_bytes): chunks of %d "
                    "bytes instead", self._chunk_bytes, self.max_payload)  # fmt: skip
            self._chunk_bytes = self.max_payload
        try:
            self._pool = StagingPool(staging_bytes, self._chunk_bytes + SLOT_HEADROOM)
        except BaseException:
            for c in self._conns:
                c.stream.close()
            raise
        self._device_payloads = all(c.stream.device_payloads for c in self._conns) if self._device_payloads else False
        if self._device_payloads:
            log.info("payloads go from GPU memory over UCX, without host staging")
        self.encoder = self._choose_encoder()
        if isinstance(self.encoder, HostEncoder):  # split heads and scattered raw rows go out where they lie
            self.encoder.spans = transport == "tcp" and tls is None and scatter.available()
        self._threads = [Thread(self._encode_loop, "kvwire-encoder")]
        for c in self._conns:
            c.threads = self._conn_threads(c)
            self._threads += c.threads
        for t in self._threads:
            t.start()
        self._follower = LinkFollower(self, start=streams, bound=max_streams, codecs=self.codecs,
                                      on_gpu=self._kernels is not None)  # fmt: skip
        self._follower.start()

    def _short_path(self) -> bool:
        """Whether every connection's handshake saw a round trip under SHORT_PATH_RTT_S
        (TCP's minimum RTT; False where TCP_INFO says nothing: UCX)."""
        infos: list[dict] = [c.stream.tcp_info() if hasattr(c.stream, "tcp_info") else {} for c in self._conns]
        rtts = [i.get("min_rtt_us") for i in infos]
        return bool(rtts) and all(r is not None and 0 < r < SHORT_PATH_RTT_S * 1e6 for r in rtts)

    def _agree_part(self, accepted) -> None:
        """What this sender sends this receiver, from both sides' tensor parallelism."""
        rank, size, kv_heads = accepted.tp
        if kv_heads and kv_heads != self._tp.kv_heads:
            raise ValueError(f"peer: the receiver's model has {kv_heads} KV heads, this sender's {self._tp.kv_heads}")
        receiver = TensorParallel(rank, size, kv_heads or self._tp.kv_heads)
        part = part_for(self._tp, receiver, *kinds(self.layout), self._whole_from)
        if self.receiver_tp is not None and receiver != self.receiver_tp:
            raise ValueError("peer: its connections describe different tensor-parallel ranks")
        if part.empty:
            raise ValueError(
                f"peer: decode rank {rank} of {size} gets nothing from prefill rank {self._tp.rank} of "
                f"{self._tp.size} (another rank sends it its heads; see kvwire.ShardedSender)"
            )
        self.receiver_tp, self.receiver_block_size, self.part = receiver, accepted.block_size, part
        held = self._tp.heads[1] if self._has_kv else 0
        self._kv_heads = None if part.heads == held else (part.sender_first, part.heads)
        # BEGIN says "every head you hold" when that is what this sender sends
        self._begin_heads = None if part.heads == receiver.heads[1] else part.heads

    def _begin(self, conn: _Conn, handle: SendHandle) -> bytes:
        """A request's BEGIN on ``conn``, with what this sender's chunks of it carry."""
        part = self.part
        return conn.proto.begin(handle.tag, handle.request_id, handle.selection.num_tokens, self._begin_heads,
                                part.receiver_first, part.whole, handle.codec_index)  # fmt: skip

    def _choose_encoder(self) -> Encoder:
        """The data path, chosen once: CPU reference (or views of the cache for raw), GPU
        kernels into pinned staging, or GPU kernels with the bytes left on the GPU."""
        if self._kernels is None:
            return HostEncoder(self.layout, self._caches, self._pool, self._side_stream)
        if self._device_payloads:
            return GpuDirectEncoder(self.layout, self._caches, self._pool, self._kernels, self._device,
                                    self._side_stream, checked=self.checksum != "none")  # fmt: skip
        return GpuStagedEncoder(self.layout, self._caches, self._pool, self._kernels, self._device, self._side_stream)

    # -- connecting ----------------------------------------------------------------------
    def _open(self, index: int, count: int, tls, options: SocketOptions, timeout: float) -> _Conn:
        stream: ByteStream
        expired = threading.Event()

        def late(stream: ByteStream) -> str:
            return f"handshake with {stream.peer} did not finish within connect_timeout={timeout:g} s"

        # ``timeout`` bounds the connect and each read; the watchdog bounds the TLS and kvwire
        # handshakes as a whole: a peer that trickles a byte now and then, or accepts and
        # never answers, would otherwise hold this (the constructor, or a connection being
        # added) forever.
        started = time.monotonic()
        tcp = None
        if self.transport == "ucx":
            from kvwire.transport import ucx

            stream = ucx.connect(self._address, timeout=timeout)
            stream.settimeout(timeout)
        else:
            tcp = connect(self._address, options, timeout=timeout, tls=tls, tls_handshake=False)
            stream = tcp

        def expire() -> None:
            expired.set()
            stream.close()

        watchdog = threading.Timer(max(started + timeout - time.monotonic(), 0), expire)
        watchdog.daemon = True
        watchdog.start()
        proto = ClientConnection(
            self._secret,
            session=self._session,
            conn_index=index,
            conn_count=count,
            fingerprint=self.layout.model_fingerprint(),
            layout=layout_summary(self.layout),
            codec=self.codec.descriptor,
            device_payloads=self._device_payloads,
            terms=self._terms,
            codecs=[c.descriptor for c in self.codecs],
            checksum=self.checksum,
            tp=(self._tp.rank, self._tp.size, self._tp.kv_heads),
            block_size=self.layout.block_size,
        )
        try:
            if tcp is not None:
                tcp.tls_handshake()
            accepted = client_handshake(stream, proto)
        except KvwireError as exc:
            if expired.is_set():
                raise PeerLost(f"{late(stream)} ({exc})") from None
            raise
        finally:
            watchdog.cancel()
        if expired.is_set():  # it fired as the handshake ended: the stream is closed
            raise PeerLost(late(stream))
        stream.settimeout(None)
        try:
            self._agree_part(accepted)
        except ValueError:
            stream.close()
            raise
        self.max_payload = accepted.max_payload
        if self.transport == "ucx":
            stream.device_payloads = accepted.device_payloads
        if getattr(stream, "nowait_reads", False) and hasattr(os, "eventfd") and self._reader_alive():
            return _Conn(index, Channel(stream, proto), credit=accepted.window, wake=_Wakeup(), duplex=True)
        return _Conn(index, Channel(stream, proto), credit=accepted.window, wake=threading.Condition(self._lock))

    def _reader_alive(self) -> bool:
        """Whether a live connection has (or is about to have) a reader thread: the one the
        receiver acknowledges on. A connection opened while one has is duplex."""
        with self._lock:
            return any(c.alive and (not c.duplex or c.hand_over) for c in self._conns)

    def _conn_threads(self, conn: _Conn) -> list[Thread]:
        """A connection's threads: its writer, and a reader unless the writer reads too."""
        if conn.duplex:
            return [Thread(self._duplex_loop, f"kvwire-send-{conn.index}", (conn,))]
        return [
            Thread(self._write_loop, f"kvwire-send-{conn.index}", (conn,)),
            Thread(self._read_loop, f"kvwire-ack-{conn.index}", (conn,)),
        ]

    # -- the public surface --------------------------------------------------------------
    def transfer(
        self,
        request_id: str | int,
        block_ids: Sequence[int] | torch.Tensor,
        num_tokens: int,
        *,
        states: Mapping[int, torch.Tensor] | None = None,
        deadline: float = 60.0,
        max_exposed_ms: float | None = None,
        layers_per_s: float | None = None,
        refuse_if_late: bool = False,
        codec: str | None = None,
    ) -> SendHandle:
        """Start a transfer of ``num_tokens`` tokens held in ``block_ids`` (in token order).

        ``states``: layer index -> state tensor, for layers with a request-level state
        (or pass each to ``send_layer``). ``deadline``: seconds from now within which the
        transfer must end; past it, ``finish`` raises ``TransferTimeout``.

        Planning (``docs/api.md``, *The link model*): ``max_exposed_ms`` is the target for
        the time from the last layer to the acknowledgement (default: the sender's), and
        ``layers_per_s`` the pace of this request's prefill (default: the sender's). With
        ``codec="auto"`` they choose the codec; with ``refuse_if_late=True`` a transfer
        predicted to miss the target or the deadline raises
        :class:`~kvwire.TransferWouldMissDeadline` here, before anything is sent.
        ``codec``: this transfer's codec, one of the sender's ``codecs`` (a scheduler that
        chose from ``estimate()`` itself); it overrides auto.
        """
        if self._closed:
            raise ValueError("transfer: the sender is closed")
        request_id, sel, target, pace = transfer_arguments(
            self.layout, self._num_blocks, request_id, block_ids, num_tokens, states, deadline, max_exposed_ms,
            layers_per_s, refuse_if_late)  # fmt: skip
        codec_index = 0 if codec is None else self._codec_index(codec)
        plan = None
        target = self._max_exposed_s if target is None else target
        if (self.auto and codec is None) or refuse_if_late:
            candidates = None if codec is None else [self.codecs[codec_index]]
            plan = self._plan(sel.num_tokens, target, pace, deadline, candidates)
            codec_index = self._codec_index(plan.codec)
            if refuse_if_late and plan.meets is False:
                raise TransferWouldMissDeadline(f"transfer {request_id!r} refused: {plan.reason}", plan.estimate)
        with self._lock:
            if self._closed:  # checked again under the lock: close() may have run meanwhile
                raise ValueError("transfer: the sender is closed")
            self._check_alive_locked()
            tag = self._next_tag
            self._next_tag += 1
            handle = SendHandle(self, tag, request_id, sel, states, time.monotonic() + deadline,
                                self.codecs[codec_index], codec_index, plan)  # fmt: skip
            handle.alone = not self._transfers  # it may teach the link model its overhead (sender_link.py)
            self._transfers[tag] = handle
        self._follower.kick()
        return handle

    def send(
        self,
        request_id: str | int,
        block_ids: Sequence[int],
        num_tokens: int,
        *,
        states: Mapping[int, torch.Tensor] | None = None,
        timeout: float = 60.0,
    ) -> dict:
        """Send every layer of a request at once and wait for the acknowledgement."""
        handle = self.transfer(request_id, block_ids, num_tokens, states=states, deadline=timeout)
        for i in range(self.layout.num_layers):
            handle.send_layer(i)
        return handle.finish()

    def stats(self) -> dict:
        """Link statistics per connection (bytes, goodput, TCP_INFO) and staging use; the
        link model (``link``) and why the sender has as many connections as it has
        (``streams_policy``)."""
        with self._lock:
            active = sum(1 for t in self._transfers.values() if not t.done())
        return {
            "codec": AUTO if self.auto else self.codec.descriptor,
            "codecs": [c.descriptor for c in self.codecs],
            "link": self.link().as_dict(),
            "streams_policy": self._follower.stats(),
            "streams": len(self._conns),
            "alive_streams": sum(c.alive for c in self._conns),
            "active_transfers": active,
            "connections": [c.stream.stats() | c.counts() for c in self._conns],
            "staging": self._pool.stats(),
            # the frame payload a chunk is cut to: chunk_bytes, at most the receiver's slot_bytes
            "chunk_bytes": self._chunk_bytes,
            # split heads and raw rows over scattered blocks leave as spans of the cache (kvwire._scatter)
            "spans": bool(getattr(self.encoder, "spans", False)),
        }

    def close(self) -> None:
        """Close the connections; transfers still open fail with ``Cancelled``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            open_transfers = [t for t in self._transfers.values() if not t.done()]
            self._jobs_cond.notify_all()
            self._wake_all()
        self._follower.stop()
        for transfer in open_transfers:
            transfer._complete(Cancelled(f"transfer {transfer.request_id!r}: the sender was closed"))
        for c in self._conns:
            c.stream.close()
        self._pool.close()
        for t in self._threads:
            if t.ident is not None:  # one being added may not have started yet: it sees the close
                t.join(timeout=5)
        if self._encoders is not None:
            self._encoders.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------
    def _enqueue_layer(self, handle: SendHandle, layer: int, event) -> None:
        with self._lock:
            self._jobs.append((handle, layer, event, None))
            self._jobs_cond.notify()

    def _cancel(self, handle: SendHandle, reason: str, error: type[TransferError]) -> None:
        """End ``handle`` with ``error`` and tell the receiver, without waiting: the CANCEL
        is queued on a connection and goes out between frames, so a writer blocked on a
        peer that stopped reading cannot hold the caller (``finish(timeout)`` returns on time)."""
        if handle.done():
            return
        handle._complete(error(f"transfer {handle.request_id!r}: {reason}"))
        with self._lock:
            conns = [c for c in self._conns if c.alive]
        # On every connection: the first may be the one whose path stalled (the reason a
        # finish(timeout) ran out), where the frame would wait behind a blocked send, and be
        # lost with the connection. The receiver reads the first to come and ignores the
        # rest. Always with its BEGIN (a repeat is ignored too): a BEGIN marked as sent on a
        # connection here could let a writer send DATA there before it went out.
        for c in conns:
            try:
                c.stream.send_control(self._begin(c, handle) + c.proto.cancel(handle.tag, reason))
            except PeerLost:
                continue
        self._follower.kick()  # it flushes what a full socket kept (flush_controls)

    def expire_transfers(self) -> None:
        """End the transfers whose deadline has passed (``TransferTimeout``; the receiver is
        told). ``finish`` does so for a caller waiting in it; this is for a transfer nobody
        waits on, whose caller failed before its last layer: it would hold its records,
        count as queued in every estimate and keep the link sampled at the busy pace."""
        now = time.monotonic()
        with self._lock:
            due = [t for t in self._transfers.values() if t._deadline <= now and not t.done()]
        for t in due:
            self._cancel(t, "its deadline passed before it was acknowledged", TransferTimeout)

    def flush_controls(self) -> None:
        """Send control frames that waited in a connection's outbox because its socket was
        full when they were queued, now that it may have room. Nothing else would send
        them while that connection's writer has no DATA to send (over TLS a frame is only
        written when the socket reports room). Never waits."""
        with self._lock:
            conns = [c for c in self._conns if c.alive]
        for c in conns:
            try:
                c.stream.flush_control()
            except PeerLost:
                pass  # its reader or writer sees the connection fail

    def _forget(self, handle: SendHandle) -> None:
        """Drop every record of an ended transfer (its chunks still queued are dropped by
        the writers): nothing a transfer leaves behind outlives it."""
        with self._lock:
            self._transfers.pop(handle.tag, None)
            for c in self._conns:
                c.inflight.pop(handle.tag, None)
                c.begun.discard(handle.tag)
            if any(job[0] is handle for job in self._jobs):
                self._jobs = collections.deque(job for job in self._jobs if job[0] is not handle)
            dropped = [chunk for chunk in (*self._resends, *self._out) if chunk.transfer is handle]
            if dropped:  # queued chunks hold staging: give it back now, not when a writer wakes
                self._out = collections.deque(chunk for chunk in self._out if chunk.transfer is not handle)
                self._resends = collections.deque(chunk for chunk in self._resends if chunk.transfer is not handle)
                for chunk in dropped:
                    self._out_bytes -= chunk.nbytes
                    chunk.payload.release()
                self._space.notify_all()
                self._wake_writer()  # the new head may need less credit than the one dropped

    # -- the link: its model, plans, and connections that follow it (kvwire/engine/sender_link.py)
    def link(self) -> LinkState:
        """The live model of the link to the receiver: goodput, RTT, loss, their trend and
        age (``kvwire.link.LinkState``; ``.as_dict()`` for JSON)."""
        return self._follower.state()

    def estimate(
        self,
        num_tokens: int,
        *,
        codec: str | None = None,
        layers_per_s: float | None = None,
        max_exposed_ms: float | None = None,
    ) -> Estimate:
        """Predict a transfer of ``num_tokens`` tokens started now: wire bytes, when layer 0
        and when all of it will be in place, the exposed time after the prefill, and their
        slow-end values (``kvwire.planning.Estimate``). ``codec``: one of this sender's
        codecs (default: its codec; ``"auto"``: the one auto would choose for
        ``max_exposed_ms``); ``layers_per_s``: the prefill's pace (default: the sender's)."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens: expected a positive int, got {num_tokens!r}")
        capacity = self._num_blocks * self.layout.block_size
        if num_tokens > capacity:  # transfer() would refuse it: the caches hold no more
            raise ValueError(f"num_tokens: {num_tokens} is more than this sender's caches hold ({capacity})")
        pace = _rate(layers_per_s, "layers_per_s")
        target = _milliseconds(max_exposed_ms, "max_exposed_ms")
        with self._lock:
            self._check_alive_locked()  # as transfer() says: nothing would arrive
        if codec == AUTO or (codec is None and self.auto):
            return self._plan(num_tokens, self._max_exposed_s if target is None else target, pace, None).estimate
        chosen = self.codecs[0 if codec is None else self._codec_index(codec)]
        return self._follower.estimates(num_tokens, [chosen], pace or self._layers_per_s)[0]

    def _check_alive_locked(self) -> None:
        """(lock held) PeerLost unless a connection is alive: nothing sent would arrive."""
        if not any(c.alive for c in self._conns):
            raise PeerLost(f"no live connection to {self._address[0]}:{self._address[1]}")

    def _codec_index(self, codec: str) -> int:
        """The index of ``codec`` (a name or descriptor) in this sender's codecs."""
        if not isinstance(codec, str):
            raise TypeError(f"codec: expected a codec name, got {type(codec).__name__}")
        for i, c in enumerate(self.codecs):
            if codec in (c.descriptor, c.name):  # "int4" names this sender's int4, whatever its groups
                return i
        raise ValueError(f"codec: {codec!r} is not one of this sender's codecs {[c.descriptor for c in self.codecs]}")

    def _plan(self, num_tokens: int, target_s: float | None, pace: float | None, deadline_s: float | None,
              codecs: list | None = None) -> Choice:  # fmt: skip
        candidates = self._follower.estimates(num_tokens, codecs or self.codecs, pace or self._layers_per_s)
        return choose_codec(candidates, max_exposed_s=target_s, deadline_s=deadline_s)

    def _has_open_transfers(self) -> bool:
        return bool(self._transfers)

    def _transfers_created_since(self, tag: int) -> bool:
        return self._next_tag > tag + 1

    def _link_view(self) -> tuple[list[tuple[int, ByteStream]], bool]:
        """(the live connections as (key, stream), whether chunks wait for a writer)."""
        with self._lock:
            return [(c.serial, c.stream) for c in self._conns if c.alive], self._out_bytes > 0

    def _queued_wire_bytes(self, follower: LinkFollower) -> int:
        """Wire bytes of the open transfers not yet written: a new transfer waits behind them."""
        with self._lock:
            open_ = [(t.codec, t.selection.num_tokens, t.wire_bytes) for t in self._transfers.values() if not t.done()]
        return sum(max(0, sum(x.wire_bytes for x in follower.layer_costs(codec, n)) - sent) for codec, n, sent in open_)

    def _connection_count(self) -> tuple[int, int, bool]:
        """(connections that take chunks, connections lost to errors since the start,
        whether any connection is alive, a retiring one included)."""
        with self._lock:
            taking = sum(1 for c in self._conns if c.alive and not c.retiring)
            return taking, self._lost_conns, any(c.alive for c in self._conns)

    def _add_connection(self) -> bool:
        """Open one more connection (its handshake runs while the others carry data) and
        start its threads. False once the sender is closed."""
        with self._lock:
            if self._closed:
                return False
            free = next((c.index for c in self._conns if not c.alive and not any(t.is_alive() for t in c.threads)),
                        len(self._conns))  # fmt: skip
            count = sum(1 for c in self._conns if c.alive) + 1
        conn = self._open(free, count, *self._connect_args)
        conn.threads = self._conn_threads(conn)
        with self._lock:
            if self._closed:
                conn.stream.close()
                return False
            if free < len(self._conns):
                self._conns[free] = conn
            else:
                self._conns.append(conn)
            self._threads = [t for t in self._threads if t.is_alive()] + conn.threads
        for t in conn.threads:
            t.start()
        log.info("opened connection %d to %s (%d now)", free, conn.stream.peer, count)
        return True

    def _retire_connections(self, n: int) -> None:
        """The ``n`` newest connections take no new chunk and close once their transfers
        ended. The first connection is never retired: the receiver acknowledges on its
        oldest live connection, which must not be closing."""
        with self._lock:
            live = [c for c in self._conns if c.alive and not c.retiring]
            newest_first = sorted(live, key=lambda c: c.opened)[1:][::-1]
            for c in newest_first[:n]:
                c.retiring = True
                c.wake.notify()  # a writer waiting for a chunk leaves: it takes none any more
            self._wake_writer()

    def _close_retired(self) -> None:
        """Close retiring connections that carry nothing any more."""
        with self._lock:
            done = [c for c in self._conns if c.alive and c.retiring and not any(c.inflight.values())]
            for c in done:
                c.alive = False
        for c in done:
            c.stream.close()
            log.info("closed connection %d to %s (fewer connections)", c.index, c.stream.peer)

    def reset_connection(self, index: int) -> None:
        """Close connection ``index`` as a network reset would: the chunks it carried for
        transfers not yet acknowledged are sent again on the others (the receiver drops
        the repeats). For fault drills and tests; the transfers go on unless it was the last."""
        if not 0 <= index < len(self._conns):
            raise ValueError(f"index: {index} out of range for {len(self._conns)} connections")
        conn = self._conns[index]
        conn.stream.close()
        self._connection_lost(conn, PeerLost(f"connection {index} reset on request"))

    def census(self) -> dict:
        """How many per-transfer records this sender holds now: a diagnostic for leak
        checks; every count returns to zero once the transfers end."""
        with self._lock:
            return {
                "transfers": len(self._transfers),
                "inflight_chunks": sum(len(refs) for c in self._conns for refs in c.inflight.values()),
                "queued_chunks": len(self._out) + len(self._resends) + sum(len(job[3] or ()) for job in self._jobs),
                "begun_tags": sum(len(c.begun) for c in self._conns),
            }

    def _encode_loop(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._jobs_cond.wait()
                if self._closed:
                    return
                handle, layer, event, resend = self._jobs.popleft()
            if handle.done():
                continue
            try:
                refs = resend or plan_chunks(
                    self.layout, handle.codec, list(handle.tensors[layer].values()), self._chunk_bytes,
                    self.max_payload, self._exact_tokens, self._kv_heads,
                )  # fmt: skip
                if event is not None and self._side_stream is not None:
                    self._side_stream.wait_event(event)
                if not self._encode_in_order(handle, refs, resend=bool(resend)):
                    return
            except StagingClosed:
                return  # the sender is closing
            except Exception as exc:  # a bug or a bad tensor must fail the transfer, not kill the thread
                log.exception("encoding layer %d of %r failed", layer, handle.request_id)
                self._cancel(handle, f"encoding layer {layer} failed: {exc}", TransferError)

    def _encode_in_order(self, handle: SendHandle, refs: list[ChunkRef], resend: bool = False) -> bool:
        """Encode ``refs`` (in parallel when a CPU codec has work to do) and queue the chunks
        in order, so the wire still carries them in layer order. False once closed."""
        pending: collections.deque = collections.deque()
        window = 2 * self._encode_threads
        try:
            for ref in refs:
                if handle.done():
                    break
                if self._encoders is None:
                    if not self._queue_chunk(self._encode(handle, ref, resend)):
                        return False
                    continue
                pending.append(self._encoders.submit(self._encode, handle, ref, resend))
                if len(pending) >= window and not self._queue_chunk(pending.popleft().result()):
                    return False
            while pending:
                if not self._queue_chunk(pending.popleft().result()):
                    return False
            return True
        finally:
            for future in pending:  # after a failure or a close: give their slots back
                chunk = future.result() if not future.exception() else None
                if chunk is not None:
                    chunk.payload.release()

    def _queue_chunk(self, chunk: _OutChunk) -> bool:
        with self._lock:
            while self._out_bytes >= self._out_limit and not self._closed:
                self._space.wait()
            if self._closed or chunk.transfer.done():
                chunk.payload.release()
                return not self._closed  # a transfer that ended while this chunk was encoded
            (self._resends if chunk.resend else self._out).append(chunk)
            self._out_bytes += chunk.nbytes
            self._wake_writer()
            return True

    def _queue(self) -> collections.deque[_OutChunk]:
        """(lock held) Where the next chunk comes from: resends first."""
        return self._resends if self._resends else self._out

    def _wake_writer(self) -> None:
        """(lock held) Wake one waiting writer that has credit for the next chunk, taking
        the connections in turn so that chunks stripe over all of them."""
        queue = self._queue()
        if not queue:
            return
        need = queue[0].nbytes
        n = len(self._conns)
        for i in range(n):
            c = self._conns[(self._next_writer + i) % n]
            if c.waiting and c.alive and not c.retiring and c.credit >= need:
                c.waiting = False
                c.wake.notify()
                self._next_writer = (c.index + 1) % n
                return

    def _wake_all(self) -> None:
        """(lock held) Wake every thread waiting on the queue: closing, or a connection died."""
        self._space.notify_all()
        for c in self._conns:
            c.wake.notify()

    def _encode(self, handle: SendHandle, ref: ChunkRef, resend: bool = False) -> _OutChunk:
        spec = chunk_spec(self.layout, handle.tensors[ref.layer][ref.tensor], ref.count)
        payload = self.encoder.encode(handle, ref, spec, ref.codec(handle.codec))  # raw for exact tokens
        return _OutChunk(handle, ref, payload, spec.raw_nbytes, resend)

    def _next_chunks(self, conn: _Conn) -> list[tuple[_OutChunk, list[bytes]]] | None:
        """The next chunks this connection has credit for, each with the BEGIN it needs
        first if its request is new on this connection; None once closed or dead. Chunks
        of transfers that ended meanwhile are dropped here, so they leave no record behind.

        A writer that reads its connection too (``conn.duplex``) gets ``[]`` where another
        would wait here: it waits outside the lock, for a notification or a frame to read.

        Usually one chunk; on a short path (``gather``: loopback, one datacenter) up to
        ``GATHER_CHUNKS`` when more are queued and no other connection's writer is
        waiting for one: one ``sendmsg`` for several frames costs the kernel less per byte
        than one each (docs/development.md), and a connection that waits is never passed
        over for it."""
        with self._lock:
            conn.waiting = False
            while True:
                if self._closed or not conn.alive or conn.retiring:
                    return None
                queue = self._queue()
                if queue and queue[0].transfer.done():
                    chunk = queue.popleft()
                    self._out_bytes -= chunk.nbytes
                    chunk.payload.release()
                    self._space_freed()
                    continue
                if queue and queue[0].nbytes <= conn.credit:
                    taken = [self._take_locked(conn, queue)]
                    if self.gather:
                        self._gather_locked(conn, taken)
                    self._space_freed()
                    self._wake_writer()  # the next chunk, if any, to another connection
                    return taken
                conn.waiting = True
                if conn.duplex:
                    return []
                conn.wake.wait()  # type: ignore[call-arg]
                conn.waiting = False

    def _take_locked(self, conn: _Conn, queue: collections.deque[_OutChunk]) -> tuple[_OutChunk, list[bytes]]:
        """(lock held) Take the chunk at the head of ``queue`` for ``conn``."""
        chunk = queue.popleft()
        self._out_bytes -= chunk.nbytes
        conn.credit -= chunk.nbytes
        conn.inflight[chunk.transfer.tag].append(chunk.ref)
        # Counted before the send: the receiver may acknowledge the request (and finish()
        # return these statistics) before the send returns.
        self._count_locked(chunk.transfer, chunk, +1)
        return chunk, _begin_frames(conn, chunk.transfer)

    def _gather_locked(self, conn: _Conn, taken: list[tuple[_OutChunk, list[bytes]]]) -> None:
        """(lock held) Add queued chunks to the one ``conn``'s writer took while it may: up
        to ``GATHER_CHUNKS`` and ``GATHER_BYTES``, host payloads, within its credit, and
        only while no other connection's writer waits for the next one."""
        if taken[0][0].payload.device is not None:
            return
        nbytes = taken[0][0].nbytes
        while len(taken) < GATHER_CHUNKS:
            queue = self._queue()
            if not queue:
                return
            head = queue[0]
            need = head.nbytes
            if head.transfer.done() or head.payload.device is not None or need > conn.credit:
                return
            if nbytes + need > GATHER_BYTES:
                return
            for c in self._conns:
                if c is not conn and c.waiting and c.alive and not c.retiring and c.credit >= need:
                    return
            taken.append(self._take_locked(conn, queue))
            nbytes += need

    def _space_freed(self) -> None:
        """(lock held) A chunk left the queue: wake the encoder once the queue has drained a
        quarter below its limit, not for every chunk taken (a wake-up per chunk was 0.7
        context switches per 2 MiB frame); it then queues several chunks per wake-up."""
        if self._out_bytes <= self._out_limit - self._out_limit // 4:
            self._space.notify()

    def _write_loop(self, conn: _Conn) -> None:
        try:
            while True:
                taken = self._next_chunks(conn)
                if taken is None:
                    return
                try:
                    self._send_taken(conn, taken)
                except PeerLost as exc:
                    self._writer_lost(conn, exc)
                    return
        except ProtocolError as exc:  # the reader found the peer's frames bad meanwhile
            self._connection_lost(conn, exc)
        except Exception as exc:  # a bug must not leave a live connection nobody writes to
            log.exception("connection %d: its writer failed", conn.index)
            self._connection_lost(conn, exc)

    def _duplex_loop(self, conn: _Conn) -> None:
        """The writer of a connection whose control frames it reads too (``conn.duplex``):
        credits, acknowledgements and NACKs are read after each send without waiting, and
        while there is nothing to send it waits for them as well as for a chunk. Once it
        sends no more (closing, retiring, the send failed) it reads what is left as a
        reader thread would; once the connection with the reader is lost and this one is
        the oldest (``conn.hand_over``), a reader thread takes over and it only writes."""
        wake = conn.wake
        assert isinstance(wake, _Wakeup)
        with self._lock:
            wake.open()
        handed_over = False
        try:
            while not (handed_over := conn.hand_over):
                taken = self._next_chunks(conn)
                if taken is None:
                    break
                if taken:
                    try:
                        self._send_taken(conn, taken)
                    except PeerLost as exc:
                        self._writer_lost(conn, exc)
                        break
                else:
                    wake.wait(conn.stream)
                for event in conn.channel.read_ready():
                    self._on_event(conn, event)
        except KvwireError as exc:
            self._connection_lost(conn, exc)
            return
        except Exception as exc:  # a bug must not leave a live connection that nobody reads
            log.exception("connection %d: its writer failed", conn.index)
            self._connection_lost(conn, exc)
            return
        finally:
            with self._lock:
                wake.close()
                if handed_over:  # a writer with a reader beside it, from now on
                    conn.duplex, conn.wake = False, threading.Condition(self._lock)
                    reader = Thread(self._read_loop, f"kvwire-ack-{conn.index}", (conn,))
                    conn.threads.append(reader)
                    self._threads.append(reader)
        if not handed_over:
            self._read_loop(conn)
            return
        reader.start()
        log.info("connection %d reads the acknowledgements now", conn.index)
        self._write_loop(conn)

    def _send_taken(self, conn: _Conn, taken: list[tuple[_OutChunk, list[bytes]]]) -> None:
        """Write the chunks ``_next_chunks`` took, each behind its header (PeerLost: the
        connection failed; they are uncounted, to be sent again elsewhere)."""
        try:
            parts: list = []
            proto, checked = conn.proto, self.checksum != "none"
            for chunk, frames in taken:
                ref, payload = chunk.ref, chunk.payload
                crc = payload.checksum() if checked else 0
                header = proto.data_header(chunk.transfer.tag, ref.layer, ref.tensor, ref.start, ref.count,
                                           payload.nbytes, crc, ref.raw)  # fmt: skip
                if frames:
                    parts += frames
                parts.append(header)
                if payload.device is None:
                    parts += payload.parts
            # Counted before the send, as the chunks are: the acknowledgement may come first.
            conn.data_frames += len(taken)
            conn.data_sends += 1
            try:
                device = taken[0][0].payload.device  # a device payload is always taken alone
                conn.stream.send_parts(parts, device_payload=device)
            except PeerLost:
                conn.data_frames -= len(taken)
                conn.data_sends -= 1
                for chunk, _ in taken:
                    self._count(chunk.transfer, chunk, -1)  # its frame and bytes are counted again when resent
                raise
        finally:
            for chunk, _ in taken:
                chunk.payload.release()

    def _count(self, handle: SendHandle, chunk: _OutChunk, sign: int) -> None:
        with self._lock:
            self._count_locked(handle, chunk, sign)

    @staticmethod
    def _count_locked(handle: SendHandle, chunk: _OutChunk, sign: int) -> None:
        """Frames and their bytes as they go (resends too); the request's KV bytes once per
        chunk: counted at its first send and not taken back if that send fails (it goes out
        again as a resend, which adds no KV)."""
        handle.chunks += sign
        handle.wire_bytes += sign * chunk.nbytes
        if sign > 0 and not chunk.resend:
            handle.logical_bytes += chunk.logical_bytes

    def _read_loop(self, conn: _Conn) -> None:
        try:
            while True:
                for event in conn.channel.next_events():
                    self._on_event(conn, event)
        except KvwireError as exc:  # lost, a bad frame, a REJECT where none belongs...
            self._connection_lost(conn, exc)
        except Exception as exc:  # a bug must not leave a live connection nobody reads
            log.exception("connection %d: its reader failed", conn.index)
            self._connection_lost(conn, exc)

    def _on_event(self, conn: _Conn, event) -> None:
        if isinstance(event, Credit):
            with self._lock:
                conn.credit += event.nbytes
                queue = self._queue()
                # (a duplex connection's own writer reads it, and looks for a chunk next)
                if conn.waiting and not conn.duplex and queue and queue[0].nbytes <= conn.credit:
                    conn.waiting = False
                    conn.wake.notify()
            return
        with self._lock:
            handle = self._transfers.get(event.tag)
        if handle is None:
            return
        if isinstance(event, Nack):
            self._resend_nacked(conn, handle, event)
            return
        if isinstance(event, Ack):
            failed = ChecksumMismatch if event.checksum else TransferError
            handle._complete(None if event.ok else failed(f"receiver failed {handle.request_id!r}: {event.message}"))
        elif isinstance(event, Cancel):
            handle._complete(Cancelled(f"transfer {handle.request_id!r} cancelled by the receiver: {event.reason}"))

    def _resend_nacked(self, conn: _Conn, handle: SendHandle, nack: Nack) -> None:
        """The receiver asks for a chunk again (its payload failed the checksum on the way):
        encode it again from the source blocks, which the transfer keeps until it is
        acknowledged, and send it before new chunks. A receiver that keeps asking is not
        followed forever."""
        t = handle.tensors[nack.layer].get(nack.tensor) if 0 <= nack.layer < len(handle.tensors) else None
        if t is None:
            raise ProtocolError(f"NACK for layer {nack.layer} tensor {nack.tensor}, which this transfer does not send")
        check_rows(t, nack.start, nack.count)  # ProtocolError: closes this connection
        ref = ChunkRef(nack.layer, nack.tensor, t.name, nack.start, nack.count, nack.raw,
                       None if t.whole else self._kv_heads)  # fmt: skip
        with self._lock:
            handle.nacked_chunks += 1
            too_many = handle.nacked_chunks > MAX_NACKS_PER_TRANSFER
            if not too_many:
                self._jobs.appendleft((handle, nack.layer, None, [ref]))
                self._jobs_cond.notify()
        if too_many:
            self._cancel(handle, f"the receiver asked for {handle.nacked_chunks} chunks again ({nack.reason})",
                         ChecksumMismatch)  # fmt: skip

    def _writer_lost(self, conn: _Conn, exc: Exception) -> None:
        """A send failed: the peer closed or reset the connection. Frames it sent before
        may still wait in the socket for the reader (the acknowledgement of a transfer the
        receiver completed just before closing), so the connection ends when its reader
        meets the end of the stream, not now: writing stops (a TCP half-close, which also
        makes a live peer end it) and the reader reads what is left. A reader that has not
        ended within ``WRITER_LOSS_GRACE_S`` is cut off."""
        shutdown_write = getattr(conn.stream, "shutdown_write", None)
        if shutdown_write is None or not shutdown_write():
            self._connection_lost(conn, exc)
            return
        timer = threading.Timer(WRITER_LOSS_GRACE_S, self._connection_lost, (conn, exc))
        timer.daemon = True
        timer.start()

    def _connection_lost(self, conn: _Conn, exc: Exception) -> None:
        with self._lock:
            if not conn.alive or self._closed:
                return
            conn.alive = False
            self._lost_conns += 1  # the link follower does not replace it (sender_link.py)
            alive = [c for c in self._conns if c.alive]
            lost = {tag: refs for tag, refs in conn.inflight.items() if tag in self._transfers}
            conn.inflight.clear()
            if alive:
                for tag, refs in lost.items():
                    handle = self._transfers[tag]
                    handle.resent_chunks += len(refs)
                    self._jobs.appendleft((handle, refs[0].layer, None, list(refs)))
                self._jobs_cond.notify()
            doomed = [] if alive else [t for t in self._transfers.values() if not t.done()]
            if alive and all(c.duplex and not c.hand_over for c in alive):
                # It had the reader: the receiver acknowledges on the oldest connection left now.
                heir = min(alive, key=lambda c: c.opened)
                heir.hand_over = True
            self._wake_all()
        conn.stream.close()
        log.warning("connection %d to %s lost: %s (%d left)", conn.index, conn.stream.peer, exc, len(alive))
        for t in doomed:
            t._complete(PeerLost(f"transfer {t.request_id!r}: every connection to the receiver is lost ({exc})"))


def transfer_arguments(
    layout: KVLayout, num_blocks: int, request_id, block_ids, num_tokens, states, deadline, max_exposed_ms,
    layers_per_s, refuse_if_late
) -> tuple[str, Selection, float | None, float | None]:  # fmt: skip
    """The checks of :meth:`Sender.transfer` that need no connection (a ShardedSender's
    transfer makes them too, even when it serves no decode rank): the request id, the
    selection, the target in seconds (None: the sender's) and the pace (None: likewise)."""
    request_id, sel = request_arguments(request_id, block_ids, num_tokens, deadline, layout.block_size, num_blocks)
    if sel.num_tokens < 1:  # nothing to send: no BEGIN would go out, and no ACK come back
        raise ValueError(f"num_tokens: a transfer sends at least 1 token, got {sel.num_tokens}")
    for i, t in (states or {}).items():
        layout.check_state(i, t, f"states[{i}]")
    if not isinstance(refuse_if_late, bool):
        raise TypeError(f"refuse_if_late: expected a bool, got {type(refuse_if_late).__name__}")
    return request_id, sel, _milliseconds(max_exposed_ms, "max_exposed_ms"), _rate(layers_per_s, "layers_per_s")


def _positive(value, name: str, unit: str, low: float, high: float) -> float:
    """A number of ``unit`` in ``[low, high]`` (``low`` excluded when it is 0): NaN,
    infinity and bools refused, and values whose timelines would overflow to infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected {unit} as a number, got {type(value).__name__}")
    if not math.isfinite(value) or not (low < value if low == 0 else low <= value) or value > high:
        raise ValueError(f"{name}: expected {unit} {'above' if low == 0 else 'from'} {low:g} to {high:g}, "
                         f"got {value!r}")  # fmt: skip
    return float(value)


def _milliseconds(value, name: str) -> float | None:
    """An optional target in milliseconds, as seconds."""
    if value is None:
        return None
    return _positive(value, name, "milliseconds", 0, MAX_SECONDS * 1e3) / 1e3


def _rate(value, name: str) -> float | None:
    """An optional pace in layers per second: a prefill of a layer in at most about 11
    days (1e-6), at most a billion a second."""
    if value is None:
        return None
    return _positive(value, name, "layers per second", 1e-6, 1e9)


def _ucx_cuda(host: str) -> bool:
    from kvwire.transport import ucx

    return ucx.moves_device_memory(host)
