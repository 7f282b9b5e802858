"""Sender to Receiver over real sockets on 127.0.0.1."""

import logging
import multiprocessing
import os
import threading

import pytest
import torch

import kvwire
from kvwire.engine import lane
from tests.helpers import (
    SECRET,
    TRANSPORTS,
    assert_transferred,
    filled,
    random_states,
    sender_process,
    wait_until,
)

LAYOUTS = {
    "mha": kvwire.KVLayout.gqa(num_layers=3, num_kv_heads=4, head_dim=64, block_size=16),
    "gqa": kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=2, head_dim=128, block_size=32, dtype="fp16"),
    "mla": kvwire.KVLayout.mla(num_layers=3, latent_dim=576, block_size=64),
    "hybrid": kvwire.KVLayout.hybrid("LLFLLF", num_kv_heads=2, head_dim=64, state_shape=(2, 64, 64), block_size=16),
}


@pytest.fixture
def receiver_for():
    made = []

    def make(layout, num_blocks=64, **kw):
        dst = layout.allocate(num_blocks)
        rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=dst, **kw)
        made.append(rx)
        return rx, dst

    yield make
    for rx in made:
        rx.close()


def sender(layout, rx, src, **kw):
    kw.setdefault("streams", 3)
    return kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=src, **kw)


def test_a_stream_closed_while_a_call_uses_it_keeps_its_descriptor_until_the_call_returns():
    """close() from another thread shuts the socket down at once (ending the call) but
    leaves its descriptor to the call: a number the process could give to a new socket
    meanwhile is never what a receive or send still under way uses."""
    import socket

    from kvwire.errors import PeerLost
    from kvwire.transport import TcpStream

    a, b = socket.socketpair()
    stream = TcpStream(a, "pair")
    fd = stream.hold()  # a call under way (the receive lane holds it so around each call)
    stream.close()
    assert a.fileno() == fd  # shut down, not closed: the call still owns the number
    assert a.recv(1) == b""  # ... and the call sees the end of the stream at once
    with pytest.raises(PeerLost, match="closed"):
        stream.hold()  # no new call starts on a closed stream
    stream.release()
    assert a.fileno() == -1  # the last call out closed it
    b.close()

    c, d = socket.socketpair()
    reader, outcome = TcpStream(c, "pair"), []

    def read() -> None:  # blocked in recv when the close comes from this thread
        try:
            reader.recv_exact(8)
        except PeerLost as exc:
            outcome.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    for _ in range(500):  # until it is inside its call
        if reader._users:
            break
        thread.join(timeout=0.01)
    assert reader._users == 1
    reader.close()
    thread.join(timeout=5)
    assert not thread.is_alive() and len(outcome) == 1 and c.fileno() == -1
    d.close()


def test_a_stream_whose_writing_stopped_refuses_sends_and_keeps_reading():
    """After a failed send the sender stops writing (a half-close) and reads on for what
    the peer sent before. A later send (a transfer's CANCEL, say) must fail without
    closing the stream: closing it cut that reading off before its grace."""
    import socket

    from kvwire.transport import TcpStream

    a, b = socket.socketpair()
    stream = TcpStream(a, "pair")
    try:
        assert stream.shutdown_write()
        with pytest.raises(kvwire.PeerLost, match="writing has stopped"):
            stream.send_control(b"C" * 32)
        with pytest.raises(kvwire.PeerLost, match="writing has stopped"):
            stream.send_parts([b"D" * 32])
        assert not stream.closed
        b.sendall(b"an ACK sent before the peer closed")
        got = bytearray(34)
        stream.recv_into_exact(memoryview(got))
        assert bytes(got) == b"an ACK sent before the peer closed"
        assert b.recv(64) == b""  # the half-close reached the peer, and nothing after it
    finally:
        stream.close()
        b.close()


def test_a_control_frame_queued_while_another_thread_flushes_goes_out_with_that_flush():
    """Thread A flushes the outbox; thread B queues a frame after A took its copy (B's own
    flush finds the send lock held and leaves it to A). A must send it too: taking "frames
    still queued" for "the socket is full" left it behind until some later write."""
    import socket

    from kvwire.transport import TcpStream

    a, b = socket.socketpair()
    stream = TcpStream(a, "pair")
    first, second = b"A" * 32, b"B" * 32

    class QueuesDuringSend:  # the stream's socket: another thread queues inside the first sendmsg
        def __init__(self, sock) -> None:
            self.sock, self.armed = sock, True

        def sendmsg(self, *args, **kwargs):
            if self.armed:
                self.armed = False
                other = threading.Thread(target=stream.send_control, args=(second,))
                other.start()
                other.join()
            return self.sock.sendmsg(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.sock, name)

    stream.sock = QueuesDuringSend(a)
    try:
        stream.send_control(first)
        b.settimeout(2)
        got = b""
        while len(got) < 64:
            got += b.recv(64)
        assert got == first + second and not stream._outbox
    finally:
        stream.sock = a
        stream.close()
        b.close()


def test_writes_to_a_closed_peer_fail_without_a_signal():
    """A C program that embeds kvwire keeps SIGPIPE's default action (die): every write of
    a stream must fail with EPIPE instead. In a child with the default action restored, a
    control frame and a data frame to a peer that closed end in PeerLost, not the signal."""
    import subprocess
    import sys

    code = """
import signal, socket
from kvwire.errors import PeerLost
from kvwire.transport import TcpStream
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
for write in ("control", "parts"):
    a, b = socket.socketpair()
    b.close()
    stream = TcpStream(a, "pair")
    try:
        for _ in range(3):  # the first write may still find the socket open
            stream.send_control(b"x" * 32) if write == "control" else stream.send_parts([b"y" * 4096])
    except PeerLost:
        pass
    stream.close()
print("no signal")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "no signal" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_reads_without_waiting_are_refused_where_they_would_wait_or_break_records():
    """recv_nowait and wait_readable are for plain TCP in blocking mode: with a socket
    timeout Python would wait for it, and a TLS record may arrive half. Each refusal names
    why; a stream that turns TLS after it was made (a server's) stops offering them."""
    import socket

    from kvwire.transport import TcpStream

    a, b = socket.socketpair()
    stream = TcpStream(a, "pair")
    assert stream.nowait_reads and stream.recv_nowait(1) == b""
    a.settimeout(1.0)
    with pytest.raises(ValueError, match="no socket timeout"):
        stream.recv_nowait(1)
    a.settimeout(None)
    stream._tls = True  # as TcpListener.finish_accept marks a stream it wraps
    assert not stream.nowait_reads
    with pytest.raises(ValueError, match="no TLS"):
        stream.recv_nowait(1)
    with pytest.raises(ValueError, match="not over TLS"):
        stream.wait_readable(b.fileno())
    stream.close()
    b.close()


def test_a_duplex_writer_that_fails_unexpectedly_loses_its_connection_and_the_transfer_goes_on(receiver_for):
    """A bug in a duplex writer (here its reads raise something unforeseen) must not leave a
    live connection that nobody reads: the connection is lost, its chunks go again on the
    others, and the transfer completes."""
    layout = LAYOUTS["gqa"]
    rx, dst = receiver_for(layout)
    src = filled(layout, 64, seed=7)
    blocks, num_tokens = list(range(64)), 64 * layout.block_size
    with sender(layout, rx, src, chunk_bytes=16 << 10, max_streams=3) as tx:
        conn = tx._conns[1]
        assert conn.duplex

        def broken():
            raise RuntimeError("injected: a bug in the writer's reads")

        conn.channel.read_ready = broken
        h = rx.expect("broken", blocks[::-1], num_tokens)
        stats = tx.send("broken", blocks, num_tokens, timeout=30)
        h.wait(timeout=10)
        assert not conn.alive and tx.stats()["alive_streams"] == 2
        assert stats["chunks"] > 0
    assert_transferred(layout, src, blocks, dst, blocks[::-1], num_tokens)


def test_connections_after_the_first_read_their_credits_in_their_writers(receiver_for):
    """On plain TCP every connection but the first has one thread, its writer, which reads
    the credits (and acknowledgements, NACKs) that arrive on it between its sends and
    while it waits; the first keeps a reader, because the receiver acknowledges there.
    With a credit window of four chunks every writer must read credit after credit."""
    layout = LAYOUTS["gqa"]
    chunk, window = 16 << 10, 64 << 10
    rx, dst = receiver_for(layout, slot_bytes=chunk, window_bytes=window)
    src = filled(layout, 64, seed=5)
    blocks, dst_blocks = list(range(64)), list(range(63, -1, -1))
    num_tokens = 64 * layout.block_size
    h = rx.expect("credits", dst_blocks, num_tokens)
    with sender(layout, rx, src, chunk_bytes=chunk, max_streams=3) as tx:
        names = [[t.name for t in c.threads] for c in tx._conns]
        assert names == [["kvwire-send-0", "kvwire-ack-0"], ["kvwire-send-1"], ["kvwire-send-2"]]
        tx.send("credits", blocks, num_tokens, timeout=30)
        frames = [c["data_frames"] for c in tx.stats()["connections"]]
    h.wait(timeout=10)
    assert all(n > window // chunk for n in frames[1:]), frames  # each went past its first window
    assert_transferred(layout, src, blocks, dst, dst_blocks, num_tokens)


def test_when_the_connection_with_the_reader_is_lost_the_oldest_left_takes_reading_over(receiver_for):
    """The receiver acknowledges on the oldest connection left; once the first one (the
    one with a reader thread) is lost, the oldest duplex connection's writer hands its
    reading to a thread of its own, so acknowledgements never wait behind its sends.
    The newer connections stay duplex, and transfers go on."""
    layout = LAYOUTS["gqa"]
    rx, dst = receiver_for(layout)
    src = filled(layout, 64, seed=6)
    blocks, num_tokens = list(range(64)), 64 * layout.block_size
    with sender(layout, rx, src, chunk_bytes=16 << 10, max_streams=3) as tx:
        h = rx.expect("before", blocks, num_tokens)
        tx.send("before", blocks, num_tokens, timeout=30)
        h.wait(timeout=10)
        tx.reset_connection(0)
        assert wait_until(lambda: not tx._conns[1].duplex)  # connection 1 reads the acknowledgements now
        assert [t.name for t in tx._conns[1].threads] == ["kvwire-send-1", "kvwire-ack-1"]
        assert tx._conns[2].duplex and [t.name for t in tx._conns[2].threads] == ["kvwire-send-2"]
        dst_blocks = blocks[::-1]
        h = rx.expect("after", dst_blocks, num_tokens)
        stats = tx.send("after", blocks, num_tokens, timeout=30)
        h.wait(timeout=10)
        assert stats["chunks"] > 0 and tx.stats()["alive_streams"] == 2
    assert_transferred(layout, src, blocks, dst, dst_blocks, num_tokens)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_raw_transfer_is_bit_exact(name, transport, receiver_for):
    layout = LAYOUTS[name]
    rx, dst = receiver_for(layout, transport=transport)
    src = filled(layout, 64)
    src_states, dst_states = random_states(layout), {i: torch.zeros_like(t) for i, t in random_states(layout).items()}
    bs = layout.block_size
    num_tokens = 5 * bs + 3  # a partial last block
    src_blocks, dst_blocks = [9, 2, 40, 41, 42, 7], [63, 0, 5, 6, 30, 31]
    h = rx.expect("r", dst_blocks, num_tokens, states=dst_states)
    with sender(layout, rx, src, chunk_bytes=16 << 10, transport=transport) as tx:
        stats = tx.send("r", src_blocks, num_tokens, states=src_states, timeout=30)
        if transport == "ucx":  # CPU caches: never the device-direct path
            assert {c["path"] for c in tx.stats()["connections"]} == {"host memory (staged)"}
    h.wait(timeout=10)
    assert stats["logical_bytes"] == layout.request_bytes(num_tokens)
    assert_transferred(layout, src, src_blocks, dst, dst_blocks, num_tokens, "raw", src_states, dst_states)
    # the rest of the partial block and every other block are untouched
    last = dst_blocks[-1]
    for layer in dst:
        for t in layer.values():
            assert (t[last, 3:] == 0).all()
            assert (t[[b for b in range(64) if b not in dst_blocks]] == 0).all()


@pytest.mark.parametrize("spans", [True, False])
def test_raw_lands_in_place_with_or_without_the_span_helper(spans, receiver_for, monkeypatch):
    """Raw payloads land in their destination rows through the compiled helper (the runs
    of blocks as spans, checked there) or, without it, through recvmsg_into over views of
    the runs: the same bytes, a partial last block, nothing outside the request written."""
    from kvwire import scatter

    if spans and not scatter.available():
        pytest.skip("the compiled helper kvwire._scatter is not built in this environment")
    monkeypatch.setattr(scatter, "available", lambda: spans)
    layout = LAYOUTS["gqa"]
    rx, dst = receiver_for(layout)
    assert rx.stats()["spans"] is spans
    src = filled(layout, 64, seed=12)
    num_tokens = 7 * layout.block_size + 5
    src_blocks, dst_blocks = [3, 4, 5, 9, 10, 40, 41, 2], [60, 12, 13, 14, 1, 0, 30, 31]
    h = rx.expect("in-place", dst_blocks, num_tokens)
    with sender(layout, rx, src, chunk_bytes=24 << 10) as tx:
        tx.send("in-place", src_blocks, num_tokens, timeout=30)
    h.wait(timeout=10)
    assert_transferred(layout, src, src_blocks, dst, dst_blocks, num_tokens)
    for layer in dst:
        for t in layer.values():
            assert (t[31, 5:] == 0).all()
            assert (t[[b for b in range(64) if b not in dst_blocks]] == 0).all()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("codec", ["fp8", "int8h", "int4h", "int4", "fp8+lz4", "int4+lz4", "raw+lz4", "int4/g64/k64"])
@pytest.mark.parametrize("name", ["gqa", "hybrid"])
def test_lossy_codecs_deliver_what_the_reference_decodes(codec, name, transport, receiver_for):
    layout = LAYOUTS[name]
    rx, dst = receiver_for(layout, transport=transport)
    src = filled(layout, 64, seed=4)
    src_states, dst_states = random_states(layout), {i: torch.zeros_like(t) for i, t in random_states(layout).items()}
    n = 3 * layout.block_size + 1
    h = rx.expect("r", [1, 2, 3, 4], n, states=dst_states)
    with sender(layout, rx, src, codec=codec, chunk_bytes=8 << 10, transport=transport) as tx:
        stats = tx.send("r", [10, 11, 12, 13], n, states=src_states, timeout=30)
    h.wait(timeout=10)
    assert_transferred(layout, src, [10, 11, 12, 13], dst, [1, 2, 3, 4], n, codec, src_states, dst_states)
    if not codec.startswith("raw"):
        assert stats["wire_bytes"] < stats["logical_bytes"] / 1.8


def test_incremental_transfer_sends_only_the_tail(receiver_for):
    layout = LAYOUTS["mha"]
    rx, dst = receiver_for(layout)
    src = filled(layout, 64, seed=5)
    bs = layout.block_size
    # The decode side already holds the first 3 blocks of the prompt (prefix cache hit).
    prefix_src, prefix_dst = [20, 21, 22], [50, 51, 52]
    for s_layer, d_layer in zip(src, dst):
        for name in s_layer:
            d_layer[name][prefix_dst] = s_layer[name][prefix_src]
    tail_src, tail_dst, tail_tokens = [23, 24], [53, 54], bs + 7
    h = rx.expect("tail", tail_dst, tail_tokens)
    with sender(layout, rx, src) as tx:
        stats = tx.send("tail", tail_src, tail_tokens)
    h.wait(timeout=10)
    assert stats["logical_bytes"] == layout.request_bytes(tail_tokens)
    total = 3 * bs + tail_tokens
    assert_transferred(layout, src, prefix_src + tail_src, dst, prefix_dst + tail_dst, total)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_64_concurrent_requests_on_one_sender(transport, receiver_for):
    layout = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16)
    rx, dst = receiver_for(layout, num_blocks=256, transport=transport)
    src = filled(layout, 256, seed=6)
    requests = [(f"q{i}", [4 * i + j for j in range(4)], 16 * 3 + i % 16 + 1) for i in range(64)]
    handles = [rx.expect(rid, [255 - b for b in blocks], n) for rid, blocks, n in requests]
    with sender(layout, rx, src, streams=4, chunk_bytes=4096, transport=transport) as tx:
        transfers = [tx.transfer(rid, blocks, n) for rid, blocks, n in requests]
        for layer in range(layout.num_layers):  # interleaved, as a batched prefill would
            for t in transfers:
                t.send_layer(layer)
        for t in transfers:
            t.finish(timeout=60)
    for h in handles:
        h.wait(timeout=10)
    for _, blocks, n in requests:
        assert_transferred(layout, src, blocks, dst, [255 - b for b in blocks], n)
    if transport == "tcp" and lane.available():  # each request gets its own receive lane, none stays open
        # Until a request's first chunk is in place its frames go through Python (how many
        # depends on the scheduling of the connections): after that the lane takes them.
        stats = rx.stats()
        assert stats["lane_frames"] >= stats["frames"] // 2
        assert rx.census()["lanes"] == 0


def test_layers_become_usable_one_by_one(receiver_for):
    layout = LAYOUTS["mha"]
    rx, dst = receiver_for(layout)
    src = filled(layout, 64, seed=7)
    h = rx.expect("lw", [0, 1], 20)
    with sender(layout, rx, src) as tx:
        t = tx.transfer("lw", [5, 6], 20)
        t.send_layer(0)
        h.wait_layer(0, timeout=10)
        assert torch.equal(dst[0]["k"][0], src[0]["k"][5])
        assert not h.done() and (dst[1]["k"][0] == 0).all()
        with pytest.raises(kvwire.TransferTimeout):
            h.wait_layer(1, timeout=0.2)
        t.send_layer(1)
        t.send_layer(2)
        stats = t.finish(timeout=10)
    assert h.wait(timeout=10)["ok"]
    assert stats["exposed_ms"] is not None and stats["exposed_ms"] >= 0


def test_data_before_expect_waits_and_credit_slows_the_sender(receiver_for):
    layout = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16)
    # 4 layers x 2 tensors x 64 blocks x 32 KiB = 16 MiB, four times the staging budget.
    rx, dst = receiver_for(layout, num_blocks=64, staging_bytes=4 << 20, slot_bytes=256 << 10,
                           window_bytes=1 << 20)  # fmt: skip
    src = filled(layout, 64, seed=8)
    blocks = list(range(64))
    with sender(layout, rx, src, streams=2, chunk_bytes=128 << 10) as tx:
        t = tx.transfer("early", blocks, 64 * 16)
        for i in range(4):
            t.send_layer(i)
        with pytest.raises(kvwire.TransferTimeout):
            t.finish(timeout=1.0)  # nobody expects it yet: the sender is held back by credit
        staging = rx.stats()["staging"]
        assert 0 < staging["high_water_bytes"] <= staging["budget_bytes"]
        assert rx.stats()["parked_chunks"] > 0
        assert rx.stats()["wire_bytes"] < 8 << 20  # far less than the 16 MiB request
        h = rx.expect("early", blocks, 64 * 16)
        t2 = tx.transfer("early-2", blocks, 64 * 16)
        for i in range(4):
            t2.send_layer(i)
        h2 = rx.expect("early-2", blocks, 64 * 16)
        t2.finish(timeout=30)
        h2.wait(timeout=10)
    assert_transferred(layout, src, blocks, dst, blocks, 64 * 16)
    assert h.done() and not h.ok()  # the first transfer timed out on the sender, which cancelled it


def test_chunk_bytes_beyond_the_receivers_frames_is_cut_to_them_and_said(receiver_for, caplog):
    layout = kvwire.KVLayout.gqa(num_layers=1, num_kv_heads=8, head_dim=128, block_size=16)
    rx, dst = receiver_for(layout, slot_bytes=256 << 10)
    src = filled(layout, 16, seed=3)
    with caplog.at_level(logging.INFO, logger="kvwire.sender"):
        with sender(layout, rx, src, streams=1, chunk_bytes=1 << 20) as tx:
            cut = tx.stats()["chunk_bytes"]  # the receiver's slot_bytes
            h = rx.expect("r", list(range(16)), 256)
            t = tx.transfer("r", list(range(16)), 256)
            t.send_layer(0)
            t.finish(timeout=30)
            h.wait(timeout=10)
    assert cut == 256 << 10
    asked = [r for r in caplog.records if "chunk_bytes 1048576" in r.getMessage()]
    assert len(asked) == 1 and asked[0].levelno == logging.WARNING and f"chunks of {cut} bytes" in asked[0].getMessage()
    assert_transferred(layout, src, list(range(16)), dst, list(range(16)), 256)


def test_chunks_are_larger_on_a_short_path_unless_set(receiver_for):
    """chunk_bytes=None: 4 MiB on loopback (a short path), where the receiver's frames and
    the sender's staging take it; 2 MiB where they do not; a size that was set is kept.
    Across a long path: tests/test_link_emulated.py."""
    from kvwire.engine.sender import DEFAULT_CHUNK_BYTES, SHORT_PATH_CHUNK_BYTES

    layout = kvwire.KVLayout.gqa(num_layers=1, num_kv_heads=8, head_dim=128, block_size=16)
    rx, dst = receiver_for(layout)
    small, _ = receiver_for(layout, slot_bytes=(2 << 20) + (64 << 10))
    src = filled(layout, 16, seed=3)
    found = {}
    for name, peer, options in [("default", rx, {}), ("set", rx, {"chunk_bytes": 1 << 20}),
                                ("small frames", small, {}),
                                ("small staging", rx, {"staging_bytes": 4 << 20})]:  # fmt: skip
        with sender(layout, peer, src, streams=1, **options) as tx:
            found[name] = tx.stats()["chunk_bytes"]
            if name == "default":
                h = rx.expect("r", list(range(16)), 256)
                tx.send("r", list(range(16)), 256, timeout=30)
                h.wait(timeout=10)
    assert found == {"default": SHORT_PATH_CHUNK_BYTES, "set": 1 << 20, "small frames": DEFAULT_CHUNK_BYTES,
                     "small staging": DEFAULT_CHUNK_BYTES}  # fmt: skip
    assert_transferred(layout, src, list(range(16)), dst, list(range(16)), 256)
    for bad in (True, 4095, 2.0**21):
        with pytest.raises(ValueError, match="chunk_bytes"):
            sender(layout, rx, src, streams=1, chunk_bytes=bad)
    with pytest.raises(ValueError, match=r"staging_bytes: budget of 1048576 bytes is less than one slot \(2162688\)"):
        sender(layout, rx, src, streams=1, staging_bytes=1 << 20)


def test_queued_chunks_go_out_gathered_and_whole(receiver_for):
    # One connection held back by credit (1 MiB window, credit returned 256 KiB at a time)
    # while 24 chunks of 128 KiB wait in the queue: each credit lets the writer take two,
    # which go out in one send (on loopback, without checksums: see SHORT_PATH_RTT_S).
    # Every byte still lands where it belongs; with checksums, one chunk per send.
    layout = LAYOUTS["mha"]
    rx, dst = receiver_for(layout, staging_bytes=4 << 20, slot_bytes=256 << 10, window_bytes=1 << 20,
                           checksum="none")  # fmt: skip
    src = filled(layout, 64, seed=3)
    blocks = list(range(64))
    h = rx.expect("gathered", blocks[::-1], 64 * 16)
    with sender(layout, rx, src, streams=1, max_streams=1, chunk_bytes=128 << 10, checksum="none") as tx:
        stats = tx.send("gathered", blocks, 64 * 16, timeout=30)
        conn = tx.stats()["connections"][0]
        assert tx.gather
    h.wait(timeout=10)
    assert conn["data_frames"] == stats["chunks"] == 24
    assert conn["data_sends"] < conn["data_frames"]
    assert_transferred(layout, src, blocks, dst, blocks[::-1], 64 * 16)

    rx, dst = receiver_for(layout, staging_bytes=4 << 20, slot_bytes=256 << 10, window_bytes=1 << 20)
    h = rx.expect("checked", blocks, 64 * 16)
    with sender(layout, rx, src, streams=1, max_streams=1, chunk_bytes=128 << 10) as tx:
        tx.send("checked", blocks, 64 * 16, timeout=30)
        conn, gather = tx.stats()["connections"][0], tx.gather
    h.wait(timeout=10)
    assert not gather and conn["data_sends"] == conn["data_frames"] == 24
    assert_transferred(layout, src, blocks, dst, blocks, 64 * 16)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sender_in_another_process(transport, receiver_for):
    layout = LAYOUTS["gqa"]
    rx, dst = receiver_for(layout, transport=transport)
    h = rx.expect("proc-req", [3, 4, 5], 70)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(
        target=sender_process,
        args=(rx.address, layout.to_dict(), 64, 11, [7, 8, 9], 70, None, "raw", ready, transport),
    )
    p.start()
    try:
        h.wait(timeout=60)
        p.join(timeout=30)
        assert p.exitcode == 0
    finally:
        p.kill()
    assert_transferred(layout, filled(layout, 64, 11), [7, 8, 9], dst, [3, 4, 5], 70)


def test_stats_report_tcp_info_and_staging(receiver_for):
    layout = LAYOUTS["mha"]
    rx, _ = receiver_for(layout)
    with sender(layout, rx, filled(layout, 64)) as tx:
        rx.expect("s", [0], 16)
        tx.send("s", [1], 16)
        stats = tx.stats()
    assert stats["alive_streams"] == 3 and len(stats["connections"]) == 3
    tcp = stats["connections"][0]["tcp"]
    for key in ("rtt_us", "snd_cwnd", "total_retrans", "delivery_rate", "bytes_acked"):
        assert key in tcp
    assert sum(c["bytes_sent"] for c in stats["connections"]) > layout.request_bytes(16)
    assert rx.stats()["completed"] == 1


def test_connections_to_this_host_get_a_small_send_buffer(receiver_for):
    """On this host both ends share the CPU's caches: each connection gets
    SocketOptions.local_sndbuf (the kernel reports twice what was asked); an explicit
    sndbuf wins, and local_sndbuf=None leaves the kernel's autotuning."""
    import socket

    from kvwire.transport.tcp import LOCAL_SNDBUF

    layout = LAYOUTS["mha"]
    rx, _ = receiver_for(layout)
    src = filled(layout, 8)
    cases = [
        (None, LOCAL_SNDBUF),
        (kvwire.SocketOptions(sndbuf=96 << 10), 96 << 10),
        (kvwire.SocketOptions(local_sndbuf=512 << 10), 512 << 10),
        (kvwire.SocketOptions(local_sndbuf=None), None),
    ]
    for options, asked in cases:
        with sender(layout, rx, src, streams=2, max_streams=2, socket_options=options) as tx:
            rx.expect("b", [0], 16)
            tx.send("b", [1], 16)
            reported = [c["send_buffer"] for c in tx.stats()["connections"]]
            kernel = [c.stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) for c in tx._conns]
        assert reported == [asked, asked], options
        if asked is not None:
            assert kernel == [2 * asked, 2 * asked], options
        else:  # autotuned: nothing fixed it at LOCAL_SNDBUF
            assert all(k != 2 * LOCAL_SNDBUF for k in kernel), kernel


def test_a_connection_to_this_hosts_own_address_counts_as_this_host():
    import socket

    from kvwire.transport.tcp import LOCAL_SNDBUF, SocketOptions, connect

    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # sends nothing: asks the routing table for this host's address
        own = probe.getsockname()[0]
    except OSError:
        own = "127.0.0.1"
    finally:
        probe.close()
    if own.startswith("127."):
        pytest.skip("this host has no route off loopback, so no address of its own to connect to")
    listener = socket.create_server(("0.0.0.0", 0))
    try:
        stream = connect((own, listener.getsockname()[1]), SocketOptions(), timeout=5)
        peer, _ = listener.accept()
        try:
            assert stream.send_buffer == LOCAL_SNDBUF
        finally:
            stream.close()
            peer.close()
    finally:
        listener.close()


@pytest.mark.parametrize("value", [64 << 10, 0, True, "131072", 131072.0])
def test_a_local_send_buffer_too_small_or_not_a_size_is_refused(value):
    with pytest.raises(ValueError, match=r"local_sndbuf: expected None or at least 131072 bytes"):
        kvwire.SocketOptions(local_sndbuf=value)


def test_threads_carry_their_names_into_the_kernel(receiver_for):
    """top -H, perf and py-spy read a thread's kernel name: each kvwire thread sets its own."""
    if not os.path.exists("/proc/self/task"):
        pytest.skip("thread names in the kernel: Linux only")

    def kernel_names() -> dict[str, str]:
        out = {}
        for t in threading.enumerate():
            try:
                out[t.name] = open(f"/proc/self/task/{t.native_id}/comm").read().strip()
            except FileNotFoundError:  # ended meanwhile
                pass
        return out

    layout = LAYOUTS["mha"]
    rx, _ = receiver_for(layout)
    with sender(layout, rx, filled(layout, 64)) as tx:
        rx.expect("n", [0], 16)
        tx.send("n", [1], 16)
        names = kernel_names()
    ours = {name: comm for name, comm in names.items() if name.startswith("kvwire-")}
    for expected in ("kvwire-accept", "kvwire-reaper", "kvwire-recv", "kvwire-encoder", "kvwire-send-0",
                     "kvwire-ack-0", "kvwire-link"):  # fmt: skip
        assert ours.get(expected) == expected, (expected, ours)
    assert names["MainThread"] != "kvwire-recv"  # only kvwire's own threads are renamed


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="thread names in the kernel: Linux only")
def test_a_long_thread_name_is_cut_to_what_the_kernel_keeps():
    from kvwire.threads import Thread

    seen: list[str] = []

    def read_own_name():
        seen.append(open(f"/proc/self/task/{threading.get_native_id()}/comm").read().strip())

    t = Thread(read_own_name, "kvwire-a-name-longer-than-fifteen")
    t.start()
    t.join()
    assert seen == ["kvwire-a-name-l"] and t.daemon


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda tx: tx.transfer("x", [0, 99], 20), ValueError, r"block_ids\[1\]"),
        (lambda tx: tx.transfer("x", [0, 1], 40), ValueError, "num_tokens"),
        (lambda tx: tx.transfer("x", [0], 4, deadline=0), ValueError, "deadline"),
        (lambda tx: tx.transfer(None, [0], 4), TypeError, "request_id"),
        (lambda tx: tx.transfer("x", [0], 4).send_layer(7), ValueError, "layer"),
        (lambda tx: tx.transfer("x", [0], 4).finish(), ValueError, "never sent"),
        (lambda tx: tx.transfer("x", [0], 4, states={0: torch.zeros(1)}), ValueError, r"states\[0\].*no state"),
    ],
)
def test_bad_sender_arguments_name_the_problem(call, error, message, receiver_for):
    layout = LAYOUTS["mha"]
    rx, _ = receiver_for(layout)
    with sender(layout, rx, filled(layout, 64)) as tx:
        with pytest.raises(error, match=message):
            call(tx)


def test_sending_a_layer_twice_is_refused(receiver_for):
    layout = LAYOUTS["mha"]
    rx, _ = receiver_for(layout)
    with sender(layout, rx, filled(layout, 64)) as tx:
        t = tx.transfer("x", [0], 4)
        t.send_layer(0)
        with pytest.raises(ValueError, match="already sent"):
            t.send_layer(0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"codec": "zstd"}, ValueError, "unknown codec"),
        ({"streams": 0}, ValueError, "streams"),
        ({"secret": None}, ValueError, "secret"),
        ({"secret": "short"}, ValueError, "secret"),
        ({"kv_caches": []}, ValueError, "kv_caches"),
    ],
)
def test_bad_sender_construction(kwargs, error, message, receiver_for, monkeypatch):
    monkeypatch.delenv("KVWIRE_SECRET", raising=False)
    layout = LAYOUTS["mha"]
    rx, _ = receiver_for(layout)
    args = {"secret": SECRET, "kv_caches": layout.allocate(4)} | kwargs
    with pytest.raises(error, match=message):
        kvwire.Sender(layout, rx.address, **args)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"window_bytes": 1 << 32}, ValueError, r"window_bytes: at most 4294967295 \(CREDIT frames count in 32 bits\)"),
        ({"window_bytes": 1024}, ValueError, r"window_bytes: 1024 is less than one slot"),
        ({"window_bytes": 0}, ValueError, r"window_bytes: must be >= 1, got 0"),
        ({"window_bytes": 2.0**21}, TypeError, r"window_bytes: expected an int, got float"),
    ],
)
def test_bad_receiver_windows_name_the_problem(kwargs, error, message):
    layout = LAYOUTS["mha"]
    with pytest.raises(error, match=message):
        kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(4), **kwargs)


def test_bad_expect_arguments(receiver_for):
    layout = LAYOUTS["hybrid"]
    rx, _ = receiver_for(layout)
    with pytest.raises(ValueError, match="states"):
        rx.expect("x", [0], 4)  # the hybrid layout needs states
    states = {i: torch.zeros_like(t) for i, t in random_states(layout).items()}
    with pytest.raises(ValueError, match=r"block_ids\[0\]"):
        rx.expect("x", [64], 4, states=states)
    rx.expect("x", [0], 4, states=states)
    with pytest.raises(ValueError, match="already expected"):
        rx.expect("x", [1], 4, states=states)


def test_concurrent_senders_to_one_receiver(receiver_for):
    layout = LAYOUTS["mha"]
    rx, dst = receiver_for(layout, num_blocks=64)
    srcs = [filled(layout, 64, seed=s) for s in range(3)]
    handles = [rx.expect(f"s{i}", [10 * i, 10 * i + 1], 32) for i in range(3)]
    errors = []

    def run(i):
        try:
            with sender(layout, rx, srcs[i], streams=2) as tx:
                tx.send(f"s{i}", [i, i + 1], 32)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, h in enumerate(handles):
        h.wait(timeout=10)
        assert_transferred(layout, srcs[i], [i, i + 1], dst, [10 * i, 10 * i + 1], 32)


def test_parallel_encoding_delivers_the_reference_bytes(receiver_for):
    layout = LAYOUTS["gqa"]
    rx, dst = receiver_for(layout)
    src = filled(layout, 64, seed=9)
    h = rx.expect("par", list(range(20, 30)), 10 * 32 - 3)
    with sender(layout, rx, src, codec="int4", chunk_bytes=4096, encode_threads=3) as tx:
        assert tx._encoders is not None
        tx.send("par", list(range(10)), 10 * 32 - 3, timeout=30)
    h.wait(timeout=10)
    assert_transferred(layout, src, list(range(10)), dst, list(range(20, 30)), 10 * 32 - 3, "int4")
    with pytest.raises(ValueError, match="encode_threads"):
        sender(layout, rx, src, encode_threads=0)


def test_bad_states_on_the_sender_name_the_problem(receiver_for):
    layout = LAYOUTS["hybrid"]
    rx, _ = receiver_for(layout)
    with sender(layout, rx, filled(layout, 64)) as tx:
        with pytest.raises(ValueError, match=r"states\[0\]: expected shape"):
            tx.transfer("x", [0], 4, states={0: torch.zeros(3, 3, dtype=layout.dtype)})
        t = tx.transfer("y", [0], 4)
        with pytest.raises(ValueError, match="layer 0 has a state"):
            t.send_layer(0)
        with pytest.raises(TypeError, match="state: dtype"):
            t.send_layer(0, state=torch.zeros(2, 64, 64))


def test_tcp_streams_are_byte_streams_that_refuse_device_memory():
    import socket

    from kvwire.transport import ByteStream, TcpStream

    a, b = socket.socketpair()
    stream = TcpStream(a, "pair")
    try:
        assert isinstance(stream, ByteStream)
        with pytest.raises(ValueError, match="host memory only"):
            stream.send_parts([b"x"], device_payload=torch.zeros(1))
        with pytest.raises(ValueError, match="host memory only"):
            stream.recv_device_into(torch.zeros(1))
    finally:
        stream.close()
        b.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    "codec, exact, exact_rows",
    [("fp8", 20, {"k": 32, "v": 32}), ("int4+lz4", 16, {"k": 16, "v": 16}), ("int4/g64/k64", 1, {"k": 64, "v": 16})],
)
def test_exact_tokens_travel_raw(codec, exact, exact_rows, transport, receiver_for):
    """The first tokens of a transfer (rounded up to blocks, and int4 keys to key groups)
    arrive bit-exact; the rest as the codec's reference decodes them."""
    from tests.helpers import expected_tokens, tokens

    layout = LAYOUTS["mha"]  # blocks of 16
    rx, dst = receiver_for(layout, transport=transport)
    src = filled(layout, 64, seed=8)
    n = 6 * layout.block_size + 5
    src_blocks, dst_blocks = [40, 41, 2, 3, 9, 10, 11], [0, 1, 20, 21, 22, 60, 61]
    h = rx.expect("x", dst_blocks, n)
    with sender(layout, rx, src, codec=codec, exact_tokens=exact, chunk_bytes=8 << 10, transport=transport) as tx:
        stats = tx.send("x", src_blocks, n, timeout=30)
    h.wait(timeout=10)
    inner = codec.removesuffix("+lz4")
    for i in range(layout.num_layers):
        for name in ("k", "v"):
            a = tokens(src[i][name], src_blocks, n, layout.block_size)
            b = tokens(dst[i][name], dst_blocks, n, layout.block_size)
            e = exact_rows[name]
            assert torch.equal(b[:e].view(torch.int16), a[:e].view(torch.int16)), (i, name)
            want = expected_tokens(inner, a, name, layout.block_size)
            assert torch.equal(b[e:], want[e:]), (i, name)
            assert not torch.equal(b[e:], a[e:])  # the rest is really encoded
    assert stats["logical_bytes"] == layout.request_bytes(n)


def test_exact_tokens_must_be_a_non_negative_int(receiver_for):
    layout = LAYOUTS["mha"]
    rx, _ = receiver_for(layout)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="exact_tokens"):
            sender(layout, rx, layout.allocate(4), exact_tokens=bad)


def test_a_requests_receive_time_runs_from_its_first_header_even_before_its_expect():
    """``receive_ms`` runs from the first DATA header of the request to its last byte: for
    a request whose data came first and parked, from before the expect; otherwise from
    after it."""
    import time

    layout = LAYOUTS["mha"]
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(16))
    try:
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=filled(layout, 16), streams=1) as tx:
            t = tx.transfer("early", [0, 1], 20, deadline=30)
            for layer in range(layout.num_layers):
                t.send_layer(layer)
            assert wait_until(lambda: rx.census()["parked_chunks"] > 0, timeout=10)
            time.sleep(0.1)
            early = rx.expect("early", [2, 3], 20)
            late = rx.expect("late", [4, 5], 20)
            t.finish(timeout=30)
            tx.send("late", [0, 1], 20, timeout=30)
        for h in (early, late):
            h.wait(timeout=10)
    finally:
        rx.close()
    assert early.t_first_byte < early.t_expected - 0.05 and early.stats()["receive_ms"] > 50
    assert late.t_expected < late.t_first_byte <= late.t_done and late.stats()["receive_ms"] > 0


def test_a_requests_end_is_stamped_when_decided_not_after_its_ack_is_queued():
    """``t_done`` closes the receive window benchmarks divide by: it is the moment the
    request completed, taken before the ACK is written to the sender's connection (a
    write that may run the peer's TCP stack on loopback), not after."""
    import time

    layout = LAYOUTS["mha"]
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(16))
    acks: list[float] = []
    send_locked = rx._send_locked

    def stamped(action):
        acks.append(time.monotonic())
        send_locked(action)

    rx._send_locked = stamped
    try:
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=filled(layout, 16), streams=1) as tx:
            h = rx.expect("r", [2, 3], 20)
            tx.send("r", [0, 1], 20, timeout=30)
            h.wait(timeout=10)
    finally:
        rx.close()
    assert acks and h.t_first_byte <= h.t_done <= acks[0]


def test_requests_shorter_than_a_codecs_row_unit_are_one_chunk_each(receiver_for):
    """int4a codes rows in windows of 1024, so a shorter request is one chunk per tensor.
    Cutting one took a walk down from the chunk the target asked for, one unit at a time,
    each step sizing the whole oversized chunk: seconds at 48 tokens and hours at one,
    during which the sender's encoder (and an ``estimate``) sent nothing at all."""
    layout = LAYOUTS["mha"]
    rx, dst = receiver_for(layout)
    src = filled(layout, 64, seed=4)
    with sender(layout, rx, src, codec="int4a", streams=2) as tx:
        for n in (1, 17, 48):
            blocks = list(range(-(-n // layout.block_size)))
            assert tx.estimate(n).wire_bytes > 0
            h = rx.expect(f"short-{n}", blocks, n, deadline=20)
            stats = tx.send(f"short-{n}", blocks, n, timeout=20)
            h.wait(timeout=10)
            assert stats["chunks"] == 2 * layout.num_layers  # k and v, one chunk each per layer


def test_finish_returns_once_the_sender_holds_no_record_of_the_transfer(receiver_for, monkeypatch):
    """finish() returned as soon as the transfer ended, before the thread that saw the
    acknowledgement dropped its records: a census taken right after could count them (a
    soak run on a busy machine reported them as growth). Here dropping them is slowed
    down, as a busy machine would, so the old order fails every time."""
    import time

    from kvwire.engine.sender import Sender

    forget = Sender._forget

    def slow_forget(self, handle):
        time.sleep(0.05)
        forget(self, handle)

    monkeypatch.setattr(Sender, "_forget", slow_forget)
    layout = LAYOUTS["gqa"]
    rx, _ = receiver_for(layout)
    with sender(layout, rx, filled(layout, 64, seed=6)) as tx:
        for i in range(3):
            h = rx.expect(f"r{i}", [1, 2], 2 * layout.block_size)
            tx.send(f"r{i}", [10, 11], 2 * layout.block_size, timeout=30)
            assert tx.census() == {"transfers": 0, "inflight_chunks": 0, "queued_chunks": 0, "begun_tags": 0}
            h.wait(timeout=10)


def test_finish_returns_within_its_bound_when_the_records_are_never_dropped(receiver_for, monkeypatch):
    """finish() waits for the ended transfer's records to be dropped, but at most
    FORGET_WAIT_S: a drop that never comes (a bug, a lock held elsewhere) costs the caller
    that bound, not a hang, and the statistics still come back."""
    import threading
    import time

    from kvwire.engine import sender as sender_module

    forget, release = sender_module.Sender._forget, threading.Event()

    def stuck_forget(self, handle):
        release.wait(30)
        forget(self, handle)

    monkeypatch.setattr(sender_module, "FORGET_WAIT_S", 0.3)
    monkeypatch.setattr(sender_module.Sender, "_forget", stuck_forget)
    layout = LAYOUTS["gqa"]
    rx, _ = receiver_for(layout)
    with sender(layout, rx, filled(layout, 64, seed=6)) as tx:
        try:
            h = rx.expect("stuck", [1, 2], 2 * layout.block_size)
            t0 = time.monotonic()
            stats = tx.send("stuck", [10, 11], 2 * layout.block_size, timeout=30)
            waited = time.monotonic() - t0
            h.wait(timeout=10)
        finally:
            release.set()
    assert stats["chunks"] > 0
    assert 0.3 <= waited < 5, waited
