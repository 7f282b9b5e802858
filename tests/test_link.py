"""The link model, sans I/O: made-up TCP_INFO samples in, figures out (no sockets)."""

import pytest

from kvwire import planning
from kvwire.link import LinkModel, fit_completions

PERIOD = 0.05


class FakeLink:
    """Cumulative TCP_INFO counters of ``n`` connections sharing a link of ``rate`` bytes/s."""

    def __init__(self, model, n=4, rate=100e6, rtt_us=40_000):
        self.model, self.n, self.rate, self.rtt_us = model, n, rate, rtt_us
        self.t = 0.0
        self.acked = [0] * n
        self.retrans = [0] * n
        self.busy_us = [0] * n
        self.limited_us = [0] * n

    def info(self, i):
        return {
            "bytes_acked": self.acked[i], "bytes_sent": self.acked[i] + self.retrans[i],
            "bytes_retrans": self.retrans[i], "rtt_us": self.rtt_us, "min_rtt_us": self.rtt_us - 500,
            "delivery_rate": int(self.rate / self.n), "busy_time_us": self.busy_us[i],
            "sndbuf_limited_us": self.limited_us[i],
        }  # fmt: skip

    def run(self, seconds, busy=True, loss=0.0, limited=0.0, trickle=False):
        """``trickle``: not busy, yet a tenth of the rate moves (a prefill paces the sender)."""
        for _ in range(round(seconds / PERIOD)):
            self.t += PERIOD
            for i in range(self.n):
                if busy or trickle:
                    moved = int(self.rate * PERIOD / self.n * (1 if busy else 0.1))
                    self.acked[i] += moved
                    self.retrans[i] += int(moved * loss)
                    self.busy_us[i] += int(PERIOD * 1e6)
                    self.limited_us[i] += int(PERIOD * 1e6 * limited)
            self.model.observe(self.t, {i: self.info(i) for i in range(self.n)}, backlog=busy)
        return self.model.state(self.t)


def test_a_steady_busy_link_gives_its_rate_rtt_and_fresh_figures():
    link = FakeLink(LinkModel(), rate=250e6)
    state = link.run(3.0)
    assert state.goodput.value == pytest.approx(250e6, rel=0.01)
    assert state.goodput.age_s < 0.3 and state.goodput.samples >= 10
    assert state.rtt.value == pytest.approx(0.04) and state.min_rtt.value == pytest.approx(0.0395)
    assert state.queueing_s == pytest.approx(0.0005)
    assert state.verdict == "steady" and abs(state.trend) < 0.01
    assert state.uncertainty == pytest.approx(0.05, rel=0.05)  # the floor: a steady link is still a sample
    assert state.loss.value == 0.0 and state.connections == 4
    assert state.busy_s == pytest.approx(3.0 - PERIOD)
    assert state.best_goodput() == (state.goodput.value, "measured")


def test_idle_time_teaches_nothing_but_ages_the_figure():
    link = FakeLink(LinkModel(), rate=250e6)
    link.run(2.0)
    busy = link.run(PERIOD, busy=False)  # the busy stretch's last partial bin is counted here
    idle = link.run(20.0, busy=False)
    assert idle.goodput.value == busy.goodput.value  # an idle sender measures its idleness, not the link
    assert idle.goodput.samples == busy.goodput.samples
    assert idle.goodput.age_s == pytest.approx(20.0, abs=0.3)
    assert idle.uncertainty > 2.5 * busy.uncertainty  # older figures are less certain
    assert idle.busy_s == busy.busy_s


def test_the_model_follows_a_rate_drop_within_seconds_and_calls_it_worsening():
    link = FakeLink(LinkModel(), rate=250e6)
    link.run(10.0)
    link.rate = 100e6
    state = link.run(3.0)
    assert state.goodput.value == pytest.approx(100e6, rel=0.1)  # 3 s at the new rate: within 10%
    assert state.verdict == "worsening" and state.trend < -0.15
    assert state.goodput_slow.value > 1.2 * state.goodput.value
    link.rate = 400e6
    state = link.run(3.0)
    assert state.goodput.value == pytest.approx(400e6, rel=0.1)
    assert state.verdict == "improving"


def test_loss_is_the_share_of_bytes_sent_again():
    link = FakeLink(LinkModel())
    assert link.run(2.0).loss.value == 0.0
    state = link.run(10.0, loss=0.01)  # the loss average spans ~5 s: 10 s is most of it
    assert state.loss.value == pytest.approx(0.01, rel=0.1)
    assert state.loss.age_s < 0.1


def test_window_limited_share_of_busy_time():
    link = FakeLink(LinkModel())
    assert link.run(10.0, limited=0.5).window_limited == pytest.approx(0.5, abs=0.01)
    assert link.run(30.0, limited=0.0).window_limited < 0.01


def test_a_new_connection_adds_no_spike_and_a_closed_one_no_drop():
    model = LinkModel()
    link = FakeLink(model, n=4, rate=200e6)
    link.run(3.0)
    # A connection that appears with 1 GB already acknowledged (opened earlier, or a
    # counter that never started at zero) must not count as 1 GB delivered now.
    link.n, link.acked, link.retrans = 5, link.acked + [10**9], link.retrans + [0]
    link.busy_us, link.limited_us = link.busy_us + [0], link.limited_us + [0]
    state = link.run(1.0)
    assert state.goodput.value == pytest.approx(200e6, rel=0.02)
    assert state.connections == 5
    link.n = 3
    state = link.run(1.0)
    assert state.goodput.value == pytest.approx(200e6, rel=0.02) and state.connections == 3


def test_a_busy_stretch_shorter_than_a_bin_still_counts():
    link = FakeLink(LinkModel(), rate=300e6)
    link.run(0.1)  # two busy intervals, then the sender has nothing more
    state = link.run(1.0, busy=False)
    assert state.goodput.value == pytest.approx(300e6, rel=0.01)


def test_before_any_busy_interval_the_handshake_rtt_and_the_tcp_rate_are_hints():
    model = LinkModel()
    model.observe(0.0, {"a": {"rtt_us": 30_000, "bytes_acked": 0}}, backlog=False)
    state = model.state(0.0)
    assert state.rtt.value == pytest.approx(0.03) and state.goodput.value is None
    assert state.best_goodput() == (None, "none") and state.uncertainty == 1.0
    model.observe(0.05, {"a": {"rtt_us": 30_000, "bytes_acked": 10**6, "delivery_rate": 80e6}}, backlog=False)
    assert model.state(0.05).best_goodput() == (80e6, "tcp")


def test_completed_transfers_give_a_goodput_and_an_overhead():
    model = LinkModel()
    model.observe(0.0, {"a": {"rtt_us": 20_000}}, backlog=False)
    model.completed(1.0, wire_bytes=100_000_000, seconds=0.52)  # 100 MB at 200 MB/s + one RTT
    state = model.state(1.0)
    assert state.best_goodput() == (pytest.approx(200e6), "transfers")
    assert state.overhead.value is None  # no busy goodput to measure an overhead against
    link = FakeLink(model, n=1, rate=250e6, rtt_us=20_000)
    link.run(2.0)
    for _ in range(5):  # each took 30 ms more than bytes / goodput + RTT: a start-up cost
        model.completed(link.t, 50_000_000, 50_000_000 / 250e6 + 0.02 + 0.03)
    state = model.state(link.t)
    assert state.overhead.value == pytest.approx(0.03, abs=0.002) and state.overhead.samples == 5


def test_short_transfers_alone_teach_a_rate_and_a_fixed_cost():
    """Transfers too short for a busy interval (loopback): sizes from 2 to 40 MB at 2 GB/s
    with 5 ms of start-up each, after one slow warm-up: the fit finds both, and the
    warm-up does not hold the rate down."""
    model = LinkModel()
    model.observe(0.0, {"a": {"rtt_us": 50, "min_rtt_us": 50}}, backlog=False)
    model.completed(0.5, wire_bytes=20_000_000, seconds=0.2)  # the first: connections still cold
    for i, mb in enumerate([2, 40, 7, 25, 13, 31, 4, 18]):
        noise = 1.0 + (0.05 if i % 2 else -0.05)
        model.completed(1.0 + i, mb * 1_000_000, (0.005 + mb * 1e6 / 2e9) * noise + 50e-6)
    state = model.state(9.0)
    goodput, fixed, uncertainty, basis = state.plan_rate()
    assert basis == "transfers" and goodput == pytest.approx(2e9, rel=0.1)
    assert fixed == state.transfer_overhead.value == pytest.approx(0.005, abs=0.002)
    assert uncertainty == state.uncertainty < 0.2
    e = planning.estimate([planning.LayerCost(4_000_000, 4_000_000)], "raw", 100, state)
    assert e.total_s == pytest.approx(0.005 + 0.002, rel=0.15)  # not 4 MB at the warm-up's 100 MB/s


def test_completions_of_one_size_give_their_median_rate():
    assert fit_completions([(10**6, 0.01), (10**6, 0.011), (10**6, 0.5)])[:2] == (pytest.approx(1e6 / 0.011), None)
    assert fit_completions([]) == (None, None, 1.0)


def test_paced_traffic_on_a_link_that_got_faster_raises_the_figure():
    """The sender is never busy (a prefill paces it), but the kernel's delivery rate shows
    the link carries more than the figure says: the figure rises toward it."""
    link = FakeLink(LinkModel(), rate=50e6)
    assert link.run(3.0).goodput.value == pytest.approx(50e6, rel=0.01)
    link.rate = 200e6  # what delivery_rate reports; the sender only trickles (not busy)
    state = link.run(4.0, busy=False, trickle=True)  # no backlog: only the hint can teach
    assert state.goodput.value > 150e6 and state.busy_s == pytest.approx(2.95)
    link.rate = 40e6  # and a hint never lowers the figure: only busy intervals do
    assert link.run(3.0, busy=False, trickle=True).goodput.value > 150e6
    assert link.run(4.0).goodput.value == pytest.approx(40e6, rel=0.1)  # busy intervals bring it down


@pytest.mark.parametrize("length", [232, 240, 231, 200, 104, 3, 0])
def test_tcp_info_is_read_the_same_in_one_struct_and_field_by_field(length):
    """The whole-struct read (a current kernel) gives what reading field by field gives;
    a shorter struct (an older kernel) gives only the fields it holds."""
    import random
    import struct

    from kvwire.transport.tcp import _TCP_INFO_FIELDS, parse_tcp_info

    raw = random.Random(length).randbytes(length)
    expected = {
        name: struct.unpack_from("<" + fmt, raw, offset)[0]
        for name, offset, fmt in _TCP_INFO_FIELDS
        if offset + struct.calcsize(fmt) <= length
    }
    assert parse_tcp_info(raw) == expected
    if length >= 232:
        assert len(expected) == len(_TCP_INFO_FIELDS)
        assert expected["snd_wnd"] == int.from_bytes(raw[228:232], "little")
    else:
        assert len(expected) < len(_TCP_INFO_FIELDS)


def test_a_fit_of_completions_gives_way_to_busy_intervals_that_measured_a_faster_link():
    """Completions are only refreshed by completions, which a paced workload never makes:
    once busy intervals measure the link at more than twice the fit, the plan follows
    them (it held a link measured at 100 MB/s to a fit of 10 MB/s)."""
    model = LinkModel()
    model.observe(0.0, {"a": {"rtt_us": 20_000, "min_rtt_us": 20_000}}, backlog=False)
    for i, mb in enumerate([2, 40, 7, 25, 13, 31, 4, 18]):
        model.completed(1.0 + i, mb * 1_000_000, 0.01 + mb * 1e6 / 10e6 + 0.02)  # 10 MB/s and 10 ms
    assert model.state(9.0).plan_rate()[3] == "transfers"
    t, acked = 10.0, 0
    model.observe(t, {"a": {"bytes_acked": 0, "rtt_us": 20_000, "min_rtt_us": 20_000}}, backlog=True)
    for _ in range(200):  # 10 s busy at 100 MB/s
        t, acked = t + 0.05, acked + 5_000_000
        model.observe(t, {"a": {"bytes_acked": acked, "bytes_sent": acked, "rtt_us": 20_000, "min_rtt_us": 20_000}},
                      backlog=True)  # fmt: skip
    goodput, _, _, basis = model.state(t).plan_rate()
    assert basis == "measured" and goodput == pytest.approx(100e6, rel=0.1)


def test_a_busy_stall_counts_in_the_rate_of_the_bytes_that_end_it():
    """Busy bins that delivered nothing were dropped, so a link that stalled for seconds
    with data waiting kept its old goodput; their time now goes into the next bin."""
    model = LinkModel()
    t, acked = 0.0, 0
    info = {"rtt_us": 20_000, "min_rtt_us": 20_000}
    model.observe(t, {"a": {"bytes_acked": 0, **info}}, backlog=True)
    for _ in range(100):  # 5 s busy at 100 MB/s
        t, acked = t + 0.05, acked + 5_000_000
        model.observe(t, {"a": {"bytes_acked": acked, "bytes_sent": acked, **info}}, backlog=True)
    assert model.state(t).goodput.value == pytest.approx(100e6, rel=0.05)
    for _ in range(40):  # 2 s busy, nothing acknowledged
        t += 0.05
        model.observe(t, {"a": {"bytes_acked": acked, "bytes_sent": acked, **info}}, backlog=True)
    for _ in range(5):  # then 0.25 s at 100 MB/s again
        t, acked = t + 0.05, acked + 5_000_000
        model.observe(t, {"a": {"bytes_acked": acked, "bytes_sent": acked, **info}}, backlog=True)
    assert model.state(t).goodput.value < 60e6  # 25 MB over 2.25 s weighed in, not dropped
