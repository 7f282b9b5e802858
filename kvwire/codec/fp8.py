"""``fp8``: OCP FP8 e4m3 codes with one fp32 scale per token per head.

The float operations below are the specification; the CUDA kernels and the C helper's
loops (kvwire/_scatter.c, ``fp8_quantize`` and ``fp8_dequantize``: one pass over the
rows, no temporaries; rows of other dtypes are encoded from fp32, and decoded by torch
into fp16) reproduce them bit for bit (``docs/formats.md`` spells them out;
tests/test_codecs.py compares them). All arithmetic is IEEE fp32 with
round-to-nearest-even, as separate operations (no fused multiply-add):

    amax  = max |x| over head_dim, over finite values only (0 when none is finite)
    scale = amax / 448                        ; if scale == 0: scale = 1
    inv   = 1 / scale
    code  = e4m3(clamp(x * inv, -448, 448))   ; round to nearest even, NaN -> 0x7F
    x'    = float(code) * scale, then rounded to the cache dtype

So ``+inf`` encodes as +448 (the top of the row's range), ``-inf`` as -448, and NaN
stays NaN: decoded, every NaN is the cache dtype's canonical one (``CANONICAL_NAN``).
Wire bytes: ``scales`` (fp32, ``[T, H]``) then ``codes`` (u8, ``[T, H, D]``).
"""

from __future__ import annotations

import numpy as np
import torch

from kvwire.codec.base import (
    HELPER_WRITES,
    ChunkSpec,
    Codec,
    abs_max,
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

E4M3_MAX = 448.0
E4M3_NAN = 0x7F
# Every code's value: a table lookup decodes about 5x faster on the CPU than torch's
# float8 -> float32 conversion (0.52 against 2.55 ms per million codes, one thread,
# bench/codec_parts.py), with
# the same values, since the table is made by that conversion.
E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
_TABLE = E4M3_VALUES.numpy()


def fp8_scales(xf: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(per-row fp32 scale of fp32 ``xf`` (``[..., D]``) as the format defines it, whether
    every element is finite)."""
    amax = abs_max(xf, -1)
    finite = bool(torch.isfinite(amax).all())  # amax and amin carry any inf or NaN of their row
    if not finite:  # rare: only then pay for masking inf and NaN out
        amax = torch.where(torch.isfinite(xf), xf.abs(), 0.0).amax(dim=-1)
    scale = (amax + 0.0) / E4M3_MAX  # + 0.0: a row of zeros gives +0, never -0
    return scale.masked_fill_(scale == 0, 1.0), finite


def fp8_codes_into(out: torch.Tensor, xf: torch.Tensor, scale: torch.Tensor, finite: bool) -> None:
    """Write the E4M3 codes of fp32 ``xf`` with per-row ``scale`` into uint8 ``out``
    (``finite``: no inf or NaN in ``xf``)."""
    inv = torch.reciprocal(scale)
    q = torch.mul(xf, inv.unsqueeze(-1), out=scratch("a", tuple(xf.shape)))
    q.clamp_(-E4M3_MAX, E4M3_MAX)  # saturate; NaN stays NaN
    out.view(torch.float8_e4m3fn).view(q.shape).copy_(q)
    # A NaN code comes only from a NaN in x, or from 0 * inf where a tiny scale's reciprocal
    # overflows: look for NaN only then.
    if not finite or not torch.isfinite(inv).all():
        nan = torch.isnan(q)
        if nan.any():
            out.view(q.shape)[nan] = E4M3_NAN  # one canonical NaN, whatever its sign


class Fp8Codec(Codec):
    name = "fp8"

    def encoded_size(self, spec: ChunkSpec) -> int:
        rows = spec.tokens * spec.heads
        return rows * 4 + rows * spec.head_dim

    def _encode(self, x3: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        rows = spec.tokens * spec.heads
        out = torch.empty(rows * 4 + spec.numel, dtype=torch.uint8)
        if _helper is not None and x3.device.type == "cpu":  # one pass for the scales, one for the codes
            x2, kind = helper_rows(x3.reshape(rows, spec.head_dim))
            _helper.fp8_quantize(x2, kind, spec.head_dim, out[: rows * 4].view(torch.float32).numpy(),
                                 out[rows * 4 :].numpy())  # fmt: skip
            return out
        xf = as_float32(x3)
        scale, finite = fp8_scales(xf)
        out[: rows * 4].view(torch.float32).copy_(scale.view(-1))
        fp8_codes_into(out[rows * 4 :], xf, scale, finite)
        return out

    def _wire(self, data: torch.Tensor, spec: ChunkSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's (scales, codes), its length checked; the scales copied (aligned)."""
        check_length(data, self.encoded_size(spec), self.name)
        rows = spec.tokens * spec.heads
        scale = take(data, 0, rows * 4, "fp8 scales").clone().view(torch.float32)
        return scale, take(data, rows * 4, rows * spec.head_dim, "fp8 codes")

    def _decode(self, data: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        scale, codes = self._wire(data, spec)
        if not self.decodes_into(spec):
            return _decode_torch(codes, scale, spec)
        out = torch.empty(spec.shape, dtype=spec.dtype)  # one pass, no temporaries
        _helper.fp8_dequantize(codes.numpy(), spec.head_dim, scale.numpy(), _TABLE, *helper_out(out))
        return out

    def encodes_into(self, spec: ChunkSpec) -> bool:
        return _helper is not None and spec.dtype in HELPER_WRITES

    def decodes_into(self, spec: ChunkSpec) -> bool:
        return _helper is not None and spec.dtype in HELPER_WRITES

    def encode_into(self, spans, spec: ChunkSpec, out: np.ndarray) -> None:
        self._check_encode_into(spec, out)
        rows = spec.tokens * spec.heads
        _helper.fp8_quantize_spans(spans.iov, 1 if spec.dtype == torch.bfloat16 else 0, spec.head_dim,
                                   out[: rows * 4].view(np.float32), out[rows * 4 :])  # fmt: skip

    def _decode_into(self, data: torch.Tensor, spec: ChunkSpec, spans) -> bool:
        if not self.decodes_into(spec):
            return False
        scale, codes = self._wire(data, spec)
        _helper.fp8_dequantize(codes.numpy(), spec.head_dim, scale.numpy(), _TABLE, *helper_spill(spec), spans.iov)
        return True


def _decode_torch(codes: torch.Tensor, scale: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
    """fp8 rows decoded by torch: the specification the helper's ``fp8_dequantize`` meets,
    and the path for cache dtypes it does not write (fp16)."""
    index = scratch("index", (spec.numel,), torch.int32).copy_(codes)
    values = torch.index_select(E4M3_VALUES, 0, index, out=scratch("a", (spec.numel,))).view(spec.shape)
    return to_cache_dtype(values.mul_(scale.view(spec.tokens, spec.heads, 1)), spec.dtype, fresh=True)
