"""The UCX transport (through UCXX) carries the same protocol: the TCP transfer tests,
again over UCX on loopback (UCX_TLS=tcp, UCX_NET_DEVICES=lo)."""

import multiprocessing
import os
import signal
import time

import pytest
import torch

import kvwire

try:
    import ucxx  # noqa: F401
except ImportError:
    pytest.skip("ucxx is not installed (pip install 'kvwire[ucx]')", allow_module_level=True)

from tests.helpers import SECRET, assert_transferred, filled, random_states, sender_process  # noqa: E402
from tests.test_engine import LAYOUTS  # noqa: E402


@pytest.fixture
def ucx_receiver():
    made = []

    def make(layout, num_blocks=64, **kw):
        dst = layout.allocate(num_blocks)
        rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=dst, transport="ucx", **kw)
        made.append(rx)
        return rx, dst

    yield make
    for rx in made:
        rx.close()


def ucx_sender(layout, rx, src, **kw):
    kw.setdefault("streams", 2)
    return kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=src, transport="ucx", **kw)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_raw_over_ucx_is_bit_exact(name, ucx_receiver):
    layout = LAYOUTS[name]
    rx, dst = ucx_receiver(layout)
    src = filled(layout, 64)
    src_states, dst_states = random_states(layout), {i: torch.zeros_like(t) for i, t in random_states(layout).items()}
    n = 4 * layout.block_size + 5
    h = rx.expect("r", [60, 2, 30, 31, 7], n, states=dst_states)
    with ucx_sender(layout, rx, src, chunk_bytes=16 << 10) as tx:
        tx.send("r", [9, 10, 11, 40, 3], n, states=src_states, timeout=30)
        conns = tx.stats()["connections"]
        assert {c["transport"] for c in conns} == {"ucx"}
        assert {c["path"] for c in conns} == {"host memory (staged)"}  # CPU caches: never device-direct
    h.wait(timeout=10)
    assert_transferred(layout, src, [9, 10, 11, 40, 3], dst, [60, 2, 30, 31, 7], n, "raw", src_states, dst_states)


@pytest.mark.parametrize("codec", ["fp8", "int4+lz4"])
def test_codecs_over_ucx(codec, ucx_receiver):
    layout = LAYOUTS["gqa"]
    rx, dst = ucx_receiver(layout)
    src = filled(layout, 64, seed=2)
    h = rx.expect("c", [1, 2, 3], 70)
    with ucx_sender(layout, rx, src, codec=codec) as tx:
        tx.send("c", [5, 6, 7], 70, timeout=30)
    h.wait(timeout=10)
    assert_transferred(layout, src, [5, 6, 7], dst, [1, 2, 3], 70, codec)


def test_64_concurrent_requests_over_ucx(ucx_receiver):
    layout = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
    rx, dst = ucx_receiver(layout, num_blocks=128)
    src = filled(layout, 128, seed=3)
    reqs = [(f"q{i}", [2 * i, 2 * i + 1], 20 + i % 12) for i in range(64)]
    handles = [rx.expect(rid, [127 - b for b in blocks], n) for rid, blocks, n in reqs]
    with ucx_sender(layout, rx, src, streams=3, chunk_bytes=4096) as tx:
        transfers = [tx.transfer(rid, blocks, n) for rid, blocks, n in reqs]
        for layer in range(layout.num_layers):
            for t in transfers:
                t.send_layer(layer)
        for t in transfers:
            t.finish(timeout=60)
    for h in handles:
        h.wait(timeout=10)
    for _, blocks, n in reqs:
        assert_transferred(layout, src, blocks, dst, [127 - b for b in blocks], n)


def test_wrong_secret_and_wrong_layout_over_ucx(ucx_receiver):
    layout = LAYOUTS["mha"]
    rx, _ = ucx_receiver(layout)
    with pytest.raises(kvwire.AuthenticationFailed):
        kvwire.Sender(layout, rx.address, secret="not-the-secret", kv_caches=layout.allocate(4), transport="ucx")
    other = kvwire.KVLayout.gqa(num_layers=3, num_kv_heads=4, head_dim=64, block_size=32)
    with pytest.raises(kvwire.LayoutMismatch):
        kvwire.Sender(other, rx.address, secret=SECRET, kv_caches=other.allocate(4), transport="ucx")


def test_sender_that_disappears_over_ucx(ucx_receiver):
    layout = LAYOUTS["mha"]
    rx, dst = ucx_receiver(layout)
    h = rx.expect("proc-req", [4, 5, 6], 40)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=sender_process,
                    args=(rx.address, layout.to_dict(), 64, 3, [0, 1, 2], 40, 1, "raw", ready, "ucx"))  # fmt: skip
    p.start()
    try:
        assert ready.wait(60)
        h.wait_layer(0, timeout=20)
        os.kill(p.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(kvwire.PeerLost):
            h.wait(timeout=30)
        assert time.monotonic() - t0 < 30
    finally:
        p.kill()
        p.join()


def test_transport_errors_name_the_problem():
    layout = LAYOUTS["mha"]
    with pytest.raises(ValueError, match="transport"):
        kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(4), transport="carrier-pigeon")
    import ssl

    with pytest.raises(ValueError, match="tls"):
        kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(4), transport="ucx",
                        tls=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))  # fmt: skip


def test_missing_ucxx_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ucxx", None)  # as if it were not installed
    layout = LAYOUTS["mha"]
    with pytest.raises(ImportError, match=r"pip install 'kvwire\[ucx\]'"):
        kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(4), transport="ucx")


def test_ucx_on_loopback_here_has_no_cuda_transport():
    """On this CPU-only loopback setup (UCX_TLS=tcp) UCX cannot move device memory, so the
    engine never asks for device payloads; the check itself must not fail without CUDA."""
    from kvwire.transport import ucx

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/test_gpu.py checks the device path there")
    assert ucx.moves_device_memory("127.0.0.1") is False
