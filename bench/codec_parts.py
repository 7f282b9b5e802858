#!/usr/bin/env python3
"""The pieces behind the CPU codecs' speed, each against the way it replaced, one thread,
best of 20 calls:

* the Hadamard rotation: one R x R product against H_(R/16) then H_16, and what
  `rotated.rotate` (which picks one by R) takes;
* fp8 decode: torch's float8 -> float32 conversion against the 256-value table;
* int4 packing: strided 8-bit shifts against 16-bit words (`int4.pack_nibbles`);
* a head-slice gather from 128 scattered blocks: `np.take` over the strided source
  against a copy per block (`blocks.rows_from_blocks`);
* and the work buffers one codec call holds for a 2 MiB chunk (`kvwire/codec/scratch.py`).

    python3 bench/codec_parts.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import kvwire.codec  # noqa: E402
from kvwire.blocks import head_bytes, rows_from_blocks  # noqa: E402
from kvwire.codec import fp8, int4, rotated, scratch  # noqa: E402


def best_us(fn, n: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for block in (64, 128, 256):
        rows = torch.randint(-(2**16), 2**16 + 1, ((1 << 20) // block, block)).float()
        whole, high, low = rotated.hadamard(block), rotated.hadamard(block // 16), rotated.hadamard(16)
        one = best_us(lambda rows=rows, whole=whole: rows @ whole)
        factored = best_us(lambda rows=rows, high=high, low=low: torch.matmul(high, rows.view(-1, len(high), 16) @ low))
        with scratch.workspace():
            chosen = best_us(lambda rows=rows: rotated.rotate(rows))
        print(f"rotation, 1M elements, R = {block:3d}: one product {one:6.0f} us, "
              f"H_(R/16) then H_16 {factored:6.0f} us, rotate() {chosen:6.0f} us")  # fmt: skip

    codes = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
    out = torch.empty(1 << 20)
    index = torch.empty(1 << 20, dtype=torch.int32)
    conversion = best_us(lambda: out.copy_(codes.view(torch.float8_e4m3fn)))
    table = best_us(lambda: torch.index_select(fp8.E4M3_VALUES, 0, index.copy_(codes), out=out))
    print(f"fp8 codes -> fp32, 1M: torch conversion {conversion:6.0f} us, table {table:6.0f} us")

    q = torch.randint(0, 16, (1024, 8, 128)).float()
    packed = torch.empty(1024, 8, 64, dtype=torch.uint8)

    def strided() -> None:
        c = q.to(torch.uint8)
        torch.bitwise_left_shift(c[..., 1::2], 4, out=packed).bitwise_or_(c[..., 0::2])

    with scratch.workspace():
        words = best_us(lambda: int4.pack_nibbles(q, packed))
    print(f"int4 packing, 2 MiB chunk's codes: strided bytes {best_us(strided):6.0f} us, 16-bit words {words:6.0f} us")

    cache = torch.ones(512, 16, 8, 128, dtype=torch.bfloat16)
    src = head_bytes(cache, 0, 4)
    ids = [int(i) for i in rng.permutation(512)[:128]]
    dst = np.empty((2048, 1024), dtype=np.uint8)
    take = best_us(lambda: np.take(src, np.asarray(ids), axis=0, out=dst.reshape(128, 16, 1024)))
    per_block = best_us(lambda: rows_from_blocks(src, ids, 16, dst))
    print(f"4 of 8 heads from 128 scattered blocks (2 MiB): np.take {take:6.0f} us, per block {per_block:6.0f} us")

    chunk = torch.randn(1024, 8, 128).to(torch.bfloat16)
    names = ("fp8", "int4", "int8h", "int4h")
    sizes = []
    for run in [[n] for n in names] + [list(names)]:  # each codec alone, then all four in turn
        scratch.drop_idle()
        for name in run:
            codec = kvwire.codec.get(name)
            for role in ("k", "v"):
                codec.decode(codec.encode(chunk, role))
        sizes.append(f"{'+'.join(run) if len(run) > 1 else run[0]} {scratch.idle_bytes() / 2**20:.1f}")
    print("work buffers per codec call, 2 MiB chunk, MiB: " + ", ".join(sizes))


if __name__ == "__main__":
    main()
