"""Byte movers behind one small interface, :class:`ByteStream`, so the engine above does
not know which one it drives.

``tcp``: several connections per peer, tuned sockets, TCP_INFO statistics, optional TLS.
``ucx``: UCX endpoints through UCXX (``kvwire.transport.ucx``; optional dependency), which
can also move payloads in GPU memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from kvwire.transport.tcp import SocketOptions, TcpListener, TcpStream, connect, parse_address


@runtime_checkable
class ByteStream(Protocol):
    """One connection to a peer, as the engine uses it. Errors are ``PeerLost``."""

    peer: str
    device_payloads: bool  # DATA payloads travel as GPU memory (agreed at the handshake)

    def send_parts(self, parts: Sequence[bytes | memoryview], device_payload: Any = None) -> None:
        """Write ``parts`` in order as one frame (or more); then ``device_payload``, a GPU
        tensor, when the connection carries device payloads."""

    def send_control(self, frame: bytes) -> None:
        """Queue a small control frame and return at once; it is sent between frames,
        so a cancel or a credit never waits behind a payload the peer is not reading."""

    def flush_control(self) -> None:
        """Send queued control frames if that needs no waiting."""

    def recv_into_exact(self, view: memoryview) -> None:
        """Fill ``view`` completely."""

    def recv_into_views(self, views: Sequence[memoryview]) -> None:
        """Fill every view in order, as if they were one buffer (a payload received in
        place into rows that span several runs of blocks)."""

    def recv_exact(self, n: int) -> bytes: ...

    def recv_device_into(self, tensor: Any) -> None:
        """Receive the device payload that follows the DATA header just read."""

    def settimeout(self, seconds: float | None) -> None: ...

    def stats(self) -> dict: ...

    def close(self) -> None:
        """Close now: a thread blocked on this stream gets ``PeerLost``."""


__all__ = ["ByteStream", "SocketOptions", "TcpListener", "TcpStream", "connect", "parse_address"]
