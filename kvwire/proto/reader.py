"""Feed-style framing on top of a :class:`Connection`: bytes in, events out.

Used where whole messages arrive in memory (tests, fuzzing, message transports) and by
the sender's writers for the control frames they read between sends without waiting
(``Channel.read_ready``). The receiver's socket path does not use it: there, DATA
payloads go straight into their destination or staging memory.
"""

from __future__ import annotations

from kvwire.proto.connection import Connection, Event
from kvwire.proto.frames import HEADER_SIZE, Header, parse_header


class NeedData:
    """Returned by :meth:`FrameReader.next_events` when a frame is not complete yet."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


class FrameReader:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._buffer = bytearray()
        self._header: Header | None = None

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def begun(self) -> bool:
        """Whether bytes of a frame not yet handed out are held (its header, or part of it)."""
        return self._header is not None or bool(self._buffer)

    @property
    def missing(self) -> int:
        """Bytes the frame at the front still lacks: at least 1 after ``next_events``
        said NEED_DATA (a header's bytes until it is whole, then its payload's)."""
        if self._header is not None:
            return max(self._header.length - len(self._buffer), 0)
        return max(HEADER_SIZE - len(self._buffer), 0)

    @property
    def trailing(self) -> bytes:
        """Bytes received but not yet part of a complete frame."""
        return bytes(self._buffer)

    def next_events(self) -> list[Event] | NeedData:
        """Events of the next complete frame, or ``NEED_DATA``. Raises ``ProtocolError``."""
        if self._header is None:
            if len(self._buffer) < HEADER_SIZE:
                return NEED_DATA
            header = parse_header(bytes(self._buffer[:HEADER_SIZE]))
            self.conn.on_header(header)
            del self._buffer[:HEADER_SIZE]
            self._header = header
        header = self._header
        if len(self._buffer) < header.length:
            return NEED_DATA
        payload = bytes(self._buffer[: header.length])
        del self._buffer[: header.length]
        self._header = None
        return self.conn.on_payload(header, payload)
