// Run the kernels of kvwire_kernels.cu on the CPU, for tests on machines without a GPU.
//
// Compiled with g++ -DKVW_HOST_EMULATION: each CUDA block runs as blockDim.x std::threads
// (so warp shuffles are real exchanges between lanes), and the intrinsics map to host
// arithmetic with the same rounding: IEEE fp32 round-to-nearest with -ffp-contract=off
// (no fused multiply-add), F16C instructions for fp16 conversions. This checks the
// kernels' logic, addressing and bit manipulation against the CPU reference; it does not
// check timing, occupancy or memory-model behaviour, which only a GPU can.
#pragma once
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstring>
#include <functional>
#include <immintrin.h>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline

struct EmuDim {
  unsigned int x = 0;
};
// Per thread, like the indices: launches from several host threads at once (a sender and
// a receiver in one test process) must not see each other's grid.
inline thread_local EmuDim threadIdx, blockIdx, blockDim, gridDim;

inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
using std::min;  // fabsf, fminf, fmaxf, rintf come from <cmath> in the global namespace

inline float emu_half_to_float(unsigned short h) { return _cvtsh_ss(h); }
inline unsigned short emu_float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

// Warp shuffle across the threads of one emulated block (one warp per 32 threads).
struct EmuWarp {
  std::barrier<>* sync;
  float* slots;
};
inline thread_local EmuWarp emu_warp;

inline float __shfl_xor_sync(unsigned int, float v, int mask) {
  unsigned int lane = threadIdx.x % 32, base = threadIdx.x - lane;
  emu_warp.slots[threadIdx.x] = v;
  emu_warp.sync->arrive_and_wait();
  float out = emu_warp.slots[base + (lane ^ mask)];
  emu_warp.sync->arrive_and_wait();
  return out;
}

inline unsigned int atomicXor(unsigned int* address, unsigned int value) {
  return __atomic_fetch_xor(address, value, __ATOMIC_SEQ_CST);
}

// Launch `kernel` on grid x block threads, one block at a time.
inline void emu_launch(unsigned int grid, unsigned int block, const std::function<void()>& kernel) {
  std::vector<float> slots(block);
  for (unsigned int b = 0; b < grid; ++b) {
    std::barrier<> sync((std::ptrdiff_t)block);
    std::vector<std::thread> threads;
    for (unsigned int t = 0; t < block; ++t)
      threads.emplace_back([&, b, t] {
        gridDim.x = grid;
        blockDim.x = block;
        blockIdx.x = b;
        threadIdx.x = t;
        emu_warp = EmuWarp{&sync, slots.data()};
        kernel();
      });
    for (auto& th : threads) th.join();
  }
}
