"""Frames: one fixed 32-byte header, then ``length`` payload bytes.

Header (little-endian)::

    offset size field
    0      2    magic        0x4B57 ("KW")
    2      1    type         FrameType
    3      1    flags        type-specific (ACK: status; DATA: DATA_RAW; BEGIN: BEGIN_*)
    4      4    tag          the request's number within this session (0: none)
    8      2    layer        (BEGIN: k/v heads this sender's chunks carry)
    10     1    tensor       index into the layer's tensor names (k, v | kv, then state);
                         BEGIN: the transfer's codec, its index in HELLO's codecs
    11     1    reserved     0
    12     4    start        DATA: first row (token) of the chunk; CREDIT: bytes granted;
                         BEGIN: the first of those heads in the receiver's shard
    16     4    count        DATA: rows in the chunk; BEGIN: num_tokens
    20     4    length       payload bytes that follow
    24     4    payload_crc  CRC32C of the payload
    28     4    header_crc   CRC32C of bytes 0..27

The header checksum means a corrupted header can never point a payload at the wrong
place. The payload checksum (when the session uses one: ``checksum`` at the handshake)
is checked before the payload is declared ready; a payload may be received straight into
its destination rows first, and one that fails is asked for again (NACK). Control
payloads (everything but DATA) are small and are UTF-8 JSON or UTF-8 text.
"""

from __future__ import annotations

import enum
import json
import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass

from kvwire.errors import ProtocolError

_crc32c: Callable[..., int] | None
try:
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover - crc32c is a dependency; this keeps GPU-only images importable
    _crc32c = None


def _no_crc32c(data, value: int = 0) -> int:  # pragma: no cover
    raise ImportError("kvwire needs the crc32c package: pip install crc32c")


# The CRC32C of a header's 28-byte body: the package itself, without crc32c()'s test of
# the length (one call of Python per frame fewer).
_short_crc: Callable[..., int] = _crc32c if _crc32c is not None else _no_crc32c


def long_crc_helper(helper):
    """``helper`` (the compiled ``kvwire._scatter``, or None) if long buffers' CRCs should go
    to it: not when its CRC is the byte-table fallback (slower than the crc32c package),
    nor when it was built from an older kvwire/_scatter.c without ``crc32c_buffer`` (the
    receive lane refuses such a build by name)."""
    if helper is None or not helper.hardware() or not hasattr(helper, "crc32c_buffer"):
        return None
    return helper


try:
    from kvwire import _scatter
except ImportError:  # pragma: no cover - depends on how kvwire was installed
    _scatter = None  # type: ignore[assignment]
_helper = long_crc_helper(_scatter)  # the compiled helper: faster on long buffers
# From this many bytes the helper's three streams a third apart (17-27 GB/s out of main
# memory, where a sender's cache rows come from) beat the package's 8-15; below it, and
# for the 28-byte header bodies, the package (bench/checksum_speed.py).
LONG_CRC_BYTES = 64 * 1024

MAGIC = 0x4B57
HEADER = struct.Struct("<HBBIHBBIIIII")
HEADER_SIZE = HEADER.size  # 32
_HEADER_BODY = struct.Struct("<HBBIHBBIIII")
_CRC = struct.Struct("<I")
MAX_CONTROL_PAYLOAD = 64 * 1024  # handshakes and acks are tiny; a bigger one is an attack or a bug
PROTOCOL_VERSION = 2  # 2: shards and block sizes may differ; the model fingerprint; NACK


class FrameType(enum.IntEnum):
    HELLO = 1  # client -> server: who I am, what I will send
    CHALLENGE = 2  # server -> client: nonce and the server's proof
    AUTH = 3  # client -> server: the client's proof
    ACCEPT = 4  # server -> client: session terms (window, max payload)
    REJECT = 5  # either way, then close: why
    BEGIN = 6  # client -> server: tag <-> request id, num_tokens, its part, codec (tensor: index in HELLO's codecs)
    DATA = 7  # client -> server: one encoded chunk
    ACK = 8  # server -> client: request complete (flags 0) or failed (flags = AckStatus)
    CANCEL = 9  # either way: a request is cancelled
    CREDIT = 10  # server -> client: ``start`` more payload bytes may be sent on this connection
    NACK = 11  # server -> client: a DATA payload failed its checksum or broke off; send that chunk again


# Frame types by code: a dict lookup, where calling the enum costs a microsecond a frame.
_FRAME_TYPES = {t.value: t for t in FrameType}

DATA_RAW = 0x01  # DATA flag: the payload is raw, whatever the session's codec (exact tokens)
# BEGIN flags: what this sender's chunks of the request carry (docs/protocol.md)
BEGIN_WHOLE = 0x01  # the tensors held whole on every rank (MLA latent, states)
BEGIN_ALL_HEADS = 0x02  # every k/v head the receiver holds (else ``layer`` heads from ``start``)


class AckStatus(enum.IntEnum):
    OK = 0
    FAILED = 1  # the receiver could not complete the request; the payload says why
    # Its payloads failed their checksum more often than the receiver asks again: the
    # sender raises ChecksumMismatch (a peer that knows only 1 reads it as FAILED)
    CHECKSUM = 2


CHECKSUMS = ("crc32c", "none")  # what a session may agree to check DATA payloads with


def crc32c(data, value: int = 0) -> int:
    """The CRC32C of ``data`` (a C-contiguous buffer), continuing ``value``."""
    if _helper is not None:
        n = len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes
        if n >= LONG_CRC_BYTES:
            return _helper.crc32c_buffer(data, operator.index(value))  # numpy ints too, as the package
    return _short_crc(data, value)


def crc32c_parts(parts, value: int = 0) -> int:
    """CRC32C of a payload's parts in order: buffers, or objects that compute their own
    (``part.crc32c(crc)``: :class:`kvwire.scatter.Spans`, spans of a cache)."""
    for part in parts:
        value = crc32c(part, value) if isinstance(part, (bytes, bytearray, memoryview)) else part.crc32c(value)
    return value


@dataclass(frozen=True)
class Header:
    type: FrameType
    tag: int = 0
    layer: int = 0
    tensor: int = 0
    start: int = 0
    count: int = 0
    length: int = 0
    payload_crc: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        return pack_header(self.type, self.flags, self.tag, self.layer, self.tensor, self.start, self.count,
                           self.length, self.payload_crc)  # fmt: skip


def pack_header(ftype: int, flags: int, tag: int, layer: int, tensor: int, start: int, count: int, length: int,
                payload_crc: int) -> bytes:  # fmt: skip
    """A frame header's bytes from its fields (DATA headers are packed this way, without a
    :class:`Header` object: one per frame)."""
    body = _HEADER_BODY.pack(MAGIC, ftype, flags, tag, layer, tensor, 0, start, count, length, payload_crc)
    return body + _CRC.pack(_short_crc(body))


def parse_header(data) -> Header:
    """Parse exactly ``HEADER_SIZE`` bytes. Raises :class:`ProtocolError` on anything wrong."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"frame header must be {HEADER_SIZE} bytes, got {len(data)}")
    fields = HEADER.unpack(data)
    magic, code, flags, tag, layer, tensor, reserved, start, count, length, payload_crc, header_crc = fields
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic 0x{magic:04x} (not a kvwire peer, or the stream lost sync)")
    if _short_crc(bytes(data[:28])) != header_crc:
        raise ProtocolError("frame header checksum mismatch")
    ftype = _FRAME_TYPES.get(code)
    if ftype is None:
        raise ProtocolError(f"unknown frame type {code}")
    if reserved:
        raise ProtocolError("reserved header byte is not zero")
    if ftype in (FrameType.DATA, FrameType.NACK) and flags & ~DATA_RAW:
        raise ProtocolError(f"unknown {ftype.name} flags 0x{flags:02x}")
    if ftype == FrameType.BEGIN and flags & ~(BEGIN_WHOLE | BEGIN_ALL_HEADS):
        raise ProtocolError(f"unknown BEGIN flags 0x{flags:02x}")
    if ftype != FrameType.DATA and length > MAX_CONTROL_PAYLOAD:
        raise ProtocolError(f"{ftype.name} payload of {length} bytes exceeds {MAX_CONTROL_PAYLOAD}")
    return Header(ftype, tag, layer, tensor, start, count, length, payload_crc, flags)


def control_frame(ftype: FrameType, payload: bytes = b"", **fields) -> bytes:
    """A whole control frame (header + payload) as bytes."""
    return Header(ftype, length=len(payload), payload_crc=crc32c(payload), **fields).pack() + payload


def json_frame(ftype: FrameType, obj: dict, **fields) -> bytes:
    return control_frame(ftype, json.dumps(obj, separators=(",", ":")).encode(), **fields)


def check_payload(header: Header, payload) -> None:
    if crc32c(payload) != header.payload_crc:
        raise ProtocolError(f"{header.type.name} payload checksum mismatch (tag {header.tag}, layer {header.layer})")


def parse_json(header: Header, payload) -> dict:
    check_payload(header, payload)
    try:
        obj = json.loads(bytes(payload).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{header.type.name} payload is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{header.type.name} payload is not a JSON object")
    return obj


def parse_text(header: Header, payload) -> str:
    check_payload(header, payload)
    try:
        return bytes(payload).decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"{header.type.name} payload is not UTF-8") from None


def field(obj: dict, name: str, kind: type, frame: str):
    """A typed field of a JSON control payload, or a ProtocolError naming it."""
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"{frame}: field {name!r} missing or not {kind.__name__}")
    return value
