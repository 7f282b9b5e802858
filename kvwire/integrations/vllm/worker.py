"""The connector's worker side: kvwire senders and a receiver over vLLM's own KV cache.

vLLM hands ``register_kv_caches`` one tensor per attention layer, in the logical shape
``[num_blocks, heads, block_size, C]`` whatever its physical order (LBNHC, LBHNC, ...):
K and V side by side in C for full attention, one latent for MLA (heads == 1). kvwire
gets strided views of them (no copies): ``k``/``v`` as ``[blocks, block_size, heads,
head_size]`` and ``kv`` as ``[blocks, block_size, latent]``.

Prefill: the segments planned for this step are opened at the first ``save_kv_layer``
(after the forward has begun, as vLLM calls ``start_load_kv`` only after the forward) and
each layer goes on the wire as soon as vLLM saves it; ``wait_for_save`` sends any layer
that was not saved through the hook (a layer skipped by a CUDA-graph replay, say).
Completion is polled with ``done()``, never with a short ``finish(timeout)`` (which
cancels).

Decode: one :class:`kvwire.Receiver` per worker, listening on ``PORT + tensor-parallel
rank``; ``start_load_kv`` expects the planned segments into the blocks vLLM allocated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

import kvwire
import kvwire.codec
from kvwire.integrations.vllm.config import PROTOCOL, Settings
from kvwire.integrations.vllm.metadata import KvwireConnectorMetadata

log = logging.getLogger("kvwire.vllm")

POLL_S = 0.002  # how often a bounded wait (a preempted request's sends) looks at done()


@dataclass
class CacheViews:
    """vLLM's per-layer caches as a kvwire layout and views, and the layer names in order."""

    layout: kvwire.KVLayout
    views: list[dict[str, torch.Tensor]]
    layer_index: dict[str, int]
    blocks_per_vllm_block: int  # > 1 when the attention kernel splits vLLM's blocks

    def block_ids(self, vllm_ids, num_tokens: int) -> list[int]:
        """kvwire block ids for a vLLM block list holding ``num_tokens`` tokens."""
        r = self.blocks_per_vllm_block
        if r == 1:
            return list(vllm_ids)
        ids = [b * r + j for b in vllm_ids for j in range(r)]
        return ids[: -(-num_tokens // self.layout.block_size)]


def cache_views(kv_caches: dict[str, torch.Tensor], mla: bool, head_size_v: int | None, num_blocks: int,
                tp: tuple[int, int, int | None] = (0, 1, None)) -> CacheViews:  # fmt: skip
    """Map vLLM's registered caches (in registration order) onto a kvwire layout: this
    tensor-parallel rank's shard ``tp = (rank, size, the model's KV heads)`` of the model."""
    seen: dict[int, int] = {}
    layer_index: dict[str, int] = {}
    views: list[dict[str, torch.Tensor]] = []
    specs: list[tuple[kvwire.PagedTensorSpec, ...]] = []
    for name, t in kv_caches.items():
        key = id(t)
        if key in seen:  # a layer that shares another layer's cache (cross-layer KV sharing)
            continue
        if mla:
            latent = t[:, 0] if t.dim() == 4 else t  # [B, 1, N, L] or [B, N, L]
            if latent.dim() != 3:
                raise ValueError(f"register_kv_caches: MLA cache {name!r} has shape {tuple(t.shape)}")
            views.append({"kv": latent})
            specs.append((kvwire.PagedTensorSpec("kv", (latent.shape[-1],)),))
        else:
            if t.dim() != 4:
                raise ValueError(
                    f"register_kv_caches: {name!r} has shape {tuple(t.shape)}; expected "
                    "[num_blocks, heads, block_size, 2 * head_size] (vLLM 0.33's packed K/V pages)"
                )
            c = t.shape[-1]
            dv = head_size_v or c // 2
            dk = c - dv
            x = t.transpose(1, 2)  # [B, N, H, C]
            views.append({"k": x[..., :dk], "v": x[..., dk:]})
            specs.append((kvwire.PagedTensorSpec("k", (t.shape[1], dk)), kvwire.PagedTensorSpec("v", (t.shape[1], dv))))
        seen[key] = len(views) - 1
        layer_index[name] = len(views) - 1
    if not views:
        raise ValueError("register_kv_caches: no KV cache tensors")
    first = next(iter(views[0].values()))
    ratio = first.shape[0] // num_blocks if num_blocks and first.shape[0] % num_blocks == 0 else 1
    layers = tuple(kvwire.LayerSpec(paged=s) for s in specs)
    rank, size, kv_heads = tp
    shard = None
    if size > 1:
        held = 1 if mla else specs[0][0].heads
        shard = kvwire.TensorParallel(rank, size, 1 if mla else kv_heads or held * size)
    layout = kvwire.KVLayout(layers=layers, block_size=first.shape[1], dtype=first.dtype, tp=shard)
    return CacheViews(layout, views, layer_index, ratio)


@dataclass
class _Segment:
    req_id: str
    wire_id: str
    num_tokens: int
    handle: kvwire.ShardedTransfer | kvwire.SendHandle | kvwire.ReceiveHandle | None
    error: str | None = None
    block_ids: list[int] = field(default_factory=list)  # vLLM ids (the decode reports them on failure)
    layers_sent: set = field(default_factory=set)
    deadline: float = 0.0

    def done(self) -> bool:
        return self.handle is None or self.handle.done()


def _send_layer(seg: _Segment, index: int) -> None:
    """Queue layer ``index`` of an open segment. One that ended since it was looked at (a
    reader thread saw a cancel, its deadline or a lost peer) takes no more layers: its
    ValueError must not reach vLLM's forward pass."""
    handle = seg.handle
    assert handle is not None
    try:
        handle.send_layer(index)  # type: ignore[union-attr]
    except ValueError:
        if not handle.done():
            raise
    seg.layers_sent.add(index)


class WorkerSide:
    def __init__(self, settings: Settings, *, producer: bool, consumer: bool, tp_size: int, tp_rank: int,
                 mla: bool, head_size_v: int | None, num_blocks: int, kv_heads: int | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.kv_heads = kv_heads  # the model's, before tensor parallelism
        self.producer, self.consumer = producer, consumer
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self._mla, self._head_size_v, self._num_blocks = mla, head_size_v, num_blocks
        self.caches: CacheViews | None = None
        self.receiver: kvwire.Receiver | None = None
        self._senders: dict[tuple[str, int], kvwire.ShardedSender] = {}
        self._lock = threading.Lock()
        self._meta: KvwireConnectorMetadata | None = None
        self._step: list[_Segment] = []  # prefill segments opened this step
        self._opened = False
        self._outgoing: dict[str, list[_Segment]] = defaultdict(list)
        self._finished_prefills: set[str] = set()  # vLLM said finished; reported once every segment ended
        self._incoming: dict[str, list[_Segment]] = {}
        self._missing: dict[str, list[int]] = {}
        self._aborted: set[str] = set()
        self._load_errors: set[int] = set()
        self._stats = new_stats()
        # Called with (request id, [kvwire.SendHandle or None per segment]) as a prefill request
        # is reported finished (the benchmark reads per-request times from the handles).
        self.on_request_sent = None

    # -- set-up ------------------------------------------------------------------------------
    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.caches = cache_views(kv_caches, self._mla, self._head_size_v, self._num_blocks,
                                  (self.tp_rank, self.tp_size, self.kv_heads))  # fmt: skip
        if self.consumer:
            host, port = self.settings.listen or ("0.0.0.0", 0)
            staging = (self.settings.staging_mib or 256) << 20
            self.receiver = kvwire.Receiver(
                self.caches.layout, (host, port + self.tp_rank if port else 0), secret=self.settings.secret,
                kv_caches=self.caches.views, staging_bytes=staging, codecs=[self.settings.codec],
                unclaimed_timeout=self.settings.deadline_s, tls=self.settings.server_tls(),
                check_terms=self._check_terms,
            )  # fmt: skip
            log.info("kvwire receiver of rank %d listens on %s:%d", self.tp_rank, *self.receiver.address)

    def terms(self) -> dict:
        assert self.caches is not None
        # Tensor parallelism and block sizes may differ between the two instances: kvwire's
        # handshake pairs the shards (and refuses a different model, naming what differs).
        return {"protocol": PROTOCOL, "segment_tokens": self.settings.segment_tokens}

    def _check_terms(self, terms: dict) -> str | None:
        mine = self.terms()
        names = {"protocol": "connector protocol", "segment_tokens": "segment_tokens"}
        for key, what in names.items():
            if terms.get(key) != mine[key]:
                return f"{what} differs: the prefill has {terms.get(key)!r}, this decode has {mine[key]!r}"
        return None

    # -- prefill -----------------------------------------------------------------------------
    def _sender(self, peer: tuple[str, int], checked: dict | None = None) -> kvwire.ShardedSender:
        """This rank's sender to the decode instance at ``peer`` (its rank d listens on
        ``PORT + d``): connected to every decode rank this rank sends heads to; a new one
        if every connection of one of them died. ``checked`` caches the answer for the
        rest of a step."""
        if checked is not None and peer in checked:
            return checked[peer]
        tx = self._senders.get(peer)
        if tx is not None and all(s.stats()["alive_streams"] for s in tx.senders.values()):
            if checked is not None:
                checked[peer] = tx
            return tx
        if tx is not None:
            tx.close()
        assert self.caches is not None
        decode_tp = self.settings.decode_tp or self.tp_size
        tx = kvwire.ShardedSender(
            self.caches.layout, [(peer[0], peer[1] + d) for d in range(decode_tp)], secret=self.settings.secret,
            kv_caches=self.caches.views, streams=self.settings.connections, codec=self.settings.codec,
            exact_tokens=self.settings.exact_tokens, staging_bytes=(self.settings.staging_mib or 64) << 20,
            tls=self.settings.client_tls(), connect_timeout=self.settings.connect_timeout_s, terms=self.terms(),
        )  # fmt: skip
        self._senders[peer] = tx
        if checked is not None:
            checked[peer] = tx
        return tx

    def bind(self, meta: KvwireConnectorMetadata) -> None:
        self._meta = meta
        self._opened = False
        # Now, not with the step's segments: a step without a forward pass (nothing
        # scheduled but the abort) never reaches save_kv_layer or wait_for_save.
        for a in meta.abandons:
            self._abandon(a)

    def _open_step(self) -> None:
        """Open this step's segments (once): one kvwire transfer each, to the paired rank."""
        if self._opened or self._meta is None or self.caches is None:
            return
        self._opened = True
        meta = self._meta
        failed: dict[tuple[str, int], str] = {}
        checked: dict[tuple[str, int], kvwire.Sender] = {}
        for s in meta.sends:
            deadline = time.monotonic() + self.settings.deadline_s
            seg = _Segment(s.req_id, s.wire_id, s.num_tokens, None, deadline=deadline)
            try:
                if s.peer in failed:
                    raise kvwire.PeerLost(failed[s.peer])
                tx = self._sender(s.peer, checked)
                ids = self.caches.block_ids(s.block_ids, s.num_tokens)
                seg.handle = tx.transfer(s.wire_id, ids, s.num_tokens, deadline=self.settings.deadline_s)
                self._step.append(seg)
            except (kvwire.KvwireError, OSError, ValueError) as exc:  # ValueError: a decode not as configured
                # (its ranks are not those decode_tp says): this segment fails, never the engine's step
                failed[s.peer] = str(exc)
                seg.error = str(exc)
                self._stats["send_failures"] += 1
                log.warning("segment %s not sent: %s", s.wire_id, exc)
            self._outgoing[s.req_id].append(seg)

    def _abandon(self, a) -> None:
        """Tell the decode that these segments will never come (the prefill request ended)."""
        assert self.caches is not None
        try:
            tx = self._sender(a.peer)
            for wire_id, num_tokens in a.segments:
                blocks = list(range(-(-num_tokens // self.caches.layout.block_size)))  # never read: cancelled first
                tx.transfer(wire_id, blocks, num_tokens, deadline=self.settings.deadline_s).cancel(
                    "the prefill request ended before this segment was computed"
                )
        except (kvwire.KvwireError, OSError, ValueError) as exc:
            log.info("could not tell the decode that %s was abandoned: %s", a.req_id, exc)

    def save_layer(self, layer_name: str) -> None:
        if not self._opened:
            self._open_step()
        if not self._step or self.caches is None:
            return
        index = self.caches.layer_index.get(layer_name)
        if index is None:
            return  # a layer that shares another layer's cache
        for seg in self._step:
            if index not in seg.layers_sent and seg.handle is not None and not seg.handle.done():
                _send_layer(seg, index)

    def wait_for_save(self) -> None:
        self._open_step()
        assert self.caches is not None or not self._step
        for seg in self._step:
            if seg.handle is None or seg.handle.done() or self.caches is None:
                continue
            for i in range(self.caches.layout.num_layers):
                if i not in seg.layers_sent:
                    _send_layer(seg, i)
        self._step = []

    def handle_preemptions(self, meta: KvwireConnectorMetadata) -> None:
        """vLLM frees a preempted request's blocks at once; wait (bounded) until kvwire no
        longer reads them, so the next forward cannot overwrite bytes still on their way."""
        for req_id in meta.preempted:
            for seg in self._outgoing.get(req_id, ()):
                while not seg.done() and time.monotonic() < seg.deadline:
                    time.sleep(POLL_S)
                self._expire(seg)

    def _expire(self, seg: _Segment) -> None:
        if not seg.done() and time.monotonic() >= seg.deadline:
            seg.handle.cancel(f"deadline of {self.settings.deadline_s:g} s passed")  # type: ignore[union-attr]

    def finished_sending(self, finished_req_ids: set[str]) -> set[str]:
        self._finished_prefills |= finished_req_ids & set(self._outgoing)
        done = set()
        for req_id in list(self._finished_prefills):
            segs = self._outgoing[req_id]
            for seg in segs:
                self._expire(seg)
            if all(seg.done() for seg in segs):
                for seg in segs:
                    self._record_send(seg)
                if self.on_request_sent is not None:
                    self.on_request_sent(req_id, [seg.handle for seg in segs])
                del self._outgoing[req_id]
                self._finished_prefills.discard(req_id)
                done.add(req_id)
        return done

    def _record_send(self, seg: _Segment) -> None:
        st = self._stats
        if not isinstance(seg.handle, kvwire.SendHandle | kvwire.ShardedTransfer):
            return
        try:
            s = seg.handle.finish(timeout=0)  # done already: returns at once, cancels nothing
        except kvwire.TransferError as exc:
            st["send_failures"] += 1
            log.warning("segment %s failed: %s", seg.wire_id, exc)
            return
        st["sent_segments"] += 1
        st["sent_bytes"] += s["wire_bytes"]
        st["sent_logical_bytes"] += s["logical_bytes"]
        st["send_ms"].append(s["total_ms"])
        if s["exposed_ms"] is not None:
            st["exposed_ms"].append(s["exposed_ms"])

    # -- decode ------------------------------------------------------------------------------
    def start_load(self) -> None:
        meta, rx = self._meta, self.receiver
        if meta is None or rx is None or self.caches is None:
            return
        deadline = self.settings.deadline_s
        for r in meta.receives:
            segs = []
            for wire_id, block_ids, num_tokens in r.segments:
                seg = _Segment(r.req_id, wire_id, num_tokens, None, block_ids=list(block_ids))
                try:
                    seg.handle = rx.expect(wire_id, self.caches.block_ids(block_ids, num_tokens), num_tokens,
                                           deadline=deadline)  # fmt: skip
                except ValueError as exc:
                    seg.error = str(exc)
                    log.warning("segment %s cannot be expected: %s", wire_id, exc)
                segs.append(seg)
            self._incoming[r.req_id] = segs
            self._missing[r.req_id] = list(r.missing_blocks)
        for wire_id in meta.declines:
            # kvwire has no "decline": an expect of no tokens never matches a segment of
            # some tokens, so a segment already here fails at once (nothing is written),
            # and cancelling it refuses one that comes later.
            try:
                rx.expect(wire_id, [], 0, deadline=deadline).cancel("the decode computes these tokens itself")
            except ValueError as exc:
                log.info("segment %s: %s", wire_id, exc)
        for req_id in meta.cancel_receives:
            self._aborted.add(req_id)
            for seg in self._incoming.get(req_id, ()):
                if seg.handle is not None:
                    seg.handle.cancel("the decode request was aborted")

    def finished_recving(self) -> set[str]:
        done = set()
        for req_id, segs in list(self._incoming.items()):
            if not all(seg.done() for seg in segs):
                continue
            del self._incoming[req_id]
            missing = self._missing.pop(req_id, [])
            aborted = req_id in self._aborted
            self._aborted.discard(req_id)
            failed = False
            for seg in segs:
                ok = seg.handle is not None and seg.handle.ok()  # type: ignore[union-attr]
                if ok:
                    stats = seg.handle.stats()  # type: ignore[union-attr]
                    self._stats["received_segments"] += 1
                    self._stats["received_bytes"] += stats["wire_bytes"]
                    if stats["receive_ms"] is not None:
                        self._stats["receive_ms"].append(stats["receive_ms"])
                    continue
                failed = True
                if not aborted:
                    self._load_errors.update(seg.block_ids)
                    reason = seg.error or seg.handle.stats()["error"]  # type: ignore[union-attr]
                    log.warning("segment %s of request %s failed: %s", seg.wire_id, req_id, reason)
            if missing and not aborted:
                self._load_errors.update(missing)
                failed = True
            if failed and not aborted:
                self._stats["receive_failures"] += 1
            done.add(req_id)
        return done

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- both ----------------------------------------------------------------------------------
    def has_pending(self) -> bool:
        return bool(self._outgoing or self._incoming)

    def take_stats(self) -> dict:
        stats, self._stats = self._stats, new_stats()
        return dict(stats)

    def close(self) -> None:
        for tx in self._senders.values():
            tx.close()
        self._senders.clear()
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None


def new_stats() -> defaultdict:
    stats: defaultdict = defaultdict(int)
    for key in ("send_ms", "exposed_ms", "receive_ms"):
        stats[key] = []
    return stats
