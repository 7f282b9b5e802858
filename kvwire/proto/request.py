"""Per-request receive state: which chunks a request must contain, which have arrived.

A request of ``num_tokens`` tokens must deliver, for every layer, every paged tensor's
rows ``0 .. num_tokens-1`` and every state's rows (the codec view of the state). Chunks
of paged tensors start on a block boundary; state chunks may start on any row. The plan
rejects a chunk that is out of range, misaligned or overlapping what already arrived;
an exact repeat of an earlier chunk (a resend after a lost connection) is reported as
a duplicate, so the caller can drop it without writing anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvwire.errors import ProtocolError
from kvwire.layout import STATE_NAME, KVLayout


@dataclass(frozen=True)
class TensorPlan:
    layer: int
    index: int
    name: str
    rows: int  # rows the request must deliver for this tensor
    heads: int
    head_dim: int
    unit: int  # rows per coverage unit: block_size for paged tensors, 1 for states


class RequestPlan:
    def __init__(self, layout: KVLayout, num_tokens: int) -> None:
        self.layout = layout
        self.num_tokens = num_tokens
        self.tensors: list[list[TensorPlan]] = []
        self._covered: dict[tuple[int, int], bytearray] = {}
        self._chunks: dict[tuple[int, int], dict[int, int]] = {}
        self._missing_units = [0] * layout.num_layers
        for i, layer in enumerate(layout.layers):
            plans = []
            for j, p in enumerate(layer.paged):
                plans.append(TensorPlan(i, j, p.name, num_tokens, p.heads, p.head_dim, layout.block_size))
            if layer.state is not None:
                s = layer.state
                plans.append(TensorPlan(i, len(plans), STATE_NAME, s.rows, 1, s.shape[-1], 1))
            self.tensors.append(plans)
            for t in plans:
                units = -(-t.rows // t.unit)
                self._covered[(i, t.index)] = bytearray(units)
                self._chunks[(i, t.index)] = {}
                self._missing_units[i] += units

    def tensor(self, layer: int, index: int) -> TensorPlan:
        if not 0 <= layer < len(self.tensors):
            raise ProtocolError(f"layer {layer} out of range (layout has {len(self.tensors)})")
        plans = self.tensors[layer]
        if not 0 <= index < len(plans):
            raise ProtocolError(f"tensor {index} out of range for layer {layer} ({len(plans)} tensors)")
        return plans[index]

    def check(self, layer: int, index: int, start: int, count: int) -> TensorPlan:
        """Validate a chunk's position; return its tensor plan. Raises ProtocolError."""
        t = self.tensor(layer, index)
        if count <= 0 or start < 0 or start + count > t.rows:
            raise ProtocolError(f"chunk rows {start}..{start + count} outside 0..{t.rows} of layer {layer} {t.name!r}")
        if start % t.unit or ((start + count) % t.unit and start + count != t.rows):
            raise ProtocolError(f"chunk rows {start}..{start + count} of {t.name!r} not aligned to blocks of {t.unit}")
        return t

    def is_duplicate(self, layer: int, index: int, start: int, count: int) -> bool:
        """True for an exact repeat of an arrived chunk; ProtocolError for a partial overlap."""
        t = self.check(layer, index, start, count)
        if self._chunks[(layer, index)].get(start) == count:
            return True
        covered = self._covered[(layer, index)]
        if any(covered[start // t.unit : -(-(start + count) // t.unit)]):
            raise ProtocolError(f"chunk rows {start}..{start + count} of layer {layer} {t.name!r} overlap earlier data")
        return False

    def mark(self, layer: int, index: int, start: int, count: int) -> None:
        """Record a chunk as placed (after :meth:`is_duplicate` said it is new)."""
        t = self.check(layer, index, start, count)
        first, last = start // t.unit, -(-(start + count) // t.unit)
        covered = self._covered[(layer, index)]
        covered[first:last] = b"\x01" * (last - first)
        self._chunks[(layer, index)][start] = count
        self._missing_units[layer] -= last - first

    def unmark(self, layer: int, index: int, start: int, count: int) -> None:
        """Forget a chunk marked before (its payload failed its checksum: it comes again)."""
        t = self.check(layer, index, start, count)
        if self._chunks[(layer, index)].pop(start, None) != count:
            raise AssertionError(f"unmark of rows {start}..{start + count} that were not marked")
        first, last = start // t.unit, -(-(start + count) // t.unit)
        self._covered[(layer, index)][first:last] = bytes(last - first)
        self._missing_units[layer] += last - first

    def layer_complete(self, layer: int) -> bool:
        return self._missing_units[layer] == 0

    @property
    def complete(self) -> bool:
        return not any(self._missing_units)
