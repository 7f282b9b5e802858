"""The receiver's compiled receive lane (kvwire/engine/lane.py): the frames it takes land
exactly where Python's loop puts them, and every frame it does not take, or that goes
wrong on it, is handled as Python handles it: a repeat read past, an overlap or a frame
out of bounds refused, a corrupted payload asked for again, a broken stream failing the
request, with nothing written outside the request's rows."""

import threading
import time

import pytest
import torch

import kvwire
from kvwire.engine import lane
from kvwire.proto import FrameType, parse_header
from kvwire.proto.frames import HEADER_SIZE
from kvwire.scatter import _scatter
from tests import test_faults as faults
from tests.helpers import SECRET, WireClient, assert_transferred, corrupt_first_checksums, filled, wait_until

pytestmark = pytest.mark.skipif(not lane.available(), reason="the compiled helper is not built")

LAYOUT = kvwire.KVLayout.gqa(num_layers=3, num_kv_heads=2, head_dim=64, block_size=16)
ROW = 2 * 64 * 2  # bytes of one token's row of k (or v): 2 heads of 64 bf16 values


@pytest.fixture(params=[lane.BOUNCE, 1000, 0], ids=["bounce", "odd-bounce", "in-place"])
def bounce(request, monkeypatch):
    """How the lane receives payloads: through the bounce buffer it takes by default (where
    the helper has stores that bypass the cache), through one of 1000 bytes (pieces that
    end inside spans and rows at every alignment), or straight into the rows."""
    if request.param and not _scatter.STREAMING_STORES:
        pytest.skip("the helper copies out of a bounce buffer only on x86-64")
    monkeypatch.setattr(lane, "BOUNCE", request.param)
    return request.param


@pytest.fixture
def rx(bounce):
    dst = LAYOUT.allocate(32)
    receiver = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst)
    receiver.dst = dst
    yield receiver
    receiver.close()


def rows_of(start: int, count: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return bytes(torch.randint(0, 256, (count * ROW,), dtype=torch.uint8, generator=g).tolist())


def data_frame(layer=0, tensor=0, start=0, count=16, payload=None, crc=None, tag=1) -> bytes:
    """A DATA frame (tests/test_faults.py's) whose rows, unless given, are seeded by where they go."""
    payload = rows_of(start, count, seed=layer * 100 + tensor * 10 + start) if payload is None else payload
    return faults.data_frame(tag, layer, tensor, start, count, payload, crc)


def every_frame(num_tokens: int = 32, skip=()) -> list[tuple[int, int, int]]:
    """(layer, tensor, start) of each 16-row chunk of a request, in layer order."""
    return [(i, j, s) for i in range(3) for j in range(2) for s in range(0, num_tokens, 16) if (i, j, s) not in skip]


def token_rows(dst, layer: int, name: str, blocks: list[int]) -> bytes:
    return b"".join(bytes(dst[layer][name][b].view(torch.uint8).reshape(-1).tolist()) for b in blocks)


def opened(rx, request_id: str, blocks: list[int], num_tokens: int = 32, deadline: float = 60.0):
    """A request whose first chunk (layer 0, k, rows 0..16) arrived through Python's loop,
    which opens the lane for the rest: the handle and the client."""
    h = rx.expect(request_id, blocks, num_tokens, deadline=deadline)
    client = WireClient(rx.address, LAYOUT)
    client.send(client.proto.begin(1, request_id, num_tokens) + data_frame())
    assert wait_until(lambda: h.stats()["chunks"] == 1, timeout=5)  # written and verified
    return h, client


def snapshot(dst) -> list[dict[str, bytes]]:
    """The caches' bytes (compared as bytes: random rows hold NaNs, which compare unequal)."""
    return [{n: bytes(t.view(torch.uint8).reshape(-1).numpy()) for n, t in layer.items()} for layer in dst]


def untouched_outside(dst, blocks: list[int]) -> bool:
    others = [b for b in range(len(dst[0]["k"])) if b not in blocks]
    return all(bool((t[others] == 0).all()) for layer in dst for t in layer.values())


@pytest.mark.parametrize("receive_lane", [True, False], ids=["lane", "python"])
def test_a_transfer_lands_exact_whichever_loop_takes_its_frames(receive_lane, bounce):
    dst = LAYOUT.allocate(64)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, receive_lane=receive_lane)
    src = filled(LAYOUT, 64, seed=7)
    blocks, dst_blocks = list(range(20)), [63 - 2 * i for i in range(20)]  # scattered, reversed
    try:
        h = rx.expect("both", dst_blocks, 317)  # a partial last block
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=2, chunk_bytes=8192) as tx:
            tx.send("both", blocks, 317, timeout=20)
        stats = h.wait(timeout=10)
        counters = rx.stats()
    finally:
        rx.close()
    assert_transferred(LAYOUT, src, blocks, dst, dst_blocks, 317)
    assert stats["chunks"] == counters["frames"] > 40
    if receive_lane:  # all but the first few, which open the lane (how many depends on the scheduling)
        assert counters["lane_frames"] >= counters["frames"] // 2
    else:
        assert counters["lane_frames"] == 0
    assert untouched_outside(dst, dst_blocks)


def test_a_window_of_one_frame_gets_its_credit_back_after_every_frame():
    """window_bytes == slot_bytes: no credit may wait for a batch (the batch is 0)."""
    dst = LAYOUT.allocate(64)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, slot_bytes=8192, window_bytes=8192)
    src = filled(LAYOUT, 64, seed=8)
    try:
        h = rx.expect("narrow", list(range(40, 60)), 320)
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=1) as tx:
            tx.send("narrow", list(range(20)), 320, timeout=20)
        h.wait(timeout=10)
        assert rx.stats()["lane_frames"] == rx.stats()["frames"] - 1
        assert rx.stats()["lane_credits"] > 0  # returned by the lane itself, not a round trip to Python each
    finally:
        rx.close()
    assert_transferred(LAYOUT, src, list(range(20)), dst, list(range(40, 60)), 320)


def control_frames(client, until_ack: bool = True, timeout: float = 10) -> list:
    """(header, payload) of the control frames the receiver sent ``client``, up to its ACK
    (or whatever arrives within ``timeout``), each header checked as parse_header checks it."""
    frames, end = [], time.monotonic() + timeout
    client.sock.settimeout(0.2)
    while time.monotonic() < end:
        try:
            header = parse_header(client._recv(HEADER_SIZE))
        except TimeoutError:
            continue
        frames.append((header, client._recv(header.length)))
        if until_ack and header.type == FrameType.ACK:
            break
    return frames


@pytest.fixture
def narrow_rx():
    """A receiver whose credit batch is one 16-row frame (window 16 KiB, batch a quarter)."""
    dst = LAYOUT.allocate(32)
    receiver = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, slot_bytes=8192, window_bytes=16384)
    receiver.dst = dst
    yield receiver
    receiver.close()


def test_the_lane_returns_credit_itself_byte_for_byte(narrow_rx):
    rx = narrow_rx
    h, client = opened(rx, "credited", [6, 7])
    client.send(b"".join(data_frame(i, j, s) for i, j, s in every_frame(skip={(0, 0, 0)})))
    h.wait(timeout=10)
    frames = control_frames(client)
    credits = [header.start for header, _ in frames if header.type == FrameType.CREDIT]
    assert frames[-1][0].type == FrameType.ACK
    assert sum(credits) == 12 * 16 * ROW  # every payload byte given back, the first frame's by Python
    # One per frame from the lane (at most 11 - 3: the frames that end a layer come back to
    # Python, the layer ready, with their credit), unless another thread was writing then.
    assert rx.stats()["lane_frames"] == 11 and 0 < rx.stats()["lane_credits"] <= 11 - 3


def test_credit_the_lane_cannot_send_at_once_goes_through_python_in_order(narrow_rx):
    """Another thread writing the socket (its send lock held) or frames already queued: the
    lane leaves the credit to Python, which queues it behind them; none is lost or split."""
    rx = narrow_rx
    h, client = opened(rx, "queued", [6, 7])
    stream = rx._conns[0].stream
    credited = rx.stats()["lane_credits"]
    with stream._send_lock:  # as if an acknowledgement were being written
        client.send(b"".join(data_frame(i, j, s) for i, j, s in every_frame() if i == 0 and (j, s) != (0, 0)))
        assert wait_until(lambda: rx.stats()["lane_frames"] == 3, timeout=5)
        assert rx.stats()["lane_credits"] == credited and stream._outbox  # queued by Python, not sent
    client.send(b"".join(data_frame(i, j, s) for i, j, s in every_frame() if i > 0))
    h.wait(timeout=10)
    frames = control_frames(client)
    assert sum(header.start for header, _ in frames if header.type == FrameType.CREDIT) == 12 * 16 * ROW
    assert frames[-1][0].type == FrameType.ACK


def test_the_lane_places_each_frame_in_its_rows(rx):
    blocks = [9, 3]
    h, client = opened(rx, "exact", blocks)
    client.send(b"".join(data_frame(i, j, s) for i, j, s in every_frame(skip={(0, 0, 0)})))
    h.wait(timeout=10)
    stats = rx.stats()
    assert stats["lane_frames"] == stats["frames"] - 1 == 11
    for i in range(3):
        for j, name in enumerate(("k", "v")):
            want = rows_of(0, 16, i * 100 + j * 10) + rows_of(16, 16, i * 100 + j * 10 + 16)
            assert token_rows(rx.dst, i, name, blocks) == want, (i, name)
    assert untouched_outside(rx.dst, blocks)


def test_layers_become_ready_one_by_one_from_the_lane(rx):
    h, client = opened(rx, "layers", [4, 5])
    client.send(b"".join(data_frame(i, j, s) for i, j, s in every_frame() if i == 0 and (i, j, s) != (0, 0, 0)))
    h.wait_layer(0, timeout=5)
    with pytest.raises(kvwire.TransferTimeout):
        h.wait_layer(1, timeout=0.2)
    assert not h.done() and set(h.layer_done_at) == {0}
    client.send(b"".join(data_frame(i, j, s) for i, j, s in every_frame() if i > 0))
    h.wait(timeout=10)
    assert set(h.layer_done_at) == {0, 1, 2} and rx.stats()["lane_frames"] == 11


def test_a_corrupted_payload_on_the_lane_is_asked_for_again(rx):
    h, client = opened(rx, "again", [4, 5])
    good = data_frame(1, 0, 16)
    bad = bytearray(good)
    bad[-1] ^= 0x08
    client.send(bytes(bad))
    nack = faults.nack_of(client)
    assert (nack.tag, nack.layer, nack.tensor, nack.start, nack.count) == (1, 1, 0, 16, 16)
    assert rx.stats()["lane_frames"] == 1 and rx.stats()["checksum_failures"] == 1
    client.send(b"".join(data_frame(i, j, s) for i, j, s in every_frame(skip={(0, 0, 0)})))
    h.wait(timeout=10)
    assert token_rows(rx.dst, 1, "k", [5]) == rows_of(16, 16, 100 + 16)
    assert untouched_outside(rx.dst, [4, 5])


def test_a_real_senders_corrupted_payloads_are_resent_through_the_lane(rx, monkeypatch):
    src = filled(LAYOUT, 32, seed=4)
    h = rx.expect("resent", [10, 11, 12], 40)
    with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=1, chunk_bytes=4096) as tx:
        t = tx.transfer("resent", [0, 1, 2], 40)
        t.send_layer(0)
        assert wait_until(lambda: rx.stats()["lane_frames"] > 0, timeout=5)
        corrupt_first_checksums(monkeypatch, 3)  # from now on: the lane meets them
        for i in (1, 2):
            t.send_layer(i)
        stats = t.finish(timeout=20)
    h.wait(timeout=10)
    assert stats["nacked_chunks"] == 3 == rx.stats()["checksum_failures"]
    assert_transferred(LAYOUT, src, [0, 1, 2], rx.dst, [10, 11, 12], 40)


def test_an_exact_repeat_on_the_lane_is_read_past(rx):
    h, client = opened(rx, "repeat", [4, 5])
    client.send(data_frame(0, 1, 0) + data_frame(0, 1, 0, payload=bytes(16 * ROW)))  # the repeat carries zeros
    client.send(b"".join(data_frame(i, j, s) for i, j, s in every_frame(skip={(0, 0, 0), (0, 1, 0)})))
    h.wait(timeout=10)
    assert h.stats()["duplicates"] == 1
    assert token_rows(rx.dst, 0, "v", [4]) == rows_of(0, 16, 10)  # the first one's rows, not the repeat's


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(lambda: data_frame(0, 0, 0, 32), id="overlap"),
        pytest.param(lambda: data_frame(1, 0, 32, 16), id="rows-past-the-request"),
        pytest.param(lambda: data_frame(3, 0, 0), id="layer-out-of-range"),
        pytest.param(lambda: data_frame(1, 2, 0), id="tensor-out-of-range"),
        pytest.param(lambda: data_frame(1, 0, 8, 16), id="misaligned-rows"),
        pytest.param(lambda: data_frame(1, 0, 0, payload=bytes(1000)), id="wrong-payload-size"),
        pytest.param(lambda: data_frame(1, 0, 0, tag=9), id="unknown-tag"),
        pytest.param(lambda: data_frame(1, 0, 0)[:28] + b"\0\0\0\0" + bytes(16 * ROW), id="bad-header-crc"),
    ],
)
def test_a_bad_frame_after_the_lane_opened_is_refused_and_writes_nothing(rx, frame):
    h, client = opened(rx, "victim", [4, 5])
    before = snapshot(rx.dst)
    client.send(frame())
    assert client.closed_by_peer()
    with pytest.raises(kvwire.PeerLost):
        h.wait(timeout=5)
    assert snapshot(rx.dst) == before
    assert rx.stats()["protocol_errors"] >= 1


def test_a_stream_cut_inside_a_lane_frame_fails_the_request(rx):
    h, client = opened(rx, "cut", [4, 5])
    client.send(data_frame(1, 0, 0)[:-100])
    client.close()
    with pytest.raises(kvwire.PeerLost):
        h.wait(timeout=5)
    assert untouched_outside(rx.dst, [4, 5])
    assert wait_until(lambda: rx.census()["lanes"] == 0, timeout=5)
    assert rx.census()["requests"] == 0


# A frame of 1280 rows into 80 blocks that are not adjacent: spans of one 4 KiB block
# each, so the lane receives its 320 KiB and checks them a piece (256 KiB) at a time.
BIG = 1280
BIG_BLOCKS = [2 * i + 1 for i in range(BIG // 16)]


@pytest.fixture
def big_rx(bounce):
    dst = LAYOUT.allocate(2 * len(BIG_BLOCKS) + 2)
    receiver = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst)
    receiver.dst = dst
    yield receiver
    receiver.close()


def test_a_frame_checked_piece_by_piece_lands_and_a_bad_one_is_asked_for_again(big_rx):
    h, client = opened(big_rx, "pieces", BIG_BLOCKS, num_tokens=BIG)
    good = data_frame(0, 1, 0, BIG)
    bad = bytearray(good)
    bad[32 + 300_000] ^= 0x10  # a byte of the second piece
    client.send(bytes(bad))
    nack = faults.nack_of(client)
    assert (nack.layer, nack.tensor, nack.start, nack.count) == (0, 1, 0, BIG)
    client.send(good + data_frame(0, 0, 16, BIG - 16))
    h.wait_layer(0, timeout=10)
    assert big_rx.stats()["lane_frames"] == 3 and big_rx.stats()["checksum_failures"] == 1
    assert token_rows(big_rx.dst, 0, "v", BIG_BLOCKS) == rows_of(0, BIG, seed=10)
    assert token_rows(big_rx.dst, 0, "k", BIG_BLOCKS) == rows_of(0, 16, seed=0) + rows_of(16, BIG - 16, seed=16)
    assert untouched_outside(big_rx.dst, BIG_BLOCKS)


@pytest.mark.parametrize("cut", [262_143, 262_144, 300_000])  # payload bytes sent: inside, at, after a piece
def test_a_stream_cut_in_a_later_piece_of_a_lane_frame_fails_the_request(big_rx, cut):
    h, client = opened(big_rx, "cut", BIG_BLOCKS, num_tokens=BIG)
    client.send(data_frame(0, 1, 0, BIG)[: 32 + cut])
    client.close()
    with pytest.raises(kvwire.PeerLost):
        h.wait(timeout=5)
    assert untouched_outside(big_rx.dst, BIG_BLOCKS)
    assert wait_until(lambda: big_rx.census()["lanes"] == 0, timeout=5)
    assert big_rx.stats()["lane_frames"] == 1


def test_frames_after_a_cancel_are_dropped_not_written(rx):
    h, client = opened(rx, "gone", [4, 5])
    client.send(data_frame(1, 0, 0))
    assert wait_until(lambda: rx.stats()["lane_frames"] == 1, timeout=5)
    h.cancel("changed my mind")
    before = snapshot(rx.dst)
    client.send(data_frame(2, 0, 0))
    assert wait_until(lambda: rx.stats()["late_frames"] == 1, timeout=5)
    assert snapshot(rx.dst) == before
    assert rx.stats()["lane_frames"] == 1


def test_a_helper_built_from_another_version_is_refused_by_name(monkeypatch):
    """The lane's table layout is written in lane.py and in _scatter.c: a helper whose
    layout differs must not be used with this Python side."""
    monkeypatch.setattr(lane._scatter, "LANE_FIELDS", lane.FIELDS + 1)
    with pytest.raises(ImportError, match="another version of kvwire/_scatter.c: reinstall kvwire"):
        lane.available()


@pytest.mark.parametrize("receive_lane", [True, False], ids=["lane", "python"])
def test_one_connection_never_runs_out_of_credit_with_a_window_under_two_frames(receive_lane):
    """A window of 52 KiB for 32 KiB frames (credit batch 13 KiB): the sender keeps
    credit for a frame only if the receiver never holds back a batch or more. The credit
    the lane owes and what Python owes (a layer's last frame comes back to Python) are
    one count: kept apart, each short of a batch, they held back 24 KiB and the transfer
    waited for its deadline."""
    dst = LAYOUT.allocate(64)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, slot_bytes=32768, window_bytes=53248,
                         receive_lane=receive_lane)  # fmt: skip
    src = filled(LAYOUT, 64, seed=3)
    try:
        h = rx.expect("tight", list(range(20, 31)), 176)  # per tensor: a 32 KiB frame and a 12 KiB one
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=1, chunk_bytes=32768) as tx:
            tx.send("tight", list(range(11)), 176, timeout=20)
        h.wait(timeout=10)
        if receive_lane:
            assert rx.stats()["lane_frames"] > 0
    finally:
        rx.close()
    assert_transferred(LAYOUT, src, list(range(11)), dst, list(range(20, 31)), 176)


class _FailsOnce(dict):
    """The receiver's counters, raising MemoryError once when the lane counts a frame it
    has claimed the rows of."""

    armed = False

    def __setitem__(self, key, value):
        if self.armed and key == "lane_frames":
            self.armed = False
            raise MemoryError("no memory for a counter")
        super().__setitem__(key, value)


def test_a_python_error_inside_the_lane_undoes_the_claim_and_fails_the_request(rx, caplog):
    """Out of memory (or a bug) after the lane claimed a frame's rows: the claim is undone
    as for a broken stream, the connection closes with the error in kvwire's log, and the
    request fails at once instead of waiting for rows that will never come."""
    rx._counters = _FailsOnce(rx._counters)
    h, client = opened(rx, "oom", [4, 5])
    rx._counters.armed = True
    client.send(data_frame(1, 0, 0))
    assert client.closed_by_peer(timeout=5)
    with pytest.raises(kvwire.PeerLost):
        h.wait(timeout=5)
    assert wait_until(lambda: rx.census()["requests"] == 0 and rx.census()["lanes"] == 0, timeout=5)
    assert any("its reader failed" in r.getMessage() and r.exc_info[0] is MemoryError for r in caplog.records)
    assert untouched_outside(rx.dst, [4, 5])


def test_a_python_error_in_the_lane_is_raised_as_itself_with_the_lock_released():
    import socket

    class NoTable:  # a lane without its table: a bug the lane meets under the receiver's lock
        pass

    a, b = socket.socketpair()
    lock = threading.Lock()
    try:
        b.sendall(data_frame(0, 0, 0))
        counters = {"frames": 0, "lane_frames": 0, "wire_bytes": 0}
        with pytest.raises(AttributeError, match="table"):
            lane.receive(a.fileno(), bytearray(HEADER_SIZE), {1: NoTable()}, lock, 1 << 20, 1 << 20, True, counters)
        assert not lock.locked()
    finally:
        a.close()
        b.close()


class _QueuesWhileHeld:
    """A stream's send lock that, as the lane releases it, has a control frame queued as if
    another thread's ``send_control`` had found the lock held meanwhile."""

    def __init__(self, stream, frame: bytes) -> None:
        self.stream, self.frame, self.inner = stream, frame, threading.Lock()

    def acquire(self, blocking=True, timeout=-1):
        return self.inner.acquire(blocking, timeout)

    def release(self):
        if self.frame is not None:
            with self.stream._outbox_lock:
                self.stream._outbox.append(self.frame)
                self.stream._outbox_bytes += len(self.frame)
            self.frame = None
        self.inner.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


def test_frames_queued_while_the_lane_wrote_its_credit_go_out_right_after(monkeypatch):
    """As every writer of the stream does: what another thread queued while the lane held
    the send lock goes out when the lane lets go of it, not at the reaper's next flush
    (held off here) or with a later frame."""
    from kvwire.engine import receiver as receiver_module

    monkeypatch.setattr(receiver_module, "REAPER_PERIOD_S", 30.0)
    dst = LAYOUT.allocate(32)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst, slot_bytes=8192, window_bytes=16384)
    try:
        h, client = opened(rx, "queued", [6, 7])
        conn = rx._conns[0]
        marker = conn.proto.credit(1)  # a CREDIT of one byte, told apart from every frame's
        conn.stream._send_lock = _QueuesWhileHeld(conn.stream, marker)
        credited = rx.stats()["lane_credits"]
        client.send(data_frame(0, 1, 0))
        assert wait_until(lambda: rx.stats()["lane_credits"] == credited + 1, timeout=5)
        frames = control_frames(client, until_ack=False, timeout=2)
        assert [h.start for h, _ in frames if h.type == FrameType.CREDIT][-2:] == [16 * ROW, 1]
    finally:
        rx.close()


@pytest.mark.parametrize("ending", ["deadline", "cancel"])
@pytest.mark.parametrize("loop", ["python", "lane"])
def test_a_request_that_ends_inside_a_payload_is_done_only_once_its_rows_are(rx, monkeypatch, loop, ending):
    """A request that ends (its deadline, a cancel) while a payload is being received into
    its rows: wait() returns only once nothing more can be written there. A sender that
    stalls inside the payload has that connection closed after DRAIN_LIMIT_S, and what it
    sends later lands nowhere."""
    from kvwire.engine import receiver as receiver_module

    monkeypatch.setattr(receiver_module, "DRAIN_LIMIT_S", 0.3)
    deadline = 1.0 if ending == "deadline" else 30.0
    if loop == "lane":
        h, client = opened(rx, "stall", [4, 5], deadline=deadline)
    else:  # the request's first frame: Python's loop receives it in place
        h = rx.expect("stall", [4, 5], 32, deadline=deadline)
        client = WireClient(rx.address, LAYOUT)
        client.send(client.proto.begin(1, "stall", 32))
    frame = data_frame(1, 0, 0)
    client.send(frame[: HEADER_SIZE + 100])  # the sender stops 100 bytes into the payload
    assert wait_until(lambda: h._request.writing.any(), timeout=5)
    if ending == "cancel":
        h.cancel("the decode gave up")
    with pytest.raises(kvwire.Cancelled if ending == "cancel" else kvwire.TransferTimeout):
        h.wait()
    assert h.done()
    before = snapshot(rx.dst)
    try:
        client.send(frame[HEADER_SIZE + 100 :])  # the rest, after wait() returned
    except OSError:
        pass  # the connection is closed already
    time.sleep(0.3)
    assert snapshot(rx.dst) == before
    assert rx.stats()["lane_frames"] == (0 if loop == "python" else 1)  # which loop had the stalled frame
    assert untouched_outside(rx.dst, [4, 5])
