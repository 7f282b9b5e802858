"""Planning a transfer from the live link model, sans I/O: prediction, codec choice,
admission, and how many connections the link wants.

* :func:`layer_costs`: the wire and logical bytes of each layer of a request under a
  codec, exactly as the sender will cut it into chunks.
* :func:`estimate`: when layer 0 will be in place at the receiver, when all of it, and
  how much of that is exposed after the prefill ends, from the link's goodput and RTT,
  the prefill's pace and what is already queued. A fluid model of one pipeline: layer
  ``l`` is ready at ``(l + 1) / layers_per_s``; it leaves once it is ready and the
  previous one has left, taking ``max(wire bytes / goodput, CPU time of its codec)``;
  it is in place half an RTT later; the acknowledgement of the last layer comes back a
  full RTT after that layer left.
* :func:`choose_codec`: the least lossy codec whose prediction meets the target.
* :class:`StreamPolicy`: grow the number of connections while goodput grows.

Times are seconds, rates bytes per second; nothing here reads a clock.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from kvwire.codec import Codec
from kvwire.engine.chunks import chunk_spec, plan_chunks
from kvwire.layout import KVLayout
from kvwire.link import LinkState
from kvwire.proto.request import tensor_plans


@dataclass(frozen=True)
class LayerCost:
    wire_bytes: int
    logical_bytes: int
    chunks: int = 1


def layer_costs(
    layout: KVLayout,
    codec: Codec,
    num_tokens: int,
    *,
    exact_tokens: int = 0,
    chunk_bytes: int,
    max_payload: int,
    kv_heads: int | None = None,
    whole: bool = True,
    head_slice: tuple[int, int] | None = None,
) -> list[LayerCost]:
    """Each layer's wire bytes (the codec's exact size, or its bound for a variable-size
    codec) and logical bytes, for a request of ``num_tokens`` tokens cut as the sender
    cuts it (chunks, exact tokens sent raw). A tensor-parallel sender sends only its part:
    ``kv_heads`` k/v heads (None: all), ``whole``: the tensors held whole, ``head_slice``:
    (first, count) of its heads (``Sender.part``)."""
    plans = tensor_plans(layout, num_tokens, kv_heads=kv_heads, whole=whole)
    costs: dict[object, LayerCost] = {}  # layers of the same kind cost the same
    out = []
    for i, spec in enumerate(layout.layers):
        if spec not in costs:
            wire = logical = 0
            tensors = plans[i]
            refs = plan_chunks(layout, codec, tensors, chunk_bytes, max_payload, exact_tokens, head_slice)
            for ref in refs:
                cs = chunk_spec(layout, tensors[ref.tensor], ref.count)
                wire += ref.codec(codec).encoded_size(cs)
                logical += cs.raw_nbytes
            costs[spec] = LayerCost(wire, logical, len(refs))
        out.append(costs[spec])
    return out


@dataclass(frozen=True)
class Estimate:
    """A transfer's predicted course (``Sender.estimate``). Times in seconds from the
    transfer's start (the prefill's start: ``transfer()``), None when the link has not
    been measured yet (``basis == "none"``).

    * ``first_layer_s``: layer 0 is in place at the receiver.
    * ``total_s``: the acknowledgement is back: every layer is in place.
    * ``exposed_s``: ``total_s`` minus when the last layer is ready (the prefill's end):
      the latency the transfer adds to the request's first token.
    * ``*_high``: the same at the slow end of the goodput's uncertainty.
    * ``basis``: where the goodput came from (``LinkState.plan_rate``): ``transfers``
      (a fit of completed transfers: a rate and a fixed cost per transfer), ``measured``
      (busy intervals), ``tcp`` (the kernel's delivery rate only: uncertainty 100%),
      ``none``.
    """

    num_tokens: int
    codec: str
    wire_bytes: int
    logical_bytes: int
    layers_per_s: float | None
    goodput: float | None
    rtt_s: float | None
    queued_bytes: int
    basis: str
    uncertainty: float
    first_layer_s: float | None
    total_s: float | None
    exposed_s: float | None
    first_layer_s_high: float | None
    total_s_high: float | None
    exposed_s_high: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def timeline(
    layers: Sequence[LayerCost],
    goodput: float,
    rtt_s: float,
    *,
    layers_per_s: float | None = None,
    cpu_s_per_byte: float = 0.0,
    queued_bytes: int = 0,
    overhead_s: float = 0.0,
    connections: int = 1,
) -> tuple[float, float, float]:
    """(first layer in place, acknowledged, exposed) for one goodput: the fluid pipeline
    described in the module's docstring. ``connections``: a layer's chunks travel side by
    side, each at ``goodput / connections``, so layer 0 is whole only once its slowest
    round of chunks is in."""
    if goodput <= 0:
        raise ValueError(f"goodput: must be positive, got {goodput}")
    left = queued_bytes / goodput  # the link is busy with what was queued before
    ready = 0.0
    first = None
    for i, layer in enumerate(layers):
        ready = (i + 1) / layers_per_s if layers_per_s else 0.0
        service = max(layer.wire_bytes / goodput, layer.logical_bytes * cpu_s_per_byte)
        begin = max(left, ready)
        left = begin + service
        if first is None:  # k chunks over n connections: ceil(k/n) rounds of chunks, each at goodput/n
            n, k = max(connections, 1), max(layer.chunks, 1)
            striped = -(-k // n) * n * (layer.wire_bytes / k) / goodput
            first = begin + max(service, striped) + rtt_s / 2
    # The fixed cost (start-up) delays everything; learned from completions it may be
    # negative (the goodput was measured low, so each layer's service is priced high),
    # but the last layer is not acknowledged before it is made and a round trip has passed.
    total = max(left + rtt_s + overhead_s, ready + rtt_s)
    first = min((first if first is not None else total) + max(overhead_s, 0.0), total)
    return first, total, max(total - ready, 0.0)


def estimate(
    layers: Sequence[LayerCost],
    codec: str,
    num_tokens: int,
    link: LinkState,
    *,
    layers_per_s: float | None = None,
    cpu_s_per_byte: float = 0.0,
    queued_bytes: int = 0,
    overhead_s: float | None = None,
) -> Estimate:
    """Predict a transfer of ``layers`` (from :func:`layer_costs`) over ``link``.

    ``layers_per_s``: how fast the prefill produces layers (None: all are ready at the
    start); ``cpu_s_per_byte``: the codec's CPU seconds per logical byte on its slowest
    side (0 for raw, or on GPUs); ``queued_bytes``: wire bytes of earlier transfers
    still ahead of this one; ``overhead_s``: a fixed cost per transfer (start-up; default:
    the one ``link`` learned from completed transfers)."""
    goodput, learned_overhead, uncertainty, basis = link.plan_rate()
    # The path's RTT without queues: bytes queued ahead of the transfer's last byte are
    # already counted by goodput (a smoothed RTT would count a standing queue twice).
    rtt = link.min_rtt.value or link.rtt.value or 0.0
    if overhead_s is None:  # learned from completions, against the goodput it was measured with
        overhead_s = learned_overhead
    wire = sum(x.wire_bytes for x in layers)
    logical = sum(x.logical_bytes for x in layers)
    times: list[float | None] = [None] * 6

    def course(g: float, u: float, overhead: float) -> list[float]:
        """(first, total, exposed) at ``g`` and at its slow end."""
        return [x for rate in (g, g / (1 + u)) for x in timeline(
            layers, rate, rtt, layers_per_s=layers_per_s, cpu_s_per_byte=cpu_s_per_byte, queued_bytes=queued_bytes,
            overhead_s=overhead, connections=link.connections or 1)]  # fmt: skip

    if goodput:
        known = course(goodput, uncertainty, overhead_s)
        busy = link.goodput.value
        if basis == "transfers" and busy:
            # Layer 0 travels in the ramp that busy intervals average in: the busy figure
            # predicts it better than the fit, whose fixed cost is spread over the transfer
            # (kvwire-bench calibrate: 11-16% median error against 23-34% at 500 Mbit/s).
            slow_start = course(busy, link.uncertainty, link.overhead.value or 0.0)
            known[0], known[3] = min(slow_start[0], known[1]), min(slow_start[3], known[4])  # never after the whole
        times = list(known)
    return Estimate(num_tokens, codec, wire, logical, layers_per_s, goodput, rtt or None, queued_bytes, basis,
                    uncertainty, *times)  # fmt: skip


@dataclass(frozen=True)
class Choice:
    """The codec chosen for a transfer, and why (in the transfer's statistics).

    ``meets``: True when the prediction meets the target (and the deadline), False when
    no allowed codec does (the fastest was taken), None when nothing could be predicted."""

    codec: str
    estimate: Estimate
    meets: bool | None
    reason: str
    candidates: tuple[Estimate, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return {"codec": self.codec, "meets": self.meets, "reason": self.reason,
                "estimate": self.estimate.as_dict()}  # fmt: skip


def _ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1e3:.0f} ms"


def _fits(e: Estimate, max_exposed_s: float | None, deadline_s: float | None) -> bool:
    assert e.exposed_s is not None and e.total_s is not None
    return (max_exposed_s is None or e.exposed_s <= max_exposed_s) and (deadline_s is None or e.total_s <= deadline_s)


def choose_codec(
    candidates: Sequence[Estimate], *, max_exposed_s: float | None = None, deadline_s: float | None = None
) -> Choice:
    """The first of ``candidates`` (least lossy first) whose predicted exposed time is
    within ``max_exposed_s`` and whose total is within ``deadline_s``; if none is, the
    one with the least exposed time (``meets`` False); before any measurement, the first
    (``meets`` None)."""
    if not candidates:
        raise ValueError("candidates: at least one codec is needed")
    first = candidates[0]
    if first.exposed_s is None:
        return Choice(first.codec, first, None, "no measurement of the link yet: the least lossy codec",
                      tuple(candidates))  # fmt: skip
    target = "no target" if max_exposed_s is None else f"target {_ms(max_exposed_s)}"
    if deadline_s is not None:
        target += f", deadline {_ms(deadline_s)}"
    for e in candidates:
        if _fits(e, max_exposed_s, deadline_s):
            better = [c.codec for c in candidates[: candidates.index(e)]]
            why = f"{e.codec}: predicted exposed {_ms(e.exposed_s)}, total {_ms(e.total_s)} ({target})"
            if better:
                why += "; " + ", ".join(f"{c.codec} {_ms(c.exposed_s)}" for c in candidates[: candidates.index(e)])
                why += " would miss it"
            return Choice(e.codec, e, True, why, tuple(candidates))
    best = min(candidates, key=lambda c: (c.exposed_s, c.total_s))
    listing = ", ".join(f"{c.codec} {_ms(c.exposed_s)}" for c in candidates)
    return Choice(best.codec, best, False, f"no codec meets it ({target}): {listing}; the fastest is taken",
                  tuple(candidates))  # fmt: skip


# -- how many connections ---------------------------------------------------------------------
GROWTH_GAIN = 0.10  # a step must bring 10% more goodput to be kept: the machine's noise is 5-10%
WINDOW_LIMITED = 0.2  # share of busy time limited by buffers/windows: named in the reason for a step
# A step is tried only if each connection has this much in flight: on loopback a slow
# reader fills the window with microseconds of RTT, and more connections only add threads.
MIN_FLIGHT_BYTES = 256 << 10
MEASURE_S = 1.5  # busy seconds measured at each count (after settling)
SETTLE_S = 0.5  # busy seconds new connections get to leave slow start before measuring
RETRY_S = 60.0  # busy seconds before a step that did not pay is tried again
HISTORY_KEPT = 32  # measurements of the connection count kept for stats()


@dataclass
class StreamPolicy:
    """Connections that follow the link: measure goodput at the current count over busy
    time; while each connection has at least ``MIN_FLIGHT_BYTES`` in flight (a long,
    fast path: window limits and loss recovery both hold single flows back there) and
    the count is below ``bound``, double them; keep a step only if goodput grew by
    ``GROWTH_GAIN``, else go back and hold for ``RETRY_S`` busy seconds. The decision
    and its reason are in ``as_dict()`` (the sender's statistics).

    ``step`` returns the count wanted now (the caller opens or retires connections)."""

    count: int
    bound: int
    phase: str = "measuring"
    reason: str = "measuring the first connections"
    # (count, goodput) measured, the last HISTORY_KEPT: a measurement every RETRY_S busy
    # seconds for as long as the sender lives, and all of it in every stats()
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY_KEPT))
    _since: float | None = None  # busy seconds when the current phase began
    _previous: tuple[int, float] | None = None

    def __post_init__(self) -> None:
        if self.bound < self.count:
            raise ValueError(f"bound: {self.bound} is below the starting count {self.count}")
        if self.bound == self.count:
            self.phase, self.reason = "fixed", f"{self.count} connections (the bound)"

    def _settle(self, link: LinkState) -> float:
        rtt = link.rtt.value or 0.0
        return max(SETTLE_S, 10 * rtt) + max(MEASURE_S, 10 * rtt)

    def step(self, link: LinkState, busy_s: float) -> int:
        """Called periodically with the link's state and the busy seconds so far."""
        if self.phase == "fixed":
            return self.count
        if self._since is None:
            self._since = busy_s
        if self.phase == "holding":
            if busy_s - self._since < RETRY_S:
                return self.count
            self.phase, self._since = "measuring", busy_s  # the link may have changed: look again
            self._previous = None
        if busy_s - self._since < self._settle(link) or not link.goodput.value:
            return self.count
        goodput = link.goodput.value
        self.history.append((self.count, goodput))
        if self._previous is not None:
            before, had = self._previous
            ratio = goodput / had
            if ratio < 1 + GROWTH_GAIN:
                self._hold(busy_s, f"{self.count} connections gave {ratio:.2f}x the goodput of {before}: back to "
                                   f"{before}")  # fmt: skip
                self.count = before
                return self.count
        limited = link.window_limited or 0.0
        flight = goodput * (link.min_rtt.value or link.rtt.value or 0.0) / self.count
        if self.count >= self.bound:
            self._hold(busy_s, f"at the bound of {self.bound} connections ({limited:.0%} window-limited)")
        elif flight < MIN_FLIGHT_BYTES:
            self._hold(busy_s, f"{flight / 1024:.0f} KiB in flight per connection: the window is not what limits")
        else:
            # Window-limited flows gain from more of them; so do flows that loss holds back
            # (each recovers on its own: at 100 ms and 0.1% loss, 8 connections carried 1.8x
            # what 4 did, none of them window-limited). Either way the step is measured and
            # kept only if it pays.
            self._previous = (self.count, goodput)
            grown = min(self.bound, 2 * self.count)
            why = (f"window-limited {limited:.0%} of busy time" if limited >= WINDOW_LIMITED else
                   f"{flight / 1048576:.1f} MiB in flight per connection ({limited:.0%} window-limited)")  # fmt: skip
            self.reason = f"{why} at {self.count}: trying {grown}"
            self.phase, self._since, self.count = "measuring", busy_s, grown
        return self.count

    def _hold(self, busy_s: float, reason: str) -> None:
        self.phase, self.reason, self._since, self._previous = "holding", reason, busy_s, None

    def as_dict(self) -> dict:
        measured = [{"connections": n, "goodput_gb_per_s": round(g / 1e9, 4)} for n, g in self.history]
        return {"connections": self.count, "bound": self.bound, "phase": self.phase, "reason": self.reason,
                "measured": measured}  # fmt: skip


def relative_error(predicted: float, actual: float) -> float:
    """|predicted - actual| / actual (the calibration report's measure)."""
    if actual <= 0 or not math.isfinite(predicted):
        return math.inf
    return abs(predicted - actual) / actual
