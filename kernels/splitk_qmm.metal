// Copyright © 2026 mtp_splitk contributors
//
// Split-K quantized matmul for small M on Apple GPUs: the Metal mirror of
// splitk_qmm.cu, launched through mx.fast.metal_kernel (mtp_splitk/launch_metal.py).
// y[M, N] = x[M, K] @ dequant(w[N, K]).T
//
// NOT RUN ON AN APPLE GPU, nor compiled by Apple's Metal compiler. It has
// been compiled and executed only as C++20 on a Linux CPU, through
// tests/metal_shim/ (one std::thread per lane, std::barrier for
// threadgroup_barrier and the simd exchanges), also under Thread- and
// AddressSanitizer; see tests/test_metal.py.
//
// The work is split as in the CUDA kernel:
//   * a threadgroup owns 16 * RT weight rows and has WK simdgroups of 32
//     lanes; simdgroup j takes K chunks j, j+WK, j+2WK, ... of 128;
//   * lane (g = lane/4, c = lane%4) owns the 32 consecutive codes at
//     k0 = 128*chunk + 32c of rows g and g+8 of each row tile (rows past N
//     load row N-1 and are never stored; a run past K is zeros, as load_run);
//   * the WK partial sums meet in threadgroup memory and are added in
//     simdgroup order 0..WK-1 by one thread per output: a fixed order, no
//     atomics on outputs, one MLX primitive per matmul.
// What differs: Apple GPUs have no mma.sync, so a lane dequantizes its runs
// to float once per chunk and takes a float FMA dot product with each token's
// 32 activations (weights stay in float; the CUDA kernel rounds them to T for
// the MMA). The 4 lanes c = 0..3 of a row then combine their dots with
// simd_shuffle_xor by 2 and then by 1, so every output of a chunk is
//     (dot_c0 + dot_c2) + (dot_c1 + dot_c3)
// on all four lanes (float addition is commutative bit for bit), and lane c
// keeps the tokens j with j % 4 == c. Chunks are added into that running sum
// in ascending order. Nothing here depends on M beyond how many tokens are
// computed, and a token's arithmetic never depends on the others: a row's
// result is bit-identical whatever the other rows of the call are.
//
// Metal is C++14 without lambdas, so the per-kernel row and store rules are
// small functor structs; and threadgroup memory must be declared in the
// kernel function, so the launcher's kernel body declares it and passes it in.

#include <metal_stdlib>
using namespace metal;

#define QC_FN inline
#define QC_THREAD thread
typedef uint qc_u32;
inline float qc_bits_to_float(uint u) { return as_type<float>(u); }
inline float qc_half_bits_to_float(uint u) { return float(as_type<half>(ushort(u))); }

// (quant_core.h is pasted here by the launcher)
#include "quant_core.h"

// One lane's raw share of a chunk for one weight row: BITS words of codes and
// its group parameters (nvfp4 has two groups of 16 in a run of 32).
template <int BITS>
struct RowRun {
  uint words[BITS];
  float scale[2];
  float bias[2];
};

template <int BITS>
inline void load_words(thread uint* dst, const device uint* src) {
  // A run starts at word (row * K/32 + k0/32) * BITS, so 16-byte loads are
  // aligned whenever BITS % 4 == 0 and 8-byte loads whenever BITS % 2 == 0.
  if (BITS % 4 == 0) {
    for (int i = 0; i < BITS / 4; ++i) {
      const uint4 v = reinterpret_cast<const device uint4*>(src)[i];
      dst[4 * i] = v.x;
      dst[4 * i + 1] = v.y;
      dst[4 * i + 2] = v.z;
      dst[4 * i + 3] = v.w;
    }
  } else if (BITS % 2 == 0) {
    for (int i = 0; i < BITS / 2; ++i) {
      const uint2 v = reinterpret_cast<const device uint2*>(src)[i];
      dst[2 * i] = v.x;
      dst[2 * i + 1] = v.y;
    }
  } else {
    for (int i = 0; i < BITS; ++i) dst[i] = src[i];
  }
}

// SP / BP: pointers to the scales and biases, deduced because MLX passes an
// input of fewer than 8 elements in the constant address space, not device.
// Every scale goes through float once (uint8 codes are exact in float), so
// both branches compile for every scale type (MSL has no if constexpr).
template <int MODE, int BITS, int G, typename SP, typename BP>
inline void load_run(thread RowRun<BITS>& r, const device uint* w, SP scales, BP biases, int row, int k0, int K) {
  if (k0 >= K) {  // past the end of K (K % 128 != 0): contributes exact zeros
    for (int i = 0; i < BITS; ++i) r.words[i] = 0;
    r.scale[0] = r.scale[1] = r.bias[0] = r.bias[1] = 0.f;
    return;
  }
  load_words<BITS>(r.words, w + size_t(row) * (K / 32 * BITS) + k0 / 32 * BITS);
  const size_t gi = size_t(row) * (K / G) + k0 / G;
  if (MODE == QC_AFFINE) {
    r.scale[0] = r.scale[1] = float(scales[gi]);
    r.bias[0] = r.bias[1] = float(biases[gi]);
  } else {
    r.scale[0] = qc_decode_scale<MODE>(uint(float(scales[gi])));
    r.scale[1] = G == 16 ? qc_decode_scale<MODE>(uint(float(scales[gi + 1]))) : r.scale[0];
    r.bias[0] = r.bias[1] = 0.f;
  }
}

// The run's 32 weights in float, in K order.
template <int MODE, int BITS, int G>
inline void dequant_run(thread float* wf, thread const RowRun<BITS>& r) {
#pragma clang loop unroll(full)
  for (int i = 0; i < 32; ++i) {
    const int h = G == 16 ? i / 16 : 0;
    wf[i] = qc_dequant<MODE, BITS>(r.words, i, r.scale[h], r.bias[h]);
  }
}

// The x row of token j (j < the call's token count) for the dense kernel;
// the clamp is a guard only (tokens past M are never computed).
struct DenseRows {
  int M;
  int operator()(int j) const { return min(j, M - 1); }
};

// The K loop of one threadgroup: acc[q][r][h] of lane c receives token
// 4q + c times row (16r + g + 8h) of the tile. RT row tiles share each
// token's activations. `tokens` (threadgroup-uniform) bounds the token loop.
template <typename T, int MODE, int BITS, int G, int WK, int NT, int RT, int DEPTH, typename SP, typename BP,
          typename XRow>
inline void accumulate(thread float (&acc)[2 * NT][RT][2], const device T* x, const device uint* w, SP scales,
                       BP biases, thread const int (&rows)[RT][2], int K, int tokens, XRow xrow, uint sg,
                       uint lane) {
  const int CHUNKS = (K + 127) / 128;
  const int c = lane & 3;
  // The per-lane arrays are indexed by loops of compile-time trip count,
  // marked for full unrolling so that they can live in registers (whether
  // Metal's compiler keeps them there is unmeasured).
#pragma clang loop unroll(full)
  for (int q = 0; q < 2 * NT; ++q)
#pragma clang loop unroll(full)
    for (int r = 0; r < RT; ++r) acc[q][r][0] = acc[q][r][1] = 0.f;

  // A ring of DEPTH chunks of raw words: chunk i+DEPTH's loads are issued
  // while chunk i is dequantized and multiplied (as in the CUDA kernel).
  RowRun<BITS> ring[DEPTH][RT][2];
#pragma clang loop unroll(full)
  for (int d = 0; d < DEPTH; ++d) {
    const int chunk = int(sg) + d * WK;
    if (chunk < CHUNKS) {
      for (int r = 0; r < RT; ++r)
        for (int h = 0; h < 2; ++h)
          load_run<MODE, BITS, G>(ring[d][r][h], w, scales, biases, rows[r][h], chunk * 128 + 32 * c, K);
    }
  }
  for (int base = int(sg); base < CHUNKS; base += DEPTH * WK) {
#pragma clang loop unroll(full)
    for (int d = 0; d < DEPTH; ++d) {
      const int chunk = base + d * WK;
      if (chunk >= CHUNKS) break;  // simdgroup-uniform
      const int k0 = chunk * 128 + 32 * c;
      const bool valid = k0 < K;  // lanes past K read no x and add exact zeros
      float wf[RT][2][32];
      for (int r = 0; r < RT; ++r)
        for (int h = 0; h < 2; ++h) dequant_run<MODE, BITS, G>(wf[r][h], ring[d][r][h]);
      const int refill = chunk + DEPTH * WK;
      if (refill < CHUNKS) {
        for (int r = 0; r < RT; ++r)
          for (int h = 0; h < 2; ++h)
            load_run<MODE, BITS, G>(ring[d][r][h], w, scales, biases, rows[r][h], refill * 128 + 32 * c, K);
      }
#pragma clang loop unroll(full)
      for (int q = 0; q < 2 * NT; ++q) {
#pragma clang loop unroll(full)
        for (int cc = 0; cc < 4; ++cc) {
          const int j = 4 * q + cc;
          if (j >= tokens) break;  // threadgroup-uniform: the shuffles below stay converged
          float xv[32];
          if (valid) {
            const device T* xr = x + size_t(xrow(j)) * K + k0;
#pragma clang loop unroll(full)
            for (int i = 0; i < 32; ++i) xv[i] = float(xr[i]);
          } else {
            for (int i = 0; i < 32; ++i) xv[i] = 0.f;
          }
          for (int r = 0; r < RT; ++r)
            for (int h = 0; h < 2; ++h) {
              float dot = 0.f;
#pragma clang loop unroll(full)
              for (int i = 0; i < 32; ++i) dot = fma(wf[r][h][i], xv[i], dot);
              // Fixed order on every lane: (c0 + c2) + (c1 + c3).
              dot += simd_shuffle_xor(dot, ushort(2));
              dot += simd_shuffle_xor(dot, ushort(1));
              if (c == cc) acc[q][r][h] += dot;
            }
        }
      }
    }
  }
}

// Fixed-order reduction of the WK simdgroups' sums through threadgroup memory,
// one token tile (8 tokens) at a time so that `partial` needs only
// WK * RT * 128 floats (8 KB at WK = 8, RT = 2; Apple GPUs give a threadgroup
// 32 KB). store(slot, row_in_tile, value) writes one output (slot = token
// 0..8*NT-1). Ends with a barrier so the caller may reuse the memory.
template <int WK, int NT, int RT, typename Store>
inline void reduce_store(thread const float (&acc)[2 * NT][RT][2], threadgroup float* partial, int tokens,
                         Store store, uint sg, uint lane) {
  const int g = lane >> 2, c = lane & 3;
  const int tid = int(sg) * 32 + int(lane);
#pragma clang loop unroll(full)
  for (int t = 0; t < NT; ++t) {
    if (8 * t >= tokens) break;  // threadgroup-uniform
    // This lane holds tokens 8t + c (acc[2t]) and 8t + 4 + c (acc[2t + 1]).
    for (int qq = 0; qq < 2; ++qq)
      for (int r = 0; r < RT; ++r)
        for (int h = 0; h < 2; ++h)
          partial[(int(sg) * 8 + 4 * qq + c) * 16 * RT + 16 * r + 8 * h + g] = acc[2 * t + qq][r][h];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = tid; i < 8 * 16 * RT; i += WK * 32) {
      float sum = 0.f;
      for (int j = 0; j < WK; ++j) sum += partial[j * 8 * 16 * RT + i];
      store(8 * t + i / (16 * RT), i % (16 * RT), sum);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// Lane rows g and g + 8 of each row tile; rows past N load row N-1 (never
// stored) so the loads need no predicate.
template <int RT>
inline void lane_rows(thread int (&rows)[RT][2], int row0, int N, uint lane) {
  const int g = lane >> 2;
  for (int r = 0; r < RT; ++r) {
    rows[r][0] = min(row0 + 16 * r + g, N - 1);
    rows[r][1] = min(row0 + 16 * r + g + 8, N - 1);
  }
}

template <typename T>
struct DenseStore {
  device T* y;
  int M, N, row0;
  void operator()(int slot, int roff, float v) const {
    const int row = row0 + roff;
    if (slot < M && row < N) y[size_t(slot) * N + row] = static_cast<T>(v);
  }
};

// Dense: y[M, N] = x[M, K] @ dequant(w[N, K]).T. N and K are run-time values
// (one compiled variant serves every layer of a model). TS is the scales'
// element type (SP points to it); FAST4 selects the CUDA kernel's packed
// 4-bit dequant, which has no Metal counterpart, and is ignored here.
template <typename T, typename TS, int MODE, int BITS, int G, int WK, int NT, int RT, bool FAST4, int DEPTH,
          typename SP, typename BP>
inline void splitk_qmm(const device T* x, const device uint* w, SP scales, BP biases, device T* y, int M, int N,
                       int K, threadgroup float* partial, uint block, uint sg, uint lane) {
  const int row0 = int(block) * 16 * RT;
  int rows[RT][2];
  lane_rows<RT>(rows, row0, N, lane);
  const int tokens = min(M, 8 * NT);
  float acc[2 * NT][RT][2];
  DenseRows xrow = {M};
  accumulate<T, MODE, BITS, G, WK, NT, RT, DEPTH>(acc, x, w, scales, biases, rows, K, tokens, xrow, sg, lane);
  DenseStore<T> store = {y, M, N, row0};
  reduce_store<WK, NT, RT>(acc, partial, tokens, store, sg, lane);
}

// Fused projections: y_i[M, N_i] = x[M, K] @ dequant(w_i[N_i, K]).T for two or
// three weights of one K and quantization (q/k/v, or gate/up), in one launch,
// from the weight arrays as they are. The grid is the dense kernel's
// threadgroups for w_0, then w_1's, then w_2's (N_2 = 0: none); a threadgroup
// takes its weight by its index and runs the dense kernel with the same
// constants, so each output is bit for bit the dense kernel's for that weight.
// (The CUDA kernel selects pointers before one call; here each weight's scales
// may sit in another address space, so each has its own call.)
template <typename T, typename TS, int MODE, int BITS, int G, int WK, int NT, int RT, bool FAST4, int DEPTH,
          typename SP0, typename BP0, typename SP1, typename BP1, typename SP2, typename BP2>
inline void splitk_qmm_multi(const device T* x, int M, int K, const device uint* w0, SP0 s0, BP0 b0,
                             device T* y0, int N0, const device uint* w1, SP1 s1, BP1 b1, device T* y1, int N1,
                             const device uint* w2, SP2 s2, BP2 b2, device T* y2, int N2,
                             threadgroup float* partial, uint block, uint sg, uint lane) {
  const int tiles0 = (N0 + 16 * RT - 1) / (16 * RT);
  const int tiles1 = (N1 + 16 * RT - 1) / (16 * RT);
  const int tile = int(block);
  if (tile < tiles0) {
    splitk_qmm<T, TS, MODE, BITS, G, WK, NT, RT, FAST4, DEPTH>(x, w0, s0, b0, y0, M, N0, K, partial, uint(tile),
                                                               sg, lane);
  } else if (tile < tiles0 + tiles1) {
    splitk_qmm<T, TS, MODE, BITS, G, WK, NT, RT, FAST4, DEPTH>(x, w1, s1, b1, y1, M, N1, K, partial,
                                                               uint(tile - tiles0), sg, lane);
  } else {
    splitk_qmm<T, TS, MODE, BITS, G, WK, NT, RT, FAST4, DEPTH>(x, w2, s2, b2, y2, M, N2, K, partial,
                                                               uint(tile - tiles0 - tiles1), sg, lane);
  }
}

// MoE: P (token, expert) pairs; pair p multiplies x row p / XDIV by expert
// idx[p]: y[p, N] = x[p / XDIV, K] @ dequant(w[idx[p], N, K]).T.
// Threadgroup (u, tile) finds the u-th active expert (ascending id, from a
// bitmap of idx in threadgroup memory: no sort, no host sync), gathers that
// expert's pairs in ascending p, and runs the dense core over them in batches
// of 8 * NT tokens. A pair's arithmetic does not depend on its batch or slot.
static constant constexpr const int kMaxExperts = 1024;
static constant constexpr const int kMaxPairs = 1024;

struct GatherRows {
  const threadgroup int* pairs;  // this batch's pairs
  int n;
  int x_div;
  int operator()(int j) const { return pairs[min(j, n - 1)] / x_div; }
};

template <typename T>
struct GatherStore {
  device T* y;
  const threadgroup int* pairs;
  int n, N, row0;
  void operator()(int slot, int roff, float v) const {
    const int row = row0 + roff;
    if (slot < n && row < N) y[size_t(pairs[slot]) * N + row] = static_cast<T>(v);
  }
};

// Threadgroup memory (declared by the kernel body):
//   active[kMaxExperts / 32]  bitmap of the experts idx names
//   pairs[kMaxPairs]          the expert's pairs in ascending p
//   info[2 + WK]              pair count, expert, per-simdgroup counts
//   partial[WK * RT * 128]    reduce_store's partial sums
template <typename T, typename TS, int MODE, int BITS, int G, int WK, int NT, int RT, bool FAST4, int DEPTH,
          typename SP, typename BP, typename IP>
inline void splitk_gather_qmm(const device T* x, const device uint* w, SP scales, BP biases, IP idx, device T* y,
                              int P, int E, int N, int K, int x_div, threadgroup atomic_uint* active,
                              threadgroup int* pairs, threadgroup int* info, threadgroup float* partial,
                              uint block, uint sg, uint lane) {
  const int tid = int(sg) * 32 + int(lane);
  const int tiles = (N + 16 * RT - 1) / (16 * RT);
  const int u = int(block) / tiles;
  const int row0 = (int(block) % tiles) * 16 * RT;

  for (int i = tid; i < kMaxExperts / 32; i += WK * 32) atomic_store_explicit(&active[i], 0u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  // Ids >= E (invalid input) mark nothing: their pairs are never computed,
  // and never written out of bounds.
  for (int p = tid; p < P; p += WK * 32) {
    const uint e = idx[p];
    if (e < uint(E)) atomic_fetch_or_explicit(&active[e >> 5], 1u << (e & 31), memory_order_relaxed);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    // The u-th set bit: a scan over at most 32 words.
    int e = -1, seen = 0;
    for (int i = 0; i < (E + 31) / 32 && e < 0; ++i) {
      const uint word = atomic_load_explicit(&active[i], memory_order_relaxed);
      const int n = int(popcount(word));
      if (seen + n > u) {
        uint bits = word;
        for (int k = 0; k < u - seen; ++k) bits &= bits - 1;
        e = 32 * i + int(ctz(bits));
      }
      seen += n;
    }
    info[0] = 0;
    info[1] = e;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int e = info[1];
  if (e < 0) return;  // fewer active experts than u: nothing to do (threadgroup-uniform)

  // The expert's pairs in ascending p: a prefix count per simdgroup, the
  // simdgroup totals added in order, so the list does not depend on timing.
  for (int base = 0; base < P; base += WK * 32) {
    const int p = base + tid;
    const bool mine = p < P && idx[p] == uint(e);
    const uint rank = simd_prefix_exclusive_sum(uint(mine));
    const uint total = simd_sum(uint(mine));
    if (lane == 0) info[2 + sg] = int(total);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    int offset = info[0];
    for (int j = 0; j < int(sg); ++j) offset += info[2 + j];
    if (mine) pairs[offset + int(rank)] = p;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
      int sum = 0;
      for (int j = 0; j < WK; ++j) sum += info[2 + j];
      info[0] += sum;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  const int count = info[0];

  const size_t words_row = size_t(K) / 32 * BITS;
  const device uint* we = w + size_t(e) * N * words_row;
  const SP se = scales + size_t(e) * N * (K / G);
  const BP be = MODE == QC_AFFINE ? biases + size_t(e) * N * (K / G) : biases;
  int rows[RT][2];
  lane_rows<RT>(rows, row0, N, lane);
  for (int b0 = 0; b0 < count; b0 += 8 * NT) {
    const int n = min(8 * NT, count - b0);
    float acc[2 * NT][RT][2];
    GatherRows xrow = {pairs + b0, n, x_div};
    accumulate<T, MODE, BITS, G, WK, NT, RT, DEPTH>(acc, x, we, se, be, rows, K, n, xrow, sg, lane);
    GatherStore<T> store = {y, pairs + b0, n, N, row0};
    reduce_store<WK, NT, RT>(acc, partial, n, store, sg, lane);
  }
}
