// Guided sampling on the CPU: run-time SIMD dispatch and the OpenMP split.
//
// sample_body.inc is compiled twice, as scalar and as AVX2+FMA+F16C, each in
// its own namespace (see merge.cpp for the pattern). CPUs with AVX-512 run
// the AVX2 copy: the sampler's passes after the first live in L2, where the
// wider vectors gain little, and a path no machine of ours can test is not
// shipped.
#include "sample.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include <omp.h>

#include "dtype.h"
#include "merge.h"
#include "philox.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SOUPKERNELS_X86 1
#include <immintrin.h>
#endif

namespace soupkernels {
namespace {

namespace isa_scalar {
#include "simd_scalar.inc"
#include "vmath_scalar.inc"
#include "sample_body.inc"
}  // namespace isa_scalar

#if SOUPKERNELS_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace isa_avx2 {
#include "simd_avx2.inc"
#include "vmath_avx2.inc"
#include "sample_body.inc"
}  // namespace isa_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

bool use_avx2() {
#if SOUPKERNELS_X86
  return active_simd() != Simd::kScalar;
#else
  return false;
#endif
}

void check_args(const SampleArgs& a) {
  if (a.M < 1 || a.M > kMaxSampleInputs)
    throw std::invalid_argument("guided sampling takes 1 to " + std::to_string(kMaxSampleInputs) + " inputs");
  if (a.B < 0 || a.V < 1) throw std::invalid_argument("need B >= 0 rows and V >= 1 columns");
  for (int m = 0; m < a.M; ++m)
    if (!dtype_valid(a.in_dtypes[m])) throw std::invalid_argument("bad input dtype code");
}

int threads_for(int64_t rows, int num_threads) {
  const int max_threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads, rows)));
}

template <class Fn>
void for_rows(int64_t B, int num_threads, Fn&& fn) {
  const int nt = threads_for(B, num_threads);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) fn(b);
}

}  // namespace

void guided_sample(const SampleArgs& a, int num_threads) {
  check_args(a);
  const bool avx2 = use_avx2();
  for_rows(a.B, num_threads, [&](int64_t b) {
    // Scratch rows live as long as the (pooled) OpenMP thread: no page
    // faults on a fresh 2 x V buffer at every call.
#if SOUPKERNELS_X86
    if (avx2) {
      static thread_local isa_avx2::Scratch sc;
      isa_avx2::sample_row(a, b, sc);
      return;
    }
#endif
    static thread_local isa_scalar::Scratch sc;
    isa_scalar::sample_row(a, b, sc);
  });
}

void guided_logits(const SampleArgs& a, float* out, int num_threads) {
  check_args(a);
  const bool avx2 = use_avx2();
  for_rows(a.B, num_threads, [&](int64_t b) {
#if SOUPKERNELS_X86
    if (avx2) return isa_avx2::logits_row(a, b, out);
#endif
    isa_scalar::logits_row(a, b, out);
  });
}

}  // namespace soupkernels
