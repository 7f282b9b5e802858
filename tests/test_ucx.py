"""What only the UCX transport has: its errors, its import hint, its device-memory check.

The transfer and fault tests run over UCX too (loopback, UCX_TLS=tcp, UCX_NET_DEVICES=lo):
they are parametrized over ``tests.helpers.TRANSPORTS`` in test_engine.py and
test_faults.py."""

import pytest
import torch

import kvwire

try:
    import ucxx  # noqa: F401
except ImportError:
    pytest.skip("ucxx is not installed (pip install 'kvwire[ucx]')", allow_module_level=True)

from tests.helpers import SECRET  # noqa: E402
from tests.test_engine import LAYOUTS  # noqa: E402


def test_ucx_streams_are_byte_streams():
    from kvwire.transport import ByteStream
    from kvwire.transport.tcp import TcpStream
    from kvwire.transport.ucx import UcxStream

    methods = [name for name in vars(ByteStream) if not name.startswith("_") and callable(getattr(ByteStream, name))]
    assert {"send_parts", "send_control", "flush_control", "recv_into_exact", "close"} <= set(methods)
    for stream in (UcxStream, TcpStream):
        assert all(callable(getattr(stream, name, None)) for name in methods), stream


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


@pytest.fixture
def emulated_gpu(monkeypatch):
    """The engine's GPU-direct path on this machine: the kernels' host emulation in place
    of the GPU (passed as ``kernels=``), host tensors in place of device memory, and a UCX
    that says it moves device memory. Returns the backend."""
    import shutil

    from kvwire.cuda import kernels
    from kvwire.transport import ucx

    if shutil.which("g++") is None:
        pytest.skip("needs g++ to build the host emulation")
    monkeypatch.setattr(ucx, "moves_device_memory", lambda host=None: True)
    return kernels.EmulatedBackend.build()


@pytest.mark.parametrize("codec, exact", [("raw", 0), ("fp8", 0), ("int4/g64/k64", 0), ("fp8", 16)])
def test_the_device_payload_path_on_the_host_emulation(codec, exact, emulated_gpu):
    """The GPU-direct path end to end over real UCX, with the kernels' host emulation in
    place of the GPU and host tensors in place of device memory: the handshake agrees on
    device payloads, each payload travels as its own message, the receiver checks it with
    kvw_crc32c and decodes it with the kernels. (On a GPU: tests/test_gpu.py.)"""
    from tests.helpers import assert_transferred, expected_tokens, filled, tokens

    layout = LAYOUTS["mha"]
    dst = layout.allocate(16)
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=dst, transport="ucx", kernels=emulated_gpu)
    try:
        src = filled(layout, 16, seed=7)
        h = rx.expect("d", [9, 3, 4], 40)
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=src, codec=codec, streams=2,
                           transport="ucx", chunk_bytes=8 << 10, exact_tokens=exact,
                           kernels=emulated_gpu) as tx:  # fmt: skip
            tx.send("d", [1, 2, 5], 40, timeout=60)
            paths = {c["path"] for c in tx.stats()["connections"]}
        h.wait(timeout=10)
        stats = rx.stats()
    finally:
        rx.close()
    assert paths == {"device memory (direct)"}
    assert stats["device_payloads"] == stats["frames"] > 0
    if not exact:
        assert_transferred(layout, src, [1, 2, 5], dst, [9, 3, 4], 40, codec)
        return
    for i in range(layout.num_layers):  # the first block raw (flagged DATA), the rest fp8
        for name in ("k", "v"):
            a, b = tokens(src[i][name], [1, 2, 5], 40, 16), tokens(dst[i][name], [9, 3, 4], 40, 16)
            assert torch.equal(b[:16].view(torch.int16), a[:16].view(torch.int16))
            assert torch.equal(b[16:], expected_tokens(codec, a, name, 16)[16:])


def test_a_corrupted_device_payload_is_refused_and_written_nowhere(emulated_gpu, monkeypatch):
    """A device payload whose bytes do not match the header's CRC32C: the receiver checks
    it on the device and asks for it again; corrupted every time, the request fails
    typed, and the destination stays untouched (a device payload is decoded only once
    it passed)."""
    from kvwire.engine.placement import GpuDirectEncoder
    from tests.helpers import filled

    layout = LAYOUTS["mha"]
    dst = layout.allocate(16)
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=dst, transport="ucx", kernels=emulated_gpu)
    real = GpuDirectEncoder.encode

    def corrupt(self, source, ref, spec, codec):
        payload = real(self, source, ref, spec, codec)
        payload.device[len(payload.device) // 2] ^= 0x10  # one bit flipped after the CRC was taken
        return payload

    monkeypatch.setattr(GpuDirectEncoder, "encode", corrupt)
    try:
        h = rx.expect("bad", [9, 3, 4], 40)
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=filled(layout, 16), streams=2,
                           transport="ucx", kernels=emulated_gpu) as tx:  # fmt: skip
            with pytest.raises(kvwire.TransferError, match="failed their checksum"):
                tx.send("bad", [1, 2, 5], 40, timeout=30)
        with pytest.raises(kvwire.ChecksumMismatch):
            h.wait(timeout=10)
        assert rx.stats()["checksum_failures"] > 8
    finally:
        rx.close()
    assert all((t == 0).all() for layer in dst for t in layer.values())


def test_a_ucx_peer_that_never_answers_the_handshake_is_given_up_on_both_sides():
    """A UCX endpoint is ready as soon as it is made, so neither side's connect step waits
    for the other's handshake. A listener that accepts and never answers is given up at
    the sender's connect_timeout; an endpoint that never says HELLO is closed at the
    receiver's handshake_timeout, while a real sender's transfer goes through beside it."""
    import asyncio
    import time

    from kvwire.transport import ucx
    from tests.helpers import assert_transferred, filled, wait_until

    layout = LAYOUTS["mha"]
    ucx.configure_for("127.0.0.1")
    loop = ucx._Loop.get()
    stop = asyncio.Event()

    async def mute(ep) -> None:
        await stop.wait()

    async def listen():
        return loop.ucxx.create_listener(mute, 0)

    listener = loop.run(listen(), 10)
    try:
        t0 = time.monotonic()
        with pytest.raises(kvwire.PeerLost, match="did not finish within connect_timeout=1 s"):
            kvwire.Sender(layout, ("127.0.0.1", listener.port), secret=SECRET, kv_caches=layout.allocate(4),
                          streams=1, transport="ucx", connect_timeout=1.0)  # fmt: skip
        assert time.monotonic() - t0 < 3
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        loop.run(asyncio.sleep(0), 5)
        listener.close()

    dst = layout.allocate(8)
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=dst, transport="ucx", handshake_timeout=1.0)
    try:
        silent = ucx.connect(rx.address, timeout=5)  # never says HELLO
        assert wait_until(lambda: rx.census()["pending_connections"] == 1, timeout=5)
        src = filled(layout, 8, seed=3)
        h = rx.expect("beside", [1, 2], 20)
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=src, streams=1, transport="ucx") as tx:
            tx.send("beside", [0, 3], 20, timeout=30)
        h.wait(timeout=10)
        assert_transferred(layout, src, [0, 3], dst, [1, 2], 20, "raw")
        assert wait_until(lambda: rx.census()["pending_connections"] == 0, timeout=5)  # the silent one is cut
        silent.close()
    finally:
        rx.close()


def test_a_ucx_message_longer_than_any_frame_is_refused_before_it_is_allocated(caplog):
    """Each UCX message is preceded by its length. Before the handshake only control
    frames may come: a peer announcing 8 GiB is cut at once (its length read, nothing
    allocated for it, no wait for the handshake's deadline)."""
    import time

    import numpy as np

    from kvwire.transport import ucx
    from tests.helpers import wait_until

    layout = LAYOUTS["mha"]
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(4), transport="ucx", handshake_timeout=30)
    try:
        loop = ucx._Loop.get()
        ep = loop.run(loop.ucxx.create_endpoint(*rx.address), 5)
        assert wait_until(lambda: rx.census()["pending_connections"] == 1, timeout=5)
        t0 = time.monotonic()
        loop.run(ep.send(np.frombuffer((8 << 30).to_bytes(8, "little"), np.uint8).copy()), 5)
        assert wait_until(lambda: rx.census()["pending_connections"] == 0, timeout=10)
        assert time.monotonic() - t0 < 5
        assert "UCX message of 8589934592 bytes" in caplog.text
        loop.run(ep.close(), 5)
    finally:
        rx.close()


def test_a_chunk_of_a_whole_slot_behind_its_begin_fits_a_ucx_message():
    """Over UCX a sender's send is one message: here a chunk of the receiver's whole slot
    behind its BEGIN, which the receiver's bound on a message must allow (it allows a
    window's payload, as gathered sends would carry; gathering needs a measured round
    trip, which UCX does not report, so it does not happen over UCX today)."""
    from tests.helpers import assert_transferred, filled

    layout = LAYOUTS["mha"]
    slot = 64 << 10
    dst = layout.allocate(64)
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=dst, transport="ucx", slot_bytes=slot)
    src = filled(layout, 64, seed=2)
    try:
        blocks = list(range(48))
        h = rx.expect("full", blocks, 48 * layout.block_size)
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=src, streams=2, transport="ucx",
                           chunk_bytes=slot) as tx:  # fmt: skip
            tx.send("full", blocks, 48 * layout.block_size, timeout=30)
        h.wait(timeout=10)
        assert rx.stats()["protocol_errors"] == 0
        assert_transferred(layout, src, blocks, dst, blocks, 48 * layout.block_size)
    finally:
        rx.close()


def _ucx_pair():
    """(client stream, server stream, listener) over loopback UCX."""
    from kvwire.transport import ucx

    ucx.configure_for("127.0.0.1")
    listener = ucx.UcxListener(("127.0.0.1", 0))
    client = ucx.connect(listener.address, timeout=5)
    return client, listener.accept(), listener


def test_ucx_streams_keep_their_messages_in_step():
    """An empty message is still a message (its body is received, or the next length would
    be read from it); each accepted endpoint is a host of its own to the receiver's
    per-host cap (UCX does not say where it comes from); a read that timed out leaves the
    stream unusable (its receive could take the next message), not out of step."""
    client, server, listener = _ucx_pair()
    try:
        assert ":" not in server.peer  # the receiver takes the part before a colon for the host
        client.send_parts([b""])
        client.send_parts([b"abc", b"de"])
        assert server.recv_exact(5) == b"abcde"
        server.settimeout(0.3)
        with pytest.raises(kvwire.PeerLost, match="failed while receiving"):
            server.recv_exact(1)  # nothing comes
        client.send_parts([b"late"])
        with pytest.raises(kvwire.PeerLost, match="unusable: it failed while receiving"):
            server.recv_exact(4)
    finally:
        client.close()
        server.close()
        listener.close()


def test_a_timed_out_ucx_receive_does_not_stall_later_sends():
    """A receive that timed out is left posted, not cancelled: cancelling it left a later
    send on the same UCX worker hanging forever about once in a dozen tries."""
    from kvwire.transport import ucx

    ucx.configure_for("127.0.0.1")
    listener = ucx.UcxListener(("127.0.0.1", 0))
    try:
        for _ in range(40):
            client = ucx.connect(listener.address, timeout=5)
            server = listener.accept()
            try:
                client.settimeout(10)  # a stalled send fails here instead of hanging the suite
                client.send_parts([b"abc"])
                assert server.recv_exact(3) == b"abc"
                server.settimeout(0.05)
                with pytest.raises(kvwire.PeerLost, match="failed while receiving"):
                    server.recv_exact(1)
                client.send_parts([b"late"])  # must leave, though a stale receive may take it
            finally:
                client.close()
                server.close()
    finally:
        listener.close()


def test_closing_a_ucx_listener_closes_the_endpoints_nobody_took():
    """UCX accepts endpoints before the receiver takes them: those still waiting when the
    listener closes are closed with it, so their peers learn at once, not at a timeout."""
    import time

    from kvwire.transport import ucx
    from tests.helpers import wait_until

    ucx.configure_for("127.0.0.1")
    listener = ucx.UcxListener(("127.0.0.1", 0))
    clients = [ucx.connect(listener.address, timeout=5) for _ in range(2)]
    try:
        assert wait_until(lambda: listener._queue.qsize() == 2, timeout=5)
        listener.close()
        for c in clients:
            c.settimeout(10)
            t0 = time.monotonic()
            with pytest.raises(kvwire.PeerLost):
                c.recv_exact(1)
            assert time.monotonic() - t0 < 5
        with pytest.raises(OSError, match="listener closed"):
            listener.accept()
    finally:
        for c in clients:
            c.close()


def test_closing_a_ucx_stream_behind_a_blocked_send_does_not_wait_for_its_control_frames():
    """A peer that never reads: a large send blocks, a control frame queues behind it. The
    control frame cannot leave before the send, so close() does not wait for it (it waited
    2 s per stream, one stream after another), and the blocked send ends PeerLost."""
    import threading
    import time

    client, server, listener = _ucx_pair()
    errors: list[Exception] = []

    def send() -> None:
        try:
            server.send_parts([b"D" * (16 << 20)])
        except kvwire.PeerLost as exc:
            errors.append(exc)

    thread = threading.Thread(target=send)
    try:
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive()  # blocked: the client never posts a receive
        server.send_control(b"c" * 40)
        t0 = time.monotonic()
        server.close()
        assert time.monotonic() - t0 < 1
        thread.join(15)
        assert not thread.is_alive() and errors
    finally:
        client.close()
        listener.close()


def test_a_ucx_port_in_use_is_an_os_error_as_a_sockets_is():
    from kvwire.transport import ucx

    ucx.configure_for("127.0.0.1")
    first = ucx.UcxListener(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError, match=f"cannot listen on port {first.address[1]} over UCX"):
            ucx.UcxListener(("127.0.0.1", first.address[1]))
    finally:
        first.close()


def test_a_ucx_listener_says_it_listens_on_every_interface_when_given_one_host(caplog):
    """UCXX takes a port only: a receiver told to listen on one address listens on every
    interface, and its log says so; one told to listen everywhere gets no warning."""
    import logging

    from kvwire.transport import ucx

    ucx.configure_for("127.0.0.1")
    for host, warned in (("127.0.0.1", True), ("0.0.0.0", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kvwire.ucx"):
            listener = ucx.UcxListener((host, 0))
            listener.close()
        said = [r.getMessage() for r in caplog.records if "every interface" in r.getMessage()]
        assert bool(said) == warned, (host, said)
        assert not said or repr(host) in said[0]
