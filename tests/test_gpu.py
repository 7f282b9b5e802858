"""The CUDA kernels on a real GPU: bytes equal to the CPU reference, and a GPU-to-GPU
transfer between two processes. Skipped (with the reason) where there is no CUDA device
or no CuPy; bench/gpu_check runs these on a GPU machine."""

import multiprocessing

import pytest
import torch

import kvwire
import kvwire.codec
from kvwire.layout import Selection, gather_tokens

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


def cache(num_blocks, bs, H, D, dtype, hnd=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if hnd:
        return torch.randn(num_blocks, H, bs, D, device="cuda", generator=g).to(dtype).transpose(1, 2)
    return torch.randn(num_blocks, bs, H, D, device="cuda", generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("codec_name", ["raw", "fp8", "int4", "int4/g64/k64"])
@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize(
    "bs, tokens, hnd",
    [(16, 1000, False), (64, 4096 + 17, False), (16, 333, True), (16, 131072, False)],
)
def test_gpu_bytes_equal_cpu_reference(gpu, dtype, codec_name, role, bs, tokens, hnd):
    H, D = 8, 128
    codec = kvwire.codec.get(codec_name)
    nb = -(-tokens // bs)
    src = cache(nb + 5, bs, H, D, dtype, hnd, seed=tokens)
    ids = torch.randperm(nb + 5)[:nb].tolist()
    sel = Selection(tuple(ids), tokens)
    rows = gather_tokens(src, sel, bs).cpu()
    want = codec.encode(rows, role, bs).data
    got = kernels.encode(gpu, codec, kernels.Chunk.paged(src, ids, 0, tokens, bs), role)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want)
    dst = torch.zeros_like(src)
    kernels.decode(gpu, codec, got, kernels.Chunk.paged(dst, ids, 0, tokens, bs), role)
    torch.cuda.synchronize()
    expected = codec.decode(codec.encode(rows, role, bs)).reshape(rows.shape)
    placed = gather_tokens(dst, sel, bs).cpu()
    assert torch.equal(placed.view(torch.int16), expected.contiguous().view(torch.int16))


def test_gpu_special_values(gpu):
    x = torch.randn(4, 16, 2, 64)
    x[0, 0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    x[1, 3, 1] = 0.0
    x[2, 5, 0, 7] = 1e-9
    for dtype in (torch.bfloat16, torch.float16):
        c = x.to(dtype).cuda()
        rows = gather_tokens(c, Selection((0, 1, 2, 3), 64), 16).cpu()
        for name, role in (("fp8", "k"), ("int4", "k"), ("int4", "v")):
            codec = kvwire.codec.get(name)
            got = kernels.encode(gpu, codec, kernels.Chunk.paged(c, [0, 1, 2, 3], 0, 64, 16), role)
            assert torch.equal(got.cpu(), codec.encode(rows, role, 16).data), (dtype, name, role)


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
            assert tx._kernels is not None, "the sender should use the CUDA kernels"
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


@pytest.mark.parametrize("codec_name", ["raw", "fp8", "int4"])
def test_gpu_to_gpu_transfer_between_processes(codec_name):
    _transfer_between_processes(codec_name, "tcp")


@pytest.mark.parametrize("n", [1, 1000, 4097, (2 << 20) + 5])
def test_gpu_crc32c_equals_the_host_crc32c(gpu, n):
    from crc32c import crc32c

    data = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    assert kernels.crc32c(gpu, data) == crc32c(data.cpu().numpy())


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
