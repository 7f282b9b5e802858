"""The CUDA kernels on a real GPU: bytes equal to the CPU reference for every kernel of both
builds (prebuilt fatbin and NVRTC), any bytes decoded bit for bit, stream order under a
busy current stream, the launchers' refusals, and GPU-to-GPU transfers. Skipped (with the
reason) where there is no CUDA device or no CuPy; ``python3 bench/gpu_check`` runs these on
a GPU machine (``--list`` says what each part checks).

Tests marked ``slow`` (large caches) are left out of ``bench/gpu_check --quick``.
"""

import functools
import multiprocessing

import pytest
import torch

import kvwire
import kvwire.codec
from kvwire.blocks import gather_tokens
from kvwire.codec import ChunkSpec
from kvwire.engine.placement import HostEncoder
from kvwire.layout import Selection
from tests.helpers import (
    GEOMETRIES,
    KERNEL_CASES,
    SCALAR_KERNELS,
    paged_geometry,
    skip_geometry_the_codec_refuses,
    special_wire_bytes,
)

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
try:
    import cupy  # noqa: F401
except ImportError:
    pytest.skip("CuPy is not installed (pip install 'kvwire[cuda]')", allow_module_level=True)

from kvwire.cuda import kernels  # noqa: E402

SECRET = "kvwire-gpu-test-secret"


@pytest.fixture(scope="module")
def gpu():
    return kernels.gpu_backend(0)


@pytest.fixture(scope="module", params=["fatbin", "nvrtc"])
def each_build(request):
    """The prebuilt fatbin (bench/gpu_check builds it first) and the NVRTC build."""
    if request.param == "fatbin":
        path, why = kernels.prebuilt_fatbin()
        if path is None:
            pytest.skip(f"no usable prebuilt fatbin: {why}")
    return kernels.gpu_backend(0, request.param)


def host_crc32c(data: torch.Tensor) -> int:
    """CRC32C on the host: the crc32c package, or a table-driven fallback (the GPU image may
    lack the package)."""
    try:
        from crc32c import crc32c
    except ImportError:
        return _table_crc32c(data.cpu().numpy().tobytes())
    return crc32c(data.cpu().numpy())


def _table_crc32c(data: bytes) -> int:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (kernels.CRC32C_POLY if c & 1 else 0)
        table.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def cache(num_blocks, bs, H, D, dtype, hnd=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if hnd:
        return torch.randn(num_blocks, H, bs, D, device="cuda", generator=g).to(dtype).transpose(1, 2)
    return torch.randn(num_blocks, bs, H, D, device="cuda", generator=g).to(dtype)


def check_roundtrip(backend, codec, src, ids, tokens, bs, role, stream=None):
    """Encode rows of ``src`` on the GPU, compare with the CPU reference, decode them into a
    zeroed copy, compare with the CPU decoder; the rows of other blocks stay zero."""
    sel = Selection(tuple(ids), tokens)
    rows = gather_tokens(src, sel, bs).cpu()
    want = codec.encode(rows, role, bs)
    got = kernels.encode(backend, codec, kernels.Chunk.paged(src, ids, 0, tokens, bs), role, stream=stream)
    torch.cuda.synchronize(src.device)
    assert torch.equal(got.cpu(), want.data)
    dst = torch.zeros_like(src)
    kernels.decode(backend, codec, got, kernels.Chunk.paged(dst, ids, 0, tokens, bs), role, stream=stream)
    torch.cuda.synchronize(src.device)
    expected = codec.decode(want).reshape(rows.shape)
    placed = gather_tokens(dst, sel, bs).cpu()
    assert torch.equal(placed.view(torch.int16), expected.contiguous().view(torch.int16))
    others = [b for b in range(dst.shape[0]) if b not in ids]
    assert (dst[others] == 0).all()


SIZES = [(16, 1000, False), (64, 4096 + 17, False), (16, 333, True)]  # block size, tokens, HND layout
BYTES_CASES = [
    *[
        (name, *size)
        for name in ("raw", "fp8", "int4", "int4/g64/k64", "int8h", "int4h", "int4h/k64", "int4a")
        for size in SIZES
    ],
    # 128K tokens for the codecs whose kernels index furthest (full run only; the CPU
    # reference of the others at that size would take most of the GPU check's budget)
    *[pytest.param(name, 16, 131072, False, marks=pytest.mark.slow) for name in ("raw", "fp8", "int4", "int8h")],
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("codec_name, bs, tokens, hnd", BYTES_CASES)
def test_gpu_bytes_equal_cpu_reference(gpu, dtype, codec_name, role, bs, tokens, hnd):
    H, D = 8, 128
    codec = kvwire.codec.get(codec_name)
    nb = -(-tokens // bs)
    src = cache(nb + 5, bs, H, D, dtype, hnd, seed=tokens)
    ids = torch.randperm(nb + 5)[:nb].tolist()
    check_roundtrip(gpu, codec, src, ids, tokens, bs, role)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "codec_name, role",
    KERNEL_CASES,
)
@pytest.mark.parametrize("kind", GEOMETRIES)
def test_every_kernel_of_each_build(each_build, kind, codec_name, role, dtype):
    """Vector and element-by-element kernels, odd head counts, partial blocks, vLLM's packed
    K/V slices, MLA latents, in the fatbin and in the NVRTC build."""
    src, vec = paged_geometry(kind, dtype, "cuda")
    codec = kvwire.codec.get(codec_name)
    D = src.shape[-1]
    skip_geometry_the_codec_refuses(codec_name, role, D)
    plan = kernels._plan(each_build, codec, kernels.Chunk.paged(src, [4, 1, 3], 0, 37, 16), role, "encode")
    assert plan.vec == (vec and not plan.name.startswith(SCALAR_KERNELS)), plan.name
    check_roundtrip(each_build, codec, src, [4, 1, 3], 37, 16, role)  # 37 tokens: the last block partial


@pytest.mark.parametrize("codec_name", ["raw", "fp8", "int4", "int8h", "int4h", "int4a"])
def test_state_chunks_of_each_build(each_build, codec_name):
    codec = kvwire.codec.get(codec_name)
    state = torch.randn(2, 64, 128, device="cuda").to(torch.bfloat16)
    got = kernels.encode(each_build, codec, kernels.Chunk.state(each_build, state, 10, 50), "state")
    want = codec.encode(state.cpu().reshape(-1, 128)[10:60], "state")
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want.data)
    out = torch.zeros_like(state)
    kernels.decode(each_build, codec, got, kernels.Chunk.state(each_build, out, 10, 50), "state")
    torch.cuda.synchronize()
    flat = out.cpu().reshape(-1, 128)
    assert torch.equal(flat[10:60], codec.decode(want).reshape(50, 128))
    assert (flat[:10] == 0).all() and (flat[60:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "name, role", [("fp8", "k"), ("fp8", "v"), ("int4", "k"), ("int4", "v"), ("int8h", "k"), ("int4h", "v")]
)
def test_any_bytes_decode_bit_for_bit(each_build, name, role, dtype):
    """NaN codes, NaN/inf scales and zero-points: the GPU writes the canonical NaNs of
    docs/formats.md (cvt.rn.f16.f32 alone would write 0x7FFF), as the CPU reference does."""
    codec = kvwire.codec.get(name, group_size=32)
    T, H, D, bs = 40, 3, 64, 16
    spec = ChunkSpec(T, H, D, dtype, role, bs)
    data = special_wire_bytes(codec, spec, seed=T)
    want = codec.decode_bytes(data, spec).reshape(T, H, D)
    dst = torch.zeros(4, bs, H, D, dtype=dtype, device="cuda")
    kernels.decode(each_build, codec, data.cuda(), kernels.Chunk.paged(dst, [2, 0, 3], 0, T, bs), role)
    got = gather_tokens(dst, Selection((2, 0, 3), T), bs).cpu()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("role, T", [("k", 40), ("v", 45)])
def test_int4a_any_bytes_decode_bit_for_bit(each_build, role, T, dtype):
    """Random int4a bytes (NaN and infinite ranges, any base scale): as the CPU reference."""
    codec = kvwire.codec.get("int4a")
    H, D, bs = 2, 64, 16
    spec = ChunkSpec(T, H, D, dtype, role, bs)
    data = torch.randint(0, 256, (codec.encoded_size(spec),), generator=torch.Generator().manual_seed(T),
                         dtype=torch.uint8)  # fmt: skip
    want = codec.decode_bytes(data, spec).reshape(T, H, D)
    dst = torch.zeros(4, bs, H, D, dtype=dtype, device="cuda")
    kernels.decode(each_build, codec, data.cuda(), kernels.Chunk.paged(dst, [2, 0, 3], 0, T, bs), role)
    got = gather_tokens(dst, Selection((2, 0, 3), T), bs).cpu()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_special_values_encode_bit_for_bit(gpu):
    x = torch.randn(4, 16, 2, 64)
    x[0, 0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    x[1, 3, 1] = 0.0
    x[2, 5, 0, 7] = 1e-9
    x[3, 1, 0, 9] = 60000.0
    x[1, 4, 0] = -0.0  # a row of negative zeros
    x[2, 6, 0] *= 1e-30  # below 2^-91 (in bf16): a zero row for int8h and int4h
    x[3, 7, 0, ::2] = 3e38  # the largest bf16 values (inf in fp16)
    for dtype in (torch.bfloat16, torch.float16):
        c = x.to(dtype).cuda()
        rows = gather_tokens(c, Selection((0, 1, 2, 3), 64), 16).cpu()
        cases = (("fp8", "k"), ("int4", "k"), ("int4", "v"), ("int8h", "k"), ("int4h", "v"), ("int4a", "k"),
                 ("int4a", "v"))  # fmt: skip
        for name, role in cases:
            codec = kvwire.codec.get(name)
            got = kernels.encode(gpu, codec, kernels.Chunk.paged(c, [0, 1, 2, 3], 0, 64, 16), role)
            assert torch.equal(got.cpu(), codec.encode(rows, role, 16).data), (dtype, name, role)


def test_misaligned_buffers_are_refused_and_the_context_survives(gpu):
    codec = kvwire.codec.get("fp8")
    src = cache(4, 16, 2, 64, torch.bfloat16)
    chunk = kernels.Chunk.paged(src, [1, 2], 0, 32, 16)
    size = codec.encoded_size(ChunkSpec(32, 2, 64, torch.bfloat16, "k", 16))
    backing = torch.zeros(size + 16, dtype=torch.uint8, device="cuda")
    for offset in (1, 2, 3):
        with pytest.raises(ValueError, match="must start on a 4-byte boundary"):
            kernels.encode(gpu, codec, chunk, "k", out=backing[offset : offset + size])
        with pytest.raises(ValueError, match="must start on a 4-byte boundary"):
            kernels.decode(gpu, codec, backing[offset : offset + size], chunk, "k")
    with pytest.raises(ValueError, match="on cpu"):
        kernels.decode(gpu, codec, torch.zeros(size, dtype=torch.uint8), chunk, "k")
    raw = kvwire.codec.get("raw")  # 2-byte aligned only: raw copies element by element
    raw_size = 32 * 2 * 64 * 2
    out = torch.zeros(raw_size + 16, dtype=torch.uint8, device="cuda")[2 : 2 + raw_size]
    got = kernels.encode(gpu, raw, chunk, "k", out=out)
    torch.cuda.synchronize()  # the context is alive and the bytes are right
    assert torch.equal(got.cpu(), raw.encode(gather_tokens(src, Selection((1, 2), 32), 16).cpu(), "k").data)


# -- stream order: a busy current stream (a model's forward pass) must neither corrupt nor
#    delay kvwire's side-stream work ------------------------------------------------------------
@functools.cache
def _cycles_per_second() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    end.synchronize()
    return 50_000_000 / (start.elapsed_time(end) / 1e3)


def busy(seconds: float) -> None:
    """Queue ``seconds`` of spinning on the current stream and return at once."""
    torch.cuda._sleep(int(seconds * _cycles_per_second()))


def test_side_stream_work_is_right_and_does_not_wait_for_a_busy_current_stream(gpu):
    """The CRC accumulator, block tables (per chunk and per transfer), state tables and
    outputs are all ordered on the side stream: with seconds of work queued on the current
    stream, the results are right and come back before that work is done."""
    side = torch.cuda.Stream()
    codec = kvwire.codec.get("fp8")
    src = cache(16, 16, 8, 128, torch.bfloat16, seed=1)
    state = torch.randn(2, 64, 128, device="cuda").to(torch.bfloat16)
    data = torch.randint(0, 256, ((1 << 20) + 3,), dtype=torch.uint8, device="cuda")
    ids, tokens = [3, 7, 1, 12], 60
    torch.cuda.synchronize()
    want_crc = host_crc32c(data)
    want = codec.encode(gather_tokens(src, Selection(tuple(ids), tokens), 16).cpu(), "k", 16).data
    want_state = codec.encode(state.cpu().reshape(-1, 128), "state").data

    def run():
        table = kernels.BlockTable(ids, src.device, side)
        outs = [
            kernels.encode(gpu, codec, kernels.Chunk.paged(src, table, 0, tokens, 16), "k", stream=side),
            kernels.encode(gpu, codec, kernels.Chunk.paged(src, ids, 0, tokens, 16), "k", stream=side),
            kernels.encode(gpu, codec, kernels.Chunk.state(gpu, state, 0, 128), "state", stream=side),
        ]
        crc = kernels.crc32c(gpu, data, stream=side)
        host = [torch.empty(o.numel(), dtype=torch.uint8, pin_memory=True) for o in outs]
        with torch.cuda.stream(side):
            for h, o in zip(host, outs):
                h.copy_(o, non_blocking=True)
        kernels.wait_on_host(side)
        return crc, host, outs[0], table

    run()  # warm up: functions loaded, pinned and device pools filled
    dst = torch.zeros_like(src)
    torch.cuda.synchronize()
    busy(3.0)
    crc, host, encoded, table = run()
    kernels.decode(gpu, codec, encoded, kernels.Chunk.paged(dst, table, 0, tokens, 16), "k", stream=side)
    kernels.wait_on_host(side)
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert crc == want_crc
    assert torch.equal(host[0], want) and torch.equal(host[1], want)
    assert torch.equal(host[2], want_state)
    placed = gather_tokens(dst, Selection(tuple(ids), tokens), 16).cpu()
    assert torch.equal(placed, codec.decode_bytes(want, ChunkSpec(tokens, 8, 128, torch.bfloat16, "k", 16)))
    assert still_busy, "kvwire's side-stream work waited for the current stream"


@pytest.mark.parametrize("codec_name", ["raw", "fp8", "int4", "int8h", "int4h"])
def test_a_transfer_is_right_while_the_current_stream_is_busy(codec_name):
    """Sender and receiver in this process, GPU caches and states on both sides, work queued
    on the current stream after every layer (a model computing the next one) and a long
    tail after the last: every byte arrives as the CPU reference says, and the transfer ends
    while the current stream is still busy (nothing in kvwire waited for it)."""
    layout = kvwire.KVLayout.hybrid("LFLF", num_kv_heads=2, head_dim=128, state_shape=(2, 64, 128), block_size=16)
    src, dst = layout.allocate(32, device="cuda"), layout.allocate(32, device="cuda")
    for layer in src:
        for t in layer.values():
            t.copy_(torch.randn(t.shape, device="cuda"))
    src_states = {i: torch.randn(t.shape, device="cuda").to(t.dtype) for i, t in layout.allocate_states().items()}
    dst_states = layout.allocate_states(device="cuda")
    src_ids, dst_ids, n = list(range(20, 0, -2)), list(range(10)), 150
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=dst)
    try:
        h = rx.expect("busy", dst_ids, n, states=dst_states)
        torch.cuda.synchronize()
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=src, codec=codec_name,
                           chunk_bytes=64 << 10) as tx:  # fmt: skip
            assert not isinstance(tx.encoder, HostEncoder)
            handle = tx.transfer("busy", src_ids, n, states=src_states, deadline=120)
            for i in range(layout.num_layers):
                handle.send_layer(i)
                busy(0.05)
            busy(5.0)
            handle.finish(timeout=60)
            h.wait(timeout=60)
            still_busy = not torch.cuda.current_stream().query()
    finally:
        rx.close()
    torch.cuda.synchronize()
    codec = kvwire.codec.get(codec_name)
    for i, layer in enumerate(layout.layers):
        for p in layer.paged:
            rows = gather_tokens(src[i][p.name], Selection(tuple(src_ids), n), 16).cpu()
            want = codec.decode(codec.encode(rows, p.name, 16)).reshape(rows.shape)
            got = gather_tokens(dst[i][p.name], Selection(tuple(dst_ids), n), 16).cpu()
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (i, p.name)
        if layer.state is not None:
            s = src_states[i].cpu()
            want = codec.decode(codec.encode(s, "state", 16)).reshape(s.shape)
            assert torch.equal(dst_states[i].cpu().view(torch.int16), want.view(torch.int16)), (i, "state")
    assert still_busy, "the transfer waited for the current stream"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_caches_on_a_second_gpu_while_the_first_is_current():
    """Kernels for caches on cuda:1 run there (and a stream of another device is refused)
    whichever device is current."""
    torch.cuda.set_device(0)
    second = kernels.gpu_backend(1)
    codec = kvwire.codec.get("fp8")
    src = torch.randn(6, 16, 2, 64, device="cuda:1").to(torch.bfloat16)
    check_roundtrip(second, codec, src, [4, 1, 3], 37, 16, "k", stream=torch.cuda.Stream("cuda:1"))
    data = torch.randint(0, 256, (5000,), dtype=torch.uint8, device="cuda:1")
    assert kernels.crc32c(second, data) == host_crc32c(data)
    with pytest.raises(ValueError, match="stream: on cuda:0"):
        kernels.crc32c(second, data, stream=torch.cuda.Stream("cuda:0"))


def test_a_stale_fatbin_is_refused_and_the_source_compiled(tmp_path, monkeypatch):
    """A fatbin whose stamp names another source: 'auto' compiles the source with NVRTC
    (and says why), 'fatbin' refuses to start."""
    path, why = kernels.prebuilt_fatbin()
    if path is None:
        pytest.skip(f"no usable prebuilt fatbin: {why}")
    stale = tmp_path / "kvwire_kernels.fatbin"
    stale.write_bytes(path.read_bytes())
    (tmp_path / "kvwire_kernels.fatbin.sha256").write_text("0" * 64 + "\n")
    monkeypatch.setenv("KVWIRE_FATBIN", str(stale))
    backend = kernels.CupyBackend(torch.device("cuda", 0))
    assert backend.origin.startswith("NVRTC") and "refused" in backend.origin
    with pytest.raises(RuntimeError, match="refused"):
        kernels.CupyBackend(torch.device("cuda", 0), source="fatbin")


# -- transfers between processes ----------------------------------------------------------------
def _receiver(layout_dict, transport, queue, done):
    layout = kvwire.KVLayout.from_dict(layout_dict)
    dst = layout.allocate(64, device="cuda")
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=dst, transport=transport)
    queue.put(rx.address)
    h = rx.expect("gpu-req", list(range(40, 50)), 150)
    h.wait(timeout=120)
    queue.put(([{n: t[list(range(40, 50))].cpu() for n, t in layer.items()} for layer in dst], rx.stats()))
    done.wait(60)
    rx.close()


def _transfer_between_processes(codec_name: str, transport: str) -> tuple[dict, dict]:
    """One request GPU to GPU, the receiver in another process; checks the placed rows
    against the CPU reference and returns (the sender's statistics, the receiver's)."""
    layout = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16)
    ctx = multiprocessing.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_receiver, args=(layout.to_dict(), transport, queue, done))
    p.start()
    try:
        address = queue.get(timeout=120)
        src = layout.allocate(64, device="cuda")
        for layer in src:
            for t in layer.values():
                t.copy_(torch.randn(t.shape, device="cuda"))
        ids = list(range(10))
        with kvwire.Sender(layout, address, secret=SECRET, kv_caches=src, codec=codec_name, transport=transport) as tx:
            assert not isinstance(tx.encoder, HostEncoder), "the sender should use the CUDA kernels"
            tx.send("gpu-req", ids, 150, timeout=120)
            tx_stats = tx.stats()
        got, rx_stats = queue.get(timeout=120)
        codec = kvwire.codec.get(codec_name)
        for i, layer in enumerate(src):
            for name, t in layer.items():
                rows = gather_tokens(t, Selection(tuple(ids), 150), 16).cpu()
                want = codec.decode(codec.encode(rows, name, 16)).reshape(rows.shape)
                placed = got[i][name].reshape(-1, 8, 128)[:150]
                assert torch.equal(placed, want), (i, name)
        return tx_stats, rx_stats
    finally:
        done.set()
        p.join(timeout=30)
        if p.is_alive():
            p.kill()


@pytest.mark.parametrize("codec_name", ["raw", "fp8", "int4", "int8h", "int4h+lz4"])
def test_gpu_to_gpu_transfer_between_processes(codec_name):
    _transfer_between_processes(codec_name, "tcp")


@pytest.mark.parametrize("n", [1, 1000, 4097, (2 << 20) + 5])
def test_gpu_crc32c_equals_the_host_crc32c(gpu, n):
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    assert kernels.crc32c(gpu, data) == host_crc32c(data)


@pytest.mark.parametrize("codec_name", ["raw", "fp8"])
def test_gpu_direct_over_ucx(codec_name, monkeypatch):
    """Payloads from GPU memory to GPU memory through UCX's CUDA transports, no host
    staging; the statistics must say so."""
    pytest.importorskip("ucxx", reason="UCXX is not installed (pip install 'kvwire[ucx]')")
    from kvwire.transport import ucx

    monkeypatch.setenv("UCX_TLS", "tcp,cuda_copy,cuda_ipc")
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")
    if not ucx.moves_device_memory():
        pytest.skip("UCX here has no CUDA transport (cuda_copy/cuda_ipc)")
    tx_stats, rx_stats = _transfer_between_processes(codec_name, "ucx")
    assert {c["path"] for c in tx_stats["connections"]} == {"device memory (direct)"}
    assert rx_stats.get("device_payloads", 0) == rx_stats["frames"] > 0
