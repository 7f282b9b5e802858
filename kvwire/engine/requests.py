"""The receiver's request lifecycle, sans I/O: a table of states, events in, actions out.

A request meets the receiver from two sides: the decode side's ``expect`` (where its
tokens go) and a sender's BEGIN (that they are coming). Either may come first. The
table below is every state a request can be in and every move between them; a move
not in ``ALLOWED`` is a bug, caught as one. Methods take an event and return
*actions* (frames to send, handles to finish, chunks to place or free); the receiver
calls them under its lock and runs the actions after releasing it. Nothing here
touches a socket, a thread or a clock: times are passed in.

::

    expect ──> EXPECTED ──BEGIN──┐
                                 ├──> BOUND ──all chunks in place──> COMPLETE
    BEGIN ───> ANNOUNCED ─expect─┘      │
                 (data parks)           ├──error / cancel / deadline──> FAILED | CANCELLED | EXPIRED
                                        └── ... while chunks are being written: DRAINING, then the same

A request ends only once: its handle finishes once, its parked chunks are freed once,
its id and tag are forgotten (the tag is remembered, boundedly, so that frames already
in flight for it are dropped rather than taken for a protocol error).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvwire.errors import Cancelled, ChecksumMismatch, PeerLost, ProtocolError, TransferError, TransferTimeout
from kvwire.layout import KVLayout
from kvwire.proto.request import PartSpec, RequestPlan, heads_overlap, part_conflict

_NO_WRITES = np.zeros(0, dtype=np.int64)


class State(enum.Enum):
    EXPECTED = "expected"  # expect() named the destination; no BEGIN yet
    ANNOUNCED = "announced"  # a sender's BEGIN came first; its data parks until expect()
    BOUND = "bound"  # both: chunks are placed as they arrive
    DRAINING = "draining"  # ended while chunks were being written; the handle ends after them
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


ENDINGS = frozenset({State.FAILED, State.CANCELLED, State.EXPIRED})
TERMINAL = ENDINGS | {State.COMPLETE}

# Every move a request may make; anything else is a bug in the caller or the table.
ALLOWED: dict[State, frozenset[State]] = {
    State.EXPECTED: frozenset({State.BOUND}) | ENDINGS,
    State.ANNOUNCED: frozenset({State.BOUND}) | ENDINGS,
    State.BOUND: frozenset({State.COMPLETE, State.DRAINING}) | ENDINGS,
    State.DRAINING: ENDINGS,
}


class Origin(enum.Enum):
    """Who ended a request: it decides what the sender is told."""

    LOCAL = "local"  # this side (an error, expect's cancel, a deadline, a limit): tell the sender
    PEER = "peer"  # the sender (its CANCEL, its connections gone): it knows already
    SHUTDOWN = "shutdown"  # the receiver is closing: its connections close next, nothing to say


@dataclass(eq=False)
class Request:
    request_id: str
    num_tokens: int
    state: State
    # its senders, once their BEGINs arrived: session -> (tag, what its chunks carry). One
    # sender usually; several when prefill splits the heads over more ranks than decode.
    senders: dict[str, tuple[int, PartSpec]] = field(default_factory=dict)
    plan: RequestPlan | None = None  # which chunks it must contain: made when its first BEGIN arrives
    created: float = 0.0  # when the BEGIN arrived (the unclaimed timeout runs from it)
    first_byte: float | None = None  # when its first DATA header was read (the receiver's clock)
    deadline: float | None = None  # from expect()
    handle: Any = None  # the caller's handle, finished by a Finish action
    parked: list = field(default_factory=list)  # chunks that arrived before expect()
    ending: tuple[State, TransferError] | None = None  # how it ends, while DRAINING
    checksum_failures: int = 0  # payloads that failed their checksum (each asked for again)
    codecs: dict[str, Any] = field(default_factory=dict)  # session -> the codec its BEGIN named
    lanes: list = field(default_factory=list)  # the receiver's receive lanes into it: closed as it leaves BOUND

    def codec_of(self, session: str) -> Any:
        """The codec a sender's chunks of this request use (its session may offer several)."""
        return self.codecs.get(session)

    @property
    def live(self) -> bool:
        return self.state in (State.EXPECTED, State.ANNOUNCED, State.BOUND)

    @property
    def writing(self) -> np.ndarray:
        """Chunks being written, per layer (the plan's table; none before there is a plan)."""
        return self.plan.writing if self.plan is not None else _NO_WRITES

    def part_of(self, session: str) -> PartSpec:
        return self.senders[session][1]

    def layer_ready(self, layer: int) -> bool:
        """Every chunk of ``layer`` is in place and none is being written."""
        return self.plan is not None and self.plan.layer_complete(layer) and not self.writing[layer]


# -- actions: what the receiver does once it has released its lock -------------------------
@dataclass(frozen=True)
class SendAck:
    session: str
    tag: int
    ok: bool
    message: str = ""
    checksum: bool = False  # failed for this sender's payloads that failed their checksum (ChecksumMismatch)


@dataclass(frozen=True)
class SendCancel:
    session: str
    tag: int
    reason: str


@dataclass(frozen=True)
class Finish:
    handle: Any
    error: TransferError | None


@dataclass(frozen=True)
class Place:
    """Parked chunks to write now that their request is bound. The receiver claims their
    rows in the critical section that bound it (``claims``, in order), so a repeat of one of
    them arriving meanwhile is always the one found to be a duplicate."""

    request: Request
    chunks: list
    claims: list = field(default_factory=list)


@dataclass(frozen=True)
class Release:
    chunks: list


@dataclass(frozen=True)
class Drain:
    """A request ended while chunks were being written into its rows: its handle ends
    (Finish) once those writes are done, and until then its rows are not the caller's."""

    request: Request


Action = SendAck | SendCancel | Finish | Place | Release | Drain


class Placement(enum.Enum):
    """What to do with a chunk whose payload just arrived."""

    PLACE = "place"
    PARK = "park"
    DROP = "drop"


# Payloads of one request that may fail their checksum, each asked for again, before the
# request fails: a link that corrupts this often is not one to trust with the rest.
MAX_CHECKSUM_FAILURES = 8
# Requests announced and not yet expected may hold this many times the receiver's capacity
# in tokens, over every sender together; a BEGIN beyond it is refused (refused_requests).
ANNOUNCED_CAPACITIES = 2


@dataclass(frozen=True)
class Ended:
    """A request that ended before it completed, remembered so that a BEGIN from one of
    its other senders, which had not come yet, is told how it ended instead of starting a
    request that could never complete."""

    num_tokens: int
    unit: int
    parts: tuple[PartSpec, ...]
    sessions: frozenset[str]
    message: str
    ack: bool  # its senders were told by a failed ACK (this side failed it), else by a CANCEL

    def sibling(self, session: str, num_tokens: int, unit: int, part: PartSpec, held: int) -> bool:
        """Whether a BEGIN is a part of this request that had not come: another sender, the
        same numbers, heads none of its parts had. Else it is a new transfer of that id (a
        sender trying again)."""
        return (session not in self.sessions and (num_tokens, unit) == (self.num_tokens, self.unit)
                and part_conflict(self.parts, part, held) is None)  # fmt: skip


class RequestTable:
    """Every request a receiver knows, by id and by (session, tag).

    ``capacity_tokens``: the most tokens one request may hold (the receiver's blocks);
    ``max_requests_per_session``: open requests one sender may have. Both are checked at
    BEGIN, before anything is allocated for the request."""

    def __init__(
        self,
        layout: KVLayout,
        capacity_tokens: int,
        max_requests_per_session: int,
        remembered_cancels: int = 4096,
        remembered_tags: int = 1024,
        announced_capacities: int = ANNOUNCED_CAPACITIES,
    ) -> None:
        self.layout = layout
        kv = {p.heads for layer in layout.layers for p in layer.paged if p.name != "kv"}
        self._all_heads = kv.pop() if kv else 0  # the k/v heads this side holds
        self.capacity_tokens = capacity_tokens
        self.max_requests_per_session = max_requests_per_session
        # Tokens of requests announced (BEGIN) and not yet expected, over every sender: each
        # holds a coverage plan sized by its tokens, and nothing else bounds them together.
        self.max_announced_tokens = announced_capacities * capacity_tokens
        self.announced_tokens = 0
        self._announced: dict[int, Request] = {}  # the ANNOUNCED ones, oldest first (refuse_unclaimed)
        self._remembered_cancels = remembered_cancels
        self._remembered_tags = remembered_tags
        self._by_id: dict[str, Request] = {}  # live requests
        self._by_tag: dict[str, dict[int, Request]] = {}  # session -> tag -> live request
        self._ended_tags: dict[str, collections.OrderedDict[int, None]] = {}
        # request ids cancelled before the other side showed up, or whose senders failed
        # before an expect(): id -> (reason, origin, the error a later expect() ends with)
        self._cancelled: collections.OrderedDict[str, tuple[str, Origin, TransferError | None]] = (
            collections.OrderedDict()
        )
        self._ended: collections.OrderedDict[str, Ended] = collections.OrderedDict()  # as many as _cancelled
        # sessions refused as a late part of an ended request, per id (as many)
        self._late_refused: collections.OrderedDict[str, frozenset[str]] = collections.OrderedDict()
        self.counters: collections.Counter[str] = collections.Counter(
            {
                "completed": 0,
                "failed": 0,
                "cancelled": 0,
                "expired": 0,
                "refused_requests": 0,
                "parked_chunks": 0,
                "checksum_failures": 0,
            }
        )

    # -- events from the decode side -----------------------------------------------------
    def expect(self, request_id: str, handle: Any, num_tokens: int, deadline: float) -> tuple[Request, list[Action]]:
        """``expect()``: name a request's destination. Raises ValueError if it is already
        expected."""
        known = self._by_id.get(request_id)
        if known is not None and known.handle is not None:
            raise ValueError(f"request_id: {request_id!r} is already expected")
        self._ended.pop(request_id, None)  # the decode asks for it again: BEGINs from now on are for this one
        self._late_refused.pop(request_id, None)
        remembered = self._cancelled.pop(request_id, None)
        if remembered is not None and remembered[1] is Origin.PEER:
            request = Request(request_id, num_tokens, State.EXPECTED, handle=handle, deadline=deadline)
            reason, _, failure = remembered
            if failure is not None:  # it failed before this expect: the same error, at once
                return request, self._end(request, State.FAILED, type(failure)(str(failure)), Origin.PEER)
            error = Cancelled(f"request {request_id!r} was cancelled by the sender: {reason}")
            return request, self._end(request, State.CANCELLED, error, Origin.PEER)
        if known is not None:  # ANNOUNCED: its sender came first
            known.handle, known.deadline = handle, deadline
            return known, self._bind(known, sent=known.num_tokens, expected=num_tokens)
        request = Request(request_id, num_tokens, State.EXPECTED, handle=handle, deadline=deadline)
        self._by_id[request_id] = request
        return request, []

    def cancel(self, request: Request, reason: str) -> list[Action]:
        """The decode side gives up on a request (``ReceiveHandle.cancel``)."""
        if not request.live:
            return []
        error = Cancelled(f"request {request.request_id!r} {reason}")
        if request.state is State.EXPECTED:  # a BEGIN that comes later is told at once
            self._remember_cancel(request.request_id, reason, Origin.LOCAL)
        return self._end(request, State.CANCELLED, error, Origin.LOCAL)

    def expire(self, request: Request, who: Callable[[str], str] = str) -> list[Action]:
        """A request's deadline passed. The error says what had not arrived, naming each
        sender by ``who(session)``."""
        if not request.live or request.state is State.ANNOUNCED:
            return []
        error = TransferTimeout(f"request {request.request_id!r}: deadline passed ({self._lacking(request, who)})")
        return self._end(request, State.EXPIRED, error, Origin.LOCAL)

    @staticmethod
    def _lacking(request: Request, who: Callable[[str], str]) -> str:
        plan = request.plan
        if plan is None:
            return "no sender had begun it"
        lacking = []
        for session, (_, part) in request.senders.items():
            layers = plan.missing_layers(part)
            if layers:
                span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}..{layers[-1]}"
                lacking.append(f"{span} from {who(session)}")
        unannounced = plan.unannounced()
        if unannounced is not None:
            lacking.append(f"{unannounced} from no sender yet")
        return "still missing: " + "; ".join(lacking) if lacking else "every chunk arrived, some still being written"

    def due(self, now: float) -> list[Request]:
        """Requests whose deadline has passed."""
        return [r for r in self._by_id.values() if r.deadline is not None and r.deadline <= now]

    def refuse_unclaimed(self, now: float, timeout: float) -> list[Action]:
        """Fail requests announced more than ``timeout`` seconds ago that nobody expected."""
        actions: list[Action] = []
        old = []
        for r in self._announced.values():  # oldest first: stop at the first one still in time
            if now - r.created <= timeout:
                break
            old.append(r)
        for r in old:
            error = TransferError(f"no expect() for {r.request_id!r} within {timeout:g} s")
            self._remember_cancel(r.request_id, str(error), Origin.PEER, error)  # an expect() later fails at once
            actions += self._end(r, State.FAILED, error, Origin.LOCAL)
        return actions

    # -- events from the senders ---------------------------------------------------------
    def begin(self, session: str, tag: int, request_id: str, num_tokens: int, now: float,
              part: PartSpec | None = None, unit: int | None = None, codec: Any = None) -> list[Action]:  # fmt: skip
        """A sender's BEGIN: ``part`` is what its chunks carry (default: everything), ``unit``
        the rows its chunks are cut on (default: this side's block size), ``codec`` the one
        it names (kept per sender of the request). Raises ProtocolError for a tag reused
        with another request or another codec."""
        part = part or PartSpec(self._all_heads, 0, True)
        tags = self._by_tag.setdefault(session, {})
        known = tags.get(tag)
        if known is not None:
            if (known.request_id, known.num_tokens) != (request_id, num_tokens):
                raise ProtocolError(f"BEGIN for tag {tag} changed its request")
            if known.codec_of(session) is not codec:
                raise ProtocolError(f"BEGIN for tag {tag} changed its codec")
            return []  # its BEGIN on another connection
        if tag in self._ended_tags.get(session, ()):
            return []  # the request ended already; this is its BEGIN on another connection
        # Checked before anything is allocated: a request's coverage map grows with its
        # tokens, and a sender may announce as many requests as it likes.
        refused = None
        if not 0 < num_tokens <= self.capacity_tokens:
            refused = (f"request {request_id!r}: {num_tokens} tokens do not fit this receiver "
                       f"(at most {self.capacity_tokens} tokens)")  # fmt: skip
        elif len(tags) >= self.max_requests_per_session:
            refused = (f"request {request_id!r}: this sender already has {self.max_requests_per_session} "
                       f"open requests (max_requests_per_session)")  # fmt: skip
        if refused is not None:
            self.counters["refused_requests"] += 1
            self._end_tag(session, tag)
            return [SendAck(session, tag, False, refused)]
        request = self._by_id.get(request_id)
        ended = self._ended.get(request_id) if request is None else None
        if ended is not None:
            if ended.sibling(session, num_tokens, unit or self.layout.block_size, part, self._all_heads):
                self._ended[request_id] = dataclasses.replace(ended, parts=(*ended.parts, part),
                                                              sessions=ended.sessions | {session})  # fmt: skip
                # Once only: had it been a sender trying again (it cannot be told apart), it is
                # one of the request's senders from now on, whatever ends next under this id.
                self._late_refused[request_id] = self._late_refused.pop(request_id, frozenset()) | {session}
                while len(self._late_refused) > self._remembered_cancels:
                    self._late_refused.popitem(last=False)
                self._end_tag(session, tag)
                return [SendAck(session, tag, False, ended.message) if ended.ack
                        else SendCancel(session, tag, ended.message)]  # fmt: skip
            del self._ended[request_id]  # a new transfer of that id
        if request is None and self.announced_tokens + num_tokens > self.max_announced_tokens:
            self.counters["refused_requests"] += 1
            self._end_tag(session, tag)
            return [SendAck(session, tag, False, f"request {request_id!r}: {self.announced_tokens} tokens of requests "
                                                 f"not yet expected are waiting here already (at most "
                                                 f"{self.max_announced_tokens}); try again once they are")]  # fmt: skip
        if request is None:
            remembered = self._cancelled.get(request_id)
            if remembered is not None and remembered[1] is Origin.LOCAL:  # cancelled here before it came
                self._end_tag(session, tag)
                return [SendCancel(session, tag, remembered[0])]
            self._cancelled.pop(request_id, None)  # a sender's earlier cancel: this is a new transfer
            request = Request(request_id, num_tokens, State.ANNOUNCED, created=now)
            why = self._attach(request, session, tag, part, unit, now, codec)
            assert why is None, why  # a first part fits an empty plan (BEGIN checked its numbers)
            self.announced_tokens += num_tokens  # until it leaves ANNOUNCED (_move)
            self._announced[id(request)] = request
            return []
        if session in request.senders:  # one sender, one tag per request: its parts would be two
            raise ProtocolError(f"BEGIN for {request_id!r} under tag {tag}: this sender already sends it under "
                                f"tag {request.senders[session][0]}")  # fmt: skip
        if request.senders and request.num_tokens != num_tokens:
            why = f"this sender sends {num_tokens} tokens, another sends {request.num_tokens}"
        else:
            why = self._attach(request, session, tag, part, unit, now, codec)
        others = [other for _, other in request.senders.values()]
        if why is not None and others and part.heads and not any(heads_overlap(part, o) for o in others):
            # Heads the request still lacks, from a sender that disagrees with the others
            # (tokens, block grid, which rank sends the whole tensors): a sibling that can
            # never join, so the request fails as one, every sender told why. (A part of
            # no heads, the whole tensors alone, is told apart by nothing: only it is refused.)
            self._end_tag(session, tag)
            error = TransferError(f"request {request_id!r}: its senders disagree ({why})")
            return [SendAck(session, tag, False, str(error)), *self._end(request, State.FAILED, error, Origin.LOCAL)]
        if why is not None:  # another transfer under the same id (its heads are here already): it goes on
            self._end_tag(session, tag)
            return [SendAck(session, tag, False, f"request id {request_id!r} is already being received "
                                                 f"from another transfer ({why})")]  # fmt: skip
        if request.state is State.EXPECTED:
            self._cancelled.pop(request_id, None)
            return self._bind(request, sent=num_tokens, expected=request.num_tokens)
        return []

    def cancel_from_peer(self, session: str, tag: int, reason: str, who: str = "the sender") -> list[Action]:
        """A sender's CANCEL (``who``: how errors name it). A request from several senders
        ends as one: the others are told."""
        request = self._by_tag.get(session, {}).get(tag)
        if request is None:
            return []
        error = Cancelled(f"request {request.request_id!r} cancelled by {who}: {reason}")
        if request.handle is None:  # an expect() that comes later fails at once
            self._remember_cancel(request.request_id, reason, Origin.PEER)
        return self._end(request, State.CANCELLED, error, Origin.PEER, session)

    def session_lost(self, session: str, who: str = "the sender") -> list[Action]:
        """Every connection of a sender is gone: its open requests fail (and their other
        senders are told)."""
        actions: list[Action] = []
        for request in list(self._by_tag.get(session, {}).values()):
            if not request.live:
                continue
            error = PeerLost(f"request {request.request_id!r}: the connections of {who} are all gone")
            if request.handle is None:  # an expect() that comes later fails at once
                self._remember_cancel(request.request_id, str(error), Origin.PEER, error)
            actions += self._end(request, State.FAILED, error, Origin.PEER, session)
        self._by_tag.pop(session, None)
        self._ended_tags.pop(session, None)
        return actions

    def close(self) -> list[Action]:
        """The receiver is closing: every request ends, cancelled."""
        actions: list[Action] = []
        for request in list(self._by_id.values()):
            error = Cancelled(f"request {request.request_id!r}: the receiver was closed")
            actions += self._end(request, State.CANCELLED, error, Origin.SHUTDOWN)
        return actions

    # -- chunks --------------------------------------------------------------------------
    def find(self, session: str, tag: int) -> Request | None:
        """The live request of a tag, or None: two dict reads, safe without the caller's
        lock (each is atomic). Whatever it returns, the state is checked again under the
        lock before anything is written; for None, ask :meth:`lookup` under the lock."""
        tags = self._by_tag.get(session)
        return tags.get(tag) if tags is not None else None

    def lookup(self, session: str, tag: int) -> Request | None:
        """The live request a DATA frame belongs to; None when it ended (drop the frame).
        Raises ProtocolError for a tag never begun."""
        request = self._by_tag.get(session, {}).get(tag)
        if request is None and tag not in self._ended_tags.get(session, ()):
            raise ProtocolError(f"DATA for tag {tag} before its BEGIN")
        return request

    def arrived(self, request: Request, chunk: Any) -> Placement:
        """A chunk's payload is in: place it, park it (no expect yet), or drop it (ended)."""
        if request.state is State.BOUND:
            return Placement.PLACE
        if request.state is State.ANNOUNCED:
            request.parked.append(chunk)
            self.counters["parked_chunks"] += 1
            return Placement.PARK
        return Placement.DROP

    def start_write(self, request: Request, session: str, layer: int, tensor: int, start: int,
                    count: int) -> bool | None:  # fmt: skip
        """Before a chunk is written: True to write it (counted as under way), False for an
        exact repeat of a chunk already placed, None when the request is no longer bound.
        Raises ProtocolError for a chunk that overlaps one placed before."""
        if request.state is not State.BOUND:
            return None
        assert request.plan is not None
        part = request.part_of(session)
        if not request.plan.claim(layer, tensor, start, count, part):
            return False
        request.writing[layer] += 1
        return True

    def unwrite(self, request: Request, session: str, layer: int, tensor: int, start: int,
                count: int) -> list[Action]:  # fmt: skip
        """A chunk whose write was started did not arrive whole and verified (its payload
        failed the checksum, or its connection broke): its rows are missing again."""
        assert request.plan is not None
        request.plan.unmark(layer, tensor, start, count, request.part_of(session))
        actions, _ = self.written(request, layer, None)
        return actions

    def checksum_failed(self, request: Request, where: str, session: str) -> tuple[list[Action], bool]:
        """A payload of ``request`` from ``session`` failed its checksum: (actions, whether
        to ask for it again)."""
        request.checksum_failures += 1
        self.counters["checksum_failures"] += 1
        if request.checksum_failures <= MAX_CHECKSUM_FAILURES or not request.live:
            return [], request.live
        error = ChecksumMismatch(f"request {request.request_id!r}: {request.checksum_failures} payloads failed "
                                 f"their checksum (the last: {where})")  # fmt: skip
        # The sender whose payload it was raises ChecksumMismatch; the request's other
        # senders (shards), whose path may be clean, a plain failure with the same message.
        actions = [dataclasses.replace(a, checksum=a.session == session) if isinstance(a, SendAck) else a
                   for a in self._end(request, State.FAILED, error, Origin.LOCAL)]  # fmt: skip
        return actions, False

    def written(self, request: Request, layer: int, error: TransferError | None) -> tuple[list[Action], bool]:
        """After a chunk was written (or failed to be): (actions, whether ``layer`` became ready)."""
        request.writing[layer] -= 1
        if request.state is State.DRAINING:
            if request.writing.any():
                return [], False
            assert request.ending is not None
            state, ending_error = request.ending
            self._move(request, state)
            return [Finish(request.handle, ending_error)], False
        if request.state is not State.BOUND:
            return [], False
        if error is not None:
            return self._end(request, State.FAILED, error, Origin.LOCAL), False
        layer_ready = request.layer_ready(layer)
        assert request.plan is not None
        if not request.plan.complete or request.writing.any():
            return [], layer_ready
        # Complete. The ACK goes out before the handle reports success: a caller that closes
        # the receiver as soon as wait() returns would otherwise cut the ACK off.
        self._move(request, State.COMPLETE)
        self.counters["completed"] += 1
        self._retire(request)
        acks: list[Action] = [SendAck(session, tag, True) for session, (tag, _) in request.senders.items()]
        return [*acks, Finish(request.handle, None)], layer_ready

    # -- reading the table ---------------------------------------------------------------
    def census(self) -> dict[str, int]:
        return {
            "requests": sum(1 for r in self._by_id.values() if r.state is not State.EXPECTED),
            "tags": sum(len(t) for t in self._by_tag.values()),
            "expected": sum(1 for r in self._by_id.values() if r.state is State.EXPECTED),
            "parked_chunks": sum(len(r.parked) for r in self._by_id.values()),
            "cancelled_ids": len(self._cancelled),
            "ended_ids": len(self._ended),
            "ended_tags": sum(len(t) for t in self._ended_tags.values()),
        }

    def live(self) -> list[Request]:
        return list(self._by_id.values())

    # -- moves ---------------------------------------------------------------------------
    def _move(self, request: Request, state: State) -> None:
        if state not in ALLOWED.get(request.state, frozenset()):
            raise AssertionError(f"request {request.request_id!r}: {request.state.value} -> {state.value}")
        if request.state is State.ANNOUNCED:
            self.announced_tokens -= request.num_tokens
            del self._announced[id(request)]
        request.state = state
        for lane in request.lanes:  # no BOUND -> BOUND move exists: it leaves BOUND, or was never in it
            lane.close()
        request.lanes.clear()

    def _attach(self, request: Request, session: str, tag: int, part: PartSpec, unit: int | None,
                now: float, codec: Any = None) -> str | None:  # fmt: skip
        """A sender of the request is known: its chunks may arrive from now on. Why its
        part cannot join the others' (overlap, another block grid), or None."""
        unit = unit or self.layout.block_size
        if request.plan is None:
            request.plan = RequestPlan(self.layout, request.num_tokens, unit)  # tokens checked at BEGIN
            request.created = now
        elif request.plan.unit != unit:
            return f"its chunks are cut on {unit} tokens, another sender's on {request.plan.unit}"
        why = request.plan.add_part(part)
        if why is not None:
            return why
        request.senders[session] = (tag, part)
        request.codecs[session] = codec
        self._by_tag.setdefault(session, {})[tag] = request
        self._by_id[request.request_id] = request
        return None

    def _bind(self, request: Request, sent: int, expected: int) -> list[Action]:
        """The sender's BEGIN (``sent`` tokens) and the decode side's expect() met."""
        if sent != expected:
            message = f"sender sends {sent} tokens, the receiver expects {expected}"
            return self._end(request, State.FAILED, TransferError(f"request {request.request_id!r}: {message}"),
                             Origin.LOCAL)  # fmt: skip
        self._move(request, State.BOUND)
        parked, request.parked = request.parked, []
        return [Place(request, parked)] if parked else []

    def _end(self, request: Request, state: State, error: TransferError, origin: Origin,
             origin_session: str | None = None) -> list[Action]:  # fmt: skip
        """End a request however it ends: tell its senders (all when this side decided; the
        others when one of them did), free its parked chunks, forget it, finish its handle
        (after its writes, if any are under way)."""
        actions: list[Action] = []
        if origin is not Origin.SHUTDOWN:
            for session, (tag, _) in request.senders.items():
                if session == origin_session:
                    continue
                if state is State.FAILED and origin is Origin.LOCAL:
                    actions.append(SendAck(session, tag, False, str(error)))
                else:
                    actions.append(SendCancel(session, tag, str(error)))
        if request.parked:
            actions.append(Release(request.parked))
            request.parked = []
        self.counters[state.value] += 1
        self._retire(request)
        if origin is not Origin.SHUTDOWN and request.plan is not None:
            self._remember_ended(request, str(error), ack=state is State.FAILED and origin is Origin.LOCAL)
        if request.writing.any():  # the handle ends once the writes under way are done
            self._move(request, State.DRAINING)
            request.ending = (state, error)
            actions.append(Drain(request))
            return actions
        self._move(request, state)
        if request.handle is not None:
            actions.append(Finish(request.handle, error))
        return actions

    def _retire(self, request: Request) -> None:
        """Forget an ended request's id and tags (remembering the tags, boundedly)."""
        if self._by_id.get(request.request_id) is request:
            del self._by_id[request.request_id]
        for session, (tag, _) in request.senders.items():
            tags = self._by_tag.get(session)
            if tags is not None and tags.get(tag) is request:
                del tags[tag]
                self._end_tag(session, tag)

    def _end_tag(self, session: str, tag: int) -> None:
        ended = self._ended_tags.setdefault(session, collections.OrderedDict())
        ended[tag] = None
        while len(ended) > self._remembered_tags:
            ended.popitem(last=False)

    def _remember_ended(self, request: Request, message: str, ack: bool) -> None:
        assert request.plan is not None
        sessions = frozenset(request.senders) | self._late_refused.get(request.request_id, frozenset())
        self._ended[request.request_id] = Ended(request.num_tokens, request.plan.unit, request.plan.parts, sessions,
                                                message, ack)  # fmt: skip
        self._ended.move_to_end(request.request_id)
        while len(self._ended) > self._remembered_cancels:
            self._ended.popitem(last=False)

    def _remember_cancel(
        self, request_id: str, reason: str, origin: Origin, failure: TransferError | None = None
    ) -> None:
        self._cancelled[request_id] = (reason, origin, failure)
        while len(self._cancelled) > self._remembered_cancels:
            self._cancelled.popitem(last=False)
