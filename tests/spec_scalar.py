"""docs/formats.md, implemented literally: one element at a time with numpy fp32 scalars.

Deliberately slow and independent of kvwire.codec, so the tests can check that the fast
vectorised reference (and, on a GPU, the kernels) produce exactly these bytes.
"""

from __future__ import annotations

import bisect

import numpy as np

F32 = np.float32

# Every finite E4M3 value, by code (0x00..0x7E; 0x7F is NaN), for round-to-nearest-even.
_E4M3 = []
for code in range(0x7F):
    exp, man = code >> 3, code & 7
    _E4M3.append(F32(man / 8 * 2.0**-6) if exp == 0 else F32((1 + man / 8) * 2.0 ** (exp - 7)))


def e4m3(q: np.float32) -> int:
    """Round to the nearest E4M3 value, ties to the even code; the sign bit is kept."""
    if np.isnan(q):
        return 0x7F
    sign = 0x80 if np.signbit(q) else 0
    mag = min(abs(float(q)), 448.0)
    hi = bisect.bisect_left(_E4M3, mag)  # codes are monotonic in value
    if hi == 0:
        return sign
    lo = hi - 1
    if hi == len(_E4M3):
        return sign | lo
    d_lo, d_hi = mag - float(_E4M3[lo]), float(_E4M3[hi]) - mag
    best = lo if d_lo < d_hi or (d_lo == d_hi and lo % 2 == 0) else hi
    return sign | best


def fp8_encode(x: np.ndarray) -> bytes:
    """x: float32 [T, H, D] -> wire bytes."""
    T, H, D = x.shape
    scales, codes = [], []
    for t in range(T):
        for h in range(H):
            row = x[t, h]
            finite = [abs(v) for v in row if np.isfinite(v)]
            amax = F32(max(finite)) if finite else F32(0)
            scale = F32(amax / F32(448))
            if scale == 0:
                scale = F32(1)
            inv = F32(F32(1) / scale)
            scales.append(scale)
            for v in row:
                q = F32(v * inv)
                if not np.isnan(q):
                    q = F32(min(max(q, F32(-448)), F32(448)))
                codes.append(e4m3(q))
    return np.array(scales, dtype="<f4").tobytes() + bytes(codes)


def _int4_group(values: list[np.float32]) -> tuple[np.float16, np.float16, list[int]]:
    finite = [v for v in values if np.isfinite(v)]
    mn, mx = (F32(min(finite)), F32(max(finite))) if finite else (F32(0), F32(0))
    mn, mx = F32(mn + F32(0)), F32(mx + F32(0))  # -0 becomes +0: min/max may return either zero
    zero = np.float16(min(max(mn, F32(-65504)), F32(65504)))
    z = F32(zero)
    scale = np.float16(min(max(F32(F32(mx - z) / F32(15)), F32(-65504)), F32(65504)))
    s = F32(scale)
    inv = F32(F32(1) / s) if s > 0 else F32(0)
    codes = []
    for v in values:
        with np.errstate(invalid="ignore"):  # inf * 0 is NaN, which the format maps to code 0
            c = np.rint(F32(F32(v - z) * inv))
        codes.append(0 if np.isnan(c) else int(min(max(c, 0), 15)))
    return scale, zero, codes


def int4_encode(x: np.ndarray, role: str, key_group: int, group_size: int) -> bytes:
    """``key_group``: tokens per key group (the block size, or the codec's ``key_tokens``)."""
    T, H, D = x.shape
    codes = np.zeros((T, H, D), dtype=np.uint8)
    scales, zeros = [], []
    if role == "k":
        for b in range(-(-T // key_group)):
            rows = range(b * key_group, min((b + 1) * key_group, T))
            for h in range(H):
                for d in range(D):
                    s, z, c = _int4_group([x[t, h, d] for t in rows])
                    scales.append(s)
                    zeros.append(z)
                    for t, code in zip(rows, c):
                        codes[t, h, d] = code
    else:
        for t in range(T):
            for h in range(H):
                for j in range(D // group_size):
                    chans = range(j * group_size, (j + 1) * group_size)
                    s, z, c = _int4_group([x[t, h, d] for d in chans])
                    scales.append(s)
                    zeros.append(z)
                    codes[t, h, list(chans)] = c
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.array(scales, "<f2").tobytes() + np.array(zeros, "<f2").tobytes() + packed.tobytes()


# -- decoding: wire bytes (any bytes) back to cache elements, as bit patterns ---------------
CANONICAL_NAN = {"float16": 0x7E00, "bfloat16": 0x7FC0, "float32": 0x7FC00000}


def to_cache_bits(v: np.float32, dtype: str) -> int:
    """An fp32 result rounded to the cache dtype (nearest, ties to even), as its bits; every
    NaN is the dtype's one canonical NaN."""
    if np.isnan(v):
        return CANONICAL_NAN[dtype]
    if dtype == "float16":
        return int(np.array(v, dtype=np.float16).view(np.uint16))  # numpy rounds to nearest even
    u = int(np.array(v, dtype=F32).view(np.uint32))
    if dtype == "float32":
        return u
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF  # bf16: the top half, rounded to nearest even


def e4m3_value(code: int) -> np.float32:
    if code & 0x7F == 0x7F:
        return F32(np.nan)
    exp, man = (code >> 3) & 0xF, code & 7
    v = F32(man / 8 * 2.0**-6) if exp == 0 else F32((1 + man / 8) * 2.0 ** (exp - 7))
    return -v if code & 0x80 else v


def fp8_decode(data: bytes, T: int, H: int, D: int, dtype: str) -> list[int]:
    """Wire bytes -> the cache elements' bits, row-major [T][H][D]."""
    scales = np.frombuffer(data[: 4 * T * H], dtype="<f4")
    codes = data[4 * T * H :]
    out = []
    with np.errstate(invalid="ignore", over="ignore"):
        for r in range(T * H):
            for d in range(D):
                out.append(to_cache_bits(F32(e4m3_value(codes[r * D + d]) * scales[r]), dtype))
    return out


def int4_decode(data: bytes, T: int, H: int, D: int, dtype: str, group) -> list[int]:
    """``group(t, h, d)``: the index of the group that element belongs to."""
    groups = (len(data) - T * H * D // 2) // 4
    scales = np.frombuffer(data[: 2 * groups], dtype="<f2").astype(F32)
    zeros = np.frombuffer(data[2 * groups : 4 * groups], dtype="<f2").astype(F32)
    packed = data[4 * groups :]
    out = []
    with np.errstate(invalid="ignore", over="ignore"):
        for t in range(T):
            for h in range(H):
                for d in range(D):
                    byte = packed[(t * H + h) * (D // 2) + d // 2]
                    code = byte >> 4 if d % 2 else byte & 15
                    g = group(t, h, d)
                    out.append(to_cache_bits(F32(F32(F32(code) * scales[g]) + zeros[g]), dtype))
    return out


# -- rotated rows (int8h; int4h values): docs/formats.md, "Rotated rows" ------------------
def bf16_bits(v: np.float32) -> int:
    """fp32 -> bf16 bits, round to nearest even (v is finite here)."""
    u = int(np.array(v, dtype=F32).view(np.uint32))
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def bf16_value(bits: int) -> np.float32:
    return np.array(bits << 16, dtype=np.uint32).view(F32)[()]


def _block(D: int) -> int:
    return min(D & -D, 256)


def _h(i: int, j: int) -> int:
    return -1 if bin(i & j).count("1") % 2 else 1


def _pow2(k: int) -> np.float32:
    return F32(2.0**k)  # k in [-126, 127]: exact


def _rotated_integers(row) -> tuple[list[int], int, bool]:
    """(y, e, zero row?) of one row: fixed point, then H_R block by block, in Python ints."""
    vals = [F32(v) if np.isfinite(v) else F32(0) for v in row]
    m = max(abs(float(v)) for v in vals)
    e = int(np.frexp(F32(m))[1]) if m else 0
    if m == 0 or e < -90:
        return [0] * len(vals), 0, True
    n = [int(np.rint(float(v) * 2.0 ** (16 - e))) for v in vals]  # exact in float64, then ties to even
    R = _block(len(vals))
    y = []
    for b in range(0, len(vals), R):
        y += [sum(_h(j, i) * n[b + i] for i in range(R)) for j in range(R)]
    return y, e, False


def rot8_encode(x: np.ndarray) -> bytes:
    """x: float32 [T, H, D] -> int8h wire bytes."""
    T, H, D = x.shape
    L = _block(D).bit_length() - 1
    scales, codes = [], []
    for t in range(T):
        for h in range(H):
            y, e, zero = _rotated_integers(x[t, h])
            step = F32(F32(max(abs(v) for v in y)) / F32(127))
            inv = F32(F32(1) / step) if step > 0 else F32(0)
            scales.append(F32(step * _pow2(e - 16 - L)))
            codes += [int(min(max(np.rint(F32(F32(v) * inv)), -127), 127)) & 0xFF for v in y]
    return np.array(scales, dtype="<f4").tobytes() + bytes(codes)


def rot4_encode(x: np.ndarray) -> bytes:
    """x: float32 [T, H, D] -> the 4-bit rotated rows of int4h (values, latents, states)."""
    T, H, D = x.shape
    L = _block(D).bit_length() - 1
    scales, zeros, codes = [], [], []
    for t in range(T):
        for h in range(H):
            y, e, zero = _rotated_integers(x[t, h])
            mn, mx = F32(min(y)) + F32(0), F32(max(y)) + F32(0)
            s_bits = bf16_bits(F32(F32(F32(mx - mn) / F32(15)) * _pow2(e - 16 - L)))
            z_bits = bf16_bits(F32(mn * _pow2(e - 16 - L)))
            step = F32(bf16_value(s_bits) * _pow2(16 + L - e))
            z = F32(bf16_value(z_bits) * _pow2(16 + L - e))
            inv = F32(F32(1) / step) if step > 0 else F32(0)
            scales.append(s_bits)
            zeros.append(z_bits)
            codes += [int(min(max(np.rint(F32(F32(F32(v) - z) * inv)), 0), 15)) for v in y]
    packed = bytes(codes[i] | (codes[i + 1] << 4) for i in range(0, len(codes), 2))
    return np.array(scales, "<u2").tobytes() + np.array(zeros, "<u2").tobytes() + packed


def rot_decode(data: bytes, T: int, H: int, D: int, dtype: str, bits: int) -> list[int]:
    """int8h (bits 8) or 4-bit rotated-row wire bytes -> the cache elements' bits, [T][H][D]."""
    R, rows = _block(D), T * H
    if bits == 8:
        scales = [F32(s) for s in np.frombuffer(data[: 4 * rows], dtype="<f4")]
        zeros = None
        body = np.frombuffer(data[4 * rows :], dtype=np.int8).tolist()
    else:
        words = np.frombuffer(data[: 4 * rows], dtype="<u2").tolist()
        scales = [bf16_value(w) for w in words[:rows]]
        zeros = [bf16_value(w) for w in words[rows:]]
        body = [c for byte in data[4 * rows :] for c in (byte & 15, byte >> 4)]
    out = []
    with np.errstate(invalid="ignore", over="ignore"):
        for r in range(rows):
            c = body[r * D : (r + 1) * D]
            for i in range(D):
                b, k = i - i % R, i % R
                v = F32(sum(_h(k, j) * c[b + j] for j in range(R)))
                if zeros is not None and k == 0:  # ((v * 2^-L) * S + Z) * 2^L
                    y = F32(F32(F32(F32(v / R) * scales[r]) + zeros[r]) * F32(R))
                else:
                    y = F32(v * scales[r])
                out.append(to_cache_bits(y, dtype))
    return out


# -- int4a: docs/formats.md, "int4a" --------------------------------------------------------
A_GAIN = (954437176, 97391548, 17140912, 3654868, 846785, 203959, 50059)
A_ROOTS = [F32(2.0 ** (j / 16)) for j in range(16)]
A_LOW, A_HIGH = -1888, 1903


def _finite_min_max(values) -> tuple[np.float32, np.float32]:
    finite = [v for v in values if np.isfinite(v)]
    mn, mx = (F32(min(finite)), F32(max(finite))) if finite else (F32(0), F32(0))
    return F32(mn + F32(0)), F32(mx + F32(0))


def _planes_bytes(values: list[int], bits: int) -> bytes:
    """``bits`` bit planes over ``values`` (a multiple of 8 of them), plane 0 first."""
    out = bytearray()
    for j in range(bits):
        for i in range(0, len(values), 8):
            out.append(sum(((values[i + b] >> j) & 1) << b for b in range(8)))
    return bytes(out)


def _a_bits(spread: list[int], width: list[np.float32]) -> list[int]:
    """Bits per channel of one head from its channels' summed squared code ranges and hi - lo."""
    weights = [float(n) * (float(w) * float(w)) for n, w in zip(spread, width)]  # fp64: one rounding
    return _a_bits_from_weights([0.0 if np.isnan(w) else w for w in weights])


def _a_key_grid(lo16, hi16, a, b):
    step = F32(F32(F32(hi16) - F32(lo16)) / F32(127))
    return F32(F32(F32(a) * step) + F32(lo16)), F32(F32(F32(b) * step) + F32(lo16))


def _int4a_keys_encode_window(x: np.ndarray) -> bytes:
    """x: float32 [T, H, D] -> int4a key bytes."""
    T, H, D = x.shape
    n0 = min(T, 16)
    out = int4_encode(x[:n0], "k", 16, 64)
    G = -(-(T - n0) // 16)
    if not G:
        return out
    lo16 = np.zeros((H, D), np.float16)
    hi16 = np.zeros((H, D), np.float16)
    for h in range(H):
        for d in range(D):
            mn, mx = _finite_min_max([x[t, h, d] for t in range(n0, T)])
            lo16[h, d] = np.float16(min(max(mn, F32(-65504)), F32(65504)))
            hi16[h, d] = np.float16(min(max(mx, F32(-65504)), F32(65504)))
    codes_a = np.zeros((G, H, D), np.int64)
    codes_b = np.zeros((G, H, D), np.int64)
    for g in range(G):
        rows = range(n0 + 16 * g, min(n0 + 16 * g + 16, T))
        for h in range(H):
            for d in range(D):
                step = F32(F32(F32(hi16[h, d]) - F32(lo16[h, d])) / F32(127))
                inv = F32(F32(1) / step) if step > 0 else F32(0)
                gmn, gmx = _finite_min_max([x[t, h, d] for t in rows])
                codes_a[g, h, d] = min(max(int(np.floor(F32(F32(gmn - F32(lo16[h, d])) * inv))), 0), 127)
                codes_b[g, h, d] = min(max(int(np.ceil(F32(F32(gmx - F32(lo16[h, d])) * inv))), 0), 127)
    bits = []
    for h in range(H):
        spread = [sum(int(codes_b[g, h, d] - codes_a[g, h, d]) ** 2 for g in range(G)) for d in range(D)]
        bits.append(_a_bits(spread, [F32(F32(hi16[h, d]) - F32(lo16[h, d])) for d in range(D)]))
    out += lo16.astype("<f2").tobytes() + hi16.astype("<f2").tobytes()
    for g in range(G):
        for h in range(H):
            out += _planes_bytes(codes_a[g, h].tolist(), 7) + _planes_bytes(codes_b[g, h].tolist(), 7)
    for g in range(G):
        rows = range(n0 + 16 * g, min(n0 + 16 * g + 16, T))
        for h in range(H):
            for d in range(D):
                glo, ghi = _a_key_grid(lo16[h, d], hi16[h, d], codes_a[g, h, d], codes_b[g, h, d])
                top = (1 << bits[h][d]) - 1
                s = F32(F32(ghi - glo) / F32(top))
                inv = F32(F32(1) / s) if s > 0 else F32(0)
                cs = [0] * 16
                for i, t in enumerate(rows):
                    with np.errstate(invalid="ignore"):
                        c = np.rint(F32(F32(x[t, h, d] - glo) * inv))
                    cs[i] = 0 if np.isnan(c) else int(min(max(c, 0), top))
                for j in range(bits[h][d]):
                    word = sum(((cs[t] >> j) & 1) << t for t in range(16))
                    out += word.to_bytes(2, "little")
    return out


def _a_scale_index(u: np.float32) -> int | None:
    if u == 0:
        return None
    f, q = np.frexp(u)
    return 16 * (int(q) - 1) + sum(1 for r in A_ROOTS if r < F32(2 * f))


def _a_step(k: int, exponent: int) -> np.float32:
    if exponent > 127:
        return F32(np.inf)
    if exponent < -126:
        return F32(0)
    return F32(A_ROOTS[k % 16] * _pow2(exponent))


def _int4a_rows_encode_window(x: np.ndarray) -> bytes:
    """x: float32 [T, H, D] -> int4a value (latent, state) bytes."""
    T, H, D = x.shape
    m = min(T, 32)
    out = rot4_encode(x[:m])
    if T == m:
        return out
    L = _block(D).bit_length() - 1
    rows = [(t, h) for t in range(m, T) for h in range(H)]
    info = {}
    for t, h in rows:
        y, e, _ = _rotated_integers(x[t, h])
        mn, mx = F32(min(y)) + F32(0), F32(max(y)) + F32(0)
        k = _a_scale_index(F32(F32(mx - mn) / F32(15)))
        K = None if k is None else min(max(k + 16 * (e - 16 - L), A_LOW), A_HIGH)
        info[t, h] = (y, e, mn, K)
    base = []
    for h in range(H):
        ks = [info[t, hh][3] for t, hh in rows if hh == h and info[t, hh][3] is not None]
        base.append(min(max((max(ks) if ks else A_LOW) - 255, A_LOW), A_HIGH - 255))
    scale_codes, zs, codes = [], [], []
    for t, h in rows:
        y, e, mn, K = info[t, h]
        code = 0 if K is None else min(max(K - base[h], 0), 255)
        k2 = base[h] + code
        step = _a_step(k2, k2 // 16 - e + 16 + L)
        inv = F32(F32(1) / step) if np.isfinite(step) and step > 0 else F32(0)
        z = int(min(max(np.rint(F32(-mn * inv)), 0), 15))
        scale_codes.append(code)
        zs.append(z)
        codes += [int(min(max(np.rint(F32(F32(F32(v) * inv) + F32(z))), 0), 15)) for v in y]
    out += np.array(base, "<i2").tobytes() + bytes(scale_codes)
    for h in range(H):  # zero-points per head, the even token in the low nibble
        mine = zs[h::H] + [0] * ((T - m) % 2)
        out += bytes(mine[i] | (mine[i + 1] << 4) for i in range(0, len(mine), 2))
    return out + bytes(codes[i] | (codes[i + 1] << 4) for i in range(0, len(codes), 2))


def _a_read_planes(planes: bytes, j0: int, D: int, d: int) -> int:
    """The 7-bit code of channel ``d`` from planes ``j0 .. j0 + 6`` (``D/8`` bytes each)."""
    return sum(((planes[(j0 + j) * (D // 8) + d // 8] >> (d % 8)) & 1) << j for j in range(7))


def _int4a_keys_decode_window(data: bytes, T: int, H: int, D: int, dtype: str) -> list[int]:
    """int4a key bytes -> the cache elements' bits, [T][H][D]."""
    n0 = min(T, 16)
    head = 4 * H * D + n0 * H * D // 2
    out = int4_decode(data[:head], n0, H, D, dtype, lambda t, h, d: h * D + d)
    G = -(-(T - n0) // 16)
    if not G:
        return out
    lo16 = np.frombuffer(data[head : head + 2 * H * D], "<f2").reshape(H, D)
    hi16 = np.frombuffer(data[head + 2 * H * D : head + 4 * H * D], "<f2").reshape(H, D)
    bounds_at = head + 4 * H * D
    codes_at = bounds_at + G * H * 14 * D // 8
    ab = {}
    for g in range(G):
        for h in range(H):
            planes = data[bounds_at + (g * H + h) * 14 * D // 8 :]
            for d in range(D):
                ab[g, h, d] = (_a_read_planes(planes, 0, D, d), _a_read_planes(planes, 7, D, d))
    values = np.zeros((T - n0, H, D), dtype=object)
    with np.errstate(invalid="ignore", over="ignore"):
        for h in range(H):
            width = [F32(F32(hi16[h, d]) - F32(lo16[h, d])) for d in range(D)]
            spread = [sum((ab[g, h, d][1] - ab[g, h, d][0]) ** 2 for g in range(G)) for d in range(D)]
            bits = _a_bits(spread, width)
            offsets = [sum(bits[:d]) for d in range(D)]
            for g in range(G):
                words = data[codes_at + 2 * (g * H + h) * 4 * D :]
                for d in range(D):
                    glo, ghi = _a_key_grid(lo16[h, d], hi16[h, d], *ab[g, h, d])
                    s = F32(F32(ghi - glo) / F32((1 << bits[d]) - 1))
                    for t in range(16 * g, min(16 * g + 16, T - n0)):
                        code = 0
                        for j in range(bits[d]):
                            word = int.from_bytes(words[2 * (offsets[d] + j) : 2 * (offsets[d] + j) + 2], "little")
                            code |= ((word >> (t - 16 * g)) & 1) << j
                        values[t, h, d] = to_cache_bits(F32(F32(F32(code) * s) + glo), dtype)
    return out + values.reshape(-1).tolist()


def _a_bits_from_weights(weights: list[float]) -> list[int]:
    D = len(weights)
    gains = sorted((-(weights[c] * float(A_GAIN[b - 1])), b, c) for b in range(1, 8) for c in range(D))
    bits = [1] * D
    for _, _, c in gains[: 3 * D]:
        bits[c] += 1
    return bits


def _int4a_rows_decode_window(data: bytes, T: int, H: int, D: int, dtype: str) -> list[int]:
    """int4a value (latent, state) bytes -> the cache elements' bits, [T][H][D]."""
    m = min(T, 32)
    first = m * H * (D // 2 + 4)
    out = rot_decode(data[:first], m, H, D, dtype, 4)
    later = T - m
    if not later:
        return out
    R = _block(D)
    base = np.frombuffer(data[first : first + 2 * H], "<i2").tolist()
    scales_at = first + 2 * H
    zeros_at = scales_at + later * H
    zper = (later + 1) // 2
    codes_at = zeros_at + H * zper
    with np.errstate(invalid="ignore", over="ignore"):
        for k in range(later):
            for h in range(H):
                r = k * H + h
                kk = base[h] + data[scales_at + r]
                S = _a_step(kk, kk // 16)
                z = (data[zeros_at + h * zper + k // 2] >> (4 * (k % 2))) & 15
                row = data[codes_at + r * D // 2 : codes_at + (r + 1) * D // 2]
                c = [(row[i // 2] >> 4 if i % 2 else row[i // 2] & 15) - z for i in range(D)]
                for i in range(D):
                    b, j = i - i % R, i % R
                    v = F32(sum(_h(j, q) * c[b + q] for q in range(R)))
                    out.append(to_cache_bits(F32(F32(v + F32(0)) * S), dtype))
    return out


A_WINDOW = 1024  # rows per window: a chunk is encoded window by window


def int4a_keys_encode(x: np.ndarray) -> bytes:
    """x: float32 [T, H, D] -> int4a key bytes: each window of 1024 rows in turn."""
    return b"".join(_int4a_keys_encode_window(x[t : t + A_WINDOW]) for t in range(0, x.shape[0], A_WINDOW))


def int4a_rows_encode(x: np.ndarray) -> bytes:
    """x: float32 [T, H, D] -> int4a value (latent, state) bytes, window by window."""
    return b"".join(_int4a_rows_encode_window(x[t : t + A_WINDOW]) for t in range(0, x.shape[0], A_WINDOW))


def _a_window_sizes(T: int, H: int, D: int, role: str) -> list[tuple[int, int]]:
    """(rows, bytes) of each window."""
    out = []
    for t in range(0, T, A_WINDOW):
        n = min(A_WINDOW, T - t)
        if role == "k":
            n0 = min(n, 16)
            G = -(-(n - n0) // 16)
            size = 4 * H * D + n0 * H * D // 2 + (4 * H * D + G * H * 14 * D // 8 + G * H * 8 * D if G else 0)
        else:
            m = min(n, 32)
            later = n - m
            compact = 2 * H + later * H + H * ((later + 1) // 2) + later * H * D // 2
            size = m * H * (D // 2 + 4) + (compact if later else 0)
        out.append((n, size))
    return out


def _int4a_decode(data: bytes, T: int, H: int, D: int, dtype: str, role: str) -> list[int]:
    """int4a bytes -> the cache elements' bits, [T][H][D]: each window in turn."""
    window = _int4a_keys_decode_window if role == "k" else _int4a_rows_decode_window
    out, at = [], 0
    for n, size in _a_window_sizes(T, H, D, role):
        out += window(data[at : at + size], n, H, D, dtype)
        at += size
    return out


def int4a_keys_decode(data: bytes, T: int, H: int, D: int, dtype: str) -> list[int]:
    return _int4a_decode(data, T, H, D, dtype, "k")


def int4a_rows_decode(data: bytes, T: int, H: int, D: int, dtype: str) -> list[int]:
    return _int4a_decode(data, T, H, D, dtype, "v")
