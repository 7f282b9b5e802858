"""``kvwire-bench loopback``: a receiver and a sender in two processes on 127.0.0.1.

This module holds the flags, the two processes' mains and the run that drives them;
the data and its check are ``fixture``, the plain-socket baselines ``baselines``, the
report ``loopback_report``, the two-host variant ``twohost``.

The sender holds a model profile's KV for ``--requests`` requests of ``--tokens`` tokens
and streams it ``--rounds`` times; the receiver expects each request, waits for it and
checks that the destination holds exactly what the codec's CPU reference says. With
``--baseline``, plain sockets then move the same number of bytes over the same number
of connections (each side: ``sendall`` / ``recv_into`` of 1 MiB, as ``iperf3 -l 1M``
does), so the ratio between the two is measured on the same machine in the same run.

With ``--prefill-tp P --decode-tp D`` (and ``--decode-block-size``), P sender processes
each hold one tensor-parallel shard of the model and D receiver processes one each
(``kvwire.ShardedSender``): the same model's bytes cross the loopback once, split as
the two sides' parallelism says, and every decode rank checks its heads.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time

import torch

import kvwire
import kvwire.codec
from kvwire.bench import baselines, fixture, loopback_report, netem, profiles, tlsutil
from kvwire.bench.procstats import cpu_seconds, machine_delta, machine_ticks, reset_peak_rss, rss_bytes
from kvwire.engine.receiver import DEFAULT_SLOT_BYTES
from kvwire.engine.sender import DEFAULT_MAX_STREAMS, DEFAULT_STREAMS
from kvwire.sharding import decode_ranks_served
from kvwire.transport.tcp import LOCAL_SNDBUF_MIN
from kvwire.tuning import tune_malloc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="llama3-8b", help="model profile (see `kvwire-bench profiles`)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per request (default 8192: 1 GiB for llama3-8b)")
    p.add_argument("--requests", type=int, default=1, help="requests in flight at once")
    p.add_argument("--rounds", type=int, default=1, help="times the requests are sent (total = rounds x requests)")
    p.add_argument("--codec", default="raw", help="raw, fp8, int4 (or e.g. int4/g64/k64), any +lz4")
    p.add_argument("--streams", type=int, default=DEFAULT_STREAMS, help="TCP connections to start with")
    p.add_argument("--max-streams", type=int, default=None,
                   help="connections the sender may grow to while goodput grows (default: the library's, 16; "
                        "equal to --streams for a fixed count)")  # fmt: skip
    p.add_argument("--transport", default="tcp", choices=["tcp", "ucx"], help="byte mover: tcp, or ucx (UCXX)")
    p.add_argument("--chunk-kib", type=int, default=None,
                   help="target frame payload in KiB (default: 2048, or 4096 on a short path)")  # fmt: skip
    p.add_argument("--local-sndbuf-kib", type=int, default=None,
                   help="send buffer of each connection to this host, in KiB (default: the library's, 128; 0: the "
                        "kernel's autotuning, as before it)")  # fmt: skip
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
    p.add_argument("--checksum", choices=["crc32c", "none"], default=None,
                   help="payload checksum (default: crc32c, or none with --tls)")  # fmt: skip
    p.add_argument("--tls", action="store_true", help="encrypt kvwire's connections (a throwaway CA; needs trustme)")
    p.add_argument(
        "--ktls", action="store_true", help="with --tls: ask OpenSSL for kernel TLS (where the kernel has it)"
    )
    p.add_argument("--prefill-tp", type=int, default=1, help="prefill tensor-parallel ranks, one process each (1)")
    p.add_argument("--decode-tp", type=int, default=1, help="decode tensor-parallel ranks, one process each (1)")
    p.add_argument("--decode-block-size", type=int, default=None,
                   help="the decode's block size (default: the profile's, as the prefill)")  # fmt: skip
    p.add_argument("--no-receive-lane", action="store_true",
                   help="every frame through the receiver's Python loop, none through its compiled receive lane "
                        "(for comparisons)")  # fmt: skip
    p.add_argument("--destination", choices=["reverse", "forward"], default="reverse",
                   help="the receiver's blocks reversed (a run per block, the default) or in order (one run "
                        "per chunk, as a fresh allocator gives)")  # fmt: skip
    p.add_argument("--compare-homogeneous", action="store_true",
                   help="with --prefill-tp, --decode-tp or --decode-block-size: after each round, send the same "
                        "bytes from one process to one over as many connections in all (1 -> 1), and report "
                        "the ratio")  # fmt: skip


def receiver_slot_bytes(args: argparse.Namespace) -> int:
    """A benchmark receiver's ``slot_bytes`` (the largest payload of a frame, which caps the
    sender's chunks at the handshake): the default, or what ``--chunk-kib`` asks for."""
    return max(DEFAULT_SLOT_BYTES, (chunk_bytes(args) or 0) + (64 << 10))


def chunk_bytes(args: argparse.Namespace) -> int | None:
    """``--chunk-kib`` in bytes; None: the library chooses."""
    return None if args.chunk_kib is None else args.chunk_kib << 10


def socket_options(args: argparse.Namespace) -> kvwire.SocketOptions:
    """The sender's socket options: the library's, but for ``--local-sndbuf-kib`` (0: the
    kernel's autotuning). Raises ValueError naming the flag for a size that would stall."""
    kib = getattr(args, "local_sndbuf_kib", None)
    if kib is None:
        return kvwire.SocketOptions()
    if kib != 0 and kib < LOCAL_SNDBUF_MIN >> 10:
        raise ValueError(f"--local-sndbuf-kib: 0 (the kernel's autotuning) or at least {LOCAL_SNDBUF_MIN >> 10}, "
                         f"got {kib}")  # fmt: skip
    return kvwire.SocketOptions(local_sndbuf=(kib << 10) or None)


def check_arguments(args: argparse.Namespace) -> None:
    profiles.get(args.profile)
    kvwire.codec.get(args.codec)
    for name in ("tokens", "requests", "rounds", "streams", "chunk_kib", "staging_mib", "encode_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    socket_options(args)  # its own message for --local-sndbuf-kib
    if args.exact_tokens < 0:
        raise ValueError(f"--exact-tokens: must be 0 or more, got {args.exact_tokens}")
    if args.layer_ms < 0:
        raise ValueError(f"--layer-ms: must be >= 0, got {args.layer_ms}")
    if args.layer_ms and args.baseline:  # a paced round waits for its prefill; the sockets would not
        raise ValueError("--baseline: not with --layer-ms (plain sockets run unpaced: the ratio would say nothing)")
    if args.streams > 64:
        raise ValueError(f"--streams: at most 64, got {args.streams}")
    if args.max_streams is not None and not args.streams <= args.max_streams <= 64:
        raise ValueError(f"--max-streams: must be in --streams..64 ({args.streams}..64), got {args.max_streams}")
    if args.ktls and not args.tls:
        raise ValueError("--ktls: only with --tls")
    if args.tls and args.transport != "tcp":
        raise ValueError("--tls: only with --transport tcp")
    for name in ("prefill_tp", "decode_tp", "decode_block_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if sharded(args):
        flags = {"--baseline": args.baseline, "--compare-single-stream": args.compare_single_stream,
                 "--plot": getattr(args, "plot", None), "--transport ucx": args.transport != "tcp"}  # fmt: skip
        for flag in (f for f, on in flags.items() if on):
            raise ValueError(f"{flag}: not with --prefill-tp, --decode-tp or --decode-block-size")
        model = profiles.get(args.profile).layout()
        for side in ("prefill", "decode"):
            try:
                model.shard(0, getattr(args, f"{side}_tp"))
            except ValueError as exc:
                raise ValueError(f"--{side}-tp: {exc}") from None
    elif getattr(args, "compare_homogeneous", False):
        raise ValueError("--compare-homogeneous: only with --prefill-tp, --decode-tp or --decode-block-size")
    if args.link:
        netem.parse_link(args.link)
        if os.geteuid() != 0:
            raise ValueError("--link: needs root (it creates network namespaces and TUN devices)")


# Both processes apply kvwire.tuning's settings (glibc thresholds first, gc.freeze once
# the caches exist), as a serving process would: see kvwire/tuning.py for why.


# -- the receiver process ------------------------------------------------------------------
def sharded(args: argparse.Namespace) -> bool:
    """Do the two sides differ in tensor parallelism or block size (one process per rank)?"""
    return (getattr(args, "prefill_tp", 1), getattr(args, "decode_tp", 1)) != (1, 1) or bool(
        getattr(args, "decode_block_size", None)
    )


def pairs(args: argparse.Namespace) -> int:
    """Sender-receiver pairs of a run, each with ``--streams`` connections: every prefill
    rank connects to the decode ranks it sends something to (with k/v heads, as many pairs
    as ranks on the larger side; an MLA latent comes from one prefill rank alone)."""
    if not sharded(args):
        return 1
    return sum(len(decode_ranks_served(fixture.layout_and_blocks(args, "prefill", r)[0], args.decode_tp))
               for r in range(args.prefill_tp))  # fmt: skip


def homogeneous_args(args: argparse.Namespace) -> argparse.Namespace:
    """The 1 -> 1 run that ``--compare-homogeneous`` measures against a sharded one: the same
    model, tokens and codec, as many connections in all (``--streams`` per pair)."""
    n = pairs(args)
    max_streams = min(64, n * (args.max_streams or max(args.streams, DEFAULT_MAX_STREAMS)))  # as each pair may grow
    return argparse.Namespace(**{**vars(args), "prefill_tp": 1, "decode_tp": 1, "decode_block_size": None,
                                 "streams": min(64, args.streams * n), "max_streams": max_streams})  # fmt: skip


def receiver_main(
    pipe, args: argparse.Namespace, secret: str, netns: str | None = None, host: str = "127.0.0.1", rank: int = 0
) -> None:
    if netns:
        netem._setns(f"/run/netns/{netns}")
    tune_malloc()
    torch.set_num_threads(1)
    layout, per, total_blocks = fixture.layout_and_blocks(args, "decode", rank)
    prefill, _, model_blocks = fixture.layout_and_blocks(args, "prefill")
    model = prefill.model()  # the whole model as the prefill pages it: the reference
    dst = layout.allocate(total_blocks)
    states = [{i: t for i, t in layout.allocate_states().items()} for _ in range(args.requests)]
    tls = tlsutil.server_context(args.tls_paths, args.ktls) if getattr(args, "tls", False) else None
    rx = kvwire.Receiver(layout, (host, 0), secret=secret, kv_caches=dst, staging_bytes=args.staging_mib << 20,
                         transport=args.transport, tls=tls, checksum=getattr(args, "checksum", None),
                         slot_bytes=receiver_slot_bytes(args),
                         receive_lane=not getattr(args, "no_receive_lane", False))  # fmt: skip
    base_listener = socket.create_server((host, 0))
    gc.freeze()  # see kvwire/tuning.py
    pipe.send({"address": rx.address, "baseline_address": base_listener.getsockname()[:2]})
    reference = None
    for layer in dst:  # touch the caches now, so the RSS growth we report is kvwire's own
        for t in layer.values():
            t.fill_(0)
    rss_start = rss_bytes()[0]
    reset_peak_rss()
    while True:
        cmd = pipe.recv()
        if cmd[0] == "quit":
            break
        if cmd[0] == "expect":
            round_ = cmd[1]
            fixture.zero(dst, states)
            round_rss = rss_bytes()[0]
            reset_peak_rss()
            cpu0 = cpu_seconds()
            handles = [
                rx.expect(
                    f"{round_}-{i}",
                    fixture.dst_blocks(i, per, getattr(args, "destination", "reverse")),
                    args.tokens,
                    states=states[i],
                    deadline=600,
                )
                for i in range(args.requests)
            ]
            pipe.send("ready")
            error = None
            try:
                for h in handles:
                    h.wait()
            except kvwire.TransferError as exc:
                error = str(exc)
            cpu = cpu_seconds() - cpu0
            rss_growth = rss_bytes()[1] - round_rss  # before verification allocates its reference
            delivered = [max(h.layer_done_at.get(i, 0.0) for h in handles) for i in range(layout.num_layers)]
            verified = None
            if error is None and not args.no_verify:
                if reference is None:  # the whole model's source, as the prefill pages it
                    reference = model.allocate(model_blocks), [fixture.request_states(model, i)
                                                               for i in range(args.requests)]  # fmt: skip
                    fixture.fill(reference[0], {}, seed=1, dtype=layout.dtype)
                verified = fixture.verify(layout, args, reference, dst, states, per, model.block_size)
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
            _, nbytes, kind, piece = cmd
            pipe.send(baselines.receive(base_listener, args.streams, nbytes, kind, fixture.memory_views(dst, states),
                                        piece))  # fmt: skip
        elif cmd[0] == "rss":
            rss, hwm = rss_bytes()
            caches = sum(len(v) for v in fixture.memory_views(dst, states))
            pipe.send({"start": rss_start, "now": rss, "peak": hwm, "caches": caches})
    rx.close()


# -- the sender process --------------------------------------------------------------------
def sender_main(
    pipe, args: argparse.Namespace, secret: str, address, baseline_address, netns=None, rank: int = 0
) -> None:
    """``address``: the receiver's; with ``sharded(args)``, every decode rank's, in order."""
    if netns:
        netem._setns(f"/run/netns/{netns}")
    tune_malloc()
    torch.set_num_threads(1)
    layout, per, total_blocks = fixture.layout_and_blocks(args, "prefill", rank)
    src = layout.model().allocate(total_blocks)  # every rank fills the whole model alike
    fixture.fill(src, {}, seed=1, dtype=layout.dtype)
    states = [fixture.request_states(layout, i) for i in range(args.requests)]
    src = fixture.shard_caches(src, layout)  # then keeps its own heads
    tls = tlsutil.client_context(args.tls_paths, args.ktls) if getattr(args, "tls", False) else None
    options = dict(
        secret=secret, kv_caches=src, streams=args.streams, codec=args.codec, chunk_bytes=chunk_bytes(args),
        transport=args.transport, encode_threads=args.encode_threads, exact_tokens=args.exact_tokens, tls=tls,
        checksum=getattr(args, "checksum", None), max_streams=args.max_streams, socket_options=socket_options(args),
    )  # fmt: skip
    kind = kvwire.ShardedSender if sharded(args) else kvwire.Sender
    tx = kind(layout, address, **options)
    gc.freeze()  # see kvwire/tuning.py
    single = None
    if args.compare_single_stream:  # the same sender, on one connection that stays one
        single = kvwire.Sender(layout, address, **{**options, "streams": 1, "max_streams": 1})
    pipe.send("ready")
    while True:
        cmd = pipe.recv()
        if cmd[0] == "quit":
            break
        if cmd[0] == "send":
            sender = single if len(cmd) > 3 and cmd[3] else tx
            pipe.send(send_round(sender, layout, args, cmd[1], per, states, streamed=cmd[2]))
        elif cmd[0] == "baseline":
            _, nbytes, kind, piece = cmd
            pipe.send(baselines.send(baseline_address, args.streams, nbytes, kind, fixture.memory_views(src, states),
                                     piece))  # fmt: skip
        elif cmd[0] == "stats":
            pipe.send(sender_stats(tx))
    tx.close()
    if single is not None:
        single.close()


def sender_stats(tx) -> dict:
    """A Sender's statistics; a ShardedSender's connections to every decode rank together."""
    if not isinstance(tx, kvwire.ShardedSender):
        return tx.stats()
    return merged_stats({f"decode rank {d}": x.stats() for d, x in tx.senders.items()})


def merged_stats(each: dict[str, dict]) -> dict:
    """Several senders' statistics as one (keys name them): connections together, each
    one's connection policy and link model by name."""
    if len(each) == 1:
        return next(iter(each.values()))
    policies = {name: x["streams_policy"] for name, x in each.items()}
    return {"connections": [c for x in each.values() for c in x["connections"]],
            "staging": next(iter(each.values()))["staging"] if each else {},
            "spans": all(x.get("spans", False) for x in each.values()),
            "streams_policy": {"connections": sum(p["connections"] for p in policies.values()),
                               "reason": "; ".join(f"{name}: {p['reason']}" for name, p in policies.items()),
                               "each": policies},
            "link": {name: x["link"] for name, x in each.items()}}  # fmt: skip


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
            sent = [c["bytes_sent"] for c in sender_stats(self.tx)["connections"]]
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


def send_round(tx, layout, args, round_: int, per: int, states, streamed: bool) -> dict:
    """One round; its window (time, CPU, the machine's ticks) runs from the first
    ``send_layer`` to the last acknowledgement, so a paced prefill's first layer is not in it."""
    round_rss = rss_bytes()[0]
    reset_peak_rss()
    transfers = [
        tx.transfer(f"{round_}-{i}", fixture.src_blocks(i, per), args.tokens, states=states[i], deadline=600)
        for i in range(args.requests)
    ]
    timeline = []
    if args.layer_ms and not streamed:
        time.sleep(layout.num_layers * args.layer_ms / 1e3)  # the whole prefill, then the transfer
    for layer in range(layout.num_layers):
        if args.layer_ms and streamed:
            time.sleep(args.layer_ms / 1e3)  # this layer's share of the prefill
        if layer == 0:
            cpu0, machine0 = cpu_seconds(), machine_ticks()
            t0 = time.monotonic()
            sampler = _Sampler(tx, t0, show=False)
        produced = time.monotonic() - t0
        for t in transfers:
            t.send_layer(layer)
        timeline.append({"layer": layer, "produced_s": produced})
    prefill_end = time.monotonic()
    sampler.show = not args.quiet and sys.stderr.isatty()  # no carriage returns in a log
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
        "cpu_s": cpu_seconds() - cpu0,
        "machine_ticks": machine_delta(machine0, machine_ticks()),
        "rss_growth": rss_bytes()[1] - round_rss,
        "timeline": timeline,
        "chunk_bytes": chunk_bytes_of(tx),  # in effect: the receiver's slot_bytes caps it
    }


def chunk_bytes_of(tx) -> int | None:
    """The chunk size a Sender (a ShardedSender: the smallest of its senders') cuts to;
    None for a prefill rank that sends nothing (MLA: one rank per decode rank sends)."""
    senders = tx.senders.values() if isinstance(tx, kvwire.ShardedSender) else [tx]
    return min((s.stats()["chunk_bytes"] for s in senders), default=None)


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
    rx_ns, tx_ns = (link.ns["b"], link.ns["a"]) if link else (None, None)
    host = link.address_b if link else "127.0.0.1"
    n_rx, n_tx = (args.decode_tp, args.prefill_tp) if sharded(args) else (1, 1)
    receivers: list[tuple] = []  # (pipe, process) per decode rank, then per prefill rank
    senders: list[tuple] = []
    home: list[tuple] = []  # --compare-homogeneous: its 1 -> 1 receiver, then sender
    home_args = homogeneous_args(args) if getattr(args, "compare_homogeneous", False) else None

    def start(group: list, target, name: str, run_args, *rest) -> None:
        pipe, child = ctx.Pipe()
        process = ctx.Process(target=target, args=(child, run_args, secret, *rest), name=name)
        process.start()
        group.append((pipe, process))

    try:
        for d in range(n_rx):
            start(receivers, receiver_main, "kvwire-bench-receiver" + (f"-{d}" if n_rx > 1 else ""), args, rx_ns,
                  host, d)  # fmt: skip
        addresses = [_recv(pipe, process, 120) for pipe, process in receivers]
        peer = [a["address"] for a in addresses] if sharded(args) else addresses[0]["address"]
        for r in range(n_tx):
            start(senders, sender_main, "kvwire-bench-sender" + (f"-{r}" if n_tx > 1 else ""), args, peer,
                  addresses[0]["baseline_address"], tx_ns, r)  # fmt: skip
        if home_args is not None:
            start(home, receiver_main, "kvwire-bench-receiver-1to1", home_args, rx_ns, host, 0)
            home_address = _recv(home[0][0], home[0][1], 120)
            start(home, sender_main, "kvwire-bench-sender-1to1", home_args, home_address["address"],
                  home_address["baseline_address"], tx_ns, 0)  # fmt: skip
            _recv(home[1][0], home[1][1], 300)
        _all(senders, None, 300)
        (rx_pipe, receiver), (tx_pipe, sender) = receivers[0], senders[0]  # the only pair without sharding
        rounds, singles, homes, overlap = [], [], [], None
        measured: dict[str, list] = {kind: [] for kind in baselines.BASELINES}
        for r in range(args.rounds):
            _all(receivers, ("expect", r), 60)
            sent = merge_sent(_all(senders, ("send", r, True), 900))
            if sharded(args):
                # The request's bytes, once: a latent (or heads) replicated over decode ranks is
                # sent to each, and those copies are wire work, not more KV delivered.
                sent["delivered_logical_bytes"] = sent["logical_bytes"]
                sent["logical_bytes"] = layout.request_bytes(args.tokens) * args.requests
            received = merge_received(_all(receivers, None, 900))
            rounds.append((sent, received))
            if args.quiet is False:
                progress(
                    f"  round {r + 1}/{args.rounds}: {sent['wire_bytes'] / sent['seconds'] / 1e9:.3f} GB/s wire, "
                    f"verified={received['verified']}"
                )
            if home_args is not None:
                (home_rx, home_receiver), (home_tx, home_sender) = home
                home_rx.send(("expect", r))
                _recv(home_rx, home_receiver, 60)
                home_tx.send(("send", r, True))
                homes.append((_recv(home_tx, home_sender, 900), _recv(home_rx, home_receiver, 900)))
                if args.quiet is False:
                    sent_home = homes[-1][0]
                    progress(f"  1 -> 1, {home_args.streams} connections, {r + 1}/{args.rounds}: "
                             f"{sent_home['wire_bytes'] / sent_home['seconds'] / 1e9:.3f} GB/s wire, "
                             f"verified={homes[-1][1]['verified']}")  # fmt: skip
            if args.compare_single_stream:
                rx_pipe.send(("expect", f"single-{r}"))
                _recv(rx_pipe, receiver, 60)
                tx_pipe.send(("send", f"single-{r}", True, True))
                one = _recv(tx_pipe, sender, 1800)
                singles.append((one, _recv(rx_pipe, receiver, 1800)))
                if args.quiet is False:
                    progress(
                        f"  1 connection {r + 1}/{args.rounds}: {one['wire_bytes'] / one['seconds'] / 1e9:.3f} GB/s"
                    )
            if args.baseline:
                nbytes = sent["wire_bytes"]
                # the checked baselines frame their pieces as kvwire's chunks were in this run
                piece = sent["chunk_bytes"] or baselines.CHECKED_PIECE
                for kind, title in baselines.BASELINES.items():
                    rx_pipe.send(("baseline", nbytes, kind, piece))
                    tx_pipe.send(("baseline", nbytes, kind, piece))
                    b_sent = _recv(tx_pipe, sender, 900)
                    b_recv = _recv(rx_pipe, receiver, 900)
                    measured[kind].append((b_sent, b_recv, nbytes))
                    if args.quiet is False:
                        progress(f"  {title} {r + 1}/{args.rounds}: {nbytes / b_sent['seconds'] / 1e9:.3f} GB/s")
        if args.layer_ms:
            _all(receivers, ("expect", args.rounds), 60)
            overlap = merge_sent(_all(senders, ("send", args.rounds, False), 900)), merge_received(
                _all(receivers, None, 900))  # fmt: skip
        stats = _all(senders, ("stats",), 60)
        tx_stats = merged_stats({f"prefill rank {i}": s for i, s in enumerate(stats)})
        rss = _all(receivers, ("rss",), 60)
        rss_all = {"start": sum(x["start"] for x in rss), "now": sum(x["now"] for x in rss),
                   "peak": max(x["peak"] for x in rss), "caches": sum(x["caches"] for x in rss)}  # fmt: skip
        report = loopback_report.build(args, layout, rounds, measured, singles, overlap, tx_stats, rss_all)
        if sharded(args):
            report["tensor_parallel"] = {"prefill": n_tx, "decode": n_rx, "prefill_block_size": layout.block_size,
                                         "decode_block_size": args.decode_block_size or layout.block_size,
                                         "pairs": pairs(args)}  # fmt: skip
        if homes:
            home_tx, home_sender = home[1]
            home_tx.send(("stats",))
            report["homogeneous"] = loopback_report.homogeneous(report, homes, home_args,
                                                                _recv(home_tx, home_sender, 60))  # fmt: skip
        return report
    finally:
        # The senders first: a receiver that closed first would show up as lost connections.
        for pipe, p in senders + home[1:] + receivers + home[:1]:
            try:
                pipe.send(("quit",))
            except (BrokenPipeError, OSError):
                pass
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def _all(group: list, command, timeout: float) -> list:
    """Send ``command`` (unless None) to every process of ``group``, then each one's answer."""
    if command is not None:
        for pipe, _ in group:
            pipe.send(command)
    return [_recv(pipe, process, timeout) for pipe, process in group]


def merge_sent(parts: list[dict]) -> dict:
    """One round as the prefill ranks sent it together: from the first rank's start to the
    last rank's acknowledgement; bytes, CPU and memory summed (the machine's, all ranks')."""
    if len(parts) == 1:
        return parts[0]
    t0 = min(p["t0_monotonic"] for p in parts)
    end = max(p["t0_monotonic"] + p["seconds"] for p in parts)
    first = min(parts, key=lambda p: p["t0_monotonic"])
    return {
        **{k: sum(p[k] for p in parts) for k in ("wire_bytes", "logical_bytes", "resent_chunks", "cpu_s")},
        # the whole machine's: every rank saw about the same window, so the longest one, not a sum
        "machine_ticks": max((p.get("machine_ticks", {}) for p in parts), key=lambda t: sum(t.values())),
        "rss_growth": sum(p["rss_growth"] for p in parts),
        "t0_monotonic": t0,
        "seconds": end - t0,
        "exposed_ms": max(p["exposed_ms"] for p in parts),
        "samples": [],  # per process; not merged (--plot is refused with ranks)
        "chunk_bytes": min((p["chunk_bytes"] for p in parts if p.get("chunk_bytes")), default=None),
        "timeline": [{**t, "produced_s": t["produced_s"] + first["t0_monotonic"] - t0} for t in first["timeline"]],
    }


def merge_received(parts: list[dict]) -> dict:
    """One round as the decode ranks received it: every rank verified, the latest delivery."""
    if len(parts) == 1:
        return parts[0]
    errors = [f"decode rank {d}: {p['error']}" for d, p in enumerate(parts) if p["error"]]
    verified = [p["verified"] for p in parts]
    stats = {
        **parts[0]["stats"],
        **{k: sum(p["stats"].get(k, 0) for p in parts) for k in ("lane_frames", "frames")},
        "spans": all(p["stats"].get("spans", False) for p in parts),
    }  # staging: rank 0's (the report says so)
    return {
        "error": "; ".join(errors) or None,
        "cpu_s": sum(p["cpu_s"] for p in parts),
        "verified": None if None in verified else all(verified),
        "stats": stats,
        "rss_growth": sum(p["rss_growth"] for p in parts),
        "layer_delivered_monotonic": [max(v) for v in zip(*(p["layer_delivered_monotonic"] for p in parts))],
    }


def _recv(pipe, process, timeout: float):
    end = time.monotonic() + timeout
    while not pipe.poll(0.2):
        if not process.is_alive():
            raise RuntimeError(f"{process.name} exited with code {process.exitcode}")
        if time.monotonic() > end:
            raise RuntimeError(f"{process.name} did not answer within {timeout} s")
    return pipe.recv()
