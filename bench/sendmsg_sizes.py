"""What the size of each ``sendmsg`` costs on loopback, without kvwire: plain sockets
move 1 GiB round after round, either in 16 MiB ``sendall`` calls or framed as kvwire
frames them (a 40-byte header before each piece, the receiver reading the header, then
the payload with MSG_WAITALL), one piece per ``sendmsg`` or several gathered into one.

    python3 bench/sendmsg_sizes.py [--streams 4] [--rounds 4]

It prints GB/s and CPU seconds per GB of each side (user + system, whole process) for
each variant, alternating, twice. This model is why a kvwire writer gathers queued
chunks into one ``sendmsg`` (``GATHER_CHUNKS`` in ``kvwire/engine/sender.py``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import socket
import threading
import time

import numpy as np

GIB = 1 << 30
WHOLE = 16 << 20  # the plain variant's sendall size (one tensor of the loopback profile)
HEADER = 40


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def recv_exact(sock: socket.socket, view: memoryview, flags: int = 0) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got, flags)
        if not n:
            raise ConnectionError("the sender closed early")
        got += n


def receive(pipe, streams: int, rounds: int, piece: int) -> None:
    memory = np.ones(GIB, dtype=np.uint8)  # touched now, not during the first round
    flat = memoryview(memory)
    listener = socket.create_server(("127.0.0.1", 0))
    pipe.send(listener.getsockname()[1])
    conns = [listener.accept()[0] for _ in range(streams)]
    share = GIB // streams

    def drain(sock: socket.socket, base: int) -> None:
        header = memoryview(bytearray(HEADER))
        for _ in range(rounds):
            for offset in range(0, share, piece or WHOLE):
                if piece:
                    recv_exact(sock, header)
                    recv_exact(sock, flat[base + offset : base + offset + piece], socket.MSG_WAITALL)
                else:
                    recv_exact(sock, flat[base + offset : base + offset + WHOLE])
            sock.sendall(b"!")

    cpu0 = cpu_seconds()
    threads = [threading.Thread(target=drain, args=(c, i * share)) for i, c in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pipe.send(cpu_seconds() - cpu0)


def send_all(sock: socket.socket, parts: list[memoryview]) -> None:
    while parts:
        sent = sock.sendmsg(parts)
        while sent:
            if sent >= len(parts[0]):
                sent -= len(parts.pop(0))
            else:
                parts[0] = parts[0][sent:]
                sent = 0


def run(streams: int, rounds: int, piece: int, gather: int) -> tuple[float, float, float]:
    """GB/s, sender and receiver CPU s/GB of one variant (piece 0: 16 MiB sendall)."""
    here, there = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(target=receive, args=(there, streams, rounds, piece))
    child.start()
    port = here.recv()
    memory = np.random.default_rng(0).integers(0, 255, GIB, dtype=np.uint8)
    flat = memoryview(memory)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
    share = GIB // streams
    header = memoryview(bytes(HEADER))

    def pump(sock: socket.socket, base: int) -> None:
        for _ in range(rounds):
            if not piece:
                for offset in range(0, share, WHOLE):
                    sock.sendall(flat[base + offset : base + offset + WHOLE])
            else:
                offsets = list(range(0, share, piece))
                for i in range(0, len(offsets), gather):
                    parts: list[memoryview] = []
                    for offset in offsets[i : i + gather]:
                        parts += [header, flat[base + offset : base + offset + piece]]
                    send_all(sock, parts)
            if sock.recv(1) != b"!":
                raise ConnectionError("the receiver did not acknowledge")

    cpu0, t0 = cpu_seconds(), time.monotonic()
    threads = [threading.Thread(target=pump, args=(s, i * share)) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds, sender_cpu = time.monotonic() - t0, cpu_seconds() - cpu0
    receiver_cpu = here.recv()
    child.join()
    gb = rounds * GIB / 1e9
    return gb / seconds, sender_cpu / gb, receiver_cpu / gb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    variants = [("16 MiB sendall, no framing", 0, 1), ("2 MiB frames, one per sendmsg", 2 << 20, 1),
                ("2 MiB frames, 4 per sendmsg", 2 << 20, 4), ("2 MiB frames, 8 per sendmsg", 2 << 20, 8)]  # fmt: skip
    print(f"{'variant':32} {'GB/s':>6} {'sender s/GB':>12} {'receiver s/GB':>14}")
    for _ in range(2):
        for name, piece, gather in variants:
            rate, sender, receiver = run(args.streams, args.rounds, piece, gather)
            print(f"{name:32} {rate:6.2f} {sender:12.3f} {receiver:14.3f}")


if __name__ == "__main__":
    main()
