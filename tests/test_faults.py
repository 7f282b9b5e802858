"""Every failure ends as a typed error within its deadline; nothing is written out of bounds."""

import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

import kvwire
from kvwire.proto import FrameType, Header, crc32c
from kvwire.proto.frames import HEADER_SIZE
from tests.helpers import (
    SECRET,
    TRANSPORTS,
    TcpRelay,
    WireClient,
    assert_transferred,
    corrupt_first_checksums,
    filled,
    receiver_process,
    sender_process,
    wait_until,
)

LAYOUT = kvwire.KVLayout.gqa(num_layers=3, num_kv_heads=2, head_dim=64, block_size=16)


@pytest.fixture
def rx(request):
    """A receiver over TCP, or over the transport a test parametrizes it with (indirect)."""
    dst = LAYOUT.allocate(32)
    receiver = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, transport=getattr(request, "param", "tcp"))
    receiver.dst = dst
    yield receiver
    receiver.close()


def untouched(caches) -> bool:
    return all((t == 0).all() for layer in caches for t in layer.values())


def still_serves(rx, request_id="after") -> None:
    """A well-behaved sender still gets through after whatever the test did."""
    src = filled(LAYOUT, 32, seed=99)
    h = rx.expect(request_id, [30, 31], 20)
    with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=2, transport=rx.transport) as tx:
        tx.send(request_id, [0, 1], 20, timeout=20)
    h.wait(timeout=10)
    assert_transferred(LAYOUT, src, [0, 1], rx.dst, [30, 31], 20)


@pytest.mark.parametrize("rx", TRANSPORTS, indirect=True)
def test_wrong_secret_fails_on_both_sides(rx):
    with pytest.raises(kvwire.AuthenticationFailed, match="prove"):
        kvwire.Sender(LAYOUT, rx.address, secret="not-the-secret", kv_caches=LAYOUT.allocate(4), transport=rx.transport)
    time.sleep(0.2)
    assert rx.stats()["rejected_connections"] >= 1
    still_serves(rx)


@pytest.mark.parametrize("rx", TRANSPORTS, indirect=True)
def test_wrong_layout_fails_on_both_sides(rx):
    other = kvwire.KVLayout.gqa(num_layers=3, num_kv_heads=2, head_dim=128, block_size=16)
    with pytest.raises(kvwire.LayoutMismatch, match=r"k/v 2x128.*k/v 2x64"):
        kvwire.Sender(other, rx.address, secret=SECRET, kv_caches=other.allocate(4), transport=rx.transport)
    time.sleep(0.2)
    assert "layout mismatch" in rx.stats()["rejected"][-1]["reason"]


def test_refused_codec():
    r = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(4), codecs=["fp8"])
    try:
        with pytest.raises(kvwire.LayoutMismatch, match="codec 'raw' refused"):
            kvwire.Sender(LAYOUT, r.address, secret=SECRET, kv_caches=LAYOUT.allocate(4), codec="raw")
    finally:
        r.close()


def data_frame(tag=1, layer=0, tensor=0, start=0, count=16, payload=None, crc=None):
    payload = payload if payload is not None else bytes(count * 2 * 64 * 2)
    return Header(FrameType.DATA, tag=tag, layer=layer, tensor=tensor, start=start, count=count, length=len(payload),
                  payload_crc=crc32c(payload) if crc is None else crc).pack() + payload  # fmt: skip


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(lambda: data_frame(start=32, count=16), id="rows-past-the-request"),
        pytest.param(lambda: data_frame(layer=3), id="layer-out-of-range"),
        pytest.param(lambda: data_frame(tensor=2), id="tensor-out-of-range"),
        pytest.param(lambda: data_frame(start=8, count=16), id="misaligned-rows"),
        pytest.param(lambda: data_frame(payload=bytes(1000)), id="wrong-payload-size"),
        pytest.param(lambda: data_frame(tag=9), id="unknown-tag"),
        pytest.param(lambda: b"GET / HTTP/1.1\r\n\r\n" + bytes(20), id="not-kvwire"),
    ],
)
def test_bad_frames_close_the_connection_and_write_nothing(rx, frame):
    h = rx.expect("victim", [4, 5], 20)
    client = WireClient(rx.address, LAYOUT)
    client.send(client.proto.begin(1, "victim", 20) + frame())
    assert client.closed_by_peer()
    with pytest.raises(kvwire.PeerLost):
        h.wait(timeout=5)  # its only connection is gone
    assert untouched(rx.dst)
    assert rx.stats()["protocol_errors"] >= 1
    still_serves(rx)


def test_overlapping_resend_is_refused(rx):
    rx.expect("ov", [4, 5], 32)
    client = WireClient(rx.address, LAYOUT)
    client.send(client.proto.begin(1, "ov", 32) + data_frame(start=0, count=32, payload=bytes(32 * 256)))
    client.send(data_frame(start=16, count=16))
    assert client.closed_by_peer()


def test_truncated_frame_then_disconnect(rx):
    h = rx.expect("trunc", [4, 5], 20)
    client = WireClient(rx.address, LAYOUT)
    client.send(client.proto.begin(1, "trunc", 20) + data_frame()[:500])
    client.close()
    with pytest.raises(kvwire.PeerLost):
        h.wait(timeout=5)
    assert untouched(rx.dst)
    still_serves(rx)


@pytest.mark.parametrize("rx", TRANSPORTS, indirect=True)
def test_sender_killed_mid_transfer(rx):
    h = rx.expect("proc-req", [4, 5, 6], 40)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    args = (rx.address, LAYOUT.to_dict(), 32, 3, [0, 1, 2], 40, 1, "raw", ready, rx.transport)
    p = ctx.Process(target=sender_process, args=args)
    p.start()
    try:
        assert ready.wait(60)
        h.wait_layer(0, timeout=10)
        os.kill(p.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(kvwire.PeerLost):
            h.wait(timeout=20)
        assert time.monotonic() - t0 < 5
    finally:
        p.kill()
        p.join()
    still_serves(rx)


def test_receiver_killed_mid_transfer():
    layout = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16)
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    p = ctx.Process(target=receiver_process, args=(layout.to_dict(), 64, ports, False))
    p.start()
    try:
        address = ports.get(timeout=60)
        src = filled(layout, 64)
        with kvwire.Sender(layout, address, secret=SECRET, kv_caches=src, streams=2, chunk_bytes=256 << 10) as tx:
            t = tx.transfer("doomed", list(range(64)), 1024, deadline=30)
            for i in range(4):
                t.send_layer(i)  # 16 MiB; the receiver never expects it, so credit runs out
            time.sleep(0.5)
            os.kill(p.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(kvwire.PeerLost):
                t.finish(timeout=20)
            assert time.monotonic() - t0 < 5
            with pytest.raises(kvwire.PeerLost):
                tx.transfer("next", [0], 4)
    finally:
        p.kill()
        p.join()


def test_one_connection_reset_mid_transfer_still_completes(rx):
    src = filled(LAYOUT, 32, seed=12)
    blocks, dst_blocks = list(range(8)), list(range(10, 18))
    h = rx.expect("reset", dst_blocks, 8 * 16)
    with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=3, chunk_bytes=4096) as tx:
        t = tx.transfer("reset", blocks, 8 * 16)
        t.send_layer(0)
        h.wait_layer(0, timeout=10)
        tx._conns[1].stream.sock.shutdown(2)  # as if a middlebox reset it
        t.send_layer(1)
        t.send_layer(2)
        t.finish(timeout=20)
        assert tx.stats()["alive_streams"] == 2
    h.wait(timeout=10)
    assert_transferred(LAYOUT, src, blocks, rx.dst, dst_blocks, 8 * 16)


def test_receiver_deadline_and_sender_timeout(rx):
    h = rx.expect("late", [4], 10, deadline=0.5)
    t0 = time.monotonic()
    with pytest.raises(kvwire.TransferTimeout):
        h.wait()
    assert 0.4 < time.monotonic() - t0 < 3
    with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=LAYOUT.allocate(4)) as tx:
        t = tx.transfer("never-expected", [0], 10, deadline=0.5)
        t.send_layer(0)  # layers 1 and 2 never come
        with pytest.raises(ValueError, match="never sent"):
            t.finish()
        t.send_layer(1)
        t.send_layer(2)
        h2 = rx.expect("never-expected", [4], 10, deadline=10)
        h2.wait(timeout=10)  # completes: it was only missing layers
        t.finish()


def test_cancel_from_either_side(rx):
    with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=LAYOUT.allocate(4)) as tx:
        h = rx.expect("c1", [4], 10)
        t = tx.transfer("c1", [0], 10)
        t.send_layer(0)
        h.wait_layer(0, timeout=5)
        h.cancel("decode instance went away")
        end = time.monotonic() + 5
        while not t.done() and time.monotonic() < end:  # the CANCEL frame is on its way
            time.sleep(0.01)
        with pytest.raises(kvwire.Cancelled, match="decode instance went away"):
            t.finish(timeout=5)

        h2 = rx.expect("c2", [5], 10)
        t2 = tx.transfer("c2", [1], 10)
        t2.send_layer(0)
        h2.wait_layer(0, timeout=5)
        t2.cancel("prefill aborted")
        with pytest.raises(kvwire.Cancelled, match="prefill aborted"):
            h2.wait(timeout=5)
        with pytest.raises(kvwire.Cancelled):
            t2.finish()
    still_serves(rx)


def test_a_sender_that_gives_up_on_a_stalled_path_tells_the_receiver_on_another():
    """The first connection's path goes dark mid-transfer, so finish(timeout) runs out.
    Its CANCEL must not wait behind that connection's blocked send: the receiver's handle
    fails with Cancelled at once, not at its own deadline."""
    layout = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16)
    blocks = 128  # 2048 tokens, 8 MiB a layer: more than the stalled socket holds
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(blocks))
    stall = threading.Event()
    relay = TcpRelay(rx.address, stall=stall)
    try:
        src = filled(layout, blocks, seed=8)
        with kvwire.Sender(layout, relay.address, secret=SECRET, kv_caches=src, streams=2, max_streams=2,
                           chunk_bytes=256 << 10) as tx:  # fmt: skip
            h = rx.expect("dark", list(range(blocks)), blocks * 16, deadline=30)
            stall.set()
            t = tx.transfer("dark", list(range(blocks)), blocks * 16)
            for layer in range(layout.num_layers):
                t.send_layer(layer)
            with pytest.raises(kvwire.TransferTimeout):
                t.finish(timeout=2)
            t0 = time.monotonic()
            with pytest.raises(kvwire.Cancelled, match="gave up"):
                h.wait(timeout=20)
            assert time.monotonic() - t0 < 5
    finally:
        relay.close()
        rx.close()


def test_a_transfer_its_caller_abandoned_ends_at_its_deadline(rx):
    """The prefill failed after one layer and nobody calls finish(): at the deadline the
    sender ends the transfer by itself, tells the receiver, and keeps no record of it
    (nor counts its bytes as queued in later estimates)."""
    h = rx.expect("abandoned", [4, 5], 20, deadline=30)
    with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=filled(LAYOUT, 4, seed=2), streams=2) as tx:
        queued_before = tx.estimate(20).queued_bytes
        t = tx.transfer("abandoned", [0, 1], 20, deadline=0.5)
        t.send_layer(0)
        assert wait_until(t.done, timeout=5)
        with pytest.raises(kvwire.Cancelled, match="deadline passed"):
            h.wait(timeout=5)
        assert wait_until(lambda: tx.census()["transfers"] == 0, timeout=5), tx.census()
        assert tx.census() == {"transfers": 0, "inflight_chunks": 0, "queued_chunks": 0, "begun_tags": 0}
        assert tx.estimate(20).queued_bytes == queued_before
        with pytest.raises(kvwire.TransferTimeout, match="deadline passed"):
            t.finish()
    still_serves(rx)


@pytest.mark.parametrize("which", [0, 1], ids=["with-a-reader", "duplex"])
@pytest.mark.parametrize("code", ["auth", "layout", "other"])
def test_a_reject_after_the_handshake_loses_the_connection_it_came_on(rx, code, which):
    """A REJECT is allowed at any time (then the peer closes). Whatever error it names,
    the connection it came on is lost (its chunks go on the others); its reader must not
    die with the error and leave a connection that looks alive and is read by nobody."""
    from kvwire.proto import FrameType
    from kvwire.proto.frames import json_frame

    src = filled(LAYOUT, 4, seed=3)
    with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=2, max_streams=2) as tx:
        assert wait_until(lambda: len([c for c in rx._conns if c.alive]) == 2, timeout=5)
        (peer,) = [c for c in rx._conns if c.stream.sock.getpeername() == tx._conns[which].stream.sock.getsockname()]
        peer.stream.send_control(json_frame(FrameType.REJECT, {"code": code, "reason": "changed its mind"}))
        assert wait_until(lambda: not tx._conns[which].alive, timeout=5)
        assert tx.stats()["alive_streams"] == 1
        h = rx.expect("after-reject", [6, 7], 20)
        tx.send("after-reject", [0, 1], 20, timeout=10)
        h.wait(timeout=10)
        assert_transferred(LAYOUT, src, [0, 1], rx.dst, [6, 7], 20)


def test_a_segment_declined_while_its_data_is_being_read_costs_nothing_else(rx, monkeypatch):
    """A reader has looked up a DATA frame of a request nobody expected yet; before it
    goes on, the decode declines it (expect with no tokens, as the vLLM connector does).
    The expect sets a handle but binds nothing: the frame must go the way of a frame of
    an ended request, not into the handle's (empty) rows, and the connection, with the
    other requests on it, must live on."""
    from kvwire.engine import receiver as receiver_module

    looked_up, go_on = threading.Event(), threading.Event()
    check_data = receiver_module.Receiver._check_data

    def pause_after_the_lookup(self, conn, header):
        found = check_data(self, conn, header)
        if found is not None and found[0].request_id == "declined" and not looked_up.is_set():
            looked_up.set()
            go_on.wait(10)  # the reader descheduled here (lock contention, the GIL)
        return found

    monkeypatch.setattr(receiver_module.Receiver, "_check_data", pause_after_the_lookup)
    client = WireClient(rx.address, LAYOUT)
    client.send(client.proto.begin(1, "declined", 20) + data_frame(tag=1, payload=b"\x01" * (16 * 2 * 64 * 2)))
    assert looked_up.wait(10)
    rx.expect("declined", [], 0).cancel("the decode computes these tokens itself")
    go_on.set()
    h = rx.expect("next", [6, 7], 20)
    chunks = b"".join(data_frame(tag=2, layer=i, tensor=j, count=20) for i in range(3) for j in range(2))
    client.send(client.proto.begin(2, "next", 20) + chunks)
    h.wait(timeout=10)
    assert not client.closed_by_peer(timeout=0.5)
    client.close()
    assert untouched(rx.dst)  # nothing of the declined segment landed ("next" sent zeros)


def test_a_long_lived_sender_whose_connections_come_and_go_leaves_nothing_behind(rx):
    """A sender's connection policy opens and retires connections for as long as it runs:
    the receiver must forget each closed one, not keep it with its session for good."""
    keep = WireClient(rx.address, LAYOUT)
    for _ in range(30):
        WireClient(rx.address, LAYOUT).close()  # the same session ("cd" * 8)
    assert wait_until(lambda: len(rx._conns) == 1, timeout=10)
    session = rx._sessions["cd" * 8]
    assert wait_until(lambda: len(session.conns) == 1, timeout=10), len(session.conns)
    h = rx.expect("kept", [6, 7], 20)  # the one left still carries a request
    chunks = b"".join(data_frame(tag=1, layer=i, tensor=j, count=20) for i in range(3) for j in range(2))
    keep.send(keep.proto.begin(1, "kept", 20) + chunks)
    h.wait(timeout=10)
    keep.close()


def test_senders_that_stop_inside_a_parked_payload_give_its_room_back(monkeypatch):
    """Connections that each send a DATA header of a request nobody expected yet, a byte
    of its payload, then nothing, each hold a payload's share of the parking bounds. With
    all of it held, every other sender's early chunks would wait (and the requests behind
    them on its connection). After PARKED_READ_LIMIT_S those connections are closed and
    the room is back."""
    from kvwire.engine import receiver as receiver_module

    monkeypatch.setattr(receiver_module, "PARKED_READ_LIMIT_S", 1.0)
    row = 2 * 64 * 2
    rx = kvwire.Receiver(
        LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(1024), staging_bytes=16 << 20, slot_bytes=1 << 20
    )  # parking: 8 MiB in all, 2 MiB per sender
    idle = []
    try:
        rows = (1 << 20) // row  # a 1 MiB payload each
        for i in range(8):
            c = WireClient(rx.address, LAYOUT, session=f"{i:02d}" * 16)
            c.send(c.proto.begin(1, f"idle-{i}", rows) + data_frame(tag=1, count=rows)[: HEADER_SIZE + 1])
            idle.append(c)
        assert wait_until(lambda: rx.stats()["parked_bytes"] >= 8 << 20, timeout=5)
        assert all(c.closed_by_peer(timeout=5) for c in idle)
        assert wait_until(lambda: rx.stats()["parked_bytes"] == 0, timeout=5)
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=filled(LAYOUT, 8, seed=4), streams=1) as tx:
            early = tx.transfer("early", [0, 1], 32)  # parked until its expect
            for layer in range(LAYOUT.num_layers):
                early.send_layer(layer)
            assert wait_until(lambda: rx.stats()["parked_bytes"] > 0, timeout=5)
            h = rx.expect("early", [10, 11], 32)
            early.finish(timeout=10)
            h.wait(timeout=10)
    finally:
        for c in idle:
            c.close()
        rx.close()


def test_a_parked_chunk_refused_at_the_expect_costs_only_its_own_connection(rx):
    """Chunks of one request wait parked, from two connections of a sender. When the
    expect claims them, one from the first connection overlaps that connection's earlier
    data (a protocol error): that connection is closed, and the chunks of the other are
    still placed, not dropped with it (the request would wait for its deadline)."""
    a, b = WireClient(rx.address, LAYOUT), WireClient(rx.address, LAYOUT)  # one session
    a.send(a.proto.begin(1, "mixed", 40) + data_frame(tag=1, count=16) + data_frame(tag=1, count=32))
    assert wait_until(lambda: rx.stats()["parked_chunks"] == 2, timeout=5)
    rest = [data_frame(tag=1, start=16, count=24)]
    rest += [data_frame(tag=1, layer=i, tensor=j, count=40) for i in range(3) for j in range(2) if (i, j) != (0, 0)]
    b.send(b.proto.begin(1, "mixed", 40) + b"".join(rest))
    assert wait_until(lambda: rx.stats()["parked_chunks"] == 8, timeout=5)
    h = rx.expect("mixed", [6, 7, 8], 40)
    assert a.closed_by_peer(timeout=5)
    h.wait(timeout=10)
    assert not b.closed_by_peer(timeout=0.3)
    a.close()
    b.close()


def test_a_transfer_of_no_tokens_is_refused_at_once(rx):
    """No token means no chunk, so no BEGIN would go out and no ACK come back: the
    transfer would only time out. It is refused where it is made. (An expect of no
    tokens is allowed: it declines a request.)"""
    with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=LAYOUT.allocate(4)) as tx:
        with pytest.raises(ValueError, match="at least 1 token"):
            tx.transfer("empty", [], 0)
    rx.expect("declined", [], 0).cancel("declined")


def test_token_count_disagreement_fails_both_sides(rx):
    h = rx.expect("mismatch", [4, 5], 20)
    with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=LAYOUT.allocate(4)) as tx:
        with pytest.raises(kvwire.TransferError, match="expects 20"):
            tx.send("mismatch", [0, 1], 30, timeout=10)
    with pytest.raises(kvwire.TransferError, match="expects 20"):
        h.wait(timeout=5)
    assert untouched(rx.dst)


def test_layers_given_to_a_failed_transfer_are_dropped_and_finish_says_why(rx):
    """A prefill streams layer by layer; the receiver fails the transfer after its first
    layer (the token counts disagree). The later layers must not raise into the
    prefill's loop: they are dropped, and finish() raises the transfer's own error."""
    h = rx.expect("failed-early", [4, 5], 20)
    with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=LAYOUT.allocate(4)) as tx:
        t = tx.transfer("failed-early", [0, 1], 30)
        t.send_layer(0)
        assert wait_until(t.done, timeout=10)
        for layer in range(1, LAYOUT.num_layers):
            t.send_layer(layer)
        with pytest.raises(ValueError, match="out of range"):  # a caller's mistake still says so
            t.send_layer(LAYOUT.num_layers)
        with pytest.raises(kvwire.TransferError, match="expects 20"):
            t.finish(timeout=10)
    with pytest.raises(kvwire.TransferError, match="expects 20"):
        h.wait(timeout=5)
    assert untouched(rx.dst)
    still_serves(rx)


def test_receiver_close_fails_open_requests():
    r = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(4))
    h = r.expect("x", [0], 4)
    r.close()
    with pytest.raises(kvwire.Cancelled):
        h.wait(timeout=1)


def test_unreachable_peer():
    with pytest.raises(kvwire.PeerLost, match="cannot connect"):
        kvwire.Sender(LAYOUT, ("127.0.0.1", 1), secret=SECRET, kv_caches=LAYOUT.allocate(4), connect_timeout=2)


def test_terms_refused_by_the_receiver_name_the_reason():
    seen = []

    def check(terms):
        seen.append(terms)
        if terms.get("tp_size") != 2:
            return f"tensor-parallel size {terms.get('tp_size')} on the sender, 2 here"
        return None

    dst = LAYOUT.allocate(8)
    with kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, check_terms=check) as rx:
        with pytest.raises(kvwire.LayoutMismatch, match="tensor-parallel size 4 on the sender, 2 here"):
            kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=LAYOUT.allocate(4), terms={"tp_size": 4})
        with pytest.raises(kvwire.LayoutMismatch, match="tensor-parallel size None"):
            kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=LAYOUT.allocate(4), streams=1)
        assert any("tensor-parallel size 4" in r["reason"] for r in rx.stats()["rejected"])
        src = filled(LAYOUT, 4)
        h = rx.expect("ok", [5], 16)
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=2, terms={"tp_size": 2}) as tx:
            tx.send("ok", [1], 16, timeout=20)
        h.wait(timeout=10)
    assert seen[0] == {"tp_size": 4} and seen[1] == {} and seen[-1] == {"tp_size": 2}
    assert_transferred(LAYOUT, src, [1], dst, [5], 16)


def test_terms_are_checked_before_anything_is_sent():
    with pytest.raises(TypeError, match="terms"):
        kvwire.Sender(LAYOUT, "127.0.0.1:1", secret=SECRET, kv_caches=LAYOUT.allocate(2), terms={"a": [1]})
    with pytest.raises(TypeError, match="check_terms"):
        kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(2), check_terms="tp=2")


def test_a_connection_lost_mid_layer_is_resent_and_the_repeats_dropped():
    """Chunks in flight on a connection that dies are sent again on the others; those that
    had arrived already come twice, and the receiver places them once."""
    dst = LAYOUT.allocate(64)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, slot_bytes=8 << 10, window_bytes=64 << 10)
    src = filled(LAYOUT, 64, seed=21)
    blocks, dst_blocks = list(range(32)), list(range(32, 64))
    try:
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=3, chunk_bytes=4096) as tx:
            t = tx.transfer("resend", blocks, 512)
            for i in range(LAYOUT.num_layers):
                t.send_layer(i)
            # Nobody expects it yet: every connection fills its 64 KiB window with parked chunks.
            end = time.monotonic() + 10
            while rx.stats()["parked_chunks"] < 48 and time.monotonic() < end:
                time.sleep(0.01)
            assert rx.stats()["parked_chunks"] == 48
            tx.reset_connection(1)
            h = rx.expect("resend", dst_blocks, 512)
            stats = t.finish(timeout=20)
            received = h.wait(timeout=10)
            assert tx.stats()["alive_streams"] == 2
            repeats = received["duplicates"]
    finally:
        rx.close()
    assert stats["resent_chunks"] == 16  # a window's worth, 4 KiB each
    assert repeats == 16  # each had arrived before the reset; resends go first, so they find it open
    # Resends are frames on the wire, not more KV: the request's bytes are counted once.
    assert stats["logical_bytes"] == LAYOUT.request_bytes(512)
    assert stats["wire_bytes"] == LAYOUT.request_bytes(512) + 16 * 4096
    assert_transferred(LAYOUT, src, blocks, dst, dst_blocks, 512)


def nack_of(client: WireClient, timeout: float = 5.0):
    """The next NACK the receiver sends this client (CREDIT frames are read past)."""
    from kvwire.proto import Nack, parse_header
    from kvwire.proto.frames import HEADER_SIZE

    client.sock.settimeout(timeout)
    while True:
        header = parse_header(client._recv(HEADER_SIZE))
        events = client.proto.on_payload(header, client._recv(header.length))
        for event in events:
            if isinstance(event, Nack):
                return event


def test_a_corrupted_payload_is_asked_for_again_and_the_request_completes(rx):
    h = rx.expect("again", [4, 5], 20)
    client = WireClient(rx.address, LAYOUT)
    good = data_frame(start=0, count=20, payload=bytes(range(256)) * 20)
    corrupt = bytearray(good)
    corrupt[-1] ^= 0x40  # one bit of the payload, after its CRC was taken
    client.send(client.proto.begin(1, "again", 20) + bytes(corrupt))
    nack = nack_of(client)
    assert (nack.tag, nack.layer, nack.tensor, nack.start, nack.count) == (1, 0, 0, 0, 20)
    assert not h.done() and not client.closed_by_peer(timeout=0.2)  # the connection stays up
    frames = [good] + [data_frame(layer=i, tensor=j, start=0, count=20, payload=bytes(range(256)) * 20)
                       for i in range(3) for j in range(2) if (i, j) != (0, 0)]  # fmt: skip
    client.send(b"".join(frames))
    h.wait(timeout=10)
    assert rx.stats()["checksum_failures"] == 1
    rows = rx.dst[0]["k"].view(torch.uint8)
    assert bytes(rows[4].reshape(-1)[:256].tolist()) == bytes(range(256))  # the good bytes, in place


def test_a_late_frame_is_read_past_while_parked_chunks_fill_staging():
    """A DATA frame of a request that ended is read and dropped. With staging taken by
    chunks parked for an expect that has not come, reading it past through staging waited
    30 s for room and then dropped the connection, and the requests behind it failed."""
    dst = LAYOUT.allocate(128)  # room to announce the parked requests (twice the capacity in tokens)
    staging = 4259840  # one slot's worth; parking may use all of it here
    r = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, staging_bytes=staging, max_parked_bytes=staging,
                        max_parked_bytes_per_peer=staging)  # fmt: skip
    try:
        client = WireClient(r.address, LAYOUT)
        chunk = 512 * 2 * 64 * 2  # bytes of a 512-row chunk of one tensor: 128 KiB
        for q in range(6):  # 32 chunks of requests nobody expects yet: staging is full but for 64 KiB
            chunks = [data_frame(tag=10 + q, layer=i, tensor=j, count=512) for i in range(3) for j in range(2)]
            client.send(client.proto.begin(10 + q, f"parked-{q}", 512) + b"".join(chunks[: 2 if q == 5 else 6]))
        assert wait_until(lambda: r.stats()["parked_bytes"] == 32 * chunk, timeout=5)
        late = client.proto.begin(2, "ended", 512) + client.proto.cancel(2, "gone") + data_frame(tag=2, count=512)
        h = r.expect("behind", [20], 16)
        client.send(late + client.proto.begin(3, "behind", 16)
                    + b"".join(data_frame(tag=3, layer=i, tensor=j) for i in range(3) for j in range(2)))  # fmt: skip
        h.wait(timeout=10)
        assert r.stats()["late_frames"] == 1
        assert r.stats()["parked_bytes"] == 32 * chunk  # the parked chunks wait on, untouched
    finally:
        r.close()


def test_a_payload_corrupted_again_and_again_fails_typed(rx):
    from kvwire.engine.requests import MAX_CHECKSUM_FAILURES

    h = rx.expect("hopeless", [4, 5], 20)
    client = WireClient(rx.address, LAYOUT)
    client.send(client.proto.begin(1, "hopeless", 20))
    t0 = time.monotonic()
    for _ in range(MAX_CHECKSUM_FAILURES + 1):
        client.send(data_frame(crc=1234))
    with pytest.raises(kvwire.ChecksumMismatch, match="failed their checksum"):
        h.wait(timeout=10)
    assert time.monotonic() - t0 < 5
    assert all(bool((t[:4] == 0).all()) and bool((t[6:] == 0).all()) for layer in rx.dst for t in layer.values())
    still_serves(rx)


def test_a_sender_resends_what_the_receiver_asks_for(rx, monkeypatch):
    """A real sender whose first payloads carry a wrong CRC (as if corrupted on the way):
    each is asked for again, sent again from the cache, and the data arrives exact."""
    corrupt_first_checksums(monkeypatch, 3)
    src = filled(LAYOUT, 32, seed=4)
    h = rx.expect("resent", [10, 11, 12], 40)
    with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=2, chunk_bytes=4096) as tx:
        stats = tx.send("resent", [0, 1, 2], 40, timeout=20)
    h.wait(timeout=10)
    assert stats["nacked_chunks"] == 3
    assert_transferred(LAYOUT, src, [0, 1, 2], rx.dst, [10, 11, 12], 40)


def test_payload_bytes_damaged_on_the_path_are_sent_again_and_land_exact(rx):
    """A middlebox flips a bit in the first payloads: they land in place damaged, fail
    their checksum, are asked for again and overwritten by the resent bytes. The other
    blocks of the destination are never written."""
    src = filled(LAYOUT, 32, seed=5)
    relay = TcpRelay(rx.address, corrupt=4)
    try:
        h = rx.expect("damaged", [10, 11, 12], 40)
        with kvwire.Sender(LAYOUT, relay.address, secret=SECRET, kv_caches=src, streams=2, chunk_bytes=4096) as tx:
            stats = tx.send("damaged", [0, 1, 2], 40, timeout=20)
        h.wait(timeout=10)
    finally:
        relay.close()
    assert relay.corrupted == 4
    assert stats["nacked_chunks"] == 4
    assert rx.stats()["checksum_failures"] == 4
    assert_transferred(LAYOUT, src, [0, 1, 2], rx.dst, [10, 11, 12], 40)
    untouched = [b for b in range(32) if b not in (10, 11, 12)]
    assert all(bool((t[untouched] == 0).all()) for layer in rx.dst for t in layer.values())


def test_a_sender_whose_payloads_keep_failing_the_checksum_fails_typed_on_both_sides(rx, monkeypatch):
    """Every payload corrupted on the way: the receiver asks again a bounded number of
    times, then fails the request; both sides raise ChecksumMismatch (the sender learns
    why from the ACK's status), within the deadline, and nothing is left half-written."""
    from kvwire.engine.requests import MAX_CHECKSUM_FAILURES

    corrupt_first_checksums(monkeypatch, 10_000)
    src = filled(LAYOUT, 32, seed=6)
    h = rx.expect("hopeless", [10, 11, 12], 40, deadline=20)
    t0 = time.monotonic()
    with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=2, chunk_bytes=4096) as tx:
        with pytest.raises(kvwire.ChecksumMismatch, match="failed their checksum"):
            tx.send("hopeless", [0, 1, 2], 40, timeout=20)
    with pytest.raises(kvwire.ChecksumMismatch, match=r"failed their checksum \(the last: .*, from the sender at"):
        h.wait(timeout=10)
    assert time.monotonic() - t0 < 10
    assert rx.stats()["checksum_failures"] > MAX_CHECKSUM_FAILURES
    monkeypatch.undo()  # the path is clean again
    still_serves(rx)


@pytest.mark.parametrize("sender_sum, receiver_sum", [("none", "crc32c"), ("crc32c", "none")])
def test_a_checksum_disagreement_is_refused_at_the_handshake(sender_sum, receiver_sum):
    r = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(4), checksum=receiver_sum)
    try:
        with pytest.raises(kvwire.LayoutMismatch, match="checksum"):
            kvwire.Sender(LAYOUT, r.address, secret=SECRET, kv_caches=LAYOUT.allocate(4), checksum=sender_sum)
    finally:
        r.close()


def test_without_checksums_data_still_arrives_exact():
    dst = LAYOUT.allocate(16)
    r = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, checksum="none")
    src = filled(LAYOUT, 16, seed=5)
    try:
        h = r.expect("plain", [7, 3, 9], 40)
        with kvwire.Sender(LAYOUT, r.address, secret=SECRET, kv_caches=src, checksum="none") as tx:
            tx.send("plain", [0, 1, 2], 40, timeout=20)
        h.wait(timeout=10)
    finally:
        r.close()
    assert_transferred(LAYOUT, src, [0, 1, 2], dst, [7, 3, 9], 40)


def test_closing_the_receiver_as_soon_as_wait_returns_keeps_the_acknowledgement():
    """The ACK is queued before wait() returns, so a receiver closed right then does not
    cut it off: the sender's finish() succeeds (it failed about one time in eight when the
    handle was finished before the ACK was queued)."""
    src = filled(LAYOUT, 32, seed=5)
    for i in range(40):
        rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(32))
        h = rx.expect("closing", list(range(32)), 512)
        closer = threading.Thread(target=_wait_then_close, args=(h, rx))
        closer.start()
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=3) as tx:
            t = tx.transfer("closing", list(range(32)), 512)
            for layer in range(LAYOUT.num_layers):
                t.send_layer(layer)
            t.finish(timeout=10)  # raises PeerLost when the ACK was cut off
        closer.join()
        assert h.done(), f"round {i}"


def _wait_then_close(handle, receiver) -> None:
    handle.wait(timeout=10)
    receiver.close()


@pytest.mark.parametrize(
    "grace_s, completes, failing", [(0.5, True, 1), (60.0, False, 1), (0.5, True, 0), (60.0, False, 0)],
    ids=["cut-off", "grace-outlasts-the-transfer", "cut-off-conn0", "grace-outlasts-the-transfer-conn0"],
)  # fmt: skip
def test_a_failed_writer_whose_reader_never_ends_is_cut_off_after_the_grace(rx, monkeypatch, grace_s, completes,
                                                                             failing):  # fmt: skip
    """A send fails, writing stops (a half-close), and the connection's reader waits for
    what the peer sent before it closed; a peer that never closes would hold that
    connection's chunks forever: after WRITER_LOSS_GRACE_S it is cut off and its chunks
    go again on the other connection (with a grace past the transfer's timeout, the
    transfer times out instead: the grace is what ends it). The receiver still thinks
    the cut connection alive (nothing passed its close on), so it must acknowledge on
    the one that carried the last payload: with connection 0 failing, the first live
    connection it knows is the dead one."""
    from kvwire.engine import sender as sender_module
    from kvwire.errors import PeerLost

    monkeypatch.setattr(sender_module, "WRITER_LOSS_GRACE_S", grace_s)
    proxy = TcpRelay(rx.address, pass_close=False)  # a middlebox that never passes a close on
    src = filled(LAYOUT, 32, seed=31)
    blocks, dst_blocks = list(range(8)), list(range(20, 28))
    h = rx.expect("grace", dst_blocks, 8 * 16)
    try:
        with kvwire.Sender(LAYOUT, proxy.address, secret=SECRET, kv_caches=src, streams=2, max_streams=2,
                           chunk_bytes=4096) as tx:  # fmt: skip
            stream, first = tx._conns[failing].stream, tx._conns[1 - failing].stream
            send_parts, first_send = stream.send_parts, first.send_parts
            failed = threading.Event()

            def fail_once(*args, **kwargs):
                stream.send_parts = send_parts
                failed.set()
                raise PeerLost("injected: the send failed")

            def after_the_failure(*args, **kwargs):
                # The other connection sends nothing before the failing one has failed: on a
                # short path one writer could otherwise take every chunk, and it send none.
                failed.wait(10)
                first.send_parts = first_send
                return first_send(*args, **kwargs)

            stream.send_parts = fail_once  # its next data send fails; its peer stays
            first.send_parts = after_the_failure
            t0 = time.monotonic()
            t = tx.transfer("grace", blocks, 8 * 16)
            for layer in range(LAYOUT.num_layers):
                t.send_layer(layer)
            if completes:
                stats = t.finish(timeout=20)
                assert time.monotonic() - t0 >= grace_s  # not before the reader's grace ran out
                assert stats["resent_chunks"] >= 1 and tx.stats()["alive_streams"] == 1
            else:
                with pytest.raises(kvwire.TransferError):
                    t.finish(timeout=3)
                # Still waiting on the silent reader: the timed-out transfer's CANCEL did not go
                # to the connection whose writing stopped (that send closed it, one run in ten).
                assert tx.stats()["alive_streams"] == 2
    finally:
        proxy.close()
    if completes:
        h.wait(timeout=10)
        assert_transferred(LAYOUT, src, blocks, rx.dst, dst_blocks, 8 * 16)


def test_an_acknowledgement_lost_with_its_connection_is_sent_again_on_another(monkeypatch):
    """The connection the receiver acknowledges on breaks just as the ACK goes out: the
    ACK is sent again on another of the sender's connections, and finish() returns."""
    from kvwire.engine import receiver as receiver_module
    from kvwire.engine import requests

    send_locked = receiver_module.Receiver._send_locked

    def break_it_as_the_ack_goes(self, action):
        if isinstance(action, requests.SendAck) and action.ok:
            self._sessions[action.session].any_conn().stream.close()
        send_locked(self, action)

    monkeypatch.setattr(receiver_module.Receiver, "_send_locked", break_it_as_the_ack_goes)
    dst = LAYOUT.allocate(32)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst)
    src = filled(LAYOUT, 32, seed=3)
    try:
        h = rx.expect("acked", [10, 11, 12], 40)
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=2, chunk_bytes=4096) as tx:
            t = tx.transfer("acked", [0, 1, 2], 40, deadline=20)
            for layer in range(LAYOUT.num_layers):
                t.send_layer(layer)
            h.wait(timeout=10)
            t0 = time.monotonic()
            t.finish(timeout=10)
            assert time.monotonic() - t0 < 5
    finally:
        rx.close()
    assert_transferred(LAYOUT, src, [0, 1, 2], dst, [10, 11, 12], 40)


def test_a_chunk_whose_connection_broke_inside_it_is_asked_for_on_another(rx):
    """Chunk X is being received on connection A when its copy arrives whole on B (as a
    sender sends again what a failing connection carried): the copy is read past as a
    repeat. A then breaks inside X, whose rows are missing again: X is asked for on B."""
    from kvwire.proto.frames import HEADER_SIZE

    def frame(layer, tensor, start):
        return data_frame(1, layer, tensor, start, 16, bytes([layer * 10 + tensor + 1]) * (16 * 256))

    h = rx.expect("again", [4, 5], 32, deadline=20)
    a, b = WireClient(rx.address, LAYOUT), WireClient(rx.address, LAYOUT)  # one session: one sender
    x = frame(1, 0, 0)
    rest = [frame(i, j, s) for i in range(3) for j in range(2) for s in (0, 16) if (i, j, s) != (1, 0, 0)]
    a.send(a.proto.begin(1, "again", 32) + b"".join(rest) + x[: HEADER_SIZE + 1000])  # A stops inside X
    assert wait_until(lambda: h.stats()["chunks"] == 11 and h._request.writing.any(), timeout=5)
    b.send(b.proto.begin(1, "again", 32) + x)
    assert wait_until(lambda: h.stats()["duplicates"] == 1, timeout=5)
    a.close()
    nack = nack_of(b)
    assert (nack.tag, nack.layer, nack.tensor, nack.start, nack.count) == (1, 1, 0, 0, 16)
    b.send(x)
    h.wait(timeout=10)
    assert bytes(rx.dst[1]["k"][4].view(torch.uint8).reshape(-1).numpy()) == bytes([11]) * (16 * 256)
    b.close()


@pytest.mark.parametrize("ending", ["connections-lost", "unclaimed"])
def test_an_expect_after_its_senders_failed_fails_at_once(ending):
    """A request whose sender's connections were all lost, or that nobody expected in
    time, before expect() named its destination: that expect() fails at once with the
    same error, not at its deadline."""
    dst = LAYOUT.allocate(32)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, unclaimed_timeout=0.3 if ending == "unclaimed" else 60)
    rx.dst = dst  # for still_serves
    try:
        client = WireClient(rx.address, LAYOUT)
        client.send(client.proto.begin(1, "gone", 32) + data_frame(1, 0, 0, 0, 16, bytes(16 * 256)))
        assert wait_until(lambda: rx.census()["parked_chunks"] == 1, timeout=5)
        if ending == "connections-lost":
            client.close()
        assert wait_until(lambda: rx.census()["requests"] == 0, timeout=5)
        h = rx.expect("gone", [4, 5], 32, deadline=30)
        t0 = time.monotonic()
        with pytest.raises(kvwire.PeerLost if ending == "connections-lost" else kvwire.TransferError,
                           match="all gone" if ending == "connections-lost" else "no expect"):  # fmt: skip
            h.wait()
        assert time.monotonic() - t0 < 2
        client.close()
        still_serves(rx, "gone")  # a new transfer of the same id is not refused for the old one
    finally:
        rx.close()
