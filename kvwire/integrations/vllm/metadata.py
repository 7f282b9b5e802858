"""What the scheduler side tells the worker side each step (vLLM ships it to every worker)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class SendSegment:
    """Prefill: open segment ``wire_id`` of request ``req_id`` this step and send each layer
    from ``save_kv_layer``. ``block_ids`` are vLLM block ids (manager blocks)."""

    req_id: str
    wire_id: str
    peer: tuple[str, int]  # the decode's listen address; tensor-parallel rank r adds r to the port
    block_ids: list[int]
    num_tokens: int


@dataclass
class Abandon:
    """Prefill: segments that will never be sent (the request ended first): cancel them on
    the wire so the decode stops waiting for them at once."""

    req_id: str
    peer: tuple[str, int]
    segments: list[tuple[str, int]]  # (wire id, token count)


@dataclass
class Receive:
    """Decode: expect ``segments`` (wire id, vLLM block ids, token count) for ``req_id``;
    ``missing_blocks`` cannot arrive (a local prefix hit off the segment grid) and are
    reported as load errors when the request is reported."""

    req_id: str
    segments: list[tuple[str, list[int], int]]
    missing_blocks: list[int] = field(default_factory=list)


@dataclass
class KvwireConnectorMetadata(KVConnectorMetadata):
    sends: list[SendSegment] = field(default_factory=list)
    abandons: list[Abandon] = field(default_factory=list)
    receives: list[Receive] = field(default_factory=list)
    declines: list[str] = field(default_factory=list)  # decode: wire ids it will not take
    cancel_receives: list[str] = field(default_factory=list)  # decode: requests aborted while receiving
    preempted: list[str] = field(default_factory=list)  # prefill: their blocks are about to be reused
