"""Prefill and decode with different tensor parallelism and block sizes, over real sockets.

Every case moves one request from P prefill ranks (each a ShardedSender over its own
shard of the model's caches) to D decode ranks (each a Receiver over its shard), and
checks every decode rank's heads against the whole model's rows: raw bit-exact, the
lossy codecs equal to their CPU reference (per-head scales survive the split)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time

import pytest
import torch

import kvwire
from kvwire import scatter
from kvwire.bench.fixture import head_range, shard_caches
from kvwire.blocks import gather_tokens
from kvwire.engine import lane
from kvwire.engine.chunks import received_rows
from kvwire.layout import Selection
from kvwire.sharding import decode_ranks_served, holders, part_for
from tests.helpers import SECRET, TcpRelay, corrupt_first_checksums, filled, wait_until

GQA8 = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=8, head_dim=32, block_size=16)
GQA2 = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=2, head_dim=32, block_size=16)
MLA = kvwire.KVLayout.mla(num_layers=2, latent_dim=64, block_size=16)
NUM_BLOCKS = 16


def shard(model: kvwire.KVLayout, rank: int, size: int) -> kvwire.KVLayout:
    return model.shard(rank, size)


def run(model, prefill_size, decode_size, codec="raw", prefill_bs=16, decode_bs=16, tokens=50, seed=3, exact=0,
        num_blocks=NUM_BLOCKS, chunk_bytes=4096):  # fmt: skip
    """One request from every prefill rank to every decode rank; returns what is needed to check."""
    model_p = model.with_block_size(prefill_bs)
    src = filled(model_p, num_blocks, seed=seed)
    prefill = [shard(model_p, p, prefill_size) for p in range(prefill_size)]
    decode = [shard(model.with_block_size(decode_bs), d, decode_size) for d in range(decode_size)]
    dst = [layout.allocate(num_blocks * prefill_bs // decode_bs + 2) for layout in decode]
    src_ids = list(range(num_blocks - 1, num_blocks - 1 - (-(-tokens // prefill_bs)), -1))
    dst_ids = list(range(1, 1 + -(-tokens // decode_bs)))
    receivers = [kvwire.Receiver(layout, secret=SECRET, kv_caches=caches) for layout, caches in zip(decode, dst)]
    senders = []
    try:
        handles = [rx.expect("r", dst_ids, tokens, deadline=30) for rx in receivers]
        peers = [rx.address for rx in receivers]
        for layout in prefill:
            caches = shard_caches(src, layout)
            senders.append(kvwire.ShardedSender(layout, peers, secret=SECRET, kv_caches=caches, codec=codec,
                                                streams=2, chunk_bytes=chunk_bytes, exact_tokens=exact))  # fmt: skip
        transfers = [s.transfer("r", src_ids, tokens, deadline=30) for s in senders]
        for t in transfers:
            for i in range(model.num_layers):
                t.send_layer(i)
        stats = [t.finish(timeout=30) for t in transfers]
        for h in handles:
            h.wait(timeout=30)
        lane_frames = sum(rx.stats()["lane_frames"] for rx in receivers)
    finally:
        for s in senders:
            s.close()
        for rx in receivers:
            rx.close()
    check(model_p, src, src_ids, decode, dst, dst_ids, tokens, codec, prefill_bs, decode_bs, exact)
    if codec == "raw" and scatter.available() and lane.available():  # split heads land through the lane too
        assert lane_frames > 0
    return stats


def check(model_p, src, src_ids, decode, dst, dst_ids, tokens, codec_name, prefill_bs, decode_bs, exact=0):
    codec = kvwire.codec.get(codec_name)
    for d, layout in enumerate(decode):
        for i, layer in enumerate(layout.layers):
            for p in layer.paged:
                rows = gather_tokens(src[i][p.name], Selection(tuple(src_ids), tokens), prefill_bs)
                want = received_rows(codec, rows, p.name, prefill_bs, exact)  # the sender's blocks group int4 keys
                want = want[:, head_range(layout, p.name)]
                got = gather_tokens(dst[d][i][p.name], Selection(tuple(dst_ids), tokens), decode_bs)
                same = torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))
                assert same, f"decode rank {d} layer {i} {p.name} ({codec_name})"


# -- who sends what: the rule, without sockets ---------------------------------------------
@pytest.mark.parametrize("kv_heads, prefill_size, decode_size",
                         [(8, 2, 1), (8, 1, 2), (8, 4, 2), (8, 2, 4), (8, 8, 2), (2, 4, 1), (2, 1, 4), (2, 4, 2),
                          (2, 8, 4), (4, 4, 4)])  # fmt: skip
def test_every_decode_head_and_the_whole_tensors_come_from_exactly_one_prefill_rank(kv_heads, prefill_size,
                                                                                    decode_size):  # fmt: skip
    for d in range(decode_size):
        receiver = kvwire.TensorParallel(d, decode_size, kv_heads)
        first, count = receiver.heads
        got = {h: [] for h in range(first, first + count)}
        whole = []
        for p in range(prefill_size):
            part = part_for(kvwire.TensorParallel(p, prefill_size, kv_heads), receiver, has_kv=True, has_whole=True)
            sender_first = kvwire.TensorParallel(p, prefill_size, kv_heads).heads[0]
            for k in range(part.heads):
                assert sender_first + part.sender_first + k == first + part.receiver_first + k
                got[first + part.receiver_first + k].append(p)
            if part.whole:
                whole.append(p)
        assert all(len(senders) == 1 for senders in got.values()), got
        assert whole == [d % prefill_size]
        for h, senders in got.items():
            assert senders[0] in holders(h, prefill_size, kv_heads)


def test_a_prefill_rank_connects_only_to_the_decode_ranks_it_serves():
    assert sorted(decode_ranks_served(GQA8.shard(0, 2), 4)) == [0, 1]
    assert sorted(decode_ranks_served(GQA8.shard(1, 2), 4)) == [2, 3]
    assert sorted(decode_ranks_served(GQA8.shard(3, 8), 2)) == [0]  # its heads are decode rank 0's
    assert sorted(decode_ranks_served(MLA.shard(0, 2), 4)) == [0, 2]  # the latent to d % 2 == 0
    assert sorted(decode_ranks_served(MLA.shard(1, 2), 1)) == []  # rank 0 sends the latent


def test_shards_of_one_model_share_its_fingerprint_and_block_size_is_not_in_it():
    fingerprints = {GQA8.shard(r, s).model_fingerprint() for s in (1, 2, 8) for r in range(s)}
    fingerprints.add(GQA8.with_block_size(64).model_fingerprint())
    assert fingerprints == {GQA8.model_fingerprint()}
    assert GQA8.shard(1, 4).layers[0].paged[0].token_shape == (2, 32)
    assert GQA2.shard(3, 4).tp.heads == (1, 1)  # replicated: ranks 2 and 3 hold head 1
    assert MLA.shard(1, 2).layers[0].paged[0].token_shape == (64,)  # the latent is never split
    with pytest.raises(ValueError, match="do not split evenly"):
        kvwire.KVLayout.gqa(2, 6, 32).shard(0, 4)


# -- transfers over sockets ----------------------------------------------------------------
@pytest.mark.parametrize("prefill_size, decode_size", [(2, 1), (1, 2), (4, 2), (2, 4), (8, 2)])
def test_gqa_eight_heads_between_different_tensor_parallel_sizes(prefill_size, decode_size):
    stats = run(GQA8, prefill_size, decode_size)
    assert sum(s["chunks"] for s in stats) > 0


@pytest.mark.parametrize("prefill_size, decode_size", [(4, 1), (1, 4), (4, 2)])
def test_two_heads_replicated_over_four_ranks(prefill_size, decode_size):
    run(GQA2, prefill_size, decode_size)


@pytest.mark.parametrize("prefill_size, decode_size", [(2, 1), (1, 2)])
def test_mla_latent_from_exactly_one_prefill_rank(prefill_size, decode_size):
    stats = run(MLA, prefill_size, decode_size)
    served = [d for s in stats for d in s["decode_ranks"]]
    assert sorted(served) == list(range(decode_size))  # each decode rank from exactly one prefill rank


@pytest.mark.parametrize("prefill_bs, decode_bs", [(16, 64), (64, 16)])
@pytest.mark.parametrize("tokens", [150, 37])
def test_different_block_sizes_with_partial_last_blocks(prefill_bs, decode_bs, tokens):
    run(GQA8, 1, 1, prefill_bs=prefill_bs, decode_bs=decode_bs, tokens=tokens)
    run(GQA8, 2, 4, prefill_bs=prefill_bs, decode_bs=decode_bs, tokens=tokens)


@pytest.mark.parametrize("codec", ["fp8", "int4/g32", "int4/g32/k64", "int8h", "int4h", "int4h/k64"])
def test_lossy_codecs_keep_their_per_head_scales_across_the_split(codec):
    run(GQA8, 2, 4, codec=codec)
    run(GQA8, 4, 2, codec=codec, prefill_bs=16, decode_bs=64, tokens=130)


@pytest.mark.parametrize("codec", ["fp8", "int4/g32"])
def test_decoded_chunks_that_begin_inside_a_larger_decode_block(codec):
    # The decode's blocks are 4x the prefill's and it gets all its heads from one sender:
    # a decoded chunk (after 16 exact tokens) begins in the middle of one of its blocks.
    run(GQA8, 1, 1, codec=codec, prefill_bs=16, decode_bs=64, tokens=130, exact=16)
    run(GQA8, 2, 4, codec=codec, prefill_bs=16, decode_bs=64, tokens=130, exact=16)


def test_a_shard_senders_estimate_counts_only_the_heads_it_sends():
    """Prefill holds 8 heads, each of two decode ranks 4: each sender's predicted wire
    bytes are those of its 4 heads, exactly what it then sends (raw)."""
    layout, tokens = GQA8, 40
    decode = [shard(GQA8, d, 2) for d in range(2)]
    receivers = [kvwire.Receiver(lay, secret=SECRET, kv_caches=lay.allocate(NUM_BLOCKS)) for lay in decode]
    try:
        with kvwire.ShardedSender(layout, [rx.address for rx in receivers], secret=SECRET,
                                  kv_caches=filled(layout, NUM_BLOCKS), streams=1) as tx:  # fmt: skip
            predicted = {d: s.estimate(tokens).wire_bytes for d, s in tx.senders.items()}
            assert tx.estimate(tokens).wire_bytes == sum(predicted.values())  # what this prefill rank sends
            handles = [rx.expect("r", [0, 1, 2], tokens, deadline=30) for rx in receivers]
            t = tx.transfer("r", [0, 1, 2], tokens, deadline=30, max_exposed_ms=60_000, refuse_if_late=True)
            for i in range(layout.num_layers):
                t.send_layer(i)
            sent = {d: h.finish(timeout=30)["wire_bytes"] for d, h in t.handles.items()}
            assert all(h.plan_choice is not None for h in t.handles.values())  # each rank's link planned
            for h in handles:
                h.wait(timeout=30)
    finally:
        for rx in receivers:
            rx.close()
    whole = tokens * layout.num_layers * 2 * 8 * 32 * 2  # k and v, 8 heads of 32 bf16 values
    assert predicted == sent == {0: whole // 2, 1: whole // 2}


def test_a_sharded_estimate_is_the_latest_of_its_ranks_in_every_time():
    """Decode has layer 0 once every rank has it: a sharded estimate took one rank's
    whole prediction (the one with the latest total), whose layer 0 or slow end could be
    earlier than another rank's."""
    import dataclasses

    from kvwire.planning import Estimate

    decode = [shard(GQA8, d, 2) for d in range(2)]
    receivers = [kvwire.Receiver(lay, secret=SECRET, kv_caches=lay.allocate(NUM_BLOCKS)) for lay in decode]
    try:
        with kvwire.ShardedSender(GQA8, [rx.address for rx in receivers], secret=SECRET,
                                  kv_caches=filled(GQA8, NUM_BLOCKS), streams=1) as tx:  # fmt: skip
            base = Estimate(40, "raw", 100, 100, None, 1e9, 0.01, 0, "measured", 0.1, *([0.0] * 6))
            given = {0: dataclasses.replace(base, first_layer_s=0.5, total_s=1.0, exposed_s_high=3.0),
                     1: dataclasses.replace(base, first_layer_s=0.2, total_s=2.0, exposed_s_high=2.5)}  # fmt: skip
            for d, sender in tx.senders.items():
                sender.estimate = lambda n, e=given[d], **kw: e
            e = tx.estimate(40)
            assert (e.first_layer_s, e.total_s, e.exposed_s_high, e.wire_bytes) == (0.5, 2.0, 3.0, 200)
            tx.senders[1].estimate = lambda n, **kw: dataclasses.replace(base, basis="none", total_s=None)
            assert tx.estimate(40).total_s is None  # a rank that cannot predict: nothing is known
    finally:
        for rx in receivers:
            rx.close()


def test_a_prefill_rank_that_serves_a_decode_rank_nothing_is_told_so():
    rx = kvwire.Receiver(GQA8.shard(0, 2), secret=SECRET, kv_caches=GQA8.shard(0, 2).allocate(4))
    try:
        layout = GQA8.shard(1, 2)  # holds heads 4..7; decode rank 0 holds 0..3
        with pytest.raises(ValueError, match="gets nothing from prefill rank 1 of 2"):
            kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=layout.allocate(4))
    finally:
        rx.close()


# -- one of several senders dies: the request fails as one ---------------------------------
def prefill_rank_process(model_dict, rank, size, peers, ready):
    """Prefill rank ``rank``: sends layer 0 of request "dies", then hangs until killed."""
    model = kvwire.KVLayout.from_dict(model_dict)
    layout = model.shard(rank, size)
    caches = shard_caches(filled(model, NUM_BLOCKS, seed=9), layout)
    with kvwire.ShardedSender(layout, peers, secret=SECRET, kv_caches=caches, streams=2) as tx:
        t = tx.transfer("dies", [0, 1, 2], 40, deadline=60)
        t.send_layer(0)
        ready.set()
        time.sleep(600)


def test_one_decode_rank_failing_fails_the_one_to_many_transfer_at_once():
    """Decode rank 1 cancels while rank 0 has not even expected the request: finish() and
    done() see rank 1's failure when it comes, not at rank 0's deadline; rank 0's part is
    cancelled with it, and the error names decode rank 1."""
    decode = [kvwire.Receiver(GQA8.shard(d, 2), secret=SECRET, kv_caches=GQA8.shard(d, 2).allocate(8))
              for d in range(2)]  # fmt: skip
    try:
        with kvwire.ShardedSender(GQA8, [r.address for r in decode], secret=SECRET, kv_caches=filled(GQA8, 8),
                                  streams=1) as tx:  # fmt: skip
            decode[1].expect("one", [0, 1], 20).cancel("decode rank 1 gave up")
            t = tx.transfer("one", [2, 3], 20, deadline=30)
            for layer in range(GQA8.num_layers):
                t.send_layer(layer)
            t0 = time.monotonic()
            with pytest.raises(kvwire.Cancelled, match="decode rank 1"):
                t.finish()
            assert time.monotonic() - t0 < 10
            assert t.done() and t.handles[0].done()
            assert "decode rank 1 of the same transfer failed" in t.stats()["per_rank"][0]["error"]
    finally:
        for r in decode:
            r.close()


GQA8_4 = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=8, head_dim=32, block_size=16)


@contextlib.contextmanager
def decode_ranks(model: kvwire.KVLayout, size: int, num_blocks: int = 8):
    """``size`` decode ranks of ``model``, each a Receiver over its shard, closed after."""
    receivers = [kvwire.Receiver(model.shard(d, size), secret=SECRET, kv_caches=model.shard(d, size).allocate(
        num_blocks)) for d in range(size)]  # fmt: skip
    try:
        yield receivers
    finally:
        for rx in receivers:
            rx.close()


@pytest.mark.parametrize("after", ["done", "stats"])
def test_a_prefill_that_saw_a_rank_fail_streams_on_and_finish_names_the_rank(after):
    """A prefill polls the transfer between layers. Once decode rank 1 has failed, its
    later layers are taken and dropped for every rank (as a SendHandle does), rank 0's part
    is cancelled, and finish() raises rank 1's failure, whether the prefill sent the rest
    (after done()) or stopped streaming when stats() showed the error."""
    with (
        decode_ranks(GQA8_4, 2) as decode,
        kvwire.ShardedSender(
            GQA8_4, [r.address for r in decode], secret=SECRET, kv_caches=filled(GQA8_4, 8), streams=1
        ) as tx,
    ):
        h0 = decode[0].expect("one", [0, 1], 20, deadline=30)
        decode[1].expect("one", [0, 1], 20).cancel("decode rank 1 gave up")
        t = tx.transfer("one", [2, 3], 20, deadline=30)
        t.send_layer(0)
        seen = t.done if after == "done" else (lambda: t.stats()["error"] is not None)
        assert wait_until(seen, timeout=10)
        if after == "done":
            for layer in range(1, GQA8_4.num_layers):
                t.send_layer(layer)  # dropped, not refused
        t0 = time.monotonic()
        with pytest.raises(kvwire.Cancelled, match=r"decode rank 1 \(127\.0\.0\.1:\d+\)"):
            t.finish()
        assert time.monotonic() - t0 < 5
        assert t.handles[0].done() and "decode rank 1 of the same transfer failed" in t.handles[0].stats()["error"]
        with pytest.raises(kvwire.Cancelled):
            h0.wait(timeout=10)  # told at once, not at its deadline


def test_a_rank_that_fails_cancels_the_others_while_the_prefill_looks_elsewhere():
    """Decode rank 1 gives up mid-transfer; the prefill neither polls nor waits (it is
    computing its next layers). Rank 0's part is cancelled anyway, at once: its decode's
    handle fails naming rank 1, instead of receiving data nobody will use."""
    with (
        decode_ranks(GQA8_4, 2) as decode,
        kvwire.ShardedSender(
            GQA8_4, [r.address for r in decode], secret=SECRET, kv_caches=filled(GQA8_4, 8), streams=1
        ) as tx,
    ):
        h0, h1 = (rx.expect("one", [0, 1], 20, deadline=30) for rx in decode)
        t = tx.transfer("one", [2, 3], 20, deadline=30)
        t.send_layer(0)
        h1.cancel("decode rank 1 gave up")
        with pytest.raises(kvwire.Cancelled, match="decode rank 1 of the same transfer failed"):
            h0.wait(timeout=5)
        assert t.handles[0].done()


def test_the_callers_cancel_reaches_every_decode_rank_with_its_own_reason():
    with (
        decode_ranks(GQA8_4, 2) as decode,
        kvwire.ShardedSender(
            GQA8_4, [r.address for r in decode], secret=SECRET, kv_caches=filled(GQA8_4, 8), streams=1
        ) as tx,
    ):
        handles = [rx.expect("one", [0, 1], 20, deadline=30) for rx in decode]
        t = tx.transfer("one", [2, 3], 20, deadline=30)
        t.send_layer(0)
        t.cancel("the prefill gave up")
        for h in handles:
            with pytest.raises(kvwire.Cancelled, match="the prefill gave up"):
                h.wait(timeout=10)


def test_a_send_layer_refused_for_one_decode_rank_is_taken_by_none():
    """Prefill rank 1 of 4 of a hybrid model sends head 1 to decode rank 0 and the state to
    decode rank 1. A layer sent without its state is refused before either rank takes it,
    so the corrected call goes through and the transfer completes."""
    model = kvwire.KVLayout.hybrid("LF", num_kv_heads=4, head_dim=32, state_shape=(2, 8, 8))
    layout = model.shard(1, 4)
    with (
        decode_ranks(model, 2) as decode,
        kvwire.ShardedSender(
            layout,
            [rx.address for rx in decode],
            secret=SECRET,
            kv_caches=shard_caches(filled(model, 8), layout),
            streams=1,
        ) as tx,
    ):
        assert tx.served[0].heads == 1 and tx.served[1].whole
        t = tx.transfer("r", [0, 1], 20, deadline=10)
        with pytest.raises(ValueError, match="has a state"):
            t.send_layer(0)
        assert all(not h._sent_layers for h in t.handles.values())
        t.send_layer(0, torch.zeros(2, 8, 8, dtype=model.dtype))
        t.send_layer(1)
        t.cancel()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"max_exposed_mss": 5}, TypeError),
        ({"codec": "no-such-codec"}, ValueError),
        ({"refuse_if_late": "yes"}, TypeError),
        ({"states": {7: torch.zeros(1)}}, ValueError),
        ({"num_tokens": 0}, ValueError),
        ({"block_ids": [10**9]}, ValueError),
        ({"layers_per_s": -1}, ValueError),
    ],
)
def test_a_prefill_rank_that_serves_no_decode_rank_checks_its_arguments_all_the_same(kwargs, error):
    """MLA prefill rank 1 of 2 sends nothing to a single decode rank (rank 0 sends the
    latent), so its transfers are done at once; its arguments are refused as its
    sibling's would be, so one prefill's code behaves alike on every rank."""
    mla = MLA.shard(1, 2)
    with kvwire.ShardedSender(mla, ["127.0.0.1:1"], secret=SECRET, kv_caches=mla.allocate(4)) as tx:
        assert tx.senders == {}
        args = {"block_ids": [0], "num_tokens": 3} | kwargs
        with pytest.raises(error):
            tx.transfer("r", args.pop("block_ids"), args.pop("num_tokens"), **args)
        assert tx.transfer("r", [0], 3).done()


def test_a_prefill_rank_that_begins_after_its_sibling_was_lost_is_told_at_once():
    """2 -> 1: prefill rank 1 begins, then its connections are cut and the decode's handle
    fails. Rank 0, a little behind, begins after that: it fails at once naming rank 1, not
    at its own deadline (the receiver used to take its BEGIN for a new request)."""
    decode = GQA8.shard(0, 1)
    rx = kvwire.Receiver(decode, secret=SECRET, kv_caches=decode.allocate(8))
    src = filled(GQA8, 8, seed=9)
    relay = TcpRelay(rx.address)
    l0, l1 = GQA8.shard(0, 2), GQA8.shard(1, 2)
    tx0 = kvwire.ShardedSender(l0, [rx.address], secret=SECRET, kv_caches=shard_caches(src, l0), streams=1)
    tx1 = kvwire.ShardedSender(l1, [relay.address], secret=SECRET, kv_caches=shard_caches(src, l1), streams=1)
    try:
        h = rx.expect("r", [4, 5, 6], 40, deadline=60)
        tx1.transfer("r", [0, 1, 2], 40, deadline=60).send_layer(0)
        assert wait_until(lambda: rx.census()["requests"] == 1, timeout=5)  # rank 1's BEGIN is in
        relay.close()
        with pytest.raises(kvwire.PeerLost, match="rank 1 of 2"):
            h.wait(timeout=10)
        t0 = time.monotonic()
        with pytest.raises(kvwire.Cancelled, match="rank 1 of 2"):
            tx0.transfer("r", [0, 1, 2], 40, deadline=30).send_all()
        assert time.monotonic() - t0 < 5
        census = rx.census()
        assert census["requests"] == 0 and census["parked_chunks"] == 0
    finally:
        tx0.close()
        tx1.close()
        rx.close()
        relay.close()


def test_one_prefill_rank_killed_fails_the_many_to_one_transfer_on_every_side():
    decode = GQA8.shard(0, 1)
    dst = decode.allocate(8)
    rx = kvwire.Receiver(decode, secret=SECRET, kv_caches=dst)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=prefill_rank_process, args=(GQA8.to_dict(), 1, 2, [rx.address], ready))
    try:
        h = rx.expect("dies", [4, 5, 6], 40, deadline=60)
        layout = GQA8.shard(0, 2)
        with kvwire.ShardedSender(layout, [rx.address], secret=SECRET,
                                  kv_caches=shard_caches(filled(GQA8, NUM_BLOCKS, seed=9), layout)) as tx:  # fmt: skip
            t = tx.transfer("dies", [0, 1, 2], 40, deadline=60)
            t.send_layer(0)  # rank 0 sends layer 0 and waits for its layer 1, as a prefill would
            proc.start()
            assert ready.wait(60)
            time.sleep(0.2)
            os.kill(proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(kvwire.PeerLost, match=r"tensor-parallel rank 1 of 2|connections of"):
                h.wait(timeout=20)
            assert time.monotonic() - t0 < 5
            # rank 0's part is cancelled by the receiver: it learns within the same bound
            end = time.monotonic() + 5
            while not t.done() and time.monotonic() < end:
                time.sleep(0.01)
            with pytest.raises(kvwire.Cancelled, match="decode rank 0"):
                t.finish(timeout=1)
    finally:
        proc.kill()
        proc.join()
        rx.close()
    assert all(bool((t[:4] == 0).all()) and bool((t[7:] == 0).all()) for layer in dst for t in layer.values())


@pytest.mark.parametrize("spans", [True, False])
@pytest.mark.parametrize("prefill_size, decode_size", [(2, 1), (1, 2)])
def test_split_heads_move_as_spans_or_through_a_copy(spans, prefill_size, decode_size, monkeypatch):
    """A chunk of some heads of each token is one span per token: with the compiled
    helper it is sent from (1 -> 2) or received into (2 -> 1) those spans, checked
    there; without it, through a staging copy. Both deliver the same bytes."""
    if spans and not scatter.available():
        pytest.skip("the compiled helper kvwire._scatter is not built in this environment")
    used = {"send": 0, "recv": 0}
    send, recv = scatter.send_parts, scatter.recv_spans

    def counted_send(*args):
        used["send"] += 1
        return send(*args)

    def counted_recv(*args):
        used["recv"] += 1
        return recv(*args)

    monkeypatch.setattr(scatter, "available", lambda: spans)
    monkeypatch.setattr(scatter, "send_parts", counted_send)
    monkeypatch.setattr(scatter, "recv_spans", counted_recv)
    run(GQA8, prefill_size, decode_size, tokens=150)
    layout = GQA8.shard(0, 2)
    with kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(1)) as rx:
        assert rx.stats()["spans"] is spans
    if not spans:
        assert used == {"send": 0, "recv": 0}
    elif prefill_size == 1:  # the sender holds more heads than each part: it sends spans
        assert used["send"] > 0
    else:  # the receiver holds more heads than each part: it receives into spans
        assert used["recv"] > 0


@pytest.mark.parametrize("decode_size", [2, 4])
def test_one_prefill_rank_reads_each_row_once_for_every_decode_ranks_checksum(decode_size):
    """1 -> 2 and 1 -> 4 with spans: each group of chunks cut from the same rows for the
    decode ranks has its CRCs computed once, in one pass (the first writer to ask), and
    the other writers take theirs or wait for it; every head arrives exact."""
    if not scatter.available():
        pytest.skip("the compiled helper kvwire._scatter is not built in this environment")
    tokens = 150
    src = filled(GQA8, NUM_BLOCKS, seed=4)
    decode = [shard(GQA8, d, decode_size) for d in range(decode_size)]
    dst = [layout.allocate(NUM_BLOCKS + 2) for layout in decode]
    src_ids, dst_ids = list(range(NUM_BLOCKS - 1, 5, -1)), list(range(1, 11))
    receivers = [kvwire.Receiver(layout, secret=SECRET, kv_caches=caches) for layout, caches in zip(decode, dst)]
    try:
        with kvwire.ShardedSender(GQA8, [rx.address for rx in receivers], secret=SECRET, kv_caches=src, streams=2,
                                  chunk_bytes=4096) as sender:  # fmt: skip
            assert sender.row_checksums is not None
            for r in range(2):
                handles = [rx.expect(f"r{r}", dst_ids, tokens, deadline=30) for rx in receivers]
                chunks = sender.transfer(f"r{r}", src_ids, tokens, deadline=30).send_all(timeout=30)["chunks"]
                for h in handles:
                    h.wait(timeout=30)
                check(GQA8, src, src_ids, decode, dst, dst_ids, tokens, "raw", 16, 16)
            counts = sender.row_checksums.counts
    finally:
        for rx in receivers:
            rx.close()
    assert chunks % decode_size == 0
    assert counts["computed"] == 2 * chunks // decode_size  # two requests
    assert counts["computed"] + counts["taken"] + counts["waited"] == 2 * chunks and counts["alone"] == 0


def test_checksums_computed_together_fall_back_to_each_ones_own(monkeypatch):
    """The joint pass failing (it never should) costs each writer its own CRC, not a dead
    writer: the transfer completes, every head exact, nothing asked for again."""
    if not scatter.available():
        pytest.skip("the compiled helper kvwire._scatter is not built in this environment")
    from kvwire.engine import placement

    def broken(spans):
        raise RuntimeError("a broken joint pass")

    monkeypatch.setattr(placement, "crc32c_together", broken)
    stats = run(GQA8, 1, 2, tokens=150)
    assert sum(s["nacked_chunks"] for s in stats) == 0


def test_row_checksums_keep_and_remember_bounded_groups():
    """Groups past ``KEEP`` are dropped: their late writers compute their own CRC alone;
    groups past ``REMEMBER`` are forgotten: a late writer starts a joint pass again. The
    CRC is right every way."""
    if not scatter.available():
        pytest.skip("the compiled helper kvwire._scatter is not built in this environment")
    import numpy as np

    from kvwire.engine.placement import RowChecksums

    rows = np.random.default_rng(2).integers(0, 256, (64, 256), dtype=np.uint8)  # 64 rows, two halves

    def spans(heads):
        first = heads[0] * 128
        iov = np.array([[rows.ctypes.data + r * 256 + first, 128] for r in range(64)], dtype=np.uint64)
        return scatter.Spans(iov, rows)

    a, b = (0, 1), (1, 1)
    want = {h: spans(h).crc32c() for h in (a, b)}
    rc = RowChecksums([a, b])
    rc.KEEP, rc.REMEMBER = 1, 2
    assert rc.checksum(("g1",), a, spans(a), spans) == want[a]  # computes both, keeps b's
    assert rc.checksum(("g2",), a, spans(a), spans) == want[a]  # g1 dropped (KEEP 1)
    assert rc.checksum(("g1",), b, spans(b), spans) == want[b]  # late: alone
    assert rc.counts == {"computed": 2, "taken": 0, "waited": 0, "alone": 1}
    assert rc.checksum(("g2",), b, spans(b), spans) == want[b]  # kept: taken
    assert rc.checksum(("g3",), a, spans(a), spans) == want[a]  # remembers g2, g3: g1 forgotten
    assert rc.checksum(("g1",), b, spans(b), spans) == want[b]  # forgotten: a joint pass again
    assert rc.counts == {"computed": 4, "taken": 1, "waited": 0, "alone": 1}


def test_row_checksums_take_two_to_eight_distinct_head_ranges():
    from kvwire.engine.placement import RowChecksums

    for ranges in ([(0, 1)], [(0, 1), (0, 1)], [(h, 1) for h in range(scatter.TOGETHER_MAX + 1)]):
        with pytest.raises(ValueError, match="distinct ranges"):
            RowChecksums(ranges)
    assert RowChecksums([(0, 4), (4, 4)]).head_ranges == [(0, 4), (4, 4)]


def test_prefill_ranks_that_each_serve_one_decode_rank_share_no_checksums():
    layout = GQA8.shard(0, 2)  # 2 -> 1: this rank's heads all go to the one decode rank
    with kvwire.Receiver(GQA8, secret=SECRET, kv_caches=GQA8.allocate(4)) as rx:
        with kvwire.ShardedSender(layout, [rx.address], secret=SECRET, kv_caches=layout.allocate(4)) as sender:
            assert sender.row_checksums is None


def test_a_sender_of_the_state_alone_does_not_stop_its_siblings_sharing_checksums():
    """Hybrid model, 8 heads, 2 -> 4: prefill rank 0 sends heads to decode ranks 0 and 1
    and only the state to decode rank 2 (the rank that holds the state's whole tensors
    for it). The two that read rows share their checksums; the third reads no rows."""
    if not scatter.available():
        pytest.skip("the compiled helper kvwire._scatter is not built in this environment")
    model = kvwire.KVLayout.hybrid("LF", num_kv_heads=8, head_dim=32, state_shape=(2, 8, 8))
    layout = model.shard(0, 2)
    with (
        decode_ranks(model, 4, num_blocks=4) as decode,
        kvwire.ShardedSender(
            layout, [rx.address for rx in decode], secret=SECRET, kv_caches=layout.allocate(4)
        ) as sender,
    ):
        assert sender.served[2].heads == 0 and sender.served[2].whole
        assert sender.row_checksums is not None and sender.row_checksums.head_ranges == [(0, 2), (2, 2)]


@pytest.mark.parametrize("why", ["no spans", "replicated heads", "different chunk sizes"])
def test_senders_that_would_not_cut_alike_share_no_checksums(why, monkeypatch):
    """Sharing needs every sender to send spans of some heads of every token and to cut
    the same rows: not without the helper, not when heads are replicated over decode ranks
    (two ranks ask for the same heads), not when one receiver's frames cut chunks smaller."""
    model, decode_size = (GQA2, 4) if why == "replicated heads" else (GQA8, 2)
    if why == "no spans":
        monkeypatch.setattr(scatter, "available", lambda: False)
    elif not scatter.available():
        pytest.skip("the compiled helper kvwire._scatter is not built in this environment")
    decode = [model.shard(d, decode_size) for d in range(decode_size)]
    slots = [None, 256 << 10] if why == "different chunk sizes" else [None] * decode_size
    receivers = [kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(4),
                                 **({"slot_bytes": slot} if slot else {}))
                 for layout, slot in zip(decode, slots)]  # fmt: skip
    try:
        with kvwire.ShardedSender(model, [rx.address for rx in receivers], secret=SECRET,
                                  kv_caches=model.allocate(4)) as sender:  # fmt: skip
            assert len(sender.senders) == decode_size and sender.row_checksums is None
    finally:
        for rx in receivers:
            rx.close()


@pytest.mark.parametrize("prefill_size, decode_size", [(2, 1), (1, 2)])
def test_split_heads_that_fail_their_checksum_are_asked_for_again(prefill_size, decode_size, monkeypatch):
    """The first payloads carry a wrong CRC (as if corrupted on the way): the receiver
    (into spans for 2 -> 1, in place for 1 -> 2) asks for each again, the sender sends it
    again from the cache (as spans for 1 -> 2), and every head arrives exact."""
    corrupt_first_checksums(monkeypatch, 3)
    stats = run(GQA8, prefill_size, decode_size, tokens=150)
    assert sum(s["nacked_chunks"] for s in stats) == 3


# Half rows of 128 B (pieces cut at 1024 spans), 256 B, 2 KiB, and 320 B and 768 B (spans
# cut between two pieces)
@pytest.mark.parametrize("head_dim", [16, 32, 256, 40, 96])
@pytest.mark.parametrize("corrupted", [0, 2])
def test_half_rows_of_large_chunks_are_received_and_checked_piece_by_piece(head_dim, corrupted, monkeypatch):
    """2 -> 1 in chunks of up to 512 KiB of half rows: the receive lane receives such a
    payload and checks it a piece at a time (at most 256 KiB or 1024 spans, the last
    piece partial; kvwire/_scatter.c, recv_checked); every byte lands, and payloads whose
    CRC does not match are asked for again."""
    corrupt_first_checksums(monkeypatch, corrupted)
    model = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=8, head_dim=head_dim, block_size=16)
    stats = run(model, 2, 1, tokens=2000, num_blocks=128, chunk_bytes=512 << 10)
    assert sum(s["nacked_chunks"] for s in stats) == corrupted
