"""Moving bytes between paged blocks and rows: the one place that knows how.

A request's tokens live in blocks named by a :class:`~kvwire.layout.Selection`, in token
order; a chunk is a run of those tokens (rows). Gathering reads rows out of blocks,
scattering writes rows into blocks (a partial last block keeps the bytes past the
request's last token). Contiguous CPU caches are moved with numpy memcpys over runs of
consecutive blocks; anything else (strided views, GPU tensors, 8-bit dtypes) with torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from kvwire.layout import FLOAT8_DTYPES, STATE_NAME, Selection


class Rows(Protocol):
    """Which rows a chunk covers: tensor ``name`` (``k``, ``v``, ``kv`` or ``state``), rows
    ``[start, start + count)`` of the request."""

    @property
    def name(self) -> str: ...

    @property
    def start(self) -> int: ...

    @property
    def count(self) -> int: ...


def gather_tokens(
    cache: torch.Tensor, sel: Selection, block_size: int, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """Tokens ``[start, stop)`` of a selection as a contiguous ``[T, *token_shape]`` tensor
    (any ``start``: a chunk cut on the other side's blocks may begin inside one of these)."""
    stop = sel.num_tokens if stop is None else stop
    if cache.dtype in FLOAT8_DTYPES:  # torch has no indexing kernels for float8: move the bytes
        return gather_tokens(cache.view(torch.uint8), sel, block_size, start, stop).view(cache.dtype)
    first, last = start // block_size, -(-stop // block_size)
    ids = torch.tensor(sel.block_ids[first:last], dtype=torch.long, device=cache.device)
    blocks = cache.index_select(0, ids)
    skip = start - first * block_size
    return blocks.reshape(-1, *cache.shape[2:])[skip : skip + stop - start]


def scatter_tokens(cache: torch.Tensor, sel: Selection, block_size: int, start: int, data: torch.Tensor) -> None:
    """Write ``data`` (``[T, *token_shape]``) as tokens ``[start, start + T)`` of a selection.

    Only the tokens named are written: the rest of a partial first or last block keeps
    its bytes (a chunk cut on the other side's blocks may begin inside one of these).
    """
    if cache.dtype in FLOAT8_DTYPES:  # torch has no indexing kernels for float8: move the bytes
        scatter_tokens(cache.view(torch.uint8), sel, block_size, start, data.view(torch.uint8))
        return
    offset = start % block_size
    if offset:  # the first block is entered part-way: write its share, then whole blocks
        n = min(block_size - offset, data.shape[0])
        cache[sel.block_ids[start // block_size], offset : offset + n].copy_(data[:n])
        if n < data.shape[0]:
            scatter_tokens(cache, sel, block_size, start + n, data[n:])
        return
    count = data.shape[0]
    first = start // block_size
    if cache.device.type == "cpu" and cache.is_contiguous() and data.device.type == "cpu":
        dst = cache.view(cache.shape[0], -1).view(torch.uint8).numpy()
        src = data.contiguous().reshape(-1).view(torch.uint8).numpy()
        copy_tokens_to_blocks(dst, src, sel.block_ids[first:], count, block_size)
        return
    full = count // block_size
    if full:
        ids = torch.tensor(sel.block_ids[first : first + full], dtype=torch.long, device=cache.device)
        cache.index_copy_(0, ids, data[: full * block_size].reshape(full, block_size, *data.shape[1:]))
    rest = count - full * block_size
    if rest:
        cache[sel.block_ids[first + full], :rest].copy_(data[full * block_size :])


def copy_tokens_to_blocks(dst, src, block_ids: Sequence[int], count: int, block_size: int, offset: int = 0) -> None:
    """Copy the bytes of ``count`` consecutive tokens into blocks, tokens in block order,
    the first one ``offset`` tokens into ``block_ids[0]``.

    ``dst``: a contiguous cache as a numpy ``uint8`` array ``[num_blocks, block_bytes]``;
    ``src``: the tokens' bytes, 1-D. Consecutive block ids take one memcpy; any other
    order one numpy indexed assignment, a memcpy per block in C (both several times
    faster than ``index_copy_``, whose per-index loop dominated the receiver's CPU, and
    twice as fast as a Python loop over runs for scattered blocks). In a partial last
    block only the tokens named are written.
    """
    token_bytes = dst.shape[1] // block_size
    rows_to_blocks(dst.reshape(dst.shape[0], block_size, token_bytes),
                   src[: count * token_bytes].reshape(count, token_bytes), block_ids, block_size, offset)  # fmt: skip


def source_rows(
    layer_caches: dict[str, torch.Tensor], state: torch.Tensor | None, sel: Selection, block_size: int, c: Rows
) -> torch.Tensor:
    """The rows of a chunk, as ``[count, ...]`` in the cache dtype (on the cache's device)."""
    if c.name == STATE_NAME:
        assert state is not None
        return state.reshape(-1, state.shape[-1])[c.start : c.start + c.count]
    return gather_tokens(layer_caches[c.name], sel, block_size, c.start, c.start + c.count)


def head_bytes(cache: torch.Tensor, first: int, count: int) -> np.ndarray | None:
    """Heads ``[first, first + count)`` of a contiguous CPU cache ``[num_blocks,
    block_size, heads, head_dim]`` as a numpy ``uint8`` view ``[num_blocks, block_size,
    count * head_bytes]`` (strided: each token's heads are one span), or None."""
    if cache.device.type != "cpu" or not cache.is_contiguous() or cache.dim() != 4:
        return None
    nb, bs, heads, _ = cache.shape
    per_head = cache.view(torch.uint8).numpy().reshape(nb, bs, heads, -1)
    return per_head[:, :, first : first + count].reshape(nb, bs, -1)  # a view: the last two dims merge


def rows_to_blocks(dst: np.ndarray, src: np.ndarray, block_ids: Sequence[int], block_size: int, offset: int = 0):
    """Write token rows ``src`` (``[count, row_bytes]``) into blocks of ``dst``
    (``[num_blocks, block_size, row_bytes]``, possibly strided: :func:`head_bytes`),
    the first one ``offset`` tokens into ``block_ids[0]``. One numpy copy per partial
    block and one for all the whole blocks (C loops, not Python ones)."""
    count = src.shape[0]
    if offset:
        n = min(block_size - offset, count)
        dst[block_ids[0], offset : offset + n] = src[:n]
        if n < count:
            rows_to_blocks(dst, src[n:], block_ids[1:], block_size)
        return
    full, rest = divmod(count, block_size)
    if full:
        ids = block_ids[:full]
        rows = src[: full * block_size].reshape(full, block_size, -1)
        if _consecutive(ids):
            dst[ids[0] : ids[0] + full] = rows
        else:
            dst[np.asarray(ids, dtype=np.intp)] = rows
    if rest:
        dst[block_ids[full], :rest] = src[full * block_size :]


def rows_from_blocks(src: np.ndarray, block_ids: Sequence[int], block_size: int, out: np.ndarray) -> None:
    """Read ``out.shape[0]`` token rows from the start of ``block_ids[0]`` in ``src``
    (``[num_blocks, block_size, row_bytes]``, possibly strided) into ``out``
    (``[count, row_bytes]``, contiguous): the gather :func:`rows_to_blocks` undoes."""
    full, rest = divmod(out.shape[0], block_size)
    if full:
        ids = block_ids[:full]
        whole = out[: full * block_size].reshape(full, block_size, -1)
        if _consecutive(ids):
            whole[...] = src[ids[0] : ids[0] + full]
        elif src.flags.c_contiguous:
            np.take(src, np.asarray(ids, dtype=np.intp), axis=0, out=whole)
        else:  # some heads of each token: np.take copies a strided source 5x slower (bench/codec_parts.py)
            for i, b in enumerate(ids):
                whole[i] = src[b]
    if rest:
        out[full * block_size :] = src[block_ids[full], :rest]


def _consecutive(ids: Sequence[int]) -> bool:
    return len(ids) == 1 or (ids[-1] - ids[0] == len(ids) - 1 and all(b - a == 1 for a, b in zip(ids, ids[1:])))


def cache_bytes(cache: torch.Tensor) -> np.ndarray | None:
    """A contiguous CPU cache as a numpy ``uint8`` array ``[num_blocks, block_bytes]``
    (made once per cache: a torch view per chunk was a measurable cost), or None."""
    if cache.device.type != "cpu" or not cache.is_contiguous():
        return None
    return cache.view(cache.shape[0], -1).view(torch.uint8).numpy()


def row_views(blocks: np.ndarray, sel: Selection, block_size: int, c: Rows) -> list[memoryview]:
    """The bytes of a chunk's rows in a cache seen as ``blocks`` (:func:`cache_bytes`),
    one view per run of consecutive blocks; the last block's unused tail left out.

    Per-frame work on both sides, so it slices one flat byte view with integers (the
    runs are the selection's, found once): a numpy reshape per run cost 1.5 us each,
    ~90 us for a 2 MiB chunk of 64 scattered blocks, ~15 us this way."""
    lo, hi = row_bounds(blocks.shape[1], sel, block_size, c)
    flat = blocks.data.cast("B")
    return [flat[a:b] for a, b in zip(lo.tolist(), hi.tolist())]


def row_bounds(block_bytes: int, sel: Selection, block_size: int, c: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets ``[lo, hi)`` of a chunk's rows in a contiguous cache of blocks of
    ``block_bytes``: one pair per run of consecutive blocks (:func:`row_views`)."""
    first, last = c.start // block_size, -(-(c.start + c.count) // block_size)
    per_token = block_bytes // block_size
    ids, counts = sel.spans(first, last)
    lo = ids * block_bytes
    hi = lo + counts * block_bytes
    lo[0] += (c.start - first * block_size) * per_token  # rows of the first block before the chunk
    hi[-1] -= (last * block_size - c.start - c.count) * per_token  # the last block's unused rows
    return lo, hi


def raw_views(cache: torch.Tensor, sel: Selection, block_size: int, c: Rows) -> list[memoryview] | None:
    """Zero-copy views of a raw chunk in a contiguous CPU cache (runs of consecutive blocks
    coalesced), or None when the cache cannot be read that way."""
    blocks = cache_bytes(cache)
    return None if blocks is None else row_views(blocks, sel, block_size, c)


def place_rows(
    layer_caches: dict[str, torch.Tensor],
    state: torch.Tensor | None,
    sel: Selection,
    block_size: int,
    c: Rows,
    rows: torch.Tensor,
) -> None:
    """Write decoded rows (``[count, heads, head_dim]``) into their destination."""
    if c.name == STATE_NAME:
        assert state is not None
        dest = state.view(-1, state.shape[-1])[c.start : c.start + c.count]
        dest.copy_(rows.reshape(dest.shape), non_blocking=True)
        return
    cache = layer_caches[c.name]
    scatter_tokens(cache, sel, block_size, c.start, rows.reshape(rows.shape[0], *cache.shape[2:]).to(cache.device))
