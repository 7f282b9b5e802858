"""``fp8``: OCP FP8 e4m3 codes with one fp32 scale per token per head.

The float operations below are the specification; the CUDA kernels reproduce them
bit for bit (``docs/formats.md`` spells them out). All arithmetic is IEEE fp32 with
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

import torch

from kvwire.codec.base import ChunkSpec, Codec, check_length, take, to_cache_dtype

E4M3_MAX = 448.0
E4M3_NAN = 0x7F


def fp8_scales(xf: torch.Tensor) -> torch.Tensor:
    """Per-row fp32 scale of fp32 ``xf`` (``[..., D]``), as the format defines it."""
    amax = xf.abs().amax(dim=-1)
    if not torch.isfinite(amax).all():  # rare: only then pay for masking inf and NaN out
        amax = torch.where(torch.isfinite(xf), xf.abs(), 0.0).amax(dim=-1)
    scale = amax / E4M3_MAX
    return scale.masked_fill_(scale == 0, 1.0)


def fp8_codes_into(out: torch.Tensor, xf: torch.Tensor, scale: torch.Tensor) -> None:
    """Write the E4M3 codes of fp32 ``xf`` with per-row ``scale`` into uint8 ``out``."""
    q = xf * torch.reciprocal(scale).unsqueeze(-1)
    q.clamp_(-E4M3_MAX, E4M3_MAX)  # saturate; NaN stays NaN
    out.view(torch.float8_e4m3fn).view(q.shape).copy_(q)
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
        xf = x3.float()
        scale = fp8_scales(xf)
        out[: rows * 4].view(torch.float32).copy_(scale.view(-1))
        fp8_codes_into(out[rows * 4 :], xf, scale)
        return out

    def _decode(self, data: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        check_length(data, self.encoded_size(spec), self.name)
        rows = spec.tokens * spec.heads
        scale = take(data, 0, rows * 4, "fp8 scales").clone().view(torch.float32)
        codes = take(data, rows * 4, rows * spec.head_dim, "fp8 codes")
        values = codes.view(torch.float8_e4m3fn).float().view(spec.tokens, spec.heads, spec.head_dim)
        return to_cache_dtype(values * scale.view(spec.tokens, spec.heads, 1), spec.dtype)
