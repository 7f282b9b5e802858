"""TCP byte streams: socket tuning in one place, exact reads, gathered writes, TCP_INFO.

One :class:`TcpStream` is one connection. The engine opens several per peer and
stripes chunks over them: a single TCP flow across a long link is capped by its window
(``tcp_wmem`` max / RTT: 4 MiB over 40 ms is 0.84 Gbit/s) and by how one loss halves it;
several flows fill the link and lose less when one of them backs off.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import itertools
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kvwire import scatter
from kvwire.errors import PeerLost

# Linux socket options that the socket module may not name on every Python version.
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
TCP_INFO = getattr(socket, "TCP_INFO", 11)

# sendmsg accepts at most IOV_MAX (1024 on Linux) buffers per call.
IOV_MAX = 1024
# A write to a connection the peer closed fails with EPIPE instead of raising SIGPIPE:
# Python ignores the signal, but a C program that embeds kvwire (libkvwire.so) would die
# of it (the compiled helper's writes pass the same flag).
NO_SIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
WAITALL_MIN = 64 * 1024  # reads this large wait for all their bytes in one call
# Control frames (credits, acks, cancels) are tens of bytes; this many unread means the
# peer stopped reading long ago, and the connection is given up rather than grow forever.
MAX_OUTBOX_BYTES = 1 << 20
LOCAL_SNDBUF = 128 << 10  # SocketOptions.local_sndbuf: a connection to this host
# Below this, a loopback connection (64 KiB segments) holds under two segments in flight,
# and the receiver's delayed acknowledgements pace it: 32 KiB moved about 1.5 MB/s.
LOCAL_SNDBUF_MIN = 128 << 10


@dataclass(frozen=True)
class SocketOptions:
    """How each data connection is tuned. The defaults suit loopback and long links alike.

    * ``nodelay``: acknowledgements and credits are small frames that must not wait for
      Nagle's algorithm (up to 40 ms of delayed-ACK interplay); data frames are large
      enough that Nagle never mattered for them.
    * ``notsent_lowat``: cap on data queued in the kernel but not yet sent, so that a
      cancellation or a more urgent request is not stuck behind several MiB that are
      merely waiting. Off by default: with 2 MiB it cost 30-40% of loopback throughput
      on a 2-core machine (more wake-ups per byte) in an early engine, and ``tcp_wmem``
      already bounds what can wait (4 MiB per connection on the reference machine).
      Measured again on 2026-12-03, 256 KiB moved 1.16x on loopback, less than
      ``local_sndbuf``'s 128 KiB (1.6x); across a real link it is unmeasured.
    * ``sndbuf`` / ``rcvbuf``: None leaves Linux's autotuning on (up to ``tcp_wmem`` /
      ``tcp_rmem`` max). Setting them fixes the size and turns autotuning off.
    * ``local_sndbuf``: the send buffer of a connection to this host (the peer's address
      is a loopback one, or the connection's own), unless ``sndbuf`` is set. Both ends
      then share this machine's caches, and a small buffer keeps the bytes the receiver
      copies out in them (loopback, 128 KiB against autotuning: raw 1.6x the throughput
      without checksums, 1.3x with CRC32C; docs/benchmarks.md). Across a real link the
      buffer caps what is in flight, which is why only this host gets it. At least
      128 KiB: below, the receiver's delayed acknowledgements pace the connection. None:
      the kernel's autotuning there too.
    * ``congestion``: e.g. ``"bbr"`` or ``"cubic"``; None keeps the system default.
    * ``user_timeout_s``: data unacknowledged this long fails the connection, instead of
      the kernel retransmitting for ~15 minutes: a dead peer becomes an error quickly.
    * ``keepalive_s``: probes on idle connections, so a peer that vanished while nothing
      was in flight is noticed too.
    """

    nodelay: bool = True
    notsent_lowat: int | None = None
    sndbuf: int | None = None
    rcvbuf: int | None = None
    congestion: str | None = None
    user_timeout_s: float = 30.0
    keepalive_s: float = 10.0
    local_sndbuf: int | None = LOCAL_SNDBUF

    def __post_init__(self) -> None:
        if self.local_sndbuf is not None and (
            isinstance(self.local_sndbuf, bool)
            or not isinstance(self.local_sndbuf, int)
            or self.local_sndbuf < LOCAL_SNDBUF_MIN
        ):
            raise ValueError(
                f"local_sndbuf: expected None or at least {LOCAL_SNDBUF_MIN} bytes (smaller buffers let delayed "
                f"acknowledgements pace a loopback connection), got {self.local_sndbuf!r}"
            )


def tune(sock: socket.socket, options: SocketOptions) -> None:
    """Apply ``options`` to a connected (or about to connect) TCP socket."""
    if options.nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if options.notsent_lowat:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, options.notsent_lowat)
    if options.sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, options.sndbuf)
    if options.rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, options.rcvbuf)
    if options.congestion:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, options.congestion.encode())
        except OSError as exc:
            raise ValueError(
                f"congestion: {options.congestion!r} is not available here "
                f"(see /proc/sys/net/ipv4/tcp_available_congestion_control): {exc}"
            ) from None
    if options.user_timeout_s:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(options.user_timeout_s * 1000))
    if options.keepalive_s:
        idle = max(1, int(options.keepalive_s))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


# struct tcp_info (linux/tcp.h), the fields a scheduler needs to see congestion early.
# (name, offset, format); fields past what the kernel returns are left out.
_TCP_INFO_FIELDS = (
    ("state", 0, "B"),
    ("ca_state", 1, "B"),
    ("retransmits", 2, "B"),
    ("rto_us", 8, "I"),
    ("snd_mss", 16, "I"),
    ("unacked", 24, "I"),
    ("lost", 32, "I"),
    ("retrans", 36, "I"),
    ("rtt_us", 68, "I"),
    ("rttvar_us", 72, "I"),
    ("snd_ssthresh", 76, "I"),
    ("snd_cwnd", 80, "I"),
    ("total_retrans", 100, "I"),
    ("pacing_rate", 104, "Q"),
    ("bytes_acked", 120, "Q"),
    ("bytes_received", 128, "Q"),
    ("notsent_bytes", 144, "I"),
    ("min_rtt_us", 148, "I"),
    ("delivery_rate", 160, "Q"),
    ("busy_time_us", 168, "Q"),
    ("rwnd_limited_us", 176, "Q"),
    ("sndbuf_limited_us", 184, "Q"),
    ("bytes_sent", 200, "Q"),
    ("bytes_retrans", 208, "Q"),
    ("snd_wnd", 228, "I"),
)
_TCP_INFO_SIZE = 232


def _whole_struct(fields) -> struct.Struct:
    """One struct for every field at once (padding between them): what a kernel that
    returns the whole ``tcp_info`` is read with, in one call instead of one per field."""
    fmt, at = "<", 0
    for _, offset, code in sorted(fields, key=lambda f: f[1]):
        fmt += f"{offset - at}x{code}" if offset > at else code
        at = offset + struct.calcsize(code)
    return struct.Struct(fmt)


_TCP_INFO_WHOLE = _whole_struct(_TCP_INFO_FIELDS)
_TCP_INFO_NAMES = tuple(name for name, _, _ in sorted(_TCP_INFO_FIELDS, key=lambda f: f[1]))


def parse_tcp_info(raw: bytes) -> dict[str, int]:
    """The fields of ``_TCP_INFO_FIELDS`` that ``raw`` (what getsockopt returned) holds."""
    if len(raw) >= _TCP_INFO_WHOLE.size:  # the usual case, sampled many times a second
        return dict(zip(_TCP_INFO_NAMES, _TCP_INFO_WHOLE.unpack_from(raw)))
    out = {}
    for name, offset, fmt in _TCP_INFO_FIELDS:  # an older kernel's shorter struct
        size = struct.calcsize(fmt)
        if offset + size <= len(raw):
            (out[name],) = struct.unpack_from("<" + fmt, raw, offset)
    return out


def _ready(fd: int, events: int, timeout_ms: float | None) -> bool:
    """Whether ``fd`` is ready for ``events`` (errors and hang-ups report too) within
    ``timeout_ms`` (None: no limit). ``poll``, not ``select``, which refuses descriptors
    of 1024 and more."""
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(timeout_ms))


class TcpStream:
    """One connected TCP (or TLS) socket: write all of a frame, read exactly N bytes.

    Sending is serialised by a lock so a frame's header and payload are never interleaved
    with another thread's frame. Errors surface as :class:`PeerLost`.
    """

    device_payloads = False  # TCP carries payloads from host memory only (UCX may not)

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.bytes_sent = 0
        self.bytes_received = 0
        self.opened = time.monotonic()
        self.send_buffer: int | None = None  # bytes asked for with SO_SNDBUF; None: the kernel's autotuning
        self._send_lock = threading.Lock()
        self._outbox_lock = threading.Lock()
        # Control frames waiting for the writer: queued by threads that must not wait
        # behind a frame being written (a cancel, a credit), sent between frames.
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_bytes = 0
        self._tls = isinstance(sock, ssl.SSLSocket)
        # TLS: OpenSSL allows one thread at a time in an SSL object, and a connection has a
        # reader and writers. Once its handshake is done the socket is non-blocking and every
        # call into it holds this lock for that call alone (never while waiting for the
        # socket: _tls_io), and the stream keeps the timeout the socket would have had.
        self._ssl_lock = threading.Lock()
        self._tls_timeout: float | None = None
        self._tls_ready = False
        self.closed = False
        self.writing_stopped = False  # shutdown_write: nothing more is sent, the reading goes on
        # Calls under way on the socket (hold/release): a close meanwhile shuts the socket
        # down at once (which ends them) and leaves closing its descriptor to the last one,
        # so no call ever reaches a descriptor number the process has given to another socket.
        self._users = 0
        self._users_lock = threading.Lock()

    def send_parts(self, parts: Sequence[bytes | memoryview | scatter.Spans], device_payload=None) -> None:
        """Write every byte of ``parts`` in order (gathered with sendmsg, no joining copy),
        after any control frames queued before them."""
        if device_payload is not None:
            raise ValueError("device_payload: TCP carries payloads from host memory only")
        self._check_writing()
        with self._send_lock:
            pending = self._take_outbox()
            views, spans, nbytes = [], False, 0
            for p in (*pending, *parts) if pending else parts:
                if isinstance(p, scatter.Spans):
                    spans = True
                    nbytes += p.nbytes
                else:
                    view = memoryview(p).cast("B")
                    views.append(view)
                    nbytes += len(view)
            if spans and self._tls:  # the helper writes the socket itself: never under TLS
                raise ValueError("parts: spans cannot go over TLS; send a copy")
            self.hold()  # PeerLost once closed, before anything is counted
            try:
                # Counted before the send: the peer may answer (and a caller read the
                # statistics) before this thread runs again; a failed send uncounts it.
                self.bytes_sent += nbytes
                try:
                    if spans:  # a chunk as spans of the cache: the compiled helper writes it all
                        scatter.send_parts(self.sock, [*pending, *parts])
                    elif self._tls:  # SSL sockets have no sendmsg
                        for view in views:
                            self._tls_send_all(view)
                    else:
                        self._sendmsg_all(views, nbytes)
                except OSError as exc:
                    self.bytes_sent -= nbytes
                    raise PeerLost(f"connection to {self.peer} lost while sending: {exc}") from None
            finally:
                self.release()
        if self._outbox:
            self.flush_control()  # frames queued while this one was being written

    def send_control(self, frame: bytes) -> None:
        """Queue a small control frame and return at once, whatever the peer is doing.

        It goes out now if no other thread is writing and the socket has room, else
        between frames: the next :meth:`send_parts` or :meth:`flush_control` sends it.
        A peer that leaves ``MAX_OUTBOX_BYTES`` of control frames unread is lost."""
        if self.closed:
            raise PeerLost(f"connection to {self.peer} is closed")
        self._check_writing()
        with self._outbox_lock:
            self._outbox.append(frame)
            self._outbox_bytes += len(frame)
            overflow = self._outbox_bytes > MAX_OUTBOX_BYTES
        if overflow:
            self.close()
            raise PeerLost(
                f"connection to {self.peer}: the peer left {MAX_OUTBOX_BYTES} bytes of control frames unread"
            )
        self.flush_control()

    def flush_control(self) -> None:
        """Send queued control frames if that needs no waiting: not while another thread
        writes (that one sends them when its frame is done), not beyond the socket's room."""
        while self._outbox and not self.closed and not self.writing_stopped and self._send_lock.acquire(blocking=False):
            try:
                drained = self._send_outbox_nowait()
            finally:
                self._send_lock.release()
            if not drained:
                return  # the socket is full; the next writer or flush sends the rest

    def _check_writing(self) -> None:
        """PeerLost once writing has stopped: a send then would fail, and its failure would
        close the stream, cutting off the reading that :meth:`shutdown_write` leaves open."""
        if self.writing_stopped:
            raise PeerLost(f"connection to {self.peer}: writing has stopped (a send failed before)")

    def _take_outbox(self) -> list[bytes]:
        with self._outbox_lock:
            frames = list(self._outbox)
            self._outbox.clear()
            self._outbox_bytes = 0
        return frames

    def _send_outbox_nowait(self) -> bool:
        """(send lock held) Send what the socket takes now; keep the rest. True once empty.

        Frames another thread queues meanwhile (its own flush found the lock held) are sent
        too: only a socket that takes less than it is given stops the loop."""
        self.hold()
        try:
            while True:
                if self._tls:
                    # No MSG_DONTWAIT for SSL sockets: write only when the socket reports room,
                    # which for these frames (tens of bytes) means the write cannot block.
                    if not self._outbox:
                        return True
                    if not _ready(self.sock.fileno(), select.POLLOUT, 0):
                        return False
                    for frame in self._take_outbox():
                        self.bytes_sent += len(frame)
                        self._tls_send_all(memoryview(frame))
                    continue
                with self._outbox_lock:
                    frames = list(itertools.islice(self._outbox, IOV_MAX))
                if not frames:
                    return True
                try:
                    sent = self.sock.sendmsg([memoryview(f) for f in frames], [], socket.MSG_DONTWAIT | NO_SIGNAL)
                except BlockingIOError:
                    return False
                self.bytes_sent += sent
                full = sent < sum(len(f) for f in frames)
                with self._outbox_lock:
                    self._outbox_bytes -= sent
                    while sent:
                        head = self._outbox[0]
                        if sent >= len(head):
                            sent -= len(head)
                            self._outbox.popleft()
                        else:  # a partly sent frame: its tail goes first next time
                            self._outbox[0] = head[sent:]
                            sent = 0
                if full:
                    return False
        except OSError as exc:
            self.close()
            raise PeerLost(f"connection to {self.peer} lost while sending: {exc}") from None
        finally:
            self.release()

    def _sendmsg_all(self, views: list[memoryview], nbytes: int) -> None:
        """Write ``views`` (``nbytes`` in all); usually one call writes them all."""
        while views:
            sent = self.sock.sendmsg(views[:IOV_MAX], [], NO_SIGNAL)
            nbytes -= sent
            if not nbytes:
                return
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0
            while views and len(views[0]) == 0:
                views.pop(0)

    def recv_into_exact(self, view: memoryview) -> None:
        """Fill ``view`` completely or raise PeerLost (EOF counts as lost)."""
        view = view.cast("B") if view.format != "B" else view
        got, total = 0, len(view)
        # Payloads: MSG_WAITALL lets one system call gather the whole frame (fewer returns
        # to Python per MiB); it returns early only on a signal, EOF or error.
        flags = socket.MSG_WAITALL if total >= WAITALL_MIN and not self._tls else 0
        self.hold()
        try:
            while got < total:
                if self._tls_ready:
                    n = self._tls_io(self.sock.recv_into, view[got:], total - got)
                else:
                    n = self.sock.recv_into(view[got:], total - got, flags)
                if n == 0:
                    raise PeerLost(f"connection to {self.peer} closed by the peer")
                got += n
        except OSError as exc:
            raise PeerLost(f"connection to {self.peer} lost while receiving: {exc}") from None
        finally:
            self.bytes_received += got
            self.release()

    def recv_into_views(self, views: Sequence) -> None:
        """Fill every view in order, as if they were one buffer: one scatter read
        (``recvmsg_into`` with MSG_WAITALL) lands a payload in its destination rows, in
        place, however many runs of blocks they span; or one :class:`~kvwire.scatter.Spans`
        alone (some heads of each token, or the runs of blocks), through the compiled helper."""
        if any(isinstance(v, scatter.Spans) for v in views):  # spans of the cache, in place
            if self._tls or len(views) != 1:
                raise ValueError("views: spans are received alone, and not over TLS")
            try:
                with self.held():
                    n = scatter.recv_spans(self.sock, views[0])
            except OSError as exc:
                raise PeerLost(f"connection to {self.peer} lost while receiving: {exc}") from None
            self.bytes_received += n
            if n < views[0].nbytes:
                raise PeerLost(f"connection to {self.peer} closed by the peer")
            return
        if self._tls:  # SSL sockets have no recvmsg_into
            for view in views:
                self.recv_into_exact(view)
            return
        pending = [v.cast("B") if v.format != "B" else v for v in views if v.nbytes]
        self.hold()
        try:
            while pending:
                n = self.sock.recvmsg_into(pending[:IOV_MAX], 0, socket.MSG_WAITALL)[0]
                if n == 0:
                    raise PeerLost(f"connection to {self.peer} closed by the peer")
                self.bytes_received += n
                while n:
                    if n >= len(pending[0]):
                        n -= len(pending.pop(0))
                    else:
                        pending[0] = pending[0][n:]
                        n = 0
        except OSError as exc:
            raise PeerLost(f"connection to {self.peer} lost while receiving: {exc}") from None
        finally:
            self.release()

    def recv_device_into(self, tensor) -> None:
        raise ValueError("tensor: TCP carries payloads into host memory only")

    @property
    def nowait_reads(self) -> bool:
        """Whether recv_nowait and wait_readable work: one thread may write frames and read
        the peer's between its writes (plain TCP; a TLS record may arrive half). A server
        stream turns TLS after it is made (TcpListener.finish_accept), hence asked each time."""
        return not self._tls

    def recv_nowait(self, n: int) -> bytes:
        """Up to ``n`` bytes the socket holds now, without waiting: ``b""`` if none. The end
        of the stream is PeerLost. Plain TCP only (a TLS record may be half there)."""
        if self._tls or self.sock.gettimeout() is not None:  # with a timeout, Python would wait for it
            raise ValueError("recv_nowait: plain TCP in blocking mode only (no TLS, no socket timeout)")
        self.hold()
        try:
            data = self.sock.recv(n, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise PeerLost(f"connection to {self.peer} lost while receiving: {exc}") from None
        finally:
            self.release()
        if not data:
            raise PeerLost(f"connection to {self.peer} closed by the peer")
        self.bytes_received += len(data)
        return data

    def wait_readable(self, also: int) -> None:
        """Wait until the socket has bytes to read (or its end, or an error) or descriptor
        ``also`` (an eventfd another thread writes to wake this one) is readable. Plain
        TCP only. PeerLost once the stream is closed."""
        if self._tls:
            raise ValueError("wait_readable: not over TLS")
        fd = self.hold()
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.register(also, select.POLLIN)
            poller.poll()
        finally:
            self.release()

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self.recv_into_exact(memoryview(buf))
        return bytes(buf)

    def tcp_info(self) -> dict[str, int]:
        try:
            return parse_tcp_info(self.sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCP_INFO_SIZE))
        except OSError:
            return {}

    def stats(self) -> dict:
        elapsed = max(time.monotonic() - self.opened, 1e-9)
        return {
            "peer": self.peer,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "goodput_gb_per_s": round(max(self.bytes_sent, self.bytes_received) / elapsed / 1e9, 4),
            "send_buffer": self.send_buffer,
            "tcp": self.tcp_info(),
        }

    def settimeout(self, seconds: float | None) -> None:
        if self._tls_ready:
            self._tls_timeout = seconds  # the socket stays non-blocking (_tls_io)
        else:
            self.sock.settimeout(seconds)

    def tls_ready(self) -> None:
        """(the TLS handshake done) From now on calls into the SSL object are non-blocking,
        one thread at a time (:meth:`_tls_io`); the socket's timeout becomes the stream's."""
        self._tls_timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        self._tls_ready = True

    def _tls_io(self, call, *args):
        """``call(*args)`` into the SSL object with the SSL lock held; when it needs the socket
        (SSLWantRead/Write) the lock is let go while waiting for it, within the stream's
        timeout (``TimeoutError``, an OSError, past it)."""
        deadline = None if self._tls_timeout is None else time.monotonic() + self._tls_timeout
        while True:
            with self._ssl_lock:
                if self.closed:  # close() shut the SSL object down: what the socket holds is ciphertext now
                    raise OSError(f"connection to {self.peer} is closed")
                try:
                    return call(*args)
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0) * 1e3
            if not _ready(self.sock.fileno(), events, wait):
                raise TimeoutError("timed out")

    def _tls_send_all(self, view: memoryview) -> None:
        while len(view):
            n = self._tls_io(self.sock.send, view)
            view = view[n:]

    def tls_handshake(self) -> None:
        """The client side of the TLS handshake of a stream ``connect`` left it to; nothing
        without TLS. PeerLost if it fails, or if the stream is closed meanwhile."""
        if not self._tls:
            return
        try:
            with self.held():  # as every call on the socket: a close ends it
                assert isinstance(self.sock, ssl.SSLSocket)
                self.sock.do_handshake()
                self.tls_ready()
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.close()
            raise PeerLost(f"TLS handshake with {self.peer} failed: {exc}") from None

    def shutdown_write(self) -> bool:
        """Stop sending (a half-close: the peer reads the end of the stream) while the
        reading side stays open for what the peer sent before. False if already closed, or
        over TLS: ``SSLSocket.shutdown`` drops the TLS session, and every later read would
        return the peer's records still encrypted (the caller closes such a stream at once)."""
        if self.closed or self._tls:
            return False
        self.writing_stopped = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already reset: the reader meets the end of the stream all the same
        return True

    def hold(self) -> int:
        """Begin a call on the socket (end it with :meth:`release`): its descriptor, which
        stays this socket's until then, however the stream is closed meanwhile. Raises
        PeerLost once the stream is closed."""
        with self._users_lock:
            if self.closed:
                raise PeerLost(f"connection to {self.peer} is closed")
            self._users += 1
            return self.sock.fileno()

    @contextlib.contextmanager
    def held(self) -> Iterator[int]:
        """:meth:`hold` and :meth:`release` around a block: the descriptor."""
        fd = self.hold()
        try:
            yield fd
        finally:
            self.release()

    def release(self) -> None:
        with self._users_lock:
            self._users -= 1
            last = self.closed and not self._users
        if last:  # a close came while this call was under way: the descriptor goes now
            self.sock.close()

    def close(self) -> None:
        """Close now: a thread blocked in recv or send on this stream gets an error (the
        socket is shut down at once; its descriptor is closed once no call uses it)."""
        with self._users_lock:
            if self.closed:
                return
            self.closed = True
            try:
                with self._ssl_lock:  # TLS: not while another thread is inside the SSL object (_tls_io)
                    self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if self._users:
                return  # the last call under way closes it (release)
        self.sock.close()


def parse_address(address: str | tuple[str, int], argument: str) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``(host, port)`` -> ``(host, port)``."""
    if isinstance(address, tuple):
        if len(address) != 2 or not isinstance(address[1], int):
            raise ValueError(f"{argument}: expected (host, port), got {address!r}")
        return address
    if not isinstance(address, str):
        raise TypeError(f"{argument}: expected 'host:port' or (host, port), got {type(address).__name__}")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{argument}: expected 'host:port', got {address!r}")
    return host.strip("[]"), int(port)


def to_this_host(sock: socket.socket) -> bool:
    """Whether connected ``sock``'s peer is on this host: a loopback address, or the
    address the connection itself has here."""
    try:
        peer, local = sock.getpeername()[0], sock.getsockname()[0]
    except OSError:
        return False
    return peer == local or ipaddress.ip_address(peer.split("%")[0]).is_loopback


def connect(
    address: tuple[str, int],
    options: SocketOptions,
    *,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    tls_handshake: bool = True,
) -> TcpStream:
    """A connected stream; ``timeout`` bounds the connect and each read after it.
    ``tls_handshake=False``: the socket is wrapped but its TLS handshake is left to
    :meth:`TcpStream.tls_handshake`, which a ``close()`` from another thread (a
    watchdog bounding the whole setup) ends at once."""
    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PeerLost(f"cannot resolve {host!r}: {exc}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        tune(sock, options)  # before connect, so the window scale is negotiated with the buffers
        sock.settimeout(timeout)
        sock.connect(sockaddr)
        send_buffer = options.sndbuf
        if send_buffer is None and options.local_sndbuf is not None and to_this_host(sock):
            send_buffer = options.local_sndbuf
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_hostname or host,
                                   do_handshake_on_connect=tls_handshake)  # fmt: skip
    except ValueError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise PeerLost(f"cannot connect to {host}:{port}: {exc}") from None
    stream = TcpStream(sock, f"{host}:{port}")
    stream.send_buffer = send_buffer
    if tls is not None and tls_handshake:  # done in wrap_socket: calls take turns from now on
        stream.tls_ready()
    return stream


class TcpListener:
    def __init__(
        self, address: tuple[str, int], options: SocketOptions, tls: ssl.SSLContext | None = None, backlog: int = 128
    ) -> None:
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(backlog)
        self.options = options
        self.tls = tls
        self.address = self.sock.getsockname()[:2]

    def accept(self) -> TcpStream:
        """Block for the next connection. Raises OSError once the listener is closed.

        With TLS, the TLS handshake is *not* done here (one slow peer would stall every
        accept): the thread that serves the connection does it, in :meth:`finish_accept`."""
        sock, addr = self.sock.accept()
        tune(sock, self.options)
        return TcpStream(sock, f"{addr[0]}:{addr[1]}")

    def finish_accept(self, stream: TcpStream, timeout: float) -> None:
        """The server side of the TLS handshake, if this listener has TLS; ``timeout``
        bounds each read, and closing ``stream`` from another thread ends it at once."""
        if self.tls is None:
            return
        stream.sock.settimeout(timeout)
        try:
            # Wrapped first, handshake second: while it runs, ``stream.sock`` is the TLS
            # socket, so a watchdog's ``stream.close()`` reaches the socket being read.
            stream.sock = self.tls.wrap_socket(stream.sock, server_side=True, do_handshake_on_connect=False)
            stream._tls = True
            if stream.closed:  # closed while being wrapped: the close may have missed it
                raise OSError("closed during the TLS handshake")
            with stream.held():  # as every call on the socket (TcpStream.hold)
                stream.sock.do_handshake()
                stream.sock.settimeout(None)
                stream.tls_ready()
        except (OSError, ssl.SSLError, ValueError) as exc:
            stream.close()
            stream.sock.close()  # the TLS socket, if the close above found the raw one
            raise PeerLost(f"TLS handshake with {stream.peer} failed: {exc}") from None

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
