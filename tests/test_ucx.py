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
