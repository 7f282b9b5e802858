"""Prediction, codec choice, admission and the connection policy, sans I/O (no sockets)."""

import pytest

import kvwire
import kvwire.codec
from kvwire.link import Figure, LinkState
from kvwire.planning import (
    Estimate,
    LayerCost,
    StreamPolicy,
    choose_codec,
    estimate,
    layer_costs,
    relative_error,
    timeline,
)

LAYOUT = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16)


def link_state(goodput=None, rtt=0.04, uncertainty=0.1, limited=0.0, busy_s=0.0, min_rtt=None, tcp_rate=None,
               overhead=None, slow=None, fit=(None, None, 0)) -> LinkState:  # fmt: skip
    def fig(v, n=1):
        return Figure(v, 0.0 if v is not None else None, n if v is not None else 0)

    return LinkState(
        goodput=fig(goodput), goodput_slow=fig(slow or goodput), transfer_goodput=fig(fit[0], fit[2]),
        transfer_overhead=fig(fit[1], fit[2]), transfer_uncertainty=0.08, overhead=fig(overhead),
        rtt=fig(rtt), min_rtt=fig(min_rtt if min_rtt is not None else rtt), loss=fig(0.0), tcp_rate=fig(tcp_rate),
        window_limited=limited, trend=0.0, verdict="steady", queueing_s=0.0, uncertainty=uncertainty,
        connections=4, busy_s=busy_s,
    )  # fmt: skip


def costs(codec, tokens=1000, exact=0):
    return layer_costs(LAYOUT, kvwire.codec.get(codec), tokens, exact_tokens=exact, chunk_bytes=2 << 20,
                       max_payload=4 << 20)  # fmt: skip


def test_layer_costs_are_the_codecs_wire_bytes_as_the_sender_cuts_them():
    raw = costs("raw")
    assert sum(c.wire_bytes for c in raw) == sum(c.logical_bytes for c in raw) == LAYOUT.request_bytes(1000)
    fp8, int4 = costs("fp8"), costs("int4")
    assert [c.logical_bytes for c in fp8] == [c.logical_bytes for c in raw]
    assert 1.8 < raw[0].wire_bytes / fp8[0].wire_bytes < 2.0
    assert raw[0].wire_bytes / int4[0].wire_bytes > 2.5
    exact = costs("fp8", exact=64)  # the first 64 tokens travel raw: more wire bytes
    assert exact[0].wire_bytes > fp8[0].wire_bytes


def test_all_at_once_the_transfer_takes_its_bytes_over_goodput_and_one_rtt():
    layers = [LayerCost(10_000_000, 10_000_000)] * 4
    first, total, exposed = timeline(layers, goodput=100e6, rtt_s=0.04)
    assert first == pytest.approx(0.1 + 0.02)  # layer 0 on the wire, then half an RTT
    assert total == pytest.approx(0.4 + 0.04)  # the acknowledgement: a full RTT after the last byte left
    assert exposed == total  # nothing was hidden behind a prefill


def test_a_slow_prefill_hides_all_but_the_last_layer():
    layers = [LayerCost(10_000_000, 10_000_000)] * 4
    first, total, exposed = timeline(layers, goodput=100e6, rtt_s=0.04, layers_per_s=5.0)  # one every 200 ms
    assert first == pytest.approx(0.2 + 0.1 + 0.02)
    assert exposed == pytest.approx(0.1 + 0.04)  # one layer's wire time and one RTT: the ideal
    assert total == pytest.approx(0.8 + 0.14)


def test_a_fast_prefill_queues_behind_the_link():
    layers = [LayerCost(10_000_000, 10_000_000)] * 4
    _, total, exposed = timeline(layers, goodput=100e6, rtt_s=0.0, layers_per_s=100.0)  # 10 ms a layer
    assert total == pytest.approx(0.01 + 0.4)
    assert exposed == pytest.approx(0.41 - 0.04)


def test_queued_bytes_cpu_time_and_overhead_delay_the_transfer():
    layers = [LayerCost(10_000_000, 20_000_000)] * 2
    assert timeline(layers, 100e6, 0.0, queued_bytes=50_000_000)[1] == pytest.approx(0.5 + 0.2)
    assert timeline(layers, 100e6, 0.0, cpu_s_per_byte=1e-8)[1] == pytest.approx(0.4)  # the codec is slower
    first, total, _ = timeline(layers, 100e6, 0.04, overhead_s=0.03)
    assert (first, total) == (pytest.approx(0.1 + 0.02 + 0.03), pytest.approx(0.2 + 0.04 + 0.03))
    # a negative overhead (goodput measured low) never makes the transfer beat the RTT
    assert timeline(layers, 100e6, 0.04, overhead_s=-1.0)[1] == pytest.approx(0.04)
    # nor the prefill: the last layer is acknowledged a round trip after it is made at the earliest
    paced = [LayerCost(1_000_000, 1_000_000)] * 32
    first, total, exposed = timeline(paced, 100e6, 0.04, layers_per_s=16.0, overhead_s=-0.3)
    assert total == pytest.approx(2.0 + 0.04) and exposed == pytest.approx(0.04) and first <= total
    with pytest.raises(ValueError, match="goodput"):
        timeline(layers, 0.0, 0.04)


def test_estimate_uses_the_link_and_says_how_uncertain_it_is():
    layers = [LayerCost(25_000_000, 50_000_000)] * 4
    e = estimate(layers, "fp8", 1000, link_state(goodput=100e6, rtt=0.02, uncertainty=0.25))
    assert (e.wire_bytes, e.logical_bytes, e.basis, e.codec) == (100_000_000, 200_000_000, "measured", "fp8")
    assert e.total_s == pytest.approx(1.0 + 0.02)
    assert e.total_s_high == pytest.approx(1.25 + 0.02)  # goodput / (1 + uncertainty)
    assert e.first_layer_s < e.total_s and e.exposed_s == e.total_s
    learned = estimate(layers, "fp8", 1000, link_state(goodput=100e6, rtt=0.02, overhead=0.05))
    assert learned.total_s == pytest.approx(1.02 + 0.05)  # the overhead learned from completions
    hint = estimate(layers, "fp8", 1000, link_state(tcp_rate=50e6))
    assert hint.basis == "tcp" and hint.uncertainty == 1.0 and hint.total_s == pytest.approx(2.04)
    unknown = estimate(layers, "fp8", 1000, link_state())
    assert unknown.basis == "none" and unknown.total_s is None and unknown.exposed_s is None


def candidates(link, tokens=1000, pace=None):
    return [estimate(costs(c, tokens), c, tokens, link, layers_per_s=pace) for c in ("raw", "fp8", "int4")]


def test_auto_takes_raw_when_the_link_allows_it():
    fast = link_state(goodput=1e9, rtt=0.001)
    choice = choose_codec(candidates(fast), max_exposed_s=0.05)
    assert (choice.codec, choice.meets) == ("raw", True)
    assert "raw: predicted exposed" in choice.reason


def test_auto_takes_the_least_lossy_codec_that_meets_the_target():
    slow = link_state(goodput=2e6, rtt=0.04)  # 16 Mbit/s: 1000 tokens are 2 MB raw
    options = candidates(slow)
    exposed = {e.codec: e.exposed_s for e in options}
    assert exposed["raw"] > exposed["fp8"] > exposed["int4"]
    target = (exposed["fp8"] + exposed["raw"]) / 2
    choice = choose_codec(options, max_exposed_s=target)
    assert (choice.codec, choice.meets) == ("fp8", True)
    assert "raw" in choice.reason and "would miss it" in choice.reason
    choice = choose_codec(options, max_exposed_s=(exposed["int4"] + exposed["fp8"]) / 2)
    assert choice.codec == "int4"


def test_when_no_codec_meets_the_target_the_fastest_is_taken_and_said_so():
    slow = link_state(goodput=1e6, rtt=0.04)
    choice = choose_codec(candidates(slow), max_exposed_s=0.01)
    assert (choice.codec, choice.meets) == ("int4", False)
    assert "no codec meets it" in choice.reason and "int4" in choice.reason


def test_the_deadline_counts_too():
    slow = link_state(goodput=2e6, rtt=0.04)
    options = candidates(slow, pace=2.0)  # the prefill takes 2 s: the total includes it
    total = {e.codec: e.total_s for e in options}
    choice = choose_codec(options, deadline_s=(total["raw"] + total["fp8"]) / 2)
    assert (choice.codec, choice.meets) == ("fp8", True)


def test_without_a_measurement_auto_takes_the_least_lossy_and_admission_cannot_refuse():
    choice = choose_codec(candidates(link_state()), max_exposed_s=0.001)
    assert (choice.codec, choice.meets) == ("raw", None)
    assert "no measurement" in choice.reason
    with pytest.raises(ValueError, match="candidates"):
        choose_codec([])


def _policy_run(policy, rates, limited=0.5, rtt=0.05, seconds=20.0):
    """Step ``policy`` every 0.1 busy second; ``rates`` maps a connection count to goodput."""
    busy, seen = 0.0, []
    while busy < seconds:
        busy += 0.1
        state = link_state(goodput=rates(policy.count), rtt=rtt, limited=limited, busy_s=busy)
        count = policy.step(state, busy)
        if not seen or seen[-1] != count:
            seen.append(count)
    return seen


def test_connections_grow_while_goodput_grows_and_stop_at_the_bound():
    policy = StreamPolicy(4, 16)
    seen = _policy_run(policy, lambda n: 30e6 * n)  # every connection adds its window's worth
    assert seen == [4, 8, 16]
    assert policy.phase == "holding" and "bound of 16" in policy.reason
    assert [n for n, _ in policy.history] == [4, 8, 16]


def test_a_step_that_brings_nothing_is_taken_back():
    policy = StreamPolicy(4, 16)
    seen = _policy_run(policy, lambda n: min(30e6 * n, 250e6))  # the link is full at 8
    assert seen == [4, 8, 16, 8]
    assert "16 connections gave 1.0" in policy.reason and "back to 8" in policy.reason
    assert policy.as_dict()["connections"] == 8


def test_flows_held_back_by_loss_grow_too_and_a_full_link_goes_back():
    lossy = StreamPolicy(4, 16)  # not window-limited, yet each flow adds goodput (loss recovery)
    assert _policy_run(lossy, lambda n: 15e6 * n, limited=0.05) == [4, 8, 16]
    full = StreamPolicy(4, 16)
    assert _policy_run(full, lambda n: 120e6, limited=0.05) == [4, 8, 4]
    assert "back to 4" in full.reason and full.phase == "holding"
    loopback = StreamPolicy(4, 16)  # a full window at microseconds of RTT: a slow reader, not the link
    assert _policy_run(loopback, lambda n: 2e9, limited=0.6, rtt=0.00005) == [4]
    assert "in flight per connection" in loopback.reason


def test_a_fixed_count_never_moves():
    policy = StreamPolicy(4, 4)
    assert _policy_run(policy, lambda n: 30e6 * n) == [4] and policy.phase == "fixed"
    with pytest.raises(ValueError, match="bound"):
        StreamPolicy(8, 4)


def test_relative_error():
    assert relative_error(1.1, 1.0) == pytest.approx(0.1)
    assert relative_error(1.0, 0.0) == float("inf")


def test_estimates_serialise():
    e = estimate(costs("raw"), "raw", 1000, link_state(goodput=1e8))
    assert isinstance(e, Estimate) and e.as_dict()["codec"] == "raw"


def test_layer_zero_is_whole_only_once_its_slowest_round_of_chunks_is_in():
    one_chunk = [LayerCost(10_000_000, 10_000_000, chunks=1)] * 4  # one chunk, one connection of four
    first, total, _ = timeline(one_chunk, goodput=100e6, rtt_s=0.0, connections=4)
    assert first == pytest.approx(0.4)  # 10 MB at a quarter of the link
    assert total == pytest.approx(0.4)  # meanwhile the other layers used the rest: the total is unchanged
    five = [LayerCost(10_000_000, 10_000_000, chunks=5)] * 4  # five chunks: two rounds over four connections
    assert timeline(five, goodput=100e6, rtt_s=0.0, connections=4)[0] == pytest.approx(2 * 4 * 2e6 / 100e6)


def test_a_fit_of_completed_transfers_is_planned_with_while_it_agrees_with_the_busy_figure():
    layers = [LayerCost(25_000_000, 25_000_000, 4)] * 4  # 100 MB, 4 chunks a layer (one per connection)
    # busy intervals average slow start in (50 MB/s); completions say 70 MB/s + 0.1 s each
    both = link_state(goodput=50e6, rtt=0.02, overhead=-0.2, fit=(70e6, 0.1, 8))
    e = estimate(layers, "raw", 1000, both)
    assert e.basis == "transfers" and e.uncertainty == 0.08
    assert e.total_s == pytest.approx(100e6 / 70e6 + 0.02 + 0.1)
    assert e.first_layer_s == pytest.approx(25e6 / 50e6 + 0.01)  # layer 0 at the busy figure, in the ramp
    worse = link_state(goodput=40e6, slow=50e6, rtt=0.02, fit=(70e6, 0.1, 8))  # the busy figure falls
    assert estimate(layers, "raw", 1000, worse).goodput == pytest.approx(70e6 * 0.8)
    moved = link_state(goodput=20e6, rtt=0.02, overhead=0.0, fit=(70e6, 0.1, 8))  # another link now
    e = estimate(layers, "raw", 1000, moved)
    assert e.basis == "measured" and e.goodput == 20e6
    few = link_state(goodput=50e6, rtt=0.02, overhead=0.0, fit=(70e6, 0.1, 3))  # too few completions
    assert estimate(layers, "raw", 1000, few).basis == "measured"


def test_layer_zero_is_never_predicted_after_the_whole_transfer():
    """With a fit of completions, layer 0 is priced from the busy figure and the whole
    from the fit; a busy figure below the fit put layer 0 after the acknowledgement."""
    two = [LayerCost(8_000_000, 8_000_000, 1)] * 2
    e = estimate(two, "raw", 100, link_state(goodput=40e6, rtt=0.02, overhead=0.05, fit=(70e6, 0.0, 8)))
    assert e.basis == "transfers"
    assert e.first_layer_s <= e.total_s and e.first_layer_s_high <= e.total_s_high


def test_a_long_lived_policy_keeps_its_last_measurements_only():
    """A measurement every RETRY_S busy seconds, for as long as the sender lives: the
    policy keeps the last ``HISTORY_KEPT`` (about 58 an hour were kept for good, all in
    every stats())."""
    from kvwire.planning import HISTORY_KEPT, RETRY_S

    policy = StreamPolicy(4, 16)
    _policy_run(policy, lambda n: 30e6 * n, seconds=RETRY_S * (HISTORY_KEPT + 20))
    assert len(policy.history) == HISTORY_KEPT == len(policy.as_dict()["measured"])
