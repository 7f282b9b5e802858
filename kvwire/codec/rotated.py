"""``int8h`` and ``int4h``: integers after a Hadamard rotation of each row.

Outlier channels make a per-row scale waste most of its levels on one or two channels. A
Hadamard rotation of ``head_dim`` spreads every channel over all of them, so the rotated
row is close to Gaussian and one scale per row fits it; the decoder rotates back. The
rotation is carried out on integers, so it is exact in any order (a matrix product on the
CPU, a butterfly on a GPU) and every implementation writes the same bytes. Per row
``x[0..D-1]`` (one token of one head), ``R`` = the rotation block (``rotation_block``: the
largest power of two dividing D, at most 256), ``L = log2 R``, all arithmetic fp32 with
each operation rounded to nearest even:

    x_i  = x_i if finite else 0             (a rotation would spread inf/NaN over the block)
    m    = max |x_i|;  e = its binary exponent (m = f * 2^e, 0.5 <= f < 1)
           (m == 0 or e < -90: a zero row: S (and Z) 0, every code 0)
    n_i  = rint(x_i * 2^(16 - e))           integers, |n_i| <= 2^16
    y    = H_R n, block by block             exact integers, |y_j| <= 2^24

    8 bits (int8h), symmetric:
      step = max|y_j| / 127;  inv = 1 / step;  c_j = clamp(rint(y_j * inv), -127, 127)
      S    = step * 2^(e - 16 - L)                           (fp32, exact)
      decode: x'_i = v_i * S,  v = H_R c (exact integers, +0 for zero)
    4 bits (int4h values), asymmetric (measured: twice as faithful as symmetric):
      mn, mx = min, max of y_j, each + 0.0
      S    = bf16((mx - mn) / 15 * 2^(e - 16 - L));  Z = bf16(mn * 2^(e - 16 - L))
      step = S * 2^(16 + L - e);  z = Z * 2^(16 + L - e);  inv = 1 / step (0 if step == 0)
      c_j  = clamp(rint((y_j - z) * inv), 0, 15)
      decode: x'_i = v_i * S; the first element of each block of R instead
              x'_i = ((v_i * 2^-L) * S + Z) * 2^L
              (a zero added to every rotated coefficient is, rotated back, R times that
              zero on the block's first element; the powers of two keep the sum from
              overflowing before its result would)

``H_R[i][j] = (-1)^popcount(i & j)``; ``H_R H_R = R I``, which the powers of two above
undo. Wire bytes: the scales (``S`` fp32 for 8 bits; ``S`` then ``Z``, bf16, for 4 bits,
each ``[T, H]``), then the codes ``[T, H, D]``: one int8 each, or two 4-bit codes per byte,
the even channel in the low nibble. ``docs/formats.md`` has the full text; the CUDA
kernels reproduce it bit for bit.

``int4h`` uses these 4-bit rows for values (and latents, states) and the ``int4`` key
groups (per channel, along tokens) for keys: rotating keys and scaling them per token was
measured and loses to per-channel groups (``docs/fidelity.md``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

from kvwire.codec.base import (
    HELPER_WRITES,
    ChunkSpec,
    Codec,
    abs_max,
    as_float32,
    check_length,
    check_out,
    helper_out,
    helper_rows,
    helper_spill,
    take,
    to_cache_dtype,
)
from kvwire.codec.int4 import Int4Codec, pack_nibbles, unpack_nibbles
from kvwire.codec.scratch import scratch
from kvwire.scatter import _scatter as _helper  # the C helper (kvwire/_scatter.c), or None

FIXED_POINT_BITS = 16  # |n_i| <= 2^16, so a rotated block of up to 2^8 sums stays an exact fp32 integer
MAX_ROTATION = 256
MIN_EXPONENT = -90  # rows whose largest value is below 2^-91 travel as zero (so S and Z stay normal fp32)


KRONECKER_FROM, KRONECKER_LOW = 128, 16  # see rotate()


def rotation_block(head_dim: int) -> int:
    """R: the largest power of two dividing ``head_dim``, at most 256."""
    return min(head_dim & -head_dim, MAX_ROTATION)


@functools.cache
def hadamard(block: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """H[i][j] = (-1)^popcount(i & j), ``block`` x ``block`` (symmetric)."""
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(dtype).contiguous()


def _matmul_is_exact() -> bool:
    """Whether an fp32 matrix product is IEEE fp32 here. ``set_float32_matmul_precision``
    ('high', 'medium') lets the CPU use bf16 or TF32 inside fp32 products, which would round
    the integers; then the rotation runs in fp64 (still exact, slower)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return getattr(matmul, "fp32_precision", "none") in ("none", "ieee")


def rotate(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``rows`` ([N, D] fp32 integers) times H, block by block, into ``out`` (a new tensor if
    None): exact integers, +0 for zero.

    From R = 128 on, ``H_R`` is applied as ``H_(R/16)`` ⊗ ``H_16`` (a product over the 4
    low index bits, then one over the high ones): 5.3x (R = 128) and 8x (R = 256) fewer
    multiply-adds than one R x R product, 2.4x and 4.7x faster on one CPU thread (``python3
    bench/codec_parts.py``), and the same integers (every partial sum is an integer below
    2^24, so exact in fp32).
    Below R = 128 the small batched product is slower than the single one."""
    n, d = rows.shape
    block = rotation_block(d)
    if out is None:
        out = torch.empty(n, d, dtype=torch.float32)
    if not _matmul_is_exact():
        h = hadamard(block, torch.float64)
        out.copy_((rows.to(torch.float64).view(n, d // block, block) @ h).view(n, d))
    elif block >= KRONECKER_FROM:
        high = block // KRONECKER_LOW
        low = scratch("c", (n * d // block, high, KRONECKER_LOW))
        torch.matmul(rows.view(-1, high, KRONECKER_LOW), hadamard(KRONECKER_LOW), out=low)
        torch.matmul(hadamard(high), low, out=out.view(-1, high, KRONECKER_LOW))
    else:
        torch.matmul(rows.view(n, d // block, block), hadamard(block), out=out.view(n, d // block, block))
    return out.add_(0.0)  # a zero is +0 whatever sign the product gave it (min/max and signs see it)


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^k as fp32, exactly, for integer k in [-126, 127] (built from its bits)."""
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def _fixed_point(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n [N, D] fp32 integers, e [N] int32, 0 for zero rows) of rows ``xf`` [N, D] fp32;
    ``n`` is the codec call's work buffer ``"a"``."""
    m = abs_max(xf, 1)
    if not torch.isfinite(m).all():  # rare: only then pay for zeroing inf and NaN
        xf = torch.where(torch.isfinite(xf), xf, 0.0)
        m = xf.abs().amax(dim=1)
    _, e = torch.frexp(m)
    zero = (m == 0) | (e < MIN_EXPONENT)
    e = torch.where(zero, 0, e)
    factor = torch.where(zero, 0.0, _pow2(FIXED_POINT_BITS - e))
    n = torch.mul(xf, factor.unsqueeze(1), out=scratch("a", xf.shape))  # an exact product
    return n.round_(), e  # ties to even


MODE8, MODE4, MODE4A = 8, 4, 5  # the C helper's modes: int8h, int4h's rows, int4a's compact rows


class Rotated(NamedTuple):
    """Rows after the fixed point and the rotation, as far as the quantizers need them."""

    e: torch.Tensor  # [N] int32, the rows' exponents
    mn: torch.Tensor  # [N] fp32, min of each rotated row
    mx: torch.Tensor  # [N] fp32, max of each rotated row
    rows: torch.Tensor | tuple[np.ndarray, int]  # the rotated rows [N, D], or the input as the C helper reads it


def rotated(x2: torch.Tensor) -> Rotated:
    """Rows ``x2`` ([N, D], any float dtype) fixed-point, rotated and measured. With the C
    helper the rotated rows are not kept: :func:`quantize` rotates each row again, which
    costs less than writing and reading 4 bytes per element (``python3 bench/codec_parts.py``)."""
    n, d = x2.shape
    if _helper is not None:
        source = helper_rows(x2)
        e, mn, mx = torch.empty(n, dtype=torch.int32), torch.empty(n), torch.empty(n)
        _helper.rot_stats(*source, d, e.numpy(), mn.numpy(), mx.numpy())
        return Rotated(e, mn, mx, source)
    fixed, e = _fixed_point(as_float32(x2))
    y = rotate(fixed, out=scratch("b", fixed.shape))
    return Rotated(e, y.amin(1) + 0.0, y.amax(1) + 0.0, y)


def quantize(r: Rotated, mode: int, inv: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> None:
    """The codes of rotated rows ``r`` into ``out`` (int8 [N, D] for ``MODE8``, else two per
    byte [N, D/2]), from each row's ``inv`` and ``z`` ([N] fp32; ``z`` unused by ``MODE8``):
    ``MODE8`` clamp(rint(y inv), -127, 127); ``MODE4`` clamp(rint((y - z) inv), 0, 15);
    ``MODE4A`` clamp(rint(y inv + z), 0, 15)."""
    if not isinstance(r.rows, torch.Tensor):
        array, kind = r.rows
        _helper.rot_quantize(array, kind, array.shape[1], mode, inv.float().contiguous().numpy(),
                             z.float().contiguous().numpy(), out.numpy())  # fmt: skip
        return
    y = r.rows
    if mode == MODE8:
        out.copy_(y.mul_(inv.unsqueeze(1)).round_().clamp_(-127, 127))
    elif mode == MODE4:
        pack_nibbles(y.sub_(z.unsqueeze(1)).mul_(inv.unsqueeze(1)).round_().clamp_(0, 15), out)
    else:
        pack_nibbles(y.mul_(inv.unsqueeze(1)).add_(z.unsqueeze(1)).round_().clamp_(0, 15), out)


def dequantize(codes: torch.Tensor, mode: int, d: int, scale: torch.Tensor, zero: torch.Tensor,
               dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Rotated rows decoded from ``codes`` (int8 [N, D] for ``MODE8``, else uint8 [N, D/2])
    and each row's ``scale`` and ``zero`` ([N] fp32): a new [N, D] tensor of ``dtype``, or
    ``out`` (contiguous [N, D] of ``dtype``) filled and returned.
    ``MODE8`` (H c) S; ``MODE4`` (H c) S, each block's first element ((v 2^-L) S + Z) 2^L;
    ``MODE4A`` (H (c - Z)) S."""
    n = codes.shape[0]
    scale, zero = scale.float().contiguous(), zero.float().contiguous()
    if _helper is not None and dtype in HELPER_WRITES:  # the rows written as they are
        rows = torch.empty(n, d, dtype=dtype) if out is None else out
        _helper.rot_dequantize(codes.numpy(), mode, d, scale.numpy(), zero.numpy(), *helper_out(rows))
        return rows
    y = _dequantize_fp32(codes, mode, d, scale, zero)
    return to_cache_dtype(y, dtype, fresh=True) if out is None else out.copy_(to_cache_dtype(y, dtype))


def _dequantize_fp32(codes: torch.Tensor, mode: int, d: int, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """:func:`dequantize`'s rows as fp32, in the codec call's work buffer ``"b"``."""
    n = codes.shape[0]
    if _helper is not None:
        y = scratch("b", (n, d))
        _helper.rot_dequantize(codes.numpy(), mode, d, scale.numpy(), zero.numpy(), y.numpy(), 0)
        return y
    block = rotation_block(d)
    v = scratch("a", (n, d))
    if mode == MODE8:
        v.copy_(codes)
    else:
        unpack_nibbles(codes, v)
    if mode == MODE4A:
        v.sub_(zero.unsqueeze(1))
    y = rotate(v, out=scratch("b", (n, d)))
    if mode == MODE4:
        first = y.view(n, d // block, block)[:, :, 0] * (1.0 / block)  # exact scalings around one multiply-add
        first.mul_(scale.unsqueeze(1)).add_(zero.unsqueeze(1)).mul_(float(block))
        y.mul_(scale.unsqueeze(1)).view(n, d // block, block)[:, :, 0] = first
    else:
        y.mul_(scale.unsqueeze(1))
    return y


def quantize8(x2: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Rows ``x2`` ([N, D]) -> S [N] fp32; their codes written to ``codes`` ([N, D] int8)."""
    r = rotated(x2)
    log_block = rotation_block(x2.shape[1]).bit_length() - 1
    step = torch.maximum(r.mx, r.mn.neg()).add_(0.0) / 127.0  # max |y|, never -0
    inv = torch.where(step > 0, torch.reciprocal(step), 0.0)
    quantize(r, MODE8, inv, inv, codes)
    return step * _pow2(r.e - FIXED_POINT_BITS - log_block)


def quantize4(x2: torch.Tensor, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x2`` ([N, D]) -> (S [N] bf16, Z [N] bf16); their codes (0..15) written to
    ``packed`` ([N, D/2] uint8, two per byte)."""
    r = rotated(x2)
    e, log_block = r.e, rotation_block(x2.shape[1]).bit_length() - 1
    scale = ((r.mx - r.mn) / 15.0 * _pow2(e - FIXED_POINT_BITS - log_block)).to(torch.bfloat16)
    zero = (r.mn * _pow2(e - FIXED_POINT_BITS - log_block)).to(torch.bfloat16)
    step = scale.float() * _pow2(FIXED_POINT_BITS + log_block - e)
    z = zero.float() * _pow2(FIXED_POINT_BITS + log_block - e)
    inv = torch.where(step > 0, torch.reciprocal(step), 0.0)
    quantize(r, MODE4, inv, z, packed)
    return scale, zero


class RotatedRows:
    """The byte layout of rotated rows: the scales (``S`` fp32 for 8 bits; ``S`` then ``Z``,
    bf16, for 4 bits), then the codes."""

    def __init__(self, bits: int) -> None:
        self.bits = bits

    def size(self, spec: ChunkSpec) -> int:
        rows = spec.tokens * spec.heads
        return rows * 4 + rows * spec.head_dim * self.bits // 8

    def encode(self, x3: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        rows, d = spec.tokens * spec.heads, spec.head_dim
        x2 = x3.reshape(rows, d)
        out = torch.empty(self.size(spec), dtype=torch.uint8)
        codes = out[rows * 4 :].view(rows, d * self.bits // 8)
        if self.bits == 8:
            out[: rows * 4].view(torch.float32).copy_(quantize8(x2, codes.view(torch.int8)))
        else:
            scale, zero = quantize4(x2, codes)
            out[: rows * 2].view(torch.bfloat16).copy_(scale)
            out[rows * 2 : rows * 4].view(torch.bfloat16).copy_(zero)
        return out

    def decode(self, data: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        rows, d = spec.tokens * spec.heads, spec.head_dim
        body = take(data, rows * 4, rows * d * self.bits // 8, "codes")
        if self.bits == 8:
            scale = take(data, 0, rows * 4, "scales").clone().view(torch.float32)
            y = dequantize(body.view(torch.int8).view(rows, d), MODE8, d, scale, scale, spec.dtype)
        else:
            scale = take(data, 0, rows * 2, "scales").clone().view(torch.bfloat16)
            zero = take(data, rows * 2, rows * 2, "zero-points").clone().view(torch.bfloat16)
            y = dequantize(body.view(rows, d // 2), MODE4, d, scale, zero, spec.dtype)
        return y.view(spec.shape)

    def decode_into(self, data: torch.Tensor, spec: ChunkSpec, spans) -> bool:
        """:meth:`decode`'s values written into ``spans`` (``Codec.decode_into``), a few rows
        at a time through a work buffer that stays in cache; False where the helper does
        not write the dtype."""
        if _helper is None or spec.dtype not in HELPER_WRITES:
            return False
        rows, d = spec.tokens * spec.heads, spec.head_dim
        body = take(data, rows * 4, rows * d * self.bits // 8, "codes")
        if self.bits == 8:
            mode, codes = MODE8, body.view(torch.int8)
            scale = zero = take(data, 0, rows * 4, "scales").clone().view(torch.float32)
        else:
            mode, codes = MODE4, body
            scale = take(data, 0, rows * 2, "scales").clone().view(torch.bfloat16).float()
            zero = take(data, rows * 2, rows * 2, "zero-points").clone().view(torch.bfloat16).float()
        _helper.rot_dequantize(codes.numpy(), mode, d, scale.numpy(), zero.numpy(), *helper_spill(spec), spans.iov)
        return True

    def encode_into(self, spans, spec: ChunkSpec, out: np.ndarray) -> None:
        """:meth:`encode`'s bytes from rows read where they lie (``Codec.encode_into``), each
        row in one pass (``rot_encode_spans``: rotated once, where :meth:`encode` gathers
        the rows and rotates each twice, once to measure it and once to code it)."""
        check_out(out, self.size(spec))
        assert _helper is not None and spec.dtype in HELPER_WRITES
        rows = spec.tokens * spec.heads
        _helper.rot_encode_spans(spans.iov, 1 if spec.dtype == torch.bfloat16 else 0, spec.head_dim,
                                 MODE8 if self.bits == 8 else MODE4, out[: rows * 4], out[rows * 4 :])  # fmt: skip


ROWS8, ROWS4 = RotatedRows(8), RotatedRows(4)


class Int8hCodec(Codec):
    """8-bit integers after a Hadamard rotation, one fp32 scale per token per head: the
    size of ``fp8``, a fraction of its error (``docs/fidelity.md``)."""

    name = "int8h"

    def encoded_size(self, spec: ChunkSpec) -> int:
        return ROWS8.size(spec)

    def _encode(self, x3: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        return ROWS8.encode(x3, spec)

    def _decode(self, data: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        check_length(data, self.encoded_size(spec), self.name)
        return ROWS8.decode(data, spec)

    def decodes_into(self, spec: ChunkSpec) -> bool:
        return _helper is not None and spec.dtype in HELPER_WRITES

    def _decode_into(self, data: torch.Tensor, spec: ChunkSpec, spans) -> bool:
        check_length(data, self.encoded_size(spec), self.name)
        return ROWS8.decode_into(data, spec, spans)

    def encodes_into(self, spec: ChunkSpec) -> bool:
        return _helper is not None and spec.dtype in HELPER_WRITES

    def encode_into(self, spans, spec: ChunkSpec, out: np.ndarray) -> None:
        self._check_encode_into(spec, out)
        ROWS8.encode_into(spans, spec, out)


class Int4hCodec(Int4Codec):
    """Keys as ``int4`` keys (per channel, ``key_tokens`` or a block of tokens per group);
    values, latents and states as 4-bit rotated rows (one fp32 scale per token per head)."""

    name = "int4h"

    def __init__(self, key_tokens: int | None = None) -> None:
        super().__init__(group_size=64, key_tokens=key_tokens)

    @property
    def descriptor(self) -> str:
        return self.name + ("" if self.key_tokens is None else f"/k{self.key_tokens}")

    def check(self, spec: ChunkSpec) -> None:
        Codec.check(self, spec)
        if spec.head_dim % 2:
            raise ValueError(f"head_dim: int4h packs two codes per byte, so head_dim must be even, got {spec.head_dim}")

    def encoded_size(self, spec: ChunkSpec) -> int:
        self.check(spec)
        return super().encoded_size(spec) if spec.role == "k" else ROWS4.size(spec)

    def _encode(self, x3: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        return super()._encode(x3, spec) if spec.role == "k" else ROWS4.encode(x3, spec)

    def _decode(self, data: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        if spec.role == "k":
            return super()._decode(data, spec)
        check_length(data, self.encoded_size(spec), self.name)
        return ROWS4.decode(data, spec)

    def decodes_into(self, spec: ChunkSpec) -> bool:
        if spec.role == "k":  # int4 key groups
            return super().decodes_into(spec)
        return _helper is not None and spec.dtype in HELPER_WRITES  # rotated rows

    def encodes_into(self, spec: ChunkSpec) -> bool:
        return self.decodes_into(spec)  # both ways for each role

    def encode_into(self, spans, spec: ChunkSpec, out: np.ndarray) -> None:
        if spec.role == "k":  # int4 key groups
            super().encode_into(spans, spec, out)
            return
        self._check_encode_into(spec, out)
        ROWS4.encode_into(spans, spec, out)

    def _decode_into(self, data: torch.Tensor, spec: ChunkSpec, spans) -> bool:
        if spec.role == "k":  # int4 key groups
            return super()._decode_into(data, spec, spans)
        check_length(data, self.encoded_size(spec), self.name)
        return ROWS4.decode_into(data, spec, spans)
