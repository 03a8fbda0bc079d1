// Philox4x32-10 and its uniform float, bit for bit as Triton's tl.randint /
// tl.rand (triton/language/random.py) and soupkernels/philox.py compute them:
// the CPU sampler, the Triton sampler and the torch reference draw the same
// uniform for the same (seed, offset).
#pragma once

#include <cstdint>

namespace soupkernels {

inline uint32_t philox_uint32(uint64_t seed, uint64_t offset) {
  uint32_t c0 = uint32_t(offset), c1 = uint32_t(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p2 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p2 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p2);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Triton's uint_to_uniform_float: read as int32, negatives map to ~x, then
// float(x) * 4.6566127342e-10f in fp32 (in [0, 1)).
inline float philox_uniform(uint64_t seed, uint64_t offset) {
  int32_t x = static_cast<int32_t>(philox_uint32(seed, offset));
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

}  // namespace soupkernels
