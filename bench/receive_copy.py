"""What receiving into a decode rank's rows costs, straight into them or through a small
buffer: a draining peer's bytes arrive over one loopback TCP connection into the spans of
a 1 GiB cache (far larger than the last-level cache, each span written once per pass),
256 KiB at a time, each piece's CRC32C taken as the receive lane takes it:

* ``into the rows``: ``recvmsg`` straight into the spans, the CRC then read back from them
  (what the lane did before it had a bounce buffer, and does where the helper has no
  stores that bypass the cache);
* ``through 256 KiB``: ``recv_into`` a 256 KiB buffer that stays in the core's cache, the
  CRC taken there, then ``copy_out`` (stores that bypass the cache) into the spans (what
  the lane does, kvwire/_scatter.c ``recv_bounced``);

each into whole rows (spans of 32 KiB: a block of 16 tokens of 8 heads of 128 bf16
values) and into half rows (1 KiB spans 2 KiB apart: the heads one of two prefill ranks
sends).

    python3 bench/receive_copy.py [--passes 2] [--no-crc]

It prints GB/s and the receiving thread's CPU seconds per GB (its own thread time: the
kernel's copy, the CRC, the copy out; the iovec arrays are built before the timed
window), each variant twice, alternating. The peer sends from a 4 MiB buffer in cache.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from kvwire import scatter  # noqa: E402
from kvwire.scatter import _scatter  # noqa: E402

CACHE = 1 << 30
PIECE = 256 << 10
ROW = 2048  # bytes of one token's row: 8 heads of 128 bf16 values
BLOCK = 16 * ROW


def pour(port: int) -> None:
    """Send from a buffer in cache until the receiver hangs up."""
    data = np.random.default_rng(1).integers(0, 255, 4 << 20, dtype=np.uint8)
    with socket.create_connection(("127.0.0.1", port)) as s:
        try:
            while True:
                s.sendall(data)
        except OSError:
            pass


def pieces(cache: np.ndarray, span: int, stride: int) -> list[np.ndarray]:
    """The spans of one pass over the cache, cut into iovec arrays of PIECE bytes."""
    per = PIECE // span
    starts = cache.ctypes.data + np.arange(0, CACHE, stride, dtype=np.uint64)
    out = []
    for i in range(0, len(starts), per):
        iov = np.empty((len(starts[i : i + per]), 2), dtype=np.uint64)
        iov[:, 0], iov[:, 1] = starts[i : i + per], span
        out.append(iov)
    return out


def run(conn: socket.socket, iovs: list[np.ndarray], bounced: bool, crc: bool, passes: int) -> tuple[float, float]:
    """GB/s and the receiving thread's CPU s/GB of ``passes`` passes over ``iovs``."""
    buffer = bytearray(PIECE)
    fd, total = conn.fileno(), 0
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for _ in range(passes):
        for iov in iovs:
            n = int(iov[:, 1].sum())
            if bounced:
                view = memoryview(buffer)[:n]
                got = 0
                while got < n:
                    more = conn.recv_into(view[got:], n - got, socket.MSG_WAITALL)
                    if not more:
                        raise ConnectionError("the peer closed the connection")
                    got += more
                if crc:
                    _scatter.crc32c_buffer(view)
                _scatter.copy_out(view, iov)
            else:
                _scatter.recvv(fd, iov)
                if crc:
                    _scatter.crc32c(iov)
            total += n
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    return total / wall / 1e9, cpu / total * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=2, help="passes over the 1 GiB cache per variant")
    parser.add_argument("--no-crc", action="store_true", help="receive and copy only")
    args = parser.parse_args()
    if not scatter.available() or not _scatter.STREAMING_STORES:
        raise SystemExit("needs kvwire._scatter built on x86-64 (the stores that bypass the cache)")
    cache = np.zeros(CACHE, dtype=np.uint8)
    cache[::4096] = 1  # every page touched before the timed window
    listener = socket.create_server(("127.0.0.1", 0))
    peer = multiprocessing.get_context("fork").Process(target=pour, args=(listener.getsockname()[1],))
    peer.start()
    conn, _ = listener.accept()
    rows = {"whole rows": pieces(cache, BLOCK, BLOCK), "half rows": pieces(cache, ROW // 2, ROW)}
    run(conn, rows["whole rows"], False, False, 1)  # one pass to warm up (the cache's pages, the peer): not printed
    print(f"{'received':32} {'GB/s':>6} {'receiver CPU s/GB':>18}")
    try:
        for _ in range(2):
            for pattern, iovs in rows.items():
                for bounced in (False, True):
                    rate, cpu = run(conn, iovs, bounced, not args.no_crc, args.passes)
                    how = "through 256 KiB" if bounced else "into the rows"
                    print(f"{pattern + ', ' + how:32} {rate:6.2f} {cpu:18.3f}")
    finally:
        conn.close()
        peer.join()


if __name__ == "__main__":
    main()
