"""The compiled span helper (kvwire/_scatter.c through kvwire/scatter.py): CRC32C over
spans equals the crc32c package's over their concatenation; spans go through real
sockets whole, in order, across partial writes; errors are OSErrors, never silence."""

from __future__ import annotations

import socket
import threading
import time

import crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire import scatter
from kvwire.proto import frames

pytestmark = pytest.mark.skipif(
    not scatter.available(), reason="the compiled helper kvwire._scatter is not built in this environment"
)

MEMORY = np.random.default_rng(7).integers(0, 256, 1 << 20, dtype=np.uint8)


def spans_of(pieces: list[tuple[int, int]], memory: np.ndarray = MEMORY) -> scatter.Spans:
    iov = np.array([[memory.ctypes.data + offset, length] for offset, length in pieces], dtype=np.uint64)
    return scatter.Spans(iov.reshape(-1, 2), memory)


def joined(pieces: list[tuple[int, int]], memory: np.ndarray = MEMORY) -> bytes:
    return b"".join(memory[offset : offset + length].tobytes() for offset, length in pieces)


piece = st.tuples(st.integers(0, (1 << 20) - 4096), st.integers(0, 4096))
# Runs of equal lengths take the three-at-a-time path (64 bytes and more); others one at a time.
equal_run = st.tuples(st.integers(0, 4096), st.lists(st.integers(0, (1 << 20) - 4096), min_size=3, max_size=12)).map(
    lambda run: [(offset, run[0]) for offset in run[1]]
)


@settings(max_examples=200, deadline=None)
@given(runs=st.lists(st.one_of(st.lists(piece, max_size=4), equal_run), max_size=6), seed=st.integers(0, 2**32 - 1))
def test_crc32c_over_spans_is_the_crc32c_of_their_concatenation(runs, seed):
    pieces = [p for run in runs for p in run]
    assert spans_of(pieces).crc32c(seed) == crc32c.crc32c(joined(pieces), seed)


long_piece = st.integers(0, 4096).flatmap(lambda offset: st.tuples(st.just(offset), st.integers(0, (1 << 20) - offset)))


@settings(max_examples=100, deadline=None)
@given(pieces=st.lists(long_piece, min_size=1, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_crc32c_over_long_spans_cut_into_thirds_is_the_crc32c_of_their_concatenation(pieces, seed):
    # Spans of 12 KiB and more alone are checked as three streams; any length, any alignment.
    assert spans_of(pieces).crc32c(seed) == crc32c.crc32c(joined(pieces), seed)


@pytest.mark.parametrize("length", [3 * 4096 - 1, 3 * 4096, 6 * 4096 + 7, (1 << 20) - 3])
def test_crc32c_of_one_span_at_the_edges_of_the_cut(length):
    assert spans_of([(3, length)]).crc32c() == crc32c.crc32c(joined([(3, length)]))


KINDS = ["bytes", "bytearray", "memoryview", "array", "float32 rows", "float32 rows' memoryview"]


def as_kind(view: np.ndarray, kind: str):
    """``view``'s bytes as one of the buffers kvwire checks (rows of 4-byte items: ``len``
    and ``nbytes`` differ; whole items only)."""
    if kind.startswith("float32"):
        rows = view[: len(view) // 8 * 8].view(np.float32).reshape(-1, 2)
        return memoryview(rows) if kind.endswith("memoryview") else rows
    return {"bytes": view.tobytes(), "bytearray": bytearray(view.tobytes()), "memoryview": memoryview(view),
            "array": view}[kind]  # fmt: skip


def test_frames_crc32c_uses_the_helper_here():
    assert frames._helper is not None  # else the tests below compare the package with itself


def test_frames_crc32c_passes_over_a_helper_without_the_call_or_the_instruction():
    class Built:
        def __init__(self, hardware: bool, call: bool) -> None:
            self.hardware = lambda: hardware
            if call:
                self.crc32c_buffer = lambda data, value=0: 0

    assert frames.long_crc_helper(None) is None
    assert frames.long_crc_helper(Built(hardware=True, call=False)) is None  # built from an older _scatter.c
    assert frames.long_crc_helper(Built(hardware=False, call=True)) is None  # the byte table: slower
    helper = Built(hardware=True, call=True)
    assert frames.long_crc_helper(helper) is helper


@settings(max_examples=100, deadline=None)
@given(piece=long_piece, seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(KINDS))
def test_frames_crc32c_is_the_packages_on_either_side_of_the_helpers_threshold(piece, seed, kind):
    # kvwire.proto.frames.crc32c hands buffers of LONG_CRC_BYTES and more to the helper
    offset, length = piece
    data = as_kind(MEMORY[offset : offset + length], kind)
    assert frames.crc32c(data, seed) == crc32c.crc32c(memoryview(data).tobytes(), seed)
    assert frames.crc32c(data, np.uint32(seed)) == crc32c.crc32c(data, np.uint32(seed))


@pytest.mark.parametrize("length", [frames.LONG_CRC_BYTES - 1, frames.LONG_CRC_BYTES, frames.LONG_CRC_BYTES + 1])
def test_frames_crc32c_at_the_threshold(length):
    view = MEMORY[5 : 5 + length]
    assert frames.crc32c(view, 77) == crc32c.crc32c(view.tobytes(), 77)


def test_frames_crc32c_refuses_a_strided_buffer_on_either_side_of_the_threshold():
    for n in (1024, 2 * frames.LONG_CRC_BYTES):
        with pytest.raises(ValueError, match="contiguous"):
            frames.crc32c(MEMORY[: 2 * n : 2])


def test_token_spans_are_the_heads_of_each_token_in_selection_order():
    cache = MEMORY[: 16 * 8 * 4 * 64].reshape(16, 8, 4 * 64)  # blocks of 8 tokens, 4 heads of 64 bytes
    heads = cache.reshape(16, 8, 4, 64)[:, :, 1:3].reshape(16, 8, 128)  # heads 1 and 2: a strided view
    block_ids = [5, 0, 11, 3]
    spans = scatter.token_spans(heads, block_ids, 8, 6, 20)  # from inside the first block to inside the last
    want = b"".join(heads[block_ids[t // 8], t % 8].tobytes() for t in range(6, 26))
    assert spans.nbytes == 20 * 128 and spans.tobytes() == want


@settings(max_examples=200, deadline=None)
@given(
    block_size=st.sampled_from([1, 4, 8, 16]),
    order=st.permutations(range(12)),
    blocks_used=st.integers(1, 12),
    data=st.data(),
)
def test_block_and_token_spans_are_the_rows_of_the_selection(block_size, order, blocks_used, data):
    """The helper's spans (one per run of adjacent blocks; one per token for some heads)
    hold exactly the selection's rows, in token order, the runs as few as memory allows."""
    ids = np.array(order[:blocks_used], dtype=np.int64)
    start = data.draw(st.integers(0, blocks_used * block_size - 1))
    count = data.draw(st.integers(1, blocks_used * block_size - start))
    row = 48
    cache = MEMORY[: 12 * block_size * row].reshape(12, block_size * row)
    want = b"".join(cache[ids[t // block_size], (t % block_size) * row : (t % block_size + 1) * row].tobytes()
                    for t in range(start, start + count))  # fmt: skip
    spans = scatter.block_spans(cache, cache.ctypes.data, ids, block_size, start, count)
    assert spans.nbytes == count * row and spans.tobytes() == want
    positions = range(start // block_size, (start + count - 1) // block_size + 1)
    assert len(spans.iov) == 1 + sum(ids[p + 1] != ids[p] + 1 for p in positions[:-1])  # one per run
    heads = cache.reshape(12, block_size, 3, 16)[:, :, 1:].reshape(12, block_size, 32)  # 2 of 3 heads: strided
    spans = scatter.token_spans(heads, ids, block_size, start, count)
    want = b"".join(heads[ids[t // block_size], t % block_size].tobytes() for t in range(start, start + count))
    assert spans.nbytes == count * 32 and len(spans.iov) == count and spans.tobytes() == want


@pytest.mark.parametrize(
    "ids, start, count, message",
    [
        ([0, 12], 0, 16, "block id 12 outside 0..11"),  # a block past the cache
        ([0, -1], 0, 16, "block id -1 outside"),
        ([0, 1], 8, 16, "ids int64 covering every token"),  # tokens past the selection
    ],
)
def test_spans_never_leave_the_cache(ids, start, count, message):
    cache = np.zeros((12, 8 * 48), dtype=np.uint8)
    with pytest.raises(ValueError, match=message):
        scatter.block_spans(cache, cache.ctypes.data, ids, 8, start, count)
    with pytest.raises(ValueError, match="out has too few rows"):  # asked for fewer spans than there are
        scatter._rows(cache, cache.ctypes.data, 12, 8 * 48, 48, 16, [3, 1], 8, 0, 16, capacity=1)
    with pytest.raises(ValueError, match="inconsistent geometry"):  # a span longer than its row's stride
        scatter._rows(cache, cache.ctypes.data, 12, 8 * 48, 48, 64, [3, 1], 8, 0, 16, capacity=16)
    with pytest.raises(ValueError, match="inconsistent geometry"):  # rows past the end of their block
        scatter._rows(cache, cache.ctypes.data, 12, 8 * 48, 64, 48, [3, 1], 8, 0, 16, capacity=16)
    with pytest.raises(ValueError, match="inconsistent geometry"):  # a row stride whose product with 4 wraps to 0
        scatter._rows(cache, cache.ctypes.data, 12, 8 * 48, 1 << 62, 48, [3, 1], 4, 0, 8, capacity=16)
    for start, count in [(2**63 - 10, 20), (2**62, 2**62)]:  # tokens whose end wraps past the largest size
        with pytest.raises(ValueError, match="inconsistent geometry"):
            scatter._rows(cache, cache.ctypes.data, 12, 8 * 48, 48, 48, [3, 1], 8, start, count, capacity=16)


def test_spans_cross_a_socket_whole_through_partial_writes():
    pieces = [(o, 1000) for o in range(0, 900_000, 1500)] + [(17, 3), (5000, 0), (900_001, 4095)]
    out = np.zeros_like(MEMORY)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # many partial writes
    with a, b:
        sender = threading.Thread(target=scatter.send_parts, args=(a, [b"head", spans_of(pieces), memoryview(b"t")]))
        sender.start()
        assert b.recv(4, socket.MSG_WAITALL) == b"head"
        got = scatter.recv_spans(b, spans_of(pieces, out))
        assert b.recv(1) == b"t"
        sender.join(10)
    assert got == sum(n for _, n in pieces)
    assert joined(pieces, out) == joined(pieces)


def test_a_peer_that_closes_early_leaves_fewer_bytes_and_one_that_never_reads_times_out():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x" * 100)
        a.close()
        assert scatter.recv_spans(b, spans_of([(0, 60), (1000, 60)], np.zeros_like(MEMORY))) == 100
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(0.2)  # a non-blocking socket with a timeout: the helper waits that long, no more
        with pytest.raises(OSError, match="timed out"):
            scatter.send_parts(a, [spans_of([(0, 1 << 20)])] * 16)


def test_a_signal_while_spans_wait_runs_its_handler():
    """A signal arriving while the helper waits in the main thread runs its Python handler
    at once, as socket.recv_into would (PEP 475): one that raises ends the call with its
    error; one that returns lets it go on where it was, and every byte still arrives."""
    import signal

    class Alarm(Exception):
        pass

    def raising(*_):
        raise Alarm

    calls: list[int] = []
    previous = signal.signal(signal.SIGALRM, raising)
    try:
        a, b = socket.socketpair()
        with a, b:
            signal.setitimer(signal.ITIMER_REAL, 0.2)  # nobody ever sends: only the handler ends the wait
            t0 = time.monotonic()
            with pytest.raises(Alarm):
                scatter.recv_spans(b, spans_of([(0, 64)], np.zeros_like(MEMORY)))
            assert time.monotonic() - t0 < 5
        signal.signal(signal.SIGALRM, lambda *_: calls.append(1))
        a, b = socket.socketpair()
        out = np.zeros_like(MEMORY)
        with a, b:
            a.sendall(b"x" * 100)  # half of the spans before the signal, half after it
            later = threading.Timer(0.6, a.sendall, (b"y" * 100,))
            later.start()
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            got = scatter.recv_spans(b, spans_of([(0, 60), (1000, 140)], out))
            later.join()
        assert calls and got == 200
        assert joined([(0, 60), (1000, 140)], out) == b"x" * 100 + b"y" * 100
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_closed_socket_and_a_malformed_iov_are_errors():
    a, b = socket.socketpair()
    b.close()
    with a, pytest.raises(OSError):
        scatter.send_parts(a, [spans_of([(0, 1 << 20)])] * 8)
    with pytest.raises(ValueError, match="iov"):
        scatter.Spans(np.zeros(3, dtype=np.uint64), None)
    with pytest.raises(ValueError, match="iov"):  # the helper checks too: 24 bytes are not [address, length] rows
        scatter._scatter.crc32c(np.zeros(3, dtype=np.uint64))


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(0, 40),
    parts=st.lists(st.integers(0, 300), min_size=1, max_size=8),
    stride_pad=st.integers(0, 64),
    uneven=st.booleans(),
)
def test_crc32c_together_is_each_lists_crc32c(rows, parts, stride_pad, uneven):
    """Several lists of spans sharing their rows (each list a part of every row, as decode
    ranks' heads of each token are) give each list's own CRC32C, read together: any part
    sizes (zero included), any number of rows (fewer than three: one list at a time),
    and lists whose spans differ in length (also one at a time)."""
    stride = sum(parts) + stride_pad
    starts = [sum(parts[:j]) for j in range(len(parts))]
    lists = [[(r * stride + start, size) for r in range(rows)] for start, size in zip(starts, parts)]
    if uneven and rows > 3:
        lists[0][1] = (lists[0][1][0], max(parts[0] - 1, 0))
    iovs = [spans_of(pieces) for pieces in lists]
    assert scatter.crc32c_together(iovs) == tuple(crc32c.crc32c(joined(pieces)) for pieces in lists)


@pytest.mark.parametrize("rows", [3000, 3001, 3002])
def test_crc32c_together_over_thirds_of_megabytes(rows):
    # Real chunks join thirds of 700 KiB and more: shifts by large lengths (every row here
    # is the same megabyte's bytes: spans may overlap, lists need not be apart).
    lists = [[(start, size)] * rows for start, size in ((0, 1024), (1024, 1000), (4096, 333))]
    lists[0] = [(r * 97 % 4000, 1024) for r in range(rows)]
    want = tuple(crc32c.crc32c(joined(pieces)) for pieces in lists)
    assert scatter.crc32c_together([spans_of(pieces) for pieces in lists]) == want


def test_crc32c_together_refuses_what_it_cannot_read():
    one = spans_of([(0, 100), (200, 100)])
    with pytest.raises(ValueError, match="has 1 spans, the first 2"):
        scatter.crc32c_together([one, spans_of([(0, 100)])])
    with pytest.raises(ValueError, match="1 to 8 iov arrays, got 9"):
        scatter.crc32c_together([one] * 9)
    with pytest.raises(ValueError, match="1 to 8 iov arrays, got 0"):
        scatter.crc32c_together([])
    with pytest.raises(ValueError, match="iov"):  # the second is not [address, length] rows: the first is let go
        scatter._scatter.crc32c_together([one.iov, np.zeros(3, dtype=np.uint64)])
    with pytest.raises(TypeError, match="list or tuple"):  # an array of rows is not a list of arrays
        scatter._scatter.crc32c_together(one.iov)
    assert scatter.TOGETHER_MAX == scatter._scatter.TOGETHER_MAX


def test_crc32c_over_many_span_lengths_from_many_threads():
    """Runs of three equal spans use a table per length (48 kept, the rest built per
    call): 64 lengths from 8 threads at once all give the crc32c package's answer."""
    lengths = list(range(64, 64 + 64 * 97, 97))
    failures: list[int] = []

    def check(offset: int) -> None:
        for n in lengths:
            pieces = [(offset + k * 5000, n) for k in range(6)]
            if spans_of(pieces).crc32c(n) != crc32c.crc32c(joined(pieces), n):
                failures.append(n)

    threads = [threading.Thread(target=check, args=(i * 1000,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_a_tcp_stream_takes_spans_alone_and_never_over_tls():
    """Spans go to the socket through the helper, which would bypass TLS: a TLS stream
    refuses them before any byte moves, and a plain one receives them alone."""
    import ssl

    from kvwire.transport.tcp import TcpStream

    a, b = socket.socketpair()
    with a, b:
        stream = TcpStream(a, "pair")
        with pytest.raises(ValueError, match="spans are received alone"):
            stream.recv_into_views([spans_of([(0, 8)], np.zeros_like(MEMORY)), memoryview(bytearray(8))])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        tls = TcpStream(context.wrap_socket(b, do_handshake_on_connect=False), "tls pair")
        with pytest.raises(ValueError, match="spans cannot go over TLS"):
            tls.send_parts([b"header", spans_of([(0, 64)])])
        with pytest.raises(ValueError, match="not over TLS"):
            tls.recv_into_views([spans_of([(0, 8)], np.zeros_like(MEMORY))])
        assert tls.bytes_sent == 0


@settings(max_examples=150, deadline=None)
@given(
    gaps=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 3000)), max_size=12),
    shift=st.integers(0, 63),
    seed=st.integers(0, 2**32 - 1),
)
def test_copy_out_puts_the_buffer_in_its_spans_and_nothing_else(gaps, shift, seed):
    """The receive lane's copy out of its bounce buffer (stores that bypass the cache on
    x86-64): any span lengths (zero, under a line, thousands), at any alignment, each
    gets its bytes in order; the bytes between them are left as they were."""
    out = np.zeros(shift + sum(gap + length for gap, length in gaps) + 64, dtype=np.uint8)
    at, pieces = shift, []
    for gap, length in gaps:
        pieces.append((at + gap, length))
        at += gap + length
    data = np.random.default_rng(seed).integers(0, 256, sum(length for _, length in gaps), dtype=np.uint8)
    assert scatter._scatter.copy_out(data, spans_of(pieces, out).iov) == len(data)
    want = np.zeros_like(out)
    offset = 0
    for start, length in pieces:
        want[start : start + length] = data[offset : offset + length]
        offset += length
    assert bytes(out) == bytes(want)


def test_copy_out_refuses_spans_that_do_not_take_the_buffer():
    out = np.zeros(100, dtype=np.uint8)
    with pytest.raises(ValueError, match="the spans take 60 bytes, the buffer holds 50"):
        scatter._scatter.copy_out(bytes(50), spans_of([(0, 30), (40, 30)], out).iov)
    assert not out.any()


@pytest.mark.skipif(scatter._scatter is None, reason="the C helper was not built")
def test_span_lists_whose_lengths_wrap_are_refused_by_every_writer():
    """Lengths that sum past 2^64 to exactly what a call expects (here 2^64 - 16 and then
    16 + 64 bytes: 64 mod 2^64) are refused before anything is written, by copy_out and
    by the decoders that write into spans."""
    h = scatter._scatter
    a, b = np.zeros(64, np.uint8), np.zeros(80, np.uint8)
    wrapping = np.array([[a.ctypes.data, 2**64 - 16], [b.ctypes.data, 80]], dtype=np.uint64)
    with pytest.raises(ValueError, match="spans: more than .* bytes in all"):
        h.copy_out(bytes(64), wrapping)
    words, bits, params = np.zeros((1, 4), np.uint16), np.full(4, 4, np.uint8), np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="spans: more than .* bytes in all"):  # 16 rows of 4 fp32 channels
        h.key_decode(words, bits, params, params, np.zeros(4, np.float32), 0, wrapping)
    table = np.zeros(256, np.float32)
    with pytest.raises(ValueError, match="spans: more than .* bytes in all"):  # 2 rows of 8 fp32 values
        h.fp8_dequantize(np.zeros(16, np.uint8), 8, np.ones(2, np.float32), table, np.zeros(8, np.float32), 0, wrapping)
    assert not a.any() and not b.any()


def test_spans_cut_gives_the_bytes_of_the_cut_and_refuses_what_lies_outside():
    """Any cut of spans of any lengths (an empty span among them) holds the same bytes as
    the joined spans' slice; a cut past either end is refused with both bounds named."""
    data = np.arange(200, dtype=np.uint8)
    pieces = [(0, 30), (40, 0), (50, 1), (60, 70), (140, 45)]
    spans = scatter.Spans(np.array([[data.ctypes.data + a, n] for a, n in pieces], dtype=np.uint64), data)
    whole = spans.tobytes()
    for start in range(0, len(whole) + 1, 7):
        for nbytes in (0, 1, 29, 31, len(whole) - start):
            if start + nbytes <= len(whole):
                cut = spans.cut(start, nbytes)
                assert cut.tobytes() == whole[start : start + nbytes] and cut.nbytes == nbytes
    with pytest.raises(ValueError, match="cut: bytes 140 to 147 of spans holding 146"):
        spans.cut(140, 7)
    with pytest.raises(ValueError, match="cut: bytes -1 to 9 of spans holding 146"):
        spans.cut(-1, 10)


@pytest.mark.skipif(scatter._scatter is None, reason="the C helper was not built")
def test_copy_out_refuses_no_spans():
    with pytest.raises(TypeError, match="copy_out: spans, not None"):
        scatter._scatter.copy_out(bytes(4), None)
