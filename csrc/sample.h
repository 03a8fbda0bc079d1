// Guided sampling on the CPU: combine M models' logits per row, apply
// temperature / top-k / top-p / min-p as transformers' warpers do, and draw
// one token per row by inverse CDF with a Philox uniform keyed by
// (seed, offset). Semantics: DESIGN.md and soupkernels/sampling_reference.py.
#pragma once

#include <cstdint>

namespace soupkernels {

constexpr int kMaxSampleInputs = 16;

struct SampleArgs {
  const void* const* ins;      // [M] base of input m: rows of V elements
  const int* in_dtypes;        // [M] DType codes
  const int64_t* row_strides;  // [M] elements from one row to the next
  int M;
  int64_t B, V;
  const float* coeffs;         // [B * M], row b's coefficients at b * M
  const float* temperature;    // [B]; 0 = greedy
  const int64_t* top_k;        // [B]; <= 0 or >= V = off
  const float* top_p;          // [B]; >= 1 = off
  const float* min_p;          // [B]; <= 0 = off
  const int64_t* seed;         // [B]
  const int64_t* offset;       // [B]
  int64_t* tokens;             // [B] out; -1 for a row with NaN, +inf, or all -inf
  float* logprobs;             // [B] out (may be null)
};

// Rows in parallel (OpenMP); small batches split each row's vocabulary
// across threads instead.
void guided_sample(const SampleArgs& a, int num_threads);

// out[b * V + v] = sum_m coeffs[b, m] * in_m[b, v] in fp32 (no sampling).
void guided_logits(const SampleArgs& a, float* out, int num_threads);

}  // namespace soupkernels
