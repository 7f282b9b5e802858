"""A live model of the link to one peer, sans I/O: samples in, figures out.

The sender feeds a :class:`LinkModel` what it sees anyway, every few tens of
milliseconds: each connection's TCP_INFO (bytes acknowledged and retransmitted, RTT,
the kernel's delivery rate, how long the connection was limited by its send buffer or
the peer's window) and whether it had data waiting for the network. The model answers
with a :class:`LinkState`: the goodput the link achieves while it is kept busy, RTT,
loss, their trend, and how old each figure is. Nothing here opens a socket or reads a
clock: times are passed in, so the tests drive it with made-up samples.

Why "while it is kept busy": a sender that has nothing to send measures its own idleness,
not the link. An interval counts only if the sender had data waiting (chunks queued, or
bytes in a socket not yet sent) at both its ends; the link's goodput is what TCP
acknowledged over such intervals, summed over the connections.

Transfers too short for the sampling period teach through their completions
(:meth:`LinkModel.completed`): a transfer that had the link to itself and all its layers
at once took ``wire bytes / goodput + RTT + overhead``; what is left over is the
per-transfer ``overhead`` (slow start after an idle link, the first chunk's encoding),
and, before any busy interval was measured, its bytes over its time are the goodput.

>>> m = LinkModel()
>>> for i in range(9):  # 2 s of a busy link moving 100 MB/s, one sample every 250 ms
...     m.observe(i * 0.25, {"c0": {"bytes_acked": i * 25_000_000, "bytes_sent": i * 25_000_000,
...                                 "rtt_us": 40_000, "min_rtt_us": 39_000}}, backlog=True)
>>> s = m.state(2.0)
>>> round(s.goodput.value / 1e6), s.rtt.value, s.goodput.age_s
(100, 0.04, 0.0)
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass

# Time constants, in seconds of *busy* time for goodput (an idle link teaches nothing
# about its rate) and of wall time for loss and the window signals.
FAST_TAU_S = 1.0  # goodput follows a change of the link within ~3 s (95%)
SLOW_TAU_S = 8.0  # the longer view the trend compares the fast one with
LOSS_TAU_S = 5.0
BIN_S = 0.25  # busy time gathered into one goodput sample: 50 ms samples are ACK-clock noise
STALE_S = 10.0  # a goodput figure this old has its uncertainty doubled (and so on, linearly)
MIN_UNCERTAINTY = 0.05  # never claim better than +-5%: the figures are samples of a shared link
TREND_BAND = 0.15  # |fast/slow - 1| below this is "steady"
COMPLETIONS = 16  # completed transfers remembered (their fit; the median of their overheads)
FIT_MIN = 4  # completions before their fit is planned with
# A sender whose transfers are paced by a prefill rarely keeps the link busy, so a link
# that got faster would never be measured again. The kernel's delivery rate, summed over
# the connections, is a lower bound on the link even then: when its median over the last
# second exceeds the goodput figure by this factor, the figure is raised toward it.
RECOVER = 1.25
HINT_S = 1.0


@dataclass(frozen=True)
class Figure:
    """One estimated quantity: its value (None until measured), the seconds since the
    last sample that changed it (None if never), and how many samples it rests on."""

    value: float | None
    age_s: float | None
    samples: int


@dataclass(frozen=True)
class LinkState:
    """What the link looks like now (``Sender.link()``).

    * ``goodput``: wire bytes per second the link delivered while the sender kept it
      busy (fast average, about a second of busy time); raised toward the kernel's
      delivery rate when that shows more while the sender is not busy (``RECOVER``).
    * ``transfer_goodput`` and ``transfer_overhead``: whole transfers that had the link
      to themselves (the last 16 completions), fitted as ``seconds = overhead + wire
      bytes / rate + RTT`` (:func:`fit_completions`): the rate, and the fixed cost of a
      transfer (slow start after an idle link, the first chunk's encoding; None when
      their sizes are too alike to tell the two apart); ``transfer_uncertainty``: the
      fit's relative spread. ``overhead``: seconds such a transfer took beyond ``wire
      bytes / goodput + RTT`` against the busy ``goodput`` (median of the last 16).
    * ``goodput_slow``: the same over about eight seconds: ``trend`` compares the two.
    * ``rtt`` / ``min_rtt``: seconds, TCP's smoothed RTT (mean over the connections)
      and the lowest RTT it saw lately (the kernel's windowed minimum; the path without
      queues); ``queueing_s`` is their difference (a standing queue).
    * ``loss``: share of the bytes sent that TCP had to send again (last ~5 s).
    * ``tcp_rate``: bytes per second from the kernel's own delivery-rate samples,
      summed over the connections that delivered since the last sample: a hint used
      while neither a busy interval nor a transfer has been measured.
    * ``window_limited``: share of the connections' busy time spent limited by their
      send buffer or the peer's receive window (more connections or buffers would help).
    * ``trend``: ``goodput / goodput_slow - 1`` (negative: getting worse), and
      ``verdict``: ``worsening``, ``improving``, ``steady`` or ``unknown``.
    * ``uncertainty``: relative spread of the goodput figure (0.1 = +-10%), larger for a
      noisy link and growing while the figure gets older.
    * ``connections``: connections sampled; ``busy_s``: seconds the sender has kept the
      link busy so far (the clock goodput is averaged over).
    """

    goodput: Figure
    goodput_slow: Figure
    transfer_goodput: Figure
    transfer_overhead: Figure
    transfer_uncertainty: float
    overhead: Figure
    rtt: Figure
    min_rtt: Figure
    loss: Figure
    tcp_rate: Figure
    window_limited: float | None
    trend: float | None
    verdict: str
    queueing_s: float | None
    uncertainty: float
    connections: int
    busy_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def plan_rate(self) -> tuple[float | None, float, float, str]:
        """(goodput, fixed cost per transfer in seconds, uncertainty, basis) to predict a
        transfer with. The fit of completed transfers (``basis`` ``transfers``) when there
        is one from at least ``FIT_MIN`` of them: it prices the start-up that busy
        intervals average in; scaled down by ``goodput / goodput_slow`` when the busy
        figures say the link is getting worse, and set aside for the busy goodput when
        that is below half of it or above twice it (the completions are from another link:
        a fit is only refreshed by completions, which a paced workload never makes). Else
        :meth:`best_goodput`, with ``overhead`` against a measured figure."""
        fit, fixed = self.transfer_goodput.value, self.transfer_overhead.value
        if fit and fixed is not None and self.transfer_goodput.samples >= FIT_MIN:
            fast, slow = self.goodput.value, self.goodput_slow.value
            if not fast or 0.5 * fit <= fast <= 2.0 * fit:
                worse = min(1.0, fast / slow) if fast and slow else 1.0
                return fit * worse, fixed, self.transfer_uncertainty, "transfers"
        goodput, basis = self.best_goodput()
        if basis == "measured":
            return goodput, self.overhead.value or 0.0, self.uncertainty, basis
        if basis == "transfers":
            return goodput, 0.0, self.transfer_uncertainty, basis
        return goodput, 0.0, 1.0, basis

    def best_goodput(self) -> tuple[float | None, str]:
        """The goodput to plan with and where it comes from: ``measured`` (busy
        intervals), ``transfers`` (completions only), ``tcp`` (the kernel's delivery
        rate only), or ``none``."""
        if self.goodput.value:
            return self.goodput.value, "measured"
        if self.transfer_goodput.value:
            return self.transfer_goodput.value, "transfers"
        if self.tcp_rate.value:
            return self.tcp_rate.value, "tcp"
        return None, "none"


def fit_completions(done: list[tuple[int, float]]) -> tuple[float | None, float | None, float]:
    """(goodput, overhead, relative spread) from completed transfers' (wire bytes, seconds
    beyond the RTT): ``seconds = overhead + bytes / goodput``, fitted robustly (Theil-Sen:
    the median slope over pairs whose sizes differ by half or more, then the median
    intercept), so that small transfers' fixed cost (slow start, the first chunk's
    encoding) is not taken for a slow link. Fewer than three such pairs, or a slope that
    is not positive: the median of bytes / seconds, no overhead. Spread: 1.0 without two
    completions."""
    if not done:
        return None, None, 1.0
    rates = [b / t for b, t in done if t > 0]
    slopes = [(tj - ti) / (bj - bi) for i, (bi, ti) in enumerate(done) for bj, tj in done[i + 1 :]
              if max(bi, bj) >= 1.5 * min(bi, bj)]  # fmt: skip
    slope = statistics.median(slopes) if len(slopes) >= 3 else 0.0
    if slope > 0:
        overhead = statistics.median(t - slope * b for b, t in done)
        goodput: float | None = 1.0 / slope
        fitted: list[float] = [overhead + slope * b for b, _ in done]
    else:
        overhead, goodput = None, statistics.median(rates) if rates else None
        fitted = [b / goodput if goodput else t for b, t in done]
    if len(done) < 2:
        return goodput, overhead, 0.5
    spread = statistics.median(abs(t - f) / t for (_, t), f in zip(done, fitted) if t > 0)
    return goodput, overhead, spread


class _Ewma:
    """An exponentially weighted mean and variance over weighted samples (weights in
    seconds; ``tau`` seconds of weight hold ~63% of the mean)."""

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self.mean: float | None = None
        self.var = 0.0
        self.samples = 0

    def add(self, x: float, weight: float) -> None:
        self.samples += 1
        if self.mean is None:
            self.mean = x
            return
        alpha = 1.0 - math.exp(-weight / self.tau)
        delta = x - self.mean
        self.mean += alpha * delta
        self.var = (1.0 - alpha) * (self.var + alpha * delta * delta)

    @property
    def cv(self) -> float:
        if not self.mean:
            return 1.0
        return math.sqrt(self.var) / self.mean


@dataclass
class _Conn:
    acked: int
    sent: int
    retrans: int
    busy_us: int
    limited_us: int


def _field(info: Mapping, name: str) -> int:
    value = info.get(name, 0)
    return int(value) if isinstance(value, (int, float)) else 0


class LinkModel:
    """The live model of one peer's link. Feed it with :meth:`observe` (periodic, every
    connection's TCP_INFO) and read it with :meth:`state`. Not thread-safe: the sender
    calls it from one thread, under its own lock."""

    def __init__(self, fast_tau_s: float = FAST_TAU_S, slow_tau_s: float = SLOW_TAU_S) -> None:
        self._fast = _Ewma(fast_tau_s)
        self._slow = _Ewma(slow_tau_s)
        self._conns: dict[Hashable, _Conn] = {}
        self._last_time: float | None = None
        self._last_backlog = False
        self._bin_bytes = 0
        self._bin_s = 0.0
        self._goodput_at: float | None = None
        # loss: decayed sums of bytes sent and sent again
        self._sent_sum = 0.0
        self._retrans_sum = 0.0
        self._loss_at: float | None = None
        self._loss_samples = 0
        self._busy_sum = 0.0
        self._limited_sum = 0.0
        self._rtt: float | None = None
        self._min_rtt: float | None = None
        self._rtt_at: float | None = None
        self._rtt_samples = 0
        self._tcp_rate: float | None = None
        self._tcp_rate_at: float | None = None
        self._tcp_rate_samples = 0
        self._connections = 0
        self._busy_total = 0.0
        self._hints: collections.deque[tuple[float, float]] = collections.deque()  # (time, delivery rate)
        self._hinted_at = float("-inf")
        # completions: (wire bytes, seconds beyond the RTT), the last COMPLETIONS of them
        self._completions: collections.deque[tuple[int, float]] = collections.deque(maxlen=COMPLETIONS)
        self._transfers_at: float | None = None
        self._overheads: list[float] = []
        self._overhead_at: float | None = None

    def observe(self, now: float, conns: Mapping[Hashable, Mapping], backlog: bool) -> None:
        """One sample: ``conns`` maps a connection's key to its TCP_INFO figures
        (``bytes_acked``, ``bytes_sent``, ``bytes_retrans``, ``rtt_us``, ``min_rtt_us``,
        ``delivery_rate``, ``delivery_rate_app_limited``, ``busy_time_us``,
        ``sndbuf_limited_us``, ``rwnd_limited_us``; missing ones count as unknown).
        A transport without TCP_INFO passes ``bytes_acked`` as the bytes it wrote.
        ``backlog``: the sender had data waiting for the network at this moment."""
        dt = None if self._last_time is None else now - self._last_time
        if dt is not None and dt <= 0:
            return  # the same instant twice (or a clock that went back): nothing to learn
        acked = sent = retrans = busy = limited = 0
        rtts, min_rtts, rates = [], [], []
        seen = {}
        for key, info in conns.items():
            now_conn = _Conn(_field(info, "bytes_acked"), _field(info, "bytes_sent"), _field(info, "bytes_retrans"),
                             _field(info, "busy_time_us"),
                             _field(info, "sndbuf_limited_us") + _field(info, "rwnd_limited_us"))  # fmt: skip
            seen[key] = now_conn
            before = self._conns.get(key)
            if before is None:
                if self._rtt is None and info.get("rtt_us"):
                    self._rtt, self._rtt_at = info["rtt_us"] / 1e6, now  # the handshake's RTT sample
                continue  # a new connection: its counters start from here
            d_acked = max(0, now_conn.acked - before.acked)
            acked += d_acked
            sent += max(0, now_conn.sent - before.sent)
            retrans += max(0, now_conn.retrans - before.retrans)
            busy += max(0, now_conn.busy_us - before.busy_us)
            limited += max(0, now_conn.limited_us - before.limited_us)
            if d_acked and info.get("rtt_us"):
                rtts.append(info["rtt_us"] / 1e6)  # a fresh RTT sample came with those ACKs
            if info.get("min_rtt_us"):
                min_rtts.append(info["min_rtt_us"] / 1e6)
            if d_acked and info.get("delivery_rate"):
                rates.append(float(info["delivery_rate"]))  # app-limited ones are lower bounds: a hint
        self._conns = seen
        self._connections = len(seen)
        busy_interval = dt is not None and backlog and self._last_backlog
        self._last_time, self._last_backlog = now, backlog
        if dt is None:
            return
        if busy_interval:
            self._busy_total += dt
            self._bin_bytes += acked
            self._bin_s += dt
            if self._bin_s >= BIN_S:
                self._flush_bin(now)
        elif self._bin_s:
            self._flush_bin(now, ended=True)  # a busy stretch ended: what it measured still counts
        decay = math.exp(-dt / LOSS_TAU_S)
        self._sent_sum = self._sent_sum * decay + sent
        self._retrans_sum = self._retrans_sum * decay + retrans
        self._busy_sum = self._busy_sum * decay + busy
        self._limited_sum = self._limited_sum * decay + limited
        if sent:
            self._loss_at = now
            self._loss_samples += 1
        if rtts:
            self._rtt = sum(rtts) / len(rtts)
            self._rtt_at = now
            self._rtt_samples += 1
        if min_rtts:  # the kernel's own windowed minimum (minutes): a route that changed shows up
            self._min_rtt = min(min_rtts)
        if rates:
            self._tcp_rate = sum(rates)
            self._tcp_rate_at = now
            self._tcp_rate_samples += 1
            if not busy_interval:
                self._hint(now, sum(rates))

    def _hint(self, now: float, rate: float) -> None:
        """A delivery rate seen while the sender was not busy: a lower bound on the link."""
        self._hints.append((now, rate))
        while self._hints and self._hints[0][0] < now - HINT_S:
            self._hints.popleft()
        if len(self._hints) < 3 or not self._fast.mean or now - self._hinted_at < BIN_S:
            return
        floor = statistics.median(r for _, r in self._hints)
        if floor > RECOVER * self._fast.mean:
            self._fast.add(floor, BIN_S)
            self._slow.add(floor, BIN_S)
            self._goodput_at = self._hinted_at = now

    def completed(self, now: float, wire_bytes: int, seconds: float) -> None:
        """A transfer that had the link to itself and every layer from its start took
        ``seconds`` from its start to its acknowledgement for ``wire_bytes``."""
        if wire_bytes <= 0 or seconds <= 0:
            return
        rtt = self._min_rtt or self._rtt or 0.0
        if seconds > rtt:
            self._completions.append((wire_bytes, seconds - rtt))
            self._transfers_at = now
        if self._fast.mean:
            self._overheads.append(seconds - wire_bytes / self._fast.mean - rtt)
            del self._overheads[:-COMPLETIONS]
            self._overhead_at = now

    def _flush_bin(self, now: float, ended: bool = False) -> None:
        if self._bin_bytes <= 0:
            # Busy and nothing acknowledged yet: a stall (or an RTT longer than a bin). Its
            # time stays in the bin, so the rate of the bytes that end it counts it (dropped,
            # the link kept its old figure through a stall of any length), unless the busy
            # stretch ended without a byte: nothing then says what the link did.
            if ended:
                self._bin_s = 0.0
            return
        rate = self._bin_bytes / self._bin_s
        weight = self._bin_s
        self._bin_bytes, self._bin_s = 0, 0.0
        self._fast.add(rate, weight)
        self._slow.add(rate, weight)
        self._goodput_at = now

    def state(self, now: float) -> LinkState:
        """The figures as of ``now``."""

        def age(at: float | None) -> float | None:
            return None if at is None else max(0.0, now - at)

        goodput_age = age(self._goodput_at)
        trend = None
        verdict = "unknown"
        if self._fast.mean and self._slow.mean and self._slow.samples >= 2:
            trend = self._fast.mean / self._slow.mean - 1.0
            verdict = "worsening" if trend < -TREND_BAND else "improving" if trend > TREND_BAND else "steady"
        spread = max(self._fast.cv if self._fast.samples >= 2 else 0.5, MIN_UNCERTAINTY)
        uncertainty = spread * (1.0 + (goodput_age or 0.0) / STALE_S) if self._fast.mean else 1.0
        loss = self._retrans_sum / self._sent_sum if self._sent_sum > 0 else None
        limited = self._limited_sum / self._busy_sum if self._busy_sum > 0 else None
        queueing = None
        if self._rtt is not None and self._min_rtt is not None:
            queueing = max(0.0, self._rtt - self._min_rtt)
        overhead = sorted(self._overheads)[len(self._overheads) // 2] if self._overheads else None
        transfer_goodput, fitted_overhead, spread = fit_completions(list(self._completions))
        transfer_uncertainty = 1.0
        if transfer_goodput:
            transfer_uncertainty = max(spread, MIN_UNCERTAINTY) * (1.0 + (age(self._transfers_at) or 0.0) / STALE_S)
            if self._fast.mean is None:  # completions only: the goodput's spread is theirs
                uncertainty = transfer_uncertainty
        return LinkState(
            goodput=Figure(self._fast.mean, goodput_age, self._fast.samples),
            goodput_slow=Figure(self._slow.mean, goodput_age, self._slow.samples),
            transfer_goodput=Figure(transfer_goodput, age(self._transfers_at), len(self._completions)),
            transfer_overhead=Figure(fitted_overhead, age(self._transfers_at), len(self._completions)),
            transfer_uncertainty=transfer_uncertainty,
            overhead=Figure(overhead, age(self._overhead_at), len(self._overheads)),
            rtt=Figure(self._rtt, age(self._rtt_at), self._rtt_samples),
            min_rtt=Figure(self._min_rtt, age(self._rtt_at), self._rtt_samples),
            loss=Figure(loss, age(self._loss_at), self._loss_samples),
            tcp_rate=Figure(self._tcp_rate, age(self._tcp_rate_at), self._tcp_rate_samples),
            window_limited=None if limited is None else min(1.0, limited),
            trend=trend,
            verdict=verdict,
            queueing_s=queueing,
            uncertainty=uncertainty,
            connections=self._connections,
            busy_s=self._busy_total,
        )
