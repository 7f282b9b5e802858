"""Frames on a byte stream, read in one place: the handshakes and every frame loop use it.

A :class:`Channel` joins a transport's :class:`~kvwire.transport.ByteStream` with the
sans-I/O protocol object of that connection: it reads exactly one header, lets the
protocol check it for the current state, and reads a control frame's payload. DATA
payloads are not read here: the caller decides where they land (a staging slot, the
destination rows, GPU memory) and reads them with ``stream.recv_into_exact``.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvwire.errors import KvwireError, PeerLost, ProtocolError
from kvwire.proto import Accepted, Authenticated, ClientConnection, FrameType, Header, ServerConnection, parse_header
from kvwire.proto.connection import Connection, Event
from kvwire.proto.frames import HEADER_SIZE
from kvwire.proto.reader import FrameReader, NeedData
from kvwire.transport import ByteStream

READ_AHEAD = 64 * 1024  # bytes read_ready asks the socket for at once


class Channel:
    """One connection's frames: ``stream`` moves bytes, ``proto`` keeps its state."""

    def __init__(self, stream: ByteStream, proto: Connection) -> None:
        self.stream = stream
        self.proto = proto
        self._ahead = FrameReader(proto)  # bytes read_ready took off the stream, not yet a whole frame

    def read_header(self) -> tuple[Header, int]:
        """The next frame's header, checked for the connection's state, and how many
        payload bytes follow it."""
        return self.take_header(self.stream.recv_exact(HEADER_SIZE))

    def take_header(self, data: bytes) -> tuple[Header, int]:
        """The same for a header already read off the stream (by the receive lane)."""
        header = parse_header(data)
        return header, self.proto.on_header(header)

    def read_control(self, header: Header, nbytes: int) -> list[Event]:
        """The events of a control frame whose header was just read (its payload is read here)."""
        return self.proto.on_payload(header, self.stream.recv_exact(nbytes))

    def next_events(self) -> list[Event]:
        """Read one whole control frame: for the side that never receives DATA (the sender)."""
        if self._ahead.begun:  # a frame begun by read_ready: the rest of it first
            while isinstance(events := self._ahead.next_events(), NeedData):
                self._ahead.feed(self.stream.recv_exact(self._ahead.missing))
            return events
        header, nbytes = self.read_header()
        if header.type == FrameType.DATA:  # the protocol's table never allows it on this side
            raise ProtocolError("DATA where only control frames may arrive")
        return self.read_control(header, nbytes)

    def read_ready(self) -> Iterator[Event]:
        """The events of the whole control frames the stream holds now, without waiting
        (the sender's writer reads them between its sends: ``stream.nowait_reads``), each
        frame's before the next is parsed: a bad frame raises after those before it. A
        frame whose end has not arrived stays begun for the next call (or next_events).
        One read of at most READ_AHEAD bytes per call: a peer that floods the connection
        gets its frames read a bounded amount at a time, between sends, never buffered
        beyond that."""
        self._ahead.feed(self.stream.recv_nowait(READ_AHEAD))  # type: ignore[attr-defined]
        while not isinstance(events := self._ahead.next_events(), NeedData):
            yield from events

    def flush(self) -> None:
        """Send what the protocol object has queued (handshake replies), now."""
        out = self.proto.data_to_send()
        if out:
            self.stream.send_parts([out])


def client_handshake(stream: ByteStream, proto: ClientConnection) -> Accepted:
    """The sender's side of the handshake: HELLO, CHALLENGE, AUTH, ACCEPT (or REJECT,
    raised as the error it names). The stream's timeout bounds each read."""
    channel = Channel(stream, proto)
    try:
        channel.flush()  # HELLO
        while True:
            events = channel.next_events()
            channel.flush()
            for event in events:
                if isinstance(event, Accepted):
                    return event
    except KvwireError:
        stream.close()
        raise
    except OSError as exc:
        stream.close()
        raise PeerLost(f"handshake with {stream.peer} failed: {exc}") from None


def server_handshake(stream: ByteStream, proto: ServerConnection, on_authenticated) -> Authenticated:
    """The receiver's side: reads HELLO and AUTH, answers each. ``on_authenticated(event)``
    runs once the sender has proven itself, *before* ACCEPT goes out, so a sender never
    sends a frame the receiver is not ready for. Errors propagate; a REJECT explaining
    them stays queued in ``proto`` for the caller to send."""
    channel = Channel(stream, proto)
    while True:
        header, nbytes = channel.read_header()
        events = channel.read_control(header, nbytes)
        for event in events:
            if isinstance(event, Authenticated):
                try:
                    on_authenticated(event)
                except KvwireError as exc:
                    proto.refuse("limit", str(exc))  # the caller sends the REJECT
                    raise
                channel.flush()
                return event
        channel.flush()
