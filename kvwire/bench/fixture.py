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


def layout_and_blocks(args, side: str = "prefill", rank: int = 0) -> tuple[kvwire.KVLayout, int, int]:
    """The layout one rank of ``side`` ("prefill" or "decode") holds (its tensor-parallel
    shard of the profile's model, in its own block size), the blocks one request takes
    there, and the blocks of all requests."""
    layout = profiles.get(args.profile).layout()
    size = getattr(args, f"{side}_tp", 1)
    if size > 1:
        layout = layout.shard(rank, size)
    if side == "decode" and getattr(args, "decode_block_size", None):
        layout = layout.with_block_size(args.decode_block_size)
    per_request = -(-args.tokens // layout.block_size)
    return layout, per_request, per_request * args.requests


def head_range(layout: kvwire.KVLayout, name: str) -> slice:
    """The model's k/v heads a shard's tensor ``name`` holds (every head of an MLA latent)."""
    if layout.tp is None or name == "kv":
        return slice(None)
    first, count = layout.tp.heads
    return slice(first, first + count)


def shard_caches(caches, layout: kvwire.KVLayout) -> list[dict]:
    """A prefill rank's own caches (its heads of the whole model's, contiguous, as a
    tensor-parallel rank holds them)."""
    if layout.tp is None:
        return caches
    return [{name: t[:, :, head_range(layout, name)].contiguous() if t.dim() == 4 else t
             for name, t in layer.items()} for layer in caches]  # fmt: skip


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


def zero(caches, states) -> None:
    """Clear caches and every request's states (dicts of layer -> tensor), so a round that
    delivers nothing cannot pass on an earlier round's bytes."""
    for tensors in [*caches, *states]:
        for t in tensors.values():
            t.zero_()


def request_states(layout: kvwire.KVLayout, i: int) -> dict:
    """Request ``i``'s states (layer -> tensor), each request's unlike the others', so a
    state delivered to the wrong request, or not at all, fails the check."""
    states = layout.allocate_states()
    fill([], states, seed=1000 + i, dtype=layout.dtype)
    return states


def src_blocks(i: int, per: int) -> list[int]:
    return list(range(i * per, (i + 1) * per))


def dst_blocks(i: int, per: int, order: str = "reverse") -> list[int]:
    """Request ``i``'s destination blocks: reversed by default (a different order exercises
    the scatter: a run per block), or in order (``"forward"``: one run per chunk, as a
    fresh block allocator hands them out)."""
    blocks = src_blocks(i, per)
    return blocks if order == "forward" else list(reversed(blocks))


def verify(layout, args, reference, dst, states, per, source_block_size: int | None = None) -> bool:
    """Does ``dst`` (this decode rank's caches, of ``layout``) hold what it must?
    ``reference`` holds the whole model's source caches, paged in the prefill's block size
    (``source_block_size``; default: this layout's), and every request's source states
    (:func:`request_states`); ``states``, every request's received ones. The codec's CPU
    reference is applied to the whole model's rows, then this rank's heads are compared
    (every codec's scales are per head, so a head's decoded values do not depend on the
    split)."""
    codec = kvwire.codec.get(args.codec)
    src, src_states = reference
    bs = layout.block_size
    src_bs = source_block_size or bs
    src_per = -(-args.tokens // src_bs)
    for i in range(args.requests):
        s_sel = Selection(tuple(src_blocks(i, src_per)), args.tokens)
        d_sel = Selection(tuple(dst_blocks(i, per, getattr(args, "destination", "reverse"))), args.tokens)
        for layer, spec in enumerate(layout.layers):
            for p in spec.paged:
                a = gather_tokens(src[layer][p.name], s_sel, src_bs)
                b = gather_tokens(dst[layer][p.name], d_sel, bs)
                want = received_rows(codec, a, p.name, src_bs, args.exact_tokens)
                if want.dim() == 3:
                    want = want[:, head_range(layout, p.name)]
                if not torch.equal(
                    b.view(torch.uint8) if codec.lossless else b, want.view(torch.uint8) if codec.lossless else want
                ):
                    return False
            if spec.state is not None:
                a = src_states[i][layer]
                if not torch.equal(states[i][layer], received_rows(codec, a, "state", src_bs)):
                    return False
    return True


def memory_views(caches, states=()) -> list[memoryview]:
    """Every paged cache tensor as one flat byte view, layer by layer, then every state
    tensor of ``states`` (dicts of layer -> tensor): the memory kvwire moves, for the
    plain-socket baselines."""
    tensors = [t for layer in caches for t in layer.values()] + [t for group in states for t in group.values()]
    return [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in tensors]
