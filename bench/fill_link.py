#!/usr/bin/env python3
"""Does kvwire fill the link by default? kvwire against ``iperf3 -P 8`` on the same
emulated links, in one command (root: network namespaces and TUN devices).

For each ``--link`` (default: the matrix of RTT 10/40/100 ms, 1/2/4 Gbit/s and loss
0/0.01/0.1%), one emulated link is made and, alternating, ``--repeat`` times each:

* ``iperf3 -c ... -P 8 -l 1M -t SECONDS`` (the link's reference);
* ``kvwire-bench serve`` / ``send`` with the library's defaults (4 connections that grow
  while goodput grows, raw), ``--rounds`` rounds of ``--tokens`` tokens over one sender;
* the same with a fixed count (``--streams 8 --max-streams 8``), as a second reference.

The table gives medians in GB/s (1e9 bytes per second of wire bytes for kvwire, of
iperf3's received bytes for iperf3): kvwire's first round (connections still growing)
and its later rounds (a serving process keeps its sender, so the grown count is what
requests see), and the ratio of later rounds to iperf3 (the target is >= 0.90).

    sudo python3 bench/fill_link.py                                  # the whole matrix (hours)
    sudo python3 bench/fill_link.py --link rtt=40ms,rate=2gbit,loss=0.01% --repeat 1 --tokens 2048
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's kvwire

from kvwire.bench import netem  # noqa: E402
from kvwire.bench.report import table, write_json  # noqa: E402

MATRIX = [f"rtt={rtt},rate={rate},loss={loss}"
          for rtt, rate, loss in itertools.product(("10ms", "40ms", "100ms"), ("1gbit", "2gbit", "4gbit"),
                                                   ("0%", "0.01%", "0.1%"))]  # fmt: skip
PORT = 7400
IPERF_PORT = 5201


def iperf3(link: netem.EmulatedLink, seconds: float) -> float:
    """GB/s received by ``iperf3 -P 8 -l 1M`` across ``link``."""
    server = link.popen("b", ["iperf3", "-s", "-1", "-B", link.address_b, "-p", str(IPERF_PORT)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.5)
        client = ["iperf3", "-c", link.address_b, "-p", str(IPERF_PORT), "-P", "8", "-l", "1M", "-t", str(seconds)]
        client.append("-J")
        run = link.run("a", client, capture_output=True, text=True, timeout=seconds + 60)
        if run.returncode != 0:
            raise RuntimeError(f"iperf3 failed: {run.stderr or run.stdout[-500:]}")
        return json.loads(run.stdout)["end"]["sum_received"]["bits_per_second"] / 8 / 1e9
    finally:
        server.wait(30)


def kvwire_run(link: netem.EmulatedLink, args, extra: list[str]) -> dict:
    """One serve/send pair across ``link``: per-round GB/s and the sender's connection policy."""
    env = dict(os.environ, KVWIRE_SECRET=os.urandom(16).hex(),
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))  # fmt: skip
    common = ["--profile", args.profile, "--tokens", str(args.tokens), "--rounds", str(args.rounds), "--no-verify",
              *extra]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kvwire-fill-") as tmp:
        out = os.path.join(tmp, "send.json")
        cli = [sys.executable, "-m", "kvwire.bench.cli"]
        serve = link.popen("b", [*cli, "serve", "--listen", f"{link.address_b}:{PORT}", *common],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            assert serve.stdout is not None
            for line in serve.stdout:  # its caches are allocated once it listens
                if line.startswith("listening on"):
                    break
            else:
                raise RuntimeError(f"kvwire-bench serve exited with {serve.wait()} before listening")
            send = link.run("a", [*cli, "send", "--peer", f"{link.address_b}:{PORT}", "--json", out, *common],
                            env=env, capture_output=True, text=True, timeout=3600)  # fmt: skip
            if send.returncode != 0:
                serve.kill()
                told = serve.communicate()[0]
                raise RuntimeError(f"kvwire-bench send failed: {send.stderr[-2000:]}\nserve said: {told[-2000:]}")
            report = json.loads(open(out).read())
        finally:
            try:
                serve.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.communicate()
    rounds = [r["wire_bytes"] / r["seconds"] / 1e9 for r in report["rounds"]]
    return {"rounds_gb_per_s": rounds, "streams_policy": report.get("streams_policy")}


ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def measure(spec: str, args, progress) -> dict:
    runs: dict[str, list] = {"iperf3": [], "default": [], "fixed 8": []}
    with netem.EmulatedLink(netem.parse_link(spec)) as link:
        for r in range(args.repeat):
            order = ["iperf3", "default", "fixed 8"]
            if r % 2:
                order.reverse()  # the machine's drift hits every kind alike
            for kind in order:
                if kind == "iperf3":
                    runs[kind].append(iperf3(link, args.seconds))
                    progress(f"  {kind}: {runs[kind][-1]:.3f} GB/s")
                else:
                    extra = [] if kind == "default" else ["--streams", "8", "--max-streams", "8"]
                    got = kvwire_run(link, args, extra)
                    runs[kind].append(got)
                    policy = got["streams_policy"] or {}
                    progress(f"  kvwire {kind}: rounds {', '.join(f'{x:.3f}' for x in got['rounds_gb_per_s'])} GB/s;"
                             f" {policy.get('connections')} connections: {policy.get('reason')}")  # fmt: skip

    def first(kind):
        return statistics.median(x["rounds_gb_per_s"][0] for x in runs[kind])

    def later(kind):
        return statistics.median(v for x in runs[kind] for v in (x["rounds_gb_per_s"][1:] or x["rounds_gb_per_s"]))

    ref = statistics.median(runs["iperf3"])
    return {
        "link": spec, "iperf3_gb_per_s": ref,
        "default_first_gb_per_s": first("default"), "default_later_gb_per_s": later("default"),
        "fixed8_later_gb_per_s": later("fixed 8"), "ratio_default_later": later("default") / ref,
        "runs": runs,
    }  # fmt: skip


HEADERS = ("link", "iperf3 -P 8", "kvwire default, 1st round", "later rounds", "fixed 8, later", "default / iperf3")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--link", action="append", metavar="SPEC", help="a link to measure (repeat); default: the matrix")
    p.add_argument("--repeat", type=int, default=3, help="runs of each kind per link; medians (default 3)")
    p.add_argument("--seconds", type=float, default=10.0, help="iperf3 duration (default 10)")
    p.add_argument("--profile", default="llama3-8b")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per kvwire round (default 8192: 1 GiB)")
    p.add_argument("--rounds", type=int, default=3, help="kvwire rounds per run, one sender (default 3)")
    p.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (network namespaces and TUN devices)")
    if shutil.which("iperf3") is None:
        p.error("needs iperf3: apt-get install -y iperf3")
    if args.repeat < 1 or args.rounds < 1 or args.tokens < 1:
        p.error("--repeat, --rounds and --tokens must be at least 1")
    links = args.link or MATRIX
    for spec in links:
        netem.parse_link(spec)
    results = []
    for spec in links:
        print(f"{spec}:", flush=True)
        results.append(measure(spec, args, lambda line: print(line, flush=True)))
    rows = [[r["link"], r["iperf3_gb_per_s"], r["default_first_gb_per_s"], r["default_later_gb_per_s"],
             r["fixed8_later_gb_per_s"], r["ratio_default_later"]] for r in results]  # fmt: skip
    print()
    print(table(HEADERS, rows))
    print(f"GB/s, medians of {args.repeat} run(s); kvwire: raw, {args.tokens} tokens of {args.profile} per round, "
          f"{args.rounds} rounds per sender; target: default / iperf3 >= 0.90")  # fmt: skip
    if args.json:
        write_json(args.json, {"kind": "fill_link", "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
