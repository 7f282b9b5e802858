"""Shared test helpers: random caches, reference comparisons, a hand-driven protocol client,
and entry points for peers in separate processes (spawned, so they must be importable)."""

from __future__ import annotations

import importlib.util
import socket
import time

import pytest
import torch

import kvwire
import kvwire.codec
from kvwire.engine.common import layout_summary
from kvwire.layout import Selection, gather_tokens
from kvwire.proto import ClientConnection, parse_header
from kvwire.proto.frames import HEADER_SIZE

SECRET = "kvwire-test-secret"

# The transfer tests run over each transport; UCX's only where UCXX is installed (CI installs it).
TRANSPORTS = [
    "tcp",
    pytest.param(
        "ucx",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("ucxx") is None, reason="ucxx is not installed (pip install 'kvwire[ucx]')"
        ),
    ),
]


def filled(layout: kvwire.KVLayout, num_blocks: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    caches = layout.allocate(num_blocks)
    for layer in caches:
        for t in layer.values():
            t.copy_(torch.randn(t.shape, generator=g))
    return caches


def random_states(layout: kvwire.KVLayout, seed: int = 1) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randn(t.shape, generator=g).to(t.dtype) for i, t in layout.allocate_states().items()}


def tokens(cache: torch.Tensor, block_ids, num_tokens: int, block_size: int) -> torch.Tensor:
    return gather_tokens(cache, Selection(tuple(block_ids), num_tokens), block_size)


def expected_tokens(codec_name: str, x: torch.Tensor, role: str, block_size: int) -> torch.Tensor:
    """What the receiver must hold for source rows ``x`` under a codec (CPU reference)."""
    codec = kvwire.codec.get(codec_name)
    return codec.decode(codec.encode(x, role, block_size)).reshape(x.shape)


def assert_transferred(layout, src, src_blocks, dst, dst_blocks, num_tokens, codec="raw", src_states=None,
                       dst_states=None):  # fmt: skip
    bs = layout.block_size
    for i, layer in enumerate(layout.layers):
        for p in layer.paged:
            a = tokens(src[i][p.name], src_blocks, num_tokens, bs)
            b = tokens(dst[i][p.name], dst_blocks, num_tokens, bs)
            want = a if codec == "raw" else expected_tokens(codec, a, p.name, bs)
            assert torch.equal(
                b.view(torch.uint8) if codec == "raw" else b, want.view(torch.uint8) if codec == "raw" else want
            ), (i, p.name)
        if layer.state is not None:
            want = src_states[i] if codec == "raw" else expected_tokens(codec, src_states[i], "state", bs)
            assert torch.equal(dst_states[i], want.reshape(dst_states[i].shape)), (i, "state")


class WireClient:
    """A sender driven by hand over a real socket, to send frames a real Sender never would."""

    def __init__(self, address, layout, secret=SECRET, codec="raw", session="cd" * 8) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.proto = ClientConnection(
            secret.encode(), session=session, conn_index=0, conn_count=1,
            fingerprint=layout.fingerprint(), layout=layout_summary(layout), codec=codec,
        )  # fmt: skip
        self.sock.sendall(self.proto.data_to_send())
        while self.proto.state.value != "open":
            header = parse_header(self._recv(HEADER_SIZE))
            n = self.proto.on_header(header)
            self.proto.on_payload(header, self._recv(n))
            out = self.proto.data_to_send()
            if out:
                self.sock.sendall(out)

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise ConnectionError("closed")
            buf += part
        return buf

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the receiver has closed this connection."""
        self.sock.settimeout(timeout)
        end = time.monotonic() + timeout
        try:
            while time.monotonic() < end:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return False

    def close(self) -> None:
        self.sock.close()


# -- peers in other processes -----------------------------------------------------------------
def sender_process(address, layout_dict, num_blocks, seed, block_ids, num_tokens, stop_after_layers, codec, ready,
                   transport="tcp"):  # fmt: skip
    """Send a request; with ``stop_after_layers`` set, send that many layers and then hang."""
    layout = kvwire.KVLayout.from_dict(layout_dict)
    src = filled(layout, num_blocks, seed)
    with kvwire.Sender(
        layout, address, secret=SECRET, kv_caches=src, codec=codec, streams=2, transport=transport
    ) as tx:
        t = tx.transfer("proc-req", block_ids, num_tokens, deadline=60)
        for i in range(stop_after_layers if stop_after_layers is not None else layout.num_layers):
            t.send_layer(i)
        if stop_after_layers is not None:
            ready.set()
            time.sleep(600)
        t.finish(timeout=60)
        ready.set()


def receiver_process(layout_dict, num_blocks, port_queue, expect):
    """A receiver that never calls expect (so the sender stalls on credit), until killed."""
    layout = kvwire.KVLayout.from_dict(layout_dict)
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(num_blocks), staging_bytes=16 << 20,
                         slot_bytes=1 << 20, window_bytes=1 << 20)  # fmt: skip
    port_queue.put(rx.address)
    time.sleep(600)
