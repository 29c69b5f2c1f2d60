// Copyright © 2026 mtp_splitk contributors
//
// A C++20 stand-in for the few CUDA device features kernels/gated_delta.cu
// uses, so that tests/test_gated_delta_shim.py can compile the kernel with g++
// as mx.fast.cuda_kernel wraps it and execute it on a CPU. No GPU and no NVRTC
// are involved: this checks the kernel's C++ (templates, indexing, the
// algorithm, its warp shuffles), not NVIDIA's compiler or hardware.
//
// Execution model: blocks run one after another; the threads of a block run
// as std::threads. __shfl_xor_sync is an exchange through a per-warp slot
// array between two std::barrier phases of its 32 lanes, so a shuffle outside
// converged control flow deadlocks (the test's timeout catches it).

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
};
inline thread_local Warp* warp = nullptr;

// Run `blocks` blocks of `threads` threads (a multiple of 32): f() with
// threadIdx.x and blockIdx.x set, as the generated __global__ function runs.
template <class F>
void launch(unsigned blocks, unsigned threads, F f) {
  if (threads % 32 != 0) throw std::invalid_argument("shim: threads");
  for (unsigned b = 0; b < blocks; ++b) {
    std::unique_ptr<Warp[]> warps(new Warp[threads / 32]);
    std::vector<std::thread> lanes;
    lanes.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      lanes.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        warp = &warps[t / 32];
        f();
        // A lane that returned early still takes part in its warp's later
        // exchanges (CUDA lets the others shuffle among themselves): keep
        // arriving until every lane of the warp is done.
        warp->bar.arrive_and_drop();
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
