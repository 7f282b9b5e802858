"""The link model and codec="auto" across the emulated wide-area link (root and network
namespaces): the model follows a rate change of the link; auto chooses raw on a fast link
and a smaller codec on a slow one, and the data verifies.

The receiver and the sender run in this process, each made in a thread that entered its
side's network namespace (their sockets, and the threads they start, live there)."""

import os
import threading
import time

import pytest
import torch

import kvwire
from kvwire.bench import netem
from tests.helpers import SECRET, assert_transferred, filled

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root, network namespaces and /dev/net/tun (the emulated link)",
)

LAYOUT = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16)  # 16 KiB a token


def open_pair(link, num_blocks, checksum="crc32c", **sender_kw):
    dst = LAYOUT.allocate(num_blocks)
    src = filled(LAYOUT, num_blocks)
    rx = link.call(
        "b", lambda: kvwire.Receiver(LAYOUT, (link.address_b, 0), secret=SECRET, kv_caches=dst, checksum=checksum)
    )
    try:
        tx = link.call(
            "a", lambda: kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, checksum=checksum, **sender_kw)
        )
    except BaseException:
        rx.close()
        raise
    return rx, tx, src, dst


def transfer(rx, tx, name, blocks, tokens, **kw):
    h = rx.expect(name, blocks, tokens, deadline=120)
    t = tx.transfer(name, blocks, tokens, deadline=120, **kw)
    for layer in range(LAYOUT.num_layers):
        t.send_layer(layer)
    stats = t.finish()
    h.wait(timeout=30)
    return stats


def test_the_link_model_follows_a_rate_change_within_seconds():
    """Transfers back to back over 160 Mbit/s; the link drops to 40 Mbit/s: the goodput
    figure follows within a few seconds (the deadline here is generous: the machine is
    shared), and the drop reads as "worsening" on the way."""
    with netem.EmulatedLink(netem.parse_link("rtt=20ms,rate=160mbit")) as link:
        rx, tx, _, _ = open_pair(link, 64, streams=2, max_streams=2)
        stop = threading.Event()
        errors: list = []

        def load():
            i = 0
            while not stop.is_set():
                try:
                    transfer(rx, tx, f"load-{i}", list(range(32 * (i % 2), 32 * (i % 2) + 32)), 512)  # 8 MiB
                except Exception as exc:
                    errors.append(exc)
                    return
                i += 1

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            before = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until ~3 busy seconds are measured at the first rate
                time.sleep(0.25)
                state = tx.link()
                if state.busy_s >= 3.0:
                    before = state.goodput.value
                    break
            assert before is not None, f"no busy measurement in 30 s: {tx.link()}"
            assert 8e6 < before < 21e6, before  # 160 Mbit/s is 20 MB/s
            link.change(rate_bps=40e6)
            changed = time.monotonic()
            verdicts, followed = set(), None
            while time.monotonic() < changed + 30:
                time.sleep(0.25)
                state = tx.link()
                verdicts.add(state.verdict)
                if state.goodput.value < 0.5 * before and state.goodput.value < 7e6:
                    followed = time.monotonic() - changed
                    break
            assert followed is not None, f"the model did not follow the drop: {tx.link()}"
            assert "worsening" in verdicts
            print(f"followed a 160 -> 40 Mbit/s drop in {followed:.1f} s")  # the figure the docs quote
        finally:
            stop.set()
            loader.join(60)
            tx.close()
            rx.close()
        assert not errors, errors


def test_auto_sends_raw_on_a_fast_link_and_a_smaller_codec_on_a_slow_one():
    """The same request, the same target (1.6 s exposed): raw on loopback; across a
    16 Mbit/s link raw would take ~2 s, so auto takes a lossy codec, and the receiver
    holds exactly what that codec's reference says."""
    tokens, blocks = 256, list(range(16))  # 4 MiB raw
    torch.set_num_threads(1)  # the codecs' CPU cost is timed in this process: one thread, as a server runs them
    dst = LAYOUT.allocate(16)
    src = filled(LAYOUT, 16)
    with kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst) as rx:
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, codec="auto") as tx:
            transfer(rx, tx, "warm", blocks, tokens, codec="raw")
            fast = transfer(rx, tx, "fast", blocks, tokens, max_exposed_ms=1600)
    assert fast["codec"] == "raw" and fast["plan"]["meets"] is True, fast["plan"]
    assert_transferred(LAYOUT, src, blocks, dst, blocks, tokens, "raw")

    with netem.EmulatedLink(netem.parse_link("rtt=20ms,rate=16mbit")) as link:
        rx, tx, src, dst = open_pair(link, 16, codec="auto")
        try:
            transfer(rx, tx, "warm", blocks, tokens, codec="raw")  # ~2 s: the model measures the link
            for layer in dst:
                for t in layer.values():
                    t.zero_()
            slow = transfer(rx, tx, "slow", blocks, tokens, max_exposed_ms=1600)
        finally:
            tx.close()
            rx.close()
    assert slow["codec"] in ("int8h", "int4a"), slow["plan"]
    assert slow["plan"]["meets"] is True and "raw" in slow["plan"]["reason"]
    assert_transferred(LAYOUT, src, blocks, dst, blocks, tokens, kvwire.codec.get(slow["codec"]).name)
    assert slow["wire_bytes"] < fast["wire_bytes"] / 1.8


def test_chunks_go_out_one_per_send_across_a_long_path():
    """Across 20 ms of RTT the link, not the CPU per send, limits: a writer takes one
    chunk at a time (a slow connection never holds several of a layer's tail), though
    chunks queue behind the link. On loopback, without checksums as here, they are
    gathered (tests/test_engine.py)."""
    with netem.EmulatedLink(netem.parse_link("rtt=20ms,rate=160mbit")) as link:
        rx, tx, src, dst = open_pair(link, 16, checksum="none", streams=1, max_streams=1, chunk_bytes=128 << 10)
        try:
            stats = transfer(rx, tx, "long", list(range(16)), 256)  # 4 MiB: 0.2 s at 160 Mbit/s
            conn = tx.stats()["connections"][0]
            gather = tx.gather
        finally:
            tx.close()
            rx.close()
    assert not gather
    assert conn["send_buffer"] is None  # another host: the kernel's autotuning, not local_sndbuf
    assert conn["data_frames"] == conn["data_sends"] == stats["chunks"] == 32
    assert_transferred(LAYOUT, src, list(range(16)), dst, list(range(16)), 256)


def test_chunks_keep_their_default_size_across_a_long_path():
    """chunk_bytes=None is 2 MiB across 20 ms of RTT: the larger chunks of a short path
    (tests/test_engine.py) would stripe a layer over fewer connections where the link,
    not the CPU per frame, limits."""
    from kvwire.engine.sender import DEFAULT_CHUNK_BYTES

    with netem.EmulatedLink(netem.parse_link("rtt=20ms,rate=160mbit")) as link:
        rx, tx, _, _ = open_pair(link, 16, streams=1, max_streams=1)
        try:
            chunk = tx.stats()["chunk_bytes"]
        finally:
            tx.close()
            rx.close()
    assert chunk == DEFAULT_CHUNK_BYTES
