"""``kvwire-bench flood``: expected transfers while another peer attacks the receiver.

Phases, each timing ``--transfers`` well-behaved transfers from a sender connected
beforehand: no attack (the baseline); an authenticated peer flooding requests nobody
expects; slowloris connections dribbling a byte a second; idle sockets that never start
TLS; all three at once. The attacker runs in its own process and, for the raw sockets,
from another loopback address (127.0.0.2), as a hostile host would. The receiver's
limits are its defaults. A new connection from the well-behaved host is also timed in
each phase.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import threading
import time

import kvwire
from kvwire.bench import profiles
from kvwire.proto import FrameType, Header

SECRET = "kvwire-flood-secret"
ATTACKS = ("none", "unexpected", "slowloris", "idle-tls", "all")
ATTACKER_HOST = "127.0.0.2"  # loopback too, but another host as far as the receiver can tell


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="llama3-8b", choices=sorted(profiles.PROFILES), help="model profile")
    p.add_argument("--tokens", type=int, default=128, help="tokens per transfer (default 128: 16 MiB for llama3-8b)")
    p.add_argument("--transfers", type=int, default=10, help="timed transfers per phase (default 10)")
    p.add_argument("--sockets", type=int, default=300, help="slowloris and idle-TLS sockets each (default 300)")
    p.add_argument("--no-tls", action="store_true", help="plain TCP (the idle-TLS phase is then skipped)")


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("tokens", "transfers", "sockets"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: must be at least 1, got {getattr(args, name)}")


def _tls_contexts():
    """Server and client contexts from a throwaway CA (the ``trustme`` package), and the
    CA's PEM (a context does not cross to another process; the PEM does)."""
    try:
        import trustme
    except ImportError:
        return None
    import ssl

    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_pem = ca.cert_pem.bytes().decode()
    return server, _client_context(ca_pem), ca_pem


def _client_context(ca_pem: str | None):
    if ca_pem is None:
        return None
    import ssl

    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)


# -- the attacker process ----------------------------------------------------------------------
def attacker_main(attack: str, address, profile: str, sockets: int, ca_pem, stop, ready) -> None:
    client_tls = _client_context(ca_pem)
    jobs: list[tuple] = []
    if attack in ("unexpected", "all"):
        jobs.append((_flood_unexpected, (address, profile, client_tls, stop)))
    if attack in ("slowloris", "all"):
        jobs.append((_hold_sockets, (address, sockets, True, stop)))
    if attack in ("idle-tls", "all"):
        jobs.append((_hold_sockets, (address, sockets, False, stop)))
    started = [threading.Event() for _ in jobs]
    for (target, args), event in zip(jobs, started):
        threading.Thread(target=target, args=(*args, event), daemon=True).start()
    for event in started:
        event.wait(60)
    ready.set()  # every attack is under way: the timed transfers may start
    stop.wait()


def _flood_unexpected(address, profile: str, client_tls, stop, started) -> None:
    """A peer with the secret sending small requests nobody will ever expect, as fast as
    the receiver lets it."""
    layout = profiles.get(profile).layout()
    caches = layout.allocate(1)
    states = layout.allocate_states()
    i = 0
    while not stop.is_set():
        try:
            with kvwire.Sender(layout, address, secret=SECRET, kv_caches=caches, streams=2, tls=client_tls) as tx:
                while not stop.is_set():
                    t = tx.transfer(f"flood-{i}", [0], 1, states=states, deadline=5)
                    i += 1
                    for layer in range(layout.num_layers):
                        t.send_layer(layer)
                    started.set()
        except (kvwire.TransferError, ValueError):
            time.sleep(0.1)


def _hold_sockets(address, count: int, dribble: bool, stop, started) -> None:
    """Keep ``count`` connections open from the attacker's address: with ``dribble``, each
    sends a valid header announcing a large HELLO, then a byte a second (slowloris);
    otherwise they stay silent (a TLS receiver waits for a ClientHello that never comes)."""
    header = Header(FrameType.HELLO, length=60000).pack()
    socks: list[socket.socket | None] = [None] * count
    while not stop.is_set():
        for i in range(count):
            s = socks[i]
            try:
                if s is None:
                    s = socket.socket()
                    s.bind((ATTACKER_HOST, 0))
                    s.settimeout(2)
                    s.connect(tuple(address))
                    s.setblocking(False)
                    if dribble:
                        s.send(header)
                    socks[i] = s
                elif dribble:
                    s.send(b"{")
                elif s.recv(1) == b"":  # closed by the receiver: come back
                    raise ConnectionResetError
            except BlockingIOError:
                pass  # idle and still open
            except OSError:
                if s is not None:
                    s.close()
                socks[i] = None
        started.set()  # one round of connection attempts made
        stop.wait(1.0)
    for s in socks:
        if s is not None:
            s.close()


# -- the timed side ------------------------------------------------------------------------------
def run(args: argparse.Namespace, progress=print) -> dict:
    check_arguments(args)
    layout = profiles.get(args.profile).layout()
    tls = None if args.no_tls else _tls_contexts()
    if tls is None and not args.no_tls:
        progress("note: no trustme package, so no TLS: the idle-TLS phase is skipped (pip install trustme)")
    server_tls, client_tls, ca_pem = tls if tls else (None, None, None)
    nblocks = -(-args.tokens // layout.block_size)
    src, dst = layout.allocate(nblocks), layout.allocate(nblocks)
    states = layout.allocate_states()
    rx = kvwire.Receiver(layout, "127.0.0.1:0", secret=SECRET, kv_caches=dst, tls=server_tls)
    tx = kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=src, tls=client_tls)
    ctx = multiprocessing.get_context("spawn")
    phases = []
    try:
        for attack in ATTACKS:
            if attack == "idle-tls" and server_tls is None:
                continue
            stop, ready = ctx.Event(), ctx.Event()
            before = rx.stats()
            attacker = None
            if attack != "none":
                attack_args = (attack, rx.address, args.profile, args.sockets, ca_pem, stop, ready)
                attacker = ctx.Process(target=attacker_main, args=attack_args, daemon=True)
                attacker.start()
                if not ready.wait(120):
                    raise RuntimeError(f"the {attack} attack did not start within 120 s")
                time.sleep(2.0)  # let it build up
            times = []
            for i in range(args.transfers):
                request_id = f"{attack}-{i}"
                t0 = time.monotonic()
                h = rx.expect(request_id, list(range(nblocks)), args.tokens, states=states, deadline=120)
                tx.send(request_id, list(range(nblocks)), args.tokens, states=states, timeout=120)
                h.wait(timeout=120)
                times.append((time.monotonic() - t0) * 1e3)
            connect_ms = _time_connect(layout, rx.address, src, client_tls)
            after = rx.stats()
            stop.set()
            if attacker is not None:
                attacker.join(10)
                if attacker.is_alive():
                    attacker.kill()
            phase = {
                "attack": attack,
                "median_ms": statistics.median(times),
                "max_ms": max(times),
                "new_connection_ms": connect_ms,
                "refused_connections": after["refused_connections"] - before["refused_connections"],
                "rejected_handshakes": after["rejected_connections"] - before["rejected_connections"],
                "refused_requests": after["refused_requests"] - before["refused_requests"],
                "pending_connections": after["pending_connections"],
                "parked_bytes": after["parked_bytes"],
            }
            phases.append(phase)
            progress(f"  {attack}: median {phase['median_ms']:.1f} ms, max {phase['max_ms']:.1f} ms")
            time.sleep(1.0)  # the attack's connections drain before the next phase
    finally:
        tx.close()
        rx.close()
    base = phases[0]["median_ms"]
    for p in phases:
        p["ratio_to_baseline"] = p["median_ms"] / base
    return {"kind": "flood", "args": vars(args) | {"func": None}, "tls": server_tls is not None, "phases": phases}


def _time_connect(layout, address, caches, client_tls) -> float | None:
    """Milliseconds for a new well-behaved Sender to connect (None if it was refused)."""
    t0 = time.monotonic()
    try:
        with kvwire.Sender(layout, address, secret=SECRET, kv_caches=caches, streams=1, tls=client_tls,
                           connect_timeout=30):  # fmt: skip
            return (time.monotonic() - t0) * 1e3
    except kvwire.TransferError:
        return None


HEADERS = ("attack", "median ms", "max ms", "x baseline", "new conn ms", "refused conns", "cut handshakes",
           "refused requests", "parked MiB")  # fmt: skip


def rows(report: dict) -> list[list[object]]:
    return [
        [p["attack"], round(p["median_ms"], 1), round(p["max_ms"], 1), round(p["ratio_to_baseline"], 2),
         "refused" if p["new_connection_ms"] is None else round(p["new_connection_ms"], 1),
         p["refused_connections"], p["rejected_handshakes"], p["refused_requests"],
         round(p["parked_bytes"] / 2**20, 2)]
        for p in report["phases"]
    ]  # fmt: skip
