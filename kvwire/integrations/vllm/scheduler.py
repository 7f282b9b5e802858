"""The connector's scheduler side: it only plans (request ids, segments, block ids).

Prefill (a request with ``do_remote_decode``): in each step, every segment whose last
token this step computes is planned for sending; the request's blocks stay allocated
after it finishes until the worker side has kvwire's acknowledgement of every segment.

Decode (a request with ``do_remote_prefill``): the request waits for remote KV
(``get_num_new_matched_tokens`` returns the uncomputed prompt tokens, loaded
asynchronously); once vLLM allocated its blocks, every segment is planned for ``expect``.
A local prefix-cache hit is used when it ends on the segment grid (segments before it
are declined); otherwise the decode computes the prompt itself and declines them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kvwire.integrations.vllm.config import (
    Settings,
    parse_host_port,
    segment_blocks,
    segment_id,
    segments,
    transfer_id_of,
)
from kvwire.integrations.vllm.metadata import Abandon, KvwireConnectorMetadata, Receive, SendSegment

log = logging.getLogger("kvwire.vllm")


@dataclass
class _Outgoing:
    request: Any  # vllm.v1.request.Request
    transfer_id: str
    peer: tuple[str, int]
    segments: list[tuple[int, int]]
    planned: int = 0  # segments [0, planned) have been handed to the workers


class SchedulerSide:
    def __init__(self, settings: Settings, block_size: int, producer: bool, consumer: bool) -> None:
        settings.check_block_size(block_size)
        self.settings = settings
        self.block_size = block_size
        self.producer, self.consumer = producer, consumer
        self._outgoing: dict[str, _Outgoing] = {}
        self._handled: set[str] = set()  # decode requests whose remote KV is planned (or declined)
        self._offered: dict[str, int] = {}  # decode request -> the local hit its remote tokens were offered after
        self._receiving: set[str] = set()  # decode requests whose segments are expected, not yet reported
        self._meta = KvwireConnectorMetadata()

    # -- decode ----------------------------------------------------------------------------
    def _remote_prefill(self, request) -> str | None:
        params = request.kv_transfer_params or {}
        if not self.consumer or not params.get("do_remote_prefill"):
            return None
        tid = transfer_id_of(params)
        if tid is None:
            log.warning("request %s: do_remote_prefill without a valid kvwire_transfer_id; computing it here",
                        request.request_id)  # fmt: skip
        return tid

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        if request.request_id in self._handled or self._remote_prefill(request) is None:
            return 0, False
        n = request.num_prompt_tokens
        if num_computed_tokens < n and num_computed_tokens % self.settings.segment_tokens == 0:
            self._offered[request.request_id] = num_computed_tokens
            return n - num_computed_tokens, True
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        req_id = request.request_id
        tid = self._remote_prefill(request)
        if tid is not None and req_id not in self._handled:
            self._handled.add(req_id)
            n = request.num_prompt_tokens
            segs = segments(n, self.settings.segment_tokens)
            # vLLM loads tokens [first, last): from where its own hit ends, as many as it took
            # of the offer (all of it, or fewer: a hit trimmed to a window)
            first = self._offered.pop(req_id, n - num_external_tokens)
            last = first + num_external_tokens
            if num_external_tokens <= 0:
                self._meta.declines += [segment_id(tid, k) for k in range(len(segs))]
                return
            ids = blocks.get_block_ids()[0]
            expect, missing, cut = [], [], last
            for k, (s, e) in enumerate(segs):
                if first <= s and e <= last:
                    expect.append((s, (segment_id(tid, k), segment_blocks(ids, s, e, self.block_size), e - s)))
                    continue
                self._meta.declines.append(segment_id(tid, k))  # here already, vLLM's to compute, or cut
                if s < last and e > first:  # partly inside what vLLM loads: those tokens cannot arrive
                    missing += segment_blocks(ids, max(s, first), min(e, last), self.block_size)
                    cut = min(cut, max(s, first))
            # vLLM computes from the first block that failed to load on: the segments after
            # it would be received only to be thrown away.
            for s, (wire_id, blocks_of, _) in expect:
                if s >= cut:
                    self._meta.declines.append(wire_id)
                    missing += blocks_of
            self._receiving.add(req_id)
            self._meta.receives.append(Receive(req_id, [x for s, x in expect if s < cut], missing))
        if self.producer and req_id not in self._outgoing:
            out = self._outgoing_of(request)
            if out is not None:
                self._outgoing[req_id] = out

    def _outgoing_of(self, request) -> _Outgoing | None:
        """The prefill plan of a request with ``do_remote_decode``, or None (its KV stays here)."""
        params = request.kv_transfer_params or {}
        if not self.producer or not params.get("do_remote_decode"):
            return None
        tid = transfer_id_of(params)
        try:
            peer = parse_host_port(params.get("kvwire_peer"), "kvwire_peer")
        except ValueError as exc:
            log.warning("request %s: %s; its KV is not sent", request.request_id, exc)
            return None
        if tid is None:
            log.warning("request %s: do_remote_decode needs a kvwire_transfer_id; its KV is not sent",
                        request.request_id)  # fmt: skip
            return None
        return _Outgoing(request, tid, peer, segments(request.num_prompt_tokens, self.settings.segment_tokens))

    def update_connector_output(self, connector_output) -> None:
        for req_id in connector_output.finished_recving or ():
            self._receiving.discard(req_id)

    # -- every step ------------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output) -> KvwireConnectorMetadata:
        meta, self._meta = self._meta, KvwireConnectorMetadata()
        block_state = getattr(scheduler_output, "kv_connector_block_state", None)
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            out = self._outgoing.get(req_id)
            if out is None or out.planned == len(out.segments):
                continue
            computed = out.request.num_computed_tokens + scheduled  # (vLLM advances it after this call)
            ids = None
            while out.planned < len(out.segments) and out.segments[out.planned][1] <= computed:
                if ids is None:
                    ids = self._block_ids(block_state, req_id)
                s, e = out.segments[out.planned]
                wire_id = segment_id(out.transfer_id, out.planned)
                meta.sends.append(SendSegment(req_id, wire_id, out.peer, segment_blocks(ids, s, e, self.block_size),
                                              e - s))  # fmt: skip
                out.planned += 1
        meta.preempted = sorted(set(scheduler_output.preempted_req_ids or ()) & set(self._outgoing))
        return meta

    def _block_ids(self, block_state, req_id: str) -> list[int]:
        ids = block_state.get_block_ids(req_id) if block_state is not None else None
        if ids is None:
            ids = self.kv_cache_manager.get_block_ids(req_id)
        return list(ids[0])

    kv_cache_manager: Any = None  # bound by the connector (bind_kv_cache_manager)

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        req_id = request.request_id
        handled = req_id in self._handled
        self._handled.discard(req_id)
        self._offered.pop(req_id, None)
        if req_id in self._receiving:  # aborted while its KV was on the way: stop receiving
            self._receiving.discard(req_id)
            self._meta.cancel_receives.append(req_id)
        elif not handled and (tid := self._remote_prefill(request)) is not None:
            # Aborted while still queued for blocks: nothing was expected, so its segments
            # would park here until deadline_s (and hold the prefill's blocks); declined now.
            n = len(segments(request.num_prompt_tokens, self.settings.segment_tokens))
            self._meta.declines += [segment_id(tid, k) for k in range(n)]
        out = self._outgoing.pop(req_id, None) or self._outgoing_of(request)  # (ended before it was scheduled)
        if out is None:
            return False, None
        rest = [(segment_id(out.transfer_id, k), e - s) for k, (s, e) in enumerate(out.segments) if k >= out.planned]
        if rest:
            self._meta.abandons.append(Abandon(req_id, out.peer, rest))
        # Planned segments read these blocks until kvwire acknowledges them: the worker side
        # reports the request in finished_sending then, and vLLM frees the blocks.
        return out.planned > 0, None

    def has_pending_work(self) -> bool:
        m = self._meta
        return bool(m.abandons or m.receives or m.declines or m.cancel_receives)
