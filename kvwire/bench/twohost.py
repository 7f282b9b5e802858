"""Two hosts: ``kvwire-bench serve`` on the receiving one, ``kvwire-bench send`` on the other.

The same requests, rounds and checks as ``kvwire-bench loopback``, across a real network
(or an emulated link between namespaces) instead of between two local processes.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import kvwire
from kvwire.bench.fixture import dst_blocks, fill, layout_and_blocks, verify
from kvwire.bench.loopback import send_round
from kvwire.tuning import tune_malloc


def _secret() -> str:
    secret = os.environ.get("KVWIRE_SECRET")
    if not secret:
        raise ValueError("KVWIRE_SECRET: set the same shared secret (8+ bytes) on both hosts")
    return secret


def serve(args: argparse.Namespace, listen, progress=print) -> dict:
    """The receiving host: expect ``--rounds`` rounds of ``--requests`` requests, verify each."""
    tune_malloc()
    layout, per, total_blocks = layout_and_blocks(args)
    dst = layout.allocate(total_blocks)
    states = [layout.allocate_states() for _ in range(args.requests)]
    reference = layout.allocate(total_blocks), layout.allocate_states()
    fill(reference[0], reference[1], seed=1, dtype=layout.dtype)
    gc.freeze()
    rounds = []
    with kvwire.Receiver(layout, listen, secret=_secret(), kv_caches=dst, staging_bytes=args.staging_mib << 20) as rx:
        progress(f"listening on {rx.address[0]}:{rx.address[1]}")
        for r in range(args.rounds):
            handles = [
                rx.expect(f"{r}-{i}", dst_blocks(i, per), args.tokens, states=states[i], deadline=args.timeout)
                for i in range(args.requests)
            ]
            stats = [h.wait() for h in handles]
            first = min(h.t_first_byte for h in handles if h.t_first_byte is not None)
            seconds = max(h.t_done or first for h in handles) - first  # every handle is done after wait()
            wire = sum(s["wire_bytes"] for s in stats)
            verified = None if args.no_verify else verify(layout, args, reference, dst, states, per)
            rounds.append({"seconds": seconds, "wire_bytes": wire, "verified": verified})
            progress(f"  round {r + 1}/{args.rounds}: {wire / seconds / 1e9:.3f} GB/s received, verified={verified}")
        # The sender hangs up first: closing now could cut off the last acknowledgement,
        # still queued between frames, and the sender would see its last request fail.
        hang_up = time.monotonic() + 30
        while rx.census()["sessions"] and time.monotonic() < hang_up:
            time.sleep(0.05)
        return {"kind": "serve", "rounds": rounds, "stats": rx.stats(),
                "verified": None if args.no_verify else all(x["verified"] for x in rounds)}  # fmt: skip


def send(args: argparse.Namespace, peer, progress=print) -> dict:
    """The sending host: ``--rounds`` rounds of ``--requests`` requests to ``peer``."""
    tune_malloc()
    layout, per, total_blocks = layout_and_blocks(args)
    src = layout.allocate(total_blocks)
    states = layout.allocate_states()
    fill(src, states, seed=1, dtype=layout.dtype)
    gc.freeze()
    rounds = []
    with kvwire.Sender(layout, peer, secret=_secret(), kv_caches=src, streams=args.streams, codec=args.codec,
                       chunk_bytes=args.chunk_kib << 10, exact_tokens=args.exact_tokens,
                       max_streams=args.max_streams) as tx:  # fmt: skip
        for r in range(args.rounds):
            sent = send_round(tx, layout, args, r, per, states, streamed=True)
            rounds.append(sent)
            progress(f"  round {r + 1}/{args.rounds}: {sent['wire_bytes'] / sent['seconds'] / 1e9:.3f} GB/s wire, "
                     f"exposed {sent['exposed_ms']:.1f} ms")  # fmt: skip
        best = max(rounds, key=lambda x: x["wire_bytes"] / x["seconds"])
        stats = tx.stats()
        return {
            "kind": "send", "profile": args.profile, "codec": tx.codec.descriptor, "streams": args.streams,
            "wire_gb_per_s": best["wire_bytes"] / best["seconds"] / 1e9,
            "effective_gb_per_s": best["logical_bytes"] / best["seconds"] / 1e9,
            "exposed_ms": best["exposed_ms"],
            "connections": stats["connections"],
            "streams_policy": stats["streams_policy"],
            "link_model": stats["link"],
            "rounds": [{k: v for k, v in x.items() if k not in ("samples", "timeline")} for x in rounds],
        }  # fmt: skip
