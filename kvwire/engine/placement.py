"""The data path, one class per way bytes move, chosen once when a Sender or Receiver is made.

Sending (cache -> wire), an :class:`Encoder`:

* :class:`HostEncoder`: caches on the CPU (or on a GPU without kernels for the codec):
  ``raw`` from a contiguous CPU cache goes out as views of the cache itself (no copy);
  a codec that codes rows where they lie (``Codec.encodes_into``: with the compiled
  helper, fp8, int8h, and int4's and int4h's values) reads them there, straight into a
  staging slot; anything else is gathered,
  then encoded by the codec's CPU reference into a staging slot;
* :class:`GpuStagedEncoder`: GPU caches with kernels: gather + encode on the side stream,
  then a copy into a pinned slot (and the ``+lz4`` stage on the host);
* :class:`GpuDirectEncoder`: the same, but the bytes stay in GPU memory for a transport
  that sends from there (UCX with CUDA), with their CRC32C computed on the device.

Receiving (wire -> cache), a :class:`Placement`:

* :class:`HostPlacement`: CPU caches: ``raw`` bytes, or the codec's decoded rows, written
  into the blocks by one writer per cache tensor (numpy memcpys for contiguous caches,
  torch for strided views); a codec that decodes into the rows (``Codec.decodes_into``:
  with the compiled helper, fp8, int8h, int4 and int4h) writes them there itself;
* :class:`GpuPlacement`: GPU caches: the payload (in a pinned slot, or already in GPU
  memory) decoded + scattered by the kernels on the side stream; codecs without kernels
  decode on the CPU and their rows are copied over.

A receiver takes whatever codec its senders chose, so a placement keeps one decoder per
codec descriptor, made the first time the codec is seen.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from kvwire import scatter
from kvwire.blocks import (
    cache_bytes,
    copy_tokens_to_blocks,
    head_bytes,
    place_rows,
    row_views,
    rows_from_blocks,
    rows_to_blocks,
    scatter_tokens,
    source_rows,
)
from kvwire.codec import ChunkSpec, Codec
from kvwire.engine.chunks import ChunkRef
from kvwire.layout import STATE_NAME, KVLayout, Selection
from kvwire.proto.frames import crc32c_parts
from kvwire.scatter import Spans, block_geometry, block_spans, crc32c_together, token_geometry, token_spans
from kvwire.staging import Slot, StagingPool

log = logging.getLogger("kvwire.placement")


def gpu_kernels(device: torch.device, codec: Codec, dtype: torch.dtype) -> Any:
    """The CUDA kernel backend when the caches are on a GPU and the kernels cover the codec."""
    if device.type != "cuda":
        return None
    from kvwire import cuda
    from kvwire.cuda import kernels

    if not cuda.available() or not kernels.supports(codec, dtype):
        log.info("caches on %s but no CUDA kernels for %s/%s: using the CPU reference", device, codec, dtype)
        return None
    return kernels.gpu_backend(device.index or 0)


class Source(Protocol):
    """What an encoder reads from: a transfer's blocks and states (a ``SendHandle``)."""

    selection: Selection
    states: dict[int, torch.Tensor]


@dataclass
class Payload:
    """One DATA frame's payload, wherever it lies.

    ``parts``: host buffers whose concatenation is the payload (views of the cache, or of
    ``slot``, or :class:`~kvwire.scatter.Spans` of the cache); ``device``: the payload in
    GPU memory instead (then ``parts`` is empty and ``crc`` was computed on the device);
    ``crc_of``: computes the CRC instead of reading ``parts`` (:class:`RowChecksums`)."""

    parts: list
    slot: Slot | None
    nbytes: int
    device: torch.Tensor | None = None
    crc: int | None = None
    crc_of: Callable[[], int] | None = None

    def checksum(self) -> int:
        """The payload's CRC32C (computed here for host payloads, just before the send, so
        the bytes are still in cache when sendmsg reads them)."""
        if self.crc is not None:
            return self.crc
        if self.crc_of is not None:
            return self.crc_of()
        return crc32c_parts(self.parts)

    def release(self) -> None:
        if self.slot is not None:
            self.slot.release()
            self.slot = None


# -- sending ---------------------------------------------------------------------------------
class HeadViews:
    """Byte views of some heads of contiguous CPU caches (:func:`kvwire.blocks.head_bytes`),
    made once per (layer, tensor, heads): chunks of a part of the heads move through them
    with one numpy copy, not a gather of every head and then a slice."""

    def __init__(self, caches: list[dict[str, torch.Tensor]]) -> None:
        self._caches = caches
        self._views: dict[tuple, np.ndarray | None] = {}

    def get(self, ref: ChunkRef) -> np.ndarray | None:
        assert ref.heads is not None
        key = (ref.layer, ref.name, ref.heads)
        if key not in self._views:
            self._views[key] = head_bytes(self._caches[ref.layer][ref.name], *ref.heads)
        return self._views[key]


class RowChecksums:
    """The CRCs of chunks that several senders cut from the same token rows: a prefill rank
    sending each of several decode ranks some of the heads of every token (a
    :class:`~kvwire.ShardedSender`'s senders share one). Read one rank's part after
    another, each pass reads part of every row, which this machine's prefetching serves
    at half the speed of whole rows; the first writer to need one of a group's CRCs reads
    the rows once for every rank's part (:func:`kvwire.scatter.crc32c_together`) and
    leaves the others' here for their writers, which then need not read them at all. A
    writer that asks while another computes its CRC waits for it (the senders run in
    step, and both reading the rows would undo the gain).

    A group is a chunk's rows: its transfer's ``row_group`` (the same for the transfers of
    one request to every rank), layer, tensor and rows. A writer whose group was computed
    before and whose CRC is no longer here (a resend, or one so late that its group was
    dropped) reads its own part alone and leaves nothing. Bounded: ``KEEP`` groups with
    CRCs waiting, ``REMEMBER`` groups known to be done. Any failure of the joint pass
    falls back to each writer's own CRC."""

    KEEP = 256
    REMEMBER = 4096

    def __init__(self, head_ranges: list[tuple[int, int]]) -> None:
        if len(set(head_ranges)) != len(head_ranges) or not 2 <= len(head_ranges) <= scatter.TOGETHER_MAX:
            raise ValueError(f"head_ranges: 2 to {scatter.TOGETHER_MAX} distinct ranges, got {head_ranges}")
        self.head_ranges = head_ranges
        self._lock = threading.Lock()
        self._waiting: collections.OrderedDict[tuple, dict[tuple[int, int], int | _Pending]] = collections.OrderedDict()
        self._done: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        # chunks whose CRCs were computed together, found here, waited for, computed alone
        self.counts = {"computed": 0, "taken": 0, "waited": 0, "alone": 0}

    def checksum(self, key: tuple, heads: tuple[int, int], own: Spans,
                 spans_for: Callable[[tuple[int, int]], Spans]) -> int:  # fmt: skip
        """The CRC32C of ``own``, the spans of ``heads`` in the rows ``key`` names;
        ``spans_for`` gives the other ranks' spans of the same rows, for a joint pass."""
        pending = None
        with self._lock:
            group = self._waiting.get(key)
            entry = group.pop(heads, None) if group is not None else None
            if group is not None and not group:
                del self._waiting[key]
            if isinstance(entry, int):
                self.counts["taken"] += 1
                return entry
            if entry is not None:
                self.counts["waited"] += 1
            elif group is not None or key in self._done:
                self.counts["alone"] += 1
            else:  # the first of the group: the others' CRCs come from this pass
                pending = _Pending()
                self._waiting[key] = {h: pending for h in self.head_ranges if h != heads}
                self._remember_locked(key)
        if entry is not None:  # another writer is reading these rows
            entry.done.wait()
            return entry.crc_of(self.head_ranges.index(heads), own)
        if pending is None:
            return own.crc32c()
        try:
            pending.crcs = crc32c_together([own if h == heads else spans_for(h) for h in self.head_ranges])
        except Exception:  # never a dead writer over a shortcut: each computes its own
            log.exception("checksums of several decode ranks' chunks together failed; each computes its own")
        finally:
            pending.done.set()
        with self._lock:
            self.counts["computed"] += 1
            group = self._waiting.get(key)
            if group is not None and pending.crcs is not None:
                for h, crc in zip(self.head_ranges, pending.crcs):
                    if group.get(h) is pending:
                        group[h] = crc
        return pending.crc_of(self.head_ranges.index(heads), own)

    def _remember_locked(self, key: tuple) -> None:
        self._done[key] = None
        while len(self._done) > self.REMEMBER:
            self._done.popitem(last=False)
        while len(self._waiting) > self.KEEP:  # the oldest group's writers compute their own
            self._waiting.popitem(last=False)


class _Pending:
    """CRCs one writer is computing for the others (``RowChecksums``); ``crcs`` stays None
    if that failed."""

    __slots__ = ("done", "crcs")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.crcs: tuple[int, ...] | None = None

    def crc_of(self, index: int, own: Spans) -> int:
        """(once ``done``) The CRC of head range ``index``: computed together, or by its
        own writer when that failed."""
        return self.crcs[index] if self.crcs is not None else own.crc32c()


class CacheSide:
    """What an encoder and a placement share: the layout, this side's caches, and views of
    the heads a chunk carries."""

    def __init__(self, layout: KVLayout, caches: list[dict[str, torch.Tensor]]) -> None:
        self.layout = layout
        self.caches = caches
        self.heads = HeadViews(caches)

    def cache(self, ref: ChunkRef) -> torch.Tensor:
        """The cache tensor a chunk comes from or lands in: a view of just its heads when it
        carries some of the heads this side holds (prefill and decode split heads differently)."""
        cache = self.caches[ref.layer][ref.name]
        if ref.heads is None:
            return cache
        first, count = ref.heads
        return cache[:, :, first : first + count]

    def spans_at(self, ids, ref: ChunkRef, blocks: np.ndarray | None, address: int) -> Spans | None:
        """Where a chunk's rows lie in a contiguous CPU cache (``blocks``, its bytes at
        ``address``), as spans in token order for the block ids ``ids``: a span per token
        for some heads of each, else one per run of blocks; None when the heads have no
        byte view or the blocks are not contiguous. Not for a state."""
        bs = self.layout.block_size
        if ref.heads is not None:
            heads = self.heads.get(ref)
            return None if heads is None else token_spans(heads, ids, bs, ref.start, ref.count)
        return None if blocks is None else block_spans(blocks, address, ids, bs, ref.start, ref.count)


class Encoder(CacheSide):
    """Turns a chunk of a transfer into its payload. Subclasses are the ways bytes move."""

    def __init__(self, layout: KVLayout, caches: list[dict[str, torch.Tensor]], pool: StagingPool) -> None:
        super().__init__(layout, caches)
        self.pool = pool

    def encode(self, source: Source, ref: ChunkRef, spec: ChunkSpec, codec: Codec) -> Payload:
        raise NotImplementedError

    def _into_slot(self, data: torch.Tensor) -> Payload:
        n = data.numel()
        slot = self.pool.acquire(n)
        slot.tensor.copy_(data)
        return Payload([slot.view(n)], slot, n)


class HostEncoder(Encoder):
    """The codec's CPU reference; ``raw`` from a contiguous CPU cache without any copy."""

    def __init__(self, layout, caches, pool, side_stream=None) -> None:
        super().__init__(layout, caches, pool)
        self.side_stream = side_stream  # GPU caches without kernels: rows come to the host on it
        self.bytes = [{name: cache_bytes(t) for name, t in layer.items()} for layer in caches]
        self.addresses = [{n: 0 if b is None else b.ctypes.data for n, b in layer.items()} for layer in self.bytes]
        # Whether chunks go to the stream as spans of the cache (its owner sets it: plain
        # TCP and the compiled helper): some heads of each token, else copied; raw rows
        # over several runs of blocks, else a view per run.
        self.spans = False
        # Shared with the senders of the other decode ranks' heads (ShardedSender sets it).
        self.row_checksums: RowChecksums | None = None

    def encode(self, source: Source, ref: ChunkRef, spec: ChunkSpec, codec: Codec) -> Payload:
        caches = self.caches[ref.layer]
        bs = self.layout.block_size
        blocks = self.bytes[ref.layer].get(ref.name)
        if codec.name == "raw" and blocks is not None and ref.heads is None:
            if not self.spans:
                views = row_views(blocks, source.selection, bs, ref)
                return Payload(views, None, sum(v.nbytes for v in views))
            address = self.addresses[ref.layer][ref.name]
            spans = block_spans(blocks, address, source.selection.ids, bs, ref.start, ref.count)
            if len(spans.iov) > 1:  # scattered blocks: one iovec array, one CRC pass over it
                return Payload([spans], None, spans.nbytes)
            offset = int(spans.iov[0, 0]) - address  # one run: a view of it
            return Payload([blocks.data.cast("B")[offset : offset + spans.nbytes]], None, spans.nbytes)
        if codec.name == "raw" and ref.heads is not None and (heads := self.heads.get(ref)) is not None:
            if self.spans:  # some heads of each token: a span each, read where they lie
                spans = token_spans(heads, source.selection.ids, bs, ref.start, ref.count)
                payload = Payload([spans], None, spans.nbytes)
                group = getattr(source, "row_group", None)
                if self.row_checksums is not None and group is not None and ref.heads in self.row_checksums.head_ranges:
                    key = (group, ref.layer, ref.tensor, ref.start, ref.count)
                    payload.crc_of = functools.partial(self.row_checksums.checksum, key, ref.heads, spans,
                                                       functools.partial(self._spans_of, source, ref))  # fmt: skip
                return payload
            n = ref.count * heads.shape[2]  # some heads of each token: one copy into the slot
            slot = self.pool.acquire(n)
            rows_from_blocks(heads, source.selection.block_ids[ref.start // bs :], bs,
                             slot.array[:n].reshape(ref.count, -1))  # fmt: skip
            return Payload([slot.view(n)], slot, n)
        if codec.encodes_into(spec) and (lying := self._row_spans(source, ref)) is not None:
            n = codec.encoded_size(spec)  # coded where the rows lie, straight into staging
            slot = self.pool.acquire(n)
            try:
                codec.encode_into(lying, spec, slot.array[:n])
            except BaseException:
                slot.release()
                raise
            return Payload([slot.view(n)], slot, n)
        rows = source_rows(caches, source.states.get(ref.layer), source.selection, bs, ref)
        if ref.heads is not None:  # some of this side's heads: gathered into staging below
            first, count = ref.heads
            rows = rows[:, first : first + count]
        if rows.device.type == "cuda":
            with torch.cuda.stream(self.side_stream):
                rows = rows.to("cpu")
        return self._into_slot(codec.encode(rows, spec.role, bs).data)

    def _row_spans(self, source: Source, ref: ChunkRef) -> Spans | None:
        """A chunk's rows where they lie in a contiguous CPU cache, as spans in token order
        (a span per token for some heads of each, else per run of blocks); None for a state,
        other caches, or without the compiled helper."""
        if ref.name == STATE_NAME or not scatter.available():
            return None
        blocks, address = self.bytes[ref.layer].get(ref.name), self.addresses[ref.layer][ref.name]
        return self.spans_at(source.selection.ids, ref, blocks, address)

    def _spans_of(self, source: Source, ref: ChunkRef, heads: tuple[int, int]) -> Spans:
        """The spans of the same rows as ``ref``, other heads (``RowChecksums``)."""
        view = self.heads.get(ref._replace(heads=heads))
        assert view is not None  # the same cache as ref's, which has a view
        return token_spans(view, source.selection.ids, self.layout.block_size, ref.start, ref.count)


class GpuStagedEncoder(Encoder):
    """Gather + encode with the kernels on the side stream, then into a pinned slot.

    Stream order, all on the side stream: the cache rows are ordered by the layer's event
    (the sender makes the side stream wait on it before encoding), the block table is
    copied there once per transfer (``tables.get``), the output is allocated there
    (``kernels.encode``), and the host reads results only after an event recorded there."""

    def __init__(self, layout, caches, pool, kernels_backend, device: torch.device, side_stream) -> None:
        super().__init__(layout, caches, pool)
        self.kernels = kernels_backend
        self.device = device
        self.side_stream = side_stream

    def _encode_on_device(self, source: Source, ref: ChunkRef, spec: ChunkSpec, codec: Codec) -> torch.Tensor:
        from kvwire.cuda import kernels

        side = self.side_stream
        if ref.name == STATE_NAME:
            chunk = kernels.Chunk.state(self.kernels, source.states[ref.layer], ref.start, ref.count)
        else:
            table = self.kernels.tables.get(source, source.selection.block_ids, self.device, side)
            chunk = kernels.Chunk.paged(self.cache(ref), table, ref.start, ref.count, self.layout.block_size)
        return kernels.encode(self.kernels, codec, chunk, spec.role, stream=side)

    def encode(self, source: Source, ref: ChunkRef, spec: ChunkSpec, codec: Codec) -> Payload:
        from kvwire.cuda import kernels

        encoded = self._encode_on_device(source, ref, spec, codec)
        n = encoded.numel()
        slot = self.pool.acquire(n)
        with torch.cuda.stream(self.side_stream):
            slot.tensor.copy_(encoded, non_blocking=True)  # queued on side, after the encode
        kernels.wait_on_host(self.side_stream)  # (None: the kernels' host emulation: already done)
        if not codec.has_lossless_stage:
            return Payload([slot.view(n)], slot, n)
        packed = codec.pack(slot.tensor.numpy(), spec)  # +lz4, on the host
        slot.release()
        return self._into_slot(torch.frombuffer(bytearray(packed), dtype=torch.uint8))


class GpuDirectEncoder(GpuStagedEncoder):
    """Gather + encode with the kernels; the bytes stay in GPU memory for the transport.
    The CRC runs after the encode on the same stream and waits (an event) for both; only
    then is the payload handed to UCX, which reads it outside stream order."""

    def __init__(self, layout, caches, pool, kernels_backend, device, side_stream, checked: bool = True) -> None:
        super().__init__(layout, caches, pool, kernels_backend, device, side_stream)
        self.checked = checked  # the session checks payloads: their CRC32C is computed on the device

    def encode(self, source: Source, ref: ChunkRef, spec: ChunkSpec, codec: Codec) -> Payload:
        from kvwire.cuda import kernels

        encoded = self._encode_on_device(source, ref, spec, codec)
        if not self.checked:
            kernels.wait_on_host(self.side_stream)  # UCX reads it outside stream order
            return Payload([], None, encoded.numel(), encoded, 0)
        crc = kernels.crc32c(self.kernels, encoded, stream=self.side_stream)
        return Payload([], None, encoded.numel(), encoded, crc)


# -- receiving -------------------------------------------------------------------------------
@dataclass(eq=False)  # identity: a transfer's block table is cached per destination
class Destination:
    """Where a request lands: its blocks in token order, and its states by layer."""

    selection: Selection
    states: dict[int, torch.Tensor]


class _BlockWriter:
    """Writes rows into one cache tensor's blocks. Contiguous CPU caches: numpy memcpys from
    the rows' bytes through a byte view made once (a torch view per frame was a measurable
    cost); any other cache (a strided view, 8-bit, GPU): torch."""

    def __init__(self, cache: torch.Tensor, block_size: int) -> None:
        self.cache = cache
        self.block_size = block_size
        self.token_shape = tuple(cache.shape[2:])
        self.bytes: np.ndarray | None = cache_bytes(cache)
        self.address = 0 if self.bytes is None else self.bytes.ctypes.data

    def write(self, sel: Selection, start: int, count: int, data: torch.Tensor) -> None:
        """``data``: the rows as bytes (uint8, 1-D) in the cache's dtype, or as a tensor."""
        if self.bytes is not None:
            src = data.view(torch.uint8).reshape(-1).numpy()
            first, offset = divmod(start, self.block_size)  # mid-block when the sender's blocks are smaller
            copy_tokens_to_blocks(self.bytes, src, sel.block_ids[first:], count, self.block_size, offset)
            return
        rows = data.view(self.cache.dtype).reshape(count, *self.token_shape)
        scatter_tokens(self.cache, sel, self.block_size, start, rows)


class Placement(CacheSide):
    """Writes a received chunk into its destination. Subclasses are the ways bytes move."""

    device_payloads = False  # whether it can take payloads that arrived in GPU memory

    def place(self, codec: Codec, ref: ChunkRef, spec: ChunkSpec, data: torch.Tensor, dest: Destination) -> None:
        raise NotImplementedError

    def takes_device_payloads(self, codec: Codec) -> bool:
        return False

    def destination_views(self, codec: Codec, ref: ChunkRef, dest: Destination) -> list | None:
        """Where a chunk's payload can be received straight into its destination rows (no
        staging, no copy), or None when a decode or a copy must come between."""
        return None

    def span_geometry(self, ref: ChunkRef) -> tuple[int, int, int, int, int] | None:
        """Where raw chunks of ``ref``'s tensor land as spans of the cache (the receive
        lane's destination); None here: only host caches take them."""
        return None


class HostPlacement(Placement):
    def __init__(self, layout: KVLayout, caches: list[dict[str, torch.Tensor]]) -> None:
        super().__init__(layout, caches)
        self.writers = [{name: _BlockWriter(t, layout.block_size) for name, t in layer.items()} for layer in caches]
        self.spans = False  # as HostEncoder.spans: raw rows and split heads land in place as spans

    def destination_views(self, codec: Codec, ref: ChunkRef, dest: Destination) -> list | None:
        """raw into contiguous CPU memory: the rows' bytes, a view per run of consecutive
        blocks (received with one scatter read), the spans of some heads of each token
        (:class:`~kvwire.scatter.Spans`, when ``spans``), or the state's rows."""
        if codec.name != "raw":
            return None
        if ref.name == STATE_NAME:
            state = dest.states[ref.layer]
            rows = state.view(-1, state.shape[-1])[ref.start : ref.start + ref.count]
            return [rows.view(torch.uint8).numpy().reshape(-1).data] if state.device.type == "cpu" else None
        if self.spans:  # a span per token (some heads of each), or per run of blocks: one call reads them all
            spans = self.row_spans(ref, dest)
            return None if spans is None else [spans]
        writer = self.writers[ref.layer][ref.name]
        if ref.heads is not None or writer.bytes is None:  # some heads of each token: staging and a copy
            return None
        return row_views(writer.bytes, dest.selection, self.layout.block_size, ref)

    def row_spans(self, ref: ChunkRef, dest: Destination) -> Spans | None:
        """(with ``spans``) Where a chunk's values lie in the cache, as spans of it in token
        order: a span per token for some heads of each, else one per run of blocks; None
        for a state, or a cache whose blocks are not contiguous."""
        if ref.name == STATE_NAME:
            return None
        writer = self.writers[ref.layer][ref.name]
        return self.spans_at(dest.selection.ids, ref, writer.bytes, writer.address)

    def span_geometry(self, ref: ChunkRef) -> tuple[int, int, int, int, int] | None:
        """(:func:`kvwire.scatter.token_geometry`, ``block_geometry``) None without the
        helper, for a state, and for a cache whose blocks are not contiguous."""
        if not self.spans or ref.name == STATE_NAME:
            return None
        if ref.heads is not None:
            heads = self.heads.get(ref)
            return None if heads is None else token_geometry(heads)
        writer = self.writers[ref.layer][ref.name]
        return None if writer.bytes is None else block_geometry(writer.bytes, writer.address, self.layout.block_size)

    def place(self, codec: Codec, ref: ChunkRef, spec: ChunkSpec, data: torch.Tensor, dest: Destination) -> None:
        if codec.decodes_into(spec) and self.spans and (spans := self.row_spans(ref, dest)) is not None:
            if codec.decode_into(data, spec, spans):  # decoded straight into the rows
                return
        rows = data if codec.name == "raw" else codec.decode_bytes(data, spec)
        if ref.name == STATE_NAME:
            state = dest.states[ref.layer]
            place_rows({}, state, dest.selection, self.layout.block_size, ref, rows.view(spec.dtype).view(spec.shape))
            return
        if ref.heads is not None and (heads := self.heads.get(ref)) is not None:  # some heads of each token
            first, offset = divmod(ref.start, self.layout.block_size)
            rows_to_blocks(heads, rows.view(torch.uint8).numpy().reshape(ref.count, -1),
                           dest.selection.block_ids[first:], self.layout.block_size, offset)  # fmt: skip
            return
        if ref.heads is not None:  # some of the heads of a strided cache: torch scatters
            scatter_tokens(self.cache(ref), dest.selection, self.layout.block_size, ref.start,
                           rows.view(spec.dtype).view(spec.shape))  # fmt: skip
            return
        self.writers[ref.layer][ref.name].write(dest.selection, ref.start, ref.count, rows)


class GpuPlacement(Placement):
    """GPU caches. With kernels for the codec: the payload goes to the device on the side
    stream (a device payload is there already) and is decoded + scattered there; the host
    returns only after an event recorded after the decode, because the slot is reused and
    the ACK promises the bytes are in place. Without kernels: the CPU reference decodes,
    and the rows are copied over on the side stream."""

    def __init__(self, layout, caches, device: torch.device, side_stream, kernels_for) -> None:
        super().__init__(layout, caches)
        self.device = device
        self.side_stream = side_stream
        self._kernels_for = kernels_for  # codec -> backend or None
        self._by_codec: dict[str, Any] = {}

    def kernels(self, codec: Codec) -> Any:
        if codec.descriptor not in self._by_codec:
            self._by_codec[codec.descriptor] = self._kernels_for(codec)
        return self._by_codec[codec.descriptor]

    def takes_device_payloads(self, codec: Codec) -> bool:
        return not codec.has_lossless_stage and self.kernels(codec) is not None

    def receive_device_payload(
        self, stream, codec: Codec, nbytes: int, checked: bool
    ) -> tuple[torch.Tensor, int | None]:
        """Receive a DATA payload into GPU memory; return it with its CRC32C, computed there
        (the host's CPU never reads it), when the session checks payloads."""
        from kvwire.cuda import kernels

        backend = self.kernels(codec)
        buffer = kernels.receive_buffer(nbytes, self.device, self.side_stream)
        stream.recv_device_into(buffer)
        return buffer, kernels.crc32c(backend, buffer, stream=self.side_stream) if checked else None

    def place(self, codec: Codec, ref: ChunkRef, spec: ChunkSpec, data: torch.Tensor, dest: Destination) -> None:
        from kvwire.cuda import kernels

        backend = self.kernels(codec)
        side = self.side_stream
        # The kernels take chunks that start on one of our blocks; a chunk cut on a sender's
        # smaller blocks may begin inside one (block sizes differ): the CPU path places it.
        misaligned = ref.name != STATE_NAME and ref.start % self.layout.block_size != 0
        if backend is None or misaligned:
            data = data.cpu() if data.device.type != "cpu" else data  # a device payload, rarely
            rows = (data if codec.name == "raw" else codec.decode_bytes(data, spec)).view(spec.dtype).view(spec.shape)
            with torch.cuda.stream(side):
                if ref.name == STATE_NAME:
                    place_rows({}, dest.states.get(ref.layer), dest.selection, self.layout.block_size, ref, rows)
                else:
                    scatter_tokens(self.cache(ref), dest.selection, self.layout.block_size, ref.start,
                                   rows.to(self.device))  # fmt: skip
            kernels.wait_on_host(side)  # the slot is reused after this returns
            return
        if codec.has_lossless_stage:  # +lz4: the lossless stage runs on the host
            data = torch.from_numpy(codec.unpack(data, spec))
        if ref.name == STATE_NAME:
            chunk = kernels.Chunk.state(backend, dest.states[ref.layer], ref.start, ref.count)
        else:
            table = backend.tables.get(dest, dest.selection.block_ids, self.device, side)
            chunk = kernels.Chunk.paged(self.cache(ref), table, ref.start, ref.count, self.layout.block_size)
        with torch.cuda.stream(side):
            on_device = data.to(self.device, non_blocking=True)  # allocated and copied on side
        kernels.decode(backend, codec, on_device, chunk, spec.role, stream=side)
        kernels.wait_on_host(side)
