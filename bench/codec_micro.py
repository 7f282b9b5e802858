#!/usr/bin/env python3
"""Microbenchmark of the CPU codecs on one 2 MiB chunk (1024 tokens x 8 heads x 128, bf16),
one thread, mean of 30 calls: the figures behind kvwire/tuning.py and the int4 min/max.

    python3 bench/codec_micro.py            # glibc defaults
    python3 bench/codec_micro.py --tune     # after kvwire.tune_process()
    python3 bench/codec_micro.py --codecs int4h --interleave   # other allocations between calls
"""

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kvwire  # noqa: E402
import kvwire.codec  # noqa: E402


def mean_ms(fn, n: int = 30, between=None) -> float:
    """Mean wall time of ``fn`` over ``n`` calls; ``between`` (untimed) runs before each."""
    fn()
    total = 0.0
    for _ in range(n):
        if between is not None:
            between()
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    return total / n * 1e3


class OtherAllocations:
    """Megabyte allocations between codec calls, touched and kept a while, as an engine's
    staging and frames are: a codec called alone in a loop gets its freed memory back from
    glibc and hides what fresh temporaries cost."""

    def __init__(self) -> None:
        self.held: list[torch.Tensor] = []

    def __call__(self) -> None:
        self.held.append(torch.ones(3 << 20, dtype=torch.uint8))
        if len(self.held) > 4:
            self.held.pop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", action="store_true", help="call kvwire.tune_process() first")
    parser.add_argument("--codecs", default="fp8,int4", help="codecs to time (default fp8,int4)")
    parser.add_argument("--interleave", action="store_true",
                        help="allocate 3 MiB (untimed) before each call, as an engine does")  # fmt: skip
    args = parser.parse_args()
    if args.tune:
        kvwire.tune_process()
    torch.set_num_threads(1)
    x = torch.randn(1024, 8, 128).to(torch.bfloat16)
    label = ("tuned" if args.tune else "default") + (", interleaved" if args.interleave else "")
    between = OtherAllocations() if args.interleave else None
    for name in args.codecs.split(","):
        codec = kvwire.codec.get(name)
        for role in ("k", "v"):
            enc = codec.encode(x, role, 16)
            t_enc = mean_ms(partial(codec.encode, x, role, 16), between=between)
            t_dec = mean_ms(partial(codec.decode, enc), between=between)
            print(f"{label:8s} {name:5s} {role}  encode {t_enc:6.2f} ms  decode {t_dec:6.2f} ms")
    keys = x.float().view(64, 16, 8, 128)
    print(f"{label:8s} min/max over tokens: torch.aminmax {mean_ms(lambda: torch.aminmax(keys, dim=1)):.2f} ms,"
          f" amin + amax {mean_ms(lambda: (keys.amin(1), keys.amax(1))):.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
