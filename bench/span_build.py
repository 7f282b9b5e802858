"""What building a chunk's spans costs, per chunk: the compiled helper (``kvwire._scatter.rows``
through :func:`kvwire.scatter.token_spans` and :func:`kvwire.scatter.block_spans`) against the
numpy way it replaced (per-token address arithmetic; :func:`kvwire.blocks.row_bounds` and
an iovec row per run, both below).

    python3 bench/span_build.py

llama3-8b's geometry (blocks of 16 tokens, 2 KiB per token, 4 of 8 heads: 1 KiB), blocks
in reverse order (a run per block): some heads of 2,048 tokens (one 2 MiB chunk of a
1 -> 2 transfer) and the rows of 1,024 tokens (a 2 MiB raw chunk over 64 blocks); then the
CRC32C of a 2 MiB chunk that is one span against the crc32c package's. Best of five
repeats; one thread.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import crc32c  # noqa: E402
import numpy as np  # noqa: E402

from kvwire import scatter  # noqa: E402
from kvwire.blocks import row_bounds  # noqa: E402
from kvwire.engine.chunks import ChunkRef  # noqa: E402
from kvwire.layout import Selection  # noqa: E402

BLOCKS, BLOCK_SIZE, ROW = 512, 16, 2048


def numpy_token_spans(heads: np.ndarray, ids: np.ndarray, start: int, count: int) -> scatter.Spans:
    tokens = np.arange(start, start + count, dtype=np.int64)
    iov = np.empty((count, 2), dtype=scatter.IOV_DTYPE)
    blocks, rows = ids[tokens // BLOCK_SIZE], tokens % BLOCK_SIZE
    iov[:, 0] = heads.ctypes.data + blocks * heads.strides[0] + rows * heads.strides[1]
    iov[:, 1] = heads.shape[2]
    return scatter.Spans(iov, heads)


def numpy_run_spans(blocks: np.ndarray, address: int, lo: np.ndarray, hi: np.ndarray) -> scatter.Spans:
    iov = np.empty((len(lo), 2), dtype=scatter.IOV_DTYPE)
    iov[:, 0] = lo
    iov[:, 0] += address
    iov[:, 1] = hi - lo
    return scatter.Spans(iov, blocks)


def main() -> int:
    if not scatter.available():
        print("the compiled helper kvwire._scatter is not built here")
        return 1
    heads = np.zeros((BLOCKS, BLOCK_SIZE, ROW), np.uint8)[:, :, : ROW // 2]
    cache = np.zeros((BLOCKS, BLOCK_SIZE * ROW), np.uint8)
    selection = Selection(list(reversed(range(BLOCKS))), BLOCKS * BLOCK_SIZE)
    ids, ref = selection.ids, ChunkRef(3, 0, "k", 1024, 1024)
    address = cache.ctypes.data
    cases = {
        "some heads of 2,048 tokens": (
            lambda: numpy_token_spans(heads, ids, 0, 2048),
            lambda: scatter.token_spans(heads, ids, BLOCK_SIZE, 0, 2048),
        ),
        "rows of 1,024 tokens, 64 runs": (
            lambda: numpy_run_spans(cache, address, *row_bounds(cache.shape[1], selection, BLOCK_SIZE, ref)),
            lambda: scatter.block_spans(cache, address, ids, BLOCK_SIZE, ref.start, ref.count),
        ),
    }
    for name, (old, new) in cases.items():
        assert old().tobytes() == new().tobytes()  # the same spans (outside the timed calls)
        t_old, t_new = (min(timeit.repeat(f, number=5000, repeat=5)) / 5000 * 1e6 for f in (old, new))
        print(f"{name}: numpy {t_old:.1f} us, helper {t_new:.1f} us per chunk ({t_old / t_new:.1f}x)")
    # And checking one: a 2 MiB chunk that is one span (destination blocks in order).
    data = np.random.default_rng(0).integers(0, 256, 2 << 20, dtype=np.uint8)
    one = scatter.Spans(np.array([[data.ctypes.data, data.nbytes]], dtype=scatter.IOV_DTYPE), data)
    assert one.crc32c() == crc32c.crc32c(data)
    t_helper, t_package = (min(timeit.repeat(f, number=200, repeat=5)) / 200 * 1e6
                           for f in (one.crc32c, lambda: crc32c.crc32c(data)))  # fmt: skip
    print(f"CRC32C of one 2 MiB span: helper {t_helper:.0f} us, crc32c package {t_package:.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
