"""Compare the cost of kvw_transfer_send_layer between builds of libkvwire, alternating.

    python3 bench/capi_overhead.py --build before=OLD_CHECKOUT:OLD_BUILD --build after=.:build \\
        [--runs 8] [--transfers 200] [--layers 32]

Each --build is NAME=SOURCE:BUILD: bench/capi_send_layer.c is compiled against
SOURCE/bindings/kvwire.h and linked to BUILD's libkvwire.so, and runs with SOURCE first on
PYTHONPATH (so each library embeds its own checkout's kvwire). The builds run in turn,
RUNS times each, so that load on the machine falls on all of them alike; the summary gives
each build's median over runs and, per run, the ratio to the first build.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("median_us", "mean_us", "p90_us", "p99_us")


def compile_bench(name: str, source: Path, build: Path, out: Path) -> Path:
    exe = out / f"send_layer_{name}"
    command = ["cc", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{source / 'bindings'}", str(HERE / "capi_send_layer.c"),
               f"-L{build}", "-lkvwire", f"-Wl,-rpath,{build}", "-o", str(exe)]  # fmt: skip
    subprocess.run(command, check=True)
    return exe


def run_once(exe: Path, source: Path, transfers: int, layers: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(source))
    done = subprocess.run([str(exe), str(transfers), str(layers)], env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="append", required=True, help="NAME=SOURCE:BUILD (the first is the baseline)")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--transfers", type=int, default=200)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    builds = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.build:
            name, _, paths = spec.partition("=")
            source, _, build = paths.partition(":")
            if not (name and source and build):
                parser.error(f"--build: expected NAME=SOURCE:BUILD, got {spec!r}")
            source_path, build_path = Path(source).resolve(), Path(build).resolve()
            builds.append((name, source_path, compile_bench(name, source_path, build_path, Path(tmp))))
        results: dict[str, list[dict]] = {name: [] for name, _, _ in builds}
        print(f"# load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; {args.runs} runs of "
              f"{args.transfers} transfers x {args.layers} layers per build, alternating", flush=True)  # fmt: skip
        for run in range(args.runs):
            order = builds if run % 2 == 0 else builds[::-1]  # neither always goes first
            for name, source, exe in order:
                result = run_once(exe, source, args.transfers, args.layers)
                results[name].append(result)
                print(json.dumps({"run": run, "build": name, **result}), flush=True)
        print(f"# load average {os.getloadavg()[0]:.2f} at the end", file=sys.stdout)
    base = builds[0][0]
    for name, _, _ in builds:
        line = {"build": name}
        for metric in METRICS:
            values = [r[metric] for r in results[name]]
            line[metric] = round(statistics.median(values), 3)
            if name != base:
                ratios = [r[metric] / b[metric] for r, b in zip(results[name], results[base])]
                line[f"{metric}_ratio_to_{base}"] = round(statistics.median(ratios), 3)
        print(json.dumps(line))


if __name__ == "__main__":
    main()
