// Run the kernels of kvwire_kernels.cu on the CPU, for tests on machines without a GPU.
//
// Compiled with g++ -DKVW_HOST_EMULATION: each CUDA block runs as blockDim.x lanes, each
// a coroutine (ucontext) with its own stack, all on the calling thread; a warp shuffle
// parks every lane until all have arrived, so it is a real exchange between lanes. (Lanes
// were std::threads once: with 32 threads per block on two cores, the futex sleeps and
// wake-ups of the rotated-row kernels' dozens of shuffles per row made them 10x slower.)
// The intrinsics map to host arithmetic with the same rounding: IEEE fp32
// round-to-nearest with -ffp-contract=off (no fused multiply-add), F16C instructions for
// fp16 conversions. This checks the kernels' logic, addressing and bit manipulation
// against the CPU reference; it does not check timing, occupancy or memory-model
// behaviour, which only a GPU can.
#pragma once
#include <cmath>
#include <math.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <immintrin.h>
#include <ucontext.h>
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
using std::max;
using std::min;  // fabsf, fminf, fmaxf, rintf come from <cmath> in the global namespace

inline float emu_half_to_float(unsigned short h) { return _cvtsh_ss(h); }
inline unsigned short emu_float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

// One emulated block: its lanes' contexts, and where shuffles exchange values.
struct EmuBlock {
  ucontext_t scheduler;
  std::vector<ucontext_t> lanes;
  std::vector<char> finished;
  std::vector<float> slots;
  const std::function<void()>* kernel = nullptr;
  unsigned int current = 0;
};
// Per host thread, like the indices: launches from several host threads at once (a sender
// and a receiver in one test process) must not see each other's block.
inline thread_local EmuBlock* emu_block;

// Park the running lane; the scheduler resumes it once every lane has parked (a barrier).
inline void emu_park() { swapcontext(&emu_block->lanes[emu_block->current], &emu_block->scheduler); }

inline void emu_lane_main() {
  (*emu_block->kernel)();
  emu_block->finished[emu_block->current] = 1;  // then uc_link returns to the scheduler
}

inline float __shfl_xor_sync(unsigned int, float v, int mask) {
  unsigned int lane = threadIdx.x % 32, base = threadIdx.x - lane;
  emu_block->slots[threadIdx.x] = v;
  emu_park();
  float out = emu_block->slots[base + (lane ^ mask)];
  emu_park();
  return out;
}

inline unsigned int atomicXor(unsigned int* address, unsigned int value) {
  return __atomic_fetch_xor(address, value, __ATOMIC_SEQ_CST);
}

// A block's lanes run on one host thread, one at a time: a plain read-modify-write is atomic.
inline int atomicMax(int* address, int value) {
  int old = *address;
  if (value > old) *address = value;
  return old;
}

inline double __dmul_rn(double a, double b) { return a * b; }

// Shared memory: one copy per host thread (blocks run one after another on it). A barrier
// parks the lane like a shuffle does, so lanes must meet barriers and shuffles in the same
// order (the kernels keep every warp's trip count equal where that matters).
#define __shared__ static thread_local
inline void __syncthreads() { emu_park(); }

// Launch `kernel` on grid x block lanes, one block at a time. Each round runs every lane
// up to its next shuffle (or its end); a block ends when all lanes have ended in the same
// round. A lane that ends while others still wait at a shuffle is a kernel bug (divergent
// shuffles), which would hang or corrupt on a GPU: it aborts here.
inline void emu_launch(unsigned int grid, unsigned int block, const std::function<void()>& kernel) {
  constexpr size_t kStack = 256 * 1024;
  std::vector<char> stacks(kStack * block);
  EmuBlock b;
  b.lanes.resize(block);
  b.slots.assign(block, 0.0f);
  b.kernel = &kernel;
  EmuBlock* outer = emu_block;
  emu_block = &b;
  for (unsigned int g = 0; g < grid; ++g) {
    gridDim.x = grid;
    blockDim.x = block;
    blockIdx.x = g;
    b.finished.assign(block, 0);
    for (unsigned int t = 0; t < block; ++t) {
      getcontext(&b.lanes[t]);
      b.lanes[t].uc_stack.ss_sp = stacks.data() + kStack * t;
      b.lanes[t].uc_stack.ss_size = kStack;
      b.lanes[t].uc_link = &b.scheduler;
      makecontext(&b.lanes[t], emu_lane_main, 0);
    }
    for (;;) {
      unsigned int ended = 0;
      for (unsigned int t = 0; t < block; ++t) {
        if (b.finished[t]) continue;
        threadIdx.x = t;
        b.current = t;
        swapcontext(&b.scheduler, &b.lanes[t]);
        ended += b.finished[t];
      }
      unsigned int done = 0;
      for (unsigned int t = 0; t < block; ++t) done += b.finished[t];
      if (done == block) break;
      if (ended) {
        std::fprintf(stderr, "kvwire host emulation: lanes of block %u ended while others wait at a shuffle\n", g);
        std::abort();
      }
    }
  }
  emu_block = outer;
}
