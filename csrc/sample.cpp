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
#include <mutex>
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

constexpr int64_t kSampleChunk = isa_scalar::kChunk;

template <class Fn>
void for_rows(int64_t B, int num_threads, Fn&& fn) {
  const int nt = threads_for(B, num_threads);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) fn(b);
}


template <class State, class RowFn>
void run_rows(const SampleArgs& a, int num_threads, RowFn&& row) {
  const int max_threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int64_t nc = (a.V + kSampleChunk - 1) / kSampleChunk;
  if (a.B >= max_threads || nc < 2 || max_threads < 2) {
    // Enough rows: one thread per row. Scratch rows live as long as the
    // (pooled) OpenMP thread: no page faults on fresh buffers at every call.
    const int nt = threads_for(a.B, max_threads);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t b = 0; b < a.B; ++b) {
      static thread_local State st;
      st.reserve(a.V, 1);
      row(b, st, 0, 1, [] {});
    }
    return;
  }
  // Fewer rows than threads: the whole team works on one row at a time,
  // chunk by chunk (rows of a large vocabulary at batch 1 are latency-bound).
  const int nt = static_cast<int>(std::min<int64_t>(max_threads, nc));
  static State shared_state;  // one team at a time: guarded below
  static std::mutex team_mutex;
  std::lock_guard<std::mutex> lock(team_mutex);
  shared_state.reserve(a.V, nt);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();
    for (int64_t b = 0; b < a.B; ++b) row(b, shared_state, tid, team, [] {
#pragma omp barrier
    });
  }
}

}  // namespace

void guided_sample(const SampleArgs& a, int num_threads) {
  check_args(a);
#if SOUPKERNELS_X86
  if (use_avx2()) {
    run_rows<isa_avx2::RowState>(a, num_threads, [&](int64_t b, isa_avx2::RowState& st, int tid, int nt, auto sync) {
      isa_avx2::sample_row_team(a, b, st, tid, nt, sync);
    });
    return;
  }
#endif
  run_rows<isa_scalar::RowState>(a, num_threads, [&](int64_t b, isa_scalar::RowState& st, int tid, int nt, auto sync) {
    isa_scalar::sample_row_team(a, b, st, tid, nt, sync);
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
