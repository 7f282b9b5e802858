"""Two hosts: ``kvwire-bench serve`` on the receiving one, ``kvwire-bench send`` on the other.

The same requests, rounds and checks as ``kvwire-bench loopback``, across a real network
(or an emulated link between namespaces) instead of between two local processes.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch

import kvwire
from kvwire.bench.fixture import dst_blocks, fill, layout_and_blocks, request_states, verify, zero
from kvwire.bench.loopback import chunk_bytes, receiver_slot_bytes, send_round
from kvwire.proto.frames import crc32c
from kvwire.tuning import tune_malloc


def _secret() -> str:
    secret = os.environ.get("KVWIRE_SECRET")
    if not secret:
        raise ValueError("KVWIRE_SECRET: set the same shared secret (8+ bytes) on both hosts")
    return secret


def serve(args: argparse.Namespace, listen, progress=print) -> dict:
    """The receiving host: expect ``--rounds`` rounds of ``--requests`` requests.

    Nothing heavy runs while a round arrives: rounds land in two halves of the caches in
    turn, the next round is expected as soon as one completes, and the finished round
    gets only a CRC32C of its bytes, and is zeroed for the round after next (a fraction
    of a second per GiB, printed and reported as what overlapped the next round). The
    full check against the CPU reference runs once, on the last round, after everything
    arrived; every round's CRC must equal it. A round's rate is measured from its first
    byte (its first DATA header read) to its last."""
    tune_malloc()
    layout, per, total_blocks = layout_and_blocks(args)
    dst = layout.allocate(2 * total_blocks)
    halves = [[{n: t[h * total_blocks : (h + 1) * total_blocks] for n, t in layer.items()} for layer in dst]
              for h in (0, 1)]  # fmt: skip
    states = [[layout.allocate_states() for _ in range(args.requests)] for _ in (0, 1)]
    gc.freeze()
    rounds = []

    def expect_round(rx, r: int) -> list:
        h, base = r % 2, (r % 2) * total_blocks
        return [
            rx.expect(
                f"{r}-{i}",
                [b + base for b in dst_blocks(i, per, getattr(args, "destination", "reverse"))],
                args.tokens,
                states=states[h][i],
                deadline=args.timeout,
            )  # fmt: skip
            for i in range(args.requests)
        ]

    with kvwire.Receiver(layout, listen, secret=_secret(), kv_caches=dst, staging_bytes=args.staging_mib << 20,
                         checksum=getattr(args, "checksum", None),
                         slot_bytes=receiver_slot_bytes(args)) as rx:  # fmt: skip
        progress(f"listening on {rx.address[0]}:{rx.address[1]}")
        pending = expect_round(rx, 0)
        for r in range(args.rounds):
            handles = pending
            stats = [h.wait() for h in handles]
            if r + 1 < args.rounds:
                pending = expect_round(rx, r + 1)  # before anything else: the next round never waits
            first = min(h.t_first_byte for h in handles if h.t_first_byte is not None)
            last = max(h.t_done or first for h in handles)  # every handle is done after wait()
            wire = sum(s["wire_bytes"] for s in stats)
            t0 = time.monotonic()
            digest = None if args.no_verify else _digest(halves[r % 2], states[r % 2])
            if r + 2 < args.rounds:  # round r + 2 lands here: it must not pass on these bytes
                zero(halves[r % 2], states[r % 2])
            overlapped = time.monotonic() - t0 if r + 1 < args.rounds else 0.0
            rounds.append({"seconds": last - first, "wire_bytes": wire, "digest": digest,
                           "check_s_overlapping_next": overlapped})  # fmt: skip
            note = f"; then {overlapped * 1e3:.0f} ms of checks overlapped the next round" if overlapped else ""
            progress(f"  round {r + 1}/{args.rounds}: {wire / (last - first) / 1e9:.3f} GB/s received "
                     f"(first byte to last){note}")  # fmt: skip
        verified = None
        if not args.no_verify:
            reference = layout.allocate(total_blocks), [request_states(layout, i) for i in range(args.requests)]
            fill(reference[0], {}, seed=1, dtype=layout.dtype)
            h = (args.rounds - 1) % 2
            verified = verify(layout, args, reference, halves[h], states[h], per) and all(
                x["digest"] == rounds[-1]["digest"] for x in rounds
            )
            progress(f"  verified (the last round against the CPU reference, every round's CRC32C): {verified}")
        # The sender hangs up first: closing now could cut off the last acknowledgement,
        # still queued between frames, and the sender would see its last request fail.
        hang_up = time.monotonic() + 30
        while rx.census()["sessions"] and time.monotonic() < hang_up:
            time.sleep(0.05)
        return {"kind": "serve", "rounds": rounds, "stats": rx.stats(), "verified": verified}


def _digest(caches, states) -> int:
    """CRC32C of every byte of a round's half of the caches and of its states."""
    crc = 0
    for layer in caches:
        for t in layer.values():
            crc = crc32c(t.contiguous().view(torch.uint8).numpy().reshape(-1), crc)
    for one in states:
        for t in one.values():
            crc = crc32c(t.view(torch.uint8).numpy().reshape(-1), crc)
    return crc


def send(args: argparse.Namespace, peer, progress=print) -> dict:
    """The sending host: ``--rounds`` rounds of ``--requests`` requests to ``peer``."""
    tune_malloc()
    layout, per, total_blocks = layout_and_blocks(args)
    src = layout.allocate(total_blocks)
    fill(src, {}, seed=1, dtype=layout.dtype)
    states = [request_states(layout, i) for i in range(args.requests)]
    gc.freeze()
    rounds = []
    with kvwire.Sender(layout, peer, secret=_secret(), kv_caches=src, streams=args.streams, codec=args.codec,
                       chunk_bytes=chunk_bytes(args), exact_tokens=args.exact_tokens,
                       encode_threads=args.encode_threads, checksum=getattr(args, "checksum", None),
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
