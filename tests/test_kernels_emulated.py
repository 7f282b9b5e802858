"""The CUDA kernels, compiled for the host and run through their real launchers.

Every kernel's bytes must equal the CPU reference (docs/formats.md). On a GPU machine
tests/test_gpu.py repeats these checks on the device.
"""

import shutil

import pytest
import torch

import kvwire.codec
from kvwire.cuda import kernels
from kvwire.layout import Selection, gather_tokens

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the host emulation")


@pytest.fixture(scope="module")
def backend():
    return kernels.EmulatedBackend.build()


def make_cache(num_blocks, bs, H, D, dtype, hnd, seed):
    g = torch.Generator().manual_seed(seed)
    if hnd:  # stored [blocks, H, bs, D], passed as the [blocks, bs, H, D] view
        return torch.randn(num_blocks, H, bs, D, generator=g).to(dtype).transpose(1, 2)
    return torch.randn(num_blocks, bs, H, D, generator=g).to(dtype)


CASES = [
    # codec, role, H, D, bs, tokens, hnd
    ("raw", "k", 2, 64, 16, 37, False),
    ("raw", "v", 3, 40, 4, 9, True),
    ("fp8", "k", 2, 64, 16, 37, False),
    ("fp8", "v", 2, 64, 8, 20, True),
    ("fp8", "kv", 1, 576, 16, 17, False),
    ("int4", "k", 2, 64, 16, 37, False),
    ("int4", "k", 2, 32, 4, 10, True),
    ("int4", "v", 2, 128, 16, 21, False),
    ("int4", "v", 2, 64, 8, 12, True),
    ("int4", "kv", 1, 576, 16, 17, False),
    ("int4/k32", "k", 2, 64, 16, 37, False),  # key groups of 32 tokens over blocks of 16
    ("int4/k64", "k", 2, 32, 4, 70, True),  # ... of 64 over blocks of 4, the last group partial
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, role, H, D, bs, tokens, hnd", CASES)
def test_kernel_bytes_equal_the_cpu_reference(backend, dtype, name, role, H, D, bs, tokens, hnd):
    codec = kvwire.codec.get(name, group_size=64 if D % 64 == 0 else 32)
    nb = -(-tokens // bs)
    src = make_cache(nb + 3, bs, H, D, dtype, hnd, seed=tokens)
    src_ids = list(range(nb + 2, 1, -1))[:nb]
    sel = Selection(tuple(src_ids), tokens)
    if D == 576:
        src = src[:, :, 0, :]  # an MLA latent cache: [blocks, bs, D]
    rows = gather_tokens(src, sel, bs)
    want = codec.encode(rows, role, bs).data

    got = kernels.encode(backend, codec, kernels.Chunk.paged(src, src_ids, 0, tokens, bs), role)
    assert torch.equal(got, want)

    dst = torch.zeros_like(src)
    dst_ids = list(range(nb))
    kernels.decode(backend, codec, got, kernels.Chunk.paged(dst, dst_ids, 0, tokens, bs), role)
    expected = codec.decode_bytes(want, codec.encode(rows, role, bs).spec)
    placed = gather_tokens(dst, Selection(tuple(dst_ids), tokens), bs)
    assert torch.equal(placed.view(torch.int16), expected.reshape(placed.shape).contiguous().view(torch.int16))
    if tokens % bs:  # the tail of the last block is untouched
        assert (dst[dst_ids[-1], tokens % bs :] == 0).all()


def test_a_chunk_in_the_middle_of_a_request(backend):
    codec = kvwire.codec.get("int4")
    src = make_cache(8, 16, 2, 64, torch.bfloat16, False, seed=3)
    ids = [5, 1, 7, 0]
    chunk = kernels.Chunk.paged(src, ids, 32, 20, 16)  # rows 32..51: blocks 7 and 0
    rows = gather_tokens(src, Selection(tuple(ids), 52), 16, 32, 52)
    assert torch.equal(kernels.encode(backend, codec, chunk, "k"), codec.encode(rows, "k", 16).data)


@pytest.mark.parametrize("name", ["fp8", "int4", "raw"])
def test_states(backend, name):
    codec = kvwire.codec.get(name)
    state = torch.randn(2, 64, 64).to(torch.float16)
    got = kernels.encode(backend, codec, kernels.Chunk.state(state, 10, 50), "state")
    want = codec.encode(state.reshape(-1, 64)[10:60], "state").data
    assert torch.equal(got, want)
    out = torch.zeros_like(state)
    kernels.decode(backend, codec, got, kernels.Chunk.state(out, 10, 50), "state")
    ref = codec.decode(codec.encode(state.reshape(-1, 64)[10:60], "state")).view(50, 64)
    assert torch.equal(out.view(-1, 64)[10:60], ref)
    assert (out.view(-1, 64)[:10] == 0).all() and (out.view(-1, 64)[60:] == 0).all()


def test_special_values(backend):
    x = torch.randn(4, 16, 1, 64)
    x[0, 0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    x[1, 3, 0] = 0.0
    x[2, 5, 0, 7] = 1e-9
    x[3, 1, 0, 9] = 60000.0
    for dtype in (torch.bfloat16, torch.float16):
        cache = x.to(dtype)
        rows = gather_tokens(cache, Selection((0, 1, 2, 3), 64), 16)
        for name, role in (("fp8", "k"), ("int4", "k"), ("int4", "v")):
            codec = kvwire.codec.get(name)
            got = kernels.encode(backend, codec, kernels.Chunk.paged(cache, [0, 1, 2, 3], 0, 64, 16), role)
            assert torch.equal(got, codec.encode(rows, role, 16).data), (dtype, name, role)


def test_launcher_rejects_bad_inputs(backend):
    codec = kvwire.codec.get("fp8")
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        kernels.encode(backend, codec, kernels.Chunk.paged(torch.zeros(2, 16, 1, 64), [0], 0, 16, 16), "k")
    with pytest.raises(ValueError, match="multiple of the block size"):
        kernels.Chunk.paged(torch.zeros(2, 16, 1, 64, dtype=torch.float16), [0, 1], 8, 8, 16)
    cache = torch.zeros(2, 16, 1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="chunk must be"):
        kernels.decode(
            backend, codec, torch.zeros(10, dtype=torch.uint8), kernels.Chunk.paged(cache, [0], 0, 16, 16), "k"
        )


@pytest.mark.parametrize("n", [0, 1, 3, 1023, 1024, 1025, 4096 + 7, 70_001])
def test_device_crc32c_equals_the_host_checksum(backend, n):
    """The frame checksum computed where the payload lies (device memory on a GPU) must be
    the CRC32C the sender and the protocol use (docs/protocol.md)."""
    from crc32c import crc32c

    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert kernels.crc32c(backend, data) == crc32c(data.numpy())


def test_device_crc32c_sees_a_single_flipped_bit(backend):
    data = torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    before = kernels.crc32c(backend, data)
    data[4321] ^= 8
    assert kernels.crc32c(backend, data) != before


def test_device_crc32c_rejects_other_dtypes(backend):
    with pytest.raises(ValueError, match="uint8"):
        kernels.crc32c(backend, torch.zeros(4, dtype=torch.int32))
