#!/usr/bin/env python3
"""What checking every byte costs on loopback, without any protocol around it.

Four connections move 1 GiB from one process's memory into another's, each connection
a thread that does only the listed work per piece; modes alternate so that the
machine's noise hits them all alike. ``plain`` is the baseline every ratio refers to.

    python3 bench/checksum_ceiling.py                  # every mode, 3 repetitions
    python3 bench/checksum_ceiling.py plain crc+copy   # a subset (the first is the baseline)

Modes: ``plain`` (recv straight into the destination), ``copy`` (into a reused buffer,
then copied), ``crc`` / ``crc+copy`` (CRC32C on both sides, without / with that copy),
``crc+copy-256k`` (the same in 256 KiB pieces, to keep them in cache), and, when the
``xxhash`` package is installed, ``xxh3`` / ``xxh3+copy`` (XXH3-64 instead of CRC32C).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import sys
import threading
import time

import numpy as np
from crc32c import crc32c

TOTAL = 1 << 30
STREAMS = 4
FRAME = 2 << 20

MODES: dict[str, tuple] = {  # name: (checksum, through a buffer, piece size)
    "plain": (None, False, FRAME),
    "copy": (None, True, FRAME),
    "crc": (crc32c, False, FRAME),
    "crc+copy": (crc32c, True, FRAME),
    "crc+copy-256k": (crc32c, True, 256 << 10),
}
try:
    import xxhash

    MODES["xxh3"] = (xxhash.xxh3_64_intdigest, False, FRAME)
    MODES["xxh3+copy"] = (xxhash.xxh3_64_intdigest, True, FRAME)
except ImportError:
    pass


def receive(mode: str, ports: mp.Queue, cpu: mp.Queue) -> None:
    check, buffered, piece = MODES[mode]
    dest = np.empty(TOTAL, np.uint8)
    dest[::4096] = 1  # touch every page first, as a cache allocated in advance is
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(STREAMS)
    ports.put(listener.getsockname()[1])
    conns = [listener.accept()[0] for _ in range(STREAMS)]
    share = TOTAL // STREAMS

    def drain(i: int, sock: socket.socket) -> None:
        buf = np.empty(piece, np.uint8)
        offset, end = i * share, (i + 1) * share
        while offset < end:
            n = min(piece, end - offset)
            target = buf[:n] if buffered else dest[offset : offset + n]
            view, got = target.data, 0
            while got < n:
                got += sock.recv_into(view[got:], n - got)
            if check is not None:
                check(target)
            if buffered:
                dest[offset : offset + n] = target
            offset += n

    c0 = time.process_time()
    threads = [threading.Thread(target=drain, args=(i, s)) for i, s in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu.put(time.process_time() - c0)


def send(mode: str, port: int, src: np.ndarray) -> tuple[float, float]:
    check, _, piece = MODES[mode]
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(STREAMS)]
    share = TOTAL // STREAMS

    def pump(i: int, sock: socket.socket) -> None:
        offset, end = i * share, (i + 1) * share
        while offset < end:
            n = min(FRAME, end - offset)
            view = src[offset : offset + n]
            if check is not None:
                for p in range(0, n, piece):
                    check(view[p : p + piece])
            sock.sendall(view)
            offset += n

    t0, c0 = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=pump, args=(i, s)) for i, s in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return t0, time.process_time() - c0


def main(argv: list[str]) -> int:
    modes = argv or list(MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"unknown mode(s) {unknown}; choose from {list(MODES)}", file=sys.stderr)
        return 2
    ctx = mp.get_context("fork")
    src = np.random.default_rng(0).integers(0, 256, TOTAL, dtype=np.uint8)
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for _ in range(3):
        for mode in modes:
            ports, cpu = ctx.Queue(), ctx.Queue()
            rx = ctx.Process(target=receive, args=(mode, ports, cpu))
            rx.start()
            t0, tx_cpu = send(mode, ports.get(), src)
            rx_cpu = cpu.get()  # the receiver has every byte
            seconds = time.perf_counter() - t0
            rx.join()
            results[mode].append((TOTAL / seconds / 1e9, (tx_cpu + rx_cpu) / (TOTAL / 1e9)))
    base = max(g for g, _ in results[modes[0]])
    print(f"{'mode':15s} {'best GB/s':>9s} {'ratio':>6s} {'CPU s/GB':>8s}  all runs")
    for mode in modes:
        best = max(g for g, _ in results[mode])
        cpu_per_gb = min(c for _, c in results[mode])
        runs = ", ".join(f"{g:.2f}" for g, _ in results[mode])
        print(f"{mode:15s} {best:9.2f} {best / base:6.2f} {cpu_per_gb:8.3f}  {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
