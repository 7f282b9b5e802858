#!/usr/bin/env python3
"""Candidate 4-bit key (and value) schemes, scored by next-token KL on SmolLM2-135M before
any of them is given a wire format: the search behind docs/fidelity.md, "4 bits: what
else was measured".

Each scheme is ``keys:K:values``: ``keys`` one of the modes below over key groups of ``K``
tokens (per channel, as ``int4`` groups them), ``values`` how values travel (``int4h`` or
``int4``: the codecs' CPU references; ``hN``: rotated rows at N bits, without the codec's
exact integer arithmetic; any of them with ``/first``: the request's first token exact).
Sizes are bytes per token per head for head_dim 64 as a share of bf16, for long prompts
(the size the fidelity table reports for 1024 tokens).

    python3 bench/four_bit_keys.py --lengths 32,128 plain:16:int4 plain:64:int4h chan:64:int4h

Key modes (``n`` tokens in a group; fp16 scale and zero-point per channel per group unless
said):

* ``plain``: int4's keys;
* ``chan``: per channel, the element farthest from the channel's mean kept exact (fp16
  value and a 1-byte index: 3 bytes per channel per group), the range set by the others;
* ``row``: per head, the token with the largest max |x| kept exact (bf16 row + index);
* ``first``: the group's first token kept exact when the group starts the request
  (the attention sink);
* ``tokscale``: each token divided by its own max |x| (fp16, 2 bytes per token per head)
  before the per-channel groups;
* ``clip``: the range per channel shrunk to the one of 8 fractions (1.0 .. 0.6) with the
  least squared error (no extra bytes);
* ``smooth``: each channel divided by its max |x| over the group, then rotated and
  quantized per token like int4h's values (4 bytes per token per head + 2 per channel);
* ``bN``: N-bit codes instead of 4;
* ``meta8``: int4's groups, but each group's min and max travel as 1-byte codes on a
  255-step grid over the request's range of that channel (two fp16 per channel per
  request), rounded outwards: 2 bytes per channel per group instead of 4; ``metaB``:
  B-bit codes (``meta7``: 1.75 bytes);
* ``meta8m`` (``metaBm``): the same with groups of 16 tokens for the request's first 64
  tokens and of ``K`` after them; ``metaBs``: the first group's bounds in fp16 and the
  code grid over the other groups' range; any of them with ``x`` (``meta7sx``): each
  group's codes moved inwards by up to two steps where that lowers its squared error;
* ``cmetaBaA``: B-bit codes on a companded grid around the channel's median,
  ``c + u * sinh(code / A)`` (fine steps near the centre, coarse where only an outlier
  group reaches);
* ``norm`` (``normh``): no key groups: each channel less its request-wide mean and over
  its deviation, then each token's row as ``int4h`` quantizes values (rotated first);
* ``plainv``, ``metaB...v`` (``meta7sv``): bits per channel instead of 4 each, 4 on
  average per head: one bit at a time to the channel whose squared error (each group's
  range squared over ``(2^b - 1)^2``) falls most, 1 to 8 each, counted in 3 bits per
  channel per request (``allocate_bits``; with ``s``, the first group keeps 4 bits);
* ``pairX``: fp16 bounds shared by two channels (``h``: i and i + D/2, ``a``: 2i and
  2i + 1, ``s``: neighbours by range): half the key metadata.

Value kinds besides the codecs: ``hN`` (above), ``s4xT``: rotated rows, symmetric 4-bit
codes (-7..7), one 1-byte scale per ``T`` tokens of a head (a log grid of 2^(1/16) steps,
rounded up): with ``meta8`` keys, 3.49x at ``T = 1`` and 3.52x at ``T = 2``; and ``z4`` /
``z8``: rotated rows, asymmetric codes 0..15, a 1-byte log scale per row and an integer
zero-point in steps of 4 (or 8) bits: 1.5 (2) bytes per row instead of `int4h`'s 4;
``z4s``: the request's first 16 rows as ``int4h`` (``z4sN``: the first N); ``z4x`` (``z4xs``): scale and
zero-point searched for the least error.

Besides the KL, each scheme's squared error of keys and of values over every layer and
prompt is printed as a multiple of the first scheme's: the error itself, free of the
near-ties that make a few prompts' KL swing (docs/fidelity.md).

Not a test and not a codec: a way to decide what deserves one.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kvwire.codec  # noqa: E402
from kvwire.codec.int4 import int4_params  # noqa: E402

HEAD_DIM = 64  # SmolLM2-135M
CLIP_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)
SIZE_TOKENS = 1024  # sizes are a 1024-token request's, as docs/fidelity.md reports them
MIXED_HEAD = 64  # meta8m: key groups of 16 tokens up to here
WINDOW_STEP = 157  # --windows: tokens between the starts of a text's prompts


def _levels(part: torch.Tensor, bits, dim: int, mn=None, mx=None) -> torch.Tensor:
    """Asymmetric ``bits``-bit round trip of ``part`` along ``dim`` (fp16 scale and zero);
    ``bits`` an int, or a tensor of them that broadcasts against one slice (a key group's
    ``[H, D]``: bits per channel)."""
    if mn is None:
        mn, mx = part.amin(dim, keepdim=True), part.amax(dim, keepdim=True)
    top = (1 << bits) - 1 if isinstance(bits, int) else (2 ** bits.float() - 1).unsqueeze(dim)
    zero = mn.half().float()
    scale = ((mx - zero) / top).half().float()
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = ((part - zero) * inv).round().clamp_min(0)
    return (q.clamp_max(top) if isinstance(bits, int) else torch.minimum(q, top)) * scale + zero


def allocate_bits(x: torch.Tensor, bounds: list[tuple[int, int]], mean: int = 4, fewest: int = 1,
                  most: int = 8) -> torch.Tensor:  # fmt: skip
    """Bits per key channel ``[H, D]`` for the groups ``bounds`` of ``x`` ``[T, H, D]``,
    ``mean`` on average per head: one bit at a time to the channel whose squared error
    (each group's range squared over ``(2^b - 1)^2``) falls most, from ``fewest`` each, at
    most ``most``."""
    _, heads, d = x.shape
    ranges = torch.zeros(heads, d, dtype=torch.float64)
    for g0, g1 in bounds:
        ranges += (x[g0:g1].amax(0) - x[g0:g1].amin(0)).double() ** 2
    bits = torch.full((heads, d), fewest, dtype=torch.long)
    rows = torch.arange(heads)
    for _ in range((mean - fewest) * d):
        gain = ranges / (2.0**bits - 1) ** 2 - ranges / (2.0 ** (bits + 1) - 1) ** 2
        gain[bits >= most] = -1
        bits[rows, gain.argmax(1)] += 1
    return bits


def _least_error(x: torch.Tensor, candidates, dim: int) -> torch.Tensor:
    """Of the round trips ``candidates`` of ``x``, per slice along ``dim`` (a key channel, a
    value row) the one with the least squared error; the first of equals."""
    best, best_err = None, None
    for y in candidates:
        err = ((y - x) ** 2).sum(dim, keepdim=True)
        if best is None or best_err is None:
            best, best_err = y, err
            continue
        better = err < best_err
        best, best_err = torch.where(better, y, best), torch.where(better, err, best_err)
    assert best is not None, "no candidates"
    return best


def _without(part: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """int4 per-channel round trip whose range ignores the ``keep`` elements, which stay exact."""
    inf = torch.full_like(part, float("inf"))
    mn = torch.where(keep, inf, part).amin(0)
    mx = torch.where(keep, -inf, part).amax(0)
    mn, mx = torch.where(torch.isfinite(mn), mn, 0), torch.where(torch.isfinite(mx), mx, 0)
    scale, zero = int4_params(mn, mx)
    y = _levels(part, 4, 0, zero.float().unsqueeze(0), (zero.float() + 15 * scale.float()).unsqueeze(0))
    return torch.where(keep, part.bfloat16().float(), y)


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def key_group(part: torch.Tensor, mode: str, starts_request: bool) -> torch.Tensor:
    """One group ``[n, H, D]`` of keys after the round trip of ``mode``."""
    n, heads, _ = part.shape
    keep = torch.zeros_like(part, dtype=torch.bool)
    if mode == "plain":
        return _levels(part, 4, 0)
    if mode.startswith("b"):
        return _levels(part, int(mode[1:]), 0)
    if mode == "chan":
        keep.scatter_(0, (part - part.mean(0, keepdim=True)).abs().argmax(0, keepdim=True), True)
        return _without(part, keep)
    if mode == "row":
        keep[part.abs().amax(-1).argmax(0), torch.arange(heads)] = True
        return _without(part, keep)
    if mode == "first":
        keep[0] = starts_request
        return _without(part, keep)
    if mode == "tokscale":
        r = part.abs().amax(-1, keepdim=True).clamp_min(1e-30).half().float()
        return _levels(part / r, 4, 0) * r
    if mode == "clip":
        mid, half = (part.amax(0) + part.amin(0)) / 2, (part.amax(0) - part.amin(0)) / 2
        clipped = (_levels(part, 4, 0, (mid - half * f).unsqueeze(0), (mid + half * f).unsqueeze(0))
                   for f in CLIP_FRACTIONS)  # fmt: skip
        return _least_error(part, clipped, 0)
    if mode == "meta8":
        raise ValueError("meta8 needs the request's range: round_trip_keys handles it")
    if mode == "smooth":
        h = _hadamard(part.shape[-1])
        scale = part.abs().amax(0, keepdim=True).clamp_min(1e-6).half().float()
        return (_levels((part / scale) @ h, 4, -1) @ h.T) * scale
    raise ValueError(f"unknown key mode {mode!r}")


def group_bounds(tokens: int, group: int, mode: str) -> list[tuple[int, int]]:
    """Key groups ``[g0, g1)``: every ``group`` tokens, or with ``meta8m`` groups of 16 for
    the request's first 64 tokens and of ``group`` after them."""
    head = min(tokens, MIXED_HEAD) if mode.startswith("meta") and mode.removesuffix("x").endswith("m") else 0
    starts = list(range(0, head, 16)) + list(range(head, tokens, group))
    return [(g0, min(g0 + (16 if g0 < head else group), tokens)) for g0 in starts]


def round_trip_keys(x: torch.Tensor, group: int, mode: str) -> torch.Tensor:
    out = torch.empty_like(x)
    if mode.startswith("cmeta"):
        return _companded_keys(x, group, mode)
    if mode.startswith("pair"):
        return _paired_keys(x, group, mode)
    if mode in ("norm", "normh"):
        return _normalised_keys(x, mode == "normh")
    if mode == "plainv":  # int4's groups, bits per channel
        bounds = group_bounds(x.shape[0], group, mode)
        bits = allocate_bits(x, bounds)
        for g0, g1 in bounds:
            out[g0:g1] = _levels(x[g0:g1], bits, 0)
        return out
    if mode.startswith("meta"):  # the request's per-channel range in fp16, then B-bit codes per group
        searched, mode = mode.endswith("x"), mode.removesuffix("x")
        varied, mode = mode.endswith("v"), mode.removesuffix("v")
        top = (1 << _meta_bits(mode)) - 1
        bounds = group_bounds(x.shape[0], group, mode)
        rest = x
        if mode.endswith("s"):  # the first group's bounds in fp16, the grid over the others' range
            out[: bounds[0][1]] = _levels(x[: bounds[0][1]], 4, 0)
            rest, bounds = (x[bounds[0][1] :], bounds[1:]) if len(bounds) > 1 else (x, [])
        # ``v``: bits per channel, allocated over the coded groups (the first's, with ``s``, stay 4)
        bits = allocate_bits(x, bounds) if varied and bounds else 4
        lo, hi = rest.amin(0).half().float(), rest.amax(0).half().float()
        lo, hi = torch.minimum(lo, rest.amin(0)), torch.maximum(hi, rest.amax(0))  # fp16 rounding kept outside
        step = ((hi - lo) / top).clamp_min(1e-30)
        for g0, g1 in bounds:
            part = x[g0:g1]
            lo_code = ((part.amin(0) - lo) / step).floor().clamp(0, top)
            hi_code = ((part.amax(0) - lo) / step).ceil().clamp(0, top)
            # searched (``metaBx``): bounds moved inwards by up to two codes each, per channel
            # the pair with the least squared error (clipping the farthest elements)
            moves = [(a, b) for a in range(3) for b in range(3)] if searched else [(0, 0)]
            bounded = (_levels(part, bits, 0, (lo + torch.minimum(lo_code + d_lo, hi_code) * step).unsqueeze(0),
                               (lo + torch.maximum(hi_code - d_hi, lo_code + d_lo) * step).unsqueeze(0))
                       for d_lo, d_hi in moves)  # fmt: skip
            out[g0:g1] = _least_error(part, bounded, 0)
        return out
    for g0 in range(0, x.shape[0], group):
        out[g0 : g0 + group] = key_group(x[g0 : g0 + group], mode, g0 == 0)
    return out


def channel_pairs(x: torch.Tensor, how: str) -> torch.Tensor:
    """``[H, D]`` partner of each channel: ``h`` i and i + D/2 (rotate-half RoPE), ``a``
    2i and 2i + 1 (interleaved RoPE), ``s`` neighbours in the order of the channels' ranges
    over the request (a per-head permutation that would travel with the chunk)."""
    heads, d = x.shape[1], x.shape[2]
    idx = torch.arange(d)
    if how == "h":
        return ((idx + d // 2) % d).expand(heads, d)
    if how == "a":
        return (idx ^ 1).expand(heads, d)
    order = (x.amax(0) - x.amin(0)).argsort(-1)  # [H, D]
    partner = torch.empty_like(order)
    partner.scatter_(1, order[:, 0::2], order[:, 1::2])
    partner.scatter_(1, order[:, 1::2], order[:, 0::2])
    return partner


def _paired_keys(x: torch.Tensor, group: int, mode: str) -> torch.Tensor:
    """``pairX``: int4's per-channel groups whose min and max (fp16) are shared by two
    channels (paired as ``channel_pairs`` says): half the key metadata."""
    partner = channel_pairs(x, mode.removeprefix("pair")[:1])
    out = torch.empty_like(x)
    for g0 in range(0, x.shape[0], group):
        part = x[g0 : g0 + group]
        mn, mx = part.amin(0), part.amax(0)
        mn = torch.minimum(mn, mn.gather(1, partner))
        mx = torch.maximum(mx, mx.gather(1, partner))
        out[g0 : g0 + group] = _levels(part, 4, 0, mn.unsqueeze(0), mx.unsqueeze(0))
    return out


def _normalised_keys(x: torch.Tensor, rotate: bool) -> torch.Tensor:
    """``norm``: each channel less its request-wide mean and divided by its request-wide
    standard deviation (two fp16 per channel per request), then per token as ``int4h``'s
    values quantize a row (``normh``: rotated first): per-token metadata, no key groups."""
    mu = x.mean(0).half().float()
    sd = x.std(0).clamp_min(1e-6).half().float()
    y = (x - mu) / sd
    h = _hadamard(x.shape[-1]) if rotate else torch.eye(x.shape[-1])
    return (_levels(y @ h, 4, -1) @ h.T) * sd + mu


def _meta_bits(mode: str) -> int:
    """``metaB`` (or ``metaBm``, ``metaBs``, any of them with ``x``): B-bit codes for a
    group's bounds."""
    return int(mode.removeprefix("meta").removesuffix("x").removesuffix("v").removesuffix("m").removesuffix("s"))


def _cmeta_params(mode: str) -> tuple[int, float]:
    """``cmetaBaA``: B-bit bound codes, companding slope A (codes per unit near the centre)."""
    bits, alpha = mode.removeprefix("cmeta").split("a")
    return int(bits), float(alpha)


def _companded_keys(x: torch.Tensor, group: int, mode: str) -> torch.Tensor:
    """int4's per-channel groups whose min and max travel as ``B``-bit codes on a companded
    grid around the channel's request-wide centre: ``b = c + u * sinh(code / A)``, with
    ``c`` (fp16) the channel's median and ``u`` (fp16) its median group range, widened
    where the channel's farthest bound would not fit. Fine steps where ordinary groups lie,
    coarse ones out where only an outlier group (the attention sink's) reaches."""
    bits, alpha = _cmeta_params(mode)
    levels = (1 << (bits - 1)) - 1
    bounds = group_bounds(x.shape[0], group, "plain")
    mins = torch.stack([x[g0:g1].amin(0) for g0, g1 in bounds])
    maxs = torch.stack([x[g0:g1].amax(0) for g0, g1 in bounds])
    c = x.median(0).values.half().float()
    reach = torch.maximum((mins - c).abs(), (maxs - c).abs()).amax(0)
    u = torch.maximum((maxs - mins).median(0).values, reach / math.sinh(levels / alpha) * 1.01)
    u = u.clamp_min(1e-6).half().float()
    lo = (torch.asinh((mins - c) / u) * alpha).floor().clamp(-levels, levels)
    hi = (torch.asinh((maxs - c) / u) * alpha).ceil().clamp(-levels, levels)
    lo_v = c + u * torch.sinh(lo / alpha)
    hi_v = c + u * torch.sinh(hi / alpha)
    out = torch.empty_like(x)
    for i, (g0, g1) in enumerate(bounds):
        out[g0:g1] = _levels(x[g0:g1], 4, 0, lo_v[i].unsqueeze(0), hi_v[i].unsqueeze(0))
    return out


def _symmetric_rows(v: torch.Tensor, tokens: int) -> torch.Tensor:
    """Rotated rows, 4-bit codes -7..7, one scale per ``tokens`` tokens of a head on a log
    grid of 2^(1/16) steps (1 byte), rounded up so the largest element fits."""
    h = _hadamard(v.shape[-1])
    r = v @ h  # [T, H, D]
    out = torch.empty_like(r)
    for t0 in range(0, r.shape[0], tokens):
        part = r[t0 : t0 + tokens]
        amax = part.abs().amax((0, 2), keepdim=True).clamp_min(1e-30)
        scale = torch.exp2(torch.ceil(torch.log2(amax / 7) * 16) / 16)
        out[t0 : t0 + tokens] = (part / scale).round().clamp(-7, 7) * scale
    return out @ h.T


def _zero_rows(v: torch.Tensor, zero_bits: int) -> torch.Tensor:
    """Rotated rows, asymmetric 4-bit codes: a 1-byte log scale per row (2^(1/16) steps,
    rounded up from the row's range / 15) and an integer zero-point in steps (``zero_bits``,
    signed when 8), rounded to nearest so every element stays within half a step."""
    h = _hadamard(v.shape[-1])
    r = v @ h
    mn, mx = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(((mx - mn) / 15).clamp_min(1e-30)) * 16) / 16)
    lo, hi = (0, 15) if zero_bits == 4 else (-128, 127)
    z = (-mn / scale).round().clamp(lo, hi)
    return (((r / scale) + z).round().clamp(0, 15) - z) * scale @ h.T


def _searched_rows(v: torch.Tensor) -> torch.Tensor:
    """``z4x``: ``z4``'s format, but each row's scale code (one of four: the range's, rounded
    up, one lower, two higher) and zero-point (rounded, or one either side) chosen for the
    least squared error: the encoder's work, the same bytes."""
    h = _hadamard(v.shape[-1])
    r = v @ h
    mn, mx = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
    code = torch.ceil(torch.log2(((mx - mn) / 15).clamp_min(1e-30)) * 16)

    def candidates():
        for dk in (-1, 0, 1, 2):
            scale = torch.exp2((code + dk) / 16)
            z0 = (-mn / scale).round()
            for dz in (-1, 0, 1):
                z = (z0 + dz).clamp(0, 15)
                yield (((r / scale) + z).round().clamp(0, 15) - z) * scale

    return _least_error(r, candidates(), -1) @ h.T


def round_trip_values(v: torch.Tensor, kind: str) -> torch.Tensor:
    if kind.endswith("/first"):  # the request's first token exact
        y = round_trip_values(v, kind.removesuffix("/first")).clone()
        y[0] = v[0].bfloat16().float()
        return y
    if kind in ("int4h", "int4"):
        codec = kvwire.codec.get(kind)
        return codec.decode(codec.encode(v, "v", 16)).view(v.shape).float()
    if kind.startswith("h"):
        h = _hadamard(v.shape[-1])
        return _levels(v @ h, int(kind[1:]), -1) @ h.T
    if kind.startswith("s4x"):
        return _symmetric_rows(v, int(kind[3:]))
    if kind in ("z4", "z8"):
        return _zero_rows(v, int(kind[1:]))
    if kind == "z4x":
        return _searched_rows(v)
    if kind.startswith(("z4s", "z4xs")):  # z4 (z4x), but the request's first rows with fp16 scale and zero-point
        y = _zero_rows(v, 4) if kind.startswith("z4s") else _searched_rows(v)
        h, n = _hadamard(v.shape[-1]), _first_rows(kind)
        y[:n] = _levels(v[:n] @ h, 4, -1) @ h.T
        return y
    raise ValueError(f"unknown value kind {kind!r}")


def _first_rows(kind: str) -> int:
    """``z4sN`` (``z4xsN``): the first N rows (16 unless said) as ``int4h``."""
    return int(kind.removeprefix("z4xs").removeprefix("z4s") or 16)


def windows(tokenizer, prompts, lengths: list[int], count: int) -> list[tuple[str, list[int]]]:
    """The fidelity prompt set, and ``count - 1`` more prompts per kind and length: windows
    of the same texts starting ``WINDOW_STEP`` tokens apart (named ``kind-n@start``)."""
    out = list(prompts(tokenizer, lengths))
    if count > 1:
        from kvwire.bench.fidelity import PROMPTS

        for kind, text in PROMPTS.items():
            ids = tokenizer(text * 200).input_ids
            for n in lengths:
                out += [(f"{kind}-{n}@{w * WINDOW_STEP}", ids[w * WINDOW_STEP : w * WINDOW_STEP + n])
                        for w in range(1, count)]  # fmt: skip
    return out


def times_smaller(mode: str, group: int, values: str) -> float:
    d = HEAD_DIM
    values = values.removesuffix("/first")
    if values.startswith("s4x"):
        value_bytes = d / 2 + 1 / int(values[3:])
    elif values in ("z4", "z8", "z4x") or values.startswith(("z4s", "z4xs")):
        first = _first_rows(values) if values.startswith(("z4s", "z4xs")) else 0
        value_bytes = d / 2 + 1 + int(values[1]) / 8 + 2.5 * first / SIZE_TOKENS
    else:
        value_bytes = d / 2 + 4 if values in ("int4h", "int4") else d * int(values[1:]) / 8 + 4
    # ``v`` (bits per channel): each channel's count in 3 bits per request
    varied, mode = mode.removesuffix("x").endswith("v"), mode.replace("v", "")
    bits = int(mode[1:]) if mode.startswith("b") else 4
    key_bytes = d * bits / 8 + 4 * d / group
    key_bytes += {"chan": 3 * d / group, "row": (2 * d + 1) / group, "tokscale": 2}.get(mode, 0)
    if mode.startswith("cmeta"):  # two B-bit codes per channel per group, two fp16 per channel per request
        code_bits = _cmeta_params(mode)[0]
        key_bytes = d / 2 + (2 * code_bits / 8 * d * -(-SIZE_TOKENS // group) + 4 * d) / SIZE_TOKENS
    if mode.startswith("meta"):  # two B-bit codes per channel per group, and the request's range: 4 per channel
        groups = len(group_bounds(SIZE_TOKENS, group, mode))
        key_bytes = d / 2 + (2 * _meta_bits(mode) / 8 * d * groups + 4 * d) / SIZE_TOKENS
        if mode.removesuffix("x").endswith("s"):  # the first group's fp16 bounds instead of its codes
            key_bytes += (4 - 2 * _meta_bits(mode) / 8) * d / SIZE_TOKENS
    if mode.startswith("pair"):  # fp16 bounds per pair of channels per group
        key_bytes = d / 2 + 2 * d / group
    if mode == "smooth":
        key_bytes = d / 2 + 4 + 2 * d / group
    if mode in ("norm", "normh"):  # fp16 scale and zero per token, mean and deviation per channel per request
        key_bytes = d / 2 + 4 + 4 * d / SIZE_TOKENS
    key_bytes += 3 * d / 8 / SIZE_TOKENS if varied else 0
    return 4 * d / (key_bytes + value_bytes)


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("schemes", nargs="+", help="keys:K:values, e.g. chan:64:int4h")
    parser.add_argument("--lengths", default="32,128", help="prompt lengths (the fidelity prompt set)")
    parser.add_argument("--windows", type=int, default=1,
                        help="prompts per kind and length: the fidelity set's, then windows starting "
                             f"{WINDOW_STEP} tokens apart in the same texts")  # fmt: skip
    parser.add_argument("--exact", type=int, default=0,
                        help="the first N tokens travel exact (bf16); unlike a sender's exact_tokens, N is not "
                             "rounded to whole blocks, and sizes spread metadata over all 1024 tokens")  # fmt: skip
    args = parser.parse_args()
    from transformers import DynamicCache

    from kvwire.bench.fidelity import _prompts
    from kvwire.bench.models import smollm2
    from kvwire.integrations.transformers import cache_argument

    tokenizer, model = smollm2()
    kls: dict[str, dict[str, float]] = {}
    sq_err: dict[str, list[float]] = {}  # squared error of keys, of values, over every layer and prompt
    lengths = [int(x) for x in args.lengths.split(",")]
    for name, prompt in windows(tokenizer, _prompts, lengths, args.windows):
        ref = DynamicCache()
        model(torch.tensor([prompt[:-1]]), **cache_argument(ref), use_cache=True)
        last = torch.tensor([prompt[-1:]])
        logits = model(last, **cache_argument(copy.deepcopy(ref)), use_cache=True).logits[0, -1]
        ref_lp = torch.log_softmax(logits.double(), -1)
        for scheme in args.schemes:
            mode, group, values = scheme.split(":")
            cache = DynamicCache()
            for i, layer in enumerate(ref.layers):
                k = layer.keys[0].transpose(0, 1).contiguous()  # [T, H, D]
                v = layer.values[0].transpose(0, 1).contiguous()
                k2, v2 = round_trip_keys(k, int(group), mode), round_trip_values(v, values)
                if args.exact:  # the first tokens exact; the groups start after them, as the sender cuts
                    n = min(args.exact, k.shape[0])
                    k2, v2 = k2.clone(), v2.clone()
                    if n < k.shape[0]:
                        k2[n:] = round_trip_keys(k[n:], int(group), mode)
                        v2[n:] = round_trip_values(v[n:], values)
                    k2[:n], v2[:n] = k[:n].bfloat16().float(), v[:n].bfloat16().float()
                err = sq_err.setdefault(scheme, [0.0, 0.0])
                err[0] += float(((k2 - k) ** 2).sum())
                err[1] += float(((v2 - v) ** 2).sum())
                cache.update(k2.transpose(0, 1).unsqueeze(0), v2.transpose(0, 1).unsqueeze(0), i)
            lp = torch.log_softmax(model(last, **cache_argument(cache), use_cache=True).logits[0, -1].double(), -1)
            kls.setdefault(scheme, {})[name] = float((ref_lp.exp() * (ref_lp - lp)).sum())
    first = next(iter(kls.values()))
    first_err = next(iter(sq_err.values()))
    for scheme, per_prompt in kls.items():
        mode, group, values = scheme.split(":")
        mean = sum(per_prompt.values()) / len(per_prompt)
        geo = math.exp(sum(math.log(max(kl, 1e-12)) for kl in per_prompt.values()) / len(per_prompt))
        below = sum(per_prompt[n] < first[n] for n in per_prompt)
        cells = " ".join(f"{n}={kl:.1e}" for n, kl in per_prompt.items())
        ratio = times_smaller(mode, int(group), values)
        if args.exact:  # the raw tokens' bytes counted in a request of SIZE_TOKENS
            ratio = SIZE_TOKENS / (args.exact + (SIZE_TOKENS - args.exact) / ratio)
        k_err, v_err = (e / f for e, f in zip(sq_err[scheme], first_err))
        fidelity_set = [kl for n, kl in per_prompt.items() if "@" not in n]  # the windows are named kind-n@start
        if len(fidelity_set) < len(per_prompt):
            print(f"{scheme:18s} the fidelity set's {len(fidelity_set)} prompts: mean KL "
                  f"{sum(fidelity_set) / len(fidelity_set):.2e}")  # fmt: skip
        print(f"{scheme:18s} {ratio:.2f}x  mean KL {mean:.2e}  geometric mean {geo:.2e}  "
              f"below the first scheme's on {below} of {len(per_prompt)}  "
              f"squared error keys {k_err:.3f}x values {v_err:.3f}x  {cells}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
