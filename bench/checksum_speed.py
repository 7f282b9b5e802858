#!/usr/bin/env python3
"""CRC32C speed of one contiguous buffer: the crc32c package against kvwire's helper.

A sender checks cache rows just before it sends them, rows nobody has read since the
prefill wrote them: out of main memory. This times both implementations on buffers of
``--kib`` KiB taken in turn from ``--mib`` MiB (cold: each buffer read once per pass) and
on one buffer again and again (hot: out of the caches), the two alternating, three
passes each, and prints GB/s (1e9 bytes a second).

    python3 bench/checksum_speed.py [--kib 4096] [--mib 1024] [--passes 3]

With ``--received SPAN``, what a receiver's check costs right after the bytes land: 4 MiB
payloads come over a loopback connection from another process into spans of SPAN bytes
every ``--stride`` bytes (1024 and 2048: half rows; SPAN = stride: whole rows), and the
helper checks each payload after all of it landed, or each 256 KiB piece right after its
``recvmsg`` (as the receive lane does for short spans), in turn:

    python3 bench/checksum_speed.py --received 1024 --stride 2048
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import time

import numpy as np
from crc32c import crc32c as package

from kvwire.proto import frames
from kvwire.scatter import _scatter


def timed(fn, views) -> float:
    t0 = time.perf_counter()
    for v in views:
        fn(v)
    seconds = time.perf_counter() - t0
    return sum(v.nbytes for v in views) / seconds / 1e9


PAYLOAD = 4 << 20
PIECE = 256 << 10
AREAS = 8  # payloads land in these in turn: 32-64 MiB for half rows, more than the L3


def _send_payloads(port: int, count: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        payload = os.urandom(PAYLOAD)
        for _ in range(count):
            s.sendall(payload)


def received(span: int, stride: int, rounds: int) -> None:
    """The CRC of payloads just received into spans: after each payload, and piece by piece."""
    if stride < span or PIECE % span or span < PIECE // 1024:
        raise SystemExit(
            "--stride must be at least --received, which must divide 256 KiB and be 256 or more "
            "(the lane's pieces are 1024 spans at most)"
        )
    per_payload = PAYLOAD // span * stride
    memory = np.zeros(per_payload * AREAS, dtype=np.uint8)
    memory[::4096] = 1
    listener = socket.create_server(("127.0.0.1", 0))
    count = 2 * rounds * AREAS
    sender = mp.get_context("spawn").Process(target=_send_payloads, args=(listener.getsockname()[1], count))
    sender.start()
    conn, _ = listener.accept()
    seconds = {"after the payload": 0.0, "piece by piece": 0.0}
    areas = [np.array([[memory.ctypes.data + area * per_payload + o, span] for o in range(0, per_payload, stride)],
                      dtype=np.uint64) for area in range(AREAS)]  # fmt: skip
    cut = {"after the payload": [[iov] for iov in areas],
           "piece by piece": [np.split(iov, len(iov) // (PIECE // span)) for iov in areas]}  # fmt: skip
    n = 0
    for _ in range(rounds):
        for mode in seconds:
            for pieces in cut[mode]:
                for piece in pieces:
                    if _scatter.recvv(conn.fileno(), piece) != int(piece[:, 1].sum()):
                        raise SystemExit("the sending process stopped early")
                    t0 = time.perf_counter()
                    _scatter.crc32c(piece, 0)
                    seconds[mode] += time.perf_counter() - t0
                n += 1
    sender.join()
    conn.close()
    each = n // 2 * PAYLOAD
    print(f"CRC32C of 4 MiB payloads received into {span}-byte spans every {stride} bytes, GB/s of checking:")
    for mode, s in seconds.items():
        print(f"  {mode:18s} {each / s / 1e9:5.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kib", type=int, default=4096, help="buffer size (default 4096: kvwire's chunks on short paths)")
    p.add_argument("--mib", type=int, default=1024, help="memory walked for the cold figures (default 1024)")
    p.add_argument("--passes", type=int, default=3, help="(with --received: rounds of both modes)")
    p.add_argument("--received", type=int, metavar="SPAN", help="check payloads just received into SPAN-byte spans")
    p.add_argument("--stride", type=int, default=2048, help="with --received: bytes from one span to the next")
    args = p.parse_args()
    if _scatter is None or not _scatter.hardware():
        raise SystemExit("kvwire's helper is not built, or this CPU has no CRC32C instruction")
    if args.received:
        received(args.received, args.stride, args.passes)
        return
    size = args.kib << 10
    memory = np.random.default_rng(0).integers(0, 256, size=max(args.mib << 20, size), dtype=np.uint8)
    cold = [memory[o : o + size] for o in range(0, len(memory) - size + 1, size)]
    hot = [memory[:size]] * len(cold)
    if package(cold[0]) != _scatter.crc32c_buffer(cold[0]):
        raise SystemExit("the two implementations disagree")
    # the helper's call alone, and kvwire's crc32c (which chooses between the two per call)
    impls = {"crc32c package": package, "kvwire helper": _scatter.crc32c_buffer, "frames.crc32c": frames.crc32c}
    found: dict[tuple[str, str], list[float]] = {(n, k): [] for n in impls for k in ("cold", "hot")}
    for _ in range(args.passes):
        for name, fn in impls.items():
            found[name, "cold"].append(timed(fn, cold))
            found[name, "hot"].append(timed(fn, hot))
    print(f"CRC32C of {args.kib} KiB buffers, GB/s per pass (cold: {len(cold)} buffers in turn; hot: one)")
    for (name, kind), rates in found.items():
        print(f"  {name:15s} {kind:4s}  " + "  ".join(f"{r:5.1f}" for r in rates))


if __name__ == "__main__":
    main()
