"""What an outside attack campaign and a long soak broke, each pinned by a test.

Every test here failed before its fix: a slow handshake held a connection forever, idle
sockets each took a thread, a huge BEGIN allocated its coverage map, small unexpected
chunks filled the staging pool, ``finish(timeout)`` waited behind a blocked writer,
finished requests were never forgotten, one idle socket stalled every TLS handshake, and
NaN deadlines were accepted.
"""

from __future__ import annotations

import math
import socket
import ssl
import threading
import time

import pytest
import torch

import kvwire
from kvwire.engine.common import layout_summary
from kvwire.proto import FrameType, Header, ServerConnection, parse_header
from kvwire.proto.frames import HEADER_SIZE
from tests.helpers import SECRET, TcpRelay, WireClient, assert_transferred, filled, wait_until, wire_tp

LAYOUT = kvwire.KVLayout.gqa(num_layers=3, num_kv_heads=2, head_dim=64, block_size=16)


def read_frame(client: WireClient, timeout: float = 10.0):
    client.sock.settimeout(timeout)
    header = parse_header(client._recv(HEADER_SIZE))
    payload = client._recv(header.length)
    return header, payload


def transfer_between(rx, src, request_id, src_blocks, dst_blocks, num_tokens, timeout=20.0) -> float:
    """One well-behaved transfer; returns its duration."""
    t0 = time.monotonic()
    h = rx.expect(request_id, dst_blocks, num_tokens, deadline=timeout)
    with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=2) as tx:
        tx.send(request_id, src_blocks, num_tokens, timeout=timeout)
    h.wait(timeout=timeout)
    return time.monotonic() - t0


# -- 1. slowloris: a whole-handshake deadline, and a cap on connections not yet authenticated ----
def test_a_handshake_dribbled_byte_by_byte_is_cut_at_the_deadline():
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(4), handshake_timeout=1.0)
    try:
        sock = socket.create_connection(rx.address)
        sock.settimeout(0.1)
        t0 = time.monotonic()
        closed_at = None
        # A valid header announcing a 60000-byte HELLO, then its payload one byte every 0.1 s:
        # no single recv ever waits as long as the handshake timeout.
        sock.sendall(Header(FrameType.HELLO, length=60000).pack())
        for _ in range(60):
            try:
                sock.send(b"{")
                if sock.recv(1) == b"":
                    closed_at = time.monotonic()
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_at = time.monotonic()
                break
        sock.close()
        assert closed_at is not None, "the receiver kept a dribbling handshake open for 6 s"
        assert closed_at - t0 < 3.0
        assert wait_until(lambda: rx.stats()["rejected_connections"] >= 1)
        assert "handshake" in rx.stats()["rejected"][-1]["reason"]
    finally:
        rx.close()


def test_idle_sockets_beyond_the_cap_are_refused_at_once_and_cost_no_threads():
    dst = LAYOUT.allocate(8)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, max_pending_connections=8)
    src = filled(LAYOUT, 8, seed=3)
    idle = []
    try:
        threads_before = threading.active_count()
        for _ in range(40):
            idle.append(socket.create_connection(rx.address))
        assert wait_until(lambda: rx.stats()["refused_connections"] >= 32)
        assert threading.active_count() - threads_before <= 8 + 2
        for s in idle[-8:]:  # the refused ones were closed by the receiver at once
            s.settimeout(5)
            assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()
    # once the idle sockets are gone, senders get in as before
    assert wait_until(lambda: rx.stats()["pending_connections"] == 0)
    transfer_between(rx, src, "after-idle", [0, 1], [4, 5], 20)
    assert_transferred(LAYOUT, src, [0, 1], dst, [4, 5], 20)
    rx.close()


# -- 2. BEGIN is checked against what the receiver can hold -------------------------------------
def test_a_begin_larger_than_the_receivers_blocks_is_refused_without_allocating():
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(32))
    try:
        client = WireClient(rx.address, LAYOUT)
        client.send(client.proto.begin(1, "huge", (1 << 32) - 1))
        header, payload = read_frame(client)
        assert header.type == FrameType.ACK and header.tag == 1 and header.flags != 0
        assert "4294967295 tokens" in payload.decode() and "512" in payload.decode()
        assert rx.census()["requests"] == 0
        client.close()
    finally:
        rx.close()


def test_a_flood_of_refused_requests_is_one_log_line_a_second(caplog):
    """A peer can have requests refused as fast as it can send BEGINs; the receiver logs
    at most one such line a second, and the next line says how many it left out."""
    import logging
    import re

    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(32))
    try:
        client = WireClient(rx.address, LAYOUT)
        with caplog.at_level(logging.WARNING, logger="kvwire"):
            t0 = time.monotonic()
            for tag in range(1, 201):
                client.send(client.proto.begin(tag, f"huge-{tag}", (1 << 32) - 1))
            for _ in range(200):
                header, _ = read_frame(client)
                assert header.type == FrameType.ACK and header.flags != 0
            elapsed = time.monotonic() - t0
            lines = [r.getMessage() for r in caplog.records if "refused a request" in r.getMessage()]
            assert 1 <= len(lines) <= elapsed + 2
            time.sleep(1.1)
            client.send(client.proto.begin(201, "huge-201", (1 << 32) - 1))
            read_frame(client)
            assert wait_until(lambda: sum("refused a request" in r.getMessage() for r in caplog.records)
                              > len(lines), timeout=5)  # fmt: skip
        client.close()
    finally:
        rx.close()
    said = [r.getMessage() for r in caplog.records if "refused a request" in r.getMessage()]
    left_out = sum(int(m.group(1)) for line in said if (m := re.search(r"\((\d+) more like it", line)))
    assert len(said) + left_out == 201 and "huge-201" in said[-1]


def test_log_limit_counts_what_it_leaves_out():
    import logging

    from kvwire.engine.common import LogLimit

    now = [0.0]
    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    logger = logging.getLogger("kvwire.test-log-limit")
    logger.addHandler(Collect())
    limit = LogLimit(logger, period_s=1.0, clock=lambda: now[0])
    assert limit.warning("a", "first %d", 1)
    assert not limit.warning("a", "second %d", 2) and not limit.warning("a", "third %d", 3)
    assert limit.warning("b", "other kind")  # kinds are limited apart
    now[0] = 1.0
    assert limit.warning("a", "fourth %d", 4)
    assert said == ["first 1", "other kind", "fourth 4 (2 more like it since the last such line, not logged)"]


def test_a_small_lz4_payload_naming_more_rows_than_a_slot_holds_is_refused_before_decoding():
    """``+lz4`` payloads are checked against the bound of the rows they name; a hostile
    sender could name a whole tensor's rows with a payload of a few KiB (LZ4 packs zeros
    about 255 to 1) and have the receiver decompress and decode far more than a slot. A
    chunk a real sender cuts fits a slot coded whatever lz4 makes of it: one that does not
    is a protocol error, before anything is allocated for it."""
    import numpy as np

    from kvwire.codec import ChunkSpec, get, scratch
    from kvwire.codec.lz4stage import compress_blocks
    from kvwire.proto import crc32c

    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(128), slot_bytes=64 << 10)
    try:
        rows = 128 * LAYOUT.block_size
        inner = get("fp8").encoded_size(ChunkSpec(rows, 2, 64, LAYOUT.dtype, "k", LAYOUT.block_size))
        assert inner > 64 << 10
        payload = compress_blocks(np.zeros(inner, dtype=np.uint8))
        assert len(payload) < 64 << 10
        h = rx.expect("bomb", list(range(128)), rows, deadline=30)
        idle = scratch.idle_bytes()
        client = WireClient(rx.address, LAYOUT, codec="fp8+lz4")
        data = Header(FrameType.DATA, tag=1, layer=0, tensor=0, start=0, count=rows, length=len(payload),
                      payload_crc=crc32c(payload)).pack()  # fmt: skip
        client.send(client.proto.begin(1, "bomb", rows) + data + payload)
        assert client.closed_by_peer(timeout=10)
        assert wait_until(lambda: rx.stats()["protocol_errors"] == 1, timeout=10)
        assert h.chunks == 0 and scratch.idle_bytes() == idle
        client.close()
    finally:
        rx.close()


@pytest.mark.parametrize("codec, why", [
    ("int4/g128", "not a multiple of the int4 group_size 128"),  # LAYOUT's head_dim is 64
    ("int4/g064", "spelt 'int4/g64' on the wire"),
])  # fmt: skip
def test_a_codec_the_receiver_cannot_take_as_spelt_is_refused_at_the_handshake(codec, why):
    """A codec that cannot code the layout (int4 groups that do not divide head_dim) was
    accepted and failed the first DATA frame as a bug would, in the reader; one spelt
    otherwise than kvwire spells it added an entry to the receiver's codecs per spelling.
    Both are refused at the handshake now, saying why."""
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(8))
    try:
        with pytest.raises(kvwire.KvwireError, match=why):
            WireClient(rx.address, LAYOUT, codec=codec)
        assert wait_until(lambda: rx.stats()["rejected_connections"] == 1, timeout=10)
        assert not rx._codecs  # nothing kept for a peer refused
    finally:
        rx.close()


def test_a_payload_that_does_not_decode_fails_its_request_naming_rows_and_sender(caplog):
    """A payload whose checksum holds but whose lz4 stream is corrupt fails its request
    with a message naming the rows and the sender, as a checksum failure does; the log
    gets a warning without a traceback (the peer's bytes, not a bug in kvwire)."""
    import logging

    import numpy as np

    from kvwire.codec import ChunkSpec, get
    from kvwire.codec.lz4stage import compress_blocks
    from kvwire.proto import crc32c

    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(8))
    try:
        inner = get("int4h").encoded_size(ChunkSpec(32, 2, 64, LAYOUT.dtype, "v", LAYOUT.block_size))
        good = compress_blocks(np.arange(inner, dtype=np.uint8) % 7)
        payload = good[:4] + b"\xff" * (len(good) - 4)
        h = rx.expect("r", [0, 1], 32, deadline=10)
        client = WireClient(rx.address, LAYOUT, codec="int4h+lz4")
        data = Header(FrameType.DATA, tag=1, layer=0, tensor=1, start=0, count=32, length=len(payload),
                      payload_crc=crc32c(payload)).pack()  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="kvwire"):
            client.send(client.proto.begin(1, "r", 32) + data + payload)
            with pytest.raises(kvwire.TransferError, match=r"layer 0 v rows 0\.\.32, from the sender at .* lz4"):
                h.wait(timeout=10)
        said = [r for r in caplog.records if "did not decode" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING and said[0].exc_info is None
        client.close()
    finally:
        rx.close()


def test_open_requests_per_session_are_limited():
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(32), max_requests_per_session=4)
    try:
        client = WireClient(rx.address, LAYOUT)
        for tag in range(1, 6):
            client.send(client.proto.begin(tag, f"r{tag}", 16))
        header, payload = read_frame(client)
        assert header.type == FrameType.ACK and header.tag == 5 and header.flags != 0
        assert "4 open requests" in payload.decode()
        assert rx.census()["requests"] == 4
        client.close()
    finally:
        rx.close()


# -- 3. parked data is bounded by the bytes it holds, per peer; other peers are unaffected -----
def test_small_unexpected_chunks_do_not_starve_expected_transfers():
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(64), staging_bytes=16 << 20,
                         unclaimed_timeout=30)  # fmt: skip
    src = filled(LAYOUT, 64, seed=5)
    try:
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=1) as flooder:
            for i in range(9):  # nine small requests nobody expects (yet): 6 chunks of 4 KiB each
                t = flooder.transfer(f"unexpected-{i}", [i], 16, deadline=60)
                for layer in range(LAYOUT.num_layers):
                    t.send_layer(layer)
            assert wait_until(lambda: rx.stats().get("parked_chunks", 0) >= 54)
            took = transfer_between(rx, src, "expected", [20, 21], [40, 41], 32)
            assert took < 10, f"an expected transfer waited {took:.1f} s behind parked data"
            assert rx.stats()["staging"]["in_use_bytes"] <= 54 * 4096
            for i in range(9):  # the parked ones complete once expected
                rx.expect(f"unexpected-{i}", [50 + i], 16).wait(timeout=10)
    finally:
        rx.close()


def test_a_peer_over_its_parked_bound_is_slowed_alone():
    dst = LAYOUT.allocate(64)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, max_parked_bytes_per_peer=32 << 10,
                         unclaimed_timeout=60)  # fmt: skip
    src = filled(LAYOUT, 64, seed=6)
    try:
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=1) as flooder:
            handles = []
            for i in range(16):  # 16 x 24 KiB: far past the 32 KiB this peer may park
                t = flooder.transfer(f"slow-{i}", [i], 16, deadline=60)
                for layer in range(LAYOUT.num_layers):
                    t.send_layer(layer)
                handles.append(t)
            assert wait_until(lambda: rx.stats()["parked_bytes"] >= 24 << 10)
            time.sleep(0.3)
            assert rx.stats()["parked_bytes"] <= 32 << 10
            took = transfer_between(rx, src, "other-peer", [20, 21], [40, 41], 32)
            assert took < 10
            for i in range(16):
                rx.expect(f"slow-{i}", [44 + i], 16)
            for t in handles:
                t.finish(timeout=20)
            assert_transferred(LAYOUT, src, [15], dst, [59], 16)
    finally:
        rx.close()


def test_an_expect_wakes_the_reader_waiting_to_park_its_request():
    """A sender's parking is full (another request of its parked first) and its next
    request's first chunk waits for room: expect() for that request lets it in at once,
    not at the unclaimed timeout."""
    dst = LAYOUT.allocate(32)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, max_parked_bytes_per_peer=8192, unclaimed_timeout=30)
    row = 2 * 64 * 2

    def frame(tag, layer, tensor, start):
        from tests import test_faults as faults

        return faults.data_frame(tag, layer, tensor, start, 16, bytes([tag]) * (16 * row))

    try:
        client = WireClient(rx.address, LAYOUT)
        client.send(client.proto.begin(2, "parked", 32) + frame(2, 0, 0, 0) + frame(2, 0, 1, 0))
        assert wait_until(lambda: rx.census()["parked_chunks"] == 2, timeout=5)
        rest = [frame(1, i, j, s) for i in range(3) for j in range(2) for s in (0, 16)]
        client.send(client.proto.begin(1, "next", 32) + b"".join(rest))
        assert wait_until(lambda: rx.stats()["parking_waits"] >= 1, timeout=5)
        h = rx.expect("next", [4, 5], 32, deadline=10)
        t0 = time.monotonic()
        h.wait()
        assert time.monotonic() - t0 < 3 and h.stats()["chunks"] == 12
    finally:
        rx.close()


# -- 4. finish(timeout) and cancel never wait behind a writer blocked in the kernel ------------
class StalledReceiver:
    """Completes the handshake over a real socket, grants a huge window, then never reads."""

    def __init__(self, layout) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, args=(layout,), daemon=True)
        self.thread.start()

    def _serve(self, layout) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self.conns.append(sock)
            proto = ServerConnection(SECRET.encode(), fingerprint=layout.model_fingerprint(),
                                     layout=layout_summary(layout), check_codec=lambda c: None, window=1 << 30,
                                     max_payload=4 << 20, tp=wire_tp(layout), block_size=layout.block_size)  # fmt: skip
            while proto.state.value != "open":
                header = parse_header(_recv(sock, HEADER_SIZE))
                n = proto.on_header(header)
                proto.on_payload(header, _recv(sock, n))
                sock.sendall(proto.data_to_send())

    def close(self) -> None:
        self.listener.close()
        for s in self.conns:
            s.close()


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("closed")
        buf += part
    return buf


def test_finish_timeout_holds_against_a_peer_that_stops_reading():
    layout = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16)
    peer = StalledReceiver(layout)
    src = layout.allocate(64)
    try:
        options = kvwire.SocketOptions(sndbuf=64 << 10)
        with kvwire.Sender(layout, peer.address, secret=SECRET, kv_caches=src, streams=1, socket_options=options) as tx:
            t = tx.transfer("stuck", list(range(64)), 1024, deadline=120)
            for i in range(layout.num_layers):
                t.send_layer(i)  # 16 MiB: the writer blocks in sendmsg long before the end
            time.sleep(0.5)
            t0 = time.monotonic()
            with pytest.raises(kvwire.TransferTimeout):
                t.finish(timeout=1)
            assert time.monotonic() - t0 < 3, "finish(timeout=1) waited for the blocked writer"
            t1 = time.monotonic()
            tx.close()
            assert time.monotonic() - t1 < 5
    finally:
        peer.close()


# -- 5. per-request records are freed however a request ends -------------------------------------
def test_records_return_to_zero_after_completed_cancelled_and_failed_requests():
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(32))
    src = filled(LAYOUT, 32, seed=7)
    try:
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=2) as tx:
            for i in range(30):  # completed
                h = rx.expect(f"ok-{i}", [8], 16)
                tx.send(f"ok-{i}", [0], 16, timeout=10)
                h.wait(timeout=10)
            for i in range(10):  # cancelled by the sender mid-way
                h = rx.expect(f"sc-{i}", [8], 16)
                t = tx.transfer(f"sc-{i}", [0], 16)
                t.send_layer(0)
                t.cancel("prefill aborted")
                with pytest.raises(kvwire.Cancelled):
                    h.wait(timeout=10)
            for i in range(10):  # cancelled by the receiver mid-way
                h = rx.expect(f"rc-{i}", [8], 16)
                t = tx.transfer(f"rc-{i}", [0], 16)
                t.send_layer(0)
                h.wait_layer(0, timeout=10)
                h.cancel("decode went away")
                assert wait_until(t.done)  # the CANCEL is on its way to the sender
                with pytest.raises(kvwire.Cancelled):
                    t.finish(timeout=10)
            for i in range(10):  # never expected: the sender's deadline passes
                t = tx.transfer(f"to-{i}", [0], 16, deadline=0.3)
                for layer in range(LAYOUT.num_layers):
                    t.send_layer(layer)
                with pytest.raises(kvwire.TransferTimeout):
                    t.finish()
            for i in range(10):  # refused by the receiver: token counts disagree
                h = rx.expect(f"bad-{i}", [8], 16)
                with pytest.raises(kvwire.TransferError):
                    tx.send(f"bad-{i}", [0, 1], 20, timeout=10)
            assert wait_until(lambda: tx.census()["transfers"] == 0)
            assert tx.census() == {"transfers": 0, "inflight_chunks": 0, "queued_chunks": 0, "begun_tags": 0}
            assert wait_until(lambda: rx.census()["requests"] == 0 and rx.census()["tags"] == 0)
            census = rx.census()
            assert census["expected"] == 0 and census["parked_chunks"] == 0 and census["parked_bytes"] == 0
            assert census["lanes"] == 0  # each closed as its request ended
            assert census["cancelled_ids"] <= 10  # a bounded memory of ids cancelled before their expect
    finally:
        rx.close()


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_a_peer_that_trickles_its_handshake_is_given_up_at_connect_timeout(tls, request):
    """A peer answers a byte every 0.2 s: every read returns in time, so a timeout per read
    never fires. connect_timeout bounds the whole handshake (TLS and kvwire)."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle():
        peer, _ = listener.accept()
        with peer:
            if tls:  # a TLS handshake record's header announcing 16 KiB, whose body then trickles
                peer.sendall(b"\x16\x03\x03\x40\x00")
            while not stop.is_set():
                try:
                    peer.sendall(b"\x00")
                except OSError:
                    return
                stop.wait(0.2)

    thread = threading.Thread(target=trickle)
    thread.start()
    kwargs = {"tls": request.getfixturevalue("tls_contexts")[1]} if tls else {}
    t0 = time.monotonic()
    try:
        with pytest.raises(kvwire.PeerLost, match="did not finish within connect_timeout=1 s"):
            kvwire.Sender(LAYOUT, listener.getsockname(), secret=SECRET, kv_caches=LAYOUT.allocate(4), streams=1,
                          connect_timeout=1.0, **kwargs)  # fmt: skip
        assert time.monotonic() - t0 < 3
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


# -- 6. TLS handshakes run off the accept thread ---------------------------------------------------
@pytest.fixture(scope="module")
def tls_contexts():
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client)
    return server, client


def test_tls_transfer_round_trip(tls_contexts):
    server, client = tls_contexts
    dst = LAYOUT.allocate(8)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, tls=server)
    src = filled(LAYOUT, 8, seed=8)
    try:
        h = rx.expect("tls", [4, 5], 20)
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, tls=client, streams=2) as tx:
            tx.send("tls", [0, 1], 20, timeout=10)
        h.wait(timeout=10)
        assert_transferred(LAYOUT, src, [0, 1], dst, [4, 5], 20)
    finally:
        rx.close()


def test_one_thread_at_a_time_calls_into_a_tls_connection(tls_contexts):
    """OpenSSL allows one thread at a time in an SSL object; a TLS connection has a reader
    thread blocked in SSL_read while its writer calls SSL_write. Every call into the SSL
    socket is counted here on the sender's side: never two at once on one connection."""
    server, client = tls_contexts
    layout = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16)
    blocks = 64
    dst = layout.allocate(blocks)
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=dst, tls=server, staging_bytes=8 << 20)
    most = {"seen": 0}
    try:
        src = filled(layout, blocks, seed=11)
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=src, tls=client, streams=2,
                           max_streams=2, chunk_bytes=256 << 10) as tx:  # fmt: skip

            def counted(call, inside: list, lock: threading.Lock):
                def call_counted(*args, **kw):
                    with lock:
                        inside[0] += 1
                        most["seen"] = max(most["seen"], inside[0])
                    try:
                        return call(*args, **kw)
                    finally:
                        with lock:
                            inside[0] -= 1

                return call_counted

            for conn in tx._conns:
                sock, inside, lock = conn.stream.sock, [0], threading.Lock()
                for name in ("recv_into", "recv", "send", "sendall"):
                    setattr(sock, name, counted(getattr(sock, name), inside, lock))
            for i in range(3):
                h = rx.expect(f"r{i}", list(range(blocks)), blocks * 16, deadline=30)
                tx.send(f"r{i}", list(range(blocks)), blocks * 16, timeout=30)
                h.wait(timeout=10)
        assert_transferred(layout, src, list(range(blocks)), dst, list(range(blocks)), blocks * 16)
    finally:
        rx.close()
    assert most["seen"] == 1


def tls_stream_pair(tls_contexts):
    """(client, server): two TcpStreams joined over TLS on loopback, made as a Sender
    (connect, then its TLS handshake) and a Receiver (accept, then finish_accept) make them."""
    from kvwire.transport.tcp import SocketOptions, TcpListener, connect

    server_ctx, client_ctx = tls_contexts
    listener = TcpListener(("127.0.0.1", 0), SocketOptions(), tls=server_ctx)
    accepted = {}

    def serve():
        stream = listener.accept()
        listener.finish_accept(stream, 5.0)
        accepted["s"] = stream

    server = threading.Thread(target=serve)
    server.start()
    client = connect(listener.address, SocketOptions(), timeout=5.0, tls=client_ctx, tls_handshake=False)
    client.tls_handshake()
    server.join()
    listener.close()
    return client, accepted["s"]


def test_a_tls_stream_closed_while_its_reader_waits_never_returns_ciphertext(tls_contexts):
    """``SSLSocket.shutdown`` drops the SSL object, after which a read goes to the plain
    socket, which still holds what arrived: a reader that waited outside the SSL lock and
    read after another thread's close() got the record's ciphertext as data (about one
    race in twenty). A closed stream now refuses every call into its SSL object."""
    from kvwire.errors import PeerLost

    message = b"K" * 64
    outcomes = {"data": 0, "lost": 0}
    for i in range(150):
        client, server = tls_stream_pair(tls_contexts)
        got: dict = {}

        def read(client=client, got=got):
            try:
                got["data"] = client.recv_exact(len(message))
            except PeerLost:
                got["lost"] = True

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.002)  # the reader waits for the socket, outside the SSL object
        closer = threading.Timer(0.00005 * (i % 20), client.close)
        closer.start()
        server.send_parts([message])
        closer.join()
        reader.join(5)
        server.close()
        assert got.get("data", message) == message, f"race {i}: {got['data'][:12].hex()} is not what was sent"
        outcomes["data" if "data" in got else "lost"] += 1
    assert outcomes["lost"] > 0  # the close won some of the races


def test_a_tls_read_keeps_the_streams_timeout_once_its_socket_is_non_blocking(tls_contexts):
    """After its handshake a TLS stream's socket is non-blocking and the stream keeps the
    timeout itself: a read with nothing coming ends at it, as the socket's would have,
    naming the timeout; without one it waits for the data."""
    from kvwire.errors import PeerLost

    client, server = tls_stream_pair(tls_contexts)
    try:
        client.settimeout(0.3)
        t0 = time.monotonic()
        with pytest.raises(PeerLost, match="timed out"):
            client.recv_exact(8)
        assert 0.25 < time.monotonic() - t0 < 5
        client.settimeout(None)
        threading.Timer(0.3, server.send_parts, ([b"12345678"],)).start()
        assert client.recv_exact(8) == b"12345678"
    finally:
        client.close()
        server.close()


def test_tls_works_with_descriptors_past_1024(tls_contexts):
    """A server with many files open gives its sockets descriptors past 1024, where
    ``select`` refuses to look; TLS control frames (the receiver's CREDITs, the sender's
    CANCEL) checked for room with it and failed there: every TLS transfer larger than a
    credit batch was lost, and a cancel raised ValueError."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1400
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"this machine allows {hard} open files, fewer than the {want} the test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    server, client = tls_contexts
    layout = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16)
    blocks = 64  # 1024 tokens, 2 MiB a layer: many credit batches of the 8 MiB staging's window
    dst = layout.allocate(blocks)
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=dst, tls=server, staging_bytes=8 << 20)
    try:
        src = filled(layout, blocks, seed=10)
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=src, tls=client, streams=1, max_streams=1,
                           chunk_bytes=256 << 10) as tx:  # fmt: skip
            assert tx._conns[0].stream.sock.fileno() >= 1024
            t = tx.transfer("given-up", list(range(4)), 64)
            t.cancel()
            h = rx.expect("big", list(range(blocks)), blocks * 16, deadline=30)
            tx.send("big", list(range(blocks)), blocks * 16, timeout=30)
            h.wait(timeout=10)
        assert_transferred(layout, src, list(range(blocks)), dst, list(range(blocks)), blocks * 16)
    finally:
        rx.close()
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_cancel_queued_behind_a_tls_send_goes_out_once_the_socket_has_room(tls_contexts):
    """A transfer is given up while its only connection's writer is in a long send over a
    slow path. The CANCEL waits in the outbox; over TLS it is written only when the
    socket reports room, which it does not right after that send, and with the transfer
    ended the writer sends nothing more. The sender's periodic flush must send it: the
    receiver hears Cancelled, not its own deadline."""
    server, client = tls_contexts
    layout = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16)
    blocks = 128  # 2048 tokens, 8 MiB a layer
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(blocks), tls=server)
    relay = TcpRelay(rx.address, rate=4e6)
    try:
        src = filled(layout, blocks, seed=9)
        with kvwire.Sender(layout, relay.address, secret=SECRET, kv_caches=src, tls=client, streams=1,
                           max_streams=1, chunk_bytes=256 << 10) as tx:  # fmt: skip
            h = rx.expect("slow", list(range(blocks)), blocks * 16, deadline=40)
            t = tx.transfer("slow", list(range(blocks)), blocks * 16)
            for layer in range(layout.num_layers):
                t.send_layer(layer)
            time.sleep(1.0)
            with pytest.raises(kvwire.TransferTimeout):
                t.finish(timeout=0.1)
            t0 = time.monotonic()
            with pytest.raises(kvwire.Cancelled, match="gave up"):
                h.wait(timeout=30)
            assert time.monotonic() - t0 < 15  # the bytes queued before it drain at 4 MB/s
    finally:
        relay.close()
        rx.close()


def test_a_tls_stream_is_not_half_closed(tls_contexts):
    """After a failed send the sender half-closes a plain TCP connection and reads on. Over
    TLS that would drop the session (the reads after it return ciphertext): the stream
    refuses, and stays whole for the sender to close."""
    import socket

    from kvwire.transport.tcp import SocketOptions, connect

    server, client = tls_contexts
    listener = socket.create_server(("127.0.0.1", 0))
    frame = b"an ACK the peer sent before closing"

    def serve():
        peer = server.wrap_socket(listener.accept()[0], server_side=True)
        peer.sendall(frame)
        peer.recv(1)
        peer.close()

    thread = threading.Thread(target=serve)
    thread.start()
    stream = connect(listener.getsockname(), SocketOptions(), timeout=5, tls=client)
    try:
        stream.settimeout(None)
        assert stream.shutdown_write() is False and not stream.writing_stopped
        got = bytearray(len(frame))
        stream.recv_into_exact(memoryview(got))
        assert bytes(got) == frame  # plaintext: the session is intact
    finally:
        stream.close()
        thread.join(timeout=5)
        listener.close()


def test_a_retired_tls_connection_lets_its_writer_go(tls_contexts):
    """Over TLS a writer waits for chunks on a condition: retiring its connection must wake
    it, or the thread stays blocked after the connection is closed."""
    server, client = tls_contexts
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(8), tls=server)
    try:
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=filled(LAYOUT, 8), tls=client,
                           streams=1, max_streams=2) as tx:  # fmt: skip
            tx._follower.stop()  # the connection count by hand from here
            assert tx._add_connection()
            new = tx._conns[1]
            assert wait_until(lambda: new.waiting, timeout=5) and not new.duplex
            tx._retire_connections(1)
            tx._close_retired()
            writers = [t for t in new.threads if "send" in t.name]
            assert wait_until(lambda: not any(t.is_alive() for t in writers), timeout=5)
            assert not new.alive
    finally:
        rx.close()


def test_split_heads_over_tls_go_through_a_copy(tls_contexts):
    """Spans of the cache go to the socket through the compiled helper, which would bypass
    TLS: over TLS both sides take the staging copy, and the heads arrive exact."""
    server, client = tls_contexts
    model = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=4, head_dim=32, block_size=16)
    src = filled(model, 8, seed=5)
    dst = [model.shard(d, 2).allocate(8) for d in range(2)]
    receivers = [kvwire.Receiver(model.shard(d, 2), secret=SECRET, kv_caches=dst[d], tls=server) for d in range(2)]
    try:
        handles = [rx.expect("tls-split", [2, 3], 20) for rx in receivers]
        with kvwire.ShardedSender(model, [rx.address for rx in receivers], secret=SECRET, kv_caches=src,
                                  tls=client, streams=1) as tx:  # fmt: skip
            tx.transfer("tls-split", [0, 1], 20).send_all(timeout=10)
            assert {s.stats()["spans"] for s in tx.senders.values()} == {False}
        for h in handles:
            h.wait(timeout=10)
        assert {rx.stats()["spans"] for rx in receivers} == {False}
    finally:
        for rx in receivers:
            rx.close()
    for d in range(2):
        for i in range(model.num_layers):
            for name in ("k", "v"):
                want = src[i][name][[0, 1]].reshape(32, 4, 32)[:20, 2 * d : 2 * d + 2]
                got = dst[d][i][name][[2, 3]].reshape(32, 2, 32)[:20]
                assert torch.equal(got, want), (d, i, name)


def test_an_idle_socket_does_not_stall_tls_handshakes(tls_contexts):
    server, client = tls_contexts
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(8), tls=server, handshake_timeout=10)
    idle = socket.create_connection(rx.address)  # connects, never starts TLS
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=LAYOUT.allocate(4), tls=client, streams=2):
            pass
        assert time.monotonic() - t0 < 3, "a TLS sender waited behind an idle socket's handshake"
    finally:
        idle.close()
        rx.close()


# -- 7. deadlines and timeouts are finite and positive -------------------------------------------
# 1e10 s: beyond what Python's waits take (threading.TIMEOUT_MAX, ~9.2e9 s), which used to
# fail deep inside a wait with OverflowError (KVW_ERR_INTERNAL from C) and cancel nothing.
@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, 0.0, 1e10])
def test_deadlines_must_be_finite_and_positive(bad):
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(4))
    try:
        with pytest.raises(ValueError, match="deadline"):
            rx.expect("nan", [0], 4, deadline=bad)
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=LAYOUT.allocate(4)) as tx:
            with pytest.raises(ValueError, match="deadline"):
                tx.transfer("nan", [0], 4, deadline=bad)
            t = tx.transfer("ok", [0], 4, deadline=5)
            for i in range(LAYOUT.num_layers):
                t.send_layer(i)
            if bad != 0.0:  # a zero wait is a poll; NaN, inf and negative ones are refused
                with pytest.raises(ValueError, match="timeout"):
                    t.finish(timeout=bad)
        h = rx.expect("nan-wait", [1], 4, deadline=5)
        if bad != 0.0:
            with pytest.raises(ValueError, match="timeout"):
                h.wait(timeout=bad)
            with pytest.raises(ValueError, match="timeout"):
                h.wait_layer(0, timeout=bad)
        for name in ("unclaimed_timeout", "handshake_timeout"):
            with pytest.raises(ValueError, match=name):
                kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(4), **{name: bad})
        with pytest.raises(ValueError, match="connect_timeout"):
            kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=LAYOUT.allocate(4), connect_timeout=bad)
    finally:
        rx.close()
