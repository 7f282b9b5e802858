"""Per-request state: which chunks a request must contain, which have arrived.

A request of ``num_tokens`` tokens must deliver, for every layer, every paged tensor's
rows ``0 .. num_tokens-1`` and every state's rows (the codec view of the state), for
every head the receiver holds. Its senders each deliver a *part* (some ``k``/``v``
heads, and/or the tensors held whole on every rank), announced in their BEGIN; the
parts of one request must not overlap. Chunks of paged tensors start on a multiple of
the plan's ``unit`` (a block of the sender; the greatest common divisor of both sides'
block sizes), state chunks on any row. The plan rejects a chunk that is out of range,
misaligned or overlapping what already arrived; an exact repeat of an earlier chunk (a
resend after a lost connection) is reported as a duplicate, so the caller can drop it
without writing anything.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvwire.errors import ProtocolError
from kvwire.layout import STATE_NAME, KVLayout


@dataclass(frozen=True)
class TensorPlan:
    layer: int
    index: int  # the tensor's index in the layer (k, v | kv, then state), on both sides
    name: str
    rows: int  # rows the request must deliver for this tensor
    heads: int  # heads a chunk of it carries
    head_dim: int
    unit: int  # rows per coverage unit: block_size for paged tensors, 1 for states

    @functools.cached_property
    def whole(self) -> bool:
        """Held whole on every tensor-parallel rank (an MLA latent, a state), not split by heads."""
        return self.name in ("kv", STATE_NAME)


@dataclass(frozen=True)
class PartSpec:
    """What one sender's chunks of a request carry: ``heads`` k/v heads from ``first_head``
    of the receiver's shard (0: none), and ``whole``: the tensors held whole."""

    heads: int
    first_head: int
    whole: bool


def part_conflict(parts: Sequence[PartSpec], part: PartSpec, held: int) -> str | None:
    """Why ``part`` cannot join ``parts`` of one request on a side holding ``held`` k/v
    heads (out of range, empty, overlapping another), or None."""
    if part.heads and (part.first_head < 0 or part.first_head + part.heads > held):
        return f"k/v heads {part.first_head}..{part.first_head + part.heads} outside the {held} this side holds"
    if part.heads == 0 and not part.whole:
        return "a part with nothing in it"
    for other in parts:
        if part.whole and other.whole:
            return "the tensors held whole come from another sender already"
        if heads_overlap(part, other):
            return (f"k/v heads {part.first_head}..{part.first_head + part.heads} overlap heads "
                    f"{other.first_head}..{other.first_head + other.heads} of another sender")  # fmt: skip
    return None


def carries(part: PartSpec, t: TensorPlan) -> bool:
    """Whether ``part`` carries rows of tensor ``t``: a tensor held whole, or its heads."""
    return bool(part.whole if t.whole else part.heads)


def heads_overlap(a: PartSpec, b: PartSpec) -> bool:
    return bool(a.heads and b.heads and a.first_head < b.first_head + b.heads and b.first_head < a.first_head + a.heads)


def tensor_plans(layout: KVLayout, num_tokens: int, unit: int | None = None,
                 kv_heads: int | None = None, whole: bool = True) -> list[list[TensorPlan]]:  # fmt: skip
    """Every layer's tensors as a request of ``num_tokens`` sees them. ``kv_heads``: the
    k/v heads a chunk carries (None: all the layout holds; 0: leave k/v out); ``whole``:
    include the tensors held whole."""
    unit = unit or layout.block_size
    out = []
    for i, layer in enumerate(layout.layers):
        plans = []
        for j, p in enumerate(layer.paged):
            if p.name == "kv":
                if whole:
                    plans.append(TensorPlan(i, j, p.name, num_tokens, p.heads, p.head_dim, unit))
            elif kv_heads != 0:
                plans.append(TensorPlan(i, j, p.name, num_tokens, kv_heads or p.heads, p.head_dim, unit))
        if layer.state is not None and whole:
            s = layer.state
            plans.append(TensorPlan(i, len(layer.paged), STATE_NAME, s.rows, 1, s.shape[-1], 1))
        out.append(plans)
    return out


def check_rows(t: TensorPlan, start: int, count: int) -> None:
    """A chunk's rows ``[start, start + count)`` inside ``t`` and aligned to its unit."""
    if count <= 0 or start < 0 or start + count > t.rows:
        raise ProtocolError(f"chunk rows {start}..{start + count} outside 0..{t.rows} of layer {t.layer} {t.name!r}")
    if start % t.unit or ((start + count) % t.unit and start + count != t.rows):
        raise ProtocolError(f"chunk rows {start}..{start + count} of {t.name!r} not aligned to blocks of {t.unit}")


class RequestPlan:
    """What a request must contain and what has arrived, over all its parts.

    ``unit``: rows per coverage unit of paged tensors (default: the layout's block size).

    Its tables are numpy arrays so that the receiver's compiled lane
    (kvwire/engine/lane.py) claims rows in the very same tables, under the same lock:
    per part and tensor, ``covered`` (a byte per unit) and ``counts`` (the rows of the
    chunk that starts at each unit, 0 for none); per layer, ``missing`` (head-units still
    to come) and ``writing`` (chunks being written)."""

    def __init__(self, layout: KVLayout, num_tokens: int, unit: int | None = None) -> None:
        self.layout = layout
        self.num_tokens = num_tokens
        self.unit = unit or layout.block_size
        self.tensors = tensor_plans(layout, num_tokens, self.unit)
        self._by_index = [{t.index: t for t in layer} for layer in self.tensors]
        kv_heads = {t.heads for plans in self.tensors for t in plans if not t.whole}
        self.held_heads = kv_heads.pop() if kv_heads else 0  # the k/v heads this side holds (0: an MLA latent's)
        self._parts: list[PartSpec] = []
        # (layer, tensor, first head) -> coverage units of the part that starts there
        self._covered: dict[tuple[int, int, int], np.ndarray] = {}
        self._counts: dict[tuple[int, int, int], np.ndarray] = {}
        self.missing = np.zeros(layout.num_layers, dtype=np.int64)  # head-units still to come, per layer
        self.writing = np.zeros(layout.num_layers, dtype=np.int64)  # chunks being written, per layer
        for i, plans in enumerate(self.tensors):
            for t in plans:
                self.missing[i] += -(-t.rows // t.unit) * t.heads

    # -- parts -------------------------------------------------------------------------
    @property
    def parts(self) -> tuple[PartSpec, ...]:
        return tuple(self._parts)

    def add_part(self, part: PartSpec) -> str | None:
        """Attach a sender's part; why it cannot be (overlap, out of range), or None."""
        why = part_conflict(self._parts, part, self.held_heads)
        if why is not None:
            return why
        self._parts.append(part)
        for i, plans in enumerate(self.tensors):
            for t in plans:
                first = 0 if t.whole else part.first_head
                if carries(part, t):
                    units = -(-t.rows // t.unit)
                    self._covered[(i, t.index, first)] = np.zeros(units, dtype=np.uint8)
                    self._counts[(i, t.index, first)] = np.zeros(units, dtype=np.int64)
        return None

    # -- chunks ------------------------------------------------------------------------
    def tensor(self, layer: int, index: int) -> TensorPlan:
        if not 0 <= layer < len(self.tensors):
            raise ProtocolError(f"layer {layer} out of range (layout has {len(self.tensors)})")
        t = self._by_index[layer].get(index)
        if t is None:
            raise ProtocolError(f"tensor {index} out of range for layer {layer} ({len(self.tensors[layer])} tensors)")
        return t

    def check(self, layer: int, index: int, start: int, count: int) -> TensorPlan:
        """Validate a chunk's position; return its tensor plan. Raises ProtocolError."""
        t = self.tensor(layer, index)
        check_rows(t, start, count)
        return t

    def _key(self, t: TensorPlan, part: PartSpec) -> tuple[int, int, int]:
        key = (t.layer, t.index, 0 if t.whole else part.first_head)
        if key not in self._covered or not carries(part, t):
            raise ProtocolError(f"layer {t.layer} {t.name!r}: not part of what this sender announced")
        return key

    def coverage(self, layer: int, index: int, part: PartSpec) -> tuple[np.ndarray, np.ndarray]:
        """The ``covered`` and ``counts`` tables of ``part``'s share of a tensor."""
        key = self._key(self.tensor(layer, index), part)
        return self._covered[key], self._counts[key]

    def claim(self, layer: int, index: int, start: int, count: int, part: PartSpec) -> bool:
        """Record a chunk as placed: True when it is new, False for an exact repeat of an
        arrived chunk (nothing recorded); ProtocolError for a partial overlap."""
        t = self.check(layer, index, start, count)
        key = self._key(t, part)
        first, last = start // t.unit, -(-(start + count) // t.unit)  # start is on the unit grid
        counts = self._counts[key]
        if counts[first] == count:
            return False
        covered = self._covered[key]
        if covered[first:last].any():
            raise ProtocolError(f"chunk rows {start}..{start + count} of layer {layer} {t.name!r} overlap earlier data")
        covered[first:last] = 1
        counts[first] = count
        self.missing[layer] -= (last - first) * (1 if t.whole else part.heads)
        return True

    def unmark(self, layer: int, index: int, start: int, count: int, part: PartSpec) -> None:
        """Forget a chunk marked before (its payload failed its checksum: it comes again)."""
        t = self.check(layer, index, start, count)
        key = self._key(t, part)
        first, last = start // t.unit, -(-(start + count) // t.unit)
        counts = self._counts[key]
        if counts[first] != count:
            raise AssertionError(f"unmark of rows {start}..{start + count} that were not marked")
        counts[first] = 0
        self._covered[key][first:last] = 0
        self.missing[layer] += (last - first) * (1 if t.whole else part.heads)

    def missing_layers(self, part: PartSpec) -> list[int]:
        """The layers in which ``part`` (attached) still lacks rows."""
        return [i for i, plans in enumerate(self.tensors)
                if any(not self._covered[self._key(t, part)].all() for t in plans if carries(part, t))]  # fmt: skip

    def unannounced(self) -> str | None:
        """What no attached part carries (heads, the tensors held whole), in words, or None."""
        held = self.held_heads
        taken = np.zeros(held, dtype=bool)
        for part in self._parts:
            taken[part.first_head : part.first_head + part.heads] = True
        lacking = [f"k/v heads {a}..{b}" for a, b in _runs(np.flatnonzero(~taken))] if held else []
        has_whole = any(t.whole for plans in self.tensors for t in plans)
        if has_whole and not any(p.whole for p in self._parts):
            lacking.append("the tensors held whole")
        return ", ".join(lacking) or None

    def layer_complete(self, layer: int) -> bool:
        return bool(self.missing[layer] == 0)

    @property
    def complete(self) -> bool:
        return not self.missing.any()


def _runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Sorted indices as [first, last + 1) runs."""
    runs: list[tuple[int, int]] = []
    for i in indices.tolist():
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
