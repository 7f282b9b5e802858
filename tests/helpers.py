"""Shared test helpers: random caches, reference comparisons, a hand-driven protocol client,
and entry points for peers in separate processes (spawned, so they must be importable)."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time

import pytest
import torch

import kvwire
import kvwire.codec
from kvwire.blocks import gather_tokens
from kvwire.engine.common import layout_summary
from kvwire.layout import Selection
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


def corrupt_first_checksums(monkeypatch, count: int) -> None:
    """Make a sender's first ``count`` payloads carry a wrong CRC32C (as if corrupted on
    the way): the receiver must ask for each again."""
    from kvwire.engine.placement import Payload

    real = Payload.checksum
    corrupted: list[int] = []

    def sometimes_wrong(self):
        crc = real(self)
        if len(corrupted) < count:
            corrupted.append(crc)
            return crc ^ 1
        return crc

    monkeypatch.setattr(Payload, "checksum", sometimes_wrong)


def special_wire_bytes(codec, spec, seed: int = 0) -> torch.Tensor:
    """Wire bytes no encoder writes but a peer may send, for ``codec`` (fp8, int8h, int4 or
    int4h) and a chunk like ``spec``: random bytes with NaN codes (0x7F, 0xFF) and NaN,
    infinite and zero scales (fp8, int8h), or infinite and NaN fp16 / bf16 scales and
    zero-points (int4, int4h). Decoders must turn them into exactly the elements
    docs/formats.md names (every NaN canonical)."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (codec.encoded_size(spec),), dtype=torch.uint8, generator=g)
    rows = spec.tokens * spec.heads
    if codec.name == "int8h":
        scales = data[: 4 * rows].view(torch.float32)
        scales.copy_(torch.randn(rows, generator=g) * 1e-2)
        scales[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
        return data
    if codec.name == "int4h" and spec.role != "k":
        params = data[: 4 * rows].view(torch.bfloat16)  # scales, then zero-points
        params.copy_(torch.randn(2 * rows, generator=g).to(torch.bfloat16))
        specials = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 3e38], dtype=torch.bfloat16)
        params[::3] = specials.repeat(rows)[: params[::3].numel()]
        return data
    if codec.name == "fp8":
        scales = data[: 4 * rows].view(torch.float32)
        scales.copy_(torch.rand(rows, generator=g) * 4)
        scales[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
        data[4 * rows :: 7] = 0x7F
        data[4 * rows + 3 :: 11] = 0xFF
        return data
    groups = (data.numel() - spec.numel // 2) // 4
    params = data[: 4 * groups].view(torch.int16)  # fp16 scales, then zero-points
    specials = torch.tensor([0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7D00], dtype=torch.int32).to(torch.int16)
    params[::5] = specials.repeat(groups)[: params[::5].numel()]  # +inf, -inf, NaNs
    return data


def paged_geometry(kind: str, dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, bool]:
    """A paged cache of 6 blocks of 16 tokens in one of the layouts the kernels serve, and
    whether it takes the 16-byte (``_vec``) kernels. (tests/test_kernels_emulated.py runs
    them on the host emulation, tests/test_gpu.py on the GPU.)"""
    g = torch.Generator(device=device).manual_seed(len(kind))

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    if kind == "nhd":
        return randn(6, 16, 4, 128), True
    if kind == "hnd":
        return randn(6, 4, 16, 128).transpose(1, 2), True
    if kind == "odd heads 3":
        return randn(6, 16, 3, 64), True
    if kind == "odd heads 5":
        return randn(6, 16, 5, 128), True
    if kind == "vllm packed k of kv":  # [blocks, 2, bs, H, D], the k half
        return randn(6, 2, 16, 2, 64)[:, 0], True
    if kind == "mla latent":  # [blocks, bs, 576]
        return randn(6, 16, 576), True
    if kind == "strided head_dim":  # head_dim not contiguous: element by element
        return randn(6, 16, 64, 4).transpose(2, 3), False
    if kind == "base off 16 bytes":  # starts 2 bytes into an allocation
        return randn(6 * 16 * 2 * 64 + 1)[1:].view(6, 16, 2, 64), False
    if kind == "head_dim 36":  # not a multiple of 8
        return randn(6, 16, 2, 36), False
    raise ValueError(kind)


GEOMETRIES = ["nhd", "hnd", "odd heads 3", "odd heads 5", "vllm packed k of kv", "mla latent",
              "strided head_dim", "base off 16 bytes", "head_dim 36"]  # fmt: skip
# (codec, role) of every kernel family, run over GEOMETRIES on the host emulation and on a GPU.
KERNEL_CASES = [("raw", "k"), ("fp8", "v"), ("int4/g32", "k"), ("int4/g32", "v"), ("int8h", "k"), ("int4h", "v"),
                ("int4a", "k"), ("int4a", "v")]  # fmt: skip
# Kernel plans that never take 16-byte vector access to the cache.
SCALAR_KERNELS = ("kvw_int4k", "kvw_rot", "kvw_int4a")


def skip_geometry_the_codec_refuses(codec_name: str, role: str, head_dim: int) -> None:
    """pytest.skip where a codec cannot take a geometry's head_dim at all."""
    import pytest

    if codec_name.startswith("int4") and role == "v" and head_dim % 32:
        pytest.skip("int4 values need head_dim % group_size == 0")
    if codec_name == "int4a" and head_dim % 8:
        pytest.skip("int4a needs head_dim % 8 == 0")


def wire_tp(layout) -> tuple[int, int, int]:
    """A layout's tensor parallelism as the handshake states it: (rank, size, model KV heads)."""
    from kvwire.sharding import tp_of

    tp = tp_of(layout)
    return tp.rank, tp.size, tp.kv_heads


def wait_until(predicate, timeout: float = 10.0, step: float = 0.02) -> bool:
    """Whether ``predicate()`` came true within ``timeout`` seconds (polled every ``step``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class WireClient:
    """A sender driven by hand over a real socket, to send frames a real Sender never would."""

    def __init__(self, address, layout, secret=SECRET, codec="raw", session="cd" * 8) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.proto = ClientConnection(
            secret.encode(), session=session, conn_index=0, conn_count=1,
            fingerprint=layout.model_fingerprint(), layout=layout_summary(layout), codec=codec,
            tp=wire_tp(layout), block_size=layout.block_size,
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


def _recv_exactly(sock, n: int) -> bytes:
    """``n`` bytes from ``sock``, or fewer if it ends first."""
    data = bytearray()
    while len(data) < n and (more := sock.recv(n - len(data))):
        data += more
    return bytes(data)


class TcpRelay:
    """A TCP relay on 127.0.0.1 to ``target``: each connection's bytes are pumped both ways.
    ``hold``: connections are accepted at once but relayed only once it is set (a slow
    path: the peer's handshake waits). ``pass_close=False``: a half-close is swallowed and
    both sockets stay open (a middlebox that leaves a failed writer's reader waiting).
    ``corrupt``: the first that many DATA payloads from the connecting side, over all its
    connections, reach the target with one bit flipped (a path that damages bytes; the
    frame headers pass intact, so only the payload checksum can tell). ``corrupted``
    counts them. ``stall``: once it is set, the first connection's bytes from the
    connecting side are no longer read (a path gone dark: that side's socket fills).
    ``rate``: bytes per second from the connecting side, on each connection (a slow link)."""

    def __init__(self, target, hold: threading.Event | None = None, pass_close: bool = True, corrupt: int = 0,
                 stall: threading.Event | None = None, rate: float | None = None) -> None:  # fmt: skip
        self.target, self.hold, self.pass_close, self.stall = target, hold, pass_close, stall
        self.rate = rate
        if corrupt and (stall is not None or rate):
            raise ValueError("corrupt: relays whole frames, and neither stalls nor paces them")
        self.corrupt, self.corrupted = corrupt, 0
        self._counting = threading.Lock()  # the pumps of several connections count together
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.sockets: list = []
        self.pumps: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.hold is None:  # relayed in the order accepted
                self._relay(client)
            else:
                threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client) -> None:
        if self.hold is not None:
            self.hold.wait()
        try:
            server = socket.create_connection(self.target)
        except OSError:  # the target is gone (the test ended)
            client.close()
            return
        self.sockets.append(server)
        if self.corrupt:
            upstream: tuple = (self._pump_frames, client, server)
        else:
            upstream = (self._pump, client, server, self.stall if not self.pumps else None, self.rate)
        for pump, *args in (upstream, (self._pump, server, client)):
            thread = threading.Thread(target=pump, args=args, daemon=True)
            self.pumps.append(thread)
            thread.start()

    def finished(self) -> bool:
        """Some connection was relayed, and every one has ended both ways."""
        return bool(self.pumps) and not any(t.is_alive() for t in self.pumps)

    def _pump(self, source, sink, stall: threading.Event | None = None, rate: float | None = None) -> None:
        try:
            while data := source.recv(1 << 14 if rate else 1 << 16):
                sink.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
                if stall is not None and stall.is_set():
                    return  # neither read nor closed: the path is dark
        except OSError:
            pass
        self._pass_close(sink)

    def _pump_frames(self, source, sink) -> None:
        """Relay whole frames, flipping a bit of the DATA payloads ``corrupt`` asks for."""
        try:
            while header := _recv_exactly(source, HEADER_SIZE):
                sink.sendall(header)
                if len(header) < HEADER_SIZE:
                    break  # the stream ended inside a header
                frame = parse_header(header)
                left, first = frame.length, True
                while left:
                    data = _recv_exactly(source, min(left, 1 << 16))
                    if not data:
                        break
                    if first and frame.type == kvwire.proto.FrameType.DATA and self._take_one_to_corrupt():
                        data = bytes([data[0] ^ 0x01]) + data[1:]
                    first = False
                    sink.sendall(data)
                    left -= len(data)
        except (OSError, kvwire.ProtocolError):
            pass
        self._pass_close(sink)

    def _take_one_to_corrupt(self) -> bool:
        with self._counting:
            if self.corrupted >= self.corrupt:
                return False
            self.corrupted += 1
            return True

    def _pass_close(self, sink) -> None:
        if self.pass_close:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()  # connections still held end at once (the target is closing too)
        for s in [self.listener, *self.sockets]:  # shut down first: that wakes the threads blocked in them
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
