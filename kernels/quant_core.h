// Copyright © 2026 mtp_splitk contributors
//
// The dequantization core shared by the CUDA and Metal split-K kernels.
//
// Written in the subset of C++ that both CUDA C++ and the Metal Shading Language
// accept; the backend file defines, before including this text:
//   QC_FN        function qualifiers (__device__ __forceinline__ | inline)
//   QC_THREAD    address space of per-thread arrays ("" | thread)
//   qc_u32       a 32-bit unsigned type
//   qc_bits_to_float(u), qc_half_bits_to_float(u)   bit casts
//
// Layout facts (checked against mx.dequantize on the CPU): every mode packs its
// codes little-endian from bit 0 of uint32 words, as one continuous bit stream
// per weight row (so 3-, 5- and 6-bit codes straddle words). A lane always owns
// 32 consecutive codes of a row, i.e. exactly BITS words.
//
// Modes: 0 affine (w = scale * q + bias), 1 mxfp4 (E2M1 codes, E8M0 scale per
// 32), 2 mxfp8 (E4M3 codes, E8M0 scale per 32), 3 nvfp4 (E2M1 codes, E4M3
// scale per 16).

#define QC_AFFINE 0
#define QC_MXFP4 1
#define QC_MXFP8 2
#define QC_NVFP4 3

// Code i (0..31) of a lane's 32-code run held in BITS words.
template <int BITS>
QC_FN qc_u32 qc_code(QC_THREAD const qc_u32* words, int i) {
  const int bit = i * BITS;
  const int word = bit >> 5;
  const int shift = bit & 31;
  qc_u32 v = words[word] >> shift;
  if (shift + BITS > 32) {
    v |= words[word + 1] << (32 - shift);
  }
  return v & ((1u << BITS) - 1u);
}

// An exact small integer to float without the int->float converter (which
// runs at a quarter of the FMA rate): 2^23 + q has q in its mantissa.
QC_FN float qc_int_to_float(qc_u32 q) {
  return qc_bits_to_float(0x4B000000u | q) - 8388608.0f;
}

// E2M1 (sign, 2 exponent bits, 1 mantissa bit, bias 1) through half precision:
// the 3 magnitude bits land on the half's low exponent bits and top mantissa
// bit, and 2^14 corrects the bias. Exact, subnormal 0.5 included.
QC_FN float qc_e2m1_to_float(qc_u32 q) {
  return qc_half_bits_to_float(((q & 8u) << 12) | ((q & 7u) << 9)) * 16384.0f;
}

// E4M3 (bias 7, subnormals) through half precision in the same way.
QC_FN float qc_e4m3_to_float(qc_u32 q) {
  return qc_half_bits_to_float(((q & 0x80u) << 8) | ((q & 0x7Fu) << 7)) * 256.0f;
}

// E8M0: a bare biased exponent, 2^(e - 127).
QC_FN float qc_e8m0_to_float(qc_u32 e) {
  return e == 0u ? 5.877471754111438e-39f : qc_bits_to_float(e << 23);
}

// Dequantize code i of a run with its group's (scale, bias); for the fp modes
// `scale` is already decoded and `bias` is unused.
template <int MODE, int BITS>
QC_FN float qc_dequant(QC_THREAD const qc_u32* words, int i, float scale, float bias) {
  const qc_u32 q = qc_code<BITS>(words, i);
  if (MODE == QC_AFFINE) {
    return fma(scale, qc_int_to_float(q), bias);  // one rounding, as on every backend
  } else if (MODE == QC_MXFP8) {
    return qc_e4m3_to_float(q) * scale;
  } else {
    return qc_e2m1_to_float(q) * scale;
  }
}

// Decode a stored group scale (uint8 code for the fp modes).
template <int MODE>
QC_FN float qc_decode_scale(qc_u32 code) {
  return MODE == QC_NVFP4 ? qc_e4m3_to_float(code) : qc_e8m0_to_float(code);
}
