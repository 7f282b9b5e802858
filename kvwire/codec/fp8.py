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
stays NaN. Wire bytes: ``scales`` (fp32, ``[T, H]``) then ``codes`` (u8, ``[T, H, D]``).
"""

from __future__ import annotations

import torch

from kvwire.codec.base import ChunkSpec, Codec, check_length, take

E4M3_MAX = 448.0
E4M3_NAN = 0x7F


def fp8_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-row fp32 scale of ``x`` (``[..., D]``), as the format defines it."""
    xf = x.float()
    amax = torch.where(torch.isfinite(xf), xf.abs(), 0.0).amax(dim=-1)
    scale = amax / E4M3_MAX
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 codes (uint8) of ``x`` given per-row ``scale``."""
    xf = x.float()
    inv = torch.reciprocal(scale).unsqueeze(-1)
    q = (xf * inv).clamp(-E4M3_MAX, E4M3_MAX)
    codes = q.to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(torch.isnan(xf), torch.full_like(codes, E4M3_NAN), codes)


class Fp8Codec(Codec):
    name = "fp8"

    def encoded_size(self, spec: ChunkSpec) -> int:
        rows = spec.tokens * spec.heads
        return rows * 4 + rows * spec.head_dim

    def _encode(self, x3: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        scale = fp8_scales(x3)
        codes = fp8_codes(x3, scale)
        return torch.cat([scale.reshape(-1).view(torch.uint8), codes.reshape(-1)])

    def _decode(self, data: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        check_length(data, self.encoded_size(spec), self.name)
        rows = spec.tokens * spec.heads
        scale = take(data, 0, rows * 4, "fp8 scales").clone().view(torch.float32)
        codes = take(data, rows * 4, rows * spec.head_dim, "fp8 codes")
        values = codes.view(torch.float8_e4m3fn).float().view(spec.tokens, spec.heads, spec.head_dim)
        return (values * scale.view(spec.tokens, spec.heads, 1)).to(spec.dtype)
