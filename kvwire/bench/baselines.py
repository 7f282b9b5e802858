"""The plain-socket baselines of ``kvwire-bench loopback --baseline``: the same bytes, the
same number of connections, no kvwire, so the ratio is measured in the same run."""

from __future__ import annotations

import os
import socket
import time

import numpy as np

from kvwire.bench.procstats import cpu_seconds, machine_delta, machine_ticks
from kvwire.proto.frames import crc32c
from kvwire.threads import Thread

BUFFER = 1 << 20


def byte_range(views: list[memoryview], start: int, stop: int) -> list[memoryview]:
    """The bytes ``[start, stop)`` of the concatenation of ``views``, repeated as often as
    it takes, as sub-views: a baseline moves every byte it is credited with, reading (and
    writing) its memory again when they outnumber it (a codec's wire bytes may)."""
    total = sum(len(v) for v in views)
    if total == 0:
        if stop > start:
            raise ValueError(f"byte_range: no memory to move {stop - start} bytes from")
        return []
    out = []
    lap = start // total * total
    while lap < stop:
        offset = lap
        for v in views:
            lo, hi = max(start, offset), min(stop, offset + len(v))
            if lo < hi:
                out.append(v[lo - offset : hi - offset])
            offset += len(v)
        lap += total
    return out


def shares(nbytes: int, streams: int) -> list[tuple[int, int]]:
    bounds = [nbytes * i // streams for i in range(streams + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


# The plain-socket baselines of --baseline, each moving the same bytes over the same
# number of connections, with one 1-byte acknowledgement per connection at the end:
BASELINES = {
    # from the sender's caches straight into the receiver's: no framing, no checks
    "cache": "plain sockets, cache to cache",
    # one reused 1 MiB buffer per side, as ``iperf3 -l 1M``: cache-hot, the most favourable
    "hot": "plain sockets, hot 1 MiB buffer",
    # cache to cache, doing only what the design's rule makes every kvwire byte cost: the
    # sender sends each 2 MiB piece behind its CRC32C (4 bytes), the receiver receives it
    # into a reused buffer, checks it and copies it into the caches. The ceiling for any
    # transfer that checks every byte before it reaches the destination.
    "checked": "plain sockets + CRC32C + copy",
    # cache to cache, each 2 MiB piece behind its CRC32C, received straight into the
    # caches and checked there: what kvwire's rule costs now that a payload may land in
    # place before it is verified (the ceiling for kvwire with checksum="crc32c")
    "in_place": "plain sockets + CRC32C in place",
}
CHECKED_PIECE = 2 << 20  # kvwire's default chunk; the checked baselines take the run's chunk size
CHECKED = ("checked", "in_place")  # the baselines that cut pieces, each behind its CRC32C


def pieces(views: list[memoryview], size: int) -> list[memoryview]:
    return [v[o : o + size] for v in views for o in range(0, len(v), size)]


def receive(listener: socket.socket, streams: int, nbytes: int, kind: str, memory,
            piece: int = CHECKED_PIECE) -> dict:  # fmt: skip
    """The receiving half of a plain-socket baseline (see ``BASELINES``); the checked
    ones cut the bytes into ``piece``-byte pieces, as kvwire cuts its chunks in the run."""
    conns = [listener.accept()[0] for _ in range(streams)]
    cpu0 = cpu_seconds()

    def recv_exact(sock: socket.socket, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = sock.recv_into(view[got:])
            if not n:
                raise ConnectionError("baseline sender closed early")
            got += n

    def drain(sock: socket.socket, start: int, stop: int) -> None:
        if kind == "hot":
            buf = memoryview(bytearray(BUFFER))
            for o in range(start, stop, BUFFER):
                recv_exact(sock, buf[: min(BUFFER, stop - o)])
        elif kind == "in_place":
            crc = memoryview(bytearray(4))
            for view in pieces(byte_range(memory, start, stop), piece):
                recv_exact(sock, crc)
                recv_exact(sock, view)
                if crc32c(view) != int.from_bytes(crc, "little"):
                    raise ConnectionError("in-place baseline: checksum mismatch")
        elif kind == "checked":
            staging = np.empty(piece, dtype=np.uint8)
            crc = memoryview(bytearray(4))
            for view in pieces(byte_range(memory, start, stop), piece):
                n = len(view)
                recv_exact(sock, crc)
                recv_exact(sock, staging[:n].data)
                if crc32c(staging[:n]) != int.from_bytes(crc, "little"):
                    raise ConnectionError("checked baseline: checksum mismatch")
                np.frombuffer(view, dtype=np.uint8)[:] = staging[:n]
        else:
            for view in byte_range(memory, start, stop):
                recv_exact(sock, view)
        sock.sendall(b"!")  # the same end-to-end acknowledgement kvwire waits for

    # named for the kernel too, as kvwire's threads are: a system-wide profile tells them apart
    threads = [Thread(drain, f"plain-recv-{i}", (c, a, b))
               for i, (c, (a, b)) in enumerate(zip(conns, shares(nbytes, streams)))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    return {"cpu_s": cpu_seconds() - cpu0}


def send(address, streams: int, nbytes: int, kind: str, memory, piece: int = CHECKED_PIECE,
         sndbuf: int | None = None) -> dict:  # fmt: skip
    """The sending half of :func:`receive`; ``sndbuf``: each socket's SO_SNDBUF (None: the
    kernel's autotuning, as the targets define the baselines)."""
    socks = [socket.create_connection(tuple(address)) for _ in range(streams)]
    if sndbuf is not None:
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    hot = memoryview(bytearray(os.urandom(BUFFER)))
    cpu0, machine0 = cpu_seconds(), machine_ticks()

    def pump(sock: socket.socket, start: int, stop: int) -> None:
        if kind == "hot":
            for o in range(start, stop, BUFFER):
                sock.sendall(hot[: min(BUFFER, stop - o)])
        elif kind in CHECKED:
            for view in pieces(byte_range(memory, start, stop), piece):
                sock.sendall(crc32c(view).to_bytes(4, "little"))
                sock.sendall(view)
        else:
            for view in byte_range(memory, start, stop):
                sock.sendall(view)
        if sock.recv(1) != b"!":
            raise ConnectionError("baseline receiver did not acknowledge")

    threads = [Thread(pump, f"plain-send-{i}", (s, a, b))
               for i, (s, (a, b)) in enumerate(zip(socks, shares(nbytes, streams)))]  # fmt: skip
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    for s in socks:
        s.close()
    machine = machine_delta(machine0, machine_ticks())
    return {"seconds": seconds, "cpu_s": cpu_seconds() - cpu0, "machine_ticks": machine,
            "piece_bytes": piece if kind in CHECKED else None}  # fmt: skip


# -- the parent ----------------------------------------------------------------------------
