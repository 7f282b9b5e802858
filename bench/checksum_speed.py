#!/usr/bin/env python3
"""CRC32C speed of one contiguous buffer: the crc32c package against kvwire's helper.

A sender checks cache rows just before it sends them, rows nobody has read since the
prefill wrote them: out of main memory. This times both implementations on buffers of
``--kib`` KiB taken in turn from ``--mib`` MiB (cold: each buffer read once per pass) and
on one buffer again and again (hot: out of the caches), the two alternating, three
passes each, and prints GB/s (1e9 bytes a second).

    python3 bench/checksum_speed.py [--kib 4096] [--mib 1024] [--passes 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from crc32c import crc32c as package

from kvwire.scatter import _scatter


def timed(fn, views) -> float:
    t0 = time.perf_counter()
    for v in views:
        fn(v)
    return sum(v.nbytes for v in views) / (time.perf_counter() - t0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kib", type=int, default=4096, help="buffer size (default 4096: kvwire's chunks on short paths)")
    p.add_argument("--mib", type=int, default=1024, help="memory walked for the cold figures (default 1024)")
    p.add_argument("--passes", type=int, default=3)
    args = p.parse_args()
    if _scatter is None or not _scatter.hardware():
        raise SystemExit("kvwire's helper is not built, or this CPU has no CRC32C instruction")
    size = args.kib << 10
    memory = np.random.default_rng(0).integers(0, 256, size=max(args.mib << 20, size), dtype=np.uint8)
    cold = [memory[o : o + size] for o in range(0, len(memory) - size + 1, size)]
    hot = [memory[:size]] * len(cold)
    if package(cold[0]) != _scatter.crc32c_buffer(cold[0]):
        raise SystemExit("the two implementations disagree")
    impls = {"crc32c package": package, "kvwire helper": _scatter.crc32c_buffer}
    found: dict[tuple[str, str], list[float]] = {(n, k): [] for n in impls for k in ("cold", "hot")}
    for _ in range(args.passes):
        for name, fn in impls.items():
            found[name, "cold"].append(timed(fn, cold))
            found[name, "hot"].append(timed(fn, hot))
    print(f"CRC32C of {args.kib} KiB buffers, GB/s per pass (cold: {len(cold)} buffers in turn; hot: one)")
    for (name, kind), rates in found.items():
        print(f"  {name:15s} {kind:4s}  " + "  ".join(f"{r:5.1f}" for r in rates))


if __name__ == "__main__":
    main()
