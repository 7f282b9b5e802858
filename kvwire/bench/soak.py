"""``kvwire-bench soak``: a long run of requests that end every way, watching for growth.

A sender process and a receiver process move small requests one after another for
``--minutes``. The requests end in turn as: completed, cancelled by the sender mid-way,
cancelled by the receiver mid-way, never expected (the sender's deadline passes), and
refused (the two sides disagree on the token count). Every ``--sample-s`` seconds each
process reports its RSS, open file descriptors, threads and kvwire's own record counts
(``census()``). After a warm-up, anything that keeps growing is flagged: a long-running
deployment must stay flat.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import threading
import time

import kvwire
from kvwire.bench import profiles

FATES = ("ok", "ok", "ok", "sender-cancel", "ok", "receiver-cancel", "ok", "never-expected", "ok", "refused")
SECRET = "kvwire-soak-secret"
PER_REQUEST_RECORDS = ("requests", "tags", "expected", "parked_chunks", "transfers", "inflight_chunks",
                       "queued_chunks", "begun_tags")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument("--warmup-s", type=float, default=60.0, help="samples before this are not judged (default 60)")
    p.add_argument("--profile", default="llama3-8b", choices=sorted(profiles.PROFILES), help="model profile")
    p.add_argument("--tokens", type=int, default=64, help="tokens per request (default 64: 8 MiB for llama3-8b)")
    p.add_argument("--streams", type=int, default=4, help="connections (default 4)")
    p.add_argument("--codec", default="raw", help="codec (default raw)")


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("minutes", "sample_s", "warmup_s"):
        value = getattr(args, name)
        if not value > 0 or value != value:
            raise ValueError(f"--{name.replace('_', '-')}: must be a positive number, got {value}")
    if args.tokens < 1:
        raise ValueError(f"--tokens: must be at least 1, got {args.tokens}")


def process_sample(census: dict) -> dict:
    """This process's RSS, descriptors and threads, with kvwire's record counts."""
    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return {
        "rss_bytes": rss,
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        # per-request records (they must come back to zero); the census's bounded memories
        # (ended tags, cancelled ids) and its gauges are reported but not summed here
        "records": sum(census.get(k, 0) for k in PER_REQUEST_RECORDS),
        "census": census,
    }


def _blocks(layout: kvwire.KVLayout, tokens: int) -> list[int]:
    return list(range(-(-tokens // layout.block_size)))


def receiver_main(pipe, profile: str, tokens: int) -> None:
    layout = profiles.get(profile).layout()
    blocks = _blocks(layout, tokens)
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(len(blocks)), unclaimed_timeout=2.0)
    pipe.send(rx.address)
    handles: dict[str, kvwire.ReceiveHandle] = {}
    states = layout.allocate_states()
    while True:
        cmd = pipe.recv()
        if cmd[0] == "expect":
            _, request_id, fate = cmd
            n = tokens - 1 if fate == "refused" else tokens
            handles[request_id] = rx.expect(request_id, blocks[: -(-n // layout.block_size)], n, states=states,
                                            deadline=30)  # fmt: skip
            pipe.send("ok")
        elif cmd[0] == "result":
            _, request_id, fate = cmd
            h = handles.pop(request_id)
            try:
                if fate == "receiver-cancel":
                    h.wait_layer(0, timeout=30)
                    h.cancel("soak: the receiver gives up")
                h.wait(timeout=30)
                pipe.send("completed")
            except kvwire.TransferError as exc:
                pipe.send(type(exc).__name__)
        elif cmd[0] == "sample":
            pipe.send(process_sample(rx.census()))
        else:
            rx.close()
            pipe.send("closed")
            return


def sender_main(pipe, address, profile: str, tokens: int, streams: int, codec: str) -> None:
    layout = profiles.get(profile).layout()
    blocks = _blocks(layout, tokens)
    src = layout.allocate(len(blocks))
    states = layout.allocate_states()
    tx = kvwire.Sender(layout, address, secret=SECRET, kv_caches=src, streams=streams, codec=codec)
    pipe.send("ready")
    while True:
        cmd = pipe.recv()
        if cmd[0] == "send":
            _, request_id, fate = cmd
            deadline = 0.3 if fate == "never-expected" else 30.0
            t = tx.transfer(request_id, blocks, tokens, states=states, deadline=deadline)
            try:
                for i in range(layout.num_layers):
                    t.send_layer(i)
                    if fate == "sender-cancel" and i == 0:
                        t.cancel("soak: the sender gives up")
                        break
                    if fate == "receiver-cancel" and i == 0:
                        while not t.done():  # the receiver cancels once layer 0 is in place
                            time.sleep(0.001)
                        break
                t.finish()
                pipe.send("completed")
            except kvwire.TransferError as exc:
                pipe.send(type(exc).__name__)
        elif cmd[0] == "sample":
            pipe.send(process_sample(tx.census()))
        else:
            tx.close()
            pipe.send("closed")
            return


def run(args: argparse.Namespace, progress=print) -> dict:
    check_arguments(args)
    ctx = multiprocessing.get_context("spawn")
    rx_pipe, rx_end = ctx.Pipe()
    tx_pipe, tx_end = ctx.Pipe()
    receiver = ctx.Process(target=receiver_main, args=(rx_end, args.profile, args.tokens), daemon=True)
    receiver.start()
    rx_end.close()  # the child holds it now: if the child dies, recv here ends with EOFError
    address = _reply(rx_pipe, "receiver")
    sender = ctx.Process(target=sender_main, daemon=True,
                         args=(tx_end, address, args.profile, args.tokens, args.streams, args.codec))  # fmt: skip
    sender.start()
    tx_end.close()
    _reply(tx_pipe, "sender")
    samples: list[dict] = []
    outcomes: dict[str, dict[str, int]] = {}
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    next_sample = t0
    i = 0
    try:
        while True:
            now = time.monotonic()
            # Sampled only after a completed request: one that just failed may still have
            # data parked for a moment (its CANCEL on the way), which is not a leak.
            if now >= next_sample and (i == 0 or FATES[(i - 1) % len(FATES)] == "ok"):
                rx_pipe.send(("sample",))
                tx_pipe.send(("sample",))
                sample = {"t_s": round(now - t0, 1), "requests": i, "receiver": _reply(rx_pipe, "receiver"),
                          "sender": _reply(tx_pipe, "sender")}  # fmt: skip
                samples.append(sample)
                progress(_sample_line(sample))
                next_sample += args.sample_s
                if now >= end:
                    break
            fate = FATES[i % len(FATES)]
            request_id = f"soak-{i}-{fate}"
            expected = fate != "never-expected"
            if expected:
                rx_pipe.send(("expect", request_id, fate))
                _reply(rx_pipe, "receiver")
            tx_pipe.send(("send", request_id, fate))
            if expected:  # both sides at once: a receiver-side cancel needs the data flowing
                rx_pipe.send(("result", request_id, fate))
            sent = _reply(tx_pipe, "sender")
            received = _reply(rx_pipe, "receiver") if expected else None
            counts = outcomes.setdefault(fate, {})
            key = f"{sent}/{received}" if received else sent
            counts[key] = counts.get(key, 0) + 1
            i += 1
    finally:
        for pipe in (tx_pipe, rx_pipe):
            try:
                pipe.send(("stop",))
                pipe.recv()
            except (OSError, EOFError):
                pass
        sender.join(10)
        receiver.join(10)
    return {"kind": "soak", "args": vars(args) | {"func": None}, "requests": i, "outcomes": outcomes,
            "samples": samples, "growth": judge(samples, args.warmup_s)}  # fmt: skip


def _reply(pipe, who: str, timeout: float = 120.0):
    if not pipe.poll(timeout):
        raise RuntimeError(f"the {who} process did not answer within {timeout:.0f} s")
    try:
        return pipe.recv()
    except EOFError:
        raise RuntimeError(f"the {who} process ended (see its traceback above)") from None


def _sample_line(s: dict) -> str:
    r, t = s["receiver"], s["sender"]
    return (
        f"  {s['t_s']:7.1f} s  {s['requests']:7d} requests | receiver RSS {r['rss_bytes'] / 2**20:7.1f} MiB, "
        f"{r['fds']} fds, {r['threads']} threads, {r['records']} records | sender RSS "
        f"{t['rss_bytes'] / 2**20:7.1f} MiB, {t['fds']} fds, {t['threads']} threads, {t['records']} records"
    )


# Growth allowed after warm-up before a figure is flagged: RSS moves by allocator noise,
# descriptors and threads by a connection being replaced; records must come back to zero.
RSS_TOLERANCE_BYTES = 16 << 20
COUNT_TOLERANCE = 2


def judge(samples: list[dict], warmup_s: float) -> dict:
    """Per side and figure: the value after warm-up, at the end, and whether it grew."""
    judged = [s for s in samples if s["t_s"] >= warmup_s]
    out: dict = {}
    if len(judged) < 2:
        return {"note": "too few samples after the warm-up to judge growth"}
    for side in ("receiver", "sender"):
        for figure, tolerance in (("rss_bytes", RSS_TOLERANCE_BYTES), ("fds", COUNT_TOLERANCE),
                                  ("threads", COUNT_TOLERANCE), ("records", COUNT_TOLERANCE)):  # fmt: skip
            first, last = judged[0][side][figure], judged[-1][side][figure]
            peak = max(s[side][figure] for s in judged)
            out[f"{side}_{figure}"] = {"after_warmup": first, "end": last, "peak": peak,
                                        "grew": last - first > tolerance}  # fmt: skip
    return out


def rows(report: dict) -> list[list[object]]:
    out = []
    for key, g in report["growth"].items():
        if not isinstance(g, dict):
            continue
        scale = 2**20 if key.endswith("rss_bytes") else 1
        name = key.replace("_rss_bytes", " RSS MiB").replace("_", " ")
        out.append([name, round(g["after_warmup"] / scale, 1), round(g["end"] / scale, 1),
                    round(g["peak"] / scale, 1), "GREW" if g["grew"] else "flat"])  # fmt: skip
    return out
