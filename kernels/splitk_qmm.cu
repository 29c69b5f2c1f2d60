// Copyright © 2026 mtp_splitk contributors
//
// Split-K quantized matmul for small M on NVIDIA GPUs (sm_80+), launched
// through mx.fast.cuda_kernel. y[M, N] = x[M, K] @ dequant(w[N, K]).T
//
// Shape of the work:
//   * a block owns 16 weight rows (the m16 side of mma.m16n8k16) and has WK
//     warps; warp j takes K chunks j, j+WK, j+2WK, ... (split-K inside the
//     block), so the grid has ceil(N/16) blocks however small M is;
//   * a chunk is 128 K: lane (g = lane/4, c = lane%4) owns the 32 consecutive
//     codes at k0 = 128*chunk + 32c of rows g and g+8 (16-byte loads at
//     4 bits), dequantizes them in registers, and applies them to every token
//     tile with the tensor cores: weights stream from memory once per call;
//   * the WK partial sums meet in shared memory and are added in warp order
//     0..WK-1 by one thread per output: a fixed order, no atomics, one MLX
//     primitive per matmul.
// Batch invariance: nothing above depends on M, and each output column of
// an MMA depends only on its own token, so a row's result is bit-identical
// whatever the other rows of the call are.
//
// Entries: splitk_qmm (dense), splitk_gather_qmm (MoE), and the fused
// projections splitk_qmm_multi (q/k/v: 2 or 3 weights of one x in one launch),
// splitk_qmm_glu and splitk_gather_qmm_glu (gate/up with the activation, dense
// and MoE), which run the plain kernels' code per row tile, so their outputs
// are the plain kernels' bits.
//
// The K labels inside an MMA are free as long as A and B agree: lane c's four
// K slots of each k16 step are filled with its own codes, paired as
// (8v + j, 8v + j + 4) (the order in which 4-bit codes come out of a word two
// at a time), and x is permuted into the same pairs with byte permutes.

#define QC_FN __device__ __forceinline__
#define QC_THREAD
typedef uint32_t qc_u32;
__device__ __forceinline__ float qc_bits_to_float(uint32_t u) { return __uint_as_float(u); }
__device__ __forceinline__ float qc_half_bits_to_float(uint32_t u) {
  return __half2float(__ushort_as_half((unsigned short)u));
}

// The block's partial sums (dynamic shared memory; the CPU shim has its own).
#ifndef SPLITK_SHARED_PARTIALS
#define SPLITK_SHARED_PARTIALS(name) extern __shared__ float4 name[]
#endif

// (quant_core.h is pasted here by the launcher)
#include "quant_core.h"

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ __forceinline__ static void run(float* c, const uint32_t* a, const uint32_t* b) {
#ifdef SPLITK_SHIM  // tests/cuda_shim: the MMA emulated on the CPU
    shim::mma_m16n8k16<__nv_bfloat16>(c, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
  // 128 + q as a bf16 pair; the mantissa holds q exactly for q < 128.
  static constexpr uint32_t kMagic = 0x43004300u;
  __device__ __forceinline__ static uint32_t sub_magic(uint32_t v) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), __floats2bfloat162_rn(128.f, 128.f));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ __forceinline__ static uint32_t fma2(uint32_t q, uint32_t s, uint32_t b) {
    __nv_bfloat162 r = __hfma2(*reinterpret_cast<__nv_bfloat162*>(&q), *reinterpret_cast<__nv_bfloat162*>(&s),
                               *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
};

template <>
struct Mma<__half> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ __forceinline__ static void run(float* c, const uint32_t* a, const uint32_t* b) {
#ifdef SPLITK_SHIM  // tests/cuda_shim: the MMA emulated on the CPU
    shim::mma_m16n8k16<__half>(c, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
  // 1024 + q as a half pair.
  static constexpr uint32_t kMagic = 0x64006400u;
  __device__ __forceinline__ static uint32_t sub_magic(uint32_t v) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&v), __floats2half2_rn(1024.f, 1024.f));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ __forceinline__ static uint32_t fma2(uint32_t q, uint32_t s, uint32_t b) {
    __half2 r = __hfma2(*reinterpret_cast<__half2*>(&q), *reinterpret_cast<__half2*>(&s),
                        *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
};

template <typename TS>
__device__ __forceinline__ float scale_to_float(TS v) { return static_cast<float>(v); }

// One lane's raw share of a chunk for one weight row: BITS words of codes and
// its group parameters (nvfp4 has two groups of 16 in a run of 32).
template <int BITS>
struct RowRun {
  uint32_t words[BITS];
  float scale[2];
  float bias[2];
};

template <int BITS>
__device__ __forceinline__ void load_words(uint32_t* dst, const uint32_t* src) {
  if constexpr (BITS % 4 == 0) {
#pragma unroll
    for (int i = 0; i < BITS / 4; ++i) {
      uint4 v = reinterpret_cast<const uint4*>(src)[i];
      dst[4 * i] = v.x;
      dst[4 * i + 1] = v.y;
      dst[4 * i + 2] = v.z;
      dst[4 * i + 3] = v.w;
    }
  } else if constexpr (BITS % 2 == 0) {
#pragma unroll
    for (int i = 0; i < BITS / 2; ++i) {
      uint2 v = reinterpret_cast<const uint2*>(src)[i];
      dst[2 * i] = v.x;
      dst[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) dst[i] = src[i];
  }
}

template <int MODE, int BITS, int G, typename TS>
__device__ __forceinline__ void load_run(RowRun<BITS>& r, const uint32_t* w, const TS* scales, const TS* biases,
                                         int row, int k0, int K) {
  if (k0 >= K) {  // past the end of K (K % 128 != 0): contributes exact zeros
#pragma unroll
    for (int i = 0; i < BITS; ++i) r.words[i] = 0;
    r.scale[0] = r.scale[1] = r.bias[0] = r.bias[1] = 0.f;
    return;
  }
  load_words<BITS>(r.words, w + (size_t)row * (K / 32 * BITS) + k0 / 32 * BITS);
  const size_t gi = (size_t)row * (K / G) + k0 / G;
  if constexpr (MODE == QC_AFFINE) {
    r.scale[0] = r.scale[1] = scale_to_float(scales[gi]);
    r.bias[0] = r.bias[1] = scale_to_float(biases[gi]);
  } else {
    r.scale[0] = qc_decode_scale<MODE>(scales[gi]);
    r.scale[1] = G == 16 ? qc_decode_scale<MODE>(scales[gi + 1]) : r.scale[0];
    r.bias[0] = r.bias[1] = 0.f;
  }
}

// (v & 0x000F000F) | magic in one instruction (the compiler splits it in two
// because LOP3 takes one immediate).
__device__ __forceinline__ uint32_t nibbles_with_magic(uint32_t v, uint32_t magic) {
#ifdef SPLITK_SHIM
  return (v & 0x000F000Fu) | magic;
#else
  uint32_t out;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(out) : "r"(v), "r"(0x000F000Fu), "r"(magic));
  return out;
#endif
}

// The run's 32 weights as 16 packed pairs in MMA K-slot order: pair 4v + j
// holds codes (8v + j, 8v + j + 4).
template <typename T, int MODE, int BITS, int G, bool FAST4>
__device__ __forceinline__ void dequant_run(uint32_t* pairs, const RowRun<BITS>& r) {
  if constexpr (FAST4) {
    // 4-bit affine with scales in the activation type: two codes per
    // lop3, exact q via the magic-number subtraction, then one fma per pair
    // (single rounding of scale * q + bias, like the generic path).
    const uint32_t s2 = Mma<T>::pack(r.scale[0], r.scale[0]);
    const uint32_t b2 = Mma<T>::pack(r.bias[0], r.bias[0]);
#pragma unroll
    for (int v = 0; v < 4; ++v) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        pairs[4 * v + j] = Mma<T>::fma2(Mma<T>::sub_magic(nibbles_with_magic(r.words[v] >> (4 * j), Mma<T>::kMagic)), s2, b2);
      }
    }
  } else {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int i0 = 8 * v + j, i1 = 8 * v + j + 4;
        const int h0 = G == 16 ? i0 / 16 : 0, h1 = G == 16 ? i1 / 16 : 0;
        float w0 = qc_dequant<MODE, BITS>(r.words, i0, r.scale[h0], r.bias[h0]);
        float w1 = qc_dequant<MODE, BITS>(r.words, i1, r.scale[h1], r.bias[h1]);
        pairs[4 * v + j] = Mma<T>::pack(w0, w1);
      }
    }
  }
}

// 8 consecutive activations x[8v .. 8v+7] as the pairs 4v .. 4v+3.
__device__ __forceinline__ void x_pairs(uint32_t* pairs, uint4 u) {
  pairs[0] = __byte_perm(u.x, u.z, 0x5410);  // (x0, x4)
  pairs[1] = __byte_perm(u.x, u.z, 0x7632);  // (x1, x5)
  pairs[2] = __byte_perm(u.y, u.w, 0x5410);  // (x2, x6)
  pairs[3] = __byte_perm(u.y, u.w, 0x7632);  // (x3, x7)
}

// One chunk's raw runs of a lane's rows, k0 its first K.
template <int MODE, int BITS, int G, int RT, typename TS>
__device__ __forceinline__ void load_chunk(RowRun<BITS> (&runs)[RT][2], const uint32_t* w, const TS* scales,
                                           const TS* biases, const int (&rows)[RT][2], int k0, int K) {
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) load_run<MODE, BITS, G>(runs[r][h], w, scales, biases, rows[r][h], k0, K);
}

// 32 consecutive activations of one token, permuted into the same pairs.
template <typename T>
__device__ __forceinline__ void load_x_run(uint32_t* pairs, const T* x, bool valid) {
  if (!valid) {
#pragma unroll
    for (int i = 0; i < 16; ++i) pairs[i] = 0;
    return;
  }
#pragma unroll
  for (int v = 0; v < 4; ++v) x_pairs(pairs + 4 * v, reinterpret_cast<const uint4*>(x)[v]);
}

// The K loop of one block: accumulates x rows (xrow(t) gives the x row of
// token tile t for this lane's g) times the block's weight rows into acc.
// RT row tiles of 16 per warp share each x fragment. warp (0..WK-1) is the
// warp's K slice: chunks warp, warp + WK, ... LEAN: the chunk is taken 8 k a
// lane at a time, one 16-byte x load a token tile and 4 weight pairs a row, so
// 12 registers hold what 48 do (more warps an SM); each accumulator gets the
// same MMAs in the same order, so the outputs' bits are the plain loop's.
template <typename T, typename TS, int MODE, int BITS, int G, int WK, int NT, int RT, bool FAST4, int DEPTH, bool LEAN,
          typename XRow>
__device__ __forceinline__ void accumulate(float (&acc)[NT][RT][2][4], const T* x, const uint32_t* w,
                                           const TS* scales, const TS* biases, const int (&rows)[RT][2], int K,
                                           XRow xrow, int warp) {
  const int CHUNKS = (K + 127) / 128;
  const int lane = threadIdx.x & 31;
  const int c = lane & 3;
  // Two accumulators per (token tile, row tile), for even and odd k16 steps,
  // halve each chain of dependent MMAs; they are added in a fixed order.
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) acc[t][r][h][0] = acc[t][r][h][1] = acc[t][r][h][2] = acc[t][r][h][3] = 0.f;

  // A ring of DEPTH chunks in registers: chunk i+DEPTH's weight loads are in
  // flight while chunk i is dequantized and multiplied.
  RowRun<BITS> ring[DEPTH][RT][2];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) {
    const int chunk = warp + d * WK;
    if (chunk < CHUNKS) load_chunk<MODE, BITS, G, RT>(ring[d], w, scales, biases, rows, chunk * 128 + 32 * c, K);
  }
  for (int base = warp; base < CHUNKS; base += DEPTH * WK) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int chunk = base + d * WK;
      if (chunk >= CHUNKS) break;  // warp-uniform
      const int k0 = chunk * 128 + 32 * c;
      if constexpr (LEAN) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {  // k16 steps 2v and 2v + 1
          uint32_t xv[NT][4];  // past the end of K: zeros, as load_x_run
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            xv[t][0] = xv[t][1] = xv[t][2] = xv[t][3] = 0;
            if (k0 < K) x_pairs(xv[t], reinterpret_cast<const uint4*>(x + (size_t)xrow(t) * K + k0)[v]);
          }
#pragma unroll
          for (int r = 0; r < RT; ++r) {
            // Only pairs 4v .. 4v + 3 are used: the rest is dead code.
            uint32_t p0[16], p1[16];
            dequant_run<T, MODE, BITS, G, FAST4>(p0, ring[d][r][0]);
            dequant_run<T, MODE, BITS, G, FAST4>(p1, ring[d][r][1]);
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const int s = 2 * v + h;
                const uint32_t b[2] = {xv[t][2 * h], xv[t][2 * h + 1]};
                const uint32_t a[4] = {p0[2 * s], p1[2 * s], p0[2 * s + 1], p1[2 * s + 1]};
                Mma<T>::run(acc[t][r][s & 1], a, b);
              }
          }
        }
        const int refill = chunk + DEPTH * WK;
        if (refill < CHUNKS) load_chunk<MODE, BITS, G, RT>(ring[d], w, scales, biases, rows, refill * 128 + 32 * c, K);
        continue;
      }
      // x of the first token tile first: its latency overlaps the dequant.
      uint32_t xb[16];
      load_x_run<T>(xb, x + (size_t)xrow(0) * K + k0, k0 < K);
      uint32_t wp[RT][2][16];
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) dequant_run<T, MODE, BITS, G, FAST4>(wp[r][h], ring[d][r][h]);
      const int refill = chunk + DEPTH * WK;
      if (refill < CHUNKS) load_chunk<MODE, BITS, G, RT>(ring[d], w, scales, biases, rows, refill * 128 + 32 * c, K);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        uint32_t xn[16];
        if (t + 1 < NT) load_x_run<T>(xn, x + (size_t)xrow(t + 1) * K + k0, k0 < K);
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          const uint32_t b[2] = {xb[2 * s], xb[2 * s + 1]};
#pragma unroll
          for (int r = 0; r < RT; ++r) {
            const uint32_t a[4] = {wp[r][0][2 * s], wp[r][1][2 * s], wp[r][0][2 * s + 1], wp[r][1][2 * s + 1]};
            Mma<T>::run(acc[t][r][s & 1], a, b);
          }
        }
        if (t + 1 < NT) {
#pragma unroll
          for (int i = 0; i < 16; ++i) xb[i] = xn[i];
        }
      }
    }
  }
}

// Each warp's partial tiles (its even and odd k16 sums added) into shared
// memory at [warp][NT][RT][32 lanes], warp counting every warp of the block.
template <int NT, int RT>
__device__ __forceinline__ void write_partials(float4* partial, const float (&acc)[NT][RT][2][4]) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const float(&e)[2][4] = acc[t][r];
      partial[((warp * NT + t) * RT + r) * 32 + lane] =
          make_float4(e[0][0] + e[1][0], e[0][1] + e[1][1], e[0][2] + e[1][2], e[0][3] + e[1][3]);
    }
}

// Output element i (0 .. NT * RT * 128 - 1) of a block's tile: the partials of
// warps first .. first + WK - 1 added in that order.
template <int WK, int NT, int RT>
__device__ __forceinline__ float warp_sum(const float* flat, int first, int i) {
  const int tr = i >> 7, l = (i >> 2) & 31, e = i & 3;  // tr = t * RT + r
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < WK; ++j) sum += flat[(((first + j) * NT * RT + tr) * 32 + l) * 4 + e];
  return sum;
}

// Where element i of a tile goes: token slot (0 .. 8 * NT - 1) and row in the block.
template <int RT>
__device__ __forceinline__ int tile_slot(int i) {
  const int tr = i >> 7, l = (i >> 2) & 31, e = i & 3;
  return (tr / RT) * 8 + 2 * (l & 3) + (e & 1);
}

template <int RT>
__device__ __forceinline__ int tile_row(int i) {
  const int tr = i >> 7, l = (i >> 2) & 31, e = i & 3;
  return 16 * (tr % RT) + (l >> 2) + 8 * (e >> 1);
}

// Fixed-order reduction of the WK warps' partial tiles through shared
// memory; store(slot, row_in_block, value) writes one output (slot = token
// slot 0..8*NT-1). Ends with a barrier so the caller may reuse the memory.
template <int WK, int NT, int RT, typename Store>
__device__ __forceinline__ void reduce_store(const float (&acc)[NT][RT][2][4], Store store) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  SPLITK_SHARED_PARTIALS(partial);  // [WK][NT][RT][32 lanes]
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const float(&e)[2][4] = acc[t][r];
      partial[((warp * NT + t) * RT + r) * 32 + lane] =
          make_float4(e[0][0] + e[1][0], e[0][1] + e[1][1], e[0][2] + e[1][2], e[0][3] + e[1][3]);
    }
  __syncthreads();
  const float* flat = reinterpret_cast<const float*>(partial);
  for (int i = threadIdx.x; i < NT * RT * 128; i += WK * 32) {
    const int tr = i >> 7, l = (i >> 2) & 31, e = i & 3;  // tr = t * RT + r
    const int t = tr / RT, r = tr % RT;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < WK; ++j) sum += flat[((j * NT * RT + tr) * 32 + l) * 4 + e];
    store(t * 8 + 2 * (l & 3) + (e & 1), 16 * r + (l >> 2) + 8 * (e >> 1), sum);
  }
  __syncthreads();
}

// Lane rows g and g + 8 of each row tile; rows past N load row N-1 (never
// stored) so the loads need no predicate.
template <int RT>
__device__ __forceinline__ void lane_rows(int (&rows)[RT][2], int row0, int N) {
  const int g = (threadIdx.x & 31) >> 2;
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    rows[r][0] = min(row0 + 16 * r + g, N - 1);
    rows[r][1] = min(row0 + 16 * r + g + 8, N - 1);
  }
}

// Row tile `tile` (16 * RT rows) of y[M, N] = x[M, K] @ dequant(w[N, K]).T;
// out(i, v) stores element i = slot * N + row of the fp32 sum v.
template <typename T, typename TS, int MODE, int BITS, int G, int WK, int NT, int RT, bool FAST4, int DEPTH, bool LEAN,
          typename Out>
__device__ __forceinline__ void dense_tile(const T* x, const uint32_t* w, const TS* scales, const TS* biases,
                                           int M, int N, int K, int tile, Out out) {
  const int g = (threadIdx.x & 31) >> 2;
  const int row0 = tile * 16 * RT;
  int rows[RT][2];
  lane_rows<RT>(rows, row0, N);
  float acc[NT][RT][2][4];
  // Padding tokens repeat the last real one; they are never stored.
  accumulate<T, TS, MODE, BITS, G, WK, NT, RT, FAST4, DEPTH, LEAN>(
      acc, x, w, scales, biases, rows, K, [&](int t) { return min(t * 8 + g, M - 1); }, threadIdx.x >> 5);
  reduce_store<WK, NT, RT>(acc, [&](int slot, int roff, float v) {
    const int row = row0 + roff;
    if (slot < M && row < N) out((size_t)slot * N + row, v);
  });
}

// Dense: y[M, N] = x[M, K] @ dequant(w[N, K]).T. N and K are run-time
// values (one compiled variant serves every layer of a model). FAST4: 4-bit
// affine with scales of the activation type (the launcher checks).
template <typename T, typename TS, int MODE, int BITS, int G, int WK, int NT, int RT, bool FAST4, int DEPTH, bool LEAN>
__device__ void splitk_qmm(const T* x, const uint32_t* w, const TS* scales, const TS* biases, T* y,
                           int M, int N, int K) {
  dense_tile<T, TS, MODE, BITS, G, WK, NT, RT, FAST4, DEPTH, LEAN>(
      x, w, scales, biases, M, N, K, blockIdx.x, [&](size_t i, float v) { y[i] = static_cast<T>(v); });
}

// Dense with the residual add of the block after it: y = add(r, x @ dequant(w).T),
// the product rounded to T first and add MLX's own Add functor (the launcher's),
// so y is bit for bit the dense kernel's output then MLX's add: one launch fewer.
template <typename T, typename TS, int MODE, int BITS, int G, int WK, int NT, int RT, bool FAST4, int DEPTH, bool LEAN,
          typename AddOp>
__device__ void splitk_qmm_residual(const T* x, const uint32_t* w, const TS* scales, const TS* biases,
                                    const T* r, T* y, int M, int N, int K, AddOp add) {
  dense_tile<T, TS, MODE, BITS, G, WK, NT, RT, FAST4, DEPTH, LEAN>(
      x, w, scales, biases, M, N, K, blockIdx.x, [&](size_t i, float v) { y[i] = add(r[i], static_cast<T>(v)); });
}

// Fused projections: y_i[M, N_i] = x[M, K] @ dequant(w_i[N_i, K]).T for two or
// three weights of one K and quantization (q/k/v, or gate/up), in one launch,
// from the weight arrays as they are. The grid is the dense kernel's blocks
// for w_0, then w_1's, then w_2's (N_2 = 0: none); a block takes its weight by
// its index and runs the dense kernel's code with the same constants, so each
// output is bit for bit the dense kernel's for that weight. The weight is
// chosen before the one inlined K loop (block-uniform selects, no branches
// around three copies of it).
template <typename T, typename TS, int MODE, int BITS, int G, int WK, int NT, int RT, bool FAST4, int DEPTH, bool LEAN>
__device__ void splitk_qmm_multi(const T* x, int M, int K,
                                 const uint32_t* w0, const TS* s0, const TS* b0, T* y0, int N0,
                                 const uint32_t* w1, const TS* s1, const TS* b1, T* y1, int N1,
                                 const uint32_t* w2, const TS* s2, const TS* b2, T* y2, int N2) {
  const int tiles0 = (N0 + 16 * RT - 1) / (16 * RT);
  const int tiles1 = (N1 + 16 * RT - 1) / (16 * RT);
  const int tile = blockIdx.x;
  const bool first = tile < tiles0, second = !first && tile < tiles0 + tiles1;
  const uint32_t* w = first ? w0 : second ? w1 : w2;
  const TS* s = first ? s0 : second ? s1 : s2;
  const TS* b = first ? b0 : second ? b1 : b2;
  T* y = first ? y0 : second ? y1 : y2;
  const int N = first ? N0 : second ? N1 : N2;
  const int local = first ? tile : second ? tile - tiles0 : tile - tiles0 - tiles1;
  dense_tile<T, TS, MODE, BITS, G, WK, NT, RT, FAST4, DEPTH, LEAN>(
      x, w, s, b, M, N, K, local, [&](size_t i, float v) { y[i] = static_cast<T>(v); });
}

// Gate/up with the activation fused: y[M, N] = act(g, u), g = x @ dequant(wg).T
// and u = x @ dequant(wu).T, each rounded to T first. A block of 2 * WK warps
// owns one row tile of both: warps 0..WK-1 stream the gate rows, WK..2WK-1 the
// up rows, each set with the dense kernel's K split and reduction order, so g
// and u are bit for bit the dense kernel's outputs. act is the launcher's
// (MLX's own elementwise functors, so that the product rounds as mlx-lm's
// compiled swiglu does).
template <typename T, typename TS, int MODE, int BITS, int G, int WK, int NT, int RT, bool FAST4, int DEPTH, bool LEAN,
          typename Act>
__device__ void splitk_qmm_glu(const T* x, const uint32_t* wg, const TS* sg, const TS* bg, const uint32_t* wu,
                               const TS* su, const TS* bu, T* y, int M, int N, int K, Act act) {
  const int g = (threadIdx.x & 31) >> 2;
  const bool up = (threadIdx.x >> 5) >= WK;  // warp-uniform
  const int row0 = blockIdx.x * 16 * RT;
  int rows[RT][2];
  lane_rows<RT>(rows, row0, N);
  float acc[NT][RT][2][4];
  accumulate<T, TS, MODE, BITS, G, WK, NT, RT, FAST4, DEPTH, LEAN>(
      acc, x, up ? wu : wg, up ? su : sg, up ? bu : bg, rows, K, [&](int t) { return min(t * 8 + g, M - 1); },
      (threadIdx.x >> 5) - (up ? WK : 0));
  SPLITK_SHARED_PARTIALS(partial);  // [2][WK][NT][RT][32 lanes]: the gate's warps, then the up's
  write_partials<NT, RT>(partial, acc);
  __syncthreads();
  const float* flat = reinterpret_cast<const float*>(partial);
  for (int i = threadIdx.x; i < NT * RT * 128; i += 2 * WK * 32) {
    const int slot = tile_slot<RT>(i), row = row0 + tile_row<RT>(i);
    if (slot < M && row < N) {
      const T gv = static_cast<T>(warp_sum<WK, NT, RT>(flat, 0, i));
      const T uv = static_cast<T>(warp_sum<WK, NT, RT>(flat, WK, i));
      y[(size_t)slot * N + row] = act(gv, uv);
    }
  }
}

// MoE: P (token, expert) pairs; pair p multiplies x row p / X_DIV by expert
// idx[p]: y[p, N] = x[p / X_DIV, K] @ dequant(w[idx[p], N, K]).T.
// Block (u, tile) finds the u-th active expert (ascending id, from a bitmap
// of idx in shared memory: no sort, no host sync), gathers that expert's
// pairs in ascending p, and runs the dense core over them in batches of
// 8 * NT tokens: each active expert's rows stream once per batch, whatever
// the number of pairs routed to it. A pair's arithmetic does not depend on
// its batch or slot (batch invariance as in the dense kernel).
constexpr int kMaxExperts = 1024;
constexpr int kMaxPairs = 1024;

// Block-wide, NW warps: the u-th active expert of idx[0 .. P) in ascending id,
// from a bitmap of idx in shared memory (no sort, no host sync), or -1 when
// fewer are active (block-uniform); its pairs in ascending p into pairs[0 ..
// count), by ballots per warp and warp totals in order, so the list is the
// same whatever the block's timing. Ids >= E (invalid input) mark nothing:
// their pairs are never computed, and never written out of bounds.
template <int NW>
__device__ __forceinline__ int active_expert(const uint32_t* idx, int P, int E, int u, int* pairs, int& count_out) {
  __shared__ uint32_t active[kMaxExperts / 32];
  __shared__ int count;
  __shared__ int expert;
  __shared__ int warp_counts[NW];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < kMaxExperts / 32; i += NW * 32) active[i] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += NW * 32)
    if (idx[p] < (uint32_t)E) atomicOr(&active[idx[p] >> 5], 1u << (idx[p] & 31));
  __syncthreads();
  if (threadIdx.x == 0) {
    // The u-th set bit: a scan over at most 32 words.
    int e = -1, seen = 0;
    for (int i = 0; i < (E + 31) / 32 && e < 0; ++i) {
      const int n = __popc(active[i]);
      if (seen + n > u) {
        uint32_t bits = active[i];
        for (int k = 0; k < u - seen; ++k) bits &= bits - 1;
        e = 32 * i + __ffs(bits) - 1;
      }
      seen += n;
    }
    expert = e;
    count = 0;
  }
  __syncthreads();
  const int e = expert;
  if (e < 0) return -1;
  for (int base = 0; base < P; base += NW * 32) {
    const int p = base + threadIdx.x;
    const bool mine = p < P && (int)idx[p] == e;
    const uint32_t ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int offset = count;
    for (int j = 0; j < warp; ++j) offset += warp_counts[j];
    if (mine) pairs[offset + __popc(ballot & ((1u << lane) - 1u))] = p;
    __syncthreads();
    if (threadIdx.x == 0) {
      int total = 0;
      for (int j = 0; j < NW; ++j) total += warp_counts[j];
      count += total;
    }
    __syncthreads();
  }
  count_out = count;
  return e;
}

// Expert e's slice of a stacked (E, N, K) weight.
template <int MODE, int BITS, int G, typename TS>
struct ExpertWeights {
  const uint32_t* w;
  const TS* scales;
  const TS* biases;
  __device__ __forceinline__ ExpertWeights(const uint32_t* w_all, const TS* s_all, const TS* b_all, int e, int N,
                                           int K)
      : w(w_all + (size_t)e * N * ((size_t)K / 32 * BITS)),
        scales(s_all + (size_t)e * N * (K / G)),
        biases(MODE == QC_AFFINE ? b_all + (size_t)e * N * (K / G) : b_all) {}
};

template <typename T, typename TS, int MODE, int BITS, int G, int WK, int NT, int RT, bool FAST4, int DEPTH, bool LEAN>
__device__ void splitk_gather_qmm(const T* x, const uint32_t* w, const TS* scales, const TS* biases,
                                  const uint32_t* idx, T* y, int P, int E, int N, int K, int x_div) {
  __shared__ int pairs[kMaxPairs];
  const int g = (threadIdx.x & 31) >> 2;
  const int tiles = (N + 16 * RT - 1) / (16 * RT);
  const int row0 = (blockIdx.x % tiles) * 16 * RT;
  int count;
  const int e = active_expert<WK>(idx, P, E, blockIdx.x / tiles, pairs, count);
  if (e < 0) return;  // fewer active experts than this block's slot (block-uniform)
  const ExpertWeights<MODE, BITS, G, TS> we(w, scales, biases, e, N, K);
  int rows[RT][2];
  lane_rows<RT>(rows, row0, N);
  for (int b0 = 0; b0 < count; b0 += 8 * NT) {
    const int n = min(8 * NT, count - b0);
    float acc[NT][RT][2][4];
    accumulate<T, TS, MODE, BITS, G, WK, NT, RT, FAST4, DEPTH, LEAN>(
        acc, x, we.w, we.scales, we.biases, rows, K, [&](int t) { return pairs[b0 + min(t * 8 + g, n - 1)] / x_div; },
        threadIdx.x >> 5);
    reduce_store<WK, NT, RT>(acc, [&](int slot, int roff, float v) {
      const int row = row0 + roff;
      if (slot < n && row < N) y[(size_t)pairs[b0 + slot] * N + row] = static_cast<T>(v);
    });
  }
}

// MoE gate/up with the activation fused (SwitchGLU): y[p, N] = act(g, u) for
// pair p's g and u of expert idx[p] (wg, wu: (E, N, K) each), each rounded to
// T first. As splitk_qmm_glu over splitk_gather_qmm: a block of 2 * WK warps
// owns one row tile of its expert's gate and up rows (warps 0..WK-1 the gate,
// WK..2WK-1 the up), each set with the grouped kernel's K split and
// reduction order, so g and u are bit for bit splitk_gather_qmm's outputs.
template <typename T, typename TS, int MODE, int BITS, int G, int WK, int NT, int RT, bool FAST4, int DEPTH, bool LEAN,
          typename Act>
__device__ void splitk_gather_qmm_glu(const T* x, const uint32_t* wg, const TS* sg, const TS* bg, const uint32_t* wu,
                                      const TS* su, const TS* bu, const uint32_t* idx, T* y, int P, int E, int N,
                                      int K, int x_div, Act act) {
  __shared__ int pairs[kMaxPairs];
  const int g = (threadIdx.x & 31) >> 2;
  const bool up = (threadIdx.x >> 5) >= WK;  // warp-uniform
  const int tiles = (N + 16 * RT - 1) / (16 * RT);
  const int row0 = (blockIdx.x % tiles) * 16 * RT;
  int count;
  const int e = active_expert<2 * WK>(idx, P, E, blockIdx.x / tiles, pairs, count);
  if (e < 0) return;
  const ExpertWeights<MODE, BITS, G, TS> we(up ? wu : wg, up ? su : sg, up ? bu : bg, e, N, K);
  int rows[RT][2];
  lane_rows<RT>(rows, row0, N);
  SPLITK_SHARED_PARTIALS(partial);  // [2][WK][NT][RT][32 lanes]: the gate's warps, then the up's
  const float* flat = reinterpret_cast<const float*>(partial);
  for (int b0 = 0; b0 < count; b0 += 8 * NT) {
    const int n = min(8 * NT, count - b0);
    float acc[NT][RT][2][4];
    accumulate<T, TS, MODE, BITS, G, WK, NT, RT, FAST4, DEPTH, LEAN>(
        acc, x, we.w, we.scales, we.biases, rows, K, [&](int t) { return pairs[b0 + min(t * 8 + g, n - 1)] / x_div; },
        (threadIdx.x >> 5) - (up ? WK : 0));
    write_partials<NT, RT>(partial, acc);
    __syncthreads();
    for (int i = threadIdx.x; i < NT * RT * 128; i += 2 * WK * 32) {
      const int slot = tile_slot<RT>(i), row = row0 + tile_row<RT>(i);
      if (slot < n && row < N) {
        const T gv = static_cast<T>(warp_sum<WK, NT, RT>(flat, 0, i));
        const T uv = static_cast<T>(warp_sum<WK, NT, RT>(flat, WK, i));
        y[(size_t)pairs[b0 + slot] * N + row] = act(gv, uv);
      }
    }
    __syncthreads();  // the next batch writes the partials again
  }
}
