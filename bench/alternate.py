"""Two configurations of ``kvwire-bench loopback``, run in alternation, summarised.

    python3 bench/alternate.py --pairs 6 --common "--baseline --checksum none --rounds 3" \\
        --a "" --b "--chunk-kib 8192"
    python3 bench/alternate.py --pairs 6 --common "--baseline --rounds 3" \\
        --a-path ../kvwire-old --b-path .          # old code (a git worktree) against new

The machine's noise is as large as most single changes, and it drifts over minutes: runs
of A and B alternate (A B A B ...) so that both see the same drift, and the summary
gives each side's median and the pair-by-pair ratio B / A. ``--a-path`` and ``--b-path``
put another checkout first on ``PYTHONPATH`` (its compiled helper must be built there).
Each run writes its JSON report to a temporary file; the figures are read from it:
effective GB/s, the ratios to the plain-socket baselines when ``--baseline`` is given
(best round over best baseline run, and ``rnd``: the median of each round over the
baseline run right after it), and CPU seconds per GB on each side.

``--thread-cpu`` alternates ``bench/thread_cpu.py`` instead (the options are its own):
GB/s, each side's CPU per GB, the sender's context switches per 2 MiB and the CPU per GB
of its kinds of threads, the figures that were steadier than the loopback report's in
this machine's noise (docs/development.md)::

    python3 bench/alternate.py --thread-cpu --pairs 4 --common "--checksum none --rounds 5" \\
        --a-path ../kvwire-old
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

FIGURES = {
    "GB/s": lambda d: d["effective_gb_per_s"],
    "/plain": lambda d: d.get("ratio_to_baseline"),
    "/plain rnd": lambda d: _median(d.get("ratio_to_baseline_by_round") or []),
    "/in-place": lambda d: d.get("ratio_to_baseline_in_place"),
    "/in-pl rnd": lambda d: _median(d.get("ratio_to_baseline_in_place_by_round") or []),
    "homog.": lambda d: (d.get("homogeneous") or {}).get("ratio"),
    "send s/GB": lambda d: d["cpu_s_per_gb"]["sender"],
    "recv s/GB": lambda d: d["cpu_s_per_gb"]["receiver"],
    "send x": lambda d: _cpu_ratio(d, "sender"),
    "recv x": lambda d: _cpu_ratio(d, "receiver"),
}


# With --thread-cpu: the figures of ``bench/thread_cpu.py --json``
THREAD_FIGURES = {
    "GB/s": lambda d: d["gb_per_s"],
    "send s/GB": lambda d: d["sender"]["cpu_s_per_gb"],
    "recv s/GB": lambda d: statistics.mean(r["cpu_s_per_gb"] for r in d["receivers"]),  # each per GB it took
    "send cs": lambda d: d["sender"]["switches_per_2mib"],
    "writers": lambda d: d.get("sender_threads", {}).get("kvwire-send"),
    "ack": lambda d: d.get("sender_threads", {}).get("kvwire-ack"),
    "encoder": lambda d: d.get("sender_threads", {}).get("kvwire-encoder"),
    "link": lambda d: d.get("sender_threads", {}).get("kvwire-link"),
}


def _cpu_ratio(report: dict, side: str) -> float | None:
    """CPU s/GB against the matching baseline's: plain for no checksum, in place for CRC32C."""
    key = "baseline_cpu_s_per_gb" if report.get("checksum") == "none" else "baseline_in_place_cpu_s_per_gb"
    base = report.get(key)
    return report["cpu_s_per_gb"][side] / base[side] if base else None


def run(args: list[str], path: str | None, thread_cpu: bool = False) -> dict:
    env = dict(os.environ)
    if path:  # run from there too: ``python -m`` puts the working directory first on sys.path
        env["PYTHONPATH"] = os.path.abspath(path) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        if thread_cpu:  # this checkout's script on both sides, measuring the kvwire first on PYTHONPATH
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "thread_cpu.py")
            cmd = [sys.executable, script, *args, "--json", out.name]
        else:
            cmd = [sys.executable, "-m", "kvwire.bench.cli", "loopback", *args, "--json", out.name]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=path or None)
        if done.returncode != 0:
            raise SystemExit(f"{shlex.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        report = json.load(open(out.name))
    if not report.get("verified", True):
        raise SystemExit(f"{shlex.join(cmd)}: the transfer did not verify")
    return report


def row(name: str, values: dict[str, float | None]) -> str:
    return f"{name:>6} " + " ".join(f"{'-' if v is None else f'{v:.3f}':>10}" for v in values.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--common", default="--baseline --rounds 3", help="options for both")
    parser.add_argument("--a", default="", help="options for A only")
    parser.add_argument("--b", default="", help="options for B only")
    parser.add_argument("--a-path", help="a checkout to run A from (first on PYTHONPATH)")
    parser.add_argument("--b-path", help="a checkout to run B from")
    parser.add_argument("--thread-cpu", action="store_true",
                        help="run bench/thread_cpu.py (these options) instead of kvwire-bench loopback")  # fmt: skip
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    sides = {
        "A": (shlex.split(args.common) + shlex.split(args.a), args.a_path),
        "B": (shlex.split(args.common) + shlex.split(args.b), args.b_path),
    }
    print(f"A: {shlex.join(sides['A'][0])}" + (f" (from {args.a_path})" if args.a_path else ""))
    print(f"B: {shlex.join(sides['B'][0])}" + (f" (from {args.b_path})" if args.b_path else ""))
    chosen = THREAD_FIGURES if args.thread_cpu else FIGURES
    print(f"{'run':>6} " + " ".join(f"{name:>10}" for name in chosen))
    results: dict[str, list[dict]] = {"A": [], "B": []}
    for i in range(args.pairs):
        for side, (options, path) in sides.items():
            report = run(options, path, args.thread_cpu)
            figures = {name: get(report) for name, get in chosen.items()}
            results[side].append(figures)
            print(row(f"{side}{i + 1}", figures), flush=True)
    print("medians, and B / A pair by pair (median):")
    for side in ("A", "B"):
        print(row(side, {n: _median([r[n] for r in results[side]]) for n in chosen}))
    ratios = {n: _median([_div(b[n], a[n]) for a, b in zip(results["A"], results["B"])]) for n in chosen}
    print(row("B/A", ratios))


def _div(b: float | None, a: float | None) -> float | None:
    return None if a is None or b is None or a == 0 else b / a


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


if __name__ == "__main__":
    main()
