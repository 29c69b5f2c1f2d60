// Copyright © 2026 mtp_splitk contributors
//
// A C++20 stand-in for the parts of the Metal Shading Language that
// kernels/splitk_qmm.metal uses, so that tests/test_metal.py can compile the
// kernel with g++ and execute it on a CPU. No Apple GPU is involved: this
// checks the kernel's C++ (syntax, templates, indexing, the algorithm and its
// barriers), not Metal's own compiler or hardware.
//
// Execution model: threadgroups run one after another; the lanes of one run
// as std::threads. threadgroup_barrier is a std::barrier over the threadgroup;
// every simd_* function is an exchange through a per-simdgroup slot array
// between two std::barrier phases of its 32 lanes, so a simd function called
// outside converged control flow deadlocks (the test's timeout catches it)
// instead of passing unnoticed. Threadgroup arrays are declared `static` by
// the test harness (the kernel body declares them in the kernel function,
// as Metal requires), i.e. shared by the lanes of the running threadgroup.
//
// Address-space qualifiers vanish, so this cannot catch an address-space
// mismatch (e.g. a constant pointer passed where a device one is expected).

#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

struct uint2 {
  uint x, y;
};
struct uint3 {
  uint x, y, z;
};
struct uint4 {
  uint x, y, z, w;
};

#include "../shim_common/shim_bfloat16.h"
typedef shim_bfloat16 bfloat16_t;

typedef _Float16 half;
typedef _Float16 float16_t;

namespace shim {

struct Simdgroup {
  std::barrier<> bar{32};
  uint64_t slots[32];
};

struct Lane {
  Simdgroup* sg = nullptr;
  std::barrier<>* tg = nullptr;
  unsigned lane = 0;
};

inline thread_local Lane current;

// Run a 1-D grid of grid_x threads in threadgroups of tg_x (MLX's Metal
// dispatch_threads with a grid that is a multiple of the threadgroup):
// f(threadgroup index, thread index in the threadgroup).
template <class F>
void dispatch(unsigned grid_x, unsigned tg_x, F f) {
  if (tg_x % 32 != 0 || grid_x % tg_x != 0) throw std::invalid_argument("shim: grid/threadgroup");
  for (unsigned b = 0; b < grid_x / tg_x; ++b) {
    std::barrier<> tg(tg_x);
    std::unique_ptr<Simdgroup[]> sgs(new Simdgroup[tg_x / 32]);
    std::vector<std::thread> lanes;
    lanes.reserve(tg_x);
    for (unsigned t = 0; t < tg_x; ++t) {
      lanes.emplace_back([&, t] {
        current.sg = &sgs[t / 32];
        current.tg = &tg;
        current.lane = t % 32;
        f(b, t);
      });
    }
    for (auto& l : lanes) l.join();
  }
}

template <class T>
uint64_t to_slot(T v) {
  static_assert(sizeof(T) <= 8);
  uint64_t s = 0;
  std::memcpy(&s, &v, sizeof(T));
  return s;
}

template <class T>
T from_slot(uint64_t s) {
  T v;
  std::memcpy(&v, &s, sizeof(T));
  return v;
}

// Publish this lane's value, wait for the simdgroup, read with `read`
// (slots of all 32 lanes), wait again so the slots may be reused.
template <class T, class R>
T simd_exchange(T v, R read) {
  Lane& l = current;
  l.sg->slots[l.lane] = to_slot(v);
  l.sg->bar.arrive_and_wait();
  T out = read(l.sg->slots, l.lane);
  l.sg->bar.arrive_and_wait();
  return out;
}

}  // namespace shim

namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

inline void threadgroup_barrier(mem_flags) { shim::current.tg->arrive_and_wait(); }

template <class T>
T simd_shuffle_xor(T v, ushort mask) {
  return shim::simd_exchange(v, [mask](const uint64_t* s, unsigned lane) {
    return shim::from_slot<T>(s[(lane ^ mask) & 31u]);
  });
}

template <class T>
T simd_sum(T v) {
  return shim::simd_exchange(v, [](const uint64_t* s, unsigned) {
    T sum = T(0);
    for (unsigned i = 0; i < 32; ++i) sum += shim::from_slot<T>(s[i]);
    return sum;
  });
}

template <class T>
T simd_prefix_exclusive_sum(T v) {
  return shim::simd_exchange(v, [](const uint64_t* s, unsigned lane) {
    T sum = T(0);
    for (unsigned i = 0; i < lane; ++i) sum += shim::from_slot<T>(s[i]);
    return sum;
  });
}

template <class To, class From>
To as_type(From v) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

template <class T>
T min(T a, T b) {
  return b < a ? b : a;
}

template <class T>
T max(T a, T b) {
  return a < b ? b : a;
}

inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline uint popcount(uint v) { return uint(__builtin_popcount(v)); }
inline uint ctz(uint v) { return v ? uint(__builtin_ctz(v)) : 32u; }

typedef std::atomic<uint> atomic_uint;
typedef std::atomic<int> atomic_int;
using std::atomic_fetch_add_explicit;
using std::atomic_fetch_or_explicit;
using std::atomic_load_explicit;
using std::atomic_store_explicit;
using std::memory_order_relaxed;

}  // namespace metal

// The Metal keywords last: the standard headers above use some of them
// (std::thread) as ordinary names. The harness #undefs them again before
// its own host code.
#define kernel
#define device
#define constant
#define thread
#define threadgroup
