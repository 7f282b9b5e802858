"""The per-connection protocol state machine, sans I/O.

The I/O layer reads exactly ``HEADER_SIZE`` bytes and calls :meth:`on_header`, which
validates the header *for the current state* and says how many payload bytes follow.
For DATA it is the I/O layer that chooses where those bytes land (a staging slot,
with ``recv_into``); it then calls :meth:`on_payload` with a view of them. Events come
back as return values; bytes to send accumulate in :meth:`data_to_send`.

Handshake (the client is the sender, the server the receiver)::

    client                                   server
    HELLO  {version, session, conn, conns,
            nonce_c, fingerprint, codec
            [, codecs] [, device_payloads]} ->
                                          <- CHALLENGE {nonce_s, proof_s}
    (checks proof_s: the server knows the secret too)
    AUTH   {proof_c}                      ->
                                          <- ACCEPT {window, max_payload
                                                     [, codecs] [, device_payloads]}
                                             or REJECT {code, reason}, then close

    proof_s = HMAC-SHA256(secret, "kvwire-server" 0 nonce_c nonce_s)
    proof_c = HMAC-SHA256(secret, "kvwire-client" 0 nonce_c nonce_s session)

``codecs``: the codecs this session's transfers may use, ``codecs[0] == codec``; each
BEGIN names its transfer's codec by its index in this list (the BEGIN header's flags).
The receiver checks every one at AUTH and answers ``codecs`` (their number) in ACCEPT;
a sender that offered several refuses an ACCEPT without it (an older receiver would
decode every transfer with ``codec``). Without ``codecs`` a session has one codec.

``device_payloads``: the sender can send DATA payloads from device (GPU) memory and asks
to; the receiver's ACCEPT says whether it will receive them into device memory too.
Only a transport that moves device memory (UCX with CUDA) offers it. The frames are the
same either way; only where the payload bytes live differs, and the receiver checks
their CRC32C on the device (:meth:`ServerConnection.on_device_payload`).

The server accepts nothing but HELLO and AUTH until the client has proven itself, so a
peer without the secret cannot make the receiver parse a single DATA frame. Any error
moves the connection to ``ERROR``, a state nothing leaves.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field

from kvwire.errors import AuthenticationFailed, LayoutMismatch, ProtocolError
from kvwire.proto.frames import (
    BEGIN_ALL_HEADS,
    BEGIN_WHOLE,
    CHECKSUMS,
    DATA_RAW,
    PROTOCOL_VERSION,
    AckStatus,
    FrameType,
    Header,
    check_payload,
    control_frame,
    crc32c_parts,
    field,
    json_frame,
    pack_header,
    parse_json,
    parse_text,
)

NONCE_BYTES = 32
MAX_CODECS = 8  # codecs one session may offer (a BEGIN names one by its index in the tensor byte)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    AWAIT_CHALLENGE = "await_challenge"
    AWAIT_AUTH = "await_auth"
    AWAIT_ACCEPT = "await_accept"
    OPEN = "open"
    ERROR = "error"


# Which frames each side may receive in each state: anything else is a ProtocolError.
ALLOWED: dict[tuple[Role, State], frozenset[FrameType]] = {
    (Role.SERVER, State.AWAIT_HELLO): frozenset({FrameType.HELLO}),
    (Role.SERVER, State.AWAIT_AUTH): frozenset({FrameType.AUTH}),
    (Role.SERVER, State.OPEN): frozenset({FrameType.BEGIN, FrameType.DATA, FrameType.CANCEL}),
    (Role.CLIENT, State.AWAIT_CHALLENGE): frozenset({FrameType.CHALLENGE, FrameType.REJECT}),
    (Role.CLIENT, State.AWAIT_ACCEPT): frozenset({FrameType.ACCEPT, FrameType.REJECT}),
    (Role.CLIENT, State.OPEN): frozenset(
        {FrameType.ACK, FrameType.CANCEL, FrameType.CREDIT, FrameType.NACK, FrameType.REJECT}
    ),
}


# -- events ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    session: str
    conn_index: int
    conn_count: int
    fingerprint: str
    layout: str
    codec: str
    device_payloads: bool = False  # the sender asks to send payloads from device memory
    terms: dict = dataclass_field(default_factory=dict)  # the application's own terms (Sender(terms=...))
    checksum: str = "crc32c"  # how DATA payloads are checked (absent in HELLO: crc32c)
    tp: tuple = (0, 1, 0)  # the sender's tensor-parallel (rank, size, model KV heads); size 1: the whole model
    block_size: int = 0  # the sender's block size (its chunks are cut on it)
    codecs: tuple[str, ...] = ()  # codecs a BEGIN may name, codecs[0] == codec; () means (codec,)

    @property
    def session_codecs(self) -> tuple[str, ...]:
        """Every codec this session's transfers may use, in BEGIN's numbering."""
        return self.codecs or (self.codec,)


@dataclass(frozen=True)
class Accepted:
    """Client side: the handshake is done; the session's terms."""

    window: int
    max_payload: int
    device_payloads: bool = False  # DATA payloads travel as device memory on this connection
    tp: tuple = (0, 1, 0)  # the receiver's tensor-parallel (rank, size, model KV heads)
    block_size: int = 0  # the receiver's block size


@dataclass(frozen=True)
class Authenticated:
    """Server side: the client proved itself and its layout and codec fit."""

    hello: Hello


@dataclass(frozen=True)
class Begin:
    """A request's BEGIN, and what this sender's chunks of it carry: ``heads`` k/v heads
    from ``first_head`` of the receiver's shard (None: every head it holds), and
    (``whole``) the tensors held whole on every rank."""

    tag: int
    request_id: str
    num_tokens: int
    heads: int | None = None
    first_head: int = 0
    whole: bool = True
    codec: int = 0  # index into the session's codecs (Hello.session_codecs)


@dataclass(frozen=True)
class Data:
    header: Header
    payload: memoryview


@dataclass(frozen=True)
class Ack:
    tag: int
    ok: bool
    message: str
    checksum: bool = False  # failed: its payloads failed their checksum too often (AckStatus.CHECKSUM)


@dataclass(frozen=True)
class Cancel:
    tag: int
    reason: str


@dataclass(frozen=True)
class Credit:
    nbytes: int


@dataclass(frozen=True)
class Nack:
    """Client side: the receiver asks for a chunk again (its payload failed the checksum)."""

    tag: int
    layer: int
    tensor: int
    start: int
    count: int
    raw: bool
    reason: str


Event = Hello | Accepted | Authenticated | Begin | Data | Ack | Cancel | Credit | Nack


MAX_TEXT_BYTES = 4096  # the reason or message a CANCEL, NACK or ACK carries; a longer one is cut


def _text_payload(text: str) -> bytes:
    """``text`` as UTF-8, cut to ``MAX_TEXT_BYTES`` on a character's boundary: the peer
    requires UTF-8, and a character cut in half (or a lone surrogate from an OS error's
    text) would make it drop the connection instead of reading why."""
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_TEXT_BYTES:
        return data
    return data[:MAX_TEXT_BYTES].decode("utf-8", "ignore").encode()


def _proof(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, label + b"\0" + b"".join(parts), hashlib.sha256).digest()


def _tp_field(obj: dict, frame: str) -> tuple:
    """A peer's tensor parallelism: ``[rank, size, model KV heads]``."""
    value = obj.get("tp")
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ProtocolError(f"{frame}: field 'tp' missing or not [rank, size, kv_heads]")
    if not (value[1] >= 1 and value[0] < value[1]):
        raise ProtocolError(f"{frame}: tensor-parallel rank {value[0]} of {value[1]}")
    return tuple(value)


def _hex_field(obj: dict, name: str, frame: str, nbytes: int) -> bytes:
    text = field(obj, name, str, frame)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise ProtocolError(f"{frame}: field {name!r} is not hex") from None
    if len(value) != nbytes:
        raise ProtocolError(f"{frame}: field {name!r} must be {nbytes} bytes")
    return value


class Connection:
    """State shared by both roles: the transition table, the outbox, the error state."""

    role: Role

    def __init__(self, state: State, max_payload: int) -> None:
        self.state = state
        self.max_payload = max_payload
        self._outbox: list[bytes] = []

    def data_to_send(self) -> bytes:
        out = b"".join(self._outbox)
        self._outbox.clear()
        return out

    def on_header(self, header: Header) -> int:
        """Check that ``header`` may arrive now; return how many payload bytes follow."""
        allowed = ALLOWED.get((self.role, self.state), frozenset())
        if header.type not in allowed:
            message = f"{self.role.value} got {header.type.name} in state {self.state.value}"
            self._fail()
            raise ProtocolError(message)
        if header.type == FrameType.DATA and not 0 < header.length <= self.max_payload:
            self._fail()
            raise ProtocolError(f"DATA payload of {header.length} bytes outside 1..{self.max_payload}")
        return header.length

    def on_payload(self, header: Header, payload) -> list[Event]:
        """Handle a frame whose header passed :meth:`on_header`; return its events."""
        try:
            return self._handle(header, memoryview(payload))
        except Exception:
            self._fail()
            raise

    def _fail(self) -> None:
        self.state = State.ERROR

    def _handle(self, header: Header, payload: memoryview) -> list[Event]:
        raise NotImplementedError


class ClientConnection(Connection):
    """The sender's end of one connection."""

    role = Role.CLIENT

    def __init__(
        self,
        secret: bytes,
        *,
        session: str,
        conn_index: int,
        conn_count: int,
        fingerprint: str,
        layout: str,
        codec: str,
        device_payloads: bool = False,
        terms: Mapping[str, object] | None = None,
        checksum: str = "crc32c",
        tp: tuple = (0, 1, 0),
        block_size: int = 0,
        codecs: Sequence[str] | None = None,
    ) -> None:
        super().__init__(State.AWAIT_CHALLENGE, max_payload=0)
        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum: {checksum!r} is not one of {CHECKSUMS}")
        self.checksum = checksum
        self.codecs = tuple(codecs) if codecs else (codec,)
        if self.codecs[0] != codec or not 1 <= len(self.codecs) <= MAX_CODECS:
            raise ValueError(f"codecs: 1..{MAX_CODECS} codecs starting with {codec!r}, got {list(self.codecs)}")
        self._secret = secret
        self._nonce = os.urandom(NONCE_BYTES)
        self._session = session
        hello = {
            "version": PROTOCOL_VERSION,
            "session": session,
            "conn": conn_index,
            "conns": conn_count,
            "nonce": self._nonce.hex(),
            "fingerprint": fingerprint,
            "layout": layout,
            "codec": codec,
            "checksum": checksum,
            "tp": list(tp),
            "block_size": block_size,
        }
        if device_payloads:
            hello["device_payloads"] = True
        if len(self.codecs) > 1:
            hello["codecs"] = list(self.codecs)
        if terms:
            hello["terms"] = dict(terms)
        self._outbox.append(json_frame(FrameType.HELLO, hello))

    def _handle(self, header: Header, payload: memoryview) -> list[Event]:
        t = header.type
        if t == FrameType.CREDIT:  # most frames a sender reads: asked first
            check_payload(header, payload)
            return [Credit(header.start)]
        if t == FrameType.REJECT:
            obj = parse_json(header, payload)
            code, reason = obj.get("code"), str(obj.get("reason", "no reason given"))
            self._fail()
            if code == "auth":
                raise AuthenticationFailed(f"receiver rejected us: {reason}")
            if code in ("layout", "codec", "terms", "checksum"):
                raise LayoutMismatch(f"receiver rejected us: {reason}")
            raise ProtocolError(f"receiver rejected us ({code}): {reason}")
        if t == FrameType.CHALLENGE:
            obj = parse_json(header, payload)
            server_nonce = _hex_field(obj, "nonce", "CHALLENGE", NONCE_BYTES)
            proof = _hex_field(obj, "proof", "CHALLENGE", 32)
            if not hmac.compare_digest(proof, _proof(self._secret, b"kvwire-server", self._nonce, server_nonce)):
                self._fail()
                raise AuthenticationFailed("the receiver did not prove it knows the shared secret")
            mine = _proof(self._secret, b"kvwire-client", self._nonce, server_nonce, self._session.encode())
            self._outbox.append(json_frame(FrameType.AUTH, {"proof": mine.hex()}))
            self.state = State.AWAIT_ACCEPT
            return []
        if t == FrameType.ACCEPT:
            obj = parse_json(header, payload)
            window = field(obj, "window", int, "ACCEPT")
            max_payload = field(obj, "max_payload", int, "ACCEPT")
            if window <= 0 or max_payload <= 0:
                raise ProtocolError("ACCEPT: window and max_payload must be positive")
            if len(self.codecs) > 1 and obj.get("codecs") != len(self.codecs):
                self._fail()
                raise LayoutMismatch(
                    f"the receiver does not take a codec per transfer (an older kvwire): offered "
                    f"{list(self.codecs)}; use one codec instead of 'auto'"
                )
            self.max_payload = max_payload
            self.state = State.OPEN
            tp = _tp_field(obj, "ACCEPT")
            return [Accepted(window, max_payload, obj.get("device_payloads") is True, tp,
                             field(obj, "block_size", int, "ACCEPT"))]  # fmt: skip
        if t == FrameType.ACK:
            ok = header.flags == AckStatus.OK
            return [Ack(header.tag, ok, parse_text(header, payload), header.flags == AckStatus.CHECKSUM)]
        if t == FrameType.CANCEL:
            return [Cancel(header.tag, parse_text(header, payload))]
        if t == FrameType.NACK:
            reason = parse_text(header, payload)
            raw = bool(header.flags & DATA_RAW)
            return [Nack(header.tag, header.layer, header.tensor, header.start, header.count, raw, reason)]
        raise AssertionError(t)  # unreachable: on_header checked the table

    # -- what the sender says once open ----------------------------------------------
    def begin(
        self,
        tag: int,
        request_id: str,
        num_tokens: int,
        heads: int | None = None,
        first_head: int = 0,
        whole: bool = True,
        codec: int = 0,
    ) -> bytes:
        """A request's BEGIN: ``heads`` k/v heads from ``first_head`` of the receiver's
        shard (None: all it holds), ``whole``: the tensors held whole (MLA, states), and
        ``codec``: the transfer's codec, as its index in ``codecs`` (the ``tensor`` byte)."""
        if not 0 <= codec < len(self.codecs):
            raise ValueError(f"codec: index {codec} outside this session's {len(self.codecs)} codecs")
        flags = (BEGIN_WHOLE if whole else 0) | (BEGIN_ALL_HEADS if heads is None else 0)
        return control_frame(FrameType.BEGIN, request_id.encode(), tag=tag, count=num_tokens, flags=flags,
                             layer=heads or 0, start=first_head if heads else 0, tensor=codec)  # fmt: skip

    def cancel(self, tag: int, reason: str) -> bytes:
        return control_frame(FrameType.CANCEL, _text_payload(reason), tag=tag)

    def data_header(
        self, tag: int, layer: int, tensor: int, start: int, count: int, length: int, payload_crc: int, raw: bool
    ) -> bytes:
        """The header of a DATA frame whose ``length`` payload bytes follow it (the caller
        sends the payload from where it lies: a cache, a staging slot, GPU memory).
        ``payload_crc`` is the payload's CRC32C, or 0 in a session without checksums."""
        if self.state != State.OPEN:
            raise ProtocolError(f"DATA before the handshake is done (state {self.state.value})")
        if not 0 < length <= self.max_payload:
            raise ValueError(f"length: {length} outside 1..{self.max_payload}, the receiver's largest payload")
        return pack_header(
            FrameType.DATA, DATA_RAW if raw else 0, tag, layer, tensor, start, count, length, payload_crc
        )


CodecCheck = Callable[[str], "str | None"]


def _codec_list(hello: dict) -> tuple[str, ...]:
    """HELLO's optional ``codecs``: a list of 2..MAX_CODECS descriptors, the first being ``codec``."""
    codecs = hello.get("codecs")
    if codecs is None:
        return ()
    if (not isinstance(codecs, list) or not 2 <= len(codecs) <= MAX_CODECS
            or not all(isinstance(c, str) for c in codecs) or codecs[0] != hello.get("codec")):  # fmt: skip
        raise ProtocolError(f"HELLO: codecs must list 2..{MAX_CODECS} codec names, the first being 'codec'")
    return tuple(codecs)


class ServerConnection(Connection):
    """The receiver's end of one connection.

    ``check_codec(descriptor)`` returns None when the codec is acceptable, else why not.
    """

    role = Role.SERVER

    def __init__(
        self,
        secret: bytes,
        *,
        fingerprint: str,
        layout: str,
        check_codec: CodecCheck,
        window: int,
        max_payload: int,
        device_payloads: Callable[[str], bool] | None = None,
        check_terms: Callable[[dict], str | None] | None = None,
        checksum: str = "crc32c",
        tp: tuple = (0, 1, 0),
        block_size: int = 0,
        check_shard: Callable[[Hello], str | None] | None = None,
    ) -> None:
        super().__init__(State.AWAIT_HELLO, max_payload=max_payload)
        self._tp = list(tp)
        self._block_size = block_size
        self._check_shard = check_shard
        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum: {checksum!r} is not one of {CHECKSUMS}")
        self.checksum = checksum
        self._check_terms = check_terms
        self._secret = secret
        self._fingerprint = fingerprint
        self._layout = layout
        self._check_codec = check_codec
        self._window = window
        # codec descriptor -> whether this side can take that codec's payloads in device memory
        self._device_payloads = device_payloads or (lambda codec: False)
        self.device_payloads = False  # decided at ACCEPT
        self._nonce = os.urandom(NONCE_BYTES)
        self._client_nonce = b""
        self.hello: Hello | None = None

    def _reject(self, code: str, reason: str, error: type[Exception]) -> None:
        self._outbox.append(json_frame(FrameType.REJECT, {"code": code, "reason": reason}))
        self._fail()
        raise error(reason)

    def _handle(self, header: Header, payload: memoryview) -> list[Event]:
        t = header.type
        if t == FrameType.HELLO:
            obj = parse_json(header, payload)
            version = field(obj, "version", int, "HELLO")
            if version != PROTOCOL_VERSION:
                self._reject(
                    "version",
                    f"protocol version {version} not supported (this side: {PROTOCOL_VERSION})",
                    ProtocolError,
                )
            self._client_nonce = _hex_field(obj, "nonce", "HELLO", NONCE_BYTES)
            self.hello = Hello(
                session=field(obj, "session", str, "HELLO"),
                conn_index=field(obj, "conn", int, "HELLO"),
                conn_count=field(obj, "conns", int, "HELLO"),
                fingerprint=field(obj, "fingerprint", str, "HELLO"),
                layout=field(obj, "layout", str, "HELLO"),
                codec=field(obj, "codec", str, "HELLO"),
                device_payloads=obj.get("device_payloads") is True,
                terms=obj.get("terms", {}),
                checksum=obj.get("checksum", "crc32c"),
                tp=_tp_field(obj, "HELLO"),
                block_size=field(obj, "block_size", int, "HELLO"),
                codecs=_codec_list(obj),
            )
            if not isinstance(self.hello.terms, dict):
                raise ProtocolError("HELLO: terms must be an object")
            proof = _proof(self._secret, b"kvwire-server", self._client_nonce, self._nonce)
            self._outbox.append(json_frame(FrameType.CHALLENGE, {"nonce": self._nonce.hex(), "proof": proof.hex()}))
            self.state = State.AWAIT_AUTH
            return []
        if t == FrameType.AUTH:
            obj = parse_json(header, payload)
            proof = _hex_field(obj, "proof", "AUTH", 32)
            hello = self.hello
            assert hello is not None
            expected = _proof(self._secret, b"kvwire-client", self._client_nonce, self._nonce, hello.session.encode())
            if not hmac.compare_digest(proof, expected):
                self._reject("auth", "authentication failed: wrong shared secret", AuthenticationFailed)
            # The application's terms first: they can name what differs (e.g. a
            # tensor-parallel size) better than a layout fingerprint can.
            why = self._check_terms(hello.terms) if self._check_terms is not None else None
            if why is not None:
                self._reject("terms", f"refused by the receiver: {why}", LayoutMismatch)
            if hello.fingerprint != self._fingerprint:
                self._reject(
                    "layout",
                    f"KV layout mismatch: sender has {hello.layout} (fingerprint {hello.fingerprint[:12]}), "
                    f"receiver has {self._layout} (fingerprint {self._fingerprint[:12]})",
                    LayoutMismatch,
                )
            for codec in hello.session_codecs:
                why = self._check_codec(codec)
                if why is not None:
                    self._reject("codec", f"codec {codec!r} refused by the receiver: {why}", LayoutMismatch)
            why = self._check_shard(hello) if self._check_shard is not None else None
            if why is not None:
                self._reject("layout", why, LayoutMismatch)
            if hello.checksum != self.checksum:
                self._reject(
                    "checksum",
                    f"payload checksum mismatch: sender uses {hello.checksum!r}, receiver {self.checksum!r} "
                    f"(both sides must set the same checksum=; with TLS both default to 'none')",
                    LayoutMismatch,
                )
            terms: dict[str, object] = {"window": self._window, "max_payload": self.max_payload, "tp": self._tp,
                                        "block_size": self._block_size}  # fmt: skip
            if hello.codecs:
                terms["codecs"] = len(hello.codecs)
            if hello.device_payloads and all(self._device_payloads(c) for c in hello.session_codecs):
                self.device_payloads = terms["device_payloads"] = True
            self._outbox.append(json_frame(FrameType.ACCEPT, terms))
            self.state = State.OPEN
            return [Authenticated(hello)]
        if t == FrameType.BEGIN:
            request_id = parse_text(header, payload)
            if not request_id:
                raise ProtocolError("BEGIN: empty request id")
            assert self.hello is not None  # OPEN comes after HELLO
            if header.tensor >= len(self.hello.session_codecs):
                raise ProtocolError(
                    f"BEGIN names codec {header.tensor}; this session has {len(self.hello.session_codecs)}"
                )
            if header.flags & BEGIN_ALL_HEADS:
                return [Begin(header.tag, request_id, header.count, None, 0, bool(header.flags & BEGIN_WHOLE),
                              header.tensor)]  # fmt: skip
            return [Begin(header.tag, request_id, header.count, header.layer, header.start,
                          bool(header.flags & BEGIN_WHOLE), header.tensor)]  # fmt: skip
        if t == FrameType.DATA:
            return [Data(header, payload)]  # its checksum: verify_data, before it is declared ready
        if t == FrameType.CANCEL:
            return [Cancel(header.tag, parse_text(header, payload))]
        raise AssertionError(t)

    def refuse(self, code: str, reason: str) -> None:
        """Refuse a client that authenticated after all (a limit of this side was reached):
        the ACCEPT not yet sent becomes a REJECT, and the connection ends."""
        self._outbox.clear()
        self._outbox.append(json_frame(FrameType.REJECT, {"code": code, "reason": reason}))
        self._fail()

    def verify_data(self, header: Header, parts) -> bool:
        """Whether a DATA payload, received as ``parts`` (buffers in order, wherever they
        lie in host memory, or objects with a ``crc32c(crc)`` method), matches its
        header's checksum. Always True in a session without checksums. A mismatch is not
        a protocol error: the payload is asked for again (:meth:`nack`)."""
        if self.checksum == "none":
            return True
        return crc32c_parts(parts) == header.payload_crc

    def verify_device_data(self, header: Header, crc: int | None) -> bool:
        """The same for a payload received into device memory, whose CRC32C (``crc``) was
        computed where it lies."""
        if not self.device_payloads or header.type != FrameType.DATA or self.state != State.OPEN:
            self._fail()
            raise ProtocolError("a device payload outside a device-payload DATA frame")
        return self.checksum == "none" or crc == header.payload_crc

    def nack(self, header: Header, reason: str) -> bytes:
        """Ask for the chunk of DATA frame ``header`` again."""
        return control_frame(
            FrameType.NACK, _text_payload(reason), tag=header.tag, layer=header.layer, tensor=header.tensor,
            start=header.start, count=header.count, flags=header.flags & DATA_RAW,
        )  # fmt: skip

    # -- what the receiver says once open --------------------------------------------
    def ack(self, tag: int, ok: bool, message: str = "", checksum: bool = False) -> bytes:
        """ACK of request ``tag``: complete, or failed (``checksum``: its payloads failed
        their checksum too often) for ``message``."""
        status = AckStatus.OK if ok else AckStatus.CHECKSUM if checksum else AckStatus.FAILED
        return control_frame(FrameType.ACK, _text_payload(message), tag=tag, flags=status)

    def credit(self, nbytes: int) -> bytes:
        # control_frame(FrameType.CREDIT, start=nbytes), packed directly: a few a frame
        # (the CRC32C of its empty payload is 0)
        return pack_header(FrameType.CREDIT, 0, 0, 0, 0, nbytes, 0, 0, 0)

    def cancel(self, tag: int, reason: str) -> bytes:
        return control_frame(FrameType.CANCEL, _text_payload(reason), tag=tag)
