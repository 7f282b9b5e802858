"""``kvwire-bench vllm``: N requests through two real vLLM schedulers and the kvwire connector.

A decode process and a prefill process each run vLLM 0.33's scheduler with the connector
(:mod:`kvwire.bench.vllm_engines`: CPU caches, a stand-in model that writes each layer's
K/V and then waits ``--layer-ms``, as a GPU computing that layer would). The parent plays
the router: it gives both the same prompts with the pairing contract's parameters. With
``--link`` the two run in network namespaces joined by the emulated link
(:mod:`kvwire.bench.netem`, root only).

Per request it prints the transfer time (first segment opened to last acknowledged), the
time exposed after the last layer (last layer queued to last acknowledgement: what the
decode waits beyond the prefill's compute), how long the decode waited, and the blocks
each side held over time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time

from kvwire.bench import netem
from kvwire.bench.report import table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=8, help="requests (8)")
    p.add_argument("--tokens", type=int, default=512, help="prompt tokens per request (512)")
    p.add_argument("--layers", type=int, default=8, help="model layers (8)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (8)")
    p.add_argument("--head-dim", type=int, default=128, help="head size (128)")
    p.add_argument("--chunk-tokens", type=int, default=2048, help="the prefill's max_num_batched_tokens (2048)")
    p.add_argument("--segment-tokens", type=int, default=1024, help="tokens per kvwire transfer (1024)")
    p.add_argument("--codec", default="raw", help="raw, fp8, int4, any of them +lz4 (raw)")
    p.add_argument("--connections", type=int, default=4, help="TCP connections per pairing (4)")
    p.add_argument("--layer-ms", type=float, default=2.0, help="simulated compute per layer per step, ms (2)")
    p.add_argument("--link", metavar="SPEC", help="emulated link between the two, e.g. rtt=40ms,rate=2gbit (root)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds the whole run may take (300)")


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("requests", "tokens", "layers", "kv_heads", "head_dim", "chunk_tokens", "segment_tokens",
                 "connections"):  # fmt: skip
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be at least 1")
    if args.layer_ms < 0:
        raise ValueError("--layer-ms: must be >= 0")
    if args.link:
        netem.parse_link(args.link)
        if os.geteuid() != 0:
            raise ValueError("--link: needs root (it creates network namespaces and TUN devices)")


def _options(args, role: str, extra: dict):
    from kvwire.bench import vllm_engines as ve

    blocks_per_request = -(-args.tokens // ve.BLOCK) + 2
    return ve.Options(
        role, extra, layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
        num_blocks=args.requests * blocks_per_request + 16, max_batched_tokens=max(args.chunk_tokens, 256),
        max_num_seqs=max(args.requests, 1),
    )  # fmt: skip


def _extra(args, secret: str) -> dict:
    return {"secret": secret, "codec": args.codec, "connections": args.connections,
            "segment_tokens": args.segment_tokens, "deadline_s": max(60.0, args.timeout)}  # fmt: skip


def _blocks_used(engine) -> int:
    return engine.total_blocks - engine.free_blocks


def decode_main(pipe, args, secret: str, netns: str | None, host: str) -> None:
    if netns:
        netem._setns(f"/run/netns/{netns}")
    from kvwire.bench import vllm_engines as ve
    from kvwire.integrations.vllm import decode_params

    root = tempfile.mkdtemp(prefix="kvwire-bench-vllm-")
    engine = ve.make_engine(_options(args, "kv_consumer", _extra(args, secret) | {"listen": f"{host}:0"}), root)
    pipe.send({"address": engine.worker.worker.receiver.address})
    _, requests = pipe.recv()
    added: dict[str, float] = {}
    received: dict[str, float] = {}
    blocks: list[tuple[float, int]] = []
    engine.on_recving = lambda e, req_id: received.setdefault(req_id, time.monotonic())
    for tid, tokens in requests:
        added[f"d-{tid}"] = time.monotonic()
        engine.add(f"d-{tid}", tokens, decode_params(tid), max_tokens=2)
    end = time.monotonic() + args.timeout
    while not (len(engine.finished) == len(requests) and engine.idle()) and time.monotonic() < end:
        if not engine.step():
            time.sleep(0.001)
        blocks.append((time.monotonic(), _blocks_used(engine)))
    pipe.send({"added": added, "received": received, "finished": {k: str(v) for k, v in engine.finished.items()},
               "load_errors": len(engine.load_errors), "blocks": blocks})  # fmt: skip
    engine.close()


def prefill_main(pipe, args, secret: str, netns: str | None, peer: str) -> None:
    if netns:
        netem._setns(f"/run/netns/{netns}")
    from kvwire.bench import vllm_engines as ve
    from kvwire.integrations.vllm import prefill_params

    root = tempfile.mkdtemp(prefix="kvwire-bench-vllm-")
    engine = ve.make_engine(_options(args, "kv_producer", _extra(args, secret)), root)
    engine.layer_delay_s = args.layer_ms / 1e3
    sent: dict = {}

    def on_sent(req_id, handles):
        ok = all(h is not None and h.done() and h.stats()["total_ms"] is not None for h in handles)
        if not ok or not handles:
            sent[req_id] = {"ok": False}
            return
        acked = max(h.t_acked for h in handles)
        sent[req_id] = {
            "ok": all(h.stats()["error"] is None for h in handles),
            "opened": min(h.t_created for h in handles),
            "last_layer": max(h.t_last_layer for h in handles),
            "acked": acked,
            "wire_bytes": sum(h.stats()["wire_bytes"] for h in handles),
            "segments": len(handles),
        }

    engine.worker.worker.on_request_sent = on_sent
    pipe.send({"ready": True})
    _, requests = pipe.recv()
    blocks = []
    for tid, tokens in requests:
        engine.add(f"p-{tid}", tokens, prefill_params(tid, peer), max_tokens=1)
    end = time.monotonic() + args.timeout
    while not (len(sent) == len(requests) and engine.idle()) and time.monotonic() < end:
        if not engine.step():
            time.sleep(0.001)
        blocks.append((time.monotonic(), _blocks_used(engine)))
    pipe.send({"sent": sent, "blocks": blocks})
    engine.close()


def run(args: argparse.Namespace, progress=print) -> dict:
    check_arguments(args)
    if args.link:
        with netem.EmulatedLink(netem.parse_link(args.link)) as link:
            report = _run(args, progress, link)
            report["link"] = {"spec": args.link, **link.stats_now()}
            return report
    return _run(args, progress, None)


def _recv(pipe, process, timeout: float):
    if not pipe.poll(timeout):
        raise RuntimeError(f"{process.name} did not answer within {timeout:g} s (exit code {process.exitcode})")
    return pipe.recv()


def _run(args, progress, link) -> dict:
    import torch

    secret = os.urandom(16).hex()
    ctx = multiprocessing.get_context("spawn")
    d_pipe, d_child = ctx.Pipe()
    p_pipe, p_child = ctx.Pipe()
    host = link.address_b if link else "127.0.0.1"
    dec = ctx.Process(target=decode_main, args=(d_child, args, secret, link.ns["b"] if link else None, host),
                      name="decode")  # fmt: skip
    dec.start()
    pre = None
    try:
        address = _recv(d_pipe, dec, 180)["address"]
        peer = f"{address[0]}:{address[1]}"
        pre = ctx.Process(target=prefill_main, args=(p_child, args, secret, link.ns["a"] if link else None, peer),
                          name="prefill")  # fmt: skip
        pre.start()
        _recv(p_pipe, pre, 180)
        progress(f"  both engines up; decode's kvwire receiver at {peer}", flush=True)
        g = torch.Generator().manual_seed(0)
        requests = [
            (f"r{i}", torch.randint(1, 900, (args.tokens,), generator=g).tolist()) for i in range(args.requests)
        ]
        t0 = time.monotonic()
        d_pipe.send(("go", requests))  # the router sends both at once
        p_pipe.send(("go", requests))
        d_report = _recv(d_pipe, dec, args.timeout + 60)
        p_report = _recv(p_pipe, pre, args.timeout + 60)
    finally:
        for p in (pre, dec):
            if p is not None:
                p.join(timeout=20)
                if p.is_alive():
                    p.kill()
    return _report(args, requests, t0, p_report, d_report)


def _report(args, requests, t0: float, p_report: dict, d_report: dict) -> dict:
    rows = []
    for tid, _ in requests:
        s = p_report["sent"].get(f"p-{tid}", {"ok": False})
        got = d_report["received"].get(f"d-{tid}")
        added = d_report["added"].get(f"d-{tid}")
        rows.append({
            "request": tid,
            "ok": bool(s.get("ok")) and got is not None,
            "segments": s.get("segments"),
            "wire_bytes": s.get("wire_bytes"),
            "transfer_ms": (s["acked"] - s["opened"]) * 1e3 if s.get("ok") else None,
            "exposed_ms": (s["acked"] - s["last_layer"]) * 1e3 if s.get("ok") else None,
            "decode_wait_ms": (got - added) * 1e3 if got is not None and added is not None else None,
        })  # fmt: skip
    return {
        "kind": "vllm", "args": {k: v for k, v in vars(args).items() if k != "func"}, "requests": rows,
        "load_errors": d_report["load_errors"], "finished": d_report["finished"],
        "blocks": {"prefill": [(t - t0, n) for t, n in p_report["blocks"]],
                   "decode": [(t - t0, n) for t, n in d_report["blocks"]]},
    }  # fmt: skip


def request_rows(report: dict) -> list[list]:
    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    return [[r["request"], r["segments"] or "-", ms(r["transfer_ms"]), ms(r["exposed_ms"]), ms(r["decode_wait_ms"]),
             "yes" if r["ok"] else "NO"] for r in report["requests"]]  # fmt: skip


def blocks_rows(report: dict, buckets: int = 10) -> list[list]:
    """Blocks held by each side over time: the most held in each of ``buckets`` time slices."""
    series = report["blocks"]
    end = max((t for side in series.values() for t, _ in side), default=0.0)
    width = end / buckets if end > 0 else 1.0
    rows = []
    last = {"prefill": 0, "decode": 0}  # a side that did not step in a slice still holds what it held
    for b in range(buckets):
        lo, hi = b * width, (b + 1) * width
        row: list = [f"{lo * 1e3:.0f}-{hi * 1e3:.0f}"]
        for side in ("prefill", "decode"):
            held = [n for t, n in series[side] if lo <= t < hi or (b == buckets - 1 and t == hi)]
            row.append(max(held) if held else last[side])
            last[side] = held[-1] if held else last[side]
        rows.append(row)
    return rows


def summary(report: dict) -> str:
    def stat(key):
        values = sorted(r[key] for r in report["requests"] if r[key] is not None)
        if not values:
            return "-"
        return f"p50 {values[len(values) // 2]:.1f} ms, max {values[-1]:.1f} ms"

    ok = sum(r["ok"] for r in report["requests"])
    return (
        f"{ok}/{len(report['requests'])} requests moved; transfer {stat('transfer_ms')}; exposed after the last "
        f"layer {stat('exposed_ms')}; decode waited {stat('decode_wait_ms')}; load errors {report['load_errors']}"
    )


HEADERS = ("request", "segments", "transfer ms", "exposed ms", "decode waited ms", "ok")
BLOCK_HEADERS = ("time ms", "prefill blocks held", "decode blocks held")
__all__ = ["add_arguments", "run", "request_rows", "blocks_rows", "summary", "HEADERS", "BLOCK_HEADERS", "table"]
