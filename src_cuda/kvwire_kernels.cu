// kvwire CUDA kernels: paged gather fused with encode, decode fused with scatter.
//
// The bytes these kernels write are specified in docs/formats.md and by the CPU
// reference in kvwire/codec/; every float operation below is the one the format names,
// with explicit round-to-nearest intrinsics (__fdiv_rn, __fmul_rn, __fsub_rn,
// __fadd_rn) so that no compiler contraction or fast-math approximation can change a
// bit. The file includes no header, so NVRTC can compile it anywhere without a CUDA
// toolkit include path; the half-precision and FP8 conversions are written out here.
//
// Addressing (as vLLM's cache kernels do): a chunk is rows [0, T) of one tensor of one
// request. Row t lives in block block_table[t / bs] at position t % bs; element (t, h, d)
// is at  cache + block * s_block + (t % bs) * s_tok + h * s_head + d * s_dim  (all
// strides in elements, 64-bit), so NHD and HND caches both work. A request-level state
// is passed as one block of T rows. VEC=true means 16-byte vector loads and stores are
// legal: s_dim == 1, D a multiple of 8, and every row start 16-byte aligned; the
// launcher checks that on the host.
//
// Wire layouts written to `out` (see docs/formats.md):
//   fp8:  float scale[T*H] | u8 code[T*H*D]
//   int4: half scale[NG] | half zero[NG] | u8 packed[T*H*D/2]
//   int8h: float S[T*H] | i8 code[T*H*D]                       (rotated rows, 8 bits)
//   int4h values: bf16 S[T*H] | bf16 Z[T*H] | u8 packed[T*H*D/2]  (rotated rows, 4 bits)

#ifdef KVW_HOST_EMULATION
#include "host_emulation.h"
#endif

typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

// 16-byte vector for loads and stores (our own type, so no header is needed).
struct alignas(16) V16 {
  unsigned int w[4];
};

#define WARP 32
#define E4M3_MAX 448.0f
#define FP16_MAX 65504.0f

// ---------------------------------------------------------------------------------
// Element conversions. KIND 0: bfloat16, KIND 1: float16.
// ---------------------------------------------------------------------------------
__device__ __forceinline__ float half_to_float(u16 h) {
#ifdef KVW_HOST_EMULATION
  return emu_half_to_float(h);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}

// Every NaN becomes 0x7E00 (docs/formats.md): cvt.rn.f16.f32 writes 0x7FFF on a GPU and
// F16C keeps the payload on the host, and neither is what the CPU reference writes.
__device__ __forceinline__ u16 float_to_half_rn(float f) {
  if (f != f) return 0x7e00;
#ifdef KVW_HOST_EMULATION
  return emu_float_to_half(f);
#else
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#endif
}

__device__ __forceinline__ u16 float_to_bf16_rn(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // every NaN: the canonical quiet NaN (docs/formats.md)
  u += 0x7fffu + ((u >> 16) & 1u);                      // round to nearest, ties to even
  return (u16)(u >> 16);
}

template <int KIND>
__device__ __forceinline__ float to_float(u16 v) {
  if (KIND == 0) return __uint_as_float(((unsigned int)v) << 16);
  return half_to_float(v);
}

template <int KIND>
__device__ __forceinline__ u16 from_float(float f) {
  if (KIND == 0) return float_to_bf16_rn(f);
  return float_to_half_rn(f);
}

// E4M3 ("fn": no infinities, max 448, NaN = 0x7F/0xFF), round to nearest even,
// subnormals kept, sign kept. `q` is already clamped to [-448, 448] and not NaN.
__device__ __forceinline__ u8 float_to_e4m3(float q) {
  unsigned int bits = __float_as_uint(q);
  u8 sign = (u8)((bits >> 24) & 0x80u);
  unsigned int a = bits & 0x7fffffffu;
  float mag = __uint_as_float(a);
  u8 code;
  if (mag < 0.015625f) {  // below 2^-6: subnormal steps of 2^-9 (exact scaling by 512)
    code = (u8)rintf(mag * 512.0f);  // 0..8; 8 is the smallest normal, 2^-6
  } else {
    // Round the 23-bit mantissa to 3 bits; a carry moves into the exponent by itself.
    unsigned int r = (a + 0x7ffffu + ((a >> 20) & 1u)) >> 20;
    code = (u8)(r - (120u << 3));  // exponent bias 127 -> 7
  }
  return sign | code;
}

__device__ __forceinline__ float e4m3_to_float(u8 c) {
  unsigned int m = c & 0x7fu;
  if (m == 0x7fu) return __uint_as_float(0x7fc00000u);
  unsigned int e = m >> 3, man = m & 7u;
  float v = e == 0 ? (float)man * 0.001953125f  // man * 2^-9, exact
                   : __uint_as_float(((e + 120u) << 23) | (man << 20));
  return (c & 0x80u) ? -v : v;
}

__device__ __forceinline__ bool finite(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }

// ---------------------------------------------------------------------------------
// Addressing
// ---------------------------------------------------------------------------------
struct Paged {
  u16* base;
  const int* block_table;
  i64 s_block, s_tok, s_head, s_dim;
  int bs;
  __device__ __forceinline__ u16* row(int t, int h) const {
    return base + (i64)block_table[t / bs] * s_block + (i64)(t % bs) * s_tok + (i64)h * s_head;
  }
};

__device__ __forceinline__ Paged make_paged(u16* base, const int* table, int bs, i64 sb, i64 st, i64 sh, i64 sd) {
  Paged p;
  p.base = base;
  p.block_table = table;
  p.bs = bs;
  p.s_block = sb;
  p.s_tok = st;
  p.s_head = sh;
  p.s_dim = sd;
  return p;
}

// Load / store 8 consecutive elements of a row (VEC) or one element.
template <int KIND>
__device__ __forceinline__ void load8(const u16* p, float* x) {
  V16 v = *reinterpret_cast<const V16*>(p);
  const u16* h = reinterpret_cast<const u16*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = to_float<KIND>(h[i]);
}

template <int KIND>
__device__ __forceinline__ void store8(u16* p, const float* y) {
  V16 v;
  u16* h = reinterpret_cast<u16*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = from_float<KIND>(y[i]);
  *reinterpret_cast<V16*>(p) = v;
}

// ---------------------------------------------------------------------------------
// raw: gather and scatter, 16 bytes per thread when VEC.
// ---------------------------------------------------------------------------------
template <bool VEC>
__device__ void raw_gather(Paged src, int T, int H, int D, u16* out) {
  const int per = VEC ? 8 : 1;
  i64 n = (i64)T * H * (D / per);
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    int d = (int)(i % (D / per)) * per;
    i64 rowid = i / (D / per);
    int h = (int)(rowid % H), t = (int)(rowid / H);
    const u16* p = src.row(t, h);
    if (VEC) {
      *reinterpret_cast<V16*>(out + rowid * D + d) = *reinterpret_cast<const V16*>(p + d);
    } else {
      out[rowid * D + d] = p[(i64)d * src.s_dim];
    }
  }
}

template <bool VEC>
__device__ void raw_scatter(Paged dst, int T, int H, int D, const u16* in) {
  const int per = VEC ? 8 : 1;
  i64 n = (i64)T * H * (D / per);
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    int d = (int)(i % (D / per)) * per;
    i64 rowid = i / (D / per);
    int h = (int)(rowid % H), t = (int)(rowid / H);
    u16* p = dst.row(t, h);
    if (VEC) {
      *reinterpret_cast<V16*>(p + d) = *reinterpret_cast<const V16*>(in + rowid * D + d);
    } else {
      p[(i64)d * dst.s_dim] = in[rowid * D + d];
    }
  }
}

// ---------------------------------------------------------------------------------
// fp8: one warp per (token, head) row.
// ---------------------------------------------------------------------------------
template <int KIND, bool VEC>
__device__ void fp8_encode(Paged src, int T, int H, int D, u8* out) {
  int lane = threadIdx.x % WARP;
  i64 rows = (i64)T * H;
  i64 row = (blockIdx.x * (i64)blockDim.x + threadIdx.x) / WARP;
  i64 stride = (i64)gridDim.x * blockDim.x / WARP;
  for (; row < rows; row += stride) {
    int t = (int)(row / H), h = (int)(row % H);
    const u16* p = src.row(t, h);
    float amax = 0.0f;
    if (VEC) {
      for (int d = lane * 8; d < D; d += WARP * 8) {
        float x[8];
        load8<KIND>(p + d, x);
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (finite(x[i])) amax = fmaxf(amax, fabsf(x[i]));
      }
    } else {
      for (int d = lane; d < D; d += WARP) {
        float x = to_float<KIND>(p[(i64)d * src.s_dim]);
        if (finite(x)) amax = fmaxf(amax, fabsf(x));
      }
    }
#pragma unroll
    for (int o = WARP / 2; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    float scale = __fdiv_rn(amax, E4M3_MAX);
    if (scale == 0.0f) scale = 1.0f;
    float inv = __fdiv_rn(1.0f, scale);
    if (lane == 0) reinterpret_cast<float*>(out)[row] = scale;
    u8* codes = out + 4 * rows + row * D;
    if (VEC) {
      for (int d = lane * 8; d < D; d += WARP * 8) {
        float x[8];
        load8<KIND>(p + d, x);
        unsigned int word[2] = {0u, 0u};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float q = __fmul_rn(x[i], inv);
          unsigned int c = q != q ? 0x7fu : float_to_e4m3(fminf(fmaxf(q, -E4M3_MAX), E4M3_MAX));
          word[i / 4] |= c << (8 * (i % 4));
        }
        // The codes start 4*T*H bytes into the chunk: only 4-byte alignment is certain.
        reinterpret_cast<unsigned int*>(codes + d)[0] = word[0];
        reinterpret_cast<unsigned int*>(codes + d)[1] = word[1];
      }
    } else {
      for (int d = lane; d < D; d += WARP) {
        float q = __fmul_rn(to_float<KIND>(p[(i64)d * src.s_dim]), inv);
        codes[d] = q != q ? (u8)0x7f : float_to_e4m3(fminf(fmaxf(q, -E4M3_MAX), E4M3_MAX));
      }
    }
  }
}

template <int KIND, bool VEC>
__device__ void fp8_decode(Paged dst, int T, int H, int D, const u8* in) {
  int lane = threadIdx.x % WARP;
  i64 rows = (i64)T * H;
  i64 row = (blockIdx.x * (i64)blockDim.x + threadIdx.x) / WARP;
  i64 stride = (i64)gridDim.x * blockDim.x / WARP;
  for (; row < rows; row += stride) {
    int t = (int)(row / H), h = (int)(row % H);
    u16* p = dst.row(t, h);
    float scale = reinterpret_cast<const float*>(in)[row];
    const u8* codes = in + 4 * rows + row * D;
    if (VEC) {
      for (int d = lane * 8; d < D; d += WARP * 8) {
        const unsigned int* word = reinterpret_cast<const unsigned int*>(codes + d);
        unsigned int w0 = word[0], w1 = word[1];
        float y[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) y[i] = __fmul_rn(e4m3_to_float((u8)(((i < 4 ? w0 : w1) >> (8 * (i % 4))) & 0xffu)), scale);
        store8<KIND>(p + d, y);
      }
    } else {
      for (int d = lane; d < D; d += WARP)
        p[(i64)d * dst.s_dim] = from_float<KIND>(__fmul_rn(e4m3_to_float(codes[d]), scale));
    }
  }
}

// ---------------------------------------------------------------------------------
// int4: group parameters, then codes. One thread per group.
// ---------------------------------------------------------------------------------
struct Int4Params {
  u16 scale, zero;  // fp16 bits
  float s, z, inv;
};

__device__ __forceinline__ Int4Params int4_params(float mn, float mx, bool any) {
  if (!any) mn = mx = 0.0f;
  mn = __fadd_rn(mn, 0.0f);  // -0 becomes +0
  mx = __fadd_rn(mx, 0.0f);
  Int4Params p;
  p.zero = float_to_half_rn(fminf(fmaxf(mn, -FP16_MAX), FP16_MAX));
  p.z = half_to_float(p.zero);
  float s = __fdiv_rn(__fsub_rn(mx, p.z), 15.0f);
  p.scale = float_to_half_rn(fminf(fmaxf(s, -FP16_MAX), FP16_MAX));
  p.s = half_to_float(p.scale);
  p.inv = p.s > 0.0f ? __fdiv_rn(1.0f, p.s) : 0.0f;
  return p;
}

__device__ __forceinline__ unsigned int int4_code(float x, const Int4Params& p) {
  float c = rintf(__fmul_rn(__fsub_rn(x, p.z), p.inv));
  if (c != c) return 0u;
  return (unsigned int)fminf(fmaxf(c, 0.0f), 15.0f);
}

__device__ __forceinline__ float int4_value(unsigned int code, float s, float z) {
  return __fadd_rn(__fmul_rn((float)code, s), z);
}

// Values, latents, states: group (t, h, j) = channels j*G .. j*G+G-1 of one row.
template <int KIND, bool VEC>
__device__ void int4v_encode(Paged src, int T, int H, int D, int G, u8* out) {
  i64 groups = (i64)T * H * (D / G);
  u16* scales = reinterpret_cast<u16*>(out);
  u16* zeros = scales + groups;
  u8* packed = out + 4 * groups;
  for (i64 g = blockIdx.x * (i64)blockDim.x + threadIdx.x; g < groups; g += (i64)gridDim.x * blockDim.x) {
    int j = (int)(g % (D / G));
    i64 rowid = g / (D / G);
    int t = (int)(rowid / H), h = (int)(rowid % H);
    const u16* p = src.row(t, h) + (i64)j * G * src.s_dim;
    float mn = 3.0e38f, mx = -3.0e38f;
    bool any = false;
    for (int k = 0; k < G; k += 8) {
      float x[8];
      if (VEC) {
        load8<KIND>(p + k, x);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] = to_float<KIND>(p[(i64)(k + i) * src.s_dim]);
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (finite(x[i])) {
          mn = fminf(mn, x[i]);
          mx = fmaxf(mx, x[i]);
          any = true;
        }
    }
    Int4Params prm = int4_params(mn, mx, any);
    scales[g] = prm.scale;
    zeros[g] = prm.zero;
    u8* dst = packed + (rowid * D + (i64)j * G) / 2;
    for (int k = 0; k < G; k += 8) {
      float x[8];
      if (VEC) {
        load8<KIND>(p + k, x);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] = to_float<KIND>(p[(i64)(k + i) * src.s_dim]);
      }
      unsigned int word = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) word |= int4_code(x[i], prm) << (4 * i);
      *reinterpret_cast<unsigned int*>(dst + k / 2) = word;  // 4 bytes: channel k in the low nibble
    }
  }
}

template <int KIND, bool VEC>
__device__ void int4v_decode(Paged dst, int T, int H, int D, int G, const u8* in) {
  i64 groups = (i64)T * H * (D / G);
  const u16* scales = reinterpret_cast<const u16*>(in);
  const u16* zeros = scales + groups;
  const u8* packed = in + 4 * groups;
  for (i64 g = blockIdx.x * (i64)blockDim.x + threadIdx.x; g < groups; g += (i64)gridDim.x * blockDim.x) {
    int j = (int)(g % (D / G));
    i64 rowid = g / (D / G);
    int t = (int)(rowid / H), h = (int)(rowid % H);
    u16* p = dst.row(t, h) + (i64)j * G * dst.s_dim;
    float s = half_to_float(scales[g]), z = half_to_float(zeros[g]);
    const u8* src = packed + (rowid * D + (i64)j * G) / 2;
    for (int k = 0; k < G; k += 8) {
      unsigned int word = *reinterpret_cast<const unsigned int*>(src + k / 2);
      float y[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) y[i] = int4_value((word >> (4 * i)) & 15u, s, z);
      if (VEC) {
        store8<KIND>(p + k, y);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) p[(i64)(k + i) * dst.s_dim] = from_float<KIND>(y[i]);
      }
    }
  }
}

// Keys: group (b, h, d) = channel d of head h over the tokens of block b. One thread
// handles the channel pair (2c, 2c+1), so it writes whole code bytes.
template <int KIND>
__device__ __forceinline__ void int4k_pair_encode(const Paged& src, int H, int D, int b, int h, int c, int t0, int t1,
                                                  u16* scales, u16* zeros, u8* packed, int row0 = 0) {
  float mn[2] = {3.0e38f, 3.0e38f}, mx[2] = {-3.0e38f, -3.0e38f};
  bool any[2] = {false, false};
  for (int t = t0; t < t1; ++t) {
    const u16* p = src.row(row0 + t, h) + (i64)(2 * c) * src.s_dim;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float x = to_float<KIND>(p[(i64)e * src.s_dim]);
      if (finite(x)) {
        mn[e] = fminf(mn[e], x);
        mx[e] = fmaxf(mx[e], x);
        any[e] = true;
      }
    }
  }
  Int4Params prm[2] = {int4_params(mn[0], mx[0], any[0]), int4_params(mn[1], mx[1], any[1])};
  i64 gid = ((i64)b * H + h) * D + 2 * c;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    scales[gid + e] = prm[e].scale;
    zeros[gid + e] = prm[e].zero;
  }
  for (int t = t0; t < t1; ++t) {
    const u16* p = src.row(row0 + t, h) + (i64)(2 * c) * src.s_dim;
    unsigned int lo = int4_code(to_float<KIND>(p[0]), prm[0]);
    unsigned int hi = int4_code(to_float<KIND>(p[src.s_dim]), prm[1]);
    packed[((i64)t * H + h) * (D / 2) + c] = (u8)(lo | (hi << 4));
  }
}

template <int KIND>
__device__ void int4k_encode(Paged src, int T, int H, int D, int K, u8* out) {
  int nb = (T + K - 1) / K;  // key groups of K tokens (the block size, or the codec's key_tokens)
  i64 groups = (i64)nb * H * D;
  i64 pairs = (i64)nb * H * (D / 2);
  u16* scales = reinterpret_cast<u16*>(out);
  u16* zeros = scales + groups;
  u8* packed = out + 4 * groups;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < pairs; i += (i64)gridDim.x * blockDim.x) {
    int c = (int)(i % (D / 2));
    i64 bh = i / (D / 2);
    int h = (int)(bh % H), b = (int)(bh / H);
    int t0 = b * K, t1 = min(T, t0 + K);
    int4k_pair_encode<KIND>(src, H, D, b, h, c, t0, t1, scales, zeros, packed);
  }
}

// One code byte (channels 2c, 2c+1 of row (t, h)) of key group gid's pair.
template <int KIND>
__device__ __forceinline__ void int4k_pair_decode(const Paged& dst, int t, int h, int c, i64 gid, u8 byte,
                                                  const u16* scales, const u16* zeros) {
  u16* p = dst.row(t, h) + (i64)(2 * c) * dst.s_dim;
  p[0] = from_float<KIND>(int4_value(byte & 15u, half_to_float(scales[gid]), half_to_float(zeros[gid])));
  p[dst.s_dim] = from_float<KIND>(int4_value(byte >> 4, half_to_float(scales[gid + 1]), half_to_float(zeros[gid + 1])));
}

template <int KIND>
__device__ void int4k_decode(Paged dst, int T, int H, int D, int K, const u8* in) {
  int nb = (T + K - 1) / K;
  i64 groups = (i64)nb * H * D;
  i64 pairs = (i64)T * H * (D / 2);
  const u16* scales = reinterpret_cast<const u16*>(in);
  const u16* zeros = scales + groups;
  const u8* packed = in + 4 * groups;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < pairs; i += (i64)gridDim.x * blockDim.x) {
    int c = (int)(i % (D / 2));
    i64 th = i / (D / 2);
    int h = (int)(th % H), t = (int)(th / H);
    i64 gid = ((i64)(t / K) * H + h) * D + 2 * c;
    int4k_pair_decode<KIND>(dst, t, h, c, gid, packed[i], scales, zeros);
  }
}

// ---------------------------------------------------------------------------------
// Rotated rows (int8h; int4h values, latents, states): one warp per (token, head) row.
// A row is read in tiles of max(R, 32) elements, R the rotation block (the largest power
// of two dividing D, at most 256); lane l holds elements l + 32*j of a tile (j < 8). The
// values are turned into integers first (|n| <= 2^16), so the Hadamard butterflies add and
// subtract fp32 integers below 2^24: exact, and no order of them can change a bit. The
// row is read twice (its max, then the rotated tiles), three times when it is longer than
// one tile (the codes rotate each tile again): re-reads hit the cache, and no more than one
// tile has to stay in registers.
// ---------------------------------------------------------------------------------
#define ROT_Q 16          // fixed-point bits: |n| <= 2^16
#define ROT_MIN_EXP (-90) // rows below 2^-91 travel as zero rows
#define ROT_SLOTS 8       // a tile of up to 256 elements: 8 per lane

__device__ __forceinline__ int rot_block(int D) {
  int r = D & -D;
  return r > 256 ? 256 : r;
}

__device__ __forceinline__ int log2_int(int r) {
  int l = 0;
  while ((1 << l) < r) ++l;
  return l;
}

// 2^k for integer k in [-126, 127], exactly.
__device__ __forceinline__ float pow2f(int k) { return __uint_as_float((unsigned int)(k + 127) << 23); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = WARP / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = WARP / 2; o > 0; o /= 2) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// H_R over one tile, in place: butterflies between lanes for the low bits of the element
// index, between a lane's slots for the bits from 32 up. The lower element of each pair
// gets a + b, the upper a - b.
__device__ __forceinline__ void tile_hadamard(float* v, int R, int slots, int lane) {
  for (int h = 1; h < R && h < WARP; h <<= 1) {
#pragma unroll
    for (int j = 0; j < ROT_SLOTS; ++j) {
      if (j < slots) {  // the same for every lane of the warp
        float p = __shfl_xor_sync(0xffffffffu, v[j], h);
        v[j] = (lane & h) ? __fsub_rn(p, v[j]) : __fadd_rn(v[j], p);
      }
    }
  }
#pragma unroll
  for (int m = 1; m < ROT_SLOTS; m <<= 1) {
    if (m * WARP < R) {
#pragma unroll
      for (int j = 0; j < ROT_SLOTS; ++j) {
        if (!(j & m) && (j | m) < slots) {
          float a = v[j], b = v[j | m];
          v[j] = __fadd_rn(a, b);
          v[j | m] = __fsub_rn(a, b);
        }
      }
    }
  }
}

struct RotRow {
  int R, L, tile, slots;
};

__device__ __forceinline__ RotRow rot_geometry(int D) {
  RotRow g;
  g.R = rot_block(D);
  g.L = log2_int(g.R);
  g.tile = g.R > WARP ? g.R : WARP;
  g.slots = g.tile / WARP;
  return g;
}

// The fixed-point integers n = rint(x * factor) of one tile (0 past D, and for inf/NaN).
template <int KIND>
__device__ __forceinline__ void rot_load(const Paged& src, const u16* p, int D, int base, const RotRow& g, int lane,
                                         float factor, float* v) {
#pragma unroll
  for (int j = 0; j < ROT_SLOTS; ++j) {
    int d = base + lane + WARP * j;
    float x = 0.0f;
    if (j < g.slots && d < D) {
      x = to_float<KIND>(p[(i64)d * src.s_dim]);
      if (!finite(x)) x = 0.0f;
    }
    v[j] = rintf(__fmul_rn(x, factor));  // an exact product (or one far below 0.5), then ties to even
  }
}

// The first pass of every rotated-row encoder over row p: the fixed-point exponent e and
// factor, and the rotated row's min and max (with ABS, max |y|) across the warp. v is
// left holding the last tile rotated: the whole row when it is one tile.
struct RowScan {
  int e;
  float factor, lo, hi;
};

template <int KIND, bool ABS>
__device__ __forceinline__ RowScan rot_scan(const Paged& src, const u16* p, int D, const RotRow& g, int lane,
                                            float* v) {
  float m = 0.0f;
  for (int d = lane; d < D; d += WARP) {
    float x = to_float<KIND>(p[(i64)d * src.s_dim]);
    if (finite(x)) m = fmaxf(m, fabsf(x));
  }
  m = warp_max(m);
  RowScan r;
  r.e = (int)((__float_as_uint(m) >> 23) & 0xffu) - 126;  // m = f * 2^e, 0.5 <= f < 1
  bool zero = m == 0.0f || r.e < ROT_MIN_EXP;
  if (zero) r.e = 0;
  r.factor = zero ? 0.0f : pow2f(ROT_Q - r.e);
  float lo = 3.0e38f, hi = -3.0e38f;
  for (int base = 0; base < D; base += g.tile) {
    rot_load<KIND>(src, p, D, base, g, lane, r.factor, v);
    tile_hadamard(v, g.R, g.slots, lane);
#pragma unroll
    for (int j = 0; j < ROT_SLOTS; ++j) {
      if (j < g.slots && base + lane + WARP * j < D) {
        lo = fminf(lo, v[j]);
        hi = fmaxf(hi, ABS ? fabsf(v[j]) : v[j]);
      }
    }
  }
  r.lo = warp_min(lo);
  r.hi = warp_max(hi);
  return r;
}

// One row (t, h), the `row`-th of `rows` in the chunk's byte layout, by one warp. Every
// lane takes part in the shuffles whether or not `live`; only a live row is written.
template <int KIND, int BITS>
__device__ void rot_encode_row(const Paged& src, int t, int h, i64 row, i64 rows, int D, const RotRow& g, int lane,
                               u8* out, bool live) {
  const u16* p = src.row(t, h);
  float v[ROT_SLOTS];  // a row of one tile (D <= 256, the usual case) stays here for the codes
  const RowScan sc = rot_scan<KIND, BITS == 8>(src, p, D, g, lane, v);  // BITS 8: hi is max |y|
  const int e = sc.e;
  const float factor = sc.factor, lo = sc.lo, hi = sc.hi;
  float step, z = 0.0f;
  if (BITS == 8) {
    step = __fdiv_rn(hi, 127.0f);
    if (live && lane == 0) reinterpret_cast<float*>(out)[row] = __fmul_rn(step, pow2f(e - ROT_Q - g.L));
  } else {
    float mn = __fadd_rn(lo, 0.0f), mx = __fadd_rn(hi, 0.0f);  // -0 becomes +0
    u16 s16 = float_to_bf16_rn(__fmul_rn(__fdiv_rn(__fsub_rn(mx, mn), 15.0f), pow2f(e - ROT_Q - g.L)));
    u16 z16 = float_to_bf16_rn(__fmul_rn(mn, pow2f(e - ROT_Q - g.L)));
    step = __fmul_rn(to_float<0>(s16), pow2f(ROT_Q + g.L - e));
    z = __fmul_rn(to_float<0>(z16), pow2f(ROT_Q + g.L - e));
    if (live && lane == 0) {
      reinterpret_cast<u16*>(out)[row] = s16;
      reinterpret_cast<u16*>(out)[rows + row] = z16;
    }
  }
  float inv = step > 0.0f ? __fdiv_rn(1.0f, step) : 0.0f;
  u8* codes = out + 4 * rows;
  for (int base = 0; base < D; base += g.tile) {
    if (D > g.tile) {  // several tiles: rotate this one again
      rot_load<KIND>(src, p, D, base, g, lane, factor, v);
      tile_hadamard(v, g.R, g.slots, lane);
    }
#pragma unroll
    for (int j = 0; j < ROT_SLOTS; ++j) {
      if (j >= g.slots) continue;  // the same for every lane
      i64 d = base + lane + WARP * j;
      if (BITS == 8) {
        float c = fminf(fmaxf(rintf(__fmul_rn(v[j], inv)), -127.0f), 127.0f);
        if (live && d < D) codes[row * D + d] = (u8)(int)c;
      } else {
        float c = fminf(fmaxf(rintf(__fmul_rn(__fsub_rn(v[j], z), inv)), 0.0f), 15.0f);
        float high = __shfl_xor_sync(0xffffffffu, c, 1);  // the odd neighbour's code
        if (live && !(lane & 1) && d < D) codes[(row * D + d) / 2] = (u8)((unsigned int)c | ((unsigned int)high << 4));
      }
    }
  }
}

template <int KIND, int BITS>
__device__ void rot_encode(Paged src, int T, int H, int D, u8* out) {
  const int lane = threadIdx.x % WARP;
  const RotRow g = rot_geometry(D);
  i64 rows = (i64)T * H;
  i64 row = (blockIdx.x * (i64)blockDim.x + threadIdx.x) / WARP;
  i64 stride = (i64)gridDim.x * blockDim.x / WARP;
  for (; row < rows; row += stride) rot_encode_row<KIND, BITS>(src, (int)(row / H), (int)(row % H), row, rows, D, g, lane, out, true);
}

template <int KIND, int BITS>
__device__ void rot_decode_row(const Paged& dst, int t, int h, i64 row, i64 rows, int D, const RotRow& g, int lane,
                               const u8* in) {
  const u8* codes = in + 4 * rows;
  const float first_scale = pow2f(-g.L), block = (float)g.R;
  u16* p = dst.row(t, h);
  float S, Z = 0.0f;
  if (BITS == 8) {
    S = reinterpret_cast<const float*>(in)[row];
  } else {
    S = to_float<0>(reinterpret_cast<const u16*>(in)[row]);
    Z = to_float<0>(reinterpret_cast<const u16*>(in)[rows + row]);
  }
  for (int base = 0; base < D; base += g.tile) {
    float v[ROT_SLOTS];
#pragma unroll
    for (int j = 0; j < ROT_SLOTS; ++j) {
      i64 d = base + lane + WARP * j;
      v[j] = 0.0f;
      if (j < g.slots && d < D) {
        if (BITS == 8) {
          v[j] = (float)(int)(signed char)codes[row * D + d];
        } else {
          u8 byte = codes[(row * D + d) / 2];
          v[j] = (float)((d & 1) ? byte >> 4 : byte & 15u);
        }
      }
    }
    tile_hadamard(v, g.R, g.slots, lane);
#pragma unroll
    for (int j = 0; j < ROT_SLOTS; ++j) {
      int d = base + lane + WARP * j;
      if (j >= g.slots || d >= D) continue;
      float vv = __fadd_rn(v[j], 0.0f);  // an exact zero is +0
      float y;
      if (BITS == 4 && d % g.R == 0) {  // the block's first element carries the zero-point
        y = __fmul_rn(__fadd_rn(__fmul_rn(__fmul_rn(vv, first_scale), S), Z), block);
      } else {
        y = __fmul_rn(vv, S);
      }
      p[(i64)d * dst.s_dim] = from_float<KIND>(y);
    }
  }
}

template <int KIND, int BITS>
__device__ void rot_decode(Paged dst, int T, int H, int D, const u8* in) {
  const int lane = threadIdx.x % WARP;
  const RotRow g = rot_geometry(D);
  i64 rows = (i64)T * H;
  i64 row = (blockIdx.x * (i64)blockDim.x + threadIdx.x) / WARP;
  i64 stride = (i64)gridDim.x * blockDim.x / WARP;
  for (; row < rows; row += stride) rot_decode_row<KIND, BITS>(dst, (int)(row / H), (int)(row % H), row, rows, D, g, lane, in);
}

// ---------------------------------------------------------------------------------
// int4a (docs/formats.md, "int4a"): keys with bits per channel, rows with one-byte
// scales. Parts of a chunk depend on a whole head (a channel's range over the chunk, the
// bits of a head's channels, the base of its rows' scales), so one block takes one head
// at a time and __syncthreads orders the steps. Where a step of warps ends in a barrier,
// every warp runs the same number of rows (spare ones compute and write nothing): the
// host emulation's barriers and shuffles are the same rendezvous, so its lanes must meet
// them in the same order. One block per head leaves most of a GPU idle for a chunk of a
// few heads; its speed is bench/gpu_check's to measure.
// ---------------------------------------------------------------------------------
#define A_GROUP 16         // tokens per key group
#define A_FIRST_ROWS 32    // a window's first tokens whose value rows are int4h rows
#define A_WINDOW 1024      // rows encoded together: a chunk is window after window
#define A_MAX_D 1024       // channels a key head may have (shared memory per channel)
#define A_SCALE_LOW (-1888)
#define A_SCALE_HIGH 1903
#define A_NO_SCALE (-1000000)

// GAIN_b (b = 1 .. 7): what a channel's squared error falls by, per unit of its weight,
// from its (b + 1)-th bit, times 2^30, rounded down.
__device__ __forceinline__ double a_gain(int b) {
  const double g[7] = {954437176.0, 97391548.0, 17140912.0, 3654868.0, 846785.0, 203959.0, 50059.0};
  return g[b - 1];
}

// fp32(2^(j/16)), rounded to nearest.
__device__ __forceinline__ float a_root(int j) {
  const unsigned int r[16] = {0x3f800000u, 0x3f85aac3u, 0x3f8b95c2u, 0x3f91c3d3u, 0x3f9837f0u, 0x3f9ef532u,
                              0x3fa5fed7u, 0x3fad583fu, 0x3fb504f3u, 0x3fbd08a4u, 0x3fc5672au, 0x3fce248cu,
                              0x3fd744fdu, 0x3fe0ccdfu, 0x3feac0c7u, 0x3ff5257du};
  return __uint_as_float(r[j]);
}

struct AKeys {
  int n0, G;                 // the int4 group's tokens, the coded groups
  i64 ranges, bounds, codes; // byte offsets of lo/hi, the bound planes, the code words
};

__device__ __forceinline__ AKeys a_keys_geometry(int T, int H, int D) {
  AKeys k;
  k.n0 = min(T, A_GROUP);
  k.G = (T - k.n0 + A_GROUP - 1) / A_GROUP;
  k.ranges = 4LL * H * D + (i64)k.n0 * H * D / 2;
  k.bounds = k.ranges + (k.G ? 4LL * H * D : 0);
  k.codes = k.bounds + (i64)k.G * H * 14 * (D / 8);
  return k;
}

// Group g's bound codes (a, b) of channel d of head h, from their bit planes.
__device__ __forceinline__ void a_bounds(const u8* buf, const AKeys& k, int H, int D, int g, int h, int d, int* a,
                                         int* b) {
  const u8* planes = buf + k.bounds + ((i64)g * H + h) * 14 * (D / 8) + d / 8;
  int x = 0, y = 0;
  for (int j = 0; j < 7; ++j) {
    x |= ((planes[j * (D / 8)] >> (d % 8)) & 1) << j;
    y |= ((planes[(7 + j) * (D / 8)] >> (d % 8)) & 1) << j;
  }
  *a = x;
  *b = y;
}

// What both sides derive from head h's ranges and bound codes (already in `buf`): each
// channel's lo and step, its bits (a step (c, b) is taken when fewer than 3 D of the
// head's 7 D steps precede it, by gain, then b, then channel) and where its words start
// in a group. Ends with a barrier.
__device__ void a_key_bits(const u8* buf, const AKeys& k, int H, int D, int h, float* s_lo, float* s_step,
                           double* s_w, int* s_bits, int* s_off) {
  const u16* lo16 = reinterpret_cast<const u16*>(buf + k.ranges) + (i64)h * D;
  const u16* hi16 = lo16 + (i64)H * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float lo = half_to_float(lo16[d]), width = __fsub_rn(half_to_float(hi16[d]), lo);
    s_lo[d] = lo;
    s_step[d] = __fdiv_rn(width, 127.0f);
    long long spread = 0;
    for (int g = 0; g < k.G; ++g) {
      int a, b;
      a_bounds(buf, k, H, D, g, h, d, &a, &b);
      spread += (long long)(b - a) * (b - a);
    }
    double w = (double)width;
    w = __dmul_rn((double)spread, __dmul_rn(w, w));
    s_w[d] = w != w ? 0.0 : w;  // bytes no encoder writes: a NaN weight counts as 0
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    int bits = 1;
    for (int b = 1; b < 8; ++b) {
      double mine = __dmul_rn(s_w[d], a_gain(b));
      int before = 0;
      for (int b2 = 1; b2 < 8 && before < 3 * D; ++b2) {
        double gain = a_gain(b2);
        for (int c = 0; c < D; ++c) {
          double other = __dmul_rn(s_w[c], gain);
          before += other > mine || (other == mine && (b2 < b || (b2 == b && c < d)));
        }
      }
      bits += before < 3 * D;
    }
    s_bits[d] = bits;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int off = 0;
    for (int d = 0; d < D; ++d) {
      s_off[d] = off;
      off += s_bits[d];
    }
  }
  __syncthreads();
}

__device__ __forceinline__ i64 a_keys_size(int T, int H, int D) {
  AKeys k = a_keys_geometry(T, H, D);
  return k.codes + (i64)k.G * H * 8 * D;
}

// Head h of one window: rows w0 .. w0 + T - 1 of the chunk, its bytes at `out`.
template <int KIND>
__device__ void a_keys_encode_window(const Paged& src, int w0, int T, int H, int D, int h, u8* out, float* s_lo,
                                     float* s_step, double* s_w, int* s_bits, int* s_off) {
  const AKeys k = a_keys_geometry(T, H, D);
  u16* scales = reinterpret_cast<u16*>(out);
  for (int c = threadIdx.x; c < D / 2; c += blockDim.x)  // the first group: int4's keys
    int4k_pair_encode<KIND>(src, H, D, 0, h, c, 0, k.n0, scales, scales + (i64)H * D, out + 4LL * H * D, w0);
  if (k.G == 0) return;
  u16* lo16 = reinterpret_cast<u16*>(out + k.ranges) + (i64)h * D;
  u16* hi16 = lo16 + (i64)H * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {  // the channel's range over the coded groups
    float mn = 3.0e38f, mx = -3.0e38f;
    bool any = false;
    for (int t = k.n0; t < T; ++t) {
      float x = to_float<KIND>(src.row(w0 + t, h)[(i64)d * src.s_dim]);
      if (finite(x)) {
        mn = fminf(mn, x);
        mx = fmaxf(mx, x);
        any = true;
      }
    }
    if (!any) mn = mx = 0.0f;
    lo16[d] = float_to_half_rn(fminf(fmaxf(__fadd_rn(mn, 0.0f), -FP16_MAX), FP16_MAX));
    hi16[d] = float_to_half_rn(fminf(fmaxf(__fadd_rn(mx, 0.0f), -FP16_MAX), FP16_MAX));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < k.G * (D / 8); i += blockDim.x) {  // bound codes: 8 channels' plane bytes
    int g = i / (D / 8), cb = i % (D / 8);
    int t0 = k.n0 + g * A_GROUP, t1 = min(T, t0 + A_GROUP);
    unsigned int pa[7] = {0, 0, 0, 0, 0, 0, 0}, pb[7] = {0, 0, 0, 0, 0, 0, 0};
    for (int e = 0; e < 8; ++e) {
      int d = cb * 8 + e;
      float lo = half_to_float(lo16[d]);
      float step = __fdiv_rn(__fsub_rn(half_to_float(hi16[d]), lo), 127.0f);
      float inv = step > 0.0f ? __fdiv_rn(1.0f, step) : 0.0f;
      float mn = 3.0e38f, mx = -3.0e38f;
      bool any = false;
      for (int t = t0; t < t1; ++t) {
        float x = to_float<KIND>(src.row(w0 + t, h)[(i64)d * src.s_dim]);
        if (finite(x)) {
          mn = fminf(mn, x);
          mx = fmaxf(mx, x);
          any = true;
        }
      }
      if (!any) mn = mx = 0.0f;
      int a = (int)fminf(fmaxf(floorf(__fmul_rn(__fsub_rn(__fadd_rn(mn, 0.0f), lo), inv)), 0.0f), 127.0f);
      int b = (int)fminf(fmaxf(ceilf(__fmul_rn(__fsub_rn(__fadd_rn(mx, 0.0f), lo), inv)), 0.0f), 127.0f);
      for (int j = 0; j < 7; ++j) {
        pa[j] |= ((unsigned int)(a >> j) & 1u) << e;
        pb[j] |= ((unsigned int)(b >> j) & 1u) << e;
      }
    }
    u8* planes = out + k.bounds + ((i64)g * H + h) * 14 * (D / 8) + cb;
    for (int j = 0; j < 7; ++j) {
      planes[j * (D / 8)] = (u8)pa[j];
      planes[(7 + j) * (D / 8)] = (u8)pb[j];
    }
  }
  __syncthreads();
  a_key_bits(out, k, H, D, h, s_lo, s_step, s_w, s_bits, s_off);
  u16* words = reinterpret_cast<u16*>(out + k.codes);
  for (int i = threadIdx.x; i < k.G * D; i += blockDim.x) {  // codes: a channel's group at a time
    int g = i / D, d = i % D, a, b;
    a_bounds(out, k, H, D, g, h, d, &a, &b);
    float glo = __fadd_rn(__fmul_rn((float)a, s_step[d]), s_lo[d]);
    float ghi = __fadd_rn(__fmul_rn((float)b, s_step[d]), s_lo[d]);
    int bits = s_bits[d];
    float top = (float)((1 << bits) - 1);
    float sc = __fdiv_rn(__fsub_rn(ghi, glo), top);
    float inv = sc > 0.0f ? __fdiv_rn(1.0f, sc) : 0.0f;
    unsigned int w[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int t0 = k.n0 + g * A_GROUP, t1 = min(T, t0 + A_GROUP);
    for (int t = t0; t < t1; ++t) {
      float c = rintf(__fmul_rn(__fsub_rn(to_float<KIND>(src.row(w0 + t, h)[(i64)d * src.s_dim]), glo), inv));
      unsigned int code = c != c ? 0u : (unsigned int)fminf(fmaxf(c, 0.0f), top);
      for (int j = 0; j < 8; ++j) w[j] |= ((code >> j) & 1u) << (t - t0);
    }
    u16* dst = words + ((i64)g * H + h) * 4 * D + s_off[d];
    for (int j = 0; j < bits; ++j) dst[j] = (u16)w[j];
  }
  __syncthreads();  // the next window or head reuses the shared arrays
}

template <int KIND>
__device__ void a_keys_encode(Paged src, int T, int H, int D, u8* out) {
  __shared__ float s_lo[A_MAX_D], s_step[A_MAX_D];
  __shared__ double s_w[A_MAX_D];
  __shared__ int s_bits[A_MAX_D], s_off[A_MAX_D];
  const i64 full = a_keys_size(A_WINDOW, H, D);
  for (int h = blockIdx.x; h < H; h += gridDim.x)
    for (int w0 = 0; w0 < T; w0 += A_WINDOW)
      a_keys_encode_window<KIND>(src, w0, min(A_WINDOW, T - w0), H, D, h, out + (i64)(w0 / A_WINDOW) * full, s_lo,
                                 s_step, s_w, s_bits, s_off);
}


template <int KIND>
__device__ void a_keys_decode_window(const Paged& dst, int w0, int T, int H, int D, int h, const u8* in, float* s_lo,
                                     float* s_step, double* s_w, int* s_bits, int* s_off) {
  const AKeys k = a_keys_geometry(T, H, D);
  const u16* scales = reinterpret_cast<const u16*>(in);
  for (int i = threadIdx.x; i < k.n0 * (D / 2); i += blockDim.x) {  // the first group: int4's keys
    int t = i / (D / 2), c = i % (D / 2);
    int4k_pair_decode<KIND>(dst, w0 + t, h, c, (i64)h * D + 2 * c,
                            in[4LL * H * D + ((i64)t * H + h) * (D / 2) + c], scales, scales + (i64)H * D);
  }
  if (k.G == 0) return;
  a_key_bits(in, k, H, D, h, s_lo, s_step, s_w, s_bits, s_off);
  const u16* words = reinterpret_cast<const u16*>(in + k.codes);
  for (int i = threadIdx.x; i < k.G * D; i += blockDim.x) {
    int g = i / D, d = i % D, a, b;
    a_bounds(in, k, H, D, g, h, d, &a, &b);
    float glo = __fadd_rn(__fmul_rn((float)a, s_step[d]), s_lo[d]);
    float ghi = __fadd_rn(__fmul_rn((float)b, s_step[d]), s_lo[d]);
    int bits = s_bits[d];
    float sc = __fdiv_rn(__fsub_rn(ghi, glo), (float)((1 << bits) - 1));
    const u16* src = words + ((i64)g * H + h) * 4 * D + s_off[d];
    int t0 = k.n0 + g * A_GROUP, t1 = min(T, t0 + A_GROUP);
    for (int t = t0; t < t1; ++t) {
      unsigned int code = 0;
      for (int j = 0; j < bits; ++j) code |= (((unsigned int)src[j] >> (t - t0)) & 1u) << j;
      dst.row(w0 + t, h)[(i64)d * dst.s_dim] = from_float<KIND>(__fadd_rn(__fmul_rn((float)code, sc), glo));
    }
  }
  __syncthreads();
}

template <int KIND>
__device__ void a_keys_decode(Paged dst, int T, int H, int D, const u8* in) {
  __shared__ float s_lo[A_MAX_D], s_step[A_MAX_D];
  __shared__ double s_w[A_MAX_D];
  __shared__ int s_bits[A_MAX_D], s_off[A_MAX_D];
  const i64 full = a_keys_size(A_WINDOW, H, D);
  for (int h = blockIdx.x; h < H; h += gridDim.x)
    for (int w0 = 0; w0 < T; w0 += A_WINDOW)
      a_keys_decode_window<KIND>(dst, w0, min(A_WINDOW, T - w0), H, D, h, in + (i64)(w0 / A_WINDOW) * full, s_lo,
                                 s_step, s_w, s_bits, s_off);
}

struct ARows {
  int m, later;                     // int4h rows' tokens, compact rows' tokens
  i64 first_rows, base, scales, zeros, codes, zper;  // offsets; zero-point bytes per head
};

__device__ __forceinline__ ARows a_rows_geometry(int T, int H, int D) {
  ARows r;
  r.m = min(T, A_FIRST_ROWS);
  r.later = T - r.m;
  r.first_rows = (i64)r.m * H;
  r.base = r.first_rows * (D / 2 + 4);
  r.scales = r.base + 2LL * H;
  r.zeros = r.scales + (i64)r.later * H;
  r.zper = (r.later + 1) / 2;
  r.codes = r.zeros + (i64)H * r.zper;
  return r;
}

// The step of scale index kk for a row of exponent e: ROOT[kk mod 16] * 2^ex (inf above
// 2^127, 0 below 2^-126).
__device__ __forceinline__ float a_row_step(int kk, int ex) {
  if (ex > 127) return __uint_as_float(0x7f800000u);
  if (ex < -126) return 0.0f;
  return __fmul_rn(a_root(kk & 15), pow2f(ex));
}

// One compact row (t, h), the r-th, by one warp: its scale index K (A_NO_SCALE for a
// constant row); with `codes`, also its scale code and 4-bit codes (written when live)
// and its zero-point (returned). Every lane takes part in every shuffle either way.
template <int KIND>
__device__ int a_row(const Paged& src, int t, int h, i64 r, int D, const RotRow& g, int lane, int base, bool codes,
                     bool live, const ARows& ar, u8* out, int* K_out) {
  const u16* p = src.row(t, h);
  float v[ROT_SLOTS];
  const RowScan sc = rot_scan<KIND, false>(src, p, D, g, lane, v);
  const int e = sc.e;
  const float factor = sc.factor;
  float mn = __fadd_rn(sc.lo, 0.0f), mx = __fadd_rn(sc.hi, 0.0f);
  float u = __fdiv_rn(__fsub_rn(mx, mn), 15.0f);
  int K = A_NO_SCALE;
  if (u > 0.0f) {  // the least k with P(k) >= u: u = f * 2^q (0.5 <= f < 1), then the roots below 2f
    unsigned int bits = __float_as_uint(u);
    float twice = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    int below = 0;
    for (int j = 0; j < 16; ++j) below += a_root(j) < twice;
    K = 16 * ((int)((bits >> 23) & 0xffu) - 127) + below + 16 * (e - ROT_Q - g.L);
    K = min(max(K, A_SCALE_LOW), A_SCALE_HIGH);
  }
  *K_out = K;
  if (!codes) return 0;
  int code = K == A_NO_SCALE ? 0 : min(max(K - base, 0), 255);
  int kk = base + code;
  float step = a_row_step(kk, (kk >> 4) - e + ROT_Q + g.L);  // >> 4: floor(kk / 16), kk < 0 too
  float inv = finite(step) && step > 0.0f ? __fdiv_rn(1.0f, step) : 0.0f;
  float z = fminf(fmaxf(rintf(__fmul_rn(-mn, inv)), 0.0f), 15.0f);
  if (live && lane == 0) out[ar.scales + r] = (u8)code;
  u8* packed = out + ar.codes;
  for (int b0 = 0; b0 < D; b0 += g.tile) {
    if (D > g.tile) {  // several tiles: rotate this one again
      rot_load<KIND>(src, p, D, b0, g, lane, factor, v);
      tile_hadamard(v, g.R, g.slots, lane);
    }
#pragma unroll
    for (int j = 0; j < ROT_SLOTS; ++j) {
      if (j >= g.slots) continue;  // the same for every lane
      i64 d = b0 + lane + WARP * j;
      float c = fminf(fmaxf(rintf(__fadd_rn(__fmul_rn(v[j], inv), z)), 0.0f), 15.0f);
      float high = __shfl_xor_sync(0xffffffffu, c, 1);  // the odd neighbour's code
      if (live && !(lane & 1) && d < D) packed[(r * D + d) / 2] = (u8)((unsigned int)c | ((unsigned int)high << 4));
    }
  }
  return (int)z;
}

__device__ __forceinline__ i64 a_rows_size(int T, int H, int D) {
  ARows r = a_rows_geometry(T, H, D);
  return r.later ? r.codes + (i64)r.later * H * D / 2 : r.base;
}

template <int KIND>
__device__ void a_rows_encode_window(const Paged& src, int w0, int T, int H, int D, int h, u8* out, int* s_top) {
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
  const RotRow g = rot_geometry(D);
  const ARows ar = a_rows_geometry(T, H, D);
  int n = (ar.m + warps - 1) / warps * warps;
  for (int k = warp; k < n; k += warps) {  // the first rows: int4h rows
    bool live = k < ar.m;
    int t = live ? k : 0;
    rot_encode_row<KIND, 4>(src, w0 + t, h, (i64)t * H + h, ar.first_rows, D, g, lane, out, live);
  }
  if (ar.later == 0) return;
  if (threadIdx.x == 0) *s_top = A_SCALE_LOW;
  __syncthreads();
  n = (ar.later + warps - 1) / warps * warps;
  for (int k = warp; k < n; k += warps) {
    bool live = k < ar.later;
    int K;
    a_row<KIND>(src, w0 + ar.m + (live ? k : 0), h, 0, D, g, lane, 0, false, false, ar, out, &K);
    if (live && lane == 0 && K != A_NO_SCALE) atomicMax(s_top, K);
  }
  __syncthreads();
  int base = min(max(*s_top - 255, A_SCALE_LOW), A_SCALE_HIGH - 255);
  if (threadIdx.x == 0) reinterpret_cast<short*>(out + ar.base)[h] = (short)base;
  n = (int)((ar.zper + warps - 1) / warps * warps);
  for (int q = warp; q < n; q += warps) {  // two tokens a warp: their zero-points share a byte
    int zz[2] = {0, 0};
    for (int s = 0; s < 2; ++s) {
      int k = 2 * q + s, K;
      bool live = q < ar.zper && k < ar.later;
      int z = a_row<KIND>(src, w0 + ar.m + (live ? k : 0), h, (i64)k * H + h, D, g, lane, base, true, live, ar, out,
                          &K);
      zz[s] = live ? z : 0;
    }
    if (q < ar.zper && lane == 0) out[ar.zeros + (i64)h * ar.zper + q] = (u8)(zz[0] | (zz[1] << 4));
  }
  __syncthreads();  // s_top is set again for the next window or head
}

template <int KIND>
__device__ void a_rows_encode(Paged src, int T, int H, int D, u8* out) {
  __shared__ int s_top;  // the largest scale index of the head's compact rows in a window
  const i64 full = a_rows_size(A_WINDOW, H, D);
  for (int h = blockIdx.x; h < H; h += gridDim.x)
    for (int w0 = 0; w0 < T; w0 += A_WINDOW)
      a_rows_encode_window<KIND>(src, w0, min(A_WINDOW, T - w0), H, D, h, out + (i64)(w0 / A_WINDOW) * full, &s_top);
}

template <int KIND>
__device__ void a_rows_decode(Paged dst, int T, int H, int D, const u8* all) {
  const int lane = threadIdx.x % WARP;
  const RotRow g = rot_geometry(D);
  const i64 full = a_rows_size(A_WINDOW, H, D);
  i64 rows = (i64)T * H;
  i64 row = (blockIdx.x * (i64)blockDim.x + threadIdx.x) / WARP;
  i64 stride = (i64)gridDim.x * blockDim.x / WARP;
  for (; row < rows; row += stride) {
    int ta = (int)(row / H), h = (int)(row % H);
    int w0 = ta / A_WINDOW * A_WINDOW, t = ta - w0;  // the row's window, and its row there
    const ARows ar = a_rows_geometry(min(A_WINDOW, T - w0), H, D);
    const u8* in = all + (i64)(w0 / A_WINDOW) * full;
    if (t < ar.m) {
      rot_decode_row<KIND, 4>(dst, ta, h, (i64)t * H + h, ar.first_rows, D, g, lane, in);
      continue;
    }
    int k = t - ar.m;
    i64 r = (i64)k * H + h;
    int kk = (int)reinterpret_cast<const short*>(in + ar.base)[h] + in[ar.scales + r];
    float S = a_row_step(kk, kk >> 4);  // P(kk): the fixed point's and the rotation's powers of two cancel
    float z = (float)((in[ar.zeros + (i64)h * ar.zper + k / 2] >> (4 * (k & 1))) & 15u);
    const u8* codes = in + ar.codes;
    u16* p = dst.row(ta, h);
    for (int b0 = 0; b0 < D; b0 += g.tile) {
      float v[ROT_SLOTS];
#pragma unroll
      for (int j = 0; j < ROT_SLOTS; ++j) {
        i64 d = b0 + lane + WARP * j;
        v[j] = 0.0f;
        if (j < g.slots && d < D) {
          u8 byte = codes[(r * D + d) / 2];
          v[j] = __fsub_rn((float)((d & 1) ? byte >> 4 : byte & 15u), z);
        }
      }
      tile_hadamard(v, g.R, g.slots, lane);
#pragma unroll
      for (int j = 0; j < ROT_SLOTS; ++j) {
        int d = b0 + lane + WARP * j;
        if (j >= g.slots || d >= D) continue;
        p[(i64)d * dst.s_dim] = from_float<KIND>(__fmul_rn(__fadd_rn(v[j], 0.0f), S));
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// Entry points: kvw_<op>_<dtype>[_vec]. Arguments are the same for every encode:
//   (cache, block_table, T, H, D, bs, s_block, s_tok, s_head, s_dim, out [, G | K])
// and every decode takes `in` in place of `out`. G: channels per int4 value group;
// K: tokens per int4 key group (the block size unless the codec sets key_tokens).
// ---------------------------------------------------------------------------------
#define PAGED_ARGS u16 *cache, const int *table, int T, int H, int D, int bs, i64 sb, i64 st, i64 sh, i64 sd
#define PAGED make_paged(cache, table, bs, sb, st, sh, sd)

#define DEFINE_FOR_KIND(NAME, KIND)                                                                            \
  extern "C" __global__ void kvw_raw_gather_##NAME(PAGED_ARGS, u16* out) { raw_gather<false>(PAGED, T, H, D, out); } \
  extern "C" __global__ void kvw_raw_gather_##NAME##_vec(PAGED_ARGS, u16* out) {                               \
    raw_gather<true>(PAGED, T, H, D, out);                                                                     \
  }                                                                                                            \
  extern "C" __global__ void kvw_raw_scatter_##NAME(PAGED_ARGS, const u16* in) {                               \
    raw_scatter<false>(PAGED, T, H, D, in);                                                                    \
  }                                                                                                            \
  extern "C" __global__ void kvw_raw_scatter_##NAME##_vec(PAGED_ARGS, const u16* in) {                         \
    raw_scatter<true>(PAGED, T, H, D, in);                                                                     \
  }                                                                                                            \
  extern "C" __global__ void kvw_fp8_encode_##NAME(PAGED_ARGS, u8* out) {                                      \
    fp8_encode<KIND, false>(PAGED, T, H, D, out);                                                              \
  }                                                                                                            \
  extern "C" __global__ void kvw_fp8_encode_##NAME##_vec(PAGED_ARGS, u8* out) {                                \
    fp8_encode<KIND, true>(PAGED, T, H, D, out);                                                               \
  }                                                                                                            \
  extern "C" __global__ void kvw_fp8_decode_##NAME(PAGED_ARGS, const u8* in) {                                 \
    fp8_decode<KIND, false>(PAGED, T, H, D, in);                                                               \
  }                                                                                                            \
  extern "C" __global__ void kvw_fp8_decode_##NAME##_vec(PAGED_ARGS, const u8* in) {                           \
    fp8_decode<KIND, true>(PAGED, T, H, D, in);                                                                \
  }                                                                                                            \
  extern "C" __global__ void kvw_int4v_encode_##NAME(PAGED_ARGS, u8* out, int G) {                             \
    int4v_encode<KIND, false>(PAGED, T, H, D, G, out);                                                         \
  }                                                                                                            \
  extern "C" __global__ void kvw_int4v_encode_##NAME##_vec(PAGED_ARGS, u8* out, int G) {                       \
    int4v_encode<KIND, true>(PAGED, T, H, D, G, out);                                                          \
  }                                                                                                            \
  extern "C" __global__ void kvw_int4v_decode_##NAME(PAGED_ARGS, const u8* in, int G) {                        \
    int4v_decode<KIND, false>(PAGED, T, H, D, G, in);                                                          \
  }                                                                                                            \
  extern "C" __global__ void kvw_int4v_decode_##NAME##_vec(PAGED_ARGS, const u8* in, int G) {                  \
    int4v_decode<KIND, true>(PAGED, T, H, D, G, in);                                                           \
  }                                                                                                            \
  extern "C" __global__ void kvw_int4k_encode_##NAME(PAGED_ARGS, u8* out, int K) {                            \
    int4k_encode<KIND>(PAGED, T, H, D, K, out);                                                                \
  }                                                                                                            \
  extern "C" __global__ void kvw_int4k_decode_##NAME(PAGED_ARGS, const u8* in, int K) {                        \
    int4k_decode<KIND>(PAGED, T, H, D, K, in);                                                                 \
  }                                                                                                            \
  extern "C" __global__ void kvw_rot8_encode_##NAME(PAGED_ARGS, u8* out) {                                     \
    rot_encode<KIND, 8>(PAGED, T, H, D, out);                                                                  \
  }                                                                                                            \
  extern "C" __global__ void kvw_rot8_decode_##NAME(PAGED_ARGS, const u8* in) {                                \
    rot_decode<KIND, 8>(PAGED, T, H, D, in);                                                                   \
  }                                                                                                            \
  extern "C" __global__ void kvw_rot4_encode_##NAME(PAGED_ARGS, u8* out) {                                     \
    rot_encode<KIND, 4>(PAGED, T, H, D, out);                                                                  \
  }                                                                                                            \
  extern "C" __global__ void kvw_rot4_decode_##NAME(PAGED_ARGS, const u8* in) {                                \
    rot_decode<KIND, 4>(PAGED, T, H, D, in);                                                                   \
  }                                                                                                            \
  extern "C" __global__ void kvw_int4a_keys_encode_##NAME(PAGED_ARGS, u8* out) {                               \
    a_keys_encode<KIND>(PAGED, T, H, D, out);                                                                  \
  }                                                                                                            \
  extern "C" __global__ void kvw_int4a_keys_decode_##NAME(PAGED_ARGS, const u8* in) {                          \
    a_keys_decode<KIND>(PAGED, T, H, D, in);                                                                   \
  }                                                                                                            \
  extern "C" __global__ void kvw_int4a_rows_encode_##NAME(PAGED_ARGS, u8* out) {                               \
    a_rows_encode<KIND>(PAGED, T, H, D, out);                                                                  \
  }                                                                                                            \
  extern "C" __global__ void kvw_int4a_rows_decode_##NAME(PAGED_ARGS, const u8* in) {                          \
    a_rows_decode<KIND>(PAGED, T, H, D, in);                                                                   \
  }

DEFINE_FOR_KIND(bf16, 0)
DEFINE_FOR_KIND(fp16, 1)

// ---------------------------------------------------------------------------------
// CRC32C of a payload in device memory (the frame checksum of docs/protocol.md), so a
// payload that never visits the host is still checked before it reaches a destination.
//
// The CRC register update R(s, bytes) is linear over GF(2): R(s, A|B) =
// Z_|B|(R(s, A)) ^ R(0, B), where Z_m shifts a register over m zero bytes. So each
// thread takes one segment, computes R(0, segment) bit by bit (no table: no shared
// memory needed), shifts it over the bytes that follow the segment with the matrices
// Z_{2^k} (`zpow`, 32 columns each, made on the host), and XORs it into `*acc`. One
// extra item adds Z_n(0xFFFFFFFF), the initial value's contribution. The CRC32C of the
// payload is then ~*acc; the host zeroes `*acc` before the launch.
// ---------------------------------------------------------------------------------
#define CRC32C_POLY 0x82F63B78u

__device__ __forceinline__ unsigned int gf2_apply(const unsigned int* m, unsigned int v) {
  unsigned int r = 0;
  for (int i = 0; i < 32; ++i)
    if ((v >> i) & 1u) r ^= m[i];
  return r;
}

extern "C" __global__ void kvw_crc32c(const u8* data, i64 n, int seg, const unsigned int* zpow, unsigned int* acc) {
  i64 nseg = (n + seg - 1) / seg;
  for (i64 s = blockIdx.x * (i64)blockDim.x + threadIdx.x; s <= nseg; s += (i64)gridDim.x * blockDim.x) {
    unsigned int c = 0;
    i64 end = 0;
    if (s == nseg) {
      c = 0xFFFFFFFFu;  // the initial register, shifted over all n bytes
    } else {
      i64 begin = s * seg;
      end = begin + seg < n ? begin + seg : n;
      for (i64 i = begin; i < end; ++i) {
        c ^= data[i];
        for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (CRC32C_POLY & (0u - (c & 1u)));
      }
    }
    i64 shift = n - end;
    for (int k = 0; shift; ++k, shift >>= 1)
      if (shift & 1) c = gf2_apply(zpow + 32 * k, c);
    atomicXor(acc, c);
  }
}

#ifdef KVW_HOST_EMULATION
extern "C" void emu_kvw_crc32c(unsigned int grid, unsigned int block, const u8* data, i64 n, int seg,
                               const unsigned int* zpow, unsigned int* acc) {
  emu_launch(grid, block, [&] { kvw_crc32c(data, n, seg, zpow, acc); });
}

// Host wrappers: emu_<kernel>(grid, block, <kernel arguments>), run by emu_launch.
#define EMU_WRAP(FN, BUF_T)                                                                        \
  extern "C" void emu_##FN(unsigned int grid, unsigned int block, PAGED_ARGS, BUF_T buf, int G) { \
    emu_launch(grid, block, [&] { FN(cache, table, T, H, D, bs, sb, st, sh, sd, buf); });         \
    (void)G;                                                                                       \
  }
#define EMU_WRAP_G(FN, BUF_T)                                                                      \
  extern "C" void emu_##FN(unsigned int grid, unsigned int block, PAGED_ARGS, BUF_T buf, int G) { \
    emu_launch(grid, block, [&] { FN(cache, table, T, H, D, bs, sb, st, sh, sd, buf, G); });      \
  }
#define EMU_FOR_KIND(NAME)                               \
  EMU_WRAP(kvw_raw_gather_##NAME, u16*)                  \
  EMU_WRAP(kvw_raw_gather_##NAME##_vec, u16*)            \
  EMU_WRAP(kvw_raw_scatter_##NAME, const u16*)           \
  EMU_WRAP(kvw_raw_scatter_##NAME##_vec, const u16*)     \
  EMU_WRAP(kvw_fp8_encode_##NAME, u8*)                   \
  EMU_WRAP(kvw_fp8_encode_##NAME##_vec, u8*)             \
  EMU_WRAP(kvw_fp8_decode_##NAME, const u8*)             \
  EMU_WRAP(kvw_fp8_decode_##NAME##_vec, const u8*)       \
  EMU_WRAP_G(kvw_int4v_encode_##NAME, u8*)               \
  EMU_WRAP_G(kvw_int4v_encode_##NAME##_vec, u8*)         \
  EMU_WRAP_G(kvw_int4v_decode_##NAME, const u8*)         \
  EMU_WRAP_G(kvw_int4v_decode_##NAME##_vec, const u8*)   \
  EMU_WRAP_G(kvw_int4k_encode_##NAME, u8*)               \
  EMU_WRAP_G(kvw_int4k_decode_##NAME, const u8*)         \
  EMU_WRAP(kvw_rot8_encode_##NAME, u8*)                  \
  EMU_WRAP(kvw_rot8_decode_##NAME, const u8*)            \
  EMU_WRAP(kvw_rot4_encode_##NAME, u8*)                  \
  EMU_WRAP(kvw_rot4_decode_##NAME, const u8*)            \
  EMU_WRAP(kvw_int4a_keys_encode_##NAME, u8*)            \
  EMU_WRAP(kvw_int4a_keys_decode_##NAME, const u8*)      \
  EMU_WRAP(kvw_int4a_rows_encode_##NAME, u8*)            \
  EMU_WRAP(kvw_int4a_rows_decode_##NAME, const u8*)
EMU_FOR_KIND(bf16)
EMU_FOR_KIND(fp16)
#endif
