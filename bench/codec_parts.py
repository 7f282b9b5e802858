#!/usr/bin/env python3
"""The pieces behind the CPU codecs' speed, each against the way it replaced, one thread,
best of 20 calls:

* the Hadamard rotation: one R x R product against H_(R/16) then H_16, and what
  `rotated.rotate` (which picks one by R) takes;
* fp8 decode: torch's float8 -> float32 conversion against the 256-value table;
* int4 packing: strided 8-bit shifts against 16-bit words (`int4.pack_nibbles`);
* a head-slice gather from 128 scattered blocks: `np.take` over the strided source
  against a copy per block (`blocks.rows_from_blocks`);
* the CPU codecs' C loops: the rotated rows' passes alone, then each codec part (int8h,
  int4h's and int4a's values, int4's and int4a's keys) encoded and decoded through the
  helper against the torch path it replaced;
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

    rotated_rows()

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


def rotated_rows() -> None:
    """GB/s of bf16 rows (3072 tokens x 8 heads x 128): the helper's two encode passes,
    then whole codec calls through the helper and through torch (the module's ``_helper``
    set aside), in alternation."""
    from kvwire.codec.synthetic import realistic_keys

    x = realistic_keys(3072, 8, 128, seed=1).to(torch.bfloat16)
    gb = x.numel() * 2 / 1e9
    helper = rotated._helper
    if helper is None:
        print("rotated rows: the C helper is not built")
        return
    rows = x.view(-1, 128).view(torch.int16).numpy()
    n = rows.shape[0]
    e, mn, mx = np.empty(n, np.int32), np.empty(n, np.float32), np.empty(n, np.float32)
    packed = np.empty((n, 64), np.uint8)
    stats = best_us(lambda: helper.rot_stats(rows, 1, 128, e, mn, mx), 5)
    codes = best_us(lambda: helper.rot_quantize(rows, 1, 128, rotated.MODE4, mn, mx, packed), 5)
    print(
        f"rotated rows, helper alone: rot_stats {gb / stats * 1e6:.2f} GB/s, rot_quantize {gb / codes * 1e6:.2f} GB/s"
    )
    from kvwire.codec import allocated

    for name, role, module in (("int8h", "v", rotated), ("int4h", "v", rotated), ("int4a", "v", rotated),
                               ("int4", "k", int4), ("int4a", "k", allocated)):  # fmt: skip
        codec = kvwire.codec.get(name)
        wire = codec.encode(x, role)
        timings = {}
        for path in ("helper", "torch", "helper", "torch"):
            module._helper = helper if path == "helper" else None
            with scratch.workspace():
                enc = best_us(lambda codec=codec, role=role: codec.encode(x, role), 5)
                dec = best_us(lambda codec=codec, wire=wire: codec.decode(wire), 5)
            best = timings.get(path, (float("inf"), float("inf")))
            timings[path] = (min(best[0], enc), min(best[1], dec))
        module._helper = helper
        what = "values" if role == "v" else "keys (int4h's too)" if name == "int4" else "keys"
        print(f"{name} {what}, GB/s encode / decode: helper {gb / timings['helper'][0] * 1e6:.2f} / "
              f"{gb / timings['helper'][1] * 1e6:.2f}, torch {gb / timings['torch'][0] * 1e6:.2f} / "
              f"{gb / timings['torch'][1] * 1e6:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
