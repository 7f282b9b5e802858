import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvwire.codec
import kvwire.scatter
from kvwire.codec import ChunkSpec
from kvwire.codec.fp8 import E4M3_NAN
from kvwire.codec.lz4stage import LZ4_BLOCK
from kvwire.codec.synthetic import realistic_keys, relative_mse

DTYPES = [torch.bfloat16, torch.float16, torch.float32]

shapes = st.tuples(
    st.integers(1, 70),  # tokens: often not a multiple of the block size
    st.integers(1, 4),  # heads
    st.sampled_from([64, 128, 192, 256]),  # head_dim
)


def gaussian(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_raw_roundtrips_every_bit_pattern(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (math.prod(shape) * torch.empty((), dtype=dtype).element_size(),), generator=g)
    x = bits.to(torch.uint8).view(dtype).view(shape)  # includes NaN payloads, inf, subnormals
    for name in ("raw", "raw+lz4"):
        codec = kvwire.codec.get(name)
        y = codec.decode(codec.encode(x, "k"))
        assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))


@given(shape=shapes, dtype=st.sampled_from(DTYPES), role=st.sampled_from(["k", "v"]), seed=st.integers(0, 2**16))
def test_fp8_relative_mse_on_gaussian(shape, dtype, role, seed):
    x = gaussian(shape, dtype, seed)
    codec = kvwire.codec.get("fp8")
    enc = codec.encode(x, role)
    assert enc.nbytes == codec.encoded_size(enc.spec) == shape[0] * shape[1] * (4 + shape[2])
    assert relative_mse(x, codec.decode(enc)) <= 1e-3


@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    role=st.sampled_from(["k", "v", "kv"]),
    block_size=st.sampled_from([16, 32, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_int4_relative_mse_on_gaussian(shape, dtype, role, block_size, seed):
    x = gaussian(shape, dtype, seed)
    codec = kvwire.codec.get("int4", group_size=64)
    enc = codec.encode(x, role, block_size)
    T, H, D = shape
    groups = (-(-T // block_size) * H * D) if role == "k" else T * H * D // 64
    assert enc.nbytes == codec.encoded_size(enc.spec) == groups * 4 + T * H * D // 2
    assert relative_mse(x, codec.decode(enc)) <= 1.5e-2


@given(shape=shapes, name=st.sampled_from(["fp8+lz4", "int4+lz4"]), seed=st.integers(0, 2**16))
def test_lz4_stage_is_lossless_over_its_inner_codec(shape, name, seed):
    x = gaussian(shape, torch.bfloat16, seed)
    outer, inner = kvwire.codec.get(name), kvwire.codec.get(name.split("+")[0])
    enc = outer.encode(x, "v")
    assert enc.nbytes <= outer.encoded_size(enc.spec)
    assert torch.equal(outer.decode(enc), inner.decode(inner.encode(x, "v")))


@pytest.mark.parametrize(
    "dtype, head_dim, ratio",
    [(torch.bfloat16, 128, 256 / 132), (torch.float16, 64, 128 / 68), (torch.float32, 128, 512 / 132)],
)
def test_fp8_compression_ratio_matches_the_format(dtype, head_dim, ratio):
    x = gaussian((64, 8, head_dim), dtype, 0)
    enc = kvwire.codec.get("fp8").encode(x, "k")
    assert x.numel() * x.element_size() / enc.nbytes == pytest.approx(ratio)
    if dtype == torch.bfloat16:
        assert round(ratio, 2) == 1.94


def test_fp8_golden_bytes():
    # amax 4 -> scale 4/448; x * (1/scale) = 112, -224, 56, 448 -> e4m3 0x6E, 0xF6, 0x66, 0x7E.
    x = torch.tensor([[[1.0, -2.0, 0.5, 4.0]]])
    enc = kvwire.codec.get("fp8").encode(x, "k")
    scale = torch.tensor([4.0 / 448.0], dtype=torch.float32)
    assert enc.tobytes() == scale.numpy().tobytes() + bytes([0x6E, 0xF6, 0x66, 0x7E])


def test_fp8_special_values():
    x = torch.tensor([[[0.0] * 4], [[1.0, math.inf, -math.inf, math.nan]], [[math.nan] * 4]])
    codec = kvwire.codec.get("fp8")
    enc = codec.encode(x, "v")
    scales = enc.data[:12].clone().view(torch.float32)
    codes = enc.data[12:].view(3, 4)
    assert scales.tolist() == [1.0, pytest.approx(1.0 / 448.0), 1.0]  # zero and all-NaN rows: scale 1
    assert codes[0].tolist() == [0, 0, 0, 0]
    assert codes[1].tolist()[1:] == [0x7E, 0xFE, E4M3_NAN]  # +inf, -inf saturate; NaN canonical
    y = codec.decode(enc)
    assert (y[0] == 0).all()
    assert y[1, 0, 1] == 1.0 and y[1, 0, 2] == -1.0  # inf -> the row's amax
    assert torch.isnan(y[1, 0, 3]) and torch.isnan(y[2]).all()


def test_fp8_saturates_instead_of_overflowing():
    x = torch.tensor([[[1e30, -3e38, 5.0, 0.0]]], dtype=torch.float32)
    y = kvwire.codec.get("fp8").decode(kvwire.codec.get("fp8").encode(x, "k"))
    assert torch.isfinite(y).all()
    assert y[0, 0, 1] == pytest.approx(-3e38, rel=0.07)


@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("value", [0.0, 1.5, -3.25, 1000.0])
def test_int4_constant_groups_are_exact(role, value):
    x = torch.full((40, 2, 64), value, dtype=torch.bfloat16)
    codec = kvwire.codec.get("int4")
    assert torch.equal(codec.decode(codec.encode(x, role, 16)), x)


def test_int4_extremes_reach_both_ends_of_the_code_range():
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 64)
    enc = kvwire.codec.get("int4").encode(x, "v")
    packed = enc.data[4:]
    codes = torch.stack([packed & 15, packed >> 4], -1).flatten()
    assert codes[0] == 0 and codes[-1] == 15


def test_int4_handles_non_finite_values():
    x = torch.randn(16, 1, 64)
    x[0, 0, 0], x[1, 0, 1], x[2, 0, 2] = math.inf, -math.inf, math.nan
    codec = kvwire.codec.get("int4")
    for role in ("k", "v"):
        y = codec.decode(codec.encode(x, role))
        assert torch.isfinite(y).all()
        finite = torch.isfinite(x)
        assert relative_mse(x[finite], y[finite]) < 1.5e-2


def test_int4_per_channel_keys_beat_per_token_on_realistic_keys():
    keys = realistic_keys(512, 8, 128, seed=3)
    codec = kvwire.codec.get("int4", group_size=64)
    per_channel = relative_mse(keys, codec.decode(codec.encode(keys, "k", 16)))
    per_token = relative_mse(keys, codec.decode(codec.encode(keys, "v", 16)))
    assert per_channel * 3 < per_token, (per_channel, per_token)


def test_int4_partial_last_key_block_uses_only_present_tokens():
    x = torch.randn(17, 1, 64)
    x[16] = 100.0  # alone in its block: that group is constant, so exact
    codec = kvwire.codec.get("int4")
    y = codec.decode(codec.encode(x, "k", 16))
    assert torch.equal(y[16], x[16])


def test_lz4_stores_incompressible_blocks_and_shrinks_compressible_ones():
    codec = kvwire.codec.get("raw+lz4")
    noise = torch.randint(0, 256, (LZ4_BLOCK * 2 + 100,), dtype=torch.uint8).view(torch.bfloat16).view(-1, 1, 2)
    enc = codec.encode(noise, "k")
    assert enc.nbytes == noise.numel() * 2 + 4 * 3  # three blocks stored as is, header each
    zeros = torch.zeros(4096, 8, 128, dtype=torch.bfloat16)
    assert codec.encode(zeros, "k").nbytes < 0.01 * zeros.numel() * 2


def test_lz4_bplanes_help_bf16():
    x = realistic_keys(1024, 8, 128)
    plain = kvwire.codec.get("raw+lz4").encode(x, "k").nbytes
    assert plain < x.numel() * 2 * 0.95  # the exponent plane compresses


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: kvwire.codec.get("zstd"), ValueError, "unknown codec"),
        (lambda: kvwire.codec.get("fp8+zstd"), ValueError, "stage"),
        (lambda: kvwire.codec.get("int4", group_size=48), ValueError, "group_size"),
        (lambda: kvwire.codec.get("raw").encode(torch.zeros(4, 2, 8, dtype=torch.int32), "k"), TypeError, "dtype"),
        (lambda: kvwire.codec.get("raw").encode(torch.zeros(4, 2, 2, 8), "k"), ValueError, "shape"),
        (lambda: kvwire.codec.get("raw").encode(torch.zeros(4, 8), "q"), ValueError, "role"),
        (lambda: kvwire.codec.get("int4").encode(torch.zeros(4, 2, 63), "k"), ValueError, "even"),
        (lambda: kvwire.codec.get("int4").encode(torch.zeros(4, 2, 96), "v"), ValueError, "group_size"),
        (lambda: kvwire.codec.get("raw").encode([1.0], "k"), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("name", kvwire.codec.NAMES)
def test_truncated_or_padded_bytes_are_rejected(name):
    codec = kvwire.codec.get(name)
    x = gaussian((20, 2, 64), torch.float16, 1)
    enc = codec.encode(x, "v")
    with pytest.raises(ValueError, match="buf"):
        codec.decode_bytes(enc.data[:-1], enc.spec)
    with pytest.raises(ValueError, match="buf"):
        codec.decode_bytes(torch.cat([enc.data, torch.zeros(3, dtype=torch.uint8)]), enc.spec)


def test_decode_into_out_and_non_contiguous_input():
    x = gaussian((8, 64, 4), torch.bfloat16, 2).transpose(1, 2)  # non-contiguous [8, 4, 64]
    codec = kvwire.codec.get("fp8")
    out = torch.empty(8, 4, 64, dtype=torch.bfloat16)
    assert codec.decode(codec.encode(x, "k"), out=out) is out
    assert relative_mse(x, out) < 1e-3
    with pytest.raises(TypeError, match="out"):
        codec.decode(codec.encode(x, "k"), out=torch.empty(8, 4, 64))


def test_states_and_latents_use_the_value_rule():
    codec = kvwire.codec.get("int4", group_size=64)
    state = gaussian((2, 64, 64), torch.bfloat16, 5)
    enc = codec.encode(state, "state")
    assert enc.spec.shape == (128, 1, 64)
    assert codec.decode(enc).view(2, 64, 64).shape == state.shape
    latent = gaussian((33, 576), torch.bfloat16, 6)
    assert kvwire.codec.get("fp8").encode(latent, "kv").spec.shape == (33, 1, 576)


def test_descriptor_roundtrip():
    for name in kvwire.codec.NAMES:
        codec = kvwire.codec.get(name, group_size=128)
        assert kvwire.codec.get(codec.descriptor).descriptor == codec.descriptor


# -- the vectorised reference against docs/formats.md implemented element by element ----------
from tests import spec_scalar  # noqa: E402

special = st.sampled_from(
    [0.0, -0.0, 1e-8, -1e-8, 1e-3, 448.0, 1e4, -1e4, 3e38, math.inf, -math.inf, math.nan, 1e-40, -2e-39]
)  # tiny subnormals: a scale whose reciprocal overflows
element = st.one_of(st.floats(-20, 20, width=32), special)


@settings(max_examples=25)
@given(
    st.lists(element, min_size=64, max_size=64 * 3).map(lambda v: v[: len(v) // 64 * 64]),
    st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
)
def test_fp8_bytes_follow_the_written_format(values, dtype):
    x = torch.tensor(values).to(dtype).view(-1, 1, 64)
    ours = kvwire.codec.get("fp8").encode(x, "v").tobytes()
    assert ours == spec_scalar.fp8_encode(x.float().numpy())


@settings(max_examples=25)
@given(
    st.lists(element, min_size=64, max_size=64 * 5).map(lambda v: v[: len(v) // 64 * 64]),
    st.sampled_from(["k", "v"]),
    st.sampled_from([torch.bfloat16, torch.float16]),
)
def test_int4_bytes_follow_the_written_format(values, role, dtype):
    x = torch.tensor(values).to(dtype).view(-1, 2, 32)
    ours = kvwire.codec.get("int4", group_size=32).encode(x, role, block_size=2).tobytes()
    assert ours == spec_scalar.int4_encode(x.float().numpy(), role, key_group=2, group_size=32)


half_bits = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7BFF, 0x0001, 0x8000]))
dtype_names = st.sampled_from(["bfloat16", "float16", "float32"])


@settings(max_examples=30)
@given(
    st.lists(st.one_of(st.floats(width=32), special), min_size=6, max_size=6),
    st.lists(st.one_of(st.integers(0, 255), st.sampled_from([0x7F, 0xFF, 0x80, 0x7E, 0xFE])), min_size=48, max_size=48),
    dtype_names,
)
def test_fp8_decoding_any_bytes_follows_the_written_format(scales, codes, dtype_name):
    """Any bytes a peer may send, NaN codes (0x7F, 0xFF) and non-finite scales included,
    decode to the elements docs/formats.md names: every NaN is the dtype's canonical one,
    the one the CUDA kernels write too."""
    T, H, D = 3, 2, 8
    data = np.array(scales, dtype="<f4").tobytes() + bytes(codes)
    spec = ChunkSpec(T, H, D, getattr(torch, dtype_name), "k")
    ours = kvwire.codec.get("fp8").decode_bytes(bytearray(data), spec)
    bits = ours.view(torch.int32 if dtype_name == "float32" else torch.int16).reshape(-1).tolist()
    mask = 0xFFFFFFFF if dtype_name == "float32" else 0xFFFF
    assert [b & mask for b in bits] == spec_scalar.fp8_decode(data, T, H, D, dtype_name)


@settings(max_examples=30)
@given(
    st.sampled_from(["k", "v"]),
    st.lists(half_bits, min_size=128, max_size=128),
    st.binary(min_size=48, max_size=48),
    dtype_names,
)
def test_int4_decoding_any_bytes_follows_the_written_format(role, params, packed, dtype_name):
    T, H, D, K, G = 3, 1, 32, 2, 32
    groups = -(-T // K) * H * D if role == "k" else T * H * (D // G)
    data = np.array(params[: 2 * groups], dtype="<u2").tobytes() + packed
    spec = ChunkSpec(T, H, D, getattr(torch, dtype_name), role, block_size=K)
    ours = kvwire.codec.get("int4", group_size=G).decode_bytes(bytearray(data), spec)
    bits = ours.view(torch.int32 if dtype_name == "float32" else torch.int16).reshape(-1).tolist()
    mask = 0xFFFFFFFF if dtype_name == "float32" else 0xFFFF
    if role == "k":
        group = lambda t, h, d: ((t // K) * H + h) * D + d
    else:
        group = lambda t, h, d: (t * H + h) * (D // G) + d // G
    assert [b & mask for b in bits] == spec_scalar.int4_decode(data, T, H, D, dtype_name, group)


@pytest.mark.parametrize("key_tokens, block_size", [(16, 4), (32, 16), (64, 16)])
def test_int4_key_groups_of_key_tokens_follow_the_written_format(key_tokens, block_size):
    """With ``key_tokens`` the key groups run over that many tokens whatever the block
    size (the last one partial); values are unaffected."""
    g = torch.Generator().manual_seed(key_tokens)
    x = (torch.randn(2 * key_tokens + 5, 2, 32, generator=g) * 3).to(torch.bfloat16)
    codec = kvwire.codec.get(f"int4/g32/k{key_tokens}")
    ours = codec.encode(x, "k", block_size=block_size).tobytes()
    assert ours == spec_scalar.int4_encode(x.float().numpy(), "k", key_group=key_tokens, group_size=32)
    y = codec.decode(codec.encode(x, "k", block_size)).float()
    assert ((y - x.float()) ** 2).mean() / (x.float() ** 2).mean() < 0.05  # decodes group by group too
    plain = kvwire.codec.get("int4/g32")
    assert codec.encode(x, "v", block_size).tobytes() == plain.encode(x, "v", block_size).tobytes()


def test_int4_larger_key_groups_shrink_the_keys():
    x = torch.randn(256, 8, 128).to(torch.bfloat16)
    sizes = {k: kvwire.codec.get("int4" if k is None else f"int4/k{k}").encode(x, "k", 16).nbytes for k in (None, 64)}
    assert x.numel() * 2 / sizes[None] == pytest.approx(2.67, abs=0.01)  # scale + zero per 16 tokens
    assert x.numel() * 2 / sizes[64] == pytest.approx(3.56, abs=0.01)  # per 64 tokens


@pytest.mark.parametrize("bad", ["int4/k48", "int4/k", "fp8/k64", "int4/x64"])
def test_bad_key_group_descriptors_are_refused(bad):
    with pytest.raises(ValueError, match="key_tokens|malformed"):
        kvwire.codec.get(bad)


# -- int8h and int4h: integers after a Hadamard rotation (docs/formats.md, "Rotated rows") -----
from kvwire.codec import rotated  # noqa: E402

rot_dims = st.sampled_from([2, 8, 48, 64, 96, 128, 256])  # rotation blocks of 2, 8, 16, 64, 32, 128, 256


@settings(max_examples=25, deadline=None)
@given(
    rot_dims,
    st.integers(1, 3),
    st.data(),
    st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
)
def test_rotated_bytes_follow_the_written_format(D, rows, data, dtype):
    """int8h (every role) and int4h's values, element by element as docs/formats.md says:
    special values, tiny rows (below 2^-91: zero rows), huge ones, signed zeros."""
    values = data.draw(st.lists(st.one_of(element, st.sampled_from([1e-30, -2e-28, 5e-38])), min_size=D * rows,
                                max_size=D * rows))  # fmt: skip
    x = torch.tensor(values).to(dtype).view(rows, 1, D)
    xf = x.float().numpy()
    assert kvwire.codec.get("int8h").encode(x, "k").tobytes() == spec_scalar.rot8_encode(xf)
    assert kvwire.codec.get("int4h").encode(x, "v").tobytes() == spec_scalar.rot4_encode(xf)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from([8, 4]),
    st.sampled_from([8, 48, 64, 128, 256]),
    st.lists(st.one_of(st.floats(width=32), special), min_size=3, max_size=3),
    st.data(),
    dtype_names,
)
def test_rotated_decoding_any_bytes_follows_the_written_format(bits, D, scales, data, dtype_name):
    """Bytes no encoder writes: NaN, infinite and negative scales and zero-points, the
    code -128. Every NaN comes out as the dtype's canonical one."""
    T, H = 3, 1
    if bits == 8:
        head = np.array(scales, dtype="<f4").tobytes()
    else:
        words = data.draw(st.lists(half_bits, min_size=2 * T, max_size=2 * T))  # as bf16 bit patterns
        head = np.array(words, dtype="<u2").tobytes()
    body = data.draw(st.binary(min_size=T * H * D * bits // 8, max_size=T * H * D * bits // 8))
    wire = head + body
    codec = kvwire.codec.get("int8h" if bits == 8 else "int4h")
    spec = ChunkSpec(T, H, D, getattr(torch, dtype_name), "v")
    ours = codec.decode_bytes(bytearray(wire), spec)
    got = ours.view(torch.int32 if dtype_name == "float32" else torch.int16).reshape(-1).tolist()
    mask = 0xFFFFFFFF if dtype_name == "float32" else 0xFFFF
    assert [b & mask for b in got] == spec_scalar.rot_decode(wire, T, H, D, dtype_name, bits)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([2, 16, 64, 128, 256, 384, 512]), st.integers(1, 40), st.integers(0, 2**16))
def test_rotation_is_the_hadamard_product_exactly(D, rows, seed):
    """However the rotation is factored (one product, or H_16 then H_(R/16) from R = 128),
    its result is the exact integer product, for the largest inputs the format allows."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(-(2**16), 2**16 + 1, (rows, D), generator=g, dtype=torch.int64)
    R = rotated.rotation_block(D)
    want = (n.view(rows, D // R, R) @ rotated.hadamard(R, torch.int64)).view(rows, D)
    assert torch.equal(rotated.rotate(n.float()), want.float())


def test_int8h_golden_bytes():
    # x = [1, 0, 0, 0]: e = 1, n = [2^15, 0, 0, 0], y = H n = [2^15] * 4, every code 127,
    # S = (2^15 / 127) * 2^(1 - 16 - 2); decoded: H [127] * 4 = [508, 0, 0, 0], times S.
    x = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    codec = kvwire.codec.get("int8h")
    enc = codec.encode(x, "k")
    step = np.float32(np.float32(2**15) / np.float32(127))
    assert enc.tobytes() == np.float32(step * np.float32(2.0**-17)).tobytes() + bytes([127] * 4)
    y = codec.decode(enc)
    assert y[0, 0, 0] == pytest.approx(1.0, rel=1e-6) and (y[0, 0, 1:] == 0).all()


@pytest.mark.parametrize(
    "name, role, dtype, head_dim, ratio",
    [
        ("int8h", "k", torch.bfloat16, 128, 256 / 132),  # fp8's size
        ("int8h", "v", torch.float16, 64, 128 / 68),
        ("int4h", "v", torch.bfloat16, 128, 256 / 68),  # 4-bit codes + bf16 scale and zero-point
        ("int4h", "v", torch.bfloat16, 64, 128 / 36),
        ("int4h", "k", torch.bfloat16, 64, 128 / 48),  # int4 keys: scale + zero per channel per 16 tokens
        ("int4h/k64", "k", torch.bfloat16, 64, 128 / 36),
    ],
)
def test_rotated_sizes_match_the_format(name, role, dtype, head_dim, ratio):
    x = gaussian((64, 4, head_dim), dtype, 0)
    codec = kvwire.codec.get(name)
    enc = codec.encode(x, role, 16)
    assert enc.nbytes == codec.encoded_size(enc.spec)
    assert x.numel() * x.element_size() / enc.nbytes == pytest.approx(ratio)


@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(shape=(1, 1, 192), dtype=torch.bfloat16, seed=68)
def test_int8h_and_int4h_relative_mse_on_gaussian(shape, dtype, seed):
    """Typical int8h error is about 5e-5 of the variance (a step of max / 127 per row, then
    the cache dtype's rounding); a single row whose rotated maximum is large costs more:
    the example, one bf16 row of 192 values, reaches 1.1e-4."""
    x = gaussian(shape, dtype, seed)
    assert relative_mse(x, kvwire.codec.get("int8h").decode(kvwire.codec.get("int8h").encode(x, "k"))) <= 2e-4
    int4h = kvwire.codec.get("int4h")
    assert relative_mse(x, int4h.decode(int4h.encode(x, "v"))) <= 2.5e-2  # one row can be unlucky


def test_rotation_tames_outlier_channels():
    """The point of the rotation: keys with outlier channels lose far less with int8h than
    with fp8 at the same size, and int4h's values lose less than int4's when a few
    channels are large."""
    keys = realistic_keys(256, 4, 128, seed=5)
    fp8, int8h = kvwire.codec.get("fp8"), kvwire.codec.get("int8h")
    assert relative_mse(keys, int8h.decode(int8h.encode(keys, "k"))) * 10 < relative_mse(
        keys, fp8.decode(fp8.encode(keys, "k"))
    )
    values = realistic_keys(256, 4, 128, seed=6, bias=0.0)  # per-token outliers along head_dim
    int4, int4h = kvwire.codec.get("int4"), kvwire.codec.get("int4h")
    assert relative_mse(values, int4h.decode(int4h.encode(values, "v"))) * 2 < relative_mse(
        values, int4.decode(int4.encode(values, "v"))
    )


def test_rotated_rows_special_values():
    x = torch.zeros(4, 1, 64)
    x[1, 0, :3] = torch.tensor([math.inf, -math.inf, math.nan])  # read as 0: a zero row
    x[2, 0, 5] = 1e-30  # below 2^-91: a zero row
    x[3] = torch.linspace(-1, 1, 64) * 3e38  # the largest fp32 values stay finite
    for name in ("int8h", "int4h"):
        codec = kvwire.codec.get(name)
        y = codec.decode(codec.encode(x, "v"))
        assert torch.equal(y[:3], torch.zeros(3, 1, 64)) and not torch.signbit(y[:3]).any()
        assert torch.isfinite(y[3]).all()
        assert relative_mse(x[3], y[3]) < (1e-4 if name == "int8h" else 2.5e-2)


def test_rotated_bytes_do_not_depend_on_matmul_precision():
    """torch.set_float32_matmul_precision('medium') lets the CPU compute fp32 products in
    bf16; the rotation then runs in fp64, and the bytes stay those of the format."""
    x = gaussian((33, 2, 128), torch.bfloat16, 9) * 100
    want = {n: kvwire.codec.get(n).encode(x, "v").tobytes() for n in ("int8h", "int4h")}
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert not rotated._matmul_is_exact()
        for name, wire in want.items():
            assert kvwire.codec.get(name).encode(x, "v").tobytes() == wire
    finally:
        torch.set_float32_matmul_precision(before)


def test_int4h_keys_are_int4_keys():
    """int4h keeps int4's per-channel key groups, byte for byte (with key_tokens too)."""
    x = gaussian((70, 2, 64), torch.bfloat16, 4)
    for a, b in (("int4h", "int4"), ("int4h/k64", "int4/g64/k64")):
        assert kvwire.codec.get(a).encode(x, "k", 16).tobytes() == kvwire.codec.get(b).encode(x, "k", 16).tobytes()
    assert kvwire.codec.get("int4h/k64").row_unit("k", 16) == 64


@pytest.mark.parametrize("bad", ["int4h/g64", "int8h/k64", "int4h/k48", "int8h/", "int4h/k"])
def test_bad_rotated_descriptors_are_refused(bad):
    with pytest.raises(ValueError, match="malformed|key_tokens"):
        kvwire.codec.get(bad)


def test_int4h_needs_an_even_head_dim():
    with pytest.raises(ValueError, match="even"):
        kvwire.codec.get("int4h").encode(torch.zeros(4, 2, 63), "v")
    assert kvwire.codec.get("int8h").encode(torch.ones(4, 2, 63), "v").nbytes == 8 * (4 + 63)


@pytest.mark.parametrize("name", ["fp8", "int4", "int8h", "int4h", "int4h+lz4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_results_never_alias_the_reused_work_buffers(name, dtype):
    """Encoded bytes and decoded tensors stay as they were while later chunks are coded:
    the codecs' work buffers (kvwire/codec/scratch.py) never leave the call."""
    codec = kvwire.codec.get(name)
    first, second = gaussian((64, 4, 128), dtype, 1), gaussian((64, 4, 128), dtype, 2)
    for role in ("k", "v"):
        enc = codec.encode(first, role)
        wire = enc.tobytes()
        dec = codec.decode(enc)
        kept = dec.clone()
        codec.decode(codec.encode(second, role))
        assert enc.tobytes() == wire and torch.equal(dec, kept)


def test_work_buffers_follow_calls_in_flight_not_threads():
    """Sixteen threads coding chunks leave at most IDLE_WORKSPACES buffer sets behind."""
    import threading

    from kvwire.codec import scratch

    scratch.drop_idle()  # sets grown by earlier tests' larger chunks
    x = gaussian((256, 4, 128), torch.bfloat16, 3)
    codec = kvwire.codec.get("int4h")

    def work():
        for role in ("k", "v"):
            codec.decode(codec.encode(x, role))

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= len(scratch._idle) <= scratch.IDLE_WORKSPACES
    assert scratch.idle_bytes() <= scratch.IDLE_WORKSPACES * 10 * x.numel() * x.element_size()


@pytest.mark.parametrize("name", ["raw", "fp8", "int4", "int8h", "int4h", "int4+lz4"])
def test_a_tensor_that_requires_grad_encodes_as_its_values(name):
    """A KV cache taken from a forward pass outside no_grad requires grad: the codecs
    encode its values (their work buffers take no part in autograd)."""
    x = gaussian((32, 2, 64), torch.float32, 4)
    codec = kvwire.codec.get(name)
    for role in ("k", "v"):
        enc = codec.encode(x.clone().requires_grad_(True), role)
        assert enc.tobytes() == codec.encode(x, role).tobytes()
        assert torch.equal(codec.decode(enc), codec.decode(codec.encode(x, role)))


# -- int4a: bits per key channel, one-byte row scales (docs/formats.md, "int4a") -------------
@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([8, 16, 64]),
    st.integers(1, 50),
    st.integers(1, 2),
    st.data(),
    st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
)
def test_int4a_bytes_follow_the_written_format(D, T, H, data, dtype):
    """int4a's keys and rows, element by element as docs/formats.md says: chunks shorter and
    longer than the first key group and the first 32 rows, partial last groups, channels of
    very different ranges, special values, tiny and zero rows."""
    spread = data.draw(st.lists(st.sampled_from([1e-3, 0.1, 1.0, 30.0]), min_size=D, max_size=D))
    values = data.draw(st.lists(st.one_of(element, st.sampled_from([1e-30, -2e-28, 0.0])), min_size=T * H * D,
                                max_size=T * H * D))  # fmt: skip
    x = (torch.tensor(values).view(T, H, D) * torch.tensor(spread)).to(dtype)
    xf = x.float().numpy()
    codec = kvwire.codec.get("int4a")
    keys, rows = codec.encode(x, "k"), codec.encode(x, "v")
    assert keys.tobytes() == spec_scalar.int4a_keys_encode(xf)
    assert rows.tobytes() == spec_scalar.int4a_rows_encode(xf)
    assert keys.nbytes == codec.encoded_size(keys.spec) and rows.nbytes == codec.encoded_size(rows.spec)


def test_int4a_is_3_5x_smaller_and_closer_than_int4_where_channels_differ():
    """At 1024 tokens of three heads of 64 (SmolLM2's shape) keys and values together are
    3.5x smaller than bf16, and keys whose channels' ranges differ lose far less than int4's."""
    codec, int4 = kvwire.codec.get("int4a"), kvwire.codec.get("int4")
    k = realistic_keys(1024, 3, 64, seed=4)
    v = torch.randn(1024, 3, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    wire = codec.encode(k, "k").nbytes + codec.encode(v, "v").nbytes
    assert 2 * k.numel() * 2 / wire >= 3.5

    def error(c, x, role):
        return relative_mse(x, c.decode(c.encode(x, role)))

    assert error(codec, k, "k") < 0.7 * error(int4, k, "k")
    assert error(codec, v, "v") < 1.15 * error(int4, v, "v")  # Gaussian values: no outliers to spread


def test_int4a_gives_the_bits_to_the_wide_channels():
    """4 bits a channel on average per head, the widest channels the most; constant keys
    (every range zero) decode exactly, constant value rows (one spike once rotated) within
    the step of the scale grid above their range."""
    from kvwire.codec import allocated

    weight = torch.tensor([[0.0, 1.0, 1e4, 1e8] * 4, [1.0] * 16], dtype=torch.float64)
    bits = allocated.allocate_bits(weight)
    assert bits.sum(1).tolist() == [64, 64] and bits.min() >= 1 and bits.max() <= 8
    assert bits[0, :4].tolist() == [1, 1, 6, 8] and bits[1].tolist() == [4] * 16  # ties: equal shares
    x = torch.full((70, 2, 16), 1.5, dtype=torch.bfloat16)
    codec = kvwire.codec.get("int4a")
    assert torch.equal(codec.decode(codec.encode(x, "k")), x)
    assert ((codec.decode(codec.encode(x, "v")).float() - 1.5).abs() <= 1.5 * (2 ** (1 / 16) - 1)).all()


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["k", "v"]), st.integers(1, 40), st.data(), dtype_names)
def test_int4a_decodes_any_bytes(role, T, data, dtype_name):
    """Bytes no encoder writes (NaN and infinite ranges, any base, any bits): a value of
    the cache dtype for every element, every NaN the canonical one, nothing raised."""
    codec = kvwire.codec.get("int4a")
    spec = ChunkSpec(T, 2, 16, getattr(torch, dtype_name), role)
    wire = data.draw(st.binary(min_size=codec.encoded_size(spec), max_size=codec.encoded_size(spec)))
    y = codec.decode_bytes(wire, spec)
    assert y.shape == spec.shape and y.dtype == spec.dtype
    nan = torch.isnan(y.float())
    bits = y.view(torch.int16 if y.itemsize == 2 else torch.int32)
    assert (bits[nan] == kvwire.codec.base.CANONICAL_NAN[spec.dtype]).all()
    with pytest.raises(ValueError, match="int4a"):
        codec.decode_bytes(wire[:-1], spec)


def test_int4a_needs_a_head_dim_of_whole_bytes():
    with pytest.raises(ValueError, match="multiple of 8"):
        kvwire.codec.get("int4a").encode(torch.zeros(4, 2, 12), "k")


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(["k", "v"]), st.integers(1, 45), st.data(), dtype_names)
def test_int4a_decoding_follows_the_written_format(role, T, data, dtype_name):
    """int4a's decoders element by element as docs/formats.md says, for bytes an encoder
    wrote and for any bytes (NaN and infinite ranges, any base scale)."""
    codec = kvwire.codec.get("int4a")
    H, D = 2, 16
    spec = ChunkSpec(T, H, D, getattr(torch, dtype_name), role)
    if data.draw(st.booleans()):
        x = torch.randn(T, H, D, generator=torch.Generator().manual_seed(T)) * torch.logspace(-1, 1, D)
        wire = codec.encode(x.to(spec.dtype), role).tobytes()
    else:
        wire = data.draw(st.binary(min_size=codec.encoded_size(spec), max_size=codec.encoded_size(spec)))
    got = codec.decode_bytes(bytearray(wire), spec)
    bits = got.view(torch.int16 if got.itemsize == 2 else torch.int32).reshape(-1).tolist()
    mask = 0xFFFF if got.itemsize == 2 else 0xFFFFFFFF
    scalar = spec_scalar.int4a_keys_decode if role == "k" else spec_scalar.int4a_rows_decode
    assert [b & mask for b in bits] == scalar(wire, T, H, D, dtype_name)


def test_int4a_chunks_are_windows_so_the_cut_does_not_matter():
    """A chunk is encoded 1024 rows at a time and cut in whole windows: two chunks' bytes
    are those of the one chunk they were cut from; the window sizes are the spec's; exact
    rows round to blocks, not to windows."""
    codec = kvwire.codec.get("int4a")
    x = realistic_keys(2500, 2, 64, seed=9)
    assert codec.row_unit("k", 16) == 1024 and codec.row_unit("v", 48) == 3072
    assert kvwire.codec.get("int4a+lz4").row_unit("v", 16) == 1024
    for role in ("k", "v"):
        whole = codec.encode(x, role).tobytes()
        assert whole == codec.encode(x[:1024], role).tobytes() + codec.encode(x[1024:], role).tobytes()
        sizes = spec_scalar._a_window_sizes(2500, 2, 64, role)
        assert [n for n, _ in sizes] == [1024, 1024, 452] and len(whole) == sum(b for _, b in sizes)
        y = codec.decode(codec.encode(x, role))
        assert torch.equal(y[1024:2048], codec.decode(codec.encode(x[1024:2048], role)))
    from kvwire.engine.chunks import exact_row_count

    assert exact_row_count(codec, "k", 2500, 16, 20) == 32


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "role", "head_dim", "T"), [
    ("int8h", "k", 128, 70), ("int8h", "v", 96, 70), ("int8h", "k", 12, 70), ("int4h", "v", 128, 70),
    ("int4h", "v", 48, 70), ("int4h", "v", 6, 70), ("int4a", "v", 64, 70), ("int4a", "v", 256, 71)])  # fmt: skip
def test_rotated_rows_in_c_equal_the_torch_ones(monkeypatch, dtype, name, role, head_dim, T):
    """Rotated rows through kvwire/_scatter.c (rot_stats, rot_quantize, rot_dequantize;
    for int4a also its rows' scales and zero-points, rot_encode4a and row_steps4a) and
    through the torch path a build without it takes: the same bytes and the same values,
    for every cache dtype, with special values, zero and tiny rows, and random bytes
    decoded (NaN scales included); rows int4a codes again once their head's base is known
    (a tiny row, a repeated value); rows of 8 values or more take the helper's vector
    loops, shorter rotation blocks (head_dim 12, 6) its scalar ones; an odd count of
    int4a's compact rows per head (71 tokens) leaves half a zero-point byte."""
    from kvwire.codec import allocated, rotated

    codec = kvwire.codec.get(name)
    x = (realistic_keys(T, 3, head_dim, seed=head_dim) * 4).to(dtype)
    x[3, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    x[40, 1] = 0.0
    x[41, 2] = torch.finfo(dtype).tiny
    x[50, 0, 5] = torch.finfo(dtype).max
    x[45, 1] = 0.0
    x[45, 1, 0] = 3.0  # rotated, one value repeated: int4a codes it with its head's base
    spec = ChunkSpec(T, 3, head_dim, dtype, role)
    noise = torch.randint(0, 256, (codec.encoded_size(spec),), generator=torch.Generator().manual_seed(head_dim),
                          dtype=torch.uint8)  # fmt: skip
    fast = codec.encode(x, role).data
    fast_values = [codec.decode_bytes(b, spec) for b in (fast, noise)]
    monkeypatch.setattr(rotated, "_helper", None)
    monkeypatch.setattr(allocated, "_helper", None)
    assert torch.equal(codec.encode(x, role).data, fast)
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    for got, wire in zip(fast_values, (fast, noise)):
        assert torch.equal(got.view(bits), codec.decode_bytes(wire, spec).view(bits))


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@pytest.mark.parametrize("off", [-2, 64])
def test_int4a_decode_into_refuses_spans_of_another_size_before_writing(off):
    """Spans a row short or long for a chunk of three windows: a ValueError naming both
    sizes, and none of the rows written (the first windows would fit)."""
    codec = kvwire.codec.get("int4a")
    encoded = codec.encode(torch.randn(2100, 2, 64).to(torch.bfloat16), "k", 16)
    rows = np.zeros(encoded.spec.raw_nbytes + 64, np.uint8)
    spans = kvwire.scatter.Spans(np.array([[rows.ctypes.data, encoded.spec.raw_nbytes + off]], dtype=np.uint64), rows)
    with pytest.raises(ValueError, match=f"spans: take {encoded.spec.raw_nbytes + off} bytes, the chunk decodes to"):
        codec.decode_into(encoded.data, encoded.spec, spans)
    assert not rows.any()


def _awkward_rows(tokens: int, heads: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``[tokens, heads, d]`` of every kind the rotated coders treat apart: zeros, one
    value repeated, one spike (at every lane of 32 in turn: the helper's running maxima
    and minima each see a quarter of them), tiny rows their head's base clamps, huge rows,
    subnormals, NaN and infinities, and plain random ones."""
    g = torch.Generator().manual_seed(d * 7 + heads)
    x = torch.randn(tokens, heads, d, generator=g) * 4
    tiny, huge = (1e-7, 1e3) if dtype == torch.float16 else (1e-40, 1e30)
    for r, row in enumerate(x.view(-1, d)):
        kind = r % 9
        if kind == 0:
            row.zero_()
        elif kind == 1:
            row.fill_(3.0)
        elif kind == 2:
            row.zero_()
            row[(r // 9) % min(d, 32)] = -100.0 if r % 2 else 100.0
        elif kind == 3:
            row.mul_(1e-6)
        elif kind == 4:
            row.mul_(huge)
        elif kind == 5:
            row.fill_(-tiny)
        elif kind == 6:
            row[0], row[-1] = float("nan"), float("inf")
    return x.to(dtype)


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [2, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256])
def test_rotated_coders_in_c_equal_torch_on_awkward_rows(monkeypatch, dtype, d):
    """int4a's value windows (``rot_encode4a``: one visit per row, a second for the rows
    their head's base clamps), int8h and int4h (``rot_stats``, ``rot_quantize``) over
    :func:`_awkward_rows`: the bytes of the torch path, with every lane of a row's
    running extremes holding its largest value in some row."""
    from kvwire.codec import allocated, rotated

    x = _awkward_rows(allocated.EXACT_ROWS + 70, 3, d, dtype)
    names = ["int8h", "int4h"] + (["int4a"] if d % 8 == 0 else [])
    fast = {name: kvwire.codec.get(name).encode(x, "v").data for name in names}
    monkeypatch.setattr(rotated, "_helper", None)
    monkeypatch.setattr(allocated, "_helper", None)
    for name in names:
        assert torch.equal(kvwire.codec.get(name).encode(x, "v").data, fast[name]), name


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float16]),
    tokens=st.integers(1, 40),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([1, 7, 64, 128]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fp8_decoded_in_c_equals_the_torch_decode(dtype, tokens, heads, head_dim, seed):
    """fp8 rows through kvwire/_scatter.c (fp8_dequantize) and through torch, the path a
    build without it takes and fp16 caches still take: the same bits, for any scale bits
    (NaN, inf, zero, subnormal, huge) and any codes (NaN codes included), the products'
    overflows and subnormals rounded alike, every NaN the canonical one."""
    from kvwire.codec import fp8

    spec = ChunkSpec(tokens, heads, head_dim, dtype, "v")
    rows = tokens * heads
    g = np.random.default_rng(seed)
    scale_bits = g.integers(0, 2**32, rows, dtype=np.uint64).astype(np.uint32)
    specials = np.array([0x7F800000, 0xFF800000, 0x7FC00001, 0, 0x80000000, 1, 0x007FFFFF, 0x7F7FFFFF, 0x3F800000,
                         0x3B124925], dtype=np.uint32)  # fmt: skip
    scale_bits[: min(rows, len(specials))] = specials[:rows]
    wire = np.concatenate([scale_bits.view(np.uint8), g.integers(0, 256, rows * head_dim, dtype=np.uint8)])
    data = torch.from_numpy(wire)
    got = fp8.Fp8Codec()._decode(data, spec)
    want = fp8._decode_torch(data[rows * 4 :], data[: rows * 4].clone().view(torch.float32), spec)
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    assert got.shape == want.shape == spec.shape
    assert torch.equal(got.view(bits), want.view(bits))


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [128, 64, 7, 1])
def test_fp8_encoded_in_c_equals_the_torch_encode(monkeypatch, dtype, head_dim):
    """fp8 codes and scales through kvwire/_scatter.c (fp8_quantize) and through torch:
    the same bytes, over rows whose magnitudes span the dtype's range (subnormal scales
    whose reciprocal overflows included), with inf, NaN, signed zeros, whole rows of zeros,
    NaN and inf, the largest and smallest values, and every value halfway between two
    E4M3 codes (ties to even) and next to one; rows of 8 values or more take the vector
    loop, shorter ones (7, 1) the scalar one."""
    from kvwire.codec import fp8

    g = torch.Generator().manual_seed(head_dim)
    rows = 256
    magnitude = torch.logspace(-44 if dtype != torch.float16 else -8, 36 if dtype != torch.float16 else 4, rows)
    x = (torch.randn(rows, 2, head_dim, generator=g) * magnitude.view(rows, 1, 1)).to(dtype)
    finite = fp8.E4M3_VALUES[torch.isfinite(fp8.E4M3_VALUES)].unique()
    halfway = ((finite[1:].double() + finite[:-1].double()) / 2).float()
    up, down = torch.nextafter(halfway, torch.tensor(1e9)), torch.nextafter(halfway, torch.tensor(-1e9))
    ties = torch.cat([halfway, up, down])
    ties = torch.cat([ties, -ties])
    n = min(ties.numel(), x[10:].numel())
    x.view(-1)[x[:10].numel() : x[:10].numel() + n] = ties[:n].to(dtype)  # scale 448/448 rows: codes at the ties
    x[10:, 0, 0] = 448.0  # each tie row's largest value: its scale is 1
    x[0, 0, : min(head_dim, 5)] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0])[:head_dim]
    x[1, 0], x[2, 1], x[3, 0], x[4, 1] = 0.0, -0.0, float("nan"), float("inf")
    x[5, 0], x[6, 0, 0] = torch.finfo(dtype).tiny, torch.finfo(dtype).max
    spec = ChunkSpec(rows, 2, head_dim, dtype, "k")
    fast = fp8.Fp8Codec().encode(x, "k").data
    monkeypatch.setattr(fp8, "_helper", None)
    assert torch.equal(fast, fp8.Fp8Codec().encode(x, "k").data)
    assert fast.numel() == fp8.Fp8Codec().encoded_size(spec)


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@settings(max_examples=90, deadline=None)
@given(
    coded=st.sampled_from(
        [
            ("fp8", "v"),
            ("int8h", "v"),
            ("int4h", "v"),
            ("int4h", "k"),
            ("int4/g32", "v"),
            ("int4/g32", "k"),
            ("int4/g64/k64", "k"),
            ("int4a", "k"),
            ("int4a", "v"),
        ]
    ),  # fmt: skip
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    tokens=st.integers(1, 40),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([8, 64, 128]),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    gap=st.integers(0, 100),
    spill_rows=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_decoded_into_spans_is_decode_bytes_in_place(
    coded, dtype, tokens, heads, head_dim, cuts, gap, spill_rows, seed
):
    """decode_into (a host cache's rows, decoded a few rows at a time and copied out with
    streaming stores), for fp8, the rotated rows (int8h, int4h's values), int4's groups
    (keys across tokens, partial last groups included; values along the row) and int4a
    (its first group or rows, then its coded groups or compact rows): the values
    decode_bytes gives, in order, across spans cut anywhere (inside a row, inside a value)
    and pieces of any number of rows; nothing between the spans written."""
    from kvwire.codec import base

    name, role = coded
    if name.startswith("int4/") and head_dim % 32:
        head_dim = 32  # int4's value groups are 32 channels at least
    codec = kvwire.codec.get(name)
    spec = ChunkSpec(tokens, heads, head_dim, dtype, role)
    x = realistic_keys(tokens, heads, head_dim, seed=seed % 1000).to(dtype)
    x[0, 0, 0] = float("nan")
    wire = codec.encode(x, role).data
    want = bytes(codec.decode_bytes(wire, spec).view(torch.uint8).reshape(-1).numpy())
    total = len(want)
    bounds = sorted({0, total, *(c % (total + 1) for c in cuts)})
    out = np.zeros(total + gap * len(bounds) + 64, dtype=np.uint8)
    iov, at = [], 3
    for start, end in zip(bounds, bounds[1:]):
        iov.append([out.ctypes.data + at, end - start])
        at += end - start + gap
    spans = kvwire.scatter.Spans(np.array(iov, dtype=np.uint64).reshape(-1, 2), out)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(base, "SPILL_BYTES", spill_rows * head_dim * spec.itemsize)
        assert codec.decode_into(wire, spec, spans)
    got, outside, at = b"", np.ones(len(out), dtype=bool), 3
    for start, end in zip(bounds, bounds[1:]):
        got += bytes(out[at : at + end - start])
        outside[at : at + end - start] = False
        at += end - start + gap
    assert got == want
    assert not out[outside].any()


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("tokens", [1024, 1100, 2100])
def test_int4a_decoded_into_spans_across_windows_is_the_torch_decode(monkeypatch, role, tokens):
    """int4a chunks of one, two and three windows (1024 tokens each, the last partial),
    decoded into spans cut inside rows by the C helper, a work buffer smaller than a
    token's heads: the values torch's decode gives, NaN and infinities included."""
    from kvwire.codec import allocated, base

    codec, heads, head_dim = kvwire.codec.get("int4a"), 4, 64
    x = realistic_keys(tokens, heads, head_dim, seed=11).to(torch.bfloat16)
    x[5, 1, 3], x[1030 % tokens, 2, 9], x[7, 0, 0] = float("nan"), float("inf"), float("-inf")
    encoded = codec.encode(x, role, 16)
    monkeypatch.setattr(base, "SPILL_BYTES", 100)  # fewer than a row of heads: key_decode fills it piece by piece
    out = torch.full((tokens, heads, head_dim), 7.0, dtype=torch.bfloat16)
    flat = out.view(torch.uint8).view(-1).numpy()
    bounds = [0, 5, 4096 + 2, 300_000, flat.nbytes]
    iov = np.array([[flat.ctypes.data + a, b - a] for a, b in zip(bounds, bounds[1:])], dtype=np.uint64)
    assert codec.decode_into(encoded.data, encoded.spec, kvwire.scatter.Spans(iov, flat))
    monkeypatch.setattr(allocated, "_helper", None)
    monkeypatch.setattr(kvwire.codec.rotated, "_helper", None)
    monkeypatch.setattr(kvwire.codec.int4, "_helper", None)
    assert not codec.decodes_into(encoded.spec)
    want = codec.decode(encoded)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads", [None, (1, 2), (3, 1)], ids=["whole rows", "heads 1-2", "head 3"])
@pytest.mark.parametrize(("name", "role"), [("fp8", "k"), ("int8h", "k"), ("int4h", "v"), ("int4", "v"),
                                           ("int4/g32", "v"), ("int4", "k"), ("int4/g64/k64", "k"),
                                           ("int4h/k64", "k")])  # fmt: skip
def test_encoded_where_the_rows_lie_is_encode_of_the_gathered_rows(name, role, dtype, heads):
    """encode_into reads a chunk's rows where they lie in a block cache (runs of blocks, or
    a span per token for some of its heads, from mid-block to a partial last block): the
    bytes encode gives for the same rows gathered, special values included."""
    from kvwire.scatter import block_spans, token_spans

    codec = kvwire.codec.get(name)  # int4's key groups (16 or 64 rows) straddle the block spans

    cache = realistic_keys(12 * 16, 4, 64, seed=3).to(dtype).reshape(12, 16, 4, 64).contiguous()
    cache[2, 3, 0, :3] = torch.tensor([float("inf"), float("nan"), -0.0])
    cache[5, 0, 1] = 0.0
    ids, start, count = [7, 2, 3, 4, 11, 0], 5, 70  # rows 5..74: mid-block start, a partial last block
    first, n_heads = heads if heads is not None else (0, 4)
    rows = cache[ids].reshape(-1, 4, 64)[start : start + count, first : first + n_heads]
    spec = ChunkSpec(count, n_heads, 64, dtype, role)
    raw = cache.view(torch.uint8).numpy().reshape(12, -1)
    if heads is None:
        spans = block_spans(raw, raw.ctypes.data, np.array(ids), 16, start, count)
    else:
        view = kvwire.blocks.head_bytes(cache, first, n_heads)
        spans = token_spans(view, np.array(ids), 16, start, count)
    out = np.zeros(codec.encoded_size(spec), dtype=np.uint8)
    assert codec.encodes_into(spec)
    codec.encode_into(spans, spec, out)
    assert bytes(out) == bytes(codec.encode(rows.contiguous(), role).data.numpy())


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
def test_encode_into_refuses_an_output_of_another_size_and_codecs_without_it():
    spec = ChunkSpec(4, 2, 8, torch.bfloat16, "k")
    x = np.zeros(64, dtype=np.uint16)
    spans = kvwire.scatter.Spans(np.array([[x.ctypes.data, 128]], dtype=np.uint64), x)
    for name, role in (("fp8", "k"), ("int8h", "k"), ("int4h", "v")):
        codec, coded = kvwire.codec.get(name), ChunkSpec(4, 2, 8, torch.bfloat16, role)
        size = codec.encoded_size(coded)
        with pytest.raises(ValueError, match=f"out: {size} uint8 bytes, got {size - 1} uint8"):
            codec.encode_into(spans, coded, np.zeros(size - 1, dtype=np.uint8))
        with pytest.raises(ValueError, match=f"out: {size} uint8 bytes, got {size * 4} float32"):
            codec.encode_into(spans, coded, np.zeros(size, dtype=np.float32))
    int4 = kvwire.codec.get("int4")
    assert int4.encodes_into(spec) and int4.decodes_into(spec)
    size = int4.encoded_size(spec)
    with pytest.raises(ValueError, match=f"out: {size} uint8 bytes, got {size + 1} uint8"):
        int4.encode_into(spans, spec, np.zeros(size + 1, dtype=np.uint8))
    assert not int4.encodes_into(ChunkSpec(4, 2, 64, torch.float16, "v"))  # the helper reads bf16 and fp32 only
    int4h = kvwire.codec.get("int4h")  # its keys are int4 key groups, coded where they lie as int4's are
    assert int4h.encodes_into(spec) and int4h.encoded_size(spec) == size
    int4h.encode_into(spans, spec, keys := np.zeros(size, dtype=np.uint8))
    out = np.zeros(size, dtype=np.uint8)
    int4.encode_into(spans, spec, out)
    assert bytes(keys) == bytes(out)


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
def test_fp8_encode_into_refuses_spans_that_are_not_whole_rows():
    from kvwire import _scatter

    x = np.zeros(64, dtype=np.uint16)
    scale, codes = np.zeros(4, np.float32), np.zeros(64, np.uint8)
    whole = np.array([[x.ctypes.data, 64], [x.ctypes.data + 64, 64]], dtype=np.uint64)
    _scatter.fp8_quantize_spans(whole, 1, 16, scale, codes)  # what fits: 4 rows of 16
    cut = np.array([[x.ctypes.data, 48], [x.ctypes.data + 48, 80]], dtype=np.uint64)
    with pytest.raises(ValueError, match="2 spans of 3 rows \\(not all whole\\)"):
        _scatter.fp8_quantize_spans(cut, 1, 16, scale, codes)
    with pytest.raises(ValueError, match="12 scale bytes"):
        _scatter.fp8_quantize_spans(whole, 1, 16, scale[:3], codes)


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [128, 64, 24])
@pytest.mark.parametrize("name", ["int8h", "int4h"])
def test_rotated_rows_coded_in_one_pass_are_encode_at_every_scale(name, dtype, head_dim):
    """The one-pass encoder computes each row's parameters itself (int8h's step, inverse
    and scale; int4h's bf16 scale and zero-point, then the step and offset they give): the
    bytes encode gives, for rows from 2^-100 (sent as zero) to 2^100 and every rotation
    block size (24 values: blocks of 8)."""
    codec = kvwire.codec.get(name)
    gen = torch.Generator().manual_seed(11)
    rows = 400
    x = torch.randn(rows, head_dim, generator=gen) * torch.pow(2.0, torch.arange(rows) % 201 - 100.0).unsqueeze(1)
    x[7] = 0.0
    x[9, ::3] = -x[9, ::3].abs()
    x = x.to(dtype).reshape(rows // 4, 4, head_dim).contiguous()
    spec = ChunkSpec(rows // 4, 4, head_dim, dtype, "v")
    raw = x.view(torch.uint8).numpy().reshape(-1)
    half = raw.nbytes // 2 // (head_dim * x.element_size()) * head_dim * x.element_size()
    iov = np.array([[raw.ctypes.data, half], [raw.ctypes.data + half, raw.nbytes - half]], dtype=np.uint64)
    out = np.zeros(codec.encoded_size(spec), dtype=np.uint8)
    codec.encode_into(kvwire.scatter.Spans(iov, raw), spec, out)
    assert bytes(out) == bytes(codec.encode(x, "v").data.numpy())


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
def test_rotated_rows_coded_where_they_lie_refuse_spans_and_buffers_that_do_not_fit():
    from kvwire import _scatter

    x = np.zeros(64, dtype=np.uint16)
    params, codes = np.zeros(16, np.uint8), np.zeros(64, np.uint8)
    whole = np.array([[x.ctypes.data, 64], [x.ctypes.data + 64, 64]], dtype=np.uint64)
    _scatter.rot_encode_spans(whole, 1, 16, 8, params, codes)  # what fits: 4 rows of 16
    _scatter.rot_encode_spans(whole, 1, 16, 4, params, codes[:32])
    cut = np.array([[x.ctypes.data, 48], [x.ctypes.data + 48, 80]], dtype=np.uint64)
    with pytest.raises(ValueError, match="rot_encode_spans: span 0 holds 48 bytes, not whole rows of 32"):
        _scatter.rot_encode_spans(cut, 1, 16, 8, params, codes)
    with pytest.raises(ValueError, match="codes 8 bytes a row, for the spans' 4 rows; got 16 and 64 bytes"):
        _scatter.rot_encode_spans(whole, 1, 16, 4, params, codes)
    with pytest.raises(ValueError, match="params 4 bytes a row, .* got 12 and 64 bytes"):
        _scatter.rot_encode_spans(whole, 1, 16, 8, params[:12], codes)
    with pytest.raises(ValueError, match="rot_encode_spans: kind 0 .fp32. or 1 .bf16."):
        _scatter.rot_encode_spans(whole, 2, 16, 8, params, codes)
    with pytest.raises(ValueError, match="rot_encode_spans: mode 8 .int8h. or 4 .int4h's values., got 5"):
        _scatter.rot_encode_spans(whole, 1, 16, 5, params, codes)


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
def test_fp8_decoded_into_spans_refuses_spans_of_another_size():
    from kvwire.codec import fp8

    spec = ChunkSpec(4, 2, 8, torch.bfloat16, "v")
    wire = fp8.Fp8Codec().encode(torch.ones(spec.shape, dtype=torch.bfloat16), "v").data
    out = np.zeros(256, dtype=np.uint8)
    short = kvwire.scatter.Spans(np.array([[out.ctypes.data, 127]], dtype=np.uint64), out)
    with pytest.raises(ValueError, match="127 span bytes"):
        fp8.Fp8Codec().decode_into(wire, spec, short)
    assert not out.any()
    assert not fp8.Fp8Codec().decode_into(wire, ChunkSpec(4, 2, 8, torch.float16, "v"), short)  # torch's, not here


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
def test_fp8_helper_refuses_what_does_not_fit():
    from kvwire import _scatter

    codes, scale, table = np.zeros(16, np.uint8), np.zeros(2, np.float32), np.zeros(256, np.float32)
    _scatter.fp8_dequantize(codes, 8, scale, table, np.zeros(16, np.int16), 1)  # what fits
    sizes = "got 16 code bytes, d 8, 8 scale bytes, 1024 table bytes, 64 out bytes, kind 1"
    with pytest.raises(ValueError, match=sizes):
        _scatter.fp8_dequantize(codes, 8, scale, table, np.zeros(16, np.float32), 1)
    with pytest.raises(ValueError, match="kind 2"):
        _scatter.fp8_dequantize(codes, 8, scale, table, np.zeros(16, np.int16), 2)
    with pytest.raises(ValueError, match="d 3"):
        _scatter.fp8_dequantize(codes, 3, scale, table, np.zeros(16, np.int16), 1)
    with pytest.raises(ValueError, match="12 scale bytes"):
        _scatter.fp8_dequantize(codes, 8, np.zeros(3, np.float32), table, np.zeros(16, np.int16), 1)
    with pytest.raises(ValueError, match="1020 table bytes"):
        _scatter.fp8_dequantize(codes, 8, scale, table[:255], np.zeros(16, np.int16), 1)
    with pytest.raises(BufferError):  # the output must be writable
        _scatter.fp8_dequantize(codes, 8, scale, table, bytes(32), 1)
    x = np.zeros(16, np.int16)
    _scatter.fp8_quantize(x, 1, 8, scale, codes)  # what fits
    with pytest.raises(ValueError, match="got 32 x bytes, kind 1, d 8, 12 scale bytes, 16 code bytes"):
        _scatter.fp8_quantize(x, 1, 8, np.zeros(3, np.float32), codes)
    with pytest.raises(ValueError, match="got 32 x bytes, kind 0, d 8, 8 scale bytes, 16 code bytes"):
        _scatter.fp8_quantize(x, 0, 8, scale, codes)  # fp32 rows of 8 need 64 bytes
    with pytest.raises(ValueError, match="kind 3"):
        _scatter.fp8_quantize(x, 3, 8, scale, codes)
    with pytest.raises(BufferError):
        _scatter.fp8_quantize(x, 1, 8, scale, bytes(16))
    iov = np.array([[x.ctypes.data, 32]], dtype=np.uint64)
    for huge in (2**62, 2**62 + 2**61, 2**63 - 1, 0, -8):  # refused before any arithmetic on d (was a crash)
        with pytest.raises(ValueError, match=f"0 < d <= .*, got kind 1, d {huge}"):
            _scatter.fp8_quantize_spans(iov, 1, huge, scale, codes)
        with pytest.raises(ValueError, match=f"0 < d <= .*, got kind 1, d {huge}"):
            _scatter.fp8_dequantize(codes[:0], huge, scale[:0], table, np.zeros(16, np.int16), 1, iov[:0])
        with pytest.raises(ValueError, match=f"0 < d <= .*, got kind 1, d {huge}"):
            _scatter.rot_dequantize(codes[:0], 8, huge, scale[:0], scale[:0], np.zeros(16, np.int16), 1, iov[:0])


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
def test_rotated_rows_helper_refuses_what_does_not_fit():
    from kvwire import _scatter

    rows, per_row = np.zeros((4, 8), np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="kind"):
        _scatter.rot_stats(rows, 2, 8, np.zeros(4, np.int32), per_row, per_row)
    with pytest.raises(ValueError, match="d 7"):
        _scatter.rot_stats(rows, 0, 7, np.zeros(4, np.int32), per_row, per_row)
    with pytest.raises(ValueError, match="e int32"):
        _scatter.rot_stats(rows, 0, 8, np.zeros(3, np.int32), per_row, per_row)
    with pytest.raises(ValueError, match="mode must be 8, 4 or 5"):
        _scatter.rot_quantize(rows, 0, 8, 6, per_row, per_row, np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="out"):
        _scatter.rot_quantize(rows, 0, 8, 4, per_row, per_row, np.zeros((4, 8), np.uint8))
    with pytest.raises(ValueError, match="codes"):
        _scatter.rot_dequantize(np.zeros((4, 3), np.uint8), 4, 8, per_row, per_row, rows, 0)
    with pytest.raises(BufferError):  # the output must be writable
        _scatter.rot_dequantize(np.zeros((4, 4), np.uint8), 4, 8, per_row, per_row, bytes(128), 0)
    groups = np.zeros((1, 8), np.float32)
    with pytest.raises(ValueError, match="key_extremes: .* rows 0"):
        _scatter.key_extremes(rows, 0, 8, groups, groups, np.zeros(8, np.float32), np.zeros(8, np.float32), 0)
    key_params = np.zeros(8, np.uint16)  # one group of 4 rows of 8 channels
    span = np.array([[rows.ctypes.data, rows.nbytes]], dtype=np.uint64)
    _scatter.int4_key_quantize_spans(span, 0, 8, 4, key_params, key_params, np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="int4_key_quantize_spans: .* C even.*got 4 rows, C 7"):
        odd = np.zeros((4, 7), np.float32)
        odd_span = np.array([[odd.ctypes.data, odd.nbytes]], dtype=np.uint64)
        _scatter.int4_key_quantize_spans(odd_span, 0, 7, 4, key_params[:7], key_params[:7], np.zeros(14, np.uint8))
    with pytest.raises(ValueError, match="int4_key_quantize_spans: .*12 code bytes"):  # codes one row short
        _scatter.int4_key_quantize_spans(span, 0, 8, 4, key_params, key_params, np.zeros((3, 4), np.uint8))
    with pytest.raises(ValueError, match="int4_key_quantize_spans: .*rows 0"):
        _scatter.int4_key_quantize_spans(span, 0, 8, 0, key_params, key_params, np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="int4_key_quantize_spans: span 0 holds 128 bytes, not whole rows of 48"):
        _scatter.int4_key_quantize_spans(span, 0, 12, 4, key_params, key_params, np.zeros((4, 4), np.uint8))
    lohi, grid = np.zeros(8, np.float32), np.zeros((2, 8), np.float32)  # 2 groups of one head of 8 channels
    with pytest.raises(ValueError, match="key_grid: .* heads 3"):  # 8 channels are not whole heads of 3
        _scatter.key_grid(lohi, lohi, 3, np.zeros(32, np.uint8), grid, grid, np.zeros(8, np.uint8))
    with pytest.raises(ValueError, match="key_grid"):  # bits for 7 channels, not 8
        _scatter.key_grid(lohi, lohi, 1, np.zeros(32, np.uint8), grid, grid, np.zeros(7, np.uint8), grid, grid)
    with pytest.raises(BufferError):  # encoding writes the bound codes
        _scatter.key_grid(lohi, lohi, 1, bytes(32), grid, grid, np.zeros(8, np.uint8), grid, grid)
    with pytest.raises(ValueError, match="key_grid: gmn and gmx go together"):  # neither encoding nor decoding
        _scatter.key_grid(lohi, lohi, 1, np.zeros(32, np.uint8), grid, grid, np.zeros(8, np.uint8), grid)
    f4, x8 = np.zeros(8, np.float32), np.zeros((8, 8), np.float32)  # 8 rows of 8 values
    codes8 = np.zeros((8, 4), np.uint8)
    _scatter.rot_encode4a(x8, 0, 8, 4, 3, np.zeros(8, np.uint8), np.zeros(8, np.uint8), np.zeros(4, np.uint8), codes8)
    with pytest.raises(ValueError, match="rot_encode4a: .* heads 3"):  # 8 rows are not whole tokens of 3 heads
        _scatter.rot_encode4a(x8, 0, 8, 3, 3, np.zeros(6, np.uint8), np.zeros(8, np.uint8), np.zeros(6, np.uint8),
                              codes8)  # fmt: skip
    with pytest.raises(ValueError, match="rot_encode4a: .* 2 zeros"):  # zero-points: 4 heads x 1 byte, not 2
        _scatter.rot_encode4a(x8, 0, 8, 4, 3, np.zeros(8, np.uint8), np.zeros(8, np.uint8), np.zeros(2, np.uint8),
                              codes8)  # fmt: skip
    with pytest.raises(ValueError, match="rot_encode4a: .* 28 codes"):  # codes a row short
        _scatter.rot_encode4a(x8, 0, 8, 4, 3, np.zeros(8, np.uint8), np.zeros(8, np.uint8), np.zeros(4, np.uint8),
                              codes8[1:])  # fmt: skip
    with pytest.raises(ValueError, match="rot_encode4a: kind 0 .* got kind 2"):
        _scatter.rot_encode4a(x8, 2, 8, 4, 3, np.zeros(8, np.uint8), np.zeros(8, np.uint8), np.zeros(4, np.uint8),
                              codes8)  # fmt: skip
    with pytest.raises(ValueError, match="rot_encode4a: .* heads 4611686018427387904"):  # no product of it wraps
        _scatter.rot_encode4a(np.zeros(0, np.float32), 0, 16, 2**62, 4, bytearray(2), bytearray(0), bytearray(0),
                              bytearray(0))  # fmt: skip
    with pytest.raises(ValueError, match="rot_encode4a: .* log_block 9"):
        _scatter.rot_encode4a(x8, 0, 8, 4, 9, np.zeros(8, np.uint8), np.zeros(8, np.uint8), np.zeros(4, np.uint8),
                              codes8)  # fmt: skip
    rows16, spill = np.zeros(32, np.uint16), np.zeros(4, np.uint16)  # key_decode: 2 rows of 16 bf16 channels
    words, bits = np.zeros((1, 16), np.uint16), np.ones(16, np.uint8)
    params = np.zeros(16, np.float32)
    spans16 = np.array([[rows16.ctypes.data, rows16.nbytes]], dtype=np.uint64)
    _scatter.key_decode(words, bits, params, params, np.zeros(16, np.uint16), 1, spans16)
    with pytest.raises(ValueError, match="key coded groups: .* out at least a row"):  # a work buffer of 4 values
        _scatter.key_decode(words, bits, params, params, spill, 1, spans16)
    with pytest.raises(ValueError, match="key coded groups: kind must be 0 .* got 3"):
        _scatter.key_decode(words, bits, params, params, rows16, 3)
    short = np.array([[rows16.ctypes.data, rows16.nbytes - 2]], dtype=np.uint64)
    with pytest.raises(ValueError, match="key coded groups"):  # the spans take a row and a half
        _scatter.key_decode(words, bits, params, params, np.zeros(16, np.uint16), 1, short)
    assert not rows16.any()
    with pytest.raises(ValueError, match="row_steps4a"):
        _scatter.row_steps4a(np.zeros(8, np.uint8), np.zeros(8, np.uint8), np.zeros(4, np.uint8), f4[:7], f4)
    with pytest.raises(ValueError, match="bit_planes: .* n a multiple of 8"):
        _scatter.bit_planes(np.zeros(12, np.uint8), 12, 7, np.zeros(7, np.uint8), True)
    for huge in (1 << 62, (1 << 62) + 1):  # sizes whose products would wrap: refused, not read past
        with pytest.raises(ValueError, match=f"rot_dequantize: .*0 < d <= .*, got kind 0, d {huge}"):
            _scatter.rot_dequantize(np.zeros(4, np.int8), 8, huge, per_row, per_row, np.zeros(4, np.float32), 0)
        with pytest.raises(ValueError, match="key_extremes"):
            _scatter.key_extremes(np.zeros(1, np.float32), 0, huge, *[np.zeros(1, np.float32)] * 4)


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@pytest.mark.parametrize(
    ("T", "H", "D"), [(17, 2, 64), (40, 2, 64), (1100, 2, 64), (40, 3, 8), (40, 16, 64), (24, 32, 8)]
)
def test_int4a_keys_in_c_equal_the_numpy_ones(monkeypatch, T, H, D):
    """int4a's key groups through kvwire/_scatter.c (key_encode, key_decode) and through
    the numpy path a build without it takes: the same bytes and the same values, special
    values and random bytes included, bf16 rows read as they are; 16 channels at a time on
    x86-64 and the rest one by one (3 x 8 channels); the helper's refusals."""
    from kvwire import _scatter
    from kvwire.codec import allocated, int4

    codec = kvwire.codec.get("int4a")
    x = realistic_keys(T, H, D, seed=T).float()
    x[3, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    x[T - 2, 1, 5] = float("nan")
    x[T - 1, 0, :] = float("inf")  # a channel group with no finite value in the last group
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        spec = ChunkSpec(T, H, D, dtype, "k")
        noise = torch.randint(0, 256, (codec.encoded_size(spec),), generator=torch.Generator().manual_seed(T),
                              dtype=torch.uint8)  # fmt: skip
        fast = codec.encode(x.to(dtype), "k").data
        cases.append((dtype, spec, fast, noise, [codec.decode_bytes(b, spec) for b in (fast, noise)]))
    monkeypatch.setattr(allocated, "_helper", None)
    monkeypatch.setattr(int4, "_helper", None)  # the window's first group is an int4 key group
    for dtype, spec, fast, noise, fast_values in cases:
        assert torch.equal(codec.encode(x.to(dtype), "k").data, fast)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        for got, wire in zip(fast_values, (fast, noise)):
            assert torch.equal(got.view(bits), codec.decode_bytes(wire, spec).view(bits))
    rows, params = np.zeros((20, 8), np.float32), np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="bits"):
        _scatter.key_encode(rows, params, params, np.zeros(8, np.uint8), np.zeros(64, np.uint16))
    with pytest.raises(ValueError, match="parameters"):
        _scatter.key_encode(rows, params[:1], params, np.full(8, 4, np.uint8), np.zeros(64, np.uint16))


def test_int4a_bit_allocation_is_a_stable_sorts_first_choices():
    """allocate_bits picks, per head, the 3 D largest gains weight * GAIN[b], ties to the
    lower b and then the lower channel: a stable descending sort's first 3 D, which it
    finds without sorting. Ties are the hard part: zero weights, repeated weights, weights
    a power of two apart (GAIN values coincide across steps then)."""
    from kvwire.codec.allocated import GAIN, MEAN_BITS, allocate_bits

    g = torch.Generator().manual_seed(7)
    for trial in range(400):
        heads, d = int(torch.randint(1, 5, (1,), generator=g)), 8 * int(torch.randint(1, 17, (1,), generator=g))
        small = torch.randint(0, 4, (heads, d), generator=g).double()
        powers = 4.0 ** torch.randint(-2, 3, (heads, d), generator=g)
        weight = [torch.rand(heads, d, generator=g, dtype=torch.float64), small, small * 0, small * powers][trial % 4]
        gains = (weight.unsqueeze(1) * torch.tensor(GAIN, dtype=torch.float64).view(1, -1, 1)).view(heads, -1)
        order = torch.sort(gains, dim=1, descending=True, stable=True).indices[:, : (MEAN_BITS - 1) * d] % d
        expected = torch.ones(heads, d, dtype=torch.int64).scatter_add_(1, order, torch.ones_like(order))
        assert torch.equal(allocate_bits(weight), expected), (trial, heads, d)


@pytest.mark.parametrize(
    ("name", "role"), [("int8h", "k"), ("int4h", "v"), ("int4a", "k"), ("int4a", "v"), ("fp8", "v")]
)
def test_decode_bytes_takes_a_strided_buffer(name, role):
    """A 1-D uint8 view with a stride (every other byte of a larger buffer) decodes as its
    contiguous copy would: the codecs' C loops read flat arrays, so it is copied first."""
    codec = kvwire.codec.get(name)
    x = gaussian((40, 2, 64), torch.bfloat16, 3)
    data = codec.encode(x, role).data
    spread = torch.zeros(2 * data.numel(), dtype=torch.uint8)
    spread[::2] = data
    spec = ChunkSpec(40, 2, 64, torch.bfloat16, role)
    assert torch.equal(
        codec.decode_bytes(spread[::2], spec).view(torch.int16), codec.decode_bytes(data, spec).view(torch.int16)
    )


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "T", "H", "D"), [("int4", 70, 3, 64), ("int4/g64/k64", 150, 2, 128),
                                                    ("int4h", 33, 2, 64), ("int4", 21, 1, 6)])  # fmt: skip
def test_int4_keys_in_c_equal_the_torch_ones(monkeypatch, dtype, name, T, H, D):
    """int4's key groups (also int4h's keys) through kvwire/_scatter.c
    (int4_key_quantize_spans) and through the torch path: the same bytes for every
    dtype, partial last groups, special values, a group with no finite value, and a row
    width that is no multiple of 8 (1 x 6: the scalar loops)."""
    from kvwire.codec import int4

    codec = kvwire.codec.get(name)
    x = (realistic_keys(T, H, D, seed=T) * 3).to(dtype)
    x[3, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    x[T - 1, 0, :] = float("nan")  # with T % group == 1 the last group's channels have no finite value
    x[T // 2, H - 1, 1] = torch.finfo(dtype).max
    fast = codec.encode(x, "k").data
    monkeypatch.setattr(int4, "_helper", None)
    assert torch.equal(codec.encode(x, "k").data, fast)


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "T", "H", "D"), [("int4", 70, 3, 64), ("int4/g32", 33, 2, 128),
                                                    ("int4/g128", 5, 1, 128)])  # fmt: skip
def test_int4_values_in_c_equal_the_torch_ones(monkeypatch, dtype, name, T, H, D):
    """int4's value groups through kvwire/_scatter.c (int4_quantize: extremes, parameters
    and codes in one pass) and through torch: the same bytes for every dtype, with special
    values, a group with no finite value, the dtype's extremes and groups of one value;
    and decoded, the same values (bf16 and fp32 by the helper, fp16 by torch)."""
    from kvwire.codec import int4

    codec = kvwire.codec.get(name)
    x = (realistic_keys(T, H, D, seed=T) * 3).to(dtype)
    x[0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    x[1, 0, :] = float("nan")  # no finite value: scale and zero 0
    x[2 % T, H - 1, :] = 0.25  # one value: decodes exactly
    x[3 % T, 0, 1], x[3 % T, 0, 2] = torch.finfo(dtype).max, -torch.finfo(dtype).max
    x[4 % T, 0, 5] = torch.finfo(dtype).tiny
    spec = ChunkSpec(T, H, D, dtype, "v")
    fast = codec.encode(x, "v").data
    decoded = codec.decode_bytes(fast, spec)
    monkeypatch.setattr(int4, "_helper", None)
    assert torch.equal(codec.encode(x, "v").data, fast)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(codec.decode_bytes(fast, spec).view(bits), decoded.view(bits))


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
def test_int4_parameters_round_to_fp16_as_torch_does_at_every_tie(monkeypatch):
    """The helper rounds scales and zero-points to fp16 on the bits (half_bits, and
    half_bits8 for key groups, 8 channels at a time). Every value halfway between two
    fp16 numbers, normal and subnormal, and the fp32 numbers either side of it, as a
    group's zero-point (a group of that one value) and as its scale (a group of 0 and 15
    times it, so (mx - z) / 15 is exactly that value), up to and past 65504, where the
    format clamps, in value groups and key groups: the bytes torch's conversion gives."""
    from kvwire.codec import int4

    finite = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).double()
    halfway = ((finite[1:] + finite[:-1]) / 2).float()  # exact in fp32: 12 significant bits at most
    ties = torch.cat([halfway, torch.tensor([65504.0, 65519.0, 65520.0, 1e6])])
    ties = torch.cat([ties, torch.nextafter(ties, torch.tensor(math.inf)), torch.nextafter(ties, torch.tensor(0.0))])
    ties = torch.cat([ties, -ties])
    g = 32
    zeros = ties.view(-1, 1).expand(-1, g)  # one value per group: its zero-point is that value rounded
    scales = torch.zeros(ties.numel(), g)
    scales[:, 1] = ties.abs() * 15  # exact: 16 significant bits at most; the scale is then |tie| rounded
    x = torch.cat([zeros, scales]).reshape(-1, 1, g)
    codec = kvwire.codec.get("int4/g32")
    # keys: the same groups along 16 tokens of one channel each, one channel per tie; rows
    # of a multiple of 8 channels take the helper's 8-lane path, others the scalar one
    keyed = []
    for pad in (-ties.numel() % 8, -ties.numel() % 8 + 2):
        keys = torch.cat([ties, torch.ones(pad)]).view(1, 1, -1).expand(16, 1, -1)
        keyed.append(torch.cat([keys, keys.abs() * 15]))  # the second group: a 0 and 15 times the value
        keyed[-1][16] = 0.0
    fast = [codec.encode(x, "v").data] + [codec.encode(k, "k").data for k in keyed]
    monkeypatch.setattr(int4, "_helper", None)
    assert torch.equal(codec.encode(x, "v").data, fast[0])
    for k, want in zip(keyed, fast[1:]):
        assert torch.equal(codec.encode(k, "k").data, want)


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("name", "role"), [("int4", "v"), ("int4", "k"), ("int4/g32/k64", "k"), ("int4h", "k")])
def test_int4_any_bytes_decode_in_c_as_in_torch(monkeypatch, dtype, name, role):
    """Any wire bytes (fp16 scales and zero-points that are NaN, inf or subnormal
    included) decode through int4_dequantize to the bits torch's decode gives, every NaN
    the canonical one."""
    from kvwire.codec import int4

    codec = kvwire.codec.get(name)
    spec = ChunkSpec(77, 3, 64, dtype, role)
    wire = torch.randint(
        0, 256, (codec.encoded_size(spec),), dtype=torch.uint8, generator=torch.Generator().manual_seed(7)
    )
    groups = (codec.encoded_size(spec) - spec.numel // 2) // 4
    params = wire[: groups * 4].view(torch.int16)  # scales, then zero-points
    params[:4] = torch.tensor([0x7C00, -0x400, 0x7E01, 0x0001], dtype=torch.int32).to(
        torch.int16
    )  # inf, -inf, NaN, 2^-24
    params[groups : groups + 4] = torch.tensor([0x0001, 0x03FF, 0x7C00, -0x8000], dtype=torch.int32).to(torch.int16)
    wire[groups * 4 :] |= 0x11  # no code 0: inf times a code stays inf
    fast = codec.decode_bytes(wire, spec)
    monkeypatch.setattr(int4, "_helper", None)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    slow = codec.decode_bytes(wire, spec)
    assert torch.isnan(slow).any() and torch.isinf(slow).any()  # the bytes did reach the special cases
    assert torch.equal(slow.view(bits), fast.view(bits))


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
def test_int4_helper_calls_refuse_shapes_that_do_not_fit():
    """The helper's int4 entry points check every length before touching memory, and
    say what they expected."""
    helper = kvwire.scatter._scatter
    x = np.zeros((4, 64), dtype=np.float32)
    scale, zero, codes = np.zeros(4, np.uint16), np.zeros(4, np.uint16), np.zeros(4 * 32, np.uint8)
    helper.int4_quantize(x, 0, 64, scale, zero, codes)
    with pytest.raises(ValueError, match="int4_quantize: rows of g values.*got 4 rows, g 64, kind 0, 8 scale bytes, "
                       "8 zero bytes, 127 code bytes"):  # fmt: skip
        helper.int4_quantize(x, 0, 64, scale, zero, codes[:127])
    with pytest.raises(ValueError, match="x holds 1020 bytes, not whole rows of 64 values of kind 0"):
        helper.int4_quantize(x.reshape(-1)[:255], 0, 64, scale, zero, codes)
    with pytest.raises(ValueError, match="int4_quantize: kind 0 .fp32. or 1 .bf16."):
        helper.int4_quantize(x, 2, 64, scale, zero, codes)
    out = np.zeros((4, 64), dtype=np.float32)
    helper.int4_dequantize(codes, scale, zero, 2, 64, 64, 0, out, 0)
    with pytest.raises(ValueError, match="int4_dequantize: .*got 128 code bytes, heads 3, d 64"):
        helper.int4_dequantize(codes, scale, zero, 3, 64, 64, 0, out, 0)  # 4 rows are not tokens of 3 heads
    with pytest.raises(ValueError, match="int4_dequantize: .*key_rows 16, 8 scale bytes"):
        helper.int4_dequantize(codes, scale, zero, 2, 64, 64, 16, out, 0)  # keys: 2 x 64 parameters
    with pytest.raises(ValueError, match="int4_dequantize: .*16380 out bytes"):
        helper.int4_dequantize(codes, scale, zero, 2, 64, 64, 0, np.zeros(4095, np.float32), 0)
    keys = np.zeros(2 * 64, np.uint16)  # 2 tokens of 2 heads: one key group, however long a group may be
    for key_rows in (16, 2**62):  # a group count computed without overflow
        helper.int4_dequantize(codes, keys, keys, 2, 64, 64, key_rows, out, 0)
    spill, rows = np.zeros(64, np.float32), np.zeros(4 * 64, np.float32)
    short = np.array([[rows.ctypes.data, rows.nbytes - 4]], dtype=np.uint64)
    with pytest.raises(ValueError, match="int4_dequantize: .*1020 span bytes"):  # the spans take 4 rows less 4 bytes
        helper.int4_dequantize(codes, scale, zero, 2, 64, 64, 0, spill, 0, short)
    # spans: not whole rows, or more bytes than memory can hold (their count would wrap)
    span = np.array([[x.ctypes.data, x.nbytes]], dtype=np.uint64)
    with pytest.raises(ValueError, match="int4_quantize_spans: span 0 holds 1024 bytes, not whole rows of 384"):
        helper.int4_quantize_spans(span, 0, 96, scale, zero, codes)
    huge = np.array([[x.ctypes.data, 2**63], [x.ctypes.data, 2**63]], dtype=np.uint64)  # 2^64 bytes: 0 if wrapped
    empty_params, no_codes = np.zeros(0, np.uint16), np.zeros(0, np.uint8)
    with pytest.raises(ValueError, match="int4_quantize_spans: the spans hold more than"):
        helper.int4_quantize_spans(huge, 0, 64, empty_params, empty_params, no_codes)
    with pytest.raises(ValueError, match="int4_key_quantize_spans: the spans hold more than"):
        helper.int4_key_quantize_spans(huge, 0, 64, 16, empty_params, empty_params, no_codes)
    with pytest.raises(ValueError, match="fp8_quantize_spans: .*not all whole"):
        helper.fp8_quantize_spans(huge, 0, 64, np.zeros(0, np.float32), no_codes)


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
def test_int4_keys_of_long_groups_and_empty_chunks_in_c_equal_the_torch_ones(monkeypatch):
    """Key groups longer than any block size in use (8192 tokens: the helper keeps a
    pointer per row of a group) and chunks of no tokens, both roles: the torch path's bytes."""
    from kvwire.codec import int4

    codec = kvwire.codec.get("int4/g32")
    long_keys = realistic_keys(8200, 1, 32, seed=5).to(torch.bfloat16)
    empty = torch.zeros(0, 2, 64, dtype=torch.bfloat16)
    cases = [(long_keys, "k", 8192), (empty, "k", 16), (empty, "v", 16)]
    fast = [codec.encode(x, role, block_size).data for x, role, block_size in cases]
    monkeypatch.setattr(int4, "_helper", None)
    for (x, role, block_size), want in zip(cases, fast):
        assert torch.equal(codec.encode(x, role, block_size).data, want)


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@pytest.mark.parametrize("name", ["fp8", "int4", "int8h", "int4h"])
@pytest.mark.parametrize("role", ["k", "v"])
def test_encode_into_refuses_a_cache_dtype_the_helper_does_not_read(name, role):
    codec, spec = kvwire.codec.get(name), ChunkSpec(4, 1, 64, torch.float16, role)
    x = np.zeros(256, np.float16)
    spans = kvwire.scatter.Spans(np.array([[x.ctypes.data, x.nbytes]], dtype=np.uint64), x)
    assert not codec.encodes_into(spec)
    out = np.zeros(codec.encoded_size(spec), np.uint8)
    with pytest.raises(NotImplementedError, match=f"codec '{codec.descriptor}' encodes torch.float16 rows gathered"):
        codec.encode_into(spans, spec, out)
    assert not out.any()


@pytest.mark.skipif(kvwire.scatter._scatter is None, reason="the C helper was not built")
@pytest.mark.parametrize("name", ["fp8", "int4", "int8h", "int4h"])
def test_encode_into_refuses_an_output_off_its_alignment(name):
    """The codecs write 2- and 4-byte scales into ``out`` in place: an ``out`` that starts
    at an odd address is refused with what is wrong, and nothing is written."""
    codec, spec = kvwire.codec.get(name), ChunkSpec(16, 2, 64, torch.bfloat16, "v")
    x = torch.randn(16 * 2 * 64).to(torch.bfloat16).view(torch.uint16).numpy()
    spans = kvwire.scatter.Spans(np.array([[x.ctypes.data, x.nbytes]], dtype=np.uint64), x)
    size = codec.encoded_size(spec)
    backing = np.zeros(size + 64, np.uint8)
    first = -backing.ctypes.data % kvwire.codec.base.ALIGNMENT
    for past in (1, 2, 4, 8):
        with pytest.raises(ValueError, match=f"out: must start at a multiple of 16 bytes .* starts {past} bytes past"):
            codec.encode_into(spans, spec, backing[first + past : first + past + size])
    assert not backing.any()
    codec.encode_into(spans, spec, backing[first + 16 : first + 16 + size])  # aligned: coded as encode codes it
    want = codec.encode(torch.from_numpy(x).view(torch.bfloat16).view(16, 2, 64), "v").data.numpy()
    assert bytes(backing[first + 16 : first + 16 + size]) == bytes(want)


@pytest.mark.parametrize("name", ["raw", "fp8", "int4", "int4/g32/k64", "int8h", "int4h", "int4a", "int4+lz4"])
@pytest.mark.parametrize("role", ["k", "v"])
def test_wire_bytes_at_any_address_decode_as_aligned_ones(name, role):
    """A caller's wire bytes need not start on any boundary (a slice of a larger message):
    decode, decode_bytes and decode_into give what they give for the same bytes aligned."""
    codec = kvwire.codec.get(name)
    x = realistic_keys(40, 2, 64, seed=3).to(torch.bfloat16) if role == "k" else torch.randn(40, 2, 64)
    x = x.to(torch.bfloat16)
    encoded = codec.encode(x, role, 16)
    spec, wire = encoded.spec, bytes(encoded.data.numpy())
    want = codec.decode(encoded)
    for past in (1, 2, 3, 5, 8):
        message = bytearray(past) + bytearray(wire) + bytearray(3)
        buf = memoryview(message)[past : past + len(wire)]
        assert torch.equal(codec.decode_bytes(buf, spec).view(torch.int16), want.view(torch.int16))
        as_tensor = torch.frombuffer(message, dtype=torch.uint8)[past : past + len(wire)]
        assert torch.equal(codec.decode_bytes(as_tensor, spec).view(torch.int16), want.view(torch.int16))
        rows = torch.full_like(want, 7.0)
        flat = rows.view(torch.uint16).numpy()
        spans = kvwire.scatter.Spans(np.array([[flat.ctypes.data, flat.nbytes]], dtype=np.uint64), flat)
        if codec.decode_into(buf, spec, spans):
            assert torch.equal(rows.view(torch.int16), want.view(torch.int16))
        assert bytes(message[:past]) == bytes(past) and bytes(message[past : past + len(wire)]) == wire
