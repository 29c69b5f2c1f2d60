// Copyright © 2026 mtp_splitk contributors
//
// The Gated DeltaNet recurrence (Qwen3-Next, Qwen3.5) over T rows in one launch,
// through mx.fast.cuda_kernel. mlx-lm runs it on CUDA as a Python loop of
// compiled elementwise ops and reductions per row (gated_delta_ops), several
// kernels a row and layer; a verify pass of k+1 rows repeats them k+1 times.
//
// For each row t, head h (scalar gate g, beta), value row i of the state S (Dk wide):
//   S_i  *= g
//   kv    = S_i . k
//   S_i  += k * (v_i - kv) * beta
//   y_i   = S_i . q
// the arithmetic of mlx-lm's _gated_delta_step_ops, in float32, with q and k
// of key head h / (Hv / Hk) (mlx-lm repeats them).
//
// Shape of the work: one warp per (batch, head, value row); lane l holds the
// DK / 32 consecutive state entries from DK / 32 * l in registers for all T
// rows and reduces the two dot products with shuffles in a fixed order. Rows
// of the state never interact, so a row's results do not depend on the batch,
// and a launch of T rows computes, bit for bit, what T launches of one row do:
// the state goes through memory in float32 between launches, exactly.
//
// Outputs: y [B, T, Hv, Dv] in the activation type, and the states after each
// row, [T, B, Hv, Dv, Dk] (STATES = T: a verify pass keeps every candidate), or
// after the last row only (STATES = 1: a decode step).

template <typename T>
__device__ __forceinline__ float gd_float(T v) { return static_cast<float>(v); }

template <int N, typename T>
__device__ __forceinline__ void gd_load(float* dst, const T* src) {
#pragma unroll
  for (int j = 0; j < N; ++j) dst[j] = gd_float(src[j]);
}

__device__ __forceinline__ float gd_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// WARPS value rows per block; grid: B * Hv * Dv / WARPS blocks (Dv % WARPS == 0).
template <typename T, typename TB, int DK, int WARPS, bool ALL_STATES>
__device__ __forceinline__ void gated_delta_rows(const T* q, const T* k, const T* v, const float* g,
                                                 const TB* beta, const float* state, T* y, float* states,
                                                 int B, int Tn, int Hk, int Hv, int Dv) {
  constexpr int PER = DK / 32;
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS + (threadIdx.x >> 5);  // (b, h, i) flattened
  if (row >= B * Hv * Dv) return;
  const int i = row % Dv;
  const int h = (row / Dv) % Hv;
  const int b = row / (Dv * Hv);
  const int hk = h / (Hv / Hk);
  float s[PER];
  const size_t state_row = (size_t)row * DK + PER * lane;  // [B, Hv, Dv, Dk]
#pragma unroll
  for (int j = 0; j < PER; ++j) s[j] = state[state_row + j];
  for (int t = 0; t < Tn; ++t) {
    const size_t bt = (size_t)b * Tn + t;
    float kk[PER], qq[PER];
    gd_load<PER>(kk, k + (bt * Hk + hk) * DK + PER * lane);
    gd_load<PER>(qq, q + (bt * Hk + hk) * DK + PER * lane);
    const float decay = g[bt * Hv + h];
    const float bet = gd_float(beta[bt * Hv + h]);
    const float vi = gd_float(v[(bt * Hv + h) * Dv + i]);
    float kv = 0.f;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      s[j] = s[j] * decay;
      kv += s[j] * kk[j];
    }
    kv = gd_warp_sum(kv);
    const float delta = (vi - kv) * bet;
    float out = 0.f;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      s[j] = s[j] + kk[j] * delta;
      out += s[j] * qq[j];
    }
    out = gd_warp_sum(out);
    if (lane == 0) y[(bt * Hv + h) * Dv + i] = static_cast<T>(out);
    if (ALL_STATES || t == Tn - 1) {
      float* dst = states + (ALL_STATES ? (size_t)t * B * Hv * Dv * DK : 0) + state_row;
#pragma unroll
      for (int j = 0; j < PER; ++j) dst[j] = s[j];
    }
  }
}
