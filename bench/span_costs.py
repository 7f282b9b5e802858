"""What a chunk of short spans costs the sender's kernel, against one contiguous buffer:
2 MiB chunks of a 64 MiB source (more than the L3 of the reference machine) go over one
loopback TCP connection to a draining process, through the compiled span helper
(``kvwire._scatter``), as one span, as 1 KiB spans side by side, as 1 KiB spans at a
2 KiB stride (half of each token's row: what a prefill rank sends each of two decode
ranks), or as 4 KiB spans side by side.

    python3 bench/span_costs.py [--rounds 3]

It prints GB/s and the sending thread's CPU seconds per GB (its own thread time: the
kernel's copy, TCP and the loopback delivery it does; the iovec arrays are built before
the timed window), each variant twice, alternating.
The difference between "1 KiB side by side" and "one span" is the kernel's cost per
iovec segment; between "side by side" and "half rows", the memory pattern's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import time

import numpy as np

from kvwire import scatter

SOURCE = 64 << 20
CHUNK = 2 << 20


def drain(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    buffer = memoryview(bytearray(4 << 20))
    while sock.recv_into(buffer):
        pass


def run(span: int, stride: int, rounds: int) -> tuple[float, float]:
    """GB/s and the sender's CPU s/GB of 2 MiB chunks sent as spans of ``span`` bytes,
    ``stride`` apart."""
    memory = np.random.default_rng(0).integers(0, 255, SOURCE, dtype=np.uint8)
    listener = socket.create_server(("127.0.0.1", 0))
    child = multiprocessing.get_context("fork").Process(target=drain, args=(listener.getsockname()[1],))
    child.start()
    conn, _ = listener.accept()
    count = CHUNK // span
    chunks = []  # the iovec arrays, built before the timed window: only the sends are timed
    for start in range(0, SOURCE - count * stride + 1, count * stride):
        iov = np.empty((count, 2), dtype=np.uint64)
        iov[:, 0] = memory.ctypes.data + start + np.arange(count) * stride
        iov[:, 1] = span
        chunks.append(scatter.Spans(iov, memory))
    total, cpu0, wall0 = 0, time.thread_time(), time.perf_counter()
    for _ in range(rounds * 16):
        for spans in chunks:
            scatter.send_parts(conn, [spans])
            total += CHUNK
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    conn.close()
    child.join()
    return total / wall / 1e9, cpu / total * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="passes over the 64 MiB source, x16")
    args = parser.parse_args()
    if not scatter.available():
        raise SystemExit("kvwire._scatter is not built here (it needs a C compiler when kvwire is installed)")
    variants = [
        ("one span of 2 MiB", CHUNK, CHUNK),
        ("1 KiB spans side by side", 1024, 1024),
        ("1 KiB spans, 2 KiB apart (half rows)", 1024, 2048),
        ("4 KiB spans side by side", 4096, 4096),
    ]
    print(f"{'2 MiB chunks sent as':40} {'GB/s':>6} {'sender CPU s/GB':>16}")
    for _ in range(2):
        for name, span, stride in variants:
            rate, cpu = run(span, stride, args.rounds)
            print(f"{name:40} {rate:6.2f} {cpu:16.3f}")


if __name__ == "__main__":
    main()
