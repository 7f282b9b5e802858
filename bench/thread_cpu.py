"""Where a loopback transfer's CPU goes, per thread: CPU seconds per GB and context
switches per frame of each kind of thread on both sides (with the user-space part of
each thread's CPU: the rest is system time, the kernel's copies and TCP).

    python3 bench/thread_cpu.py [--tokens 8192] [--rounds 6] [--streams 4] [--checksum none] [--chunk-kib 2048]

A receiver process and a sender (this process) move the llama3-8b profile's KV (1 GiB at
8192 tokens) into blocks in reverse order, as ``kvwire-bench loopback`` does (or in order:
``--destination forward``), round after round. Counters are read from
``/proc/self/task/<tid>`` after the first round (warm-up), so the figures cover rounds
2..N. Threads are grouped by their name without the index (``kvwire-recv``,
``kvwire-send``, ``kvwire-ack``...). Nothing is verified: this measures,
``kvwire-bench loopback`` checks.

The last line splits the whole machine's CPU time over the same rounds (``/proc/stat``:
user, system, softirq, idle): softirq (TCP's receive path, run on behalf of no thread)
is in no thread's figure above, and idle says whether the two sides left CPU unused.

``--plain`` moves the same bytes over as many connections with plain sockets, cache to
cache (the ``kvwire-bench loopback --baseline`` reference), instead of kvwire: its
threads live one round each, so each side is reported as a whole process.

``--decode-tp D`` sends to D receiver processes, each holding 1/D of the heads (one
prefill rank, a ``ShardedSender``, as ``kvwire-bench loopback --prefill-tp 1 --decode-tp
D``); ``--streams`` connections go to each; the receivers are reported one by one, each
per GB it received.

``--local-sndbuf-kib N`` sets the sender's send buffer on loopback (0: the kernel's
autotuning, as before ``SocketOptions.local_sndbuf``); with ``--plain``, plain sockets'
senders get the same buffer, to ask whether they would gain as much.

``--perf`` also samples every CPU with ``perf record -a`` over the same rounds and
prints CPU s/GB by kind of thread (``tx``: sender, ``rx``: receiver) and by what ran
(the interpreter, the kernel's copies, work with interrupts off, ...; see
``bench/perf_split.py``). Run it once with and once without ``--plain`` to see where
kvwire's extra CPU per GB goes. Sampling costs a little CPU of its own (perf's thread).
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import resource
import socket
import threading
import time

import perf_split  # bench/perf_split.py, beside this script
import torch

import kvwire
from kvwire.bench import baselines, profiles
from kvwire.bench.fixture import memory_views
from kvwire.bench.loopback import receiver_slot_bytes, socket_options
from kvwire.bench.procstats import machine_delta, machine_split, machine_ticks
from kvwire.engine.sender import DEFAULT_CHUNK_BYTES

SECRET = "thread-cpu-benchmark"
TICKS = os.sysconf("SC_CLK_TCK")


def machine_report(before: dict[str, int], after: dict[str, int]) -> str:
    split = machine_split(machine_delta(before, after))
    return "machine: " + ", ".join(f"{kind} {share:.0%}" for kind, share in split.items())


def per_thread() -> collections.Counter:
    """CPU seconds and context switches of this process's threads, by kind of thread."""
    out: collections.Counter = collections.Counter()
    for thread in threading.enumerate():
        kind = thread.name.rstrip("0123456789-")
        task = f"/proc/self/task/{thread.native_id}"
        try:
            fields = open(f"{task}/stat").read().rsplit(")", 1)[1].split()
            out[("cpu", kind)] += (int(fields[11]) + int(fields[12])) / TICKS
            out[("user", kind)] += int(fields[11]) / TICKS  # the rest is the kernel's
            for line in open(f"{task}/status"):
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    name, value = line.split(":")
                    out[("switches", f"{kind} {'voluntary' if name[0] == 'v' else 'preempted'}")] += int(value)
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return out


def deltas(before: collections.Counter, after: collections.Counter) -> dict[tuple[str, str], float]:
    """Each (figure, kind of thread) counter's growth from ``before`` to ``after``."""
    return {key: after[key] - before.get(key, 0) for key in after}


def report(side: str, before: collections.Counter, after: collections.Counter, nbytes: int, frame_bytes: int) -> str:
    gb, frames = nbytes / 1e9, nbytes / frame_bytes
    delta = deltas(before, after)
    cpu = sorted(((k, v) for (what, k), v in delta.items() if what == "cpu" and v > 0), key=lambda x: -x[1])
    switches = sorted(((k, v) for (what, k), v in delta.items() if what == "switches" and v > 0), key=lambda x: -x[1])
    return "\n".join([
        f"{side}: {sum(v for _, v in cpu) / gb:.3f} CPU s/GB: "
        + ", ".join(f"{k} {v / gb:.3f} (user {delta.get(('user', k), 0) / gb:.3f})" for k, v in cpu),
        f"{side}: {sum(v for _, v in switches) / frames:.1f} context switches per {frame_bytes >> 10} KiB frame: "
        + ", ".join(f"{k} {v / frames:.1f}" for k, v in switches),
    ])  # fmt: skip


def process_usage() -> tuple[float, int]:
    """This process's CPU seconds and context switches so far, ended threads included."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_nvcsw + r.ru_nivcsw


def process_figures(before: tuple[float, int], nbytes: int) -> dict[str, float]:
    """This process's CPU seconds per GB and context switches per 2 MiB since ``before``."""
    cpu, switches = (now - then for now, then in zip(process_usage(), before))
    return {"cpu_s_per_gb": cpu / (nbytes / 1e9), "switches_per_2mib": switches / (nbytes / (2 << 20))}


def process_report(side: str, figures: dict[str, float]) -> str:
    return (f"{side}, the whole process: {figures['cpu_s_per_gb']:.3f} CPU s/GB, "
            f"{figures['switches_per_2mib']:.1f} context switches per 2 MiB")  # fmt: skip


def kind_figures(before: collections.Counter, after: collections.Counter, nbytes: int) -> dict[str, float]:
    """CPU seconds per GB by kind of thread (``kvwire-send``, ``kvwire-encoder``...)."""
    gb = nbytes / 1e9
    return {k: v / gb for (what, k), v in deltas(before, after).items() if what == "cpu"}


def thread_kinds(side: str) -> dict[int, str]:
    """Native thread id -> "<side> <kind>" for this process's live threads (plain sockets'
    per-round threads are gone by then: the profile knows them by their kernel names,
    ``plain-send``, ``plain-recv``)."""
    named = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    return {tid: f"{side} {name.rstrip('0123456789-')}" for tid, name in named.items()}


def layout_and_blocks(tokens: int) -> tuple[kvwire.KVLayout, int]:
    layout = profiles.get("llama3-8b").layout()
    return layout, -(-tokens // layout.block_size)


def receiver(pipe, args: argparse.Namespace, rank: int = 0) -> None:
    torch.set_num_threads(1)
    layout, blocks = layout_and_blocks(args.tokens)
    if args.decode_tp > 1:
        layout = layout.shard(rank, args.decode_tp)
    side = "receiver" if args.decode_tp == 1 else f"receiver {rank}"
    caches = layout.allocate(blocks)
    for layer in caches:
        for tensor in layer.values():
            tensor.fill_(0)  # touched now, not on the first round's receive
    nbytes = args.tokens * layout.bytes_per_token()
    if args.plain:
        listener = socket.create_server(("127.0.0.1", 0), backlog=args.streams)
        pipe.send(listener.getsockname())
    else:
        rx = kvwire.Receiver(layout, ("127.0.0.1", 0), secret=SECRET, kv_caches=caches, checksum=args.checksum,
                             slot_bytes=receiver_slot_bytes(args), receive_lane=not args.no_receive_lane)  # fmt: skip
        pipe.send(rx.address)
    start, usage0 = per_thread(), process_usage()
    for r in range(args.rounds):
        if r == 1:
            start, usage0 = per_thread(), process_usage()
        pipe.send("ready")
        if args.plain:
            baselines.receive(listener, args.streams, nbytes, "cache", memory_views(caches))
            continue
        order = list(range(blocks)) if args.destination == "forward" else list(reversed(range(blocks)))
        handle = rx.expect(f"round-{r}", order, args.tokens, deadline=600)
        handle.wait()
    moved = (args.rounds - 1) * nbytes
    figures = process_figures(usage0, moved)
    text = process_report(side, figures)
    if not args.plain:
        text = report(side, start, per_thread(), moved, args.chunk_kib << 10) + "\n" + text
    pipe.send((text, thread_kinds("rx" if args.decode_tp == 1 else f"rx{rank}"), figures))
    pipe.recv()  # the sender is done: closing now cannot race its last acknowledgement
    if args.plain:
        listener.close()
    else:
        rx.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per round (8192: 1 GiB)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds; the first one is a warm-up")
    parser.add_argument("--streams", type=int, default=4, help="TCP connections (fixed)")
    parser.add_argument("--checksum", choices=("crc32c", "none"), default="crc32c")
    parser.add_argument("--chunk-kib", type=int, default=DEFAULT_CHUNK_BYTES >> 10, help="target frame payload")
    parser.add_argument("--local-sndbuf-kib", type=int, default=None,
                        help="the sender's SO_SNDBUF on loopback in KiB (default: the library's; 0: the kernel's "
                             "autotuning); with --plain, set on plain sockets' senders too")  # fmt: skip
    parser.add_argument(
        "--source",
        choices=("forward", "reverse"),
        default="forward",
        help="the sender's blocks in order (one run a chunk) or reversed (one run a block)",
    )
    parser.add_argument(
        "--destination",
        choices=("forward", "reverse"),
        default="reverse",
        help="the receiver's blocks reversed (one run a block) or in order (one run a chunk)",
    )
    parser.add_argument("--decode-tp", type=int, default=1,
                        help="receiver processes, each with its share of the heads (one prefill rank)")  # fmt: skip
    parser.add_argument("--plain", action="store_true", help="plain sockets cache to cache instead of kvwire")
    parser.add_argument("--no-receive-lane", action="store_true",
                        help="every frame through the receiver's Python loop (for comparisons)")  # fmt: skip
    parser.add_argument("--perf", action="store_true", help="also split the machine's CPU with perf record -a")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the figures there (bench/alternate.py --thread-cpu reads them)")  # fmt: skip
    args = parser.parse_args()
    if args.rounds < 2 or args.tokens < 1 or args.streams < 1 or args.chunk_kib < 4 or args.decode_tp < 1:
        parser.error("--rounds must be at least 2, --tokens, --streams and --decode-tp at least 1, --chunk-kib at "
                     "least 4")  # fmt: skip
    try:
        sockets = socket_options(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.plain and args.decode_tp > 1:
        parser.error("--plain: one receiver only (plain sockets know no heads)")
    if args.perf and (why := perf_split.available()) is not None:
        parser.error(f"--perf: {why}")
    torch.set_num_threads(1)
    pipes, children = [], []
    for rank in range(args.decode_tp):
        here, there = multiprocessing.Pipe()
        child = multiprocessing.get_context("spawn").Process(target=receiver, args=(there, args, rank))
        child.start()
        pipes.append(here)
        children.append(child)
    layout, blocks = layout_and_blocks(args.tokens)
    caches = layout.allocate(blocks)
    for tensors in caches:
        for tensor in tensors.values():
            tensor.copy_(torch.randn(tensor.shape).to(tensor.dtype))
    addresses = [pipe.recv() for pipe in pipes]
    address = addresses[0]
    round_bytes = args.tokens * layout.bytes_per_token()
    tx: kvwire.Sender | kvwire.ShardedSender | None = None
    options = dict(secret=SECRET, kv_caches=caches, streams=args.streams, max_streams=args.streams,
                   checksum=args.checksum, chunk_bytes=args.chunk_kib << 10, socket_options=sockets)  # fmt: skip
    if args.decode_tp > 1:
        tx = kvwire.ShardedSender(layout, addresses, **options)
    elif not args.plain:
        tx = kvwire.Sender(layout, address, **options)
    profile = perf_split.SystemProfile() if args.perf else None
    start, usage0, t0, machine0 = per_thread(), process_usage(), time.monotonic(), machine_ticks()
    for r in range(args.rounds):
        if any(pipe.recv() != "ready" for pipe in pipes):
            raise RuntimeError("a receiver process did not get ready")
        if r == 1:
            if profile is not None:
                profile.start()
            start, usage0, t0, machine0 = per_thread(), process_usage(), time.monotonic(), machine_ticks()
        if tx is None:
            baselines.send(address, args.streams, round_bytes, "cache", memory_views(caches),
                           sndbuf=sockets.local_sndbuf if args.local_sndbuf_kib is not None else None)  # fmt: skip
            continue
        order = list(range(blocks)) if args.source == "forward" else list(reversed(range(blocks)))
        transfer = tx.transfer(f"round-{r}", order, args.tokens, deadline=600)
        for layer in range(layout.num_layers):
            transfer.send_layer(layer)
        transfer.finish()
    nbytes = (args.rounds - 1) * round_bytes
    seconds, machine1 = time.monotonic() - t0, machine_ticks()
    sent_figures = process_figures(usage0, nbytes)
    sent = process_report("sender", sent_figures)
    figures: dict = {"gb_per_s": nbytes / seconds / 1e9, "sender": sent_figures, "receivers": []}
    if profile is not None:
        profile.stop()
    what = "plain sockets, cache to cache" if tx is None else f"checksum {args.checksum}"
    print(f"{nbytes / seconds / 1e9:.2f} GB/s over rounds 2..{args.rounds} "
          f"({args.streams} connections, {what}; counters read outside the rounds)")  # fmt: skip
    if tx is not None:
        after = per_thread()
        print(report("sender", start, after, nbytes, args.chunk_kib << 10))
        figures["sender_threads"] = kind_figures(start, after, nbytes)
        stats = tx.stats()
        conns = [c for st in (stats.values() if args.decode_tp > 1 else [stats]) for c in st["connections"]]
        frames, sends = sum(c["data_frames"] for c in conns), sum(c["data_sends"] for c in conns)
        print(f"sender: {frames / max(sends, 1):.2f} DATA frames per send (all rounds)")
    print(sent)
    rx_kinds: dict[int, str] = {}
    for pipe in pipes:
        received, kinds, rx_figures = pipe.recv()
        print(received)
        rx_kinds.update(kinds)
        figures["receivers"].append(rx_figures)
    if isinstance(tx, kvwire.ShardedSender) and tx.row_checksums is not None and args.checksum != "none":
        print(f"sender: chunk CRCs of the decode ranks' heads {tx.row_checksums.counts}")
    print(machine_report(machine0, machine1))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=1)
    if profile is not None:
        kinds = {**thread_kinds("tx"), **rx_kinds}
        print(f"perf record -a over the same rounds ({perf_split.FREQUENCY} Hz per CPU):")
        print(perf_split.table(perf_split.split(profile.samples(), kinds), nbytes / 1e9))
        machine_s = sum(machine_delta(machine0, machine1).values()) / TICKS
        print(f"(/proc/stat counts {machine_s / (nbytes / 1e9):.4f} CPU s/GB over the same rounds, idle included)")
        profile.close()
    if tx is not None:
        tx.close()
    for pipe, child in zip(pipes, children):
        pipe.send("close")
        child.join()


if __name__ == "__main__":
    main()
