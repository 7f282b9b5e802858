"""The loopback benchmark's data: which blocks each request uses on each side, cheap
deterministic contents, and the check that the receiver holds what it must.

What the receiver must hold is ``kvwire.engine.chunks.received_rows``, the same
definition the tests use: the codec's CPU reference, a transfer's exact tokens unchanged.
"""

from __future__ import annotations

import torch

import kvwire
import kvwire.codec
from kvwire.bench import profiles
from kvwire.blocks import gather_tokens
from kvwire.engine.chunks import received_rows
from kvwire.layout import Selection

PRIME = 1_000_003  # fill pattern period: not a multiple of any block, so misplaced blocks differ


def layout_and_blocks(args) -> tuple[kvwire.KVLayout, int, int]:
    layout = profiles.get(args.profile).layout()
    per_request = -(-args.tokens // layout.block_size)
    return layout, per_request, per_request * args.requests


def fill(caches, states, seed: int, dtype: torch.dtype) -> None:
    """Deterministic, cheap, position-dependent contents (randn over GiBs takes too long)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(PRIME, generator=g).to(dtype)
    offset = 0
    for tensors in [*caches, states]:
        for t in tensors.values():
            flat = t.view(-1)
            for start in range(0, flat.numel(), PRIME):
                n = min(PRIME, flat.numel() - start)
                shift = (offset + start) % PRIME
                flat[start : start + n] = base.roll(-shift)[:n]
            offset += 7919


def src_blocks(i: int, per: int) -> list[int]:
    return list(range(i * per, (i + 1) * per))


def dst_blocks(i: int, per: int) -> list[int]:
    return list(reversed(src_blocks(i, per)))  # a different order exercises the scatter


def verify(layout, args, reference, dst, states, per) -> bool:
    codec = kvwire.codec.get(args.codec)
    src, src_states = reference
    bs = layout.block_size
    for i in range(args.requests):
        s_sel = Selection(tuple(src_blocks(i, per)), args.tokens)
        d_sel = Selection(tuple(dst_blocks(i, per)), args.tokens)
        for layer, spec in enumerate(layout.layers):
            for p in spec.paged:
                a = gather_tokens(src[layer][p.name], s_sel, bs)
                b = gather_tokens(dst[layer][p.name], d_sel, bs)
                want = received_rows(codec, a, p.name, bs, args.exact_tokens)
                if not torch.equal(
                    b.view(torch.uint8) if codec.lossless else b, want.view(torch.uint8) if codec.lossless else want
                ):
                    return False
            if spec.state is not None:
                a = src_states[layer]
                if not torch.equal(states[i][layer], received_rows(codec, a, "state", bs)):
                    return False
    return True


def memory_views(caches) -> list[memoryview]:
    """Every paged cache tensor as one flat byte view, layer by layer."""
    return [memoryview(t.view(-1).view(torch.uint8).numpy()) for layer in caches for t in layer.values()]
