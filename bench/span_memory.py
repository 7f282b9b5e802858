#!/usr/bin/env python3
"""How fast CRC32C reads some heads of every token out of main memory, against whole rows.

A prefill rank that sends each of two decode ranks half the heads of every token reads
half of each token's row per chunk. Out of main memory (a buffer far larger than the
last-level cache, read once per pass) this prints GB/s of bytes checked for:

* ``whole rows``: the rows as one span (what a 1 -> 1 chunk is);
* ``half rows``: the first half of every row, one span per token;
* ``halves, one after the other``: both halves of the same rows, one list after the other
  (the rows are in cache for the second list only if the first pass brought them there);
* ``halves together``: both lists in one pass over the rows (``crc32c_together``);
* ``halves after whole rows``: one half, just after a pass over the whole rows.

    python3 bench/span_memory.py [--mib 512] [--row-kib 2] [--repeat 3]

Not a test: the numbers depend on the machine's prefetching (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from kvwire import scatter  # noqa: E402

CHUNK = 2 << 20  # bytes of one decode rank's part per chunk, as kvwire cuts them


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="buffer size (well above the last-level cache)")
    parser.add_argument("--row-kib", type=int, default=2, help="bytes per token row (8 heads of 128 bf16: 2)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.mib < 4 or args.row_kib < 1:
        parser.error("--mib: at least 4 (two chunks' rows); --row-kib: at least 1")
    if not scatter.available():
        raise SystemExit("the compiled helper kvwire._scatter is not built (pip install -e .)")
    size, row = args.mib << 20, args.row_kib << 10
    half = row // 2
    memory = np.ones(size, dtype=np.uint8)  # touched: every page is mapped before the timing
    base = memory.ctypes.data
    region = 2 * CHUNK  # the rows of one chunk of half rows
    starts = range(0, size - region + 1, region)

    def spans(offset: int, length: int, stride: int, count: int, start: int) -> scatter.Spans:
        iov = np.empty((count, 2), dtype=scatter.IOV_DTYPE)
        iov[:, 0] = base + start + offset + np.arange(count, dtype=np.uint64) * stride
        iov[:, 1] = length
        return scatter.Spans(iov, memory)

    rows = CHUNK // half  # tokens per chunk of half rows
    whole = [spans(0, region, 0, 1, s) for s in starts]
    first = [spans(0, half, row, rows, s) for s in starts]
    second = [spans(half, half, row, rows, s) for s in starts]
    nbytes = len(whole) * region  # bytes of every row

    def timed(work) -> float:
        t = time.perf_counter()
        checked = work()
        return checked / (time.perf_counter() - t) / 1e9

    def one_after_the_other() -> int:
        for a, b in zip(first, second):
            a.crc32c()
            b.crc32c()
        return nbytes

    def together() -> int:
        for a, b in zip(first, second):
            scatter.crc32c_together([a, b])
        return nbytes

    def after_whole() -> float:
        spent = 0.0
        for w, a in zip(whole, first):
            w.crc32c()
            t = time.perf_counter()
            a.crc32c()
            spent += time.perf_counter() - t
        return nbytes / 2 / spent / 1e9

    print(f"{args.mib} MiB, rows of {row} bytes, chunks of {CHUNK >> 20} MiB of half rows; GB/s of bytes checked")
    for r in range(args.repeat):
        figures = {
            "whole rows": timed(lambda: [w.crc32c() for w in whole] and nbytes),
            "half rows": timed(lambda: [a.crc32c() for a in first] and nbytes // 2),
            "halves, one after the other": timed(one_after_the_other),
            "halves together": timed(together),
            "halves after whole rows": after_whole(),
        }
        print(f"  {r + 1}: " + "  ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
