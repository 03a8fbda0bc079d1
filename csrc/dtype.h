// Element types shared by the CPU kernels, and exact scalar conversions.
//
// The scalar conversions are the reference for the SIMD paths: bf16 and fp16
// are produced with round-to-nearest-even, NaN stays NaN, overflow goes to
// inf, fp16 subnormals are exact. They rely on IEEE float addition, so this
// code must never be compiled with -ffast-math.
#pragma once

#include <cstdint>
#include <cstring>

namespace soupkernels {

// Codes used across the Python boundary (soupkernels/_dtypes.py mirrors them).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline int dtype_size(int dt) { return dt == kF32 ? 4 : 2; }
inline bool dtype_valid(int dt) { return dt == kF32 || dt == kBF16 || dt == kF16; }

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

// Same rule as torch's c10::BFloat16: NaN -> 0x7FC0, otherwise RNE on bit 16.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in fp32
    const float mag = float(man) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_f32(sign | 0x7F800000u | (man << 13));
  return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  if (u >= (143u << 23)) {  // |f| >= 65536 (or inf/nan): inf, or a quiet NaN
    return uint16_t(sign | (u > 0x7F800000u ? 0x7E00u : 0x7C00u));
  }
  if (u < (113u << 23)) {  // result is an fp16 subnormal or zero
    // Adding 0.5 puts the fp16 subnormal unit (2^-24) at the last mantissa bit
    // of the fp32 sum, so the FPU's own RNE does the rounding.
    const float sum = bits_f32(u) + 0.5f;
    return uint16_t(sign | (f32_bits(sum) - 0x3F000000u));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to
  // nearest even; a mantissa carry correctly bumps the exponent (to inf at top).
  u += (uint32_t(15 - 127) << 23) + 0xFFFu + ((u >> 13) & 1u);
  return uint16_t(sign | (u >> 13));
}

}  // namespace soupkernels
