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
cancels). Connections to a decode are made by a thread of their own, never in the
forward pass: a segment for a decode not yet connected waits (its blocks are held) and
goes out, every layer saved so far, at the first hook after the connection is made.

Decode: one :class:`kvwire.Receiver` per worker, listening on ``PORT + tensor-parallel
rank``; ``start_load_kv`` expects the planned segments into the blocks vLLM allocated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

import kvwire
import kvwire.codec
from kvwire.integrations.vllm.config import PROTOCOL, Settings
from kvwire.integrations.vllm.metadata import KvwireConnectorMetadata
from kvwire.threads import Thread

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
    # A prefill segment whose decode is being connected: kvwire block ids to open it on,
    # and the layers vLLM saved meanwhile (all of them once its step ended).
    peer: tuple[str, int] | None = None
    connecting: bool = False
    send_blocks: list[int] = field(default_factory=list)
    layers_saved: set = field(default_factory=set)

    def done(self) -> bool:
        if self.connecting:
            return False
        return self.handle is None or self.handle.done()


def _send_layer(seg: _Segment, index: int) -> None:
    """Queue layer ``index`` of an open segment. One that ended since it was looked at (a
    reader thread saw a cancel, its deadline or a lost peer) takes the layer and drops it:
    nothing reaches vLLM's forward pass, and the failure is reported when it is collected."""
    handle = seg.handle
    assert handle is not None
    handle.send_layer(index)  # type: ignore[union-attr]
    seg.layers_sent.add(index)


def _stop_after_a_failure(segs: list[_Segment]) -> None:
    """A decode request's segments after one that failed are cancelled: vLLM keeps the
    KV before the first block that failed to load and computes the rest (or fails the
    request), so waiting for them would only hold its blocks, perhaps until the deadline
    (a prefill request preempted before they were sent is computed again only when its
    engine has room). The cancel reaches the prefill, which releases their blocks."""
    failed = next((i for i, seg in enumerate(segs) if seg.done() and not _received(seg)), None)
    if failed is None:
        return
    for seg in segs[failed + 1 :]:
        if not seg.done():
            seg.handle.cancel(f"an earlier segment, {segs[failed].wire_id}, failed")  # type: ignore[union-attr]


def _received(seg: _Segment) -> bool:
    return seg.handle is not None and seg.handle.ok()  # type: ignore[union-attr]


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
        # Decodes being connected (by a thread each), with what waits for them: segments to
        # open and (wire id, tokens, reason) to cancel on the wire once connected.
        self._connects: dict[tuple[str, int], Future] = {}
        self._waiting: dict[tuple[str, int], list[_Segment]] = defaultdict(list)
        self._cancels_waiting: dict[tuple[str, int], list[tuple[str, int, str]]] = defaultdict(list)
        self._closed = False
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
    def _ready_sender(self, peer: tuple[str, int], checked: dict | None = None) -> kvwire.ShardedSender | None:
        """This rank's sender to the decode instance at ``peer`` (its rank d listens on
        ``PORT + d``), connected to every decode rank this rank sends heads to; None while
        it is being connected (a new decode, or every connection of one of its ranks
        died), which this starts. ``checked`` caches the answer for the rest of a step."""
        if checked is not None and peer in checked:
            return checked[peer]
        tx = self._senders.get(peer)
        if tx is not None and not all(s.stats()["alive_streams"] for s in tx.senders.values()):
            del self._senders[peer]
            tx.close()
            tx = None
        if tx is None:
            self._connect(peer)
        if checked is not None:
            checked[peer] = tx
        return tx

    def _connect(self, peer: tuple[str, int]) -> None:
        """Connect to the decode at ``peer`` in a thread of its own (once at a time): a
        decode that accepts but never answers costs ``connect_timeout_s`` there, not in
        vLLM's forward pass. :meth:`_poll_connects` takes the result."""
        if peer in self._connects:
            return
        assert self.caches is not None
        caches, settings, terms = self.caches, self.settings, self.terms()
        decode_tp = settings.decode_tp or self.tp_size
        future: Future = Future()

        def connect() -> None:
            try:
                tx = kvwire.ShardedSender(
                    caches.layout, [(peer[0], peer[1] + d) for d in range(decode_tp)], secret=settings.secret,
                    kv_caches=caches.views, streams=settings.connections, codec=settings.codec,
                    exact_tokens=settings.exact_tokens, staging_bytes=(settings.staging_mib or 64) << 20,
                    tls=settings.client_tls(), connect_timeout=settings.connect_timeout_s, terms=terms,
                )  # fmt: skip
            except Exception as exc:  # every failure reaches the segments that wait for it
                future.set_exception(exc)
                return
            with self._lock:
                closed = self._closed
                cancels = [] if closed else self._cancels_waiting.pop(peer, [])
            if closed:
                tx.close()
                future.set_exception(kvwire.Cancelled("the connector shut down"))
                return
            for wire_id, num_tokens, reason in cancels:  # now: they need no forward pass (nor its blocks)
                self._cancel_on(tx, wire_id, num_tokens, reason)
            future.set_result(tx)

        self._connects[peer] = future
        Thread(connect, f"kvwire-connect-{peer[1]}").start()

    def _poll_connects(self) -> None:
        """Take the connections made since the last hook: open the segments that waited
        for them (sending every layer saved meanwhile) and send the cancels; fail them if
        the connection could not be made."""
        for peer, future in list(self._connects.items()):
            if not future.done():
                continue
            del self._connects[peer]
            with self._lock:
                cancels = self._cancels_waiting.pop(peer, [])
            segs = self._waiting.pop(peer, [])
            try:
                tx = future.result()
            except Exception as exc:
                for seg in segs:
                    self._fail_waiting(seg, f"could not connect to the decode at {peer[0]}:{peer[1]}: {exc}")
                if cancels:
                    log.info("could not tell the decode at %s:%d that %d segments were abandoned: %s", *peer,
                             len(cancels), exc)  # fmt: skip
                continue
            self._senders[peer] = tx
            for seg in segs:
                self._open_waiting(tx, seg)
            for wire_id, num_tokens, reason in cancels:
                self._cancel_on(tx, wire_id, num_tokens, reason)

    def _open_waiting(self, tx: kvwire.ShardedSender, seg: _Segment) -> None:
        if not seg.connecting:
            return  # failed meanwhile (its deadline, a preemption)
        seg.connecting = False
        try:
            left = seg.deadline - time.monotonic()
            if left <= 0:
                raise kvwire.TransferTimeout(f"deadline of {self.settings.deadline_s:g} s passed while connecting")
            seg.handle = tx.transfer(seg.wire_id, seg.send_blocks, seg.num_tokens, deadline=left)
            for i in sorted(seg.layers_saved):
                _send_layer(seg, i)
        except (kvwire.KvwireError, OSError, ValueError) as exc:
            seg.error = str(exc)
            self._stats["send_failures"] += 1
            log.warning("segment %s not sent: %s", seg.wire_id, exc)

    def _fail_waiting(self, seg: _Segment, reason: str) -> None:
        """A segment that waited for its connection will not be sent."""
        if not seg.connecting:
            return
        seg.connecting = False
        seg.error = reason
        self._stats["send_failures"] += 1
        log.warning("segment %s not sent: %s", seg.wire_id, reason)

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
        checked: dict[tuple[str, int], kvwire.ShardedSender | None] = {}
        self._poll_connects()
        for s in meta.sends:
            deadline = time.monotonic() + self.settings.deadline_s
            seg = _Segment(s.req_id, s.wire_id, s.num_tokens, None, deadline=deadline, peer=s.peer)
            try:
                if s.peer in failed:
                    raise kvwire.PeerLost(failed[s.peer])
                ids = self.caches.block_ids(s.block_ids, s.num_tokens)
                tx = self._ready_sender(s.peer, checked)
                if tx is None:  # sent once connected (_poll_connects)
                    seg.connecting, seg.send_blocks = True, ids
                    self._waiting[s.peer].append(seg)
                else:
                    seg.handle = tx.transfer(s.wire_id, ids, s.num_tokens, deadline=self.settings.deadline_s)
                self._step.append(seg)
            except (kvwire.KvwireError, OSError, ValueError) as exc:  # this segment fails, never the engine's step
                failed[s.peer] = str(exc)
                seg.error = str(exc)
                self._stats["send_failures"] += 1
                log.warning("segment %s not sent: %s", s.wire_id, exc)
            self._outgoing[s.req_id].append(seg)

    def _abandon(self, a) -> None:
        """Tell the decode that these segments will never come (the prefill request ended)."""
        reason = "the prefill request ended before this segment was computed"
        tx = self._ready_sender(a.peer)
        for wire_id, num_tokens in a.segments:
            if tx is None:
                self._cancel_when_connected(a.peer, wire_id, num_tokens, reason)
            else:
                self._cancel_on(tx, wire_id, num_tokens, reason)

    def _cancel_when_connected(self, peer: tuple[str, int], wire_id: str, num_tokens: int, reason: str) -> None:
        """(a connection to ``peer`` is being made) Cancel ``wire_id`` once it is."""
        with self._lock:
            self._cancels_waiting[peer].append((wire_id, num_tokens, reason))

    def _cancel_on(self, tx: kvwire.ShardedSender, wire_id: str, num_tokens: int, reason: str) -> None:
        """Cancel segment ``wire_id`` on the wire: the decode stops waiting for it."""
        assert self.caches is not None
        blocks = list(range(-(-num_tokens // self.caches.layout.block_size)))  # never read: cancelled first
        try:
            tx.transfer(wire_id, blocks, num_tokens, deadline=self.settings.deadline_s).cancel(reason)
        except (kvwire.KvwireError, OSError, ValueError) as exc:
            log.info("could not tell the decode that %s will not come: %s", wire_id, exc)

    def save_layer(self, layer_name: str) -> None:
        if not self._opened:
            self._open_step()
        if not self._step or self.caches is None:
            return
        index = self.caches.layer_index.get(layer_name)
        if index is None:
            return  # a layer that shares another layer's cache
        if self._connects:
            self._poll_connects()
        for seg in self._step:
            if seg.connecting:
                seg.layers_saved.add(index)
            elif index not in seg.layers_sent and seg.handle is not None and not seg.handle.done():
                _send_layer(seg, index)

    def wait_for_save(self) -> None:
        self._open_step()
        assert self.caches is not None or not self._step
        if self._connects:
            self._poll_connects()
        for seg in self._step:
            if self.caches is None:
                continue
            if seg.connecting:
                seg.layers_saved = set(range(self.caches.layout.num_layers))
                continue
            if seg.handle is None or seg.handle.done():
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
                if seg.connecting and seg.peer is not None:  # nothing read its blocks yet; the decode is told
                    self._fail_waiting(seg, "the prefill request was preempted before its decode was connected")
                    self._cancel_when_connected(seg.peer, seg.wire_id, seg.num_tokens, seg.error or "")
                while not seg.done() and time.monotonic() < seg.deadline:
                    time.sleep(POLL_S)
                self._expire(seg)

    def _expire(self, seg: _Segment) -> None:
        if seg.done() or time.monotonic() < seg.deadline:
            return
        reason = f"deadline of {self.settings.deadline_s:g} s passed"
        if seg.connecting and seg.peer is not None:
            self._fail_waiting(seg, reason + " while connecting to its decode")
            self._cancel_when_connected(seg.peer, seg.wire_id, seg.num_tokens, reason)
        else:
            seg.handle.cancel(reason)  # type: ignore[union-attr]

    def finished_sending(self, finished_req_ids: set[str]) -> set[str]:
        if self._connects:
            self._poll_connects()
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
            _stop_after_a_failure(segs)
            if not all(seg.done() for seg in segs):
                continue
            del self._incoming[req_id]
            missing = self._missing.pop(req_id, [])
            aborted = req_id in self._aborted
            self._aborted.discard(req_id)
            failed = False
            for seg in segs:
                if _received(seg):
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
        with self._lock:
            self._closed = True  # a connection made from now on is closed by its thread
        for future in self._connects.values():
            future.add_done_callback(lambda f: f.exception() is None and f.result().close())
        self._connects.clear()
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
