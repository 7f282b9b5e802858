"""The CUDA kernels, compiled for the host and run through their real launchers.

Every kernel's bytes must equal the CPU reference (docs/formats.md). On a GPU machine
tests/test_gpu.py repeats these checks on the device.
"""

import shutil
import subprocess

import pytest
import torch

import kvwire.codec
from kvwire.blocks import gather_tokens
from kvwire.cuda import kernels
from kvwire.layout import Selection
from tests.helpers import (
    GEOMETRIES,
    KERNEL_CASES,
    SCALAR_KERNELS,
    paged_geometry,
    skip_geometry_the_codec_refuses,
    special_wire_bytes,
)

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
    ("int8h", "k", 2, 64, 16, 37, False),  # rotated rows: R = 64, one tile
    ("int8h", "v", 3, 48, 4, 9, True),  # R = 16: two blocks per 32-lane tile, the last tile half used
    ("int8h", "v", 2, 512, 16, 17, False),  # R = 256 (the cap): two tiles of 8 slots per lane
    ("int8h", "kv", 1, 576, 16, 17, False),  # an MLA latent: R = 64, nine tiles
    ("int4h", "k", 2, 64, 16, 37, False),  # int4 keys
    ("int4h/k32", "k", 2, 64, 16, 37, False),
    ("int4h", "v", 2, 128, 16, 21, False),  # R = 128: four slots per lane
    ("int4h", "v", 2, 96, 8, 12, True),  # R = 32
    ("int4h", "kv", 1, 576, 16, 17, False),
    ("int8h", "v", 2, 63, 16, 20, False),  # odd head_dim: R = 1, no rotation
    ("int4h", "v", 3, 6, 4, 10, False),  # R = 2: a row shorter than a tile, lanes past it idle
    ("int4a", "k", 2, 64, 16, 70, False),  # the int4 group, then coded groups, the last partial
    ("int4a", "k", 3, 32, 4, 9, True),  # one group only
    ("int4a", "k", 1, 128, 16, 33, False),  # one coded group of one token
    ("int4a", "k", 16, 64, 16, 40, False),  # more heads than the C helper's grid once had room for
    ("int4a", "v", 2, 64, 16, 70, False),  # int4h rows, then compact rows: an even count
    ("int4a", "v", 3, 128, 8, 45, True),  # an odd count: a head's last zero-point byte half used
    ("int4a", "v", 2, 64, 16, 20, False),  # int4h rows only
    ("int4a", "kv", 1, 576, 16, 40, False),  # an MLA latent: nine tiles a row
    ("int4a", "v", 2, 512, 16, 37, False),  # R = 256: two tiles of 8 slots per lane
    ("int4a", "k", 1, 64, 16, 1100, False),  # two windows of 1024 rows, the second partial
    ("int4a", "v", 2, 64, 16, 1100, True),
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


@pytest.mark.parametrize(
    "codec_name, role",
    KERNEL_CASES,
)
@pytest.mark.parametrize("kind", GEOMETRIES)
def test_every_layout_takes_the_kernel_it_should(backend, kind, codec_name, role):
    """The layouts tests/test_gpu.py runs on the GPU: vector kernels where the strides and
    the base allow 16-byte access, element-by-element ones elsewhere, same bytes."""
    src, vec = paged_geometry(kind, torch.float16)
    codec = kvwire.codec.get(codec_name)
    skip_geometry_the_codec_refuses(codec_name, role, src.shape[-1])
    ids, tokens = [4, 1, 3], 37
    plan = kernels._plan(backend, codec, kernels.Chunk.paged(src, ids, 0, tokens, 16), role, "encode")
    assert plan.vec == (vec and not plan.name.startswith(SCALAR_KERNELS)), plan.name
    rows = gather_tokens(src, Selection(tuple(ids), tokens), 16)
    want = codec.encode(rows, role, 16)
    got = kernels.encode(backend, codec, kernels.Chunk.paged(src, ids, 0, tokens, 16), role)
    assert torch.equal(got, want.data)
    dst = torch.zeros_like(src)
    kernels.decode(backend, codec, got, kernels.Chunk.paged(dst, ids, 0, tokens, 16), role)
    placed = gather_tokens(dst, Selection(tuple(ids), tokens), 16)
    assert torch.equal(placed.view(torch.int16), codec.decode(want).reshape(rows.shape).contiguous().view(torch.int16))
    assert (dst[[0, 2, 5]] == 0).all()


def test_a_chunk_in_the_middle_of_a_request(backend):
    codec = kvwire.codec.get("int4")
    src = make_cache(8, 16, 2, 64, torch.bfloat16, False, seed=3)
    ids = [5, 1, 7, 0]
    chunk = kernels.Chunk.paged(src, ids, 32, 20, 16)  # rows 32..51: blocks 7 and 0
    rows = gather_tokens(src, Selection(tuple(ids), 52), 16, 32, 52)
    assert torch.equal(kernels.encode(backend, codec, chunk, "k"), codec.encode(rows, "k", 16).data)


@pytest.mark.parametrize("name", ["fp8", "int4", "raw", "int8h", "int4h", "int4a"])
def test_states(backend, name):
    codec = kvwire.codec.get(name)
    state = torch.randn(2, 64, 64).to(torch.float16)
    got = kernels.encode(backend, codec, kernels.Chunk.state(backend, state, 10, 50), "state")
    want = codec.encode(state.reshape(-1, 64)[10:60], "state").data
    assert torch.equal(got, want)
    out = torch.zeros_like(state)
    kernels.decode(backend, codec, got, kernels.Chunk.state(backend, out, 10, 50), "state")
    ref = codec.decode(codec.encode(state.reshape(-1, 64)[10:60], "state")).view(50, 64)
    assert torch.equal(out.view(-1, 64)[10:60], ref)
    assert (out.view(-1, 64)[:10] == 0).all() and (out.view(-1, 64)[60:] == 0).all()


def test_special_values(backend):
    x = torch.randn(4, 16, 1, 64)
    x[0, 0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    x[1, 3, 0] = 0.0
    x[2, 5, 0, 7] = 1e-9
    x[3, 1, 0, 9] = 60000.0
    x[1, 4, 0] = -0.0  # a row of negative zeros
    x[2, 6, 0] *= 1e-30  # below 2^-91 (in bf16): a zero row for int8h and int4h
    x[3, 7, 0, ::2] = 3e38  # the largest bf16 values (inf in fp16)
    for dtype in (torch.bfloat16, torch.float16):
        cache = x.to(dtype)
        rows = gather_tokens(cache, Selection((0, 1, 2, 3), 64), 16)
        cases = (("fp8", "k"), ("int4", "k"), ("int4", "v"), ("int8h", "k"), ("int4h", "v"), ("int4a", "k"),
                 ("int4a", "v"))  # fmt: skip
        for name, role in cases:
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
    wide = torch.zeros(2, 16, 1, kernels.A_MAX_KEY_DIM + 8, dtype=torch.float16)  # int4a keys' shared memory
    with pytest.raises(ValueError, match=f"at most {kernels.A_MAX_KEY_DIM} channels, got {kernels.A_MAX_KEY_DIM + 8}"):
        kernels.encode(backend, kvwire.codec.get("int4a"), kernels.Chunk.paged(wide, [0], 0, 16, 16), "k")


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


# -- decoding any bytes: the kernels write what the CPU reference writes -----------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, role", [("fp8", "k"), ("int4", "k"), ("int4", "v"), ("int8h", "k"), ("int4h", "v")])
def test_decoding_any_bytes_equals_the_cpu_reference(backend, dtype, name, role):
    """Bytes no encoder writes but a peer may send: NaN codes (0x7F, 0xFF), NaN and
    infinite scales and zero-points. Every NaN must come out as the dtype's one canonical
    NaN (docs/formats.md), in the kernels as in the CPU reference."""
    codec = kvwire.codec.get(name, group_size=32)
    T, H, D, bs = 20, 3, 64, 8
    spec = kvwire.codec.ChunkSpec(T, H, D, dtype, role, bs)
    data = special_wire_bytes(codec, spec, seed=T)
    want = codec.decode_bytes(data, spec).reshape(T, H, D)
    assert torch.isnan(want).any()  # the case is real
    dst = torch.zeros(-(-T // bs) + 1, bs, H, D, dtype=dtype)
    ids = list(range(1, -(-T // bs) + 1))
    kernels.decode(backend, codec, data, kernels.Chunk.paged(dst, ids, 0, T, bs), role)
    got = gather_tokens(dst, Selection(tuple(ids), T), bs)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("role, T", [("k", 40), ("v", 45)])
def test_int4a_decoding_any_bytes_equals_the_cpu_reference(backend, dtype, role, T):
    """Random bytes: NaN and infinite ranges (NaN weights: the bits fall back to 0 weight),
    any base scale (steps past fp32's range both ways), any bound codes and zero-points."""
    codec = kvwire.codec.get("int4a")
    H, D, bs = 2, 64, 8
    spec = kvwire.codec.ChunkSpec(T, H, D, dtype, role, bs)
    data = torch.randint(
        0, 256, (codec.encoded_size(spec),), generator=torch.Generator().manual_seed(T), dtype=torch.uint8
    )
    if role == "k":  # a NaN and an infinite range among the random ones
        ranges = data[4 * H * D + 16 * H * D // 2 :].view(torch.int16)
        ranges[0], ranges[H * D + 1] = 0x7E00, 0x7C00
    want = codec.decode_bytes(data, spec).reshape(T, H, D)
    dst = torch.zeros(-(-T // bs) + 1, bs, H, D, dtype=dtype)
    ids = list(range(1, -(-T // bs) + 1))
    kernels.decode(backend, codec, data, kernels.Chunk.paged(dst, ids, 0, T, bs), role)
    got = gather_tokens(dst, Selection(tuple(ids), T), bs)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


# -- what the launchers refuse before a kernel could fault ---------------------------------------
def _fp16_cache(blocks=2, bs=16, H=1, D=64):
    return torch.randn(blocks, bs, H, D).to(torch.float16)


@pytest.mark.parametrize("name, offset", [("fp8", 2), ("fp8", 1), ("int4", 2), ("raw", 1)])
def test_misaligned_buffers_are_refused_with_a_clear_error(backend, name, offset):
    """fp8 and int4 values write 4-byte words, raw 2-byte elements: a view that starts
    off those boundaries raises ValueError (on a GPU it would kill the CUDA context)."""
    codec = kvwire.codec.get(name)
    cache = _fp16_cache()
    chunk = kernels.Chunk.paged(cache, [0, 1], 0, 32, 16)
    size = codec.encoded_size(kvwire.codec.ChunkSpec(32, 1, 64, torch.float16, "v", 16))
    out = torch.zeros(size + 16, dtype=torch.uint8)[offset : offset + size]
    with pytest.raises(ValueError, match=r"out: must start on a \d+-byte boundary"):
        kernels.encode(backend, codec, chunk, "v", out=out)
    with pytest.raises(ValueError, match=r"data: must start on a \d+-byte boundary"):
        kernels.decode(backend, codec, out, chunk, "v")
    assert torch.equal(out, torch.zeros_like(out))  # nothing was written


def test_raw_into_a_buffer_that_is_not_16_byte_aligned_copies_element_by_element(backend):
    codec = kvwire.codec.get("raw")
    cache = _fp16_cache()
    chunk = kernels.Chunk.paged(cache, [1, 0], 0, 20, 16)
    want = kernels.encode(backend, codec, chunk, "k")
    out = torch.zeros(want.numel() + 16, dtype=torch.uint8)[2 : 2 + want.numel()]  # 2-byte aligned only
    assert torch.equal(kernels.encode(backend, codec, chunk, "k", out=out), want)
    dst = torch.zeros_like(cache)
    kernels.decode(backend, codec, out, kernels.Chunk.paged(dst, [1, 0], 0, 20, 16), "k")
    assert torch.equal(dst[1].view(torch.int16), cache[1].view(torch.int16))
    assert torch.equal(dst[0, :4].view(torch.int16), cache[0, :4].view(torch.int16))


def test_buffers_of_the_wrong_shape_or_device_are_refused(backend):
    codec = kvwire.codec.get("fp8")
    chunk = kernels.Chunk.paged(_fp16_cache(), [0, 1], 0, 32, 16)
    size = codec.encoded_size(kvwire.codec.ChunkSpec(32, 1, 64, torch.float16, "k", 16))
    with pytest.raises(ValueError, match="out: expected a contiguous 1-D uint8"):
        kernels.encode(backend, codec, chunk, "k", out=torch.zeros(2 * size, dtype=torch.uint8)[::2])
    with pytest.raises(ValueError, match="out: expected a contiguous 1-D uint8"):
        kernels.encode(backend, codec, chunk, "k", out=torch.zeros(2, size, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out: needs"):
        kernels.encode(backend, codec, chunk, "k", out=torch.zeros(size - 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out: on meta"):
        kernels.encode(backend, codec, chunk, "k", out=torch.empty(size, dtype=torch.uint8, device="meta"))
    with pytest.raises(ValueError, match="data: on meta"):
        kernels.decode(backend, codec, torch.empty(size, dtype=torch.uint8, device="meta"), chunk, "k")
    meta_cache = torch.empty(2, 16, 1, 64, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="cache: on meta"):
        kernels.encode(backend, codec, kernels.Chunk.paged(meta_cache, [0, 1], 0, 32, 16), "k")
    with pytest.raises(ValueError, match="data: on meta"):
        kernels.crc32c(backend, torch.empty(8, dtype=torch.uint8, device="meta"))


def test_block_ids_outside_the_cache_are_refused(backend):
    cache = _fp16_cache(blocks=3)
    with pytest.raises(ValueError, match="block 3 is out of range for 3 blocks"):
        kernels.Chunk.paged(cache, [0, 3], 0, 32, 16)
    with pytest.raises(ValueError, match="rows up to 48 need 3"):
        kernels.Chunk.paged(cache, [0, 1], 0, 48, 16)
    table = kernels.BlockTable([2, 1, 5], torch.device("cpu"))
    with pytest.raises(ValueError, match="block 5 is out of range for 3 blocks"):
        kernels.Chunk.paged(cache, table, 0, 32, 16)
    with pytest.raises(ValueError, match=r"block_ids: block ids must be in \[0, 2\*\*31\)"):
        kernels.BlockTable([0, -1], torch.device("cpu"))


def test_a_block_table_is_read_only_on_the_stream_it_was_made_on(backend):
    """A table copied on one stream and read by a kernel on another could be read before
    the copy lands: the launchers refuse it. (No CUDA here: the table claims a stream.)"""
    cache = _fp16_cache()
    table = kernels.BlockTable([1, 0], torch.device("cpu"))
    table.stream = "another stream"
    with pytest.raises(ValueError, match="made on another stream"):
        kernels.encode(backend, kvwire.codec.get("fp8"), kernels.Chunk.paged(cache, table, 0, 32, 16), "k")


def test_a_chunk_of_a_transfer_table_reads_its_own_blocks(backend):
    """A transfer's table made once, chunks taken at their offsets into it (as the engine
    does) give the bytes that per-chunk lists give."""
    codec = kvwire.codec.get("int4")
    cache = make_cache(8, 16, 2, 64, torch.bfloat16, False, seed=5)
    ids = [5, 1, 7, 0, 3]
    table = kernels.BlockTable(ids, torch.device("cpu"))
    for start, count in ((0, 32), (32, 20), (64, 16)):
        a = kernels.encode(backend, codec, kernels.Chunk.paged(cache, table, start, count, 16), "v")
        b = kernels.encode(backend, codec, kernels.Chunk.paged(cache, ids, start, count, 16), "v")
        assert torch.equal(a, b), (start, count)


def test_state_chunks_use_the_backends_constant_table(backend):
    state = torch.randn(2, 8, 64).to(torch.bfloat16)
    chunk = kernels.Chunk.state(backend, state, 0, 16)
    assert chunk.table is backend.zero_table and backend.zero_table.stream is None  # complete, any stream
    assert backend.zero_table.ids.tolist() == [0]


# -- the engine's GPU paths (staged, over TCP) on the host emulation ----------------------------
@pytest.mark.parametrize("codec", ["fp8", "int4+lz4", "raw"])
def test_engine_gpu_paths_make_one_block_table_per_transfer(backend, codec):
    """The sender's and the receiver's staged GPU paths with the emulated kernels (passed
    as ``kernels=``): many chunks per layer, states included, and each side copies the
    transfer's block table once, not once per chunk."""
    import kvwire
    from kvwire.engine.placement import GpuStagedEncoder
    from tests.helpers import SECRET, assert_transferred, filled, random_states

    layout = kvwire.KVLayout.hybrid("LFLF", num_kv_heads=2, head_dim=64, state_shape=(2, 16, 64), block_size=16)
    dst = layout.allocate(16)
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=dst, kernels=backend)
    made = backend.tables.made
    try:
        src = filled(layout, 16, seed=3)
        src_states = random_states(layout)
        dst_states = {i: torch.zeros_like(t) for i, t in src_states.items()}
        src_ids, dst_ids = list(range(15, 2, -1)), list(range(13))
        h = rx.expect("e", dst_ids, 200, states=dst_states)
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=src, codec=codec, streams=2,
                           chunk_bytes=4 << 10, kernels=backend) as tx:  # fmt: skip
            assert isinstance(tx.encoder, GpuStagedEncoder)
            stats = tx.send("e", src_ids, 200, states=src_states, timeout=60)
        h.wait(timeout=30)
    finally:
        rx.close()
    assert stats["chunks"] > 4 * layout.num_layers  # several chunks per tensor
    # One for the receiver's transfer, one for the sender's (with kernels, raw goes through
    # them too, as it does from GPU caches).
    assert backend.tables.made - made == 2
    assert_transferred(layout, src, src_ids, dst, dst_ids, 200, codec.split("+")[0], src_states, dst_states)


# -- which kernels a GPU loads: a fatbin only if it was built from this source ------------------
def test_a_fatbin_is_taken_only_with_the_hash_of_the_current_source(tmp_path, monkeypatch):
    fatbin = tmp_path / "kvwire_kernels.fatbin"
    monkeypatch.setenv("KVWIRE_FATBIN", str(fatbin))
    path, why = kernels.prebuilt_fatbin()
    assert path is None and "no prebuilt fatbin" in why
    fatbin.write_bytes(b"\x00" * 64)
    path, why = kernels.prebuilt_fatbin()
    assert path is None and "no kvwire_kernels.fatbin.sha256 beside it" in why
    stamp = tmp_path / "kvwire_kernels.fatbin.sha256"
    stamp.write_text("0" * 64 + "\n")  # built from another version of the source
    path, why = kernels.prebuilt_fatbin()
    assert path is None and "refused: built from source 000000000000" in why
    stamp.write_text(kernels.source_hash() + "  src_cuda/kvwire_kernels.cu\n")  # sha256sum's format too
    path, why = kernels.prebuilt_fatbin()
    assert path == fatbin and why.startswith("prebuilt")


def test_the_build_stamps_a_fatbin_with_the_hash_the_loader_checks(tmp_path):
    """CMake writes the stamp with src_cuda/source_hash.cmake: it must be the hash that
    prebuilt_fatbin compares with (building the fatbin itself needs nvcc: CI does it)."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("needs cmake")
    out = tmp_path / "stamp"
    script = kernels.source_dir() / "source_hash.cmake"
    source = kernels.source_dir() / kernels.SOURCE_NAME
    subprocess.run([cmake, f"-DSOURCE={source}", f"-DOUT={out}", "-P", str(script)], check=True)
    assert out.read_text().split() == [kernels.source_hash()]


# -- bench/gpu_check, without a GPU ----------------------------------------------------------
def test_gpu_check_lists_every_gpu_test_and_runs_on_the_host_emulation():
    """The script that a first GPU machine runs must at least start here: --list names
    every test of tests/test_gpu.py (so none runs unreported), and --dry-run takes its
    workload and timings code through the host emulation."""
    import re
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = str(root / "bench" / "gpu_check")
    listed = subprocess.run([sys.executable, script, "--list"], capture_output=True, text=True, check=True).stdout
    for part in ("env", "compile", "load", "tests", "timings", "sanitizer", "sharded"):
        assert re.search(rf"^  {part} ", listed, re.M), part
    gpu_tests = re.findall(r"^def (test_\w+)", (root / "tests" / "test_gpu.py").read_text(), re.M)
    assert gpu_tests and [t for t in gpu_tests if f"[{t}]" not in listed] == []
    dry = subprocess.run([sys.executable, script, "--dry-run"], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "workload: " in dry.stdout and "crc32c 64 KiB" in dry.stdout
    # the sharded part: both directions ran, verified, and their rows reached the table
    assert re.search(r"^sharded \(256 tokens\)\s+pass ", dry.stdout, re.M), dry.stdout[-2000:]
    assert re.search(r"^1 -> 2 +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+  [0-9.]+, [0-9.]+$", dry.stdout, re.M)
    assert re.search(r"^2 -> 1 +[0-9.]+", dry.stdout, re.M)
