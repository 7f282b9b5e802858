"""UCX byte streams through UCXX, behind the same interface as the TCP streams.

UCX reaches RDMA, shared memory and GPU-direct paths without kvwire knowing each fabric;
on a machine without them it runs over TCP (``UCX_TLS=tcp``). The protocol above does
not change: the handshake, frames, credits and acknowledgements are the same bytes.

UCXX's Python API is asynchronous, and kvwire's engine is threaded, so one event-loop
thread per process runs every UCX operation; the engine's threads submit to it and wait.
UCX moves *messages*; each ``send_parts`` call becomes one message, preceded by an 8-byte
length message, and the receiving side serves exact reads out of the current message.

Device memory: where UCX has CUDA transports (``cuda_copy``, ``cuda_ipc``, ``gdr_copy``
in ``UCX_TLS``; see :func:`moves_device_memory`), the engine may send a DATA payload as
its own message straight from GPU memory and receive it straight into GPU memory, with
no host staging copy on either side (UCX picks the path: NVLink/IPC on one node, GPUDirect
RDMA where the NIC has it, its own pipelined staging otherwise). ``stats()["path"]``
says which way a connection's payloads go.

Settings pass through the environment (``UCX_TLS``, ``UCX_NET_DEVICES``, ...). Unless
they are already set, kvwire sets ``UCX_TLS=tcp`` and ``UCX_NET_DEVICES=lo`` when both ends
are on loopback, so tests never spread over other interfaces, and the defaults in
``UCX_DEFAULTS`` (2 MiB TCP segments).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Sequence

from kvwire.errors import PeerLost, ProtocolError
from kvwire.proto.frames import HEADER_SIZE, MAX_CONTROL_PAYLOAD
from kvwire.threads import Thread

_LENGTH = struct.Struct("<Q")
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
log = logging.getLogger("kvwire.ucx")
CLOSE_FLUSH_S = 2.0  # how long close() waits for queued control frames to leave
INSTALL_HINT = "transport='ucx' needs UCXX: pip install 'kvwire[ucx]' (PyPI package ucxx-cu12)"


def import_ucxx():
    # Before the import: UCX reads its global options (UCX_WARN_UNUSED_ENV_VARS) when the
    # library loads, the rest when a context starts.
    for key, value in UCX_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        import ucxx
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return ucxx


# Defaults kvwire gives UCX unless the environment already sets them, applied by
# import_ucxx, the one way kvwire reaches UCXX. 2 MiB TCP segments instead of UCX's
# 8 KiB: on loopback, 512 MiB, 4 connections, 0.57/0.58 -> 0.89/0.88 GB/s in alternating
# runs (docs/benchmarks.md). UCXX's "blocking" progress mode was faster still for bulk
# transfers (1.2-1.3 GB/s with these segments) but made the UCX tests, many small
# chunks, slower (17 s -> 27-32 s), so the progress mode stays UCXX's default ("thread").
UCX_DEFAULTS = {
    "UCX_TCP_TX_SEG_SIZE": "2m",
    "UCX_TCP_RX_SEG_SIZE": "2m",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
}


def configure_for(host: str) -> None:
    """On loopback, ``UCX_TLS=tcp`` and ``UCX_NET_DEVICES=lo`` unless set, so loopback
    traffic stays on loopback (set before UCX's context starts; ``UCX_DEFAULTS`` are
    applied when ucxx is imported)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        os.environ.setdefault("UCX_TLS", "tcp")
        os.environ.setdefault("UCX_NET_DEVICES", "lo")


class _Loop:
    """The process's UCX event loop, in a daemon thread."""

    _instance: _Loop | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.ucxx = import_ucxx()
        self.loop = asyncio.new_event_loop()
        self.thread = Thread(self.loop.run_forever, "kvwire-ucx")
        self.thread.start()

    @classmethod
    def get(cls) -> _Loop:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coro, timeout: float | None = None, cancel: bool = True):
        """Run ``coro`` on the loop thread and wait for it; one that outlives ``timeout`` is
        cancelled, unless ``cancel`` is false: a UCX request's wait must not be (below)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if cancel:
                future.cancel()
            raise


CUDA_TRANSPORTS = frozenset({"cuda_copy", "cuda_ipc", "gdr_copy"})


def moves_device_memory(host: str | None = None) -> bool:
    """Whether this process's UCX context has a CUDA transport (so UCX can send and
    receive device buffers). Starts UCX if it is not started yet, with the loopback
    defaults of :func:`configure_for` when ``host`` is a loopback address."""
    if host is not None:
        configure_for(host)
    loop = _Loop.get()

    async def transports():
        return loop.ucxx.get_active_transports()

    try:
        return bool(CUDA_TRANSPORTS & set(loop.run(transports(), 30)))
    except Exception:  # noqa: BLE001 - no CUDA driver, no GPU: UCX cannot move device memory
        return False


def _ucx_buffer(tensor):
    """What UCXX takes for a tensor: CUDA tensors as they are (``__cuda_array_interface__``),
    host tensors as numpy views (the kernels' host emulation uses those in tests)."""
    return tensor.numpy() if tensor.device.type == "cpu" else tensor


class UcxStream:
    """One UCX endpoint: write all of a frame, read exactly N bytes. Errors are PeerLost."""

    def __init__(self, loop: _Loop, endpoint, peer: str, on_close=None) -> None:
        import numpy as np

        self._np = np
        self._loop = loop
        self._ep = endpoint
        self.peer = peer
        self.bytes_sent = 0
        self.bytes_received = 0
        self.opened = time.monotonic()
        self.closed = False
        self._timeout: float | None = None
        self._send_lock = threading.Lock()
        self._ordered = asyncio.Lock()  # taken on the loop thread: messages never interleave
        self._recv_lock = threading.Lock()
        self._message = memoryview(b"")
        self._on_close = on_close
        self._control: concurrent.futures.Future | None = None  # the last control frame queued
        self._failed: str | None = None  # what it was doing when an operation failed
        self.device_payloads = False  # set by the engine once the handshake agreed on it
        # The largest message the peer may send: one control frame until the handshake is
        # done, then what the engine allows (a receiver: its credit window, with headers).
        # A length above it is refused before anything is allocated (the peer may not
        # have authenticated).
        self.max_message = HEADER_SIZE + MAX_CONTROL_PAYLOAD

    # The engine calls these from its threads.
    def send_parts(self, parts: Sequence[bytes | memoryview], device_payload=None) -> None:
        """Send ``parts`` as one message; then ``device_payload`` (a CUDA tensor, the DATA
        payload whose header ends ``parts``), if given, as the next message, from the GPU."""
        np = self._np
        views = [memoryview(p).cast("B") for p in parts]
        total = sum(len(v) for v in views)
        data = np.empty(total, dtype=np.uint8)
        offset = 0
        for v in views:
            data[offset : offset + len(v)] = np.frombuffer(v, dtype=np.uint8)
            offset += len(v)
        header = np.frombuffer(_LENGTH.pack(total), dtype=np.uint8).copy()
        nbytes = total + (0 if device_payload is None else device_payload.numel())
        with self._send_lock:
            self.bytes_sent += nbytes  # before the send, as TcpStream counts (see there)
            try:
                self._call(self._send_all(header, data, device_payload), "sending")
            except PeerLost:
                self.bytes_sent -= nbytes
                raise

    def send_control(self, frame: bytes) -> None:
        """Queue a small control frame on the UCX loop and return at once: it is sent after
        the message being sent now (the loop's send lock keeps messages whole and in order)."""
        if self.closed:
            raise PeerLost(f"UCX endpoint to {self.peer} is closed")
        np = self._np
        data = np.frombuffer(frame, dtype=np.uint8).copy()
        header = np.frombuffer(_LENGTH.pack(len(frame)), dtype=np.uint8).copy()
        self.bytes_sent += len(frame)
        future = asyncio.run_coroutine_threadsafe(self._send_all(header, data, None), self._loop.loop)

        def sent(f: concurrent.futures.Future) -> None:
            # A failed control send is not reported here (the reader sees the endpoint
            # fail), only uncounted.
            if f.cancelled() or f.exception() is not None:
                self.bytes_sent -= len(frame)

        future.add_done_callback(sent)
        self._control = future  # messages leave in order: the last one done means all are

    def flush_control(self) -> None:
        """Nothing to do: control frames are already queued on the UCX loop."""

    def _drain_control(self, timeout: float = CLOSE_FLUSH_S) -> None:
        """Wait (at most ``timeout`` seconds) until the control frames queued so far have
        left: closing the endpoint under a send in flight drops that frame (a REJECT after
        a failed handshake was lost about one time in two this way)."""
        future = self._control
        if future is not None:
            try:
                future.result(timeout)
            except Exception:  # noqa: BLE001 - a failed send: the endpoint is failing anyway
                pass

    async def _send_all(self, header, data, device_payload) -> None:
        async with self._ordered:  # one message (and its device payload) at a time
            await self._ep.send(header)
            await self._ep.send(data)
            if device_payload is not None:
                await self._ep.send(_ucx_buffer(device_payload))

    def recv_device_into(self, tensor) -> None:
        """Receive the next message, a DATA payload sent with ``device_payload``, into
        ``tensor`` (CUDA, exactly the payload's size). Call it right after reading the
        header that announced it."""
        with self._recv_lock:
            if len(self._message):
                raise PeerLost(f"UCX endpoint to {self.peer}: a device payload did not follow its header")
            self._call(self._ep.recv(_ucx_buffer(tensor)), "receiving")
        self.bytes_received += tensor.numel()

    def recv_into_exact(self, view: memoryview) -> None:
        view = view.cast("B") if view.format != "B" else view
        got = 0
        with self._recv_lock:
            while got < len(view):
                if not len(self._message):
                    self._message = self._next_message()
                n = min(len(view) - got, len(self._message))
                view[got : got + n] = self._message[:n]
                self._message = self._message[n:]
                got += n
        self.bytes_received += got

    def recv_into_views(self, views: Sequence[memoryview]) -> None:
        """Fill every view in order, as if they were one buffer."""
        for view in views:
            self.recv_into_exact(view)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self.recv_into_exact(memoryview(buf))
        return bytes(buf)

    def _next_message(self) -> memoryview:
        np = self._np
        length = np.zeros(_LENGTH.size, dtype=np.uint8)
        self._call(self._ep.recv(length), "receiving")
        (size,) = _LENGTH.unpack(length.tobytes())
        if size > self.max_message:
            raise ProtocolError(f"UCX message of {size} bytes from {self.peer}: at most {self.max_message} "
                                f"are allowed here")  # fmt: skip
        # Zeroed: UCX completes a receive of a shorter message without saying so, and the
        # rest must not be the heap's old bytes. An empty body is a message too.
        data = np.zeros(size, dtype=np.uint8)
        self._call(self._ep.recv(data), "receiving")
        return memoryview(data)

    def _call(self, coro, what: str):
        if self.closed or self._failed is not None:
            coro.close()
            raise PeerLost(f"UCX endpoint to {self.peer} is " + (
                "closed" if self._failed is None else f"unusable: it failed while {self._failed}"))  # fmt: skip
        try:
            # Not cancelled when it times out: UCXX still completes the request's future
            # later, and after a cancelled receive, a send on another endpoint of the same
            # worker never completed about once in a dozen tries (the loop in
            # tests/test_ucx.py). The request stays posted until it completes or the
            # endpoint closes; the stream is unusable from now on either way.
            return self._loop.run(coro, self._timeout, cancel=False)
        except Exception as exc:  # UCXError, UCXCloseError, CancelledError, TimeoutError
            # Where its messages stand is unknown now (a receive cut short, a send that
            # may still leave): nothing more goes through it.
            self._failed = what
            raise PeerLost(f"UCX endpoint to {self.peer} failed while {what}: {exc!r}") from None

    def settimeout(self, seconds: float | None) -> None:
        self._timeout = seconds

    def tcp_info(self) -> dict:
        return {}

    def stats(self) -> dict:
        elapsed = max(time.monotonic() - self.opened, 1e-9)
        return {
            "peer": self.peer,
            "transport": "ucx",
            "path": "device memory (direct)" if self.device_payloads else "host memory (staged)",
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "goodput_gb_per_s": round(max(self.bytes_sent, self.bytes_received) / elapsed / 1e9, 4),
            "tcp": {},
        }

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self._send_lock.locked():  # behind a send in flight, they would not leave in time
            self._drain_control()
        try:
            self._loop.run(self._ep.close(), 5)
        except Exception:  # noqa: BLE001 - closing a dead endpoint may fail; it is closed either way
            pass
        if self._on_close is not None:
            self._on_close()


def connect(address: tuple[str, int], *, timeout: float) -> UcxStream:
    host, port = address
    configure_for(host)
    loop = _Loop.get()
    try:
        ep = loop.run(loop.ucxx.create_endpoint(host, port), timeout)
    except Exception as exc:  # noqa: BLE001
        raise PeerLost(f"cannot connect to {host}:{port} over UCX: {exc!r}") from None
    return UcxStream(loop, ep, f"{host}:{port}")


class UcxListener:
    """Accepts UCX endpoints; ``accept()`` blocks like a socket's."""

    def __init__(self, address: tuple[str, int]) -> None:
        host, port = address
        configure_for(host)
        self._loop = _Loop.get()
        self._queue: queue.Queue = queue.Queue()
        self._closed = False

        async def handler(ep) -> None:
            if self._closed:  # too late: closed at once, its peer told
                await ep.close()
                return
            done = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._queue.put((ep, lambda: loop.call_soon_threadsafe(done.set)))
            await done.wait()  # keep the handler alive while kvwire uses the endpoint

        async def listen():
            return self._loop.ucxx.create_listener(handler, port)

        if host not in WILDCARD_HOSTS:
            log.warning("UCX listens on every interface: %r limits nothing but the address reported", host)
        try:
            self._listener = self._loop.run(listen(), 10)
        except Exception as exc:  # noqa: BLE001 - UCXXBusyError and the like, as a socket's OSError
            raise OSError(f"cannot listen on port {port} over UCX: {exc!r}") from None
        self.address = (host, self._listener.port)

    def accept(self) -> UcxStream:
        item = self._queue.get()
        if item is None:
            raise OSError("listener closed")
        return self._stream(item)

    def _stream(self, item) -> UcxStream:
        """An accepted endpoint (with the release of its handler) as a stream."""
        ep, release = item
        # No colon: the receiver caps connections in their handshake per host (the part
        # before one), and UCX does not say where an endpoint comes from: each is its own.
        return UcxStream(self._loop, ep, f"ucx-endpoint-{ep.uid:x}", on_close=release)

    def finish_accept(self, stream: UcxStream, timeout: float) -> None:
        """Nothing to finish: a UCX endpoint is ready when accepted."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def stop():
            self._listener.close()

        try:
            self._loop.run(stop(), 5)
        except Exception:  # noqa: BLE001
            pass
        while True:  # endpoints accepted by UCX that nobody took: closed, their peers told
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._stream(item).close()
        self._queue.put(None)
