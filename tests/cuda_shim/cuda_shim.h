// Copyright © 2026 mtp_splitk contributors
//
// A C++20 stand-in for the CUDA device features kernels/gated_delta.cu and
// kernels/splitk_qmm.cu use, so that tests/test_gated_delta_shim.py and
// tests/test_splitk_shim.py can compile the kernels with g++ as
// mx.fast.cuda_kernel wraps them and execute them on a CPU. No GPU and no
// NVRTC are involved: this checks the kernels' C++ (templates, indexing, the
// algorithm, warp exchanges, shared memory), not NVIDIA's compiler or hardware.
//
// Execution model: blocks run one after another; the threads of a block run
// as std::threads. Warp operations (__shfl_xor_sync, __ballot_sync, the MMA)
// exchange through per-warp slot arrays between std::barrier phases of its 32
// lanes, so one outside converged control flow deadlocks (the tests' timeouts
// catch it); __syncthreads is a barrier of the block. __shared__ variables are
// function statics (one block runs at a time) and the dynamic shared memory
// one buffer. The MMA (mma.sync.m16n8k16, fp32 accumulation) sums in double:
// the GPU's rounding of the sum differs, but any two launches making the same
// MMAs in the same order get the same bits here too.

#pragma once

#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
#define SPLITK_SHIM 1
#define SPLITK_SHARED_PARTIALS(name) float4* name = reinterpret_cast<float4*>(shim::dynamic_shared)

#include "../shim_common/shim_bfloat16.h"
typedef shim_bfloat16 __nv_bfloat16;
typedef _Float16 __half;

struct shim_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local shim_dim3 threadIdx, blockIdx;

namespace shim {

struct Warp {
  std::barrier<> bar{32};
  uint32_t slots[32];
  uint32_t a[32][4], b[32][2];  // an MMA's fragments
  float c[32][4];
};
inline thread_local Warp* warp = nullptr;
inline thread_local std::barrier<>* block = nullptr;
alignas(16) inline unsigned char dynamic_shared[1 << 16];

// Run `blocks` blocks of `threads` threads (a multiple of 32): f() with
// threadIdx.x and blockIdx.x set, as the generated __global__ function runs.
template <class F>
void launch(unsigned blocks, unsigned threads, F f) {
  if (threads % 32 != 0) throw std::invalid_argument("shim: threads");
  for (unsigned b = 0; b < blocks; ++b) {
    std::unique_ptr<Warp[]> warps(new Warp[threads / 32]);
    std::barrier<> block_bar(threads);
    std::vector<std::thread> lanes;
    lanes.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      lanes.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        warp = &warps[t / 32];
        block = &block_bar;
        f();
        // A lane that returned early still takes part in its warp's later
        // exchanges (CUDA lets the others shuffle among themselves): keep
        // arriving until every lane of the warp is done; so for the block.
        warp->bar.arrive_and_drop();
        block->arrive_and_drop();
      });
    }
    for (auto& l : lanes) l.join();
  }
}

}  // namespace shim

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  (void)mask;
  const unsigned lane = threadIdx.x & 31u;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  shim::warp->slots[lane] = bits;
  shim::warp->bar.arrive_and_wait();
  const uint32_t other = shim::warp->slots[(lane ^ unsigned(lane_mask)) & 31u];
  shim::warp->bar.arrive_and_wait();
  float out;
  std::memcpy(&out, &other, 4);
  return out;
}

// ---- What kernels/splitk_qmm.cu uses beyond that ------------------------------------------------

#include <algorithm>
#include <atomic>
#include <cmath>

struct uint2 { uint32_t x, y; };
struct uint4 { uint32_t x, y, z, w; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int __popc(uint32_t v) { return __builtin_popcount(v); }
inline int __ffs(uint32_t v) { return __builtin_ffs(int(v)); }
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half __ushort_as_half(unsigned short u) {
  __half h;
  std::memcpy(&h, &u, 2);
  return h;
}
inline float __half2float(__half h) { return float(h); }

// Byte i of the result is byte s[4i..4i+3] of the 8 bytes {y, x} (x the low four).
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t both = (uint64_t(y) << 32) | x;
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) out |= uint32_t((both >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return out;
}

inline void __syncthreads() { shim::block->arrive_and_wait(); }

inline uint32_t atomicOr(uint32_t* address, uint32_t v) {
  return std::atomic_ref<uint32_t>(*address).fetch_or(v);
}

inline uint32_t __ballot_sync(unsigned mask, bool predicate) {
  (void)mask;
  const unsigned lane = threadIdx.x & 31u;
  shim::warp->slots[lane] = predicate;
  shim::warp->bar.arrive_and_wait();
  uint32_t out = 0;
  for (unsigned l = 0; l < 32; ++l) out |= (shim::warp->slots[l] ? 1u : 0u) << l;
  shim::warp->bar.arrive_and_wait();
  return out;
}

// Pairs of 16-bit floats, the low half first, as in a 32-bit register.
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __half2 { __half x, y; };
static_assert(sizeof(__nv_bfloat162) == 4 && sizeof(__half2) == 4);
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__nv_bfloat16(lo), __nv_bfloat16(hi)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__half(lo), __half(hi)}; }

namespace shim {
// One rounding to the 16-bit type from a double that holds a - b or a * b + c of
// 16-bit operands exactly (the hardware's single rounding): through a float rounded
// to odd, which then rounds to 8 or 11 bits as the double itself would.
inline float to_odd_float(double v) {
  float f = float(v);
  if (double(f) != v) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::fabs(double(f)) > std::fabs(v)) u -= 1;  // rounded away from zero: truncate
    u |= 1u;
    std::memcpy(&f, &u, 4);
  }
  return f;
}
inline __nv_bfloat16 round_bf16(double v) { return __nv_bfloat16(to_odd_float(v)); }
inline __half round_half(double v) { return __half(to_odd_float(v)); }
}  // namespace shim

inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {shim::round_bf16(double(float(a.x)) - float(b.x)), shim::round_bf16(double(float(a.y)) - float(b.y))};
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return {shim::round_bf16(double(float(a.x)) * float(b.x) + float(c.x)),
          shim::round_bf16(double(float(a.y)) * float(b.y) + float(c.y))};
}
inline __half2 __hsub2(__half2 a, __half2 b) {
  return {shim::round_half(double(a.x) - double(b.x)), shim::round_half(double(a.y) - double(b.y))};
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return {shim::round_half(double(a.x) * double(b.x) + double(c.x)),
          shim::round_half(double(a.y) * double(b.y) + double(c.y))};
}

namespace shim {
template <class T>
inline float half_of(uint32_t reg, int hi) {
  T v;
  const uint16_t bits = uint16_t(hi ? reg >> 16 : reg & 0xFFFFu);
  std::memcpy(&v, &bits, 2);
  return float(v);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: D = A (16x16) B (16x8) + C, each lane
// holding the PTX ISA's fragments (g = lane / 4, c = lane % 4): a[0] A[g][2c, 2c+1],
// a[1] A[g+8][2c, 2c+1], a[2] A[g][2c+8, 2c+9], a[3] A[g+8][2c+8, 2c+9]; b[0] B[2c, 2c+1][g],
// b[1] B[2c+8, 2c+9][g]; c[0..1] C[g][2c, 2c+1], c[2..3] C[g+8][2c, 2c+1].
template <class T>
inline void mma_m16n8k16(float* c, const uint32_t* a, const uint32_t* b) {
  const unsigned lane = threadIdx.x & 31u;
  Warp& w = *warp;
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i], w.c[lane][i] = c[i];
  w.b[lane][0] = b[0], w.b[lane][1] = b[1];
  w.bar.arrive_and_wait();
  auto A = [&](int row, int k) {  // the lane and register that hold A[row][k]
    const int l = 4 * (row % 8) + (k % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return half_of<T>(w.a[l][reg], k % 2);
  };
  auto B = [&](int k, int col) {
    const int l = 4 * col + (k % 8) / 2;
    return half_of<T>(w.b[l][k >= 8 ? 1 : 0], k % 2);
  };
  const int g = int(lane) / 4, q = int(lane) % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * q + (i % 2);
    double sum = 0.0;
    for (int k = 0; k < 16; ++k) sum += double(A(row, k)) * double(B(k, col));
    out[i] = float(sum + double(w.c[lane][i]));
  }
  w.bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) c[i] = out[i];
}
}  // namespace shim
