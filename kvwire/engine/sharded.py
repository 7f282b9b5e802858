"""A prefill rank's transfers to a decode instance whose tensor parallelism differs.

Each prefill rank (a layout made with :meth:`KVLayout.shard`) runs one
:class:`ShardedSender` with the addresses of *every* decode rank, in rank order. It
connects to the decode ranks it has something for (``kvwire.sharding``: the heads they
hold that it is the one to send, and the tensors held whole for the decode ranks it
serves those) and sends each its part of every layer from the same source blocks. Each
decode rank runs a plain :class:`~kvwire.Receiver` with its own shard's layout; its
``expect`` completes once every head of its shard has arrived, from however many prefill
ranks hold them. One transfer fails as one: a decode rank's failure cancels the rest,
and the error names the decode rank.

>>> import kvwire
>>> model = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=4, head_dim=64)
>>> decode = [kvwire.Receiver(model.shard(d, 2), secret="example-secret",
...                           kv_caches=model.shard(d, 2).allocate(8)) for d in range(2)]
>>> prefill = kvwire.ShardedSender(model, [rx.address for rx in decode], secret="example-secret",
...                                kv_caches=model.allocate(8), streams=1)
>>> handles = [rx.expect("r", [0, 1], 20) for rx in decode]
>>> prefill.transfer("r", [2, 3], 20).send_all()["num_tokens"], [h.wait(10)["ok"] for h in handles]
(20, [True, True])
>>> prefill.close(); [rx.close() for rx in decode] and None
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

import kvwire.codec
from kvwire import scatter
from kvwire.engine.common import check_seconds
from kvwire.engine.placement import HostEncoder, RowChecksums
from kvwire.engine.sender import Sender, SendHandle, transfer_arguments
from kvwire.errors import Cancelled, TransferError, TransferTimeout
from kvwire.layout import KVLayout
from kvwire.planning import Estimate
from kvwire.sharding import decode_ranks_served


class ShardedSender:
    """A prefill rank's senders to the decode ranks it serves.

    Args:
        layout: this prefill rank's layout (``model.shard(rank, size)``; the whole model's
            layout for a prefill of one rank).
        peers: every decode rank's ``"host:port"``, in rank order (the decode's tensor-
            parallel size is ``len(peers)``).
        whole_from: which prefill rank sends a decode rank the tensors held whole on every
            rank (MLA latent, states): ``whole_from(decode_rank, prefill_size)``; default
            ``decode_rank % prefill_size``. Every prefill rank must use the same.
        secret, kv_caches, and every other keyword: as for :class:`~kvwire.Sender`.
    """

    def __init__(
        self,
        layout: KVLayout,
        peers: Sequence[str | tuple[str, int]],
        *,
        kv_caches: Sequence[Mapping[str, torch.Tensor]],
        whole_from: Callable[[int, int], int] | None = None,
        **options,
    ) -> None:
        if isinstance(peers, (str, bytes)) or not isinstance(peers, Sequence) or not peers:
            raise ValueError("peers: expected the decode ranks' addresses, one per rank, in rank order")
        self.layout = layout
        self._num_blocks = layout.check_caches(kv_caches)
        # Possibly none: with heads replicated over more prefill ranks than there are
        # heads, another replica may send them all. Its transfers then end at once.
        self.served = decode_ranks_served(layout, len(peers), whole_from)
        self.senders: dict[int, Sender] = {}
        self.peers = {d: _host_port(peers[d]) for d in self.served}  # for messages
        try:
            for d in self.served:
                self.senders[d] = Sender(layout, peers[d], kv_caches=kv_caches, whole_from=whole_from, **options)
        except BaseException:
            self.close()
            raise
        for d, sender in self.senders.items():
            if sender.receiver_tp is None or sender.receiver_tp.rank != d or sender.receiver_tp.size != len(peers):
                self.close()
                raise ValueError(f"peers[{d}]: that receiver is decode rank {sender.receiver_tp}, not {d} of "
                                 f"{len(peers)}")  # fmt: skip
        self._row_groups = itertools.count(1)
        self.row_checksums = _row_checksums(list(self.senders.values()))

    def estimate(self, num_tokens: int, **options) -> Estimate:
        """The whole transfer as the decode ranks will see it (each rank's sender predicts
        the part it sends over its own link; see :meth:`Sender.estimate`): every time is
        the latest of the ranks' (decode has layer 0 once every rank has it), None when one
        rank cannot predict yet (``basis == "none"``: nothing is known about that link);
        the bytes are summed; the rest is the rank predicted last's."""
        if not self.senders:
            raise ValueError("estimate: this prefill rank serves no decode rank")
        found = [s.estimate(num_tokens, **options) for s in self.senders.values()]
        last = max(found, key=lambda e: math.inf if e.total_s is None else e.total_s)
        times: dict[str, Any] = {}
        for name in TIMES:
            values = [getattr(e, name) for e in found]
            times[name] = None if any(v is None for v in values) else max(values)
        return dataclasses.replace(last, wire_bytes=sum(e.wire_bytes for e in found),
                                   logical_bytes=sum(e.logical_bytes for e in found),
                                   queued_bytes=sum(e.queued_bytes for e in found), **times)  # fmt: skip

    def transfer(
        self,
        request_id: str | int,
        block_ids: Sequence[int] | torch.Tensor,
        num_tokens: int,
        *,
        states: Mapping[int, torch.Tensor] | None = None,
        deadline: float = 60.0,
        max_exposed_ms: float | None = None,
        layers_per_s: float | None = None,
        refuse_if_late: bool = False,
        codec: str | None = None,
    ) -> ShardedTransfer:
        """Start one transfer to every decode rank served; see :meth:`Sender.transfer`
        (with no rank served, a transfer that is done at once, after the same checks of
        its arguments). ``max_exposed_ms``, ``layers_per_s``, ``refuse_if_late`` and
        ``codec`` apply per decode rank (each link is planned on its own; one refusal
        refuses all)."""
        request_id, _, _, _ = transfer_arguments(
            self.layout, self._num_blocks, request_id, block_ids, num_tokens, states, deadline, max_exposed_ms,
            layers_per_s, refuse_if_late)  # fmt: skip
        if codec is not None and not self.senders:  # a sender checks it against its own codecs
            if not isinstance(codec, str):
                raise TypeError(f"codec: expected a codec name, got {type(codec).__name__}")
            if codec != "auto":
                kvwire.codec.get(codec)
        handles: dict[int, SendHandle] = {}
        try:
            for d, sender in self.senders.items():
                handles[d] = sender.transfer(
                    request_id, block_ids, num_tokens, states=states, deadline=deadline, max_exposed_ms=max_exposed_ms,
                    layers_per_s=layers_per_s, refuse_if_late=refuse_if_late, codec=codec)  # fmt: skip
        except BaseException:
            for h in handles.values():
                h.cancel("the transfer could not start on every decode rank")
            raise
        if len({h.codec.descriptor for h in handles.values()}) == 1:  # "auto" may choose per link
            group = next(self._row_groups)
            for h in handles.values():
                h.row_group = group  # before its first layer is queued
        return ShardedTransfer(self, request_id, num_tokens, handles)

    def stats(self) -> dict:
        return {f"decode rank {d}": sender.stats() for d, sender in self.senders.items()}

    def close(self) -> None:
        for sender in self.senders.values():
            sender.close()

    def __enter__(self) -> ShardedSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _row_checksums(senders: list[Sender]) -> RowChecksums | None:
    """One :class:`RowChecksums` for senders that each send some heads of every token from
    spans of the same caches, cut alike (heads in equal ranges); else None. A sender of
    the whole tensors alone (a hybrid model's state, no heads) reads no rows: it is left
    out, not a reason to share nothing."""
    senders = [s for s in senders if s._kv_heads is None or s._kv_heads[1] > 0]
    encoders = [s.encoder for s in senders]
    ranges = [s._kv_heads for s in senders]
    if any(r is None for r in ranges) or not all(isinstance(e, HostEncoder) and e.spans for e in encoders):
        return None
    heads = [r for r in ranges if r is not None]  # all of them (typed)
    if (
        not 2 <= len(heads) <= scatter.TOGETHER_MAX
        or len({count for _, count in heads}) != 1
        or len(set(heads)) != len(heads)  # heads replicated over ranks: each asks for the same
        or len({s._chunk_bytes for s in senders}) != 1
    ):
        return None
    shared = RowChecksums(heads)
    for e in encoders:
        assert isinstance(e, HostEncoder)
        e.row_checksums = shared
    return shared


class ShardedTransfer:
    """One request on its way to several decode ranks; the same calls as a
    :class:`~kvwire.SendHandle`, on all of them at once."""

    def __init__(self, owner: ShardedSender, request_id: str, num_tokens: int, handles: dict[int, SendHandle]) -> None:
        self.request_id = request_id
        self.num_tokens = num_tokens
        self._owner = owner
        self.handles = handles
        self._first_failed: int | None = None
        self._cancelling = False  # the caller's cancel: every rank gets its reason, none another's
        for h in handles.values():  # a rank's failure cancels the others at once
            h.on_failure = self._fail_as_one
        self._fail_as_one()  # one may have failed before its hook was set

    def send_layer(self, layer: int, state: torch.Tensor | None = None) -> None:
        """Queue ``layer`` for every decode rank (each gets its part); returns at once.
        A call refused for one rank is refused before any rank takes the layer. Once a
        rank has failed, the others are cancelled and the layer is dropped, as
        :meth:`SendHandle.send_layer` does: :meth:`finish` raises the failure."""
        self._fail_as_one()
        dropped = [h._check_layer(layer, state) for h in self.handles.values()]
        for h, drop in zip(self.handles.values(), dropped):
            h._take_layer(layer, state, drop)

    def send_all(self, timeout: float | None = None) -> dict:
        """Send every layer, then :meth:`finish`."""
        for i in range(self._owner.layout.num_layers):
            self.send_layer(i)
        return self.finish(timeout)

    def done(self) -> bool:
        """True once every decode rank's part ended, or one failed (the others are
        cancelled as it fails: the transfer fails as one). Never blocks."""
        return self._fail_as_one() or all(h.done() for h in self.handles.values())

    def _failed(self) -> int | None:
        """The first decode rank whose part was seen to fail, or None. Kept once seen: the
        ranks cancelled because of it fail too, and must not be named in its place."""
        if self._first_failed is None:
            self._first_failed = next((d for d, h in self.handles.items() if h.done() and h._error is not None), None)
        return self._first_failed

    def _fail_as_one(self, _handle: SendHandle | None = None) -> bool:
        """Whether a rank failed; if one did, the others are cancelled (by the caller's
        cancel, they were already, with its reason). The ranks' failure hook, and a check
        of each call that must see it whichever thread runs the hook."""
        failed = self._failed() is not None
        if failed and not self._cancelling:
            self._cancel_others()
        return failed

    def _cancel_others(self) -> None:
        """Cancel the ranks still open because another failed. Not the caller's cancel: a
        later send_layer is dropped, not refused."""
        d = self._failed()
        for other in self.handles.values():
            other._sender._cancel(other, f"decode rank {d} of the same transfer failed", Cancelled)

    def finish(self, timeout: float | None = None) -> dict:
        """Wait for every decode rank's acknowledgement; the statistics summed. The first
        failure cancels the others and is raised naming its decode rank."""
        timeout = check_seconds(timeout, "timeout", optional=True, zero=True)
        self._fail_as_one()  # a rank's failure is the answer, whatever was left unsent
        for h in self.handles.values():
            h._check_all_sent()
        start = time.monotonic()
        end = None if timeout is None else start + timeout
        # Every rank watched at once: the first failure, whichever rank, ends the wait.
        while self._failed() is None:
            pending = [h for h in self.handles.values() if not h.done()]
            if not pending:
                break
            stop = min(h._deadline for h in pending)  # each part's own deadline, as SendHandle.finish
            left = (stop if end is None else min(stop, end)) - time.monotonic()
            if left <= 0:
                break
            pending[0]._done.wait(min(left, FINISH_POLL_S))
        failed = self._failed()
        order = sorted(self.handles, key=lambda d: (d != failed, d))  # the failed rank first, to name it
        results = {}
        for d in order:
            h = self.handles[d]
            try:
                if not h.done() and failed is None:  # its deadline, or the timeout, passed first
                    h._sender._cancel(h, f"sender gave up after {time.monotonic() - start:.3g} s", TransferTimeout)
                results[d] = h.finish(0)
            except TransferError as exc:
                self._cancel_others()
                raise type(exc)(f"decode rank {d} ({self._owner.peers[d]}): {exc}") from exc
        return {
            "request_id": self.request_id,
            "num_tokens": self.num_tokens,
            "decode_ranks": sorted(results),
            **_summed(results.values()),
            "exposed_ms": max(((r["exposed_ms"] or 0.0) for r in results.values()), default=0.0),
            "total_ms": max(((r["total_ms"] or 0.0) for r in results.values()), default=0.0),
        }

    def cancel(self, reason: str = "cancelled by the sender") -> None:
        self._cancelling = True
        for h in self.handles.values():
            h.cancel(reason)

    def stats(self) -> dict:
        """The decode ranks' statistics together (``per_rank``: each one's), without
        waiting or raising; times are the latest rank's, None until every rank has one."""
        per_rank = {d: h.stats() for d, h in self.handles.items()}
        return {
            "request_id": self.request_id,
            "num_tokens": self.num_tokens,
            **_summed(per_rank.values()),
            "exposed_ms": _latest(s["exposed_ms"] for s in per_rank.values()),
            "total_ms": _latest(s["total_ms"] for s in per_rank.values()),
            "error": next((f"decode rank {d}: {s['error']}" for d, s in per_rank.items() if s["error"]), None),
            "per_rank": per_rank,
        }

    # When it started, when its last layer was queued, when the last rank acknowledged.
    @property
    def t_created(self) -> float:
        return min((h.t_created for h in self.handles.values()), default=0.0)

    @property
    def t_last_layer(self) -> float | None:
        return _latest(h.t_last_layer for h in self.handles.values())

    @property
    def t_acked(self) -> float | None:
        return _latest(h.t_acked for h in self.handles.values())


FINISH_POLL_S = 0.02  # finish() looks at every decode rank's part this often, for the first to fail
TIMES = ("first_layer_s", "total_s", "exposed_s", "first_layer_s_high", "total_s_high", "exposed_s_high")
SUMMED = ("logical_bytes", "wire_bytes", "chunks", "resent_chunks", "nacked_chunks")  # over the decode ranks


def _summed(stats: Iterable[dict]) -> dict:
    stats = list(stats)
    return {k: sum(s[k] for s in stats) for k in SUMMED}


def _latest(values: Iterable[float | None]) -> float | None:
    """The latest of the ranks' times; None until every rank has one."""
    values = list(values)
    return None if any(v is None for v in values) else max(values, default=0.0)  # type: ignore[type-var]


def _host_port(peer: str | tuple[str, int]) -> str:
    """A peer as "host:port", however it was given."""
    return peer if isinstance(peer, str) else f"{peer[0]}:{peer[1]}"
