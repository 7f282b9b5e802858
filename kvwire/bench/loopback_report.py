"""The loopback benchmark's report: the JSON document, and the tables printed from it."""

from __future__ import annotations

import collections
import statistics

import kvwire.codec
from kvwire.bench import netem
from kvwire.bench.procstats import machine_split


def summed_split(windows: list[dict]) -> dict[str, float]:
    """The machine's CPU split over several timed windows together."""
    ticks: collections.Counter = collections.Counter()
    for w in windows:
        ticks.update(w.get("machine_ticks", {}))
    return machine_split(dict(ticks))


def build(args, layout, rounds, baselines, singles, overlap, sender_stats, rss) -> dict:
    """``rounds``, ``singles`` (1-connection rounds): (sent, received) pairs; ``overlap``:
    the no-overlap round's pair, or None. A round that failed or did not verify fails the
    report (``verified``, ``errors``) and lends it no figure."""
    best = max(rounds, key=lambda r: r[0]["wire_bytes"] / r[0]["seconds"])
    sent, received = best
    wire = sent["wire_bytes"] / sent["seconds"] / 1e9
    effective = sent["logical_bytes"] / sent["seconds"] / 1e9
    others = [(f"1 connection, round {i + 1}", r) for i, (_, r) in enumerate(singles)]
    others += [("the no-overlap round", overlap[1])] if overlap is not None else []
    errors = [r[1]["error"] for r in rounds if r[1]["error"]] + [f"{name}: {r['error']}" for name, r in others
                                                                 if r["error"]]  # fmt: skip
    verified = None if args.no_verify else (
        not errors and all(r[1]["verified"] for r in rounds) and all(r["verified"] for _, r in others))  # fmt: skip
    gb_moved = sum(r[0]["wire_bytes"] for r in rounds) / 1e9
    report = {
        "kind": "loopback",
        "profile": args.profile,
        "codec": kvwire.codec.get(args.codec).descriptor,
        "tokens": args.tokens,
        "requests": args.requests,
        "rounds": args.rounds,
        "streams": args.streams,
        "chunk_bytes": sent.get("chunk_bytes"),  # in effect (the receiver's slot_bytes caps --chunk-kib)
        "transport": args.transport,
        "tls": "kernel" if getattr(args, "ktls", False) else bool(getattr(args, "tls", False)),
        "checksum": getattr(args, "checksum", None) or ("none" if getattr(args, "tls", False) else "crc32c"),
        "layer_ms": args.layer_ms,
        "destination": getattr(args, "destination", "reverse"),  # the receiver's block order
        "logical_bytes_per_round": sent["logical_bytes"],
        # with ranks: what the decode ranks received together (a replicated latent or head, once each)
        **(
            {"delivered_logical_bytes_per_round": sent["delivered_logical_bytes"]}
            if "delivered_logical_bytes" in sent
            else {}
        ),  # fmt: skip
        "wire_bytes_per_round": sent["wire_bytes"],
        "seconds": sent["seconds"],
        "wire_gb_per_s": wire,
        "effective_gb_per_s": effective,
        "effective_gb_per_s_by_round": [r[0]["logical_bytes"] / r[0]["seconds"] / 1e9 for r in rounds],
        "exposed_ms": sent["exposed_ms"],
        "verified": verified,
        "errors": errors,
        "cpu_s_per_gb": {
            "sender": sum(r[0]["cpu_s"] for r in rounds) / gb_moved,
            "receiver": sum(r[1]["cpu_s"] for r in rounds) / gb_moved,
        },
        "staging": {"receiver": received["stats"]["staging"], "sender": sender_stats["staging"]},
        "receiver_rss": {
            "caches_bytes": rss["caches"],  # the destination caches and states, allocated and touched
            "rss_before_rounds_bytes": rss["start"],  # the receiver processes' RSS then, caches included
            "growth_bytes": max(r[1]["rss_growth"] for r in rounds),
        },
        "sender_rss_growth_bytes": max(r[0]["rss_growth"] for r in rounds),
        "connections": [
            {
                "bytes_sent": c["bytes_sent"],  # every round and the handshake, frame headers included
                "send_buffer": c.get("send_buffer"),  # SO_SNDBUF asked for; None: autotuned (or UCX)
                "tcp": c["tcp"],
                "path": c.get("path", "host memory"),
            }  # fmt: skip
            for c in sender_stats["connections"]
        ],
        "resent_chunks": sum(r[0]["resent_chunks"] for r in rounds),
        # how host bytes moved: spans of the cache through kvwire._scatter, or views and copies
        "spans": {"sender": bool(sender_stats.get("spans")), "receiver": bool(received["stats"].get("spans"))},
        # DATA frames the receiver's compiled receive lane took, of all it read (every round)
        "receive_lane": {k: received["stats"].get(k, 0) for k in ("lane_frames", "frames")},  # every decode rank's
        "data_frames_per_send": sum(c.get("data_frames", 0) for c in sender_stats["connections"])
        / max(1, sum(c.get("data_sends", 0) for c in sender_stats["connections"])),
        "streams_policy": sender_stats["streams_policy"],
        "link_model": sender_stats["link"],
        "timeline": [
            {**t, "delivered_s": received["layer_delivered_monotonic"][t["layer"]] - sent["t0_monotonic"]}
            for t in sent["timeline"]
        ],
        "samples": sent["samples"],
        # the whole machine's CPU time over the timed rounds: user, system, softirq, idle
        "machine_cpu": {"kvwire": summed_split([r[0] for r in rounds])},
    }
    for kind, runs in baselines.items():
        if not runs:
            continue
        suffix = "" if kind == "cache" else f"_{kind}"
        b_best = min(runs, key=lambda b: b[0]["seconds"])
        report[f"baseline{suffix}_gb_per_s"] = b_best[2] / b_best[0]["seconds"] / 1e9
        report[f"ratio_to_baseline{suffix}"] = wire / report[f"baseline{suffix}_gb_per_s"]
        # each kvwire round over the run of this baseline right after it (the same bytes): a
        # ratio the machine's drift from minute to minute moves less than best over best
        report[f"ratio_to_baseline{suffix}_by_round"] = [
            (r[0]["wire_bytes"] / r[0]["seconds"]) / (b[2] / b[0]["seconds"]) for r, b in zip(rounds, runs)
        ]
        b_gb = sum(b[2] for b in runs) / 1e9
        report[f"baseline{suffix}_cpu_s_per_gb"] = {
            "sender": sum(b[0]["cpu_s"] for b in runs) / b_gb,
            "receiver": sum(b[1]["cpu_s"] for b in runs) / b_gb,
        }
        report["machine_cpu"][kind] = summed_split([b[0] for b in runs])
        if b_best[0].get("piece_bytes"):  # the checked ceilings: pieces cut as kvwire's chunks were
            report[f"baseline{suffix}_piece_bytes"] = b_best[0]["piece_bytes"]
    good_singles = [one for one, got in singles if not got["error"] and got["verified"] is not False]
    if good_singles:
        best_single = max(good_singles, key=lambda r: r["wire_bytes"] / r["seconds"])
        report["single_stream_wire_gb_per_s"] = best_single["wire_bytes"] / best_single["seconds"] / 1e9
    if args.link:
        rate_gb = netem.parse_link(args.link).rate_bps / 8 / 1e9
        report["link_utilization"] = wire / rate_gb
        if good_singles:
            report["single_stream_link_utilization"] = report["single_stream_wire_gb_per_s"] / rate_gb
    if overlap is not None and not overlap[1]["error"] and overlap[1]["verified"] is not False:
        # One layer's wire time, measured: the no-overlap round sends every layer back to back
        # once the prefill is over, so its exposed time is all layers' wire time plus one RTT.
        exposed = overlap[0]["exposed_ms"]
        report["exposed_ms_after_prefill"] = exposed
        rtt_ms = netem.parse_link(args.link).rtt_s * 1e3 if args.link else 0.0
        report["one_layer_wire_ms"] = max(exposed - rtt_ms, 0.0) / layout.num_layers
        report["exposed_ideal_ms"] = report["one_layer_wire_ms"] + rtt_ms
        report["exposed_over_ideal"] = sent["exposed_ms"] / report["exposed_ideal_ms"]
    return report


def homogeneous(report: dict, homes: list[tuple[dict, dict]], home_args, home_stats: dict) -> dict:
    """``--compare-homogeneous``: the 1 -> 1 rounds sent after each sharded round, the same
    bytes over as many connections, and the sharded run's throughput over theirs."""
    by_round = [sent["logical_bytes"] / sent["seconds"] / 1e9 for sent, _ in homes]
    errors = [received["error"] for _, received in homes if received["error"]]
    verified = None if home_args.no_verify else (not errors and all(r["verified"] for _, r in homes))
    gb_moved = sum(sent["wire_bytes"] for sent, _ in homes) / 1e9
    cpu = {
        "sender": sum(sent["cpu_s"] for sent, _ in homes) / gb_moved,
        "receiver": sum(received["cpu_s"] for _, received in homes) / gb_moved,
    }
    return {
        "streams": home_args.streams,
        "connections_at_end": home_stats["streams_policy"]["connections"],
        "logical_bytes_per_round": homes[0][0]["logical_bytes"],
        "effective_gb_per_s": max(by_round),
        "effective_gb_per_s_by_round": by_round,
        "verified": verified,
        "errors": errors,
        # best round over best round; and round by round, each sharded round with the 1 -> 1 one after it
        "ratio": report["effective_gb_per_s"] / max(by_round),
        "ratio_by_round": [a / b for a, b in zip(report["effective_gb_per_s_by_round"], by_round)],
        "cpu_s_per_gb": cpu,
        # both sides' CPU per GB, 1 -> 1's over the sharded run's: with both sides on one machine and
        # no core idle, throughput goes as the inverse of CPU per GB, so "ratio" follows this
        "cpu_ratio": sum(cpu.values()) / sum(report["cpu_s_per_gb"].values()),
        "machine_cpu": summed_split([sent for sent, _ in homes]),
    }


def first_connections(report: dict) -> str:
    pairs = report.get("tensor_parallel", {}).get("pairs", 1)
    if pairs == 1:
        return f"{report['streams']} TCP connections first"
    return f"{report['streams']} TCP connections first per sender-receiver pair ({report['streams'] * pairs} in all)"


def summary_rows(report: dict) -> list[tuple[str, str]]:
    gib = report["logical_bytes_per_round"] / 2**30
    delivered = report.get("delivered_logical_bytes_per_round", report["logical_bytes_per_round"])
    copies = f" ({delivered / 2**30:.3f} GiB as the decode ranks hold it)" if delivered != report[
        "logical_bytes_per_round"] else ""  # fmt: skip
    rows = [
        ("profile / codec", f"{report['profile']} / {report['codec']}, checksum {report.get('checksum', 'crc32c')}"),
        (
            "moved per round",
            f"{gib:.3f} GiB logical{copies}, {report['wire_bytes_per_round'] / 2**30:.3f} GiB on the wire",
        ),  # fmt: skip
        ("requests x rounds", f"{report['requests']} x {report['rounds']}, {first_connections(report)}"),
        ("connections at the end", f"{report['streams_policy']['connections']}: {report['streams_policy']['reason']}"),
        ("wire throughput", f"{report['wire_gb_per_s']:.3f} GB/s"),
        ("effective throughput", f"{report['effective_gb_per_s']:.3f} GB/s (logical KV bytes)"),
    ]
    by_round = report.get("effective_gb_per_s_by_round", [])
    if len(by_round) > 1:
        rows.append(("each round, effective", ", ".join(f"{r:.3f}" for r in by_round) + " GB/s (the best above)"))
    rows += [
        ("exposed latency", f"{report['exposed_ms']:.1f} ms (last send_layer -> acknowledgement)"),
    ]
    if "homogeneous" in report:
        home = report["homogeneous"]
        each = ", ".join(f"{r:.3f}" for r in home["effective_gb_per_s_by_round"])
        rows.append((f"1 -> 1, {home['streams']} connections", f"{each} GB/s, verified={home['verified']}"))
        rows.append(("sharded / 1 -> 1", f"{home['ratio']:.3f}" + rounds_and_median(home["ratio_by_round"])))
    if "baseline_gb_per_s" in report:
        rows.append(("plain, cache to cache", f"{report['baseline_gb_per_s']:.3f} GB/s (same memory, no checks)"))
        rows.append(("kvwire / plain", ratio_row(report, "")))
        rows.append(("plain, hot 1 MiB buffer", f"{report['baseline_hot_gb_per_s']:.3f} GB/s (iperf3 -l 1M style)"))
        rows.append(("kvwire / plain hot", ratio_row(report, "_hot")))
        rows.append(
            ("plain + CRC32C + copy", f"{report['baseline_checked_gb_per_s']:.3f} GB/s (the old rule's ceiling)")
        )
        rows.append(("kvwire / checked plain", ratio_row(report, "_checked")))
        rows.append(
            (
                "plain + CRC32C in place",
                f"{report['baseline_in_place_gb_per_s']:.3f} GB/s (ceiling with checks, "
                f"{report.get('baseline_in_place_piece_bytes', 0) / 2**20:.2f} MiB pieces)",
            )
        )
        rows.append(("kvwire / in-place plain", ratio_row(report, "_in_place")))
        cpu = {k: report[f"baseline{s}_cpu_s_per_gb"]
               for k, s in (("plain", ""), ("checked", "_checked"), ("in place", "_in_place"))}  # fmt: skip
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
    if "homogeneous" in report:  # where the sharded run's extra CPU is: the side that splits heads
        home_cpu = report["homogeneous"]["cpu_s_per_gb"]
        rows.append(("CPU s per GB, 1 -> 1", f"sender {home_cpu['sender']:.3f}, receiver {home_cpu['receiver']:.3f}"))
        by_cpu = report["homogeneous"]["cpu_ratio"]
        rows.append(("sharded / 1 -> 1, by CPU", f"{by_cpu:.3f} (both sides' CPU per GB, 1 -> 1's over the "
                     "sharded run's: what the throughput ratio follows while no core is idle)"))  # fmt: skip
    machine = {k: v for k, v in report["machine_cpu"].items() if v}
    if report.get("homogeneous", {}).get("machine_cpu"):
        machine["1 -> 1"] = report["homogeneous"]["machine_cpu"]
    if machine:
        names = {"cache": "plain", "in_place": "in place"}
        shown = []
        for kind, split in machine.items():
            shares = "/".join(f"{split[part] * 100:.0f}" for part in ("user", "system", "softirq", "idle"))
            shown.append(f"{names.get(kind, kind)} {shares}%")
        rows.append(("machine CPU (user/sys/softirq/idle)", ", ".join(shown)))
    spans = report["spans"]
    rows.append(("host data path", f"spans (kvwire._scatter): sender {'yes' if spans['sender'] else 'no'}, "
                 f"receiver {'yes' if spans['receiver'] else 'no'}; "
                 f"{report['data_frames_per_send']:.2f} DATA frames per send; "
                 f"chunks of {(report.get('chunk_bytes') or 0) / 2**20:.2f} MiB; "
                 f"receive lane {lane_share(report)}; "
                 f"destination blocks {report.get('destination', 'reverse')}; "
                 f"send buffer {send_buffers(report)}"))  # fmt: skip
    st = report["staging"]["receiver"]
    ranks = report.get("tensor_parallel", {}).get("decode", 1)
    rows.append((
        "receiver staging" + (" (decode rank 0)" if ranks > 1 else ""),
        f"high water {st['high_water_bytes'] / 2**20:.0f} of {st['budget_bytes'] / 2**20:.0f} MiB",
    ))  # fmt: skip
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


def send_buffers(report: dict) -> str:
    """The sender's connections' SO_SNDBUF, as asked for (SocketOptions.local_sndbuf on
    this host), or "autotuned" where the kernel sizes it."""
    sizes = sorted({c.get("send_buffer") for c in report["connections"]}, key=lambda b: b or 0)
    return ", ".join("autotuned" if b is None else f"{b >> 10} KiB" for b in sizes) or "none"


def lane_share(report: dict) -> str:
    """How many of the DATA frames the receiver's compiled receive lane took."""
    lane = report.get("receive_lane") or {}
    frames = lane.get("frames", 0)
    return f"{lane.get('lane_frames', 0) / frames:.0%} of frames" if frames else "no frames"


def ratio_row(report: dict, suffix: str) -> str:
    """kvwire over a baseline: the best rounds, and each round over the baseline run after it."""
    return f"{report[f'ratio_to_baseline{suffix}']:.3f}" + rounds_and_median(
        report.get(f"ratio_to_baseline{suffix}_by_round", [])
    )


def rounds_and_median(by_round: list) -> str:
    """After a ratio of the best rounds: each round's ratio (to the other run's round taken
    right after it) and their median, which single noisy rounds move less."""
    if len(by_round) < 2:
        return ""
    each = ", ".join(f"{r:.3f}" for r in by_round)
    return f" (best rounds); each round {each}, median {statistics.median(by_round):.3f}"
