"""The ``kvwire-bench`` command line."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import kvwire.codec
from kvwire.bench import (
    codec_report,
    fidelity,
    flood,
    loopback,
    loopback_report,
    netem,
    planbench,
    profiles,
    soak,
    twohost,
)
from kvwire.bench.report import table, write_json


def _cmd_codec(args: argparse.Namespace) -> int:
    print(
        f"codec report: {args.tokens} tokens x {args.heads} heads x {args.head_dim} ({args.dtype}), "
        f"synthetic keys with outlier channels, on the CPU reference (torch threads: {torch.get_num_threads()}; "
        f"the C helper's loops, where built, one thread per call)"
    )
    results = codec_report.measure(args)
    print(table(codec_report.HEADERS, codec_report.rows(results)))
    print("GB/s counts logical (uncompressed) bytes, 1 GB = 1e9 bytes; best of", args.repeat)
    if args.json:
        write_json(
            args.json, {"kind": "codec", "machine": _machine(), "args": vars(args) | {"func": None}, "results": results}
        )
    return 0


def _cmd_loopback(args: argparse.Namespace) -> int:
    loopback.check_arguments(args)
    layout = profiles.get(args.profile).layout()
    gib = layout.request_bytes(args.tokens) * args.requests / 2**30
    print(
        f"kvwire-bench loopback: {args.profile}, {args.tokens} tokens x {args.requests} request(s) "
        f"= {gib:.2f} GiB logical, x {args.rounds} round(s); codec {args.codec}; {args.streams} connections",
        flush=True,
    )
    report = loopback.run(args, progress=lambda line: print(line, flush=True))
    report["machine"] = _machine()
    print()
    print(table(("figure", "value"), loopback_report.summary_rows(report)))
    print()
    print(table(loopback_report.CONNECTION_HEADERS, loopback_report.connection_rows(report)))
    print("GB/s = 1e9 bytes per second; wire counts encoded bytes, effective counts logical KV bytes")
    if args.json:
        write_json(args.json, report)
    if args.plot:
        from kvwire.bench.plot import plot_loopback

        plot_loopback(report, args.plot)
        print(f"plot: {args.plot}")
    home = report.get("homogeneous", {})  # --compare-homogeneous: its 1 -> 1 rounds count too
    errors = report["errors"] + [f"1 -> 1: {e}" for e in home.get("errors", [])]
    if errors:
        print("transfer errors:", *errors, sep="\n  ", file=sys.stderr)
        return 1
    if report["verified"] is False or home.get("verified") is False:
        print("VERIFICATION FAILED: the destination does not hold what the codec says", file=sys.stderr)
        return 1
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvwire.transport import parse_address

    args.layer_ms = 0.0
    loopback.check_arguments(args)
    report = twohost.serve(args, parse_address(args.listen, "--listen"), progress=lambda x: print(x, flush=True))
    if args.json:
        write_json(args.json, report)
    return 0 if report["verified"] is not False else 1


def _cmd_send(args: argparse.Namespace) -> int:
    from kvwire.transport import parse_address

    loopback.check_arguments(args)
    report = twohost.send(args, parse_address(args.peer, "--peer"), progress=lambda x: print(x, flush=True))
    print(table(("figure", "value"), [
        ("wire throughput", f"{report['wire_gb_per_s']:.3f} GB/s"),
        ("effective throughput", f"{report['effective_gb_per_s']:.3f} GB/s"),
        ("exposed latency", f"{report['exposed_ms']:.1f} ms"),
        ("connections", f"{report['streams_policy']['connections']}: {report['streams_policy']['reason']}"),
    ]))  # fmt: skip
    if args.json:
        write_json(args.json, report)
    return 0


def _cmd_vllm(args: argparse.Namespace) -> int:
    from kvwire.bench import vllm_pd

    vllm_pd.check_arguments(args)
    kib = args.layers * args.kv_heads * args.head_dim * 2 * 2 / 1024
    print(
        f"kvwire-bench vllm: {args.requests} request(s) x {args.tokens} tokens through two vLLM schedulers; "
        f"{args.layers} layers x {args.kv_heads} KV heads x {args.head_dim} (bf16, {kib:.0f} KiB/token); "
        f"codec {args.codec}; {args.connections} connections; {args.layer_ms:g} ms per layer; "
        f"link {args.link or 'loopback'}",
        flush=True,
    )
    report = vllm_pd.run(args, progress=print)
    report["machine"] = _machine()
    print(table(vllm_pd.HEADERS, vllm_pd.request_rows(report)))
    print(vllm_pd.summary(report))
    print()
    print(table(vllm_pd.BLOCK_HEADERS, vllm_pd.blocks_rows(report)))
    print("transfer: first segment opened to last acknowledged; exposed: last layer queued to last acknowledged")
    if args.json:
        write_json(args.json, report)
    return 0 if all(r["ok"] for r in report["requests"]) else 1


def _cmd_profiles(args: argparse.Namespace) -> int:
    if args.link_gbit <= 0:
        raise ValueError(f"--link-gbit: must be positive, got {args.link_gbit}")
    link_bytes = args.link_gbit * 1e9 / 8
    rows, results = [], []
    for p in profiles.PROFILES.values():
        layout = p.layout()
        per_token = layout.bytes_per_token()
        rates = {}
        for name in ("raw", "fp8", "int4"):
            codec = kvwire.codec.get(name)
            wire = profiles.wire_bytes_per_token(layout, codec)
            rates[name] = link_bytes / wire
        results.append(
            {"profile": p.name, "layers": layout.num_layers, "kv_bytes_per_token": per_token,
             "state_bytes_per_request": layout.state_bytes(), "tokens_per_s": rates, "source": p.source}
        )  # fmt: skip
        rows.append([p.name, layout.num_layers, per_token / 1024, layout.state_bytes() / 2**20,
                     rates["raw"], rates["fp8"], rates["int4"]])  # fmt: skip
    print(f"prefill tokens per second that a {args.link_gbit:g} Gbit/s link can carry, per codec")
    print(table(("profile", "layers", "KiB/token", "state MiB", "raw tok/s", "fp8 tok/s", "int4 tok/s"), rows))
    print("sources:")
    for p in profiles.PROFILES.values():
        print(f"  {p.name}: {p.description}. {p.source}")
    if args.json:
        write_json(args.json, {"kind": "profiles", "link_gbit": args.link_gbit, "profiles": results})
    return 0


def _cmd_fidelity(args: argparse.Namespace) -> int:
    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens: must be at least 1, got {args.new_tokens}")
    print("fidelity: SmolLM2-135M, KV cache through each codec, against the uncompressed cache", flush=True)
    report = fidelity.run(args, progress=lambda line: print(line, flush=True))
    rows = [[s["codec"], s["bytes_per_token"], f"{s['times_smaller_than_bf16']:.2f}x", s["prompts"],
             f"{s['mean_kl']:.2e}", f"{s['max_kl']:.2e}", s["identical_fraction"],
             "-" if s["mean_first_divergence"] is None else f"{s['mean_first_divergence']:.1f}"]
            for s in report["summary"]]  # fmt: skip
    print(
        table(
            ("codec", "bytes/token", "vs bf16", "prompts", "mean KL", "max KL", "identical", "first divergence"), rows
        )
    )
    print(f"identical: share of prompts whose {args.new_tokens}-token greedy continuation is unchanged")
    if args.json:
        write_json(args.json, report)
    return 0


def _cmd_link_check(args: argparse.Namespace) -> int:
    spec = netem.parse_link(args.link)
    import os

    if os.geteuid() != 0:
        raise ValueError("--link: needs root (it creates network namespaces and TUN devices)")
    print(f"link check: {args.link} (ping x10, then iperf3 -l 1M with 1 and {args.streams} streams)", flush=True)
    result = netem.check(spec, seconds=args.seconds, streams=args.streams)
    rows = [["RTT (ping)", f"{spec.rtt_s * 1e3:g} ms", f"{result['rtt_ms_measured']:.2f} ms",
             f"{result['rtt_ms_measured'] / (spec.rtt_s * 1e3):.3f}"]]  # fmt: skip
    for key in sorted(k for k in result if k.startswith("iperf3_gbit_")):
        n = key.split("_")[2]
        rows.append([f"iperf3, {n} stream(s)", f"{spec.rate_bps / 1e9:g} Gbit/s", f"{result[key]:.3f} Gbit/s",
                     f"{result[key] / (spec.rate_bps / 1e9):.3f}"])  # fmt: skip
    print(table(("figure", "asked", "measured", "ratio"), rows))
    print(f"forwarder: {result.get('lost_segments', 0)} segments lost, {result.get('queue_drops', 0)} queue drops")
    if args.json:
        write_json(args.json, result)
    return 0


def _cmd_soak(args: argparse.Namespace) -> int:
    soak.check_arguments(args)
    print(
        f"soak: {args.minutes:g} min of {args.tokens}-token requests ({args.profile}, {args.codec}, "
        f"{args.streams} connections) ending every way; a sample every {args.sample_s:g} s",
        flush=True,
    )
    report = soak.run(args, progress=lambda line: print(line, flush=True))
    report["machine"] = _machine()
    print()
    print(f"{report['requests']} requests; outcomes (sender/receiver) per fate:")
    for fate, counts in report["outcomes"].items():
        print(f"  {fate}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    grew = [k for k, g in report["growth"].items() if isinstance(g, dict) and g["grew"]]
    note = report["growth"].get("note")
    if note is not None:  # nothing was judged: no table that reads like a verdict
        print(f"growth not judged: {note} (run longer than the warm-up, or sample more often)")
    else:
        print(table(("figure", "after warm-up", "end", "peak", "verdict"), soak.rows(report)))
        print("flat: RSS within 16 MiB, descriptors, threads and records within 2 of their value after the warm-up")
    if args.json:
        write_json(args.json, report)
    if note is not None:
        return 3
    if grew:
        print("GROWTH:", ", ".join(grew), file=sys.stderr)
        return 1
    return 0


def _cmd_flood(args: argparse.Namespace) -> int:
    flood.check_arguments(args)
    print(
        f"flood: {args.transfers} transfers of {args.tokens} tokens ({args.profile}) per phase, while another "
        f"peer attacks the receiver ({args.sockets} sockets per socket attack)",
        flush=True,
    )
    report = flood.run(args, progress=lambda line: print(line, flush=True))
    report["machine"] = _machine()
    print(table(flood.HEADERS, flood.rows(report)))
    print("ms per transfer from expect to the receiver's completion; new conn: a new sender's connect time")
    if args.json:
        write_json(args.json, report)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    planbench.check_calibrate(args)
    print(f"calibrate: the link model's predictions against {args.transfers} transfers per link "
          f"({args.profile}, codec {args.codec})", flush=True)  # fmt: skip
    report = planbench.calibrate(args, progress=lambda line: print(line, flush=True))
    report["machine"] = _machine()
    print()
    print(table(planbench.CALIBRATION_HEADERS, planbench.calibration_rows(report)))
    print("error: |predicted - taken| / taken per transfer; bias: median of (predicted - taken) / taken")
    print("total: transfer() to acknowledgement; exposed: last layer to acknowledgement; first layer: "
          "transfer() to layer 0 in place at the receiver")  # fmt: skip
    if args.json:
        write_json(args.json, report)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    planbench.check_plan(args)
    print(f"plan: {args.profile}, requests arriving at {args.arrivals:g}/s for {args.seconds:g} s, "
          f"mix {args.mix}", flush=True)  # fmt: skip
    report = planbench.plan(args, progress=lambda line: print(line, flush=True))
    report["machine"] = _machine()
    print()
    print(table(planbench.PLAN_HEADERS, planbench.plan_rows(report)))
    print(f"met TTFT: the first token's KV in place within {args.ttft_ms:g} ms of the request's arrival; "
          f"local prefill is simulated at {args.local_share:g}x the profile's rate")  # fmt: skip
    if args.json:
        write_json(args.json, report)
    return 0


def _machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvwire-bench", description="kvwire benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="the receiving host of a two-host run (pair with `send`)")
    loopback.add_arguments(p)
    p.add_argument("--listen", default="0.0.0.0:7400", help="address to listen on (default 0.0.0.0:7400)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds each round may take")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("send", help="the sending host of a two-host run (same flags as on `serve`)")
    loopback.add_arguments(p)
    p.add_argument("--peer", required=True, help="the serving host, host:port")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=_cmd_send)

    p = sub.add_parser("codec", help="compression ratio, error and speed per codec")
    codec_report.add_arguments(p)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-' for stdout)")
    p.set_defaults(func=_cmd_codec)

    p = sub.add_parser("loopback", help="sender and receiver processes on 127.0.0.1: throughput, latency, checks")
    loopback.add_arguments(p)
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-' for stdout)")
    p.add_argument("--plot", metavar="FILE.png", help="throughput per connection and the layer timeline")
    p.set_defaults(func=_cmd_loopback)

    p = sub.add_parser("fidelity", help="next-token KL and greedy agreement per codec on SmolLM2-135M")
    fidelity.add_arguments(p)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=_cmd_fidelity)

    p = sub.add_parser("link-check", help="measure the emulated link itself: ping RTT and iperf3 rate (root)")
    p.add_argument("--link", required=True, metavar="SPEC", help="e.g. rtt=40ms,rate=2gbit,loss=0.01%%")
    p.add_argument("--seconds", type=float, default=8.0, help="iperf3 duration (default 8)")
    p.add_argument("--streams", type=int, default=8, help="iperf3 parallel streams besides 1 (default 8)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=_cmd_link_check)

    p = sub.add_parser("calibrate", help="the link model's predictions against real transfers (loopback, --link)")
    planbench.add_calibrate_arguments(p)
    p.add_argument("--json", metavar="FILE", help="also write every transfer and the summary as JSON")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("plan", help="a scheduling scenario: remote prefill only when predicted to fit (root)")
    planbench.add_plan_arguments(p)
    p.add_argument("--json", metavar="FILE", help="also write every request's outcome as JSON")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("soak", help="requests ending every way for minutes: RSS, fds, threads, records over time",
                       epilog="exit status: 0 flat, 1 a figure grew, 3 too short to judge (too few samples "
                              "after the warm-up)")  # fmt: skip
    soak.add_arguments(p)
    p.add_argument("--json", metavar="FILE", help="also write the samples and verdicts as JSON")
    p.set_defaults(func=_cmd_soak)

    p = sub.add_parser("flood", help="transfer times while another peer floods the receiver (hostile peers)")
    flood.add_arguments(p)
    p.add_argument("--json", metavar="FILE", help="also write the phases as JSON")
    p.set_defaults(func=_cmd_flood)

    p = sub.add_parser("vllm", help="requests through two vLLM schedulers and the kvwire connector (needs vLLM)")
    from kvwire.bench import vllm_pd

    vllm_pd.add_arguments(p)
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=_cmd_vllm)

    p = sub.add_parser("profiles", help="model profiles and what a link carries per codec")
    p.add_argument("--link-gbit", type=float, default=100.0, help="link rate in Gbit/s (default 100)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.set_defaults(func=_cmd_profiles)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        parser.exit(2, f"kvwire-bench {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
