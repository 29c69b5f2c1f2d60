// Copyright © 2026 mtp_splitk contributors
//
// bfloat16 for the CPU shims (tests/metal_shim, tests/cuda_shim): round-to-
// nearest-even from float, as MLX and both GPUs' conversions round.

#pragma once

#include <cstdint>
#include <cstring>

struct shim_bfloat16 {
  uint16_t bits;
  shim_bfloat16() = default;
  shim_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // quiet NaN
    } else {
      bits = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
static_assert(sizeof(shim_bfloat16) == 2);
