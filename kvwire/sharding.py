"""Who sends what when prefill and decode split a model's KV heads differently.

A model's ``k``/``v`` heads are split over tensor-parallel ranks in contiguous, equal
ranges (:meth:`KVLayout.shard`); past one rank per head they are replicated. An MLA
latent and request-level states are whole on every rank. A decode rank needs every head
of its shard, once: from however many prefill ranks hold them (prefill TP > decode TP),
or from the one prefill rank that holds them, which then sends several decode ranks
their heads from the same blocks (prefill TP < decode TP).

The rule, the same on every rank, so that each head reaches each decode rank exactly once:

* a ``k``/``v`` head ``h`` that decode rank ``d`` holds comes from the prefill rank among
  those holding ``h`` at position ``d mod (number of holders)``: with prefill TP at most
  the head count, the one rank that holds it;
* the tensors held whole (MLA latent, states) come from prefill rank ``d mod P`` (or a
  rank the caller chooses: ``whole_from``).

A :class:`Part` is what one prefill rank sends one decode rank. The sender states it in
each BEGIN (the receiver checks it against both shards), so the receiver knows which
heads a chunk carries and when a request has all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvwire.layout import KVLayout, TensorParallel, heads_of


@dataclass(frozen=True)
class Part:
    """What one sender sends one receiver: ``heads`` ``(count, first in the sender's
    shard, first in the receiver's shard)`` of ``k``/``v`` (count 0: none), and whether
    it carries the tensors held whole on every rank (MLA latent, states)."""

    heads: int
    sender_first: int
    receiver_first: int
    whole: bool

    @property
    def empty(self) -> bool:
        return self.heads == 0 and not self.whole


def tp_of(layout: KVLayout) -> TensorParallel:
    """The layout's tensor parallelism; a whole-model layout is rank 0 of 1."""
    if layout.tp is not None:
        return layout.tp
    heads = {p.heads for layer in layout.layers for p in layer.paged if p.name != "kv"}
    return TensorParallel(0, 1, heads.pop() if heads else 1)


def kinds(layout: KVLayout) -> tuple[bool, bool]:
    """Whether a layout has k/v heads (split over ranks), and tensors held whole (an MLA
    latent, states)."""
    has_kv = any(p.name != "kv" for layer in layout.layers for p in layer.paged)
    has_whole = any(layer.state is not None or any(p.name == "kv" for p in layer.paged) for layer in layout.layers)
    return has_kv, has_whole


def holders(head: int, size: int, kv_heads: int) -> range:
    """The ranks of a ``size``-way split that hold KV head ``head``."""
    if size <= kv_heads:
        return range(head // (kv_heads // size), head // (kv_heads // size) + 1)
    replicas = size // kv_heads
    return range(head * replicas, (head + 1) * replicas)


def part_for(sender: TensorParallel, receiver: TensorParallel, has_kv: bool, has_whole: bool = True,
             whole_from: Callable[[int, int], int] | None = None) -> Part:  # fmt: skip
    """What prefill rank ``sender`` sends decode rank ``receiver`` (same model): ``has_kv``,
    ``has_whole``: whether the model has k/v heads, tensors held whole (latent, states)."""
    if sender.kv_heads != receiver.kv_heads:
        raise ValueError(f"the prefill splits {sender.kv_heads} KV heads, the decode {receiver.kv_heads}")
    d, p = receiver.rank, sender.rank
    s_first, s_count = sender.heads
    r_first, r_count = receiver.heads
    mine = []
    if has_kv:
        for h in range(max(s_first, r_first), min(s_first + s_count, r_first + r_count)):
            who = holders(h, sender.size, sender.kv_heads)
            if who[d % len(who)] == p:
                mine.append(h)
    whole_rank = (whole_from or (lambda rank, size: rank % size))(d, sender.size)
    if not 0 <= whole_rank < sender.size:
        raise ValueError(f"whole_from: rank {whole_rank} is outside the prefill's {sender.size} ranks")
    whole = has_whole and whole_rank == p
    if not mine:
        return Part(0, 0, 0, whole)
    return Part(len(mine), mine[0] - s_first, mine[0] - r_first, whole)


def decode_ranks_served(prefill: KVLayout, decode_size: int,
                        whole_from: Callable[[int, int], int] | None = None) -> dict[int, Part]:  # fmt: skip
    """For a prefill rank's layout, the decode ranks of a ``decode_size``-way split it
    sends something to, with what."""
    sender = tp_of(prefill)
    has_kv, has_whole = kinds(prefill)
    out = {}
    for d in range(decode_size):
        receiver = TensorParallel(d, decode_size, sender.kv_heads)
        part = part_for(sender, receiver, has_kv, has_whole, whole_from)
        if not part.empty:
            out[d] = part
    return out


def check_part(part: Part, sender: TensorParallel, receiver: TensorParallel) -> str | None:
    """Why a part a sender announces cannot be right for these shards, or None."""
    s_first, s_count = heads_of(sender.rank, sender.size, sender.kv_heads)
    r_first, r_count = heads_of(receiver.rank, receiver.size, receiver.kv_heads)
    if part.heads < 0 or part.sender_first < 0 or part.receiver_first < 0:
        return "negative head numbers"
    if part.heads == 0:
        return None
    if part.sender_first + part.heads > s_count or part.receiver_first + part.heads > r_count:
        return (
            f"heads {part.sender_first}..{part.sender_first + part.heads} of the sender's {s_count} into "
            f"{part.receiver_first}..{part.receiver_first + part.heads} of the receiver's {r_count}"
        )
    if s_first + part.sender_first != r_first + part.receiver_first:
        return "the heads it sends are not the heads they land in"
    return None
