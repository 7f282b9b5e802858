"""The wire protocol, sans I/O: frames, the handshake, per-connection state.

Nothing here imports ``socket``: callers feed bytes (or headers and payload views) in
and get events and bytes to send out. See ``docs/protocol.md``.
"""

from kvwire.proto.connection import (
    Accepted,
    Ack,
    Authenticated,
    Begin,
    Cancel,
    ClientConnection,
    Credit,
    Data,
    Hello,
    Nack,
    ServerConnection,
    State,
)
from kvwire.proto.frames import HEADER_SIZE, FrameType, Header, crc32c, parse_header
from kvwire.proto.reader import NEED_DATA, FrameReader

__all__ = [
    "Accepted",
    "Ack",
    "Authenticated",
    "Begin",
    "Cancel",
    "ClientConnection",
    "Credit",
    "Data",
    "FrameReader",
    "FrameType",
    "HEADER_SIZE",
    "Header",
    "Hello",
    "NEED_DATA",
    "Nack",
    "ServerConnection",
    "State",
    "crc32c",
    "parse_header",
]
