// Run-time SIMD dispatch and the OpenMP work split for the n-way merge.
//
// One source body (merge_body.inc) is compiled three times, each inside its
// own internal namespace and `#pragma GCC target` region, so a single build
// runs on any x86-64 CPU: the AVX-512 copy is only ever called after the CPU
// said it has AVX-512F (it never dies with an illegal instruction elsewhere).
#include "merge.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>

#include <omp.h>

#include "dtype.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SOUPKERNELS_X86 1
#include <immintrin.h>
#endif

namespace soupkernels {
namespace {

namespace isa_scalar {
#include "simd_scalar.inc"
#include "merge_body.inc"
}  // namespace isa_scalar

#if SOUPKERNELS_X86
// clang ignores `#pragma GCC target`; it has its own form. (Only GCC builds
// are exercised here: the project's machines have no clang.)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace isa_avx2 {
#include "simd_avx2.inc"
#include "merge_body.inc"
}  // namespace isa_avx2
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif
namespace isa_avx512 {
#include "simd_avx512.inc"
#include "merge_body.inc"
}  // namespace isa_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

using RangeFn = void (*)(const MergeArgs&, int64_t, int64_t, int64_t);

Simd detect() {
#if SOUPKERNELS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Simd::kAVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Simd::kAVX2;
#endif
  return Simd::kScalar;
}

std::atomic<int> g_active{-1};

RangeFn range_fn(Simd s) {
  switch (s) {
#if SOUPKERNELS_X86
    case Simd::kAVX512: return &isa_avx512::merge_range;
    case Simd::kAVX2: return &isa_avx2::merge_range;
#endif
    default: return &isa_scalar::merge_range;
  }
}


// Below this many elements per thread, waking another thread costs more than
// the bandwidth it adds.
constexpr int64_t kMinPerThread = 1 << 16;
// Thread boundaries fall on multiples of this many elements of the
// concatenated tensors: whole cache lines within one tensor (lines shared at
// tensor boundaries cost a little sharing, never correctness).
constexpr int64_t kGrain = 64;

}  // namespace

Simd best_simd() {
  static const Simd best = detect();
  return best;
}

Simd active_simd() {
  int a = g_active.load(std::memory_order_relaxed);
  return a < 0 ? best_simd() : static_cast<Simd>(a);
}

void set_active_simd(Simd level) {
  if (static_cast<int>(level) > static_cast<int>(best_simd()))
    throw std::invalid_argument(std::string("SIMD level '") + simd_name(level) +
                                "' is not supported by this CPU (best: " + simd_name(best_simd()) + ")");
  g_active.store(static_cast<int>(level), std::memory_order_relaxed);
}

const char* simd_name(Simd level) {
  switch (level) {
    case Simd::kAVX512: return "avx512";
    case Simd::kAVX2: return "avx2";
    default: return "scalar";
  }
}

void merge_many(const MergeArgs& a, int num_threads) {
  if (a.n < 1) throw std::invalid_argument("merge needs at least one input");
  if (!dtype_valid(a.out_dtype)) throw std::invalid_argument("bad output dtype code");
  for (int k = 0; k < a.n; ++k)
    if (!dtype_valid(a.in_dtypes[k])) throw std::invalid_argument("bad input dtype code");

  int64_t total = 0;
  for (int64_t t = 0; t < a.num_tensors; ++t) total += a.sizes[t];
  if (total == 0) return;

  const RangeFn fn = range_fn(active_simd());
  int max_threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t useful = std::max<int64_t>(1, total / kMinPerThread);
  const int nt = static_cast<int>(std::min<int64_t>(max_threads, useful));

  // Split the concatenation of all tensors into nt equal, grain-aligned
  // pieces; each thread walks the tensors its piece covers.
  auto run_piece = [&](int64_t gbegin, int64_t gend) {
    int64_t off = 0;
    for (int64_t t = 0; t < a.num_tensors && off < gend; ++t) {
      const int64_t lo = std::max(gbegin, off), hi = std::min(gend, off + a.sizes[t]);
      if (lo < hi) fn(a, t, lo - off, hi - off);
      off += a.sizes[t];
    }
  };
  if (nt <= 1) {
    run_piece(0, total);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    const int id = omp_get_thread_num(), cnt = omp_get_num_threads();
    const int64_t per = ((total + cnt - 1) / cnt + kGrain - 1) / kGrain * kGrain;
    const int64_t b = std::min(total, per * id), e = std::min(total, per * (id + 1));
    if (b < e) run_piece(b, e);
  }
}

}  // namespace soupkernels
