"""Planned transfers over real sockets on 127.0.0.1: a codec per transfer, codec="auto",
admission, the link model and the connection policy in the sender's statistics."""

import pytest
import torch

import kvwire
from tests.helpers import SECRET, assert_transferred, filled

LAYOUT = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16)
TOKENS = 200  # 13 blocks, the last one partial


@pytest.fixture
def pair():
    """A receiver and a codec="auto" sender on loopback; their caches."""
    dst = LAYOUT.allocate(64)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst)
    src = filled(LAYOUT, 64)
    tx = kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=2, codec="auto",
                       max_exposed_ms=10_000)  # fmt: skip
    yield rx, tx, src, dst
    tx.close()
    rx.close()


def blocks(i):
    return list(range(i * 13, (i + 1) * 13))


def test_each_transfer_of_a_session_travels_with_its_own_codec(pair):
    rx, tx, src, dst = pair
    assert [c.descriptor for c in tx.codecs] == ["raw", "int8h", "int4a"]
    for i, codec in enumerate(["int4a", "raw", "int8h", "int4a"]):
        for layer in dst:
            for t in layer.values():
                t.zero_()
        h = rx.expect(f"r{i}", blocks(i), TOKENS)
        t = tx.transfer(f"r{i}", blocks(i), TOKENS, codec=codec)
        for layer in range(LAYOUT.num_layers):
            t.send_layer(layer)
        stats = t.finish(timeout=30)
        h.wait(timeout=30)
        assert stats["codec"] == kvwire.codec.get(codec).descriptor
        name = kvwire.codec.get(codec).name
        assert_transferred(LAYOUT, src, blocks(i), dst, blocks(i), TOKENS, name)
        assert stats["wire_bytes"] < stats["logical_bytes"] or name == "raw"


def test_auto_on_a_fast_link_sends_raw_and_says_why(pair):
    rx, tx, src, dst = pair
    for i in range(3):  # the first has no measurement yet: raw, the least lossy
        h = rx.expect(f"a{i}", blocks(i), TOKENS)
        t = tx.transfer(f"a{i}", blocks(i), TOKENS)
        for layer in range(LAYOUT.num_layers):
            t.send_layer(layer)
        stats = t.finish(timeout=30)
        h.wait(timeout=30)
        assert stats["codec"] == "raw"
        assert_transferred(LAYOUT, src, blocks(i), dst, blocks(i), TOKENS, "raw")
    plan = stats["plan"]
    assert plan["codec"] == "raw" and plan["meets"] is not False
    assert "raw" in plan["reason"]
    assert plan["estimate"]["wire_bytes"] == stats["wire_bytes"] == LAYOUT.request_bytes(TOKENS)
    link = tx.link()
    assert link.rtt.value is not None and link.connections == 2
    described = tx.stats()
    assert described["codec"] == "auto" and described["codecs"] == ["raw", "int8h", "int4a"]
    assert described["link"]["connections"] == 2
    assert described["streams_policy"]["bound"] == 16


def test_a_transfer_predicted_to_miss_its_target_is_refused_before_anything_is_sent(pair):
    rx, tx, src, dst = pair
    h = rx.expect("warm", blocks(0), TOKENS)
    tx.send("warm", blocks(0), TOKENS, timeout=30)  # the link model needs one measurement
    h.wait(timeout=30)
    assert tx.link().best_goodput()[1] != "none"
    with pytest.raises(kvwire.TransferWouldMissDeadline, match="refused: no codec meets it") as caught:
        tx.transfer("late", blocks(1), TOKENS, max_exposed_ms=1e-6, refuse_if_late=True)
    assert isinstance(caught.value, kvwire.TransferError)
    estimate = caught.value.estimate
    assert isinstance(estimate, kvwire.Estimate) and estimate.exposed_s > 1e-9
    assert tx.census()["transfers"] == 0 and rx.census()["requests"] == 0
    # the same request with a reachable target goes through
    h = rx.expect("late", blocks(1), TOKENS)
    t = tx.transfer("late", blocks(1), TOKENS, max_exposed_ms=60_000, refuse_if_late=True)
    for layer in range(LAYOUT.num_layers):
        t.send_layer(layer)
    assert t.finish(timeout=30)["plan"]["meets"] is True
    h.wait(timeout=30)


def test_estimate_before_and_after_a_measurement(pair):
    rx, tx, src, dst = pair
    first = tx.estimate(TOKENS, codec="raw")
    assert first.wire_bytes == LAYOUT.request_bytes(TOKENS)
    h = rx.expect("m", blocks(0), TOKENS)
    tx.send("m", blocks(0), TOKENS, timeout=30)
    h.wait(timeout=30)
    e = tx.estimate(TOKENS, codec="int4a", layers_per_s=100.0)
    assert e.codec == "int4a" and e.wire_bytes < first.wire_bytes and e.layers_per_s == 100.0
    assert e.total_s is not None and e.total_s >= LAYOUT.num_layers / 100.0  # the prefill is inside it
    assert tx.estimate(TOKENS, codec="auto").codec == "raw"
    with pytest.raises(ValueError, match="not one of this sender's codecs"):
        tx.estimate(TOKENS, codec="raw+lz4")
    with pytest.raises(ValueError, match="num_tokens"):
        tx.estimate(0)


def test_auto_arguments_are_checked(pair):
    rx, tx, src, dst = pair
    with pytest.raises(ValueError, match="codecs: only with codec='auto'"):
        kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, codecs=["raw"])
    with pytest.raises(ValueError, match="codecs: 'auto' is not a codec"):
        kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, codec="auto", codecs=["raw", "auto"])
    with pytest.raises(ValueError, match="listed twice"):
        kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, codec="auto", codecs=["fp8", "fp8"])
    with pytest.raises(ValueError, match="max_streams"):
        kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=4, max_streams=2)
    with pytest.raises(ValueError, match="max_exposed_ms"):
        tx.transfer("x", blocks(0), TOKENS, max_exposed_ms=-1)
    with pytest.raises(TypeError, match="refuse_if_late"):
        tx.transfer("x", blocks(0), TOKENS, refuse_if_late="yes")
    with pytest.raises(ValueError, match="not one of this sender's codecs"):
        tx.transfer("x", blocks(0), TOKENS, codec="raw+lz4")
    assert tx.census()["transfers"] == 0


def test_a_receiver_must_accept_every_codec_auto_may_choose():
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(8), codecs=["raw", "fp8"])
    try:
        with pytest.raises(kvwire.LayoutMismatch, match="codec '(int8h|int4h)' refused"):
            kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=LAYOUT.allocate(8), codec="auto")
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=LAYOUT.allocate(8), codec="auto",
                           codecs=["raw", "fp8"]) as tx:  # fmt: skip
            assert tx.stats()["codecs"] == ["raw", "fp8"]
    finally:
        rx.close()


def test_an_fp8_cache_may_only_travel_raw_so_auto_offers_raw_alone():
    layout = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float8_e4m3fn)
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(8))
    try:
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=layout.allocate(8), codec="auto") as tx:
            assert tx.stats()["codecs"] == ["raw"]
    finally:
        rx.close()


def test_auto_default_codecs_follow_the_dtype_and_head_dim():
    """auto's default list: raw, int8h, int4a; int4h where a head_dim, or a state's last
    dimension, is no multiple of 8 (int4a packs bit planes over channels); only raw for an
    fp8 cache. A fixed codec that cannot take a state is refused when the sender opens."""
    from kvwire.engine.sender_link import auto_codecs

    def names(dtype, head_dims):
        return [c.descriptor for c in auto_codecs(None, dtype, 64, head_dims)]

    assert names(torch.bfloat16, [128]) == ["raw", "int8h", "int4a"]
    assert names(torch.float16, [64, 12]) == ["raw", "int8h", "int4h"]
    assert names(torch.float8_e4m3fn, [128]) == ["raw"]
    layout = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=2, head_dim=12, block_size=16)
    with kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(4)) as rx:
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=filled(layout, 4), codec="auto") as tx:
            assert [c.descriptor for c in tx.codecs] == ["raw", "int8h", "int4h"]
    # a state travels through the same codec, as rows of its last dimension (12 here)
    hybrid = kvwire.KVLayout.hybrid("LF", 2, 64, state_shape=(3, 4, 12))
    with kvwire.Receiver(hybrid, secret=SECRET, kv_caches=hybrid.allocate(4)) as rx:
        with kvwire.Sender(hybrid, rx.address, secret=SECRET, kv_caches=hybrid.allocate(4), codec="auto") as tx:
            assert [c.descriptor for c in tx.codecs] == ["raw", "int8h", "int4h"]
        with pytest.raises(ValueError, match="codec: head_dim: int4a .* got 12"):
            kvwire.Sender(hybrid, rx.address, secret=SECRET, kv_caches=hybrid.allocate(4), codec="int4a")


def test_estimate_refuses_what_transfer_would(pair):
    """An estimate promises only what a transfer could do: not more tokens than the caches
    hold, not at a pace whose timeline overflows, and not once every connection is lost
    (it said "2.6 ms" for a receiver that had gone)."""
    rx, tx, src, dst = pair
    with pytest.raises(ValueError, match="more than this sender's caches hold"):
        tx.estimate(64 * LAYOUT.block_size + 1)
    for bad in (1e-308, 0.0, float("nan"), 2e9):
        with pytest.raises(ValueError, match="layers_per_s: expected layers per second"):
            tx.estimate(TOKENS, layers_per_s=bad)
    with pytest.raises(ValueError, match="max_exposed_ms: expected milliseconds"):
        tx.estimate(TOKENS, max_exposed_ms=float("inf"))
    rx.close()
    for i in range(len(tx._conns)):
        tx.reset_connection(i)
    with pytest.raises(kvwire.PeerLost, match="no live connection"):
        tx.estimate(TOKENS)


def test_a_single_cpu_codecs_time_is_in_its_estimates_and_kept_out_of_the_links_fit():
    """A sender with one lossy codec on the CPU priced none of its CPU time (only an auto
    sender timed its codecs), and completions of such transfers, bounded by that CPU,
    taught the link model a rate that then priced raw 20 times too slow."""
    dst = LAYOUT.allocate(64)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst)
    try:
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=filled(LAYOUT, 64), codec="int4a") as tx:
            for i in range(6):
                h = rx.expect(f"c{i}", list(range(64)), 1024)
                tx.send(f"c{i}", list(range(64)), 1024, timeout=30)
                h.wait(timeout=30)
            assert tx.link().transfer_goodput.samples == 0
            e = tx.estimate(1024)  # by now the link has a rate (TCP's delivery rate at least)
            cpu = tx._follower._cpu.get(tx.codec.descriptor)  # timed for that estimate, not before
            assert cpu is not None and cpu > 0 and e.total_s is not None
            assert e.total_s >= e.logical_bytes * cpu  # the codec's time is a floor of the whole
    finally:
        rx.close()


def test_a_sender_whose_every_connection_died_stays_without_one():
    """Losing every connection fails the open transfers with PeerLost and ends the
    session; the link follower opened a new connection afterwards, so the sender came
    back or not depending on when its next pass ran. It stays down now: a new Sender
    starts a new session."""
    import time

    dst = LAYOUT.allocate(64)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst)
    try:
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=filled(LAYOUT, 64), streams=2) as tx:
            for i in range(2):
                tx.reset_connection(i)
            time.sleep(1.5)  # three idle passes of the follower at least
            assert tx.stats()["alive_streams"] == 0
            with pytest.raises(kvwire.PeerLost):
                tx.transfer("after", blocks(0), TOKENS)
    finally:
        rx.close()


def test_a_sender_left_with_a_retiring_connection_opens_another():
    """The follower stops opening connections once none is alive; a retiring connection
    is alive but takes no chunk, so losing the kept ones must still bring a new one
    (stopping there wedged the sender: transfers accepted, none sent)."""
    import time

    dst = LAYOUT.allocate(64)
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst)
    try:
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=filled(LAYOUT, 64), streams=2,
                           max_streams=2) as tx:  # fmt: skip
            tx._retire_connections(1)  # the policy wants one fewer: connection 1 retires
            tx.reset_connection(0)  # and the one kept is lost
            time.sleep(1.5)  # several passes of the follower
            h = rx.expect("after", blocks(0), TOKENS)
            tx.send("after", blocks(0), TOKENS, timeout=10)
            h.wait(timeout=10)
    finally:
        rx.close()
