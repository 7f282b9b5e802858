"""Synthetic KV with the statistics that matter to codecs, for tests and benchmarks.

Real attention keys have a few *outlier channels* (10-20x the others' magnitude,
largely the same channels for every token) and a per-channel bias; values look
closer to Gaussian. That is why ``int4`` groups keys per channel: a per-token group
that contains an outlier channel wastes its 16 levels on one channel.
"""

from __future__ import annotations

import torch


def realistic_keys(
    tokens: int,
    heads: int,
    head_dim: int,
    *,
    outlier_channels: int = 4,
    outlier_scale: tuple[float, float] = (10.0, 20.0),
    bias: float = 1.0,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> torch.Tensor:
    """``[tokens, heads, head_dim]`` keys with per-head outlier channels and channel bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads, head_dim, generator=g)
    x += bias * torch.randn(1, heads, head_dim, generator=g)
    for h in range(heads):
        channels = torch.randperm(head_dim, generator=g)[:outlier_channels]
        lo, hi = outlier_scale
        gains = lo + (hi - lo) * torch.rand(outlier_channels, generator=g)
        x[:, h, channels] *= gains
    return x.to(dtype)


def realistic_values(
    tokens: int, heads: int, head_dim: int, *, dtype: torch.dtype = torch.bfloat16, seed: int = 1
) -> torch.Tensor:
    """``[tokens, heads, head_dim]`` values: Gaussian with a per-token magnitude spread."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads, head_dim, generator=g)
    x *= 0.5 + torch.rand(tokens, 1, 1, generator=g)
    return x.to(dtype)


def relative_mse(x: torch.Tensor, y: torch.Tensor) -> float:
    """``sum((x - y)^2) / sum(x^2)`` in fp64."""
    x64, y64 = x.double(), y.double()
    return float(((x64 - y64) ** 2).sum() / (x64**2).sum().clamp_min(1e-300))


def cosine_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cosine similarity of the ``head_dim`` vectors of x and y."""
    return float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).mean())
