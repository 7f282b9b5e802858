#!/usr/bin/env python3
"""Microbenchmark of the CPU codecs on one 2 MiB chunk (1024 tokens x 8 heads x 128, bf16),
one thread, mean of 30 calls: the figures behind kvwire/tuning.py and the int4 min/max.

    python3 bench/codec_micro.py            # glibc defaults
    python3 bench/codec_micro.py --tune     # after kvwire.tune_process()
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


def mean_ms(fn, n: int = 30) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", action="store_true", help="call kvwire.tune_process() first")
    args = parser.parse_args()
    if args.tune:
        kvwire.tune_process()
    torch.set_num_threads(1)
    x = torch.randn(1024, 8, 128).to(torch.bfloat16)
    label = "tuned" if args.tune else "default"
    for name in ("fp8", "int4"):
        codec = kvwire.codec.get(name)
        for role in ("k", "v"):
            enc = codec.encode(x, role, 16)
            t_enc = mean_ms(partial(codec.encode, x, role, 16))
            t_dec = mean_ms(partial(codec.decode, enc))
            print(f"{label:8s} {name:5s} {role}  encode {t_enc:6.2f} ms  decode {t_dec:6.2f} ms")
    keys = x.float().view(64, 16, 8, 128)
    print(f"{label:8s} min/max over tokens: torch.aminmax {mean_ms(lambda: torch.aminmax(keys, dim=1)):.2f} ms,"
          f" amin + amax {mean_ms(lambda: (keys.amin(1), keys.amax(1))):.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
