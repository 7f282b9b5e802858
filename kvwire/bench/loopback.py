"""``kvwire-bench loopback``: a receiver and a sender in two processes on 127.0.0.1.

The sender holds a model profile's KV for ``--requests`` requests of ``--tokens`` tokens
and streams it ``--rounds`` times; the receiver expects each request, waits for it and
checks that the destination holds exactly what the codec's CPU reference says. With
``--baseline``, plain sockets then move the same number of bytes over the same number
of connections (each side: ``sendall`` / ``recv_into`` of 1 MiB, as ``iperf3 -l 1M``
does), so the ratio between the two is measured on the same machine in the same run.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import resource
import socket
import sys
import tempfile
import threading
import time

import numpy as np
import torch

import kvwire
import kvwire.codec
from kvwire.bench import netem, profiles, tlsutil
from kvwire.blocks import gather_tokens
from kvwire.engine.chunks import received_rows
from kvwire.layout import Selection
from kvwire.proto.frames import crc32c
from kvwire.tuning import tune_malloc

BASELINE_BUFFER = 1 << 20
_PRIME = 1_000_003  # fill pattern period: not a multiple of any block, so misplaced blocks differ


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="llama3-8b", help="model profile (see `kvwire-bench profiles`)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per request (default 8192: 1 GiB for llama3-8b)")
    p.add_argument("--requests", type=int, default=1, help="requests in flight at once")
    p.add_argument("--rounds", type=int, default=1, help="times the requests are sent (total = rounds x requests)")
    p.add_argument("--codec", default="raw", help="raw, fp8, int4 (or e.g. int4/g64/k64), any +lz4")
    p.add_argument("--streams", type=int, default=kvwire.engine.sender.DEFAULT_STREAMS, help="TCP connections")
    p.add_argument("--transport", default="tcp", choices=["tcp", "ucx"], help="byte mover: tcp, or ucx (UCXX)")
    p.add_argument("--chunk-kib", type=int, default=2048, help="target frame payload in KiB")
    p.add_argument("--encode-threads", type=int, default=1, help="sender threads for CPU codecs (default 1)")
    p.add_argument("--exact-tokens", type=int, default=0,
                   help="first tokens of each request sent raw with a lossy codec (default 0)")  # fmt: skip
    p.add_argument("--staging-mib", type=int, default=256, help="receiver staging budget in MiB")
    p.add_argument("--layer-ms", type=float, default=0.0, help="produce one layer every N ms, as a prefill would")
    p.add_argument("--baseline", action="store_true", help="also move the same bytes over plain sockets")
    p.add_argument("--no-verify", action="store_true", help="skip checking the destination")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--link",
        metavar="SPEC",
        help="run the two sides in network namespaces joined by an emulated link, e.g. "
        "rtt=40ms,rate=2gbit,loss=0.01%%[,jitter=1ms][,queue=16mb] (needs root)",
    )
    p.add_argument("--compare-single-stream", action="store_true", help="also send each round over 1 connection")
    p.add_argument("--tls", action="store_true", help="encrypt kvwire's connections (a throwaway CA; needs trustme)")
    p.add_argument(
        "--ktls", action="store_true", help="with --tls: ask OpenSSL for kernel TLS (where the kernel has it)"
    )


def check_arguments(args: argparse.Namespace) -> None:
    profiles.get(args.profile)
    kvwire.codec.get(args.codec)
    for name in ("tokens", "requests", "rounds", "streams", "chunk_kib", "staging_mib", "encode_threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.exact_tokens < 0:
        raise ValueError(f"--exact-tokens: must be 0 or more, got {args.exact_tokens}")
    if args.layer_ms < 0:
        raise ValueError(f"--layer-ms: must be >= 0, got {args.layer_ms}")
    if args.streams > 64:
        raise ValueError(f"--streams: at most 64, got {args.streams}")
    if args.ktls and not args.tls:
        raise ValueError("--ktls: only with --tls")
    if args.tls and args.transport != "tcp":
        raise ValueError("--tls: only with --transport tcp")
    if args.link:
        netem.parse_link(args.link)
        if os.geteuid() != 0:
            raise ValueError("--link: needs root (it creates network namespaces and TUN devices)")


# -- what both processes agree on ----------------------------------------------------------
def _layout_and_blocks(args) -> tuple[kvwire.KVLayout, int, int]:
    layout = profiles.get(args.profile).layout()
    per_request = -(-args.tokens // layout.block_size)
    return layout, per_request, per_request * args.requests


def fill(caches, states, seed: int, dtype: torch.dtype) -> None:
    """Deterministic, cheap, position-dependent contents (randn over GiBs takes too long)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(_PRIME, generator=g).to(dtype)
    offset = 0
    for tensors in [*caches, states]:
        for t in tensors.values():
            flat = t.view(-1)
            for start in range(0, flat.numel(), _PRIME):
                n = min(_PRIME, flat.numel() - start)
                shift = (offset + start) % _PRIME
                flat[start : start + n] = base.roll(-shift)[:n]
            offset += 7919


def _states(layout: kvwire.KVLayout) -> dict[int, torch.Tensor]:
    return layout.allocate_states()


def _src_blocks(i: int, per: int) -> list[int]:
    return list(range(i * per, (i + 1) * per))


def _dst_blocks(i: int, per: int) -> list[int]:
    return list(reversed(_src_blocks(i, per)))  # a different order exercises the scatter


# Both processes apply kvwire.tuning's settings (glibc thresholds first, gc.freeze once
# the caches exist), as a serving process would: see kvwire/tuning.py for why.


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kib = line.split()[:2]
                values[key] = int(kib) * 1024
    return values["VmRSS:"], values["VmHWM:"]


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


# -- the receiver process ------------------------------------------------------------------
def receiver_main(
    pipe, args: argparse.Namespace, secret: str, netns: str | None = None, host: str = "127.0.0.1"
) -> None:
    if netns:
        netem._setns(f"/run/netns/{netns}")
    tune_malloc()
    torch.set_num_threads(1)
    layout, per, total_blocks = _layout_and_blocks(args)
    dst = layout.allocate(total_blocks)
    states = [{i: t for i, t in _states(layout).items()} for _ in range(args.requests)]
    tls = tlsutil.server_context(args.tls_paths, args.ktls) if getattr(args, "tls", False) else None
    rx = kvwire.Receiver(layout, (host, 0), secret=secret, kv_caches=dst, staging_bytes=args.staging_mib << 20,
                         transport=args.transport, tls=tls)  # fmt: skip
    base_listener = socket.create_server((host, 0))
    gc.freeze()  # see kvwire/tuning.py
    pipe.send({"address": rx.address, "baseline_address": base_listener.getsockname()[:2]})
    reference = None
    for layer in dst:  # touch the caches now, so the RSS growth we report is kvwire's own
        for t in layer.values():
            t.fill_(0)
    rss_start = _rss_bytes()[0]
    _reset_peak_rss()
    while True:
        cmd = pipe.recv()
        if cmd[0] == "quit":
            break
        if cmd[0] == "expect":
            round_ = cmd[1]
            for layer in dst:  # so a round that delivers nothing cannot pass on the last one's bytes
                for t in layer.values():
                    t.zero_()
            round_rss = _rss_bytes()[0]
            _reset_peak_rss()
            cpu0 = _cpu_seconds()
            handles = [
                rx.expect(f"{round_}-{i}", _dst_blocks(i, per), args.tokens, states=states[i], deadline=600)
                for i in range(args.requests)
            ]
            pipe.send("ready")
            error = None
            try:
                for h in handles:
                    h.wait()
            except kvwire.TransferError as exc:
                error = str(exc)
            cpu = _cpu_seconds() - cpu0
            rss_growth = _rss_bytes()[1] - round_rss  # before verification allocates its reference
            delivered = [max(h.layer_done_at.get(i, 0.0) for h in handles) for i in range(layout.num_layers)]
            verified = None
            if error is None and not args.no_verify:
                if reference is None:
                    reference = layout.allocate(total_blocks), _states(layout)
                    fill(reference[0], reference[1], seed=1, dtype=layout.dtype)
                verified = _verify(layout, args, reference, dst, states, per)
            pipe.send(
                {
                    "error": error,
                    "cpu_s": cpu,
                    "verified": verified,
                    "stats": rx.stats(),
                    "rss_growth": rss_growth,
                    "layer_delivered_monotonic": delivered,
                }  # fmt: skip
            )
        elif cmd[0] == "baseline":
            _, nbytes, kind = cmd
            pipe.send(_baseline_receive(base_listener, args.streams, nbytes, kind, _memory_views(dst)))
        elif cmd[0] == "rss":
            rss, hwm = _rss_bytes()
            pipe.send({"start": rss_start, "now": rss, "peak": hwm})
    rx.close()


def _verify(layout, args, reference, dst, states, per) -> bool:
    codec = kvwire.codec.get(args.codec)
    src, src_states = reference
    bs = layout.block_size
    for i in range(args.requests):
        s_sel = Selection(tuple(_src_blocks(i, per)), args.tokens)
        d_sel = Selection(tuple(_dst_blocks(i, per)), args.tokens)
        for layer, spec in enumerate(layout.layers):
            for p in spec.paged:
                a = gather_tokens(src[layer][p.name], s_sel, bs)
                b = gather_tokens(dst[layer][p.name], d_sel, bs)
                want = received_rows(codec, a, p.name, bs, args.exact_tokens)
                if not torch.equal(
                    b.view(torch.uint8) if codec.lossless else b, want.view(torch.uint8) if codec.lossless else want
                ):
                    return False
            if spec.state is not None:
                a = src_states[layer]
                if not torch.equal(states[i][layer], received_rows(codec, a, "state", bs)):
                    return False
    return True


def _memory_views(caches) -> list[memoryview]:
    """Every paged cache tensor as one flat byte view, layer by layer."""
    return [memoryview(t.view(-1).view(torch.uint8).numpy()) for layer in caches for t in layer.values()]


def _byte_range(views: list[memoryview], start: int, stop: int) -> list[memoryview]:
    """The bytes ``[start, stop)`` of the concatenation of ``views``, as sub-views."""
    out, offset = [], 0
    for v in views:
        lo, hi = max(start, offset), min(stop, offset + len(v))
        if lo < hi:
            out.append(v[lo - offset : hi - offset])
        offset += len(v)
    return out


def _shares(nbytes: int, streams: int) -> list[tuple[int, int]]:
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
}
CHECKED_PIECE = 2 << 20  # kvwire's default chunk


def _pieces(views: list[memoryview], size: int) -> list[memoryview]:
    return [v[o : o + size] for v in views for o in range(0, len(v), size)]


def _baseline_receive(listener: socket.socket, streams: int, nbytes: int, kind: str, memory) -> dict:
    """The receiving half of a plain-socket baseline (see ``BASELINES``)."""
    conns = [listener.accept()[0] for _ in range(streams)]
    cpu0 = _cpu_seconds()

    def recv_exact(sock: socket.socket, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = sock.recv_into(view[got:])
            if not n:
                raise ConnectionError("baseline sender closed early")
            got += n

    def drain(sock: socket.socket, start: int, stop: int) -> None:
        if kind == "hot":
            buf = memoryview(bytearray(BASELINE_BUFFER))
            for o in range(start, stop, BASELINE_BUFFER):
                recv_exact(sock, buf[: min(BASELINE_BUFFER, stop - o)])
        elif kind == "checked":
            staging = np.empty(CHECKED_PIECE, dtype=np.uint8)
            crc = memoryview(bytearray(4))
            for view in _pieces(_byte_range(memory, start, stop), CHECKED_PIECE):
                n = len(view)
                recv_exact(sock, crc)
                recv_exact(sock, staging[:n].data)
                if crc32c(staging[:n]) != int.from_bytes(crc, "little"):
                    raise ConnectionError("checked baseline: checksum mismatch")
                np.frombuffer(view, dtype=np.uint8)[:] = staging[:n]
        else:
            for view in _byte_range(memory, start, stop):
                recv_exact(sock, view)
        sock.sendall(b"!")  # the same end-to-end acknowledgement kvwire waits for

    threads = [threading.Thread(target=drain, args=(c, a, b)) for c, (a, b) in zip(conns, _shares(nbytes, streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    return {"cpu_s": _cpu_seconds() - cpu0}


# -- the sender process --------------------------------------------------------------------
def sender_main(pipe, args: argparse.Namespace, secret: str, address, baseline_address, netns=None) -> None:
    if netns:
        netem._setns(f"/run/netns/{netns}")
    tune_malloc()
    torch.set_num_threads(1)
    layout, per, total_blocks = _layout_and_blocks(args)
    src = layout.allocate(total_blocks)
    states = _states(layout)
    fill(src, states, seed=1, dtype=layout.dtype)
    tls = tlsutil.client_context(args.tls_paths, args.ktls) if getattr(args, "tls", False) else None
    tx = kvwire.Sender(
        layout, address, secret=secret, kv_caches=src, streams=args.streams, codec=args.codec,
        chunk_bytes=args.chunk_kib << 10, transport=args.transport, encode_threads=args.encode_threads,
        exact_tokens=args.exact_tokens, tls=tls,
    )  # fmt: skip
    gc.freeze()  # see kvwire/tuning.py
    single = None
    if args.compare_single_stream:
        single = kvwire.Sender(layout, address, secret=secret, kv_caches=src, streams=1, codec=args.codec,
                               chunk_bytes=args.chunk_kib << 10, exact_tokens=args.exact_tokens)  # fmt: skip
    pipe.send("ready")
    while True:
        cmd = pipe.recv()
        if cmd[0] == "quit":
            break
        if cmd[0] == "send":
            sender = single if len(cmd) > 3 and cmd[3] else tx
            pipe.send(_send_round(sender, layout, args, cmd[1], per, states, streamed=cmd[2]))
        elif cmd[0] == "baseline":
            _, nbytes, kind = cmd
            pipe.send(_baseline_send(baseline_address, args.streams, nbytes, kind, _memory_views(src)))
        elif cmd[0] == "stats":
            pipe.send(tx.stats())
    tx.close()
    if single is not None:
        single.close()


class _Sampler:
    """Bytes sent per connection every 50 ms (for --plot), and a progress line on a terminal."""

    PERIOD_S = 0.05

    def __init__(self, tx, t0: float, show: bool) -> None:
        self.tx, self.t0, self.show = tx, t0, show and sys.stderr.isatty()
        self.samples: list[tuple[float, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = None
        while not self._stop.wait(self.PERIOD_S):
            sent = [c["bytes_sent"] for c in self.tx.stats()["connections"]]
            now = time.monotonic() - self.t0
            start = start if start is not None else (now, sum(sent))
            self.samples.append((now, sent))
            if self.show and now > start[0]:
                moved = sum(sent) - start[1]
                sys.stderr.write(f"\r  {moved / 2**20:10.1f} MiB sent, {moved / (now - start[0]) / 1e9:.3f} GB/s ")
                sys.stderr.flush()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.show:
            sys.stderr.write("\r" + " " * 60 + "\r")


def _send_round(tx, layout, args, round_: int, per: int, states, streamed: bool) -> dict:
    round_rss = _rss_bytes()[0]
    _reset_peak_rss()
    cpu0 = _cpu_seconds()
    t0 = time.monotonic()
    sampler = _Sampler(tx, t0, show=False)  # records from the first send_layer on
    transfers = [
        tx.transfer(f"{round_}-{i}", _src_blocks(i, per), args.tokens, states=states, deadline=600)
        for i in range(args.requests)
    ]
    timeline = []
    if args.layer_ms and not streamed:
        time.sleep(layout.num_layers * args.layer_ms / 1e3)  # the whole prefill, then the transfer
    for layer in range(layout.num_layers):
        if args.layer_ms and streamed:
            time.sleep(args.layer_ms / 1e3)  # this layer's share of the prefill
        produced = time.monotonic() - t0
        for t in transfers:
            t.send_layer(layer)
        timeline.append({"layer": layer, "produced_s": produced})
    prefill_end = time.monotonic()
    sampler.show = not args.quiet
    try:
        results = [t.finish() for t in transfers]
    finally:
        sampler.stop()
    t_end = time.monotonic()
    return {
        "t0_monotonic": t0,
        "samples": sampler.samples,
        "seconds": t_end - t0,
        "exposed_ms": (t_end - prefill_end) * 1e3,
        "wire_bytes": sum(r["wire_bytes"] for r in results),
        "logical_bytes": sum(r["logical_bytes"] for r in results),
        "resent_chunks": sum(r["resent_chunks"] for r in results),
        "cpu_s": _cpu_seconds() - cpu0,
        "rss_growth": _rss_bytes()[1] - round_rss,
        "timeline": timeline,
    }


def _baseline_send(address, streams: int, nbytes: int, kind: str, memory) -> dict:
    """The sending half of :func:`_baseline_receive`."""
    socks = [socket.create_connection(tuple(address)) for _ in range(streams)]
    hot = memoryview(bytearray(os.urandom(BASELINE_BUFFER)))
    cpu0 = _cpu_seconds()

    def pump(sock: socket.socket, start: int, stop: int) -> None:
        if kind == "hot":
            for o in range(start, stop, BASELINE_BUFFER):
                sock.sendall(hot[: min(BASELINE_BUFFER, stop - o)])
        elif kind == "checked":
            for view in _pieces(_byte_range(memory, start, stop), CHECKED_PIECE):
                sock.sendall(crc32c(view).to_bytes(4, "little"))
                sock.sendall(view)
        else:
            for view in _byte_range(memory, start, stop):
                sock.sendall(view)
        if sock.recv(1) != b"!":
            raise ConnectionError("baseline receiver did not acknowledge")

    threads = [threading.Thread(target=pump, args=(s, a, b)) for s, (a, b) in zip(socks, _shares(nbytes, streams))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    for s in socks:
        s.close()
    return {"seconds": seconds, "cpu_s": _cpu_seconds() - cpu0}


# -- the parent ----------------------------------------------------------------------------
def run(args: argparse.Namespace, progress=print) -> dict:
    """Run the benchmark; return the report (the ``--json`` document)."""
    check_arguments(args)
    layout = profiles.get(args.profile).layout()
    if args.link:
        with netem.EmulatedLink(netem.parse_link(args.link)) as link:
            report = _run(args, layout, progress, link)
            report["link"] = {"spec": args.link, **link.stats_now()}
            return report
    return _run(args, layout, progress, None)


def _run(args, layout, progress, link) -> dict:
    secret = os.urandom(16).hex()
    if getattr(args, "tls", False):
        hosts = ("127.0.0.1", "localhost") + ((link.address_b,) if link else ())
        args.tls_paths = tlsutil.write_material(tempfile.mkdtemp(prefix="kvwire-tls-"), hosts)
        if args.ktls and not tlsutil.kernel_tls_available():
            progress("note: this kernel has no 'tls' upper-layer protocol: --ktls falls back to user-space TLS")
    ctx = multiprocessing.get_context("spawn")
    rx_pipe, rx_child = ctx.Pipe()
    tx_pipe, tx_child = ctx.Pipe()
    rx_ns, tx_ns = (link.ns["b"], link.ns["a"]) if link else (None, None)
    host = link.address_b if link else "127.0.0.1"
    receiver = ctx.Process(
        target=receiver_main, args=(rx_child, args, secret, rx_ns, host), name="kvwire-bench-receiver"
    )
    receiver.start()
    sender = None
    try:
        addresses = _recv(rx_pipe, receiver, 120)
        sender = ctx.Process(
            target=sender_main,
            args=(tx_child, args, secret, addresses["address"], addresses["baseline_address"], tx_ns),
            name="kvwire-bench-sender",
        )
        sender.start()
        _recv(tx_pipe, sender, 300)
        rounds, singles, overlap = [], [], None
        baselines: dict[str, list] = {kind: [] for kind in BASELINES}
        for r in range(args.rounds):
            rx_pipe.send(("expect", r))
            _recv(rx_pipe, receiver, 60)
            tx_pipe.send(("send", r, True))
            sent = _recv(tx_pipe, sender, 900)
            received = _recv(rx_pipe, receiver, 900)
            rounds.append((sent, received))
            if args.quiet is False:
                progress(
                    f"  round {r + 1}/{args.rounds}: {sent['wire_bytes'] / sent['seconds'] / 1e9:.3f} GB/s wire, "
                    f"verified={received['verified']}"
                )
            if args.compare_single_stream:
                rx_pipe.send(("expect", f"single-{r}"))
                _recv(rx_pipe, receiver, 60)
                tx_pipe.send(("send", f"single-{r}", True, True))
                one = _recv(tx_pipe, sender, 1800)
                _recv(rx_pipe, receiver, 1800)
                singles.append(one)
                if args.quiet is False:
                    progress(
                        f"  1 connection {r + 1}/{args.rounds}: {one['wire_bytes'] / one['seconds'] / 1e9:.3f} GB/s"
                    )
            if args.baseline:
                nbytes = sent["wire_bytes"]
                for kind, title in BASELINES.items():
                    rx_pipe.send(("baseline", nbytes, kind))
                    tx_pipe.send(("baseline", nbytes, kind))
                    b_sent = _recv(tx_pipe, sender, 900)
                    b_recv = _recv(rx_pipe, receiver, 900)
                    baselines[kind].append((b_sent, b_recv, nbytes))
                    if args.quiet is False:
                        progress(f"  {title} {r + 1}/{args.rounds}: {nbytes / b_sent['seconds'] / 1e9:.3f} GB/s")
        if args.layer_ms:
            rx_pipe.send(("expect", args.rounds))
            _recv(rx_pipe, receiver, 60)
            tx_pipe.send(("send", args.rounds, False))
            overlap = _recv(tx_pipe, sender, 900)
            _recv(rx_pipe, receiver, 900)
        tx_pipe.send(("stats",))
        sender_stats = _recv(tx_pipe, sender, 60)
        rx_pipe.send(("rss",))
        rss = _recv(rx_pipe, receiver, 60)
        return _report(args, layout, rounds, baselines, singles, overlap, sender_stats, rss)
    finally:
        # The sender first: a receiver that closed first would show up as lost connections.
        for pipe, p in ((tx_pipe, sender), (rx_pipe, receiver)):
            try:
                pipe.send(("quit",))
            except (BrokenPipeError, OSError):
                pass
            if p is not None:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()


def _recv(pipe, process, timeout: float):
    end = time.monotonic() + timeout
    while not pipe.poll(0.2):
        if not process.is_alive():
            raise RuntimeError(f"{process.name} exited with code {process.exitcode}")
        if time.monotonic() > end:
            raise RuntimeError(f"{process.name} did not answer within {timeout} s")
    return pipe.recv()


def _report(args, layout, rounds, baselines, singles, overlap, sender_stats, rss) -> dict:
    best = max(rounds, key=lambda r: r[0]["wire_bytes"] / r[0]["seconds"])
    sent, received = best
    wire = sent["wire_bytes"] / sent["seconds"] / 1e9
    effective = sent["logical_bytes"] / sent["seconds"] / 1e9
    errors = [r[1]["error"] for r in rounds if r[1]["error"]]
    verified = None if args.no_verify else (not errors and all(r[1]["verified"] for r in rounds))
    gb_moved = sum(r[0]["wire_bytes"] for r in rounds) / 1e9
    report = {
        "kind": "loopback",
        "profile": args.profile,
        "codec": kvwire.codec.get(args.codec).descriptor,
        "tokens": args.tokens,
        "requests": args.requests,
        "rounds": args.rounds,
        "streams": args.streams,
        "transport": args.transport,
        "tls": "kernel" if getattr(args, "ktls", False) else bool(getattr(args, "tls", False)),
        "layer_ms": args.layer_ms,
        "logical_bytes_per_round": sent["logical_bytes"],
        "wire_bytes_per_round": sent["wire_bytes"],
        "seconds": sent["seconds"],
        "wire_gb_per_s": wire,
        "effective_gb_per_s": effective,
        "exposed_ms": sent["exposed_ms"],
        "verified": verified,
        "errors": errors,
        "cpu_s_per_gb": {
            "sender": sum(r[0]["cpu_s"] for r in rounds) / gb_moved,
            "receiver": sum(r[1]["cpu_s"] for r in rounds) / gb_moved,
        },
        "staging": {"receiver": received["stats"]["staging"], "sender": sender_stats["staging"]},
        "receiver_rss": {
            "caches_allocated_bytes": rss["start"],
            "growth_bytes": max(r[1]["rss_growth"] for r in rounds),
        },
        "sender_rss_growth_bytes": max(r[0]["rss_growth"] for r in rounds),
        "connections": [
            {
                "bytes_sent": c["bytes_sent"],
                "goodput_gb_per_s": c["goodput_gb_per_s"],
                "tcp": c["tcp"],
                "path": c.get("path", "host memory"),
            }  # fmt: skip
            for c in sender_stats["connections"]
        ],
        "resent_chunks": sum(r[0]["resent_chunks"] for r in rounds),
        "timeline": [
            {**t, "delivered_s": received["layer_delivered_monotonic"][t["layer"]] - sent["t0_monotonic"]}
            for t in sent["timeline"]
        ],
        "samples": sent["samples"],
    }
    for kind, runs in baselines.items():
        if not runs:
            continue
        suffix = "" if kind == "cache" else f"_{kind}"
        b_best = min(runs, key=lambda b: b[0]["seconds"])
        report[f"baseline{suffix}_gb_per_s"] = b_best[2] / b_best[0]["seconds"] / 1e9
        report[f"ratio_to_baseline{suffix}"] = wire / report[f"baseline{suffix}_gb_per_s"]
        b_gb = sum(b[2] for b in runs) / 1e9
        report[f"baseline{suffix}_cpu_s_per_gb"] = {
            "sender": sum(b[0]["cpu_s"] for b in runs) / b_gb,
            "receiver": sum(b[1]["cpu_s"] for b in runs) / b_gb,
        }
    if singles:
        best_single = max(singles, key=lambda r: r["wire_bytes"] / r["seconds"])
        report["single_stream_wire_gb_per_s"] = best_single["wire_bytes"] / best_single["seconds"] / 1e9
    if args.link:
        rate_gb = netem.parse_link(args.link).rate_bps / 8 / 1e9
        report["link_utilization"] = wire / rate_gb
        if singles:
            report["single_stream_link_utilization"] = report["single_stream_wire_gb_per_s"] / rate_gb
    if overlap is not None:
        # One layer's wire time, measured: the no-overlap round sends every layer back to back
        # once the prefill is over, so its exposed time is all layers' wire time plus one RTT.
        report["exposed_ms_after_prefill"] = overlap["exposed_ms"]
        rtt_ms = netem.parse_link(args.link).rtt_s * 1e3 if args.link else 0.0
        report["one_layer_wire_ms"] = max(overlap["exposed_ms"] - rtt_ms, 0.0) / layout.num_layers
        report["exposed_ideal_ms"] = report["one_layer_wire_ms"] + rtt_ms
        report["exposed_over_ideal"] = sent["exposed_ms"] / report["exposed_ideal_ms"]
    return report


def summary_rows(report: dict) -> list[tuple[str, str]]:
    gib = report["logical_bytes_per_round"] / 2**30
    rows = [
        ("profile / codec", f"{report['profile']} / {report['codec']}"),
        ("moved per round", f"{gib:.3f} GiB logical, {report['wire_bytes_per_round'] / 2**30:.3f} GiB on the wire"),
        ("requests x rounds", f"{report['requests']} x {report['rounds']}, {report['streams']} TCP connections"),
        ("wire throughput", f"{report['wire_gb_per_s']:.3f} GB/s"),
        ("effective throughput", f"{report['effective_gb_per_s']:.3f} GB/s (logical KV bytes)"),
        ("exposed latency", f"{report['exposed_ms']:.1f} ms (last send_layer -> acknowledgement)"),
    ]
    if "baseline_gb_per_s" in report:
        rows.append(("plain, cache to cache", f"{report['baseline_gb_per_s']:.3f} GB/s (same memory, no checks)"))
        rows.append(("kvwire / plain", f"{report['ratio_to_baseline']:.3f}"))
        rows.append(("plain, hot 1 MiB buffer", f"{report['baseline_hot_gb_per_s']:.3f} GB/s (iperf3 -l 1M style)"))
        rows.append(("kvwire / plain hot", f"{report['ratio_to_baseline_hot']:.3f}"))
        rows.append(("plain + CRC32C + copy", f"{report['baseline_checked_gb_per_s']:.3f} GB/s (ceiling with checks)"))
        rows.append(("kvwire / checked plain", f"{report['ratio_to_baseline_checked']:.3f}"))
        cpu = {k: report[f"baseline{s}_cpu_s_per_gb"] for k, s in (("plain", ""), ("checked", "_checked"))}
        rows.append(("CPU s per GB, baselines", ", ".join(
            f"{k} {v['sender']:.3f} + {v['receiver']:.3f}" for k, v in cpu.items())))  # fmt: skip
    if "link_utilization" in report:
        rows.append(("link", f"{args_link(report)}: {report['link_utilization'] * 100:.1f}% of its rate used"))
    if "single_stream_wire_gb_per_s" in report:
        util = report.get("single_stream_link_utilization")
        rows.append(("1 connection", f"{report['single_stream_wire_gb_per_s']:.3f} GB/s"
                     + (f" ({util * 100:.1f}% of the link)" if util is not None else "")))  # fmt: skip
    if "exposed_ms_after_prefill" in report:
        rows.append(("exposed, no overlap", f"{report['exposed_ms_after_prefill']:.1f} ms (send after the last layer)"))
        rows.append(("one layer's wire time", f"{report['one_layer_wire_ms']:.1f} ms"))
        rows.append(
            (
                "exposed / ideal",
                f"{report['exposed_over_ideal']:.2f} (ideal: one layer's wire time + one RTT = "
                f"{report['exposed_ideal_ms']:.1f} ms)",
            )
        )
    cpu = report["cpu_s_per_gb"]
    rows.append(("CPU s per GB", f"sender {cpu['sender']:.3f}, receiver {cpu['receiver']:.3f}"))
    st = report["staging"]["receiver"]
    rows.append(
        ("receiver staging", f"high water {st['high_water_bytes'] / 2**20:.0f} of {st['budget_bytes'] / 2**20:.0f} MiB")
    )
    rows.append(
        (
            "RSS growth in a round",
            f"receiver {report['receiver_rss']['growth_bytes'] / 2**20:.0f} MiB, "
            f"sender {report['sender_rss_growth_bytes'] / 2**20:.0f} MiB",
        )
    )
    rows.append(("verified", str(report["verified"])))
    return rows


def args_link(report: dict) -> str:
    return report.get("link", {}).get("spec", "?")


def connection_rows(report: dict) -> list[list[object]]:
    return [
        [i, c["bytes_sent"] / 2**20, c["tcp"].get("rtt_us", 0) / 1e3, c["tcp"].get("snd_cwnd", 0),
         c["tcp"].get("total_retrans", 0), c["tcp"].get("delivery_rate", 0) / 1e9]
        for i, c in enumerate(report["connections"])
    ]  # fmt: skip


CONNECTION_HEADERS = ("conn", "MiB sent", "rtt ms", "cwnd", "retrans", "delivery GB/s")


def main(args: argparse.Namespace) -> int:
    layout = profiles.get(args.profile).layout()
    gib = layout.request_bytes(args.tokens) * args.requests / 2**30
    print(
        f"loopback: {args.profile}, {args.tokens} tokens x {args.requests} requests ({gib:.2f} GiB logical) "
        f"x {args.rounds} rounds, codec {args.codec}, {args.streams} connections",
        file=sys.stderr,
    )
    return 0 if run(args) else 1


# -- two hosts: kvwire-bench serve / kvwire-bench send --------------------------------------------
def _secret() -> str:
    secret = os.environ.get("KVWIRE_SECRET")
    if not secret:
        raise ValueError("KVWIRE_SECRET: set the same shared secret (8+ bytes) on both hosts")
    return secret


def serve(args: argparse.Namespace, listen, progress=print) -> dict:
    """The receiving host: expect ``--rounds`` rounds of ``--requests`` requests, verify each."""
    tune_malloc()
    layout, per, total_blocks = _layout_and_blocks(args)
    dst = layout.allocate(total_blocks)
    states = [_states(layout) for _ in range(args.requests)]
    reference = layout.allocate(total_blocks), _states(layout)
    fill(reference[0], reference[1], seed=1, dtype=layout.dtype)
    gc.freeze()
    rounds = []
    with kvwire.Receiver(layout, listen, secret=_secret(), kv_caches=dst, staging_bytes=args.staging_mib << 20) as rx:
        progress(f"listening on {rx.address[0]}:{rx.address[1]}")
        for r in range(args.rounds):
            handles = [
                rx.expect(f"{r}-{i}", _dst_blocks(i, per), args.tokens, states=states[i], deadline=args.timeout)
                for i in range(args.requests)
            ]
            stats = [h.wait() for h in handles]
            first = min(h.t_first_byte for h in handles if h.t_first_byte is not None)
            seconds = max(h.t_done or first for h in handles) - first  # every handle is done after wait()
            wire = sum(s["wire_bytes"] for s in stats)
            verified = None if args.no_verify else _verify(layout, args, reference, dst, states, per)
            rounds.append({"seconds": seconds, "wire_bytes": wire, "verified": verified})
            progress(f"  round {r + 1}/{args.rounds}: {wire / seconds / 1e9:.3f} GB/s received, verified={verified}")
        return {"kind": "serve", "rounds": rounds, "stats": rx.stats(),
                "verified": None if args.no_verify else all(x["verified"] for x in rounds)}  # fmt: skip


def send(args: argparse.Namespace, peer, progress=print) -> dict:
    """The sending host: ``--rounds`` rounds of ``--requests`` requests to ``peer``."""
    tune_malloc()
    layout, per, total_blocks = _layout_and_blocks(args)
    src = layout.allocate(total_blocks)
    states = _states(layout)
    fill(src, states, seed=1, dtype=layout.dtype)
    gc.freeze()
    rounds = []
    with kvwire.Sender(layout, peer, secret=_secret(), kv_caches=src, streams=args.streams, codec=args.codec,
                       chunk_bytes=args.chunk_kib << 10, exact_tokens=args.exact_tokens) as tx:  # fmt: skip
        for r in range(args.rounds):
            sent = _send_round(tx, layout, args, r, per, states, streamed=True)
            rounds.append(sent)
            progress(f"  round {r + 1}/{args.rounds}: {sent['wire_bytes'] / sent['seconds'] / 1e9:.3f} GB/s wire, "
                     f"exposed {sent['exposed_ms']:.1f} ms")  # fmt: skip
        best = max(rounds, key=lambda x: x["wire_bytes"] / x["seconds"])
        return {
            "kind": "send", "profile": args.profile, "codec": tx.codec.descriptor, "streams": args.streams,
            "wire_gb_per_s": best["wire_bytes"] / best["seconds"] / 1e9,
            "effective_gb_per_s": best["logical_bytes"] / best["seconds"] / 1e9,
            "exposed_ms": best["exposed_ms"],
            "connections": tx.stats()["connections"],
            "rounds": [{k: v for k, v in x.items() if k not in ("samples", "timeline")} for x in rounds],
        }  # fmt: skip
