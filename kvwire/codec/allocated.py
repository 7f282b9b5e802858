"""``int4a``: 4 bits per element on average, 3.5x smaller than bf16, with less error than ``int4``.

``int4`` spends 20 of every 84 bytes (per token and head at head_dim 64) on fp16 scales
and zero-points, and gives every key channel 4 bits although key channels' ranges differ
a hundredfold. ``int4a`` moves both (docs/fidelity.md, "4 bits: the bits where the range
is"). A chunk is encoded in windows of ``WINDOW`` rows, each decodable alone, and cut in
whole windows, so what the search did per request happens per window:

* keys (role ``k``), per channel along groups of 16 tokens as ``int4``'s: the window's
  first group is an ``int4`` key group (fp16 scale and zero-point: the attention sink of
  a request's first window keeps a grid of its own); each later group's min and max travel
  as 7-bit codes on a grid of 127 steps over the channel's range in those groups (two fp16
  per channel per window), and each channel gets ``b`` bits, 1 to 8, 4 on average over a
  head's channels, more where the groups' ranges are wider. The decoder derives the bits
  from what it received (the bound codes and the ranges), so both sides agree on them;
* values, latents and states: the window's first 32 tokens as ``int4h``'s rotated rows;
  every later row rotated the same way, with a 1-byte scale on a grid of 2^(1/16) steps
  (from a per-head base exponent) and a 4-bit integer zero-point instead of ``int4h``'s
  two bf16.

The float operations are IEEE fp32 (the bits' gains fp64), each rounded to nearest even,
no fused multiply-add; ``docs/formats.md`` ("int4a") has the byte layout and the whole
arithmetic, and ``tests/spec_scalar.py`` re-implements it element by element.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction

import numpy as np
import torch

from kvwire.codec.base import (
    HELPER_WRITES,
    ChunkSpec,
    Codec,
    as_float32,
    check_length,
    helper_rows,
    helper_spill,
    take,
    to_cache_dtype,
)
from kvwire.codec.int4 import FP16_MAX, _finite_minmax, encode_key_groups, pack_nibbles, unpack_nibbles
from kvwire.codec.rotated import MODE4A, ROWS4, _pow2, dequantize, quantize, rotated, rotation_block
from kvwire.codec.scratch import scratch
from kvwire.scatter import Spans, _scatter

# The C helper (kvwire/_scatter.c), or None; its key words and planes assume little-endian integers.
_helper = _scatter if sys.byteorder == "little" else None

KEY_GROUP = 16  # tokens per key group, as int4's at block size 16
BOUND_BITS = 7
BOUND_TOP = (1 << BOUND_BITS) - 1
MEAN_BITS, FEWEST_BITS, MOST_BITS = 4, 1, 8
GAIN_BITS = 30
# GAIN[b]: what a channel's squared error falls by, per unit of its weight, when it gets bit
# b + 1 (b = 1 .. 7): 2^30 (1 / (2^b - 1)^2 - 1 / (2^(b+1) - 1)^2), rounded down: integers,
# exact in fp64, so the sender and the receiver compute the same gains.
GAIN = tuple(
    int(Fraction(1 << GAIN_BITS) * (Fraction(1, ((1 << b) - 1) ** 2) - Fraction(1, ((1 << (b + 1)) - 1) ** 2)))
    for b in range(FEWEST_BITS, MOST_BITS)
)
WINDOW = 1024  # rows encoded together: a chunk is cut and encoded in whole windows
EXACT_ROWS = 32  # a window's first tokens whose value rows keep int4h's bf16 scale and zero-point
# The row scales' grid: 2^(k/16) for integer k, as fp32 constants (2^(j/16) rounded to nearest).
ROOTS = tuple(float(np.float32(2.0 ** (j / 16))) for j in range(16))
SCALE_LOW, SCALE_HIGH = -118 * 16, 118 * 16 + 15  # k's range: 2^(k/16) and its 2^-8 stay normal fp32
NO_SCALE = -(1 << 20)  # a constant row's k: no grid step is needed, so it never sets the base


def allocate_bits(weight: torch.Tensor) -> torch.Tensor:
    """Bits per channel (int64, 1 .. 8, ``MEAN_BITS`` on average per head) from ``weight``
    ``[H, D]`` (fp64: each channel's groups' ranges squared, summed).

    Every channel starts at one bit; the ``3 D`` extra bits of a head go to the largest
    gains ``weight * GAIN[b]`` (fp64 products), ties to the lower ``b``, then the lower
    channel. Gains fall with ``b``, so a channel's chosen steps are always its first ones.

    That is a stable descending sort's first ``3 D``; found without sorting (a third of a
    millisecond per window): every gain above the ``3 D``-th largest value, then as many
    of those equal to it as are still needed, lowest index (b-major) first."""
    heads, d = weight.shape
    gains = (weight.unsqueeze(1) * torch.tensor(GAIN, dtype=torch.float64).view(1, -1, 1)).view(heads, -1)
    k = (MEAN_BITS - FEWEST_BITS) * d
    threshold = torch.kthvalue(gains, gains.shape[1] - k + 1, dim=1, keepdim=True).values  # the k-th largest
    above = gains > threshold
    level = gains == threshold
    needed = k - above.sum(1, keepdim=True)
    chosen = above | (level & (level.cumsum(1) <= needed))
    return chosen.view(heads, MOST_BITS - FEWEST_BITS, d).sum(1) + FEWEST_BITS


def _planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``bits`` bit planes of integer ``codes`` ``[..., n]``: ``[..., bits, n / 8]`` bytes,
    plane j holding bit j of each code, the first code in the lowest bit."""
    if _helper is not None:
        out = np.empty((*codes.shape[:-1], bits, codes.shape[-1] // 8), dtype=np.uint8)
        _helper.bit_planes(np.ascontiguousarray(codes, dtype=np.uint8), codes.shape[-1], bits, out, True)
        return out
    planes = (codes[..., None, :] >> np.arange(bits, dtype=codes.dtype)[:, None]) & 1
    return np.packbits(planes.astype(np.uint8), axis=-1, bitorder="little")


def _from_planes(planes: np.ndarray, n: int) -> np.ndarray:
    """``_planes`` undone: ``[..., bits, n / 8]`` bytes -> codes ``[..., n]`` (uint8; at most 8 bits)."""
    if _helper is not None:
        codes = np.empty((*planes.shape[:-2], n), dtype=np.uint8)
        _helper.bit_planes(codes, n, planes.shape[-2], np.ascontiguousarray(planes), False)
        return codes
    bits = np.unpackbits(planes, axis=-1, count=n, bitorder="little")
    codes = bits[..., 0, :].copy()
    for j in range(1, planes.shape[-2]):
        codes |= bits[..., j, :] << j
    return codes


_TRANSPOSE = ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0))


def _transpose8(x: np.ndarray) -> np.ndarray:
    """Each uint64 of ``x`` as an 8 x 8 bit matrix (byte i, bit j) transposed, in place:
    8 codes of 8 bits in, their 8 bit planes out (and back: it is its own inverse)."""
    t = np.empty_like(x)
    for shift, mask in _TRANSPOSE:
        np.right_shift(x, np.uint64(shift), out=t)
        np.bitwise_xor(t, x, out=t)
        np.bitwise_and(t, np.uint64(mask), out=t)
        np.bitwise_xor(x, t, out=x)
        np.left_shift(t, np.uint64(shift), out=t)
        np.bitwise_xor(x, t, out=x)
    return x


def _token_words(codes: np.ndarray) -> np.ndarray:
    """Codes ``[..., 16]`` (uint8, contiguous: one key channel's group) -> ``[..., 8]``
    16-bit words, word j holding bit j of each token's code, token t in bit t."""
    halves = _transpose8(codes.view("<u8").copy()).view(np.uint8).reshape(*codes.shape[:-1], 2, 8)
    # word j: plane j of tokens 0-7 in its low byte, of tokens 8-15 in its high byte
    return np.stack((halves[..., 0, :], halves[..., 1, :]), axis=-1).view("<u2")[..., 0]


def _token_codes(words: np.ndarray) -> np.ndarray:
    """``_token_words`` undone: ``[..., 8]`` words -> ``[..., 16]`` uint8 codes."""
    halves = np.empty((*words.shape[:-1], 2, 8), dtype=np.uint8)
    halves[..., 0, :] = words & 0xFF
    halves[..., 1, :] = words >> 8
    return _transpose8(halves.view("<u8")).view(np.uint8).reshape(*words.shape[:-1], 16)


class KeyLayout:
    """Where a key window's parts sit: their sizes follow from ``(T, H, D)`` alone (the
    bits per channel sum to ``4 D`` per head whatever they are)."""

    def __init__(self, spec: ChunkSpec) -> None:
        t, h, d = spec.shape
        self.first = min(t, KEY_GROUP)  # the int4 group's tokens
        self.groups = -(-(t - self.first) // KEY_GROUP)  # coded groups
        self.head = 4 * h * d + self.first * h * d // 2  # int4 scales, zeros, codes
        self.ranges = 4 * h * d if self.groups else 0  # lo, hi fp16
        self.bounds = self.groups * h * 2 * BOUND_BITS * d // 8
        self.codes = self.groups * h * d * MEAN_BITS * KEY_GROUP // 8  # sum of bits is 4 D per head
        self.size = self.head + self.ranges + self.bounds + self.codes


def _group_minmax(rest: torch.Tensor, groups: int):
    """(min, max ``[G, H, D]`` of each ``KEY_GROUP`` tokens of ``rest`` (the last group holds
    what is left), min, max ``[H, D]`` of every token), finite values only, each + 0.0."""
    full = rest.shape[0] // KEY_GROUP
    parts = []
    if full:
        grouped = rest[: full * KEY_GROUP].view(full, KEY_GROUP, *rest.shape[1:])
        parts.append((grouped.amin(1), grouped.amax(1)))
    if full < groups:
        parts.append((rest[full * KEY_GROUP :].amin(0, keepdim=True), rest[full * KEY_GROUP :].amax(0, keepdim=True)))
    gmn, gmx = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if torch.isfinite(gmn).all() and torch.isfinite(gmx).all():  # the common case: every group has finite values
        gmn, gmx = gmn + 0.0, gmx + 0.0
        return gmn, gmx, gmn.amin(0), gmx.amax(0)
    parts = []
    if full:
        parts.append(_finite_minmax(grouped, dim=1))
    if full < groups:
        mn, mx = _finite_minmax(rest[full * KEY_GROUP :], dim=0)
        parts.append((mn.unsqueeze(0), mx.unsqueeze(0)))
    mn, mx = _finite_minmax(rest, dim=0)
    return torch.cat([p[0] for p in parts]) + 0.0, torch.cat([p[1] for p in parts]) + 0.0, mn + 0.0, mx + 0.0


def _group_grid(lo16: torch.Tensor, hi16: torch.Tensor, lo_code: torch.Tensor, hi_code: torch.Tensor):
    """(group min, group max, bits per channel) from the coded parts, as both sides compute them."""
    lo, step = lo16.float(), (hi16.float() - lo16.float()) / BOUND_TOP
    group_lo = torch.mul(lo_code.float(), step).add_(lo)  # two roundings: product, then sum
    group_hi = torch.mul(hi_code.float(), step).add_(lo)
    # each group's range is its code range times the channel's step: the weight is the
    # squared code ranges' sum (an integer) times the squared range (exact in fp64), one rounding
    # (squares as products: torch's integer ``** 2`` took a third of a millisecond per window)
    code_range = hi_code - lo_code
    spread = code_range.mul_(code_range).sum(0).double()
    value_range = (hi16.float() - lo16.float()).double()
    weight = spread * (value_range * value_range)
    weight = torch.where(torch.isnan(weight), 0.0, weight)  # bytes no encoder writes: NaN counts as 0
    return group_lo, group_hi, allocate_bits(weight)


def encode_keys(x3: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
    t, h, d = spec.shape
    lay = KeyLayout(spec)
    out = torch.empty(lay.size, dtype=torch.uint8)
    # the window's first tokens: one int4 key group (scales, zero-points, codes)
    encode_key_groups(x3[: lay.first], lay.first, out[: 2 * h * d].view(torch.float16),
                      out[2 * h * d : 4 * h * d].view(torch.float16),
                      out[4 * h * d : lay.head].view(lay.first, h, d // 2))  # fmt: skip
    if not lay.groups:
        return out
    if _helper is not None:  # the C helper reads the rows as they are (fp32 or bf16) for both passes
        source, kind = helper_rows(x3[lay.first :].reshape(-1, h * d))
        gmn, gmx = torch.empty(lay.groups, h, d), torch.empty(lay.groups, h, d)
        mn, mx = torch.empty(h, d), torch.empty(h, d)
        _helper.key_extremes(source, kind, h * d, gmn.numpy(), gmx.numpy(), mn.numpy(), mx.numpy())
    else:
        rest = as_float32(x3[lay.first :])
        gmn, gmx, mn, mx = _group_minmax(rest, lay.groups)
    lo16 = mn.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    hi16 = mx.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    at = lay.head
    out[at : at + 2 * h * d].view(torch.float16).copy_(lo16.view(-1))
    out[at + 2 * h * d : at + lay.ranges].view(torch.float16).copy_(hi16.view(-1))
    at += lay.ranges
    if _helper is not None:  # the C helper: bound codes, grid, bits and steps in one call
        bounds_c = np.empty((lay.groups, h, 2, d), dtype=np.uint8)
        glo, inv_c, bits_c = torch.empty(lay.groups, h, d), torch.empty(lay.groups, h, d), np.empty(h * d, np.uint8)
        _helper.key_grid(lo16.float().numpy(), hi16.float().numpy(), h, bounds_c, glo.numpy(), inv_c.numpy(), bits_c,
                         gmn.contiguous().numpy(), gmx.contiguous().numpy())  # fmt: skip
        out[at : at + lay.bounds].numpy()[:] = _planes(bounds_c, BOUND_BITS).reshape(-1)
        at += lay.bounds
        words = out[at:].numpy().view("<u2").reshape(lay.groups, -1)
        _helper.key_encode(source, glo.numpy(), inv_c.numpy(), bits_c, words, kind)
        return out
    step = (hi16.float() - lo16.float()) / BOUND_TOP
    inv = torch.where(step > 0, torch.reciprocal(step), 0.0)
    lo_code = torch.mul(gmn - lo16.float(), inv).floor_().clamp_(0, BOUND_TOP).to(torch.int64)
    hi_code = torch.mul(gmx - lo16.float(), inv).ceil_().clamp_(0, BOUND_TOP).to(torch.int64)
    bounds = torch.stack([lo_code, hi_code], 2).to(torch.uint8).numpy()  # [G, H, 2, D]
    out[at : at + lay.bounds].numpy()[:] = _planes(bounds, BOUND_BITS).reshape(-1)  # [G, H, 2, 7, D/8]
    at += lay.bounds
    group_lo, group_hi, bits = _group_grid(lo16, hi16, lo_code, hi_code)
    top = (torch.ones_like(bits) << bits).sub_(1).float()  # [H, D]
    s = (group_hi - group_lo) / top  # [G, H, D]
    inv_s = torch.where(s > 0, torch.reciprocal(s), 0.0)
    words = out[at:].numpy().view("<u2").reshape(lay.groups, -1)
    q = scratch("q", (lay.groups, KEY_GROUP, h, d))
    q.view(-1, h, d)[: rest.shape[0]].copy_(rest)  # one pass (the input may be the caller's fp32 tensor)
    q.view(-1, h, d)[rest.shape[0] :] = 0  # the last group's missing tokens, zeroed below
    q.sub_(group_lo.unsqueeze(1)).mul_(inv_s.unsqueeze(1)).round_().nan_to_num_(nan=0.0).clamp_(min=0)
    codes = torch.minimum(q, top, out=q).to(torch.uint8)
    codes.view(-1, h, d)[rest.shape[0] :] = 0
    every = _token_words(codes.permute(0, 2, 3, 1).contiguous().numpy())  # [G, H, D, 8]
    chosen = np.flatnonzero(np.arange(MOST_BITS) < bits.numpy()[..., None])  # word j < b of each channel
    np.take(every.reshape(lay.groups, -1), chosen, axis=1, out=words)
    return out


def _key_ranges(data: torch.Tensor, lay: KeyLayout, h: int, d: int):
    """A key window's coded groups' (lo, hi fp16 [H, D], bound codes uint8 [G, H, 2, D],
    words uint16 [G, sum of bits])."""
    at = lay.head
    lo16 = data[at : at + 2 * h * d].clone().view(torch.float16).view(h, d)
    hi16 = data[at + 2 * h * d : at + lay.ranges].clone().view(torch.float16).view(h, d)
    at += lay.ranges
    planes = data[at : at + lay.bounds].numpy().reshape(lay.groups, h, 2, BOUND_BITS, d // 8)
    bound_codes = _from_planes(planes, d)  # [G, H, 2, D]
    return lo16, hi16, bound_codes, data[at + lay.bounds :].numpy().view("<u2").reshape(lay.groups, -1)


def _key_grid_c(lo16: torch.Tensor, hi16: torch.Tensor, bound_codes: np.ndarray, groups: int, h: int, d: int):
    """The coded groups' (step, lo fp32 [G, H, D], bits uint8 [H D]) from the C helper."""
    assert _helper is not None  # its callers check for it
    glo, step = torch.empty(groups, h, d), torch.empty(groups, h, d)
    bits = np.empty(h * d, np.uint8)
    _helper.key_grid(lo16.float().numpy(), hi16.float().numpy(), h, bound_codes, glo.numpy(), step.numpy(), bits)
    return step.numpy(), glo.numpy(), bits


def decode_keys_into(data: torch.Tensor, spec: ChunkSpec, spans: Spans) -> None:
    """:func:`decode_keys`'s values written into ``spans`` by the C helper: the first group
    as an ``int4`` key group (``int4_dequantize``), the coded groups a group at a time."""
    assert _helper is not None  # Int4aCodec.decodes_into checks for it
    t, h, d = spec.shape
    lay = KeyLayout(spec)
    check_length(data, lay.size, "int4a")
    row = h * d * spec.itemsize
    spill = helper_spill(spec, row=h * d)  # key_decode's rows are a token's heads
    scale, zero = data[: 2 * h * d].numpy(), data[2 * h * d : 4 * h * d].numpy()
    _helper.int4_dequantize(data[4 * h * d : lay.head].numpy(), scale, zero, h, d, d, lay.first, *spill,
                            spans.cut(0, lay.first * row).iov)  # fmt: skip
    if lay.groups:
        lo16, hi16, bound_codes, sent = _key_ranges(data, lay, h, d)
        step, glo, bits = _key_grid_c(lo16, hi16, bound_codes, lay.groups, h, d)
        _helper.key_decode(sent, bits, step, glo, *spill, spans.cut(lay.first * row, (t - lay.first) * row).iov)


def decode_keys(data: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
    t, h, d = spec.shape
    lay = KeyLayout(spec)
    check_length(data, lay.size, "int4a")
    y = scratch("y", (t, h, d))
    scale = take(data, 0, 2 * h * d, "int4a scales").clone().view(torch.float16).float().view(h, d)
    zero = take(data, 2 * h * d, 2 * h * d, "int4a zeros").clone().view(torch.float16).float().view(h, d)
    first = unpack_nibbles(data[4 * h * d : lay.head].view(lay.first, h, d // 2), y[: lay.first])
    first.mul_(scale).add_(zero)
    if lay.groups:
        lo16, hi16, bound_codes, sent = _key_ranges(data, lay, h, d)
        rest = y[lay.first :]
        if _helper is not None:  # the C helper: the grid in one call, then words to values in one pass
            step, glo, bits = _key_grid_c(lo16, hi16, bound_codes, lay.groups, h, d)
            _helper.key_decode(sent, bits, step, glo, rest.view(-1, h * d).numpy())
            return to_cache_dtype(y, spec.dtype, fresh=True)
        bounds = torch.from_numpy(bound_codes).to(torch.int64)
        group_lo, group_hi, bits = _group_grid(lo16, hi16, bounds[:, :, 0], bounds[:, :, 1])
        top = (torch.ones_like(bits) << bits).sub_(1).float()
        s = (group_hi - group_lo) / top
        # each channel's 8 words: its b sent ones, then zeros (a gather: 10x faster than a scatter)
        chosen = (np.arange(MOST_BITS) < bits.numpy()[..., None]).reshape(-1)
        where = np.full(chosen.size, sent.shape[1])
        where[chosen] = np.arange(sent.shape[1])
        padded = np.zeros((lay.groups, sent.shape[1] + 1), dtype="<u2")
        padded[:, :-1] = sent
        words = np.take(padded, where, axis=1).reshape(lay.groups, h, d, MOST_BITS)
        codes = torch.from_numpy(_token_codes(words)).permute(0, 3, 1, 2).contiguous()  # [G, 16, H, D]
        rest.copy_(codes.view(-1, h, d)[: rest.shape[0]])
        full = rest.shape[0] // KEY_GROUP
        if full:  # code * s + glo: two roundings
            rest[: full * KEY_GROUP].view(full, KEY_GROUP, h, d).mul_(s[:full].unsqueeze(1)).add_(
                group_lo[:full].unsqueeze(1)
            )
        if full < lay.groups:
            rest[full * KEY_GROUP :].mul_(s[full]).add_(group_lo[full])
    return to_cache_dtype(y, spec.dtype, fresh=True)


def _scale_index(u: torch.Tensor) -> torch.Tensor:
    """The least integer k with 2^floor(k/16) * ROOTS[k mod 16] >= u, for u > 0 (fp32);
    ``NO_SCALE`` where u is 0."""
    mant, exp = torch.frexp(u)  # u = mant * 2^exp, 0.5 <= mant < 1
    twice = mant * 2.0  # in [1, 2): exact
    below = sum((twice > r).to(torch.int64) for r in ROOTS)  # roots under it: the least j with root >= it
    k = 16 * (exp.to(torch.int64) - 1) + below
    return torch.where(u > 0, k, NO_SCALE)


def _rows_layout(spec: ChunkSpec) -> tuple[int, int, int]:
    """(int4h rows' tokens, compact rows, compact part's bytes) of a value chunk."""
    t, h, d = spec.shape
    first = min(t, EXACT_ROWS)
    rows = (t - first) * h
    later = t - first
    return first, rows, (2 * h + rows + h * ((later + 1) // 2) + rows * d // 2) if rows else 0


def _compact_parts(buf: torch.Tensor, at: int, h: int, rows: int, later: int):
    """The compact rows' parts of a value window ``buf`` (uint8) from byte ``at``: each head's
    base (int16, as bytes), a scale byte per row, each head's zero-points (two tokens a
    byte, no byte holding two heads'), then the codes."""
    zero_bytes = h * ((later + 1) // 2)
    base, code = buf[at : at + 2 * h], buf[at + 2 * h : at + 2 * h + rows]
    at += 2 * h + rows
    return base, code, buf[at : at + zero_bytes], buf[at + zero_bytes :]


def encode_rows(x3: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
    t, h, d = spec.shape
    first, rows, compact = _rows_layout(spec)
    head_spec = ChunkSpec(first, h, d, spec.dtype, spec.role, spec.block_size)
    head = ROWS4.encode(x3[:first], head_spec)
    if not rows:
        return head
    out = torch.empty(head.numel() + compact, dtype=torch.uint8)
    out[: head.numel()] = head
    at = head.numel()
    log_block = rotation_block(d).bit_length() - 1
    later = t - first
    base_part, code_part, zero_part, codes = _compact_parts(out, at, h, rows, later)
    if _helper is not None:  # the C helper: rows rotated, measured and coded in one call
        _helper.rot_encode4a(*helper_rows(x3[first:].reshape(rows, d)), d, h, log_block, base_part.numpy(),
                             code_part.numpy(), zero_part.numpy(), codes.view(rows, d // 2).numpy())  # fmt: skip
        return out
    r = rotated(x3[first:].reshape(rows, d))
    e, mn, mx = r.e, r.mn, r.mx
    shift = 16 * (e.to(torch.int64) - 16 - log_block)  # k in the row's units -> k of its real values
    k = _scale_index((mx - mn) / 15.0)
    k = torch.where(k == NO_SCALE, NO_SCALE, (k + shift).clamp(SCALE_LOW, SCALE_HIGH)).view(-1, h)
    base = (k.amax(0) - 255).clamp(SCALE_LOW, SCALE_HIGH - 255)  # [H]
    code = (k - base).clamp(0, 255)
    kk = (base + code).view(-1)  # the scale each row travels with
    step = _row_step(kk, (kk.div(16, rounding_mode="floor") - e.to(torch.int64) + 16 + log_block))
    inv = torch.where(torch.isfinite(step) & (step > 0), torch.reciprocal(step), 0.0)
    z = torch.mul(-mn, inv).round_().clamp_(0, 15)
    base_part.view(torch.int16).copy_(base)
    code_part.copy_(code.view(-1))
    zs = torch.zeros(h, later + later % 2)
    zs[:, :later] = z.view(later, h).t()
    pack_nibbles(zs, zero_part.view(h, -1))
    quantize(r, MODE4A, inv, z, codes.view(rows, d // 2))
    return out


def _row_step(k: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """ROOTS[k mod 16] * 2^exponent (fp32, exact); inf above 2^127, 0 below 2^-126."""
    root = torch.tensor(ROOTS, dtype=torch.float32)[k % 16]
    big, small = exponent > 127, exponent < -126
    step = root * _pow2(exponent.clamp(-126, 127))
    return torch.where(big, torch.inf, torch.where(small, 0.0, step))


def _row_steps_c(base_part: torch.Tensor, code_part: torch.Tensor, zero_part: torch.Tensor, rows: int):
    """The compact rows' (step, zero-point) fp32 [rows] from the C helper."""
    assert _helper is not None  # its callers check for it
    scale, z = torch.empty(rows), torch.empty(rows)
    _helper.row_steps4a(code_part.numpy(), base_part.numpy(), zero_part.numpy(), scale.numpy(), z.numpy())
    return scale, z


def decode_rows_into(data: torch.Tensor, spec: ChunkSpec, spans: Spans) -> None:
    """:func:`decode_rows`'s values written into ``spans`` by the C helper: the first rows
    as ``int4h``'s, the compact ones after them."""
    assert _helper is not None  # Int4aCodec.decodes_into checks for it
    t, h, d = spec.shape
    first, rows, compact = _rows_layout(spec)
    head_spec = ChunkSpec(first, h, d, spec.dtype, spec.role, spec.block_size)
    head_bytes = ROWS4.size(head_spec)
    check_length(data, head_bytes + compact, "int4a")
    row = h * d * spec.itemsize
    ROWS4.decode_into(data[:head_bytes], head_spec, spans.cut(0, first * row))
    if rows:
        base_part, code_part, zero_part, codes = _compact_parts(data, head_bytes, h, rows, t - first)
        scale, z = _row_steps_c(base_part, code_part, zero_part, rows)
        _helper.rot_dequantize(codes.numpy(), MODE4A, d, scale.numpy(), z.numpy(), *helper_spill(spec),
                               spans.cut(first * row, (t - first) * row).iov)  # fmt: skip


def decode_rows(data: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
    t, h, d = spec.shape
    first, rows, compact = _rows_layout(spec)
    head_spec = ChunkSpec(first, h, d, spec.dtype, spec.role, spec.block_size)
    head_bytes = ROWS4.size(head_spec)
    check_length(data, head_bytes + compact, "int4a")
    head = ROWS4.decode(data[:head_bytes], head_spec)
    if not rows:
        return head
    out = torch.empty(spec.shape, dtype=spec.dtype)
    out[:first] = head
    later = t - first
    base_part, code_part, zero_part, codes = _compact_parts(data, head_bytes, h, rows, later)
    if _helper is not None:  # the C helper: the rows' scales and zero-points in one call
        scale, z = _row_steps_c(base_part, code_part, zero_part, rows)
    else:
        base = base_part.clone().view(torch.int16).to(torch.int64)
        kk = (code_part.to(torch.int64).view(-1, h) + base).view(-1)
        zs = unpack_nibbles(zero_part.view(h, -1), torch.empty(h, later + later % 2))
        z = zs[:, :later].t().reshape(-1)  # row order [t][h]
        scale = _row_step(kk, kk.div(16, rounding_mode="floor"))  # S: H (c - z) * S undoes both scalings
    dequantize(codes.view(rows, d // 2), MODE4A, d, scale, z, spec.dtype, out=out[first:].view(rows, d))  # in place
    return out


def _windows(spec: ChunkSpec) -> list[ChunkSpec]:
    """The windows of a chunk: ``WINDOW`` rows each, the last what is left."""
    return [ChunkSpec(min(WINDOW, spec.tokens - t0), spec.heads, spec.head_dim, spec.dtype, spec.role, spec.block_size)
            for t0 in range(0, spec.tokens, WINDOW)]  # fmt: skip


def _window_size(spec: ChunkSpec) -> int:
    if spec.role == "k":
        return KeyLayout(spec).size
    first, _, compact = _rows_layout(spec)
    return ROWS4.size(ChunkSpec(first, spec.heads, spec.head_dim, spec.dtype, spec.role)) + compact


class Int4aCodec(Codec):
    """Keys with bits per channel and one-byte group bounds, values as rotated rows with
    one-byte scales: 3.5x smaller than bf16 at head_dim 64 (docs/fidelity.md).

    A chunk is encoded in windows of ``WINDOW`` rows, each decodable alone; chunks are cut
    in whole windows (``row_unit``), so a chunk's bytes do not depend on where a transfer
    was cut, and a window's per-head parts do not depend on the other heads."""

    name = "int4a"

    def check(self, spec: ChunkSpec) -> None:
        super().check(spec)
        if spec.head_dim % 8:
            raise ValueError(f"head_dim: int4a packs bit planes over channels, so head_dim must be a multiple of 8, "
                             f"got {spec.head_dim}")  # fmt: skip

    def row_unit(self, role: str, block_size: int) -> int:
        return math.lcm(block_size, WINDOW)

    def exact_unit(self, role: str, block_size: int) -> int:
        return block_size  # the windows start after the exact rows

    def encoded_size(self, spec: ChunkSpec) -> int:
        self.check(spec)
        return sum(_window_size(w) for w in _windows(spec))

    def _encode(self, x3: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        parts, t0 = [], 0
        for w in _windows(spec):
            window = x3[t0 : t0 + w.tokens]
            parts.append(encode_keys(window, w) if spec.role == "k" else encode_rows(window, w))
            t0 += w.tokens
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def decodes_into(self, spec: ChunkSpec) -> bool:
        return _helper is not None and spec.dtype in HELPER_WRITES

    def _decode_into(self, data: torch.Tensor, spec: ChunkSpec, spans: Spans) -> bool:
        if not self.decodes_into(spec):
            return False
        check_length(data, self.encoded_size(spec), self.name)
        if spans.nbytes != spec.raw_nbytes:  # refused before any window is written
            raise ValueError(f"spans: take {spans.nbytes} bytes, the chunk decodes to {spec.raw_nbytes}")
        at, t0, row = 0, 0, spec.heads * spec.head_dim * spec.itemsize
        for w in _windows(spec):  # each window's bytes to its own rows
            size = _window_size(w)
            place = spans.cut(t0 * row, w.tokens * row)
            (decode_keys_into if spec.role == "k" else decode_rows_into)(data[at : at + size], w, place)
            at, t0 = at + size, t0 + w.tokens
        return True

    def _decode(self, data: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
        check_length(data, self.encoded_size(spec), self.name)
        windows = _windows(spec)
        if len(windows) == 1:  # the common chunk (at most 1024 tokens): its window's tensor is the result
            return decode_keys(data, spec) if spec.role == "k" else decode_rows(data, spec)
        out, at, t0 = torch.empty(spec.shape, dtype=spec.dtype), 0, 0
        for w in windows:
            size = _window_size(w)
            part = data[at : at + size]
            out[t0 : t0 + w.tokens] = decode_keys(part, w) if spec.role == "k" else decode_rows(part, w)
            at, t0 = at + size, t0 + w.tokens
        return out
