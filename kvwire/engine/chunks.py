"""Cutting a layer into chunks, and what a receiver holds once they arrive.

A chunk is a run of rows of one tensor of one layer: whole blocks of a paged tensor
(only the request's last block may be partial), or rows of a state. Chunks are sized so
their encoded bytes stay under the receiver's largest payload, and each decodes alone,
so chunks can travel on any connection and be placed in any order.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from kvwire.codec import ChunkSpec, Codec
from kvwire.codec.raw import RawCodec
from kvwire.layout import STATE_NAME, KVLayout
from kvwire.proto.request import TensorPlan

RAW = RawCodec()


class ChunkRef(NamedTuple):
    """Which rows of which tensor a chunk is (made for every frame on both sides: a tuple,
    which costs a tenth of a frozen dataclass to make)."""

    layer: int
    tensor: int  # index into the layer's tensor names
    name: str
    start: int
    count: int  # type: ignore[assignment]  # rows; shadows tuple.count, which nothing here uses
    raw: bool = False  # sent raw whatever the session's codec (the transfer's exact tokens)
    # (first, count) of the k/v heads it carries, in this side's shard; None: every head
    # this side holds (always, unless prefill and decode split heads differently)
    heads: tuple[int, int] | None = None

    def codec(self, session_codec: Codec) -> Codec:
        return RAW if self.raw else session_codec


def chunk_spec(layout: KVLayout, t: TensorPlan, count: int) -> ChunkSpec:
    """What a chunk of ``count`` rows of ``t`` is to a codec (tensor names are codec roles)."""
    return spec_of(count, t.heads, t.head_dim, layout.dtype, t.name, layout.block_size)


@functools.lru_cache(maxsize=4096)
def spec_of(count: int, heads: int, head_dim: int, dtype: torch.dtype, role: str, block_size: int) -> ChunkSpec:
    """A chunk's spec, made once per shape: both sides ask for one per frame, of a few shapes."""
    return ChunkSpec(count, heads, head_dim, dtype, role, block_size)


@functools.lru_cache(maxsize=4096)
def encoded_size(codec: Codec, spec: ChunkSpec) -> int:
    """``codec.encoded_size(spec)``, asked for every DATA frame a receiver checks."""
    return codec.encoded_size(spec)


def row_unit(codec: Codec, t: TensorPlan) -> int:
    """Rows a chunk of ``t`` holds a multiple of (``Codec.row_unit``; states: any row)."""
    return codec.row_unit(t.name, t.unit)


def plan_chunks(
    layout: KVLayout,
    codec: Codec,
    tensors: list[TensorPlan],
    target_bytes: int,
    max_payload: int,
    exact_rows: int = 0,
    kv_heads: tuple[int, int] | None = None,
) -> list[ChunkRef]:
    """Chunks covering every row of ``tensors`` (one layer), each <= ``max_payload`` encoded.

    ``exact_rows``: a lossy codec's paged tensors send their first rows raw (rounded up to
    whole blocks, and key groups), e.g. the attention-sink tokens at a prompt's start.
    ``kv_heads``: the k/v heads the chunks carry, ``(first, count)`` of this side's shard
    (None: all it holds)."""
    chunks = []
    for t in tensors:
        if t.rows == 0:
            continue
        exact = exact_row_count(codec, t.name, t.rows, t.unit, exact_rows)
        heads = None if t.whole else kv_heads
        chunks += _cut(layout, RAW, t, 0, exact, t.unit, target_bytes, max_payload, True, heads)
        chunks += _cut(layout, codec, t, exact, t.rows, row_unit(codec, t), target_bytes, max_payload, False, heads)
    return chunks


def exact_row_count(codec: Codec, name: str, rows: int, block_size: int, exact_tokens: int) -> int:
    """How many first rows of tensor ``name`` (``rows`` in the request) travel raw for a
    sender's ``exact_tokens``: rounded up to whole blocks (and int4 key groups); none for
    states or a lossless codec."""
    if not exact_tokens or name == STATE_NAME or codec.lossless:
        return 0
    unit = codec.exact_unit(name, block_size)
    return min(rows, -(-exact_tokens // unit) * unit)


def received_rows(codec: Codec, rows: torch.Tensor, role: str, block_size: int, exact_tokens: int = 0) -> torch.Tensor:
    """What a receiver holds for a request's ``rows`` of one tensor (``[T, ...]``) from a
    sender with ``exact_tokens``: the codec's CPU reference, the exact rows unchanged."""
    exact = exact_row_count(codec, role, rows.shape[0], block_size, exact_tokens)
    out = rows.clone()
    if exact < rows.shape[0] and codec.name != "raw":
        rest = rows[exact:]
        out[exact:] = codec.decode(codec.encode(rest, role, block_size)).view(rest.shape)
    return out


def _cut(layout, codec, t: TensorPlan, start: int, stop: int, unit: int, target_bytes: int, max_payload: int,
         raw: bool, heads: tuple[int, int] | None) -> list[ChunkRef]:  # fmt: skip
    """Rows ``[start, stop)`` of ``t`` in chunks of whole ``unit`` rows under ``max_payload``."""
    if stop <= start:
        return []
    rows = stop - start

    def fits(units: int) -> bool:
        return codec.encoded_size(chunk_spec(layout, t, min(units * unit, rows))) <= max_payload

    unit_bytes = codec.encoded_size(chunk_spec(layout, t, min(unit, rows)))
    # Units per chunk: as many as the target asks, no more than the rows hold (a short
    # request is one chunk), and the most of those that fit a payload (bytes grow with
    # rows: a bisection, as a chunk's size is not always units times one unit's).
    most = min(max(1, target_bytes // max(unit_bytes, 1)), -(-rows // unit))
    if not fits(1):
        raise ValueError(
            f"layer {t.layer} {t.name!r}: one {'block' if unit > 1 else 'row'} encodes to "
            f"{unit_bytes} bytes, more than the receiver's largest payload ({max_payload}); "
            f"raise the receiver's slot_bytes"
        )
    low, high = 1, most  # fits(low) holds; the answer lies in [low, high]
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    rows_per_chunk = low * unit
    return [
        ChunkRef(t.layer, t.index, t.name, first, min(rows_per_chunk, stop - first), raw, heads)
        for first in range(start, stop, rows_per_chunk)
    ]
