"""The protocol, sans I/O: handshake, framing h11-style (whole, byte by byte, trailing), fuzz."""

import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvwire.errors import AuthenticationFailed, LayoutMismatch, ProtocolError
from kvwire.proto import (
    NEED_DATA,
    Accepted,
    Ack,
    Authenticated,
    Begin,
    ClientConnection,
    Credit,
    Data,
    FrameReader,
    FrameType,
    Header,
    Nack,
    ServerConnection,
    State,
    crc32c,
    parse_header,
)
from kvwire.proto.frames import HEADER_SIZE, PROTOCOL_VERSION, control_frame, json_frame, pack_header

SECRET = b"correct horse battery"


def client(secret=SECRET, fingerprint="f" * 32, codec="raw"):
    return ClientConnection(
        secret, session="ab" * 8, conn_index=0, conn_count=1, fingerprint=fingerprint, layout="L", codec=codec
    )


def server(secret=SECRET, fingerprint="f" * 32, accept=lambda c: None):
    return ServerConnection(
        secret, fingerprint=fingerprint, layout="L", check_codec=accept, window=1 << 20, max_payload=1 << 16
    )


def pump(data: bytes, reader: FrameReader, mode: str) -> list:
    """Feed ``data`` whole, byte by byte, or with trailing garbage; collect events."""
    events = []
    chunks = [data] if mode != "bytewise" else [data[i : i + 1] for i in range(len(data))]
    if mode == "trailing":
        chunks = [data + b"\x00\x01"]
    for chunk in chunks:
        reader.feed(chunk)
        while True:
            got = reader.next_events()
            if got is NEED_DATA:
                break
            events += got
    if mode == "trailing":
        assert reader.trailing == b"\x00\x01"
    return events


def handshake(c, s, mode="whole"):
    cr, sr = FrameReader(c), FrameReader(s)
    events_s = pump(c.data_to_send(), sr, mode)  # HELLO
    pump(s.data_to_send(), cr, mode)  # CHALLENGE -> client queues AUTH
    events_s += pump(c.data_to_send(), sr, mode)  # AUTH -> ACCEPT or REJECT
    return cr, sr, events_s


@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
def test_handshake_then_data_and_ack(mode):
    c, s = client(), server()
    cr, sr, events_s = handshake(c, s, "whole" if mode == "trailing" else mode)
    assert [type(e) for e in events_s] == [Authenticated]
    assert events_s[0].hello.codec == "raw"
    events_c = pump(s.data_to_send(), cr, "whole" if mode == "trailing" else mode)
    assert events_c == [Accepted(window=1 << 20, max_payload=1 << 16)]
    assert c.state == s.state == State.OPEN

    payload = bytes(range(256)) * 4
    frames = c.begin(7, "req-1", 100)
    frames += Header(FrameType.DATA, tag=7, layer=2, tensor=1, start=16, count=4, length=len(payload),
                     payload_crc=crc32c(payload)).pack() + payload  # fmt: skip
    sr2 = FrameReader(s)
    events = pump(frames, sr2, mode)
    assert events[0] == Begin(7, "req-1", 100)
    assert isinstance(events[1], Data) and bytes(events[1].payload) == payload
    assert events[1].header.layer == 2 and events[1].header.start == 16

    cr2 = FrameReader(c)
    acks = s.ack(7, True) + s.ack(8, False, "boom") + s.ack(9, False, "crc", checksum=True)
    assert pump(acks, cr2, mode) == [Ack(7, True, ""), Ack(8, False, "boom"), Ack(9, False, "crc", checksum=True)]


@pytest.mark.parametrize("text", ["x" * 4095 + "é", "é" * 3000, "a lone surrogate \udcff from an OS error"])
def test_a_long_or_odd_reason_reaches_the_peer_as_text(text):
    """Reasons are cut to 4096 bytes: never inside a character (the peer would drop the
    connection on a payload that is not UTF-8, and not read why)."""
    c, s = client(), server()
    cr, sr, _ = handshake(c, s)
    pump(s.data_to_send(), cr, "whole")
    frames = c.begin(7, "req-1", 100) + c.cancel(7, text)
    begin, cancel = pump(frames, FrameReader(s), "whole")
    sendable = text.encode("utf-8", "replace").decode()  # a lone surrogate becomes "?"
    cut = len(cancel.reason.encode())
    assert sendable.startswith(cancel.reason) and min(len(sendable.encode()), 4096) - 4 < cut <= 4096
    ack, cancel_back = pump(s.ack(7, False, text) + s.cancel(8, text), FrameReader(c), "whole")
    assert ack.message == cancel_back.reason == cancel.reason


def test_wrong_secret_is_rejected_before_any_data():
    c, s = client(secret=b"wrong secret!!"), server()
    cr, sr = FrameReader(c), FrameReader(s)
    pump(c.data_to_send(), sr, "whole")
    with pytest.raises(AuthenticationFailed, match="did not prove"):
        pump(s.data_to_send(), cr, "whole")  # the client sees the server cannot prove the secret it has
    assert c.state == State.ERROR


def test_server_rejects_a_client_with_the_wrong_secret():
    c, s = client(), server()
    cr, sr = FrameReader(c), FrameReader(s)
    pump(c.data_to_send(), sr, "whole")
    pump(s.data_to_send(), cr, "whole")
    forged = json_frame(FrameType.AUTH, {"proof": "00" * 32})
    with pytest.raises(AuthenticationFailed, match="wrong shared secret"):
        pump(forged, sr, "whole")
    reject = s.data_to_send()
    assert parse_header(reject[:HEADER_SIZE]).type == FrameType.REJECT
    assert s.state == State.ERROR


@pytest.mark.parametrize(
    "server_kwargs, client_kwargs, message",
    [
        ({"fingerprint": "a" * 32}, {}, "layout mismatch"),
        ({"accept": lambda c: "only fp8"}, {"codec": "raw"}, "codec 'raw' refused"),
    ],
)
def test_layout_and_codec_mismatch_fail_on_both_sides(server_kwargs, client_kwargs, message):
    c, s = client(**client_kwargs), server(**server_kwargs)
    cr, sr = FrameReader(c), FrameReader(s)
    pump(c.data_to_send(), sr, "whole")
    pump(s.data_to_send(), cr, "whole")
    with pytest.raises(LayoutMismatch, match=message):
        pump(c.data_to_send(), sr, "whole")
    with pytest.raises(LayoutMismatch, match=message):
        pump(s.data_to_send(), cr, "whole")


def test_data_before_authentication_is_a_protocol_error():
    s = server()
    frame = Header(FrameType.DATA, tag=1, length=4, payload_crc=crc32c(b"abcd")).pack() + b"abcd"
    with pytest.raises(ProtocolError, match="DATA in state await_hello"):
        pump(frame, FrameReader(s), "whole")
    assert s.state == State.ERROR
    with pytest.raises(ProtocolError):  # nothing leaves the error state
        pump(client().data_to_send(), FrameReader(s), "whole")


def test_a_corrupted_payload_is_asked_for_again_and_a_corrupted_header_is_fatal():
    c, s = client(), server()
    handshake(c, s)
    payload = b"x" * 100
    good = Header(FrameType.DATA, tag=1, layer=2, tensor=1, start=16, count=4, length=100,
                  payload_crc=crc32c(payload), flags=0x01)  # fmt: skip
    header = parse_header(good.pack())
    s.on_header(header)
    assert s.verify_data(header, [payload[:30], payload[30:]])  # in pieces, wherever they lie
    assert not s.verify_data(header, [b"y" + payload[1:]])
    assert s.state == State.OPEN  # not a protocol error: the chunk is asked for again
    nack = c.on_payload(*split_frame(s.nack(header, "payload checksum mismatch")))
    assert nack == [Nack(1, 2, 1, 16, 4, True, "payload checksum mismatch")]
    s2 = server()
    handshake(client(), s2)
    bad_header = bytearray(good.pack())
    bad_header[12] ^= 1  # flip a bit of ``start``
    with pytest.raises(ProtocolError, match="header checksum"):
        pump(bytes(bad_header) + payload, FrameReader(s2), "whole")


def split_frame(frame: bytes):
    header = parse_header(frame[:HEADER_SIZE])
    return header, frame[HEADER_SIZE:]


@pytest.mark.parametrize(
    "client_sum, server_sum, ok",
    [("crc32c", "crc32c", True), ("none", "none", True), ("none", "crc32c", False), ("crc32c", "none", False)],
)
def test_both_sides_agree_on_the_payload_checksum(client_sum, server_sum, ok):
    c = ClientConnection(SECRET, session="ab" * 8, conn_index=0, conn_count=1, fingerprint="f" * 32, layout="L",
                         codec="raw", checksum=client_sum)  # fmt: skip
    s = ServerConnection(SECRET, fingerprint="f" * 32, layout="L", check_codec=lambda c: None, window=1 << 20,
                         max_payload=1 << 16, checksum=server_sum)  # fmt: skip
    if ok:
        handshake(c, s)
        header = Header(FrameType.DATA, tag=1, count=1, length=3, payload_crc=0 if server_sum == "none" else 1)
        assert s.verify_data(header, [b"abc"]) is (server_sum == "none")
        return
    with pytest.raises(LayoutMismatch, match=f"sender uses '{client_sum}', receiver '{server_sum}'"):
        handshake(c, s)


def test_oversized_payloads_are_refused_before_reading_them():
    c, s = client(), server()
    handshake(c, s)
    with pytest.raises(ProtocolError, match="outside"):
        s.on_header(Header(FrameType.DATA, tag=1, length=(1 << 16) + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        parse_header(Header(FrameType.BEGIN, length=1 << 20).pack())


@given(st.binary(max_size=300))
def test_garbage_into_a_fresh_server_parses_or_raises_protocol_error(data):
    reader = FrameReader(server())
    reader.feed(data)
    try:
        while reader.next_events() is not NEED_DATA:
            pass
    except ProtocolError:
        pass


@given(st.binary(max_size=200), st.integers(0, 2))
def test_garbage_after_a_handshake_parses_or_raises_protocol_error(data, where):
    c, s = client(), server()
    cr, _, _ = handshake(c, s)
    pump(s.data_to_send(), cr, "whole")  # ACCEPT
    target, reader = (s, FrameReader(s)) if where else (c, cr)
    prefix = Header(FrameType.DATA, tag=1, length=len(data) or 1).pack() if where == 2 else b""
    reader.feed(prefix + data)
    try:
        while reader.next_events() is not NEED_DATA:
            pass
    except ProtocolError:
        pass
    assert target.state in (State.OPEN, State.ERROR)


@pytest.mark.parametrize(
    "asks, can, agreed",
    [(True, True, True), (True, False, False), (False, True, False), (False, False, False)],
)
def test_device_payloads_only_when_both_sides_want_them(asks, can, agreed):
    c = ClientConnection(SECRET, session="ab" * 8, conn_index=0, conn_count=1, fingerprint="f" * 32, layout="L",
                         codec="fp8", device_payloads=asks)  # fmt: skip
    asked = []
    s = ServerConnection(SECRET, fingerprint="f" * 32, layout="L", check_codec=lambda c: None, window=1 << 20,
                         max_payload=1 << 16, device_payloads=lambda codec: asked.append(codec) or can)  # fmt: skip
    cr, _, events_s = handshake(c, s)
    assert events_s[0].hello.device_payloads is asks
    assert pump(s.data_to_send(), cr, "whole") == [Accepted(1 << 20, 1 << 16, agreed)]
    assert s.device_payloads is agreed
    assert asked == (["fp8"] if asks else [])  # the receiver is asked about the session's codec


def test_a_device_payload_is_checked_against_its_header():
    c = ClientConnection(SECRET, session="ab" * 8, conn_index=0, conn_count=1, fingerprint="f" * 32, layout="L",
                         codec="raw", device_payloads=True)  # fmt: skip
    s = ServerConnection(SECRET, fingerprint="f" * 32, layout="L", check_codec=lambda c: None, window=1 << 20,
                         max_payload=1 << 16, device_payloads=lambda codec: True)  # fmt: skip
    handshake(c, s)
    payload = bytes(range(200))
    header = Header(FrameType.DATA, tag=1, count=1, length=len(payload), payload_crc=crc32c(payload))
    s.on_header(header)
    assert s.verify_device_data(header, crc32c(payload))  # the CRC computed where the payload lies
    assert not s.verify_device_data(header, crc32c(payload) ^ 1)  # asked for again, not fatal
    assert s.state == State.OPEN


def test_a_device_payload_is_refused_where_none_was_agreed():
    c, s = client(), server()
    handshake(c, s)
    header = Header(FrameType.DATA, tag=1, count=1, length=4, payload_crc=0)
    with pytest.raises(ProtocolError, match="device payload"):
        s.verify_device_data(header, 0)


def test_unknown_data_flags_are_refused():
    header = Header(FrameType.DATA, tag=1, count=1, length=4, flags=0x02).pack()
    with pytest.raises(ProtocolError, match="DATA flags"):
        parse_header(header)
    assert parse_header(Header(FrameType.DATA, tag=1, count=1, length=4, flags=0x01).pack()).flags == 1


def test_every_frame_type_parses_to_itself_and_an_unknown_one_is_named():
    for ftype in FrameType:
        assert parse_header(Header(ftype, tag=7).pack()).type is ftype
    unknown = pack_header(12, 0, 1, 0, 0, 0, 0, 0, 0)  # a well-formed header of no known type
    with pytest.raises(ProtocolError, match="unknown frame type 12"):
        parse_header(unknown)


def test_a_credit_frame_is_the_control_frame_it_stands_for():
    c, s = client(), server()
    cr, _, _ = handshake(c, s)
    pump(s.data_to_send(), cr, "whole")  # ACCEPT: the client is open
    for nbytes in (1, 256 << 10, 2**32 - 1):
        frame = s.credit(nbytes)
        assert frame == control_frame(FrameType.CREDIT, start=nbytes)
        assert pump(frame, cr, "whole") == [Credit(nbytes)]


# -- a codec per transfer: HELLO's codecs, BEGIN's codec index ---------------------------------
def client_offering(codecs, codec=None):
    return ClientConnection(SECRET, session="ab" * 8, conn_index=0, conn_count=1, fingerprint="f" * 32, layout="L",
                            codec=codec or codecs[0], codecs=codecs)  # fmt: skip


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_a_session_offers_several_codecs_and_each_begin_names_one(mode):
    c, s = client_offering(["raw", "fp8", "int4/g64"]), server()
    cr, sr, events_s = handshake(c, s, mode)
    assert events_s[0].hello.session_codecs == ("raw", "fp8", "int4/g64")
    assert pump(s.data_to_send(), cr, mode) == [Accepted(window=1 << 20, max_payload=1 << 16)]
    events = pump(c.begin(3, "r", 10, codec=2) + c.begin(4, "s", 10), FrameReader(s), mode)
    assert events == [Begin(3, "r", 10, codec=2), Begin(4, "s", 10, codec=0)]
    with pytest.raises(ValueError, match="codec: index 3"):
        c.begin(5, "t", 10, codec=3)


def test_one_codec_is_the_old_handshake_and_begin_names_codec_zero():
    c, s = client(codec="fp8"), server()
    cr, sr, events_s = handshake(c, s)
    assert events_s[0].hello.codecs == () and events_s[0].hello.session_codecs == ("fp8",)
    pump(s.data_to_send(), cr, "whole")
    begin = c.begin(1, "r", 5)
    assert parse_header(begin[:HEADER_SIZE]).tensor == 0  # what every peer has always sent


def test_the_receiver_checks_every_offered_codec():
    c = client_offering(["raw", "int4"])
    s = server(accept=lambda codec: None if codec == "raw" else "accepted codecs are ['raw']")
    cr, sr = FrameReader(c), FrameReader(s)
    pump(c.data_to_send(), sr, "whole")
    pump(s.data_to_send(), cr, "whole")
    with pytest.raises(LayoutMismatch, match="codec 'int4' refused"):
        pump(c.data_to_send(), sr, "whole")
    with pytest.raises(LayoutMismatch, match="codec 'int4' refused"):
        pump(s.data_to_send(), cr, "whole")  # the REJECT reaches the sender with the reason


def test_a_receiver_that_does_not_echo_the_codecs_is_refused_by_the_sender():
    """An older receiver ignores HELLO's codecs and would decode every transfer with the
    first codec: its ACCEPT lacks ``codecs``, and the sender refuses it, naming why."""
    c, s = client_offering(["raw", "fp8"]), server()
    cr, sr = FrameReader(c), FrameReader(s)
    pump(c.data_to_send(), sr, "whole")
    pump(s.data_to_send(), cr, "whole")
    pump(c.data_to_send(), sr, "whole")
    s.data_to_send()  # the real ACCEPT; an old receiver's has no "codecs"
    old_accept = json_frame(FrameType.ACCEPT, {"window": 1 << 20, "max_payload": 1 << 16})
    with pytest.raises(LayoutMismatch, match="does not take a codec per transfer"):
        pump(old_accept, cr, "whole")
    assert c.state == State.ERROR


@pytest.mark.parametrize(
    "codecs",
    [["fp8", "raw"], ["raw"], "raw", ["raw", 5], ["raw"] + ["fp8"] * 8],
)
def test_a_malformed_codec_list_is_a_protocol_error(codecs):
    hello = {"version": PROTOCOL_VERSION, "session": "s", "conn": 0, "conns": 1, "nonce": "00" * 32,
             "fingerprint": "f" * 32, "layout": "L", "codec": "raw", "block_size": 16, "tp": [0, 1, 0],
             "codecs": codecs}  # fmt: skip
    with pytest.raises(ProtocolError, match="codecs must list"):
        pump(json_frame(FrameType.HELLO, hello), FrameReader(server()), "whole")


def test_a_begin_naming_a_codec_the_session_lacks_is_a_protocol_error():
    c, s = client_offering(["raw", "fp8"]), server()
    cr, sr, _ = handshake(c, s)
    pump(s.data_to_send(), cr, "whole")
    bad = Header(FrameType.BEGIN, tag=1, count=5, length=1, payload_crc=crc32c(b"r"), tensor=2).pack() + b"r"
    with pytest.raises(ProtocolError, match="names codec 2; this session has 2"):
        pump(bad, FrameReader(s), "whole")
    with pytest.raises(ValueError, match="codecs: 1..8 codecs starting with 'fp8'"):
        client_offering(["raw", "fp8"], codec="fp8")


def test_control_frames_read_without_waiting_arrive_whole_however_the_bytes_come():
    """A sender's writer reads its connection between sends without waiting
    (``Channel.read_ready``): it takes every whole control frame the socket holds, keeps a
    frame begun but not ended for the next call, and hands it whole to ``next_events``
    (the blocking reader it becomes once it stops writing). A bad frame raises after the
    events of those before it, a DATA header is refused before its payload is waited
    for, a flood is read a bounded amount per call, and the end of the stream is PeerLost."""
    import socket

    from kvwire.engine.channel import READ_AHEAD, Channel
    from kvwire.errors import PeerLost
    from kvwire.proto import Ack, Credit
    from kvwire.transport import TcpStream

    def opened():
        c, s = client(), server()
        reader = handshake(c, s)[0]
        reader.feed(s.data_to_send())  # ACCEPT
        assert reader.next_events() == [Accepted(window=1 << 20, max_payload=1 << 16)]
        return c, s

    c, s = opened()
    a, b = socket.socketpair()
    channel = Channel(TcpStream(a, "pair"), c)
    try:
        assert list(channel.read_ready()) == []  # nothing there: returns at once
        ack = s.ack(7, True, "done")
        b.sendall(s.credit(100) + s.credit(200) + ack[:10])
        assert list(channel.read_ready()) == [Credit(100), Credit(200)]
        b.sendall(ack[10 : HEADER_SIZE + 2])  # the header whole, its payload begun
        assert list(channel.read_ready()) == []
        timer = threading.Timer(0.2, b.sendall, (ack[HEADER_SIZE + 2 :] + s.credit(5),))
        timer.start()
        assert channel.next_events() == [Ack(7, True, "done")]  # waits for the rest of that frame only
        timer.join()
        assert channel.next_events() == [Credit(5)]
        data = Header(FrameType.DATA, tag=7, layer=0, tensor=0, start=0, count=1, length=1 << 20).pack()
        b.sendall(s.credit(9) + data)  # a megabyte announced, none of it sent: refused now, not waited for
        events = channel.read_ready()
        assert next(events) == Credit(9)  # the frame before the bad one counts
        with pytest.raises(ProtocolError, match="DATA"):
            next(events)
    finally:
        b.close()

    # A peer that floods the connection: each call reads at most READ_AHEAD bytes (whole
    # frames out, the begun one kept), so the writer goes back to sending between reads.
    f, g = socket.socketpair()
    flooded = Channel(TcpStream(f, "pair"), opened()[0])
    credit = s.credit(1)
    sent = 4 * READ_AHEAD // len(credit)
    flood = threading.Thread(target=g.sendall, args=(credit * sent,))
    flood.start()
    counts: list[int] = []
    deadline = time.monotonic() + 20
    while sum(counts) < sent and time.monotonic() < deadline:
        counts.append(len(list(flooded.read_ready())))
    flood.join(timeout=5)
    assert sum(counts) == sent and max(counts) <= READ_AHEAD // len(credit) + 1, counts
    f.close()
    g.close()

    d, e = socket.socketpair()
    closed = Channel(TcpStream(d, "pair"), opened()[0])
    e.close()
    with pytest.raises(PeerLost, match="closed by the peer"):
        list(closed.read_ready())
    d.close()
