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
