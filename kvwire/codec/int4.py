"""``int4``: asymmetric 4-bit codes with an fp16 scale and fp16 zero-point per group.

Groups (the KIVI split, because keys have a few outlier *channels* while values do not):

* keys (role ``k``): per channel, along ``K`` consecutive tokens: group ``[b, h, d]``
  covers tokens ``b*K .. (b+1)*K - 1`` of the chunk (the last group covers only the
  tokens present). ``K`` is the block size unless the codec sets ``key_tokens``
  (descriptor ``int4/g64/k64``): larger key groups halve or quarter the keys' share of
  scales and zero-points (keys at K=16: 2.67x smaller than bf16; K=64: 3.56x);
* values, latents and states (``v``, ``kv``, ``state``): per token, along ``head_dim``
  in runs of ``group_size`` (32, 64 or 128) channels.

The float operations below are the specification (IEEE fp32, round-to-nearest-even,
no fused multiply-add); the CUDA kernels reproduce them bit for bit:

    mn, mx = min, max of the group over finite values (0, 0 when none is finite),
             each plus 0.0 (so a -0 becomes +0)
    zero   = fp16(clamp(mn, -65504, 65504));            z = float(zero)
    scale  = fp16(clamp((mx - z) / 15, -65504, 65504));  s = float(scale)
    inv    = 1 / s if s > 0 else 0
    code   = clamp(rint((x - z) * inv), 0, 15)          ; NaN -> 0
    x'     = float(code) * s + z (two roundings), then rounded to the cache dtype

A constant group (mx == mn) decodes exactly whenever its value is an fp16 number.
Wire bytes: ``scales`` (fp16), ``zeros`` (fp16), then ``codes``: two per byte along
``head_dim``, the even channel in the low nibble.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kvwire.codec.base import (
    HELPER_WRITES,
    ChunkSpec,
    Codec,
    as_float32,
    check_length,
    helper_out,
    helper_rows,
    helper_spill,
    take,
    to_cache_dtype,
)
from kvwire.codec.scratch import scratch
from kvwire.scatter import _scatter as _helper  # the C helper (kvwire/_scatter.c), or None

GROUP_SIZES = (32, 64, 128)
KEY_TOKENS = (16, 32, 64, 128, 256)
FP16_MAX = 65504.0


def _finite_minmax(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """min and max over ``dim`` of the finite values; (0, 0) where none is finite."""
    # Two reductions, not torch.aminmax: on the CPU aminmax is 14-17x slower here
    # (bench/codec_micro.py, [64, 16, 8, 128] fp32 over tokens: 4.1-4.2 ms against 0.24-0.29 ms).
    mn, mx = x.amin(dim=dim), x.amax(dim=dim)
    if torch.isfinite(mn).all() and torch.isfinite(mx).all():
        return mn, mx  # the common case
    finite = torch.isfinite(x)
    mn = torch.where(finite, x, math.inf).amin(dim=dim)
    mx = torch.where(finite, x, -math.inf).amax(dim=dim)
    none = ~finite.any(dim=dim)
    zero = torch.zeros_like(mn)
    return torch.where(none, zero, mn), torch.where(none, zero, mx)


def int4_params(mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp16, zero fp16) of groups with fp32 ``mn`` / ``mx``, as the format defines."""
    mn = mn + 0.0  # -0 becomes +0: a min over {-0, +0} may return either, so pin it
    mx = mx + 0.0
    zero = mn.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    scale = ((mx - zero.float()) / 15.0).clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    return scale, zero


def int4_inverse(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale (fp32) of fp16 scales, 0 where a scale is not positive: what codes multiply by."""
    s = scale.float()
    return torch.where(s > 0, torch.reciprocal(s), torch.zeros_like(s))


def int4_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of fp32 ``x`` with broadcastable fp16 params, as fp32 integers in ``out``."""
    inv = int4_inverse(scale)
    q = torch.sub(x, zero.float(), out=out)
    q.mul_(inv).round_()  # (x - z) * inv, then ties-to-even
    return q.nan_to_num_(nan=0.0).clamp_(0, 15)


def pack_nibbles(codes: torch.Tensor, out: torch.Tensor) -> None:
    """Codes ``[..., D]`` (fp32 integers 0..15, contiguous) -> ``out`` ``[..., D/2]`` (uint8,
    contiguous), the even element in the low nibble."""
    converted = scratch("codes", tuple(codes.shape), torch.uint8)
    np.copyto(converted.numpy(), codes.numpy(), casting="unsafe")  # exact: integers 0..15
    # Each pair read as a little-endian 16-bit word, even | odd << 8: the word | word >> 4
    # has even | odd << 4 in its low byte. Contiguous 16-bit operations instead of strided
    # 8-bit ones: 0.60 -> 0.12 ms for a 2 MiB chunk's codes on one thread (bench/codec_parts.py).
    words = converted.numpy().view("<u2")
    merged = scratch("pairs", tuple(words.shape), torch.int16).numpy().view(np.uint16)
    np.right_shift(words, 4, out=merged)
    np.bitwise_or(merged, words, out=merged)
    np.copyto(out.numpy(), merged, casting="unsafe")  # the low byte of each word


def unpack_nibbles(packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``[..., D/2]`` bytes -> their codes in ``out`` ``[..., D]`` (any dtype); returns ``out``."""
    pairs = out.view(*packed.shape, 2)
    half = scratch("half", tuple(packed.shape), torch.uint8)
    pairs[..., 0].copy_(torch.bitwise_and(packed, 0x0F, out=half))
    pairs[..., 1].copy_(torch.bitwise_right_shift(packed, 4, out=half))
    return out


def encode_key_groups(x3: torch.Tensor, group: int, scales: torch.Tensor, zeros: torch.Tensor,
                      packed: torch.Tensor) -> None:  # fmt: skip
    """int4's key groups of ``x3`` ([T, H, D], any float dtype), ``group`` tokens each (the
    last what is left), per channel: their fp16 scales and zero-points into ``scales`` and
    ``zeros`` (flat, [groups, H, D]) and their codes into ``packed`` ([T, H, D/2]). Through
    the C helper when it is built (each group's extremes, parameters and codes while its
    rows are in cache), else torch: the same bytes (tests/test_codecs.py compares the two).
    ``int4a``'s first key group is one."""
    T, H, D = x3.shape
    if _helper is not None:
        rows, kind = helper_rows(x3.reshape(T, H * D))
        iov = np.array([[rows.ctypes.data, rows.nbytes]], dtype=np.uint64)  # one span: the rows, gathered
        codes = packed.reshape(T, H * (D // 2)).numpy()  # as rows: [T, -1] cannot be inferred with T = 0
        _helper.int4_key_quantize_spans(iov, kind, H * D, group, scales.view(torch.int16).numpy(),
                                        zeros.view(torch.int16).numpy(), codes)  # fmt: skip
        return
    xf = as_float32(x3)
    q = scratch("a", (T, H, D))
    row = done = 0
    for part in _key_blocks(xf, group):  # [groups, tokens, H, D]
        n, tokens = part.shape[0], part.shape[1]
        mn, mx = _finite_minmax(part, dim=1)
        scale, zero = int4_params(mn, mx)
        scales[done * H * D : (done + n) * H * D] = scale.view(-1)
        zeros[done * H * D : (done + n) * H * D] = zero.view(-1)
        codes = q[row : row + n * tokens].view(part.shape)
        int4_codes(part, scale.unsqueeze(1), zero.unsqueeze(1), out=codes)
        row, done = row + n * tokens, done + n
    pack_nibbles(q, packed)


def _key_blocks(x: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """``[T, H, D]`` as ``[blocks, tokens, H, D]`` views: the full blocks, then the partial one."""
    T = x.shape[0]
    full = T // block_size
    parts = []
    if full:
        parts.append(x[: full * block_size].view(full, block_size, *x.shape[1:]))
    if T % block_size:
        parts.append(x[full * block_size :].unsqueeze(0))
    return parts


class Int4Codec(Codec):
    name = "int4"

    def __init__(self, group_size: int = 64, key_tokens: int | None = None) -> None:
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size: {group_size} is not one of {GROUP_SIZES}")
        if key_tokens is not None and key_tokens not in KEY_TOKENS:
            raise ValueError(f"key_tokens: {key_tokens} is not one of {KEY_TOKENS} (or None: the block size)")
        self.group_size = group_size
        self._key_tokens = key_tokens

    @property
    def key_tokens(self) -> int | None:
        return self._key_tokens

    @property
    def descriptor(self) -> str:
        keys = "" if self.key_tokens is None else f"/k{self.key_tokens}"
        return f"int4/g{self.group_size}{keys}"

    def key_group(self, spec: ChunkSpec) -> int:
        """Tokens per key group: ``key_tokens``, or the block size when it is not set."""
        return self.key_tokens or spec.block_size

    def check(self, spec: ChunkSpec) -> None:
        super().check(spec)
        if spec.head_dim % 2:
            raise ValueError(f"head_dim: int4 packs two codes per byte, so head_dim must be even, got {spec.head_dim}")
        if spec.role != "k" and spec.head_dim % self.group_size:
            raise ValueError(
                f"head_dim: {spec.head_dim} is not a multiple of the int4 group_size {self.group_size} "
                f"(role {spec.role!r}); choose group_size from {GROUP_SIZES} dividing it"
            )

    def _num_groups(self, spec: ChunkSpec) -> int:
        if spec.role == "k":
            blocks = -(-spec.tokens // self.key_group(spec))
            return blocks * spec.heads * spec.head_dim
        return spec.tokens * spec.heads * (spec.head_dim // self.group_size)

    def encoded_size(self, spec: ChunkSpec) -> int:
        self.check(spec)
        return self._num_groups(spec) * 4 + spec.numel // 2

    def _encode(self, x3: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        T, H, D = spec.shape
        groups = self._num_groups(spec)
        out = torch.empty(self.encoded_size(spec), dtype=torch.uint8)
        scales = out[: groups * 2].view(torch.float16)
        zeros = out[groups * 2 : groups * 4].view(torch.float16)
        packed = out[groups * 4 :].view(T, H, D // 2)
        if spec.role == "k":
            encode_key_groups(x3, self.key_group(spec), scales, zeros, packed)
            return out
        if _helper is not None:  # one pass: each group's extremes, parameters and codes
            rows, kind = helper_rows(x3.reshape(-1, self.group_size))
            _helper.int4_quantize(rows, kind, self.group_size, scales.view(torch.int16).numpy(),
                                  zeros.view(torch.int16).numpy(), packed.view(-1).numpy())  # fmt: skip
            return out
        xf = as_float32(x3)
        q = scratch("a", (T, H, D))
        g = self.group_size
        grouped = xf.view(T, H, D // g, g)
        mn, mx = _finite_minmax(grouped, dim=-1)  # [T, H, D/g]
        scale, zero = int4_params(mn, mx)
        scales.copy_(scale.view(-1))
        zeros.copy_(zero.view(-1))
        int4_codes(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), out=q.view(T, H, D // g, g))
        pack_nibbles(q, packed)
        return out

    def encodes_into(self, spec: ChunkSpec) -> bool:
        return _helper is not None and spec.dtype in HELPER_WRITES

    def encode_into(self, spans, spec: ChunkSpec, out: np.ndarray) -> None:
        self._check_encode_into(spec, out)
        groups, kind = self._num_groups(spec), 1 if spec.dtype == torch.bfloat16 else 0
        scales, zeros = out[: groups * 2].view(np.uint16), out[groups * 2 : groups * 4].view(np.uint16)
        if spec.role == "k":  # a token's heads are a row; groups of key_group rows
            _helper.int4_key_quantize_spans(spans.iov, kind, spec.heads * spec.head_dim, self.key_group(spec), scales,
                                            zeros, out[groups * 4 :])  # fmt: skip
        else:  # each run of group_size values is a row
            _helper.int4_quantize_spans(spans.iov, kind, self.group_size, scales, zeros, out[groups * 4 :])

    def decodes_into(self, spec: ChunkSpec) -> bool:
        return _helper is not None and spec.dtype in HELPER_WRITES

    def _wire(self, data: torch.Tensor, spec: ChunkSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A chunk's (codes, scales, zeros) as bytes, as int4_dequantize takes them, its length checked."""
        check_length(data, self.encoded_size(spec), self.name)
        groups = self._num_groups(spec)
        codes = take(data, groups * 4, spec.numel // 2, "int4 codes").numpy()
        scales = take(data, 0, groups * 2, "int4 scales").numpy()
        return codes, scales, take(data, groups * 2, groups * 2, "int4 zeros").numpy()

    def _helper_args(self, spec: ChunkSpec) -> tuple[int, int, int, int]:
        """int4_dequantize's (heads, d, g, key_rows) for chunks like ``spec``."""
        keys = self.key_group(spec) if spec.role == "k" else 0
        return spec.heads, spec.head_dim, self.group_size, keys

    def _decode_into(self, data: torch.Tensor, spec: ChunkSpec, spans) -> bool:
        if not self.decodes_into(spec):
            return False
        _helper.int4_dequantize(*self._wire(data, spec), *self._helper_args(spec), *helper_spill(spec), spans.iov)
        return True

    def _decode(self, data: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        if self.decodes_into(spec):  # one pass, no temporaries
            out = torch.empty(spec.shape, dtype=spec.dtype)
            _helper.int4_dequantize(*self._wire(data, spec), *self._helper_args(spec), *helper_out(out))
            return out
        check_length(data, self.encoded_size(spec), self.name)
        groups = self._num_groups(spec)
        scale = take(data, 0, groups * 2, "int4 scales").clone().view(torch.float16).float()
        zero = take(data, groups * 2, groups * 2, "int4 zeros").clone().view(torch.float16).float()
        packed = take(data, groups * 4, spec.numel // 2, "int4 codes")
        T, H, D = spec.shape
        y = unpack_nibbles(packed.view(T, H, D // 2), scratch("a", (T, H, D)))
        if spec.role == "k":
            s, z = scale.view(-1, H, D), zero.view(-1, H, D)
            block = 0
            for part in _key_blocks(y, self.key_group(spec)):  # views of y: scaled in place
                n = part.shape[0]
                part.mul_(s[block : block + n].unsqueeze(1)).add_(z[block : block + n].unsqueeze(1))
                block += n
            return to_cache_dtype(y, spec.dtype, fresh=True)
        g = self.group_size
        grouped = y.view(T, H, D // g, g)
        grouped.mul_(scale.view(T, H, D // g, 1)).add_(zero.view(T, H, D // g, 1))
        return to_cache_dtype(y, spec.dtype, fresh=True)
