// n-way weighted sum on the CPU: out[t] = sum_k coeffs[k] * in[t][k] for a
// table of T same-dtype tensors, fp32 accumulation, OpenMP across cores and a
// SIMD inner loop chosen at run time.
#pragma once

#include <cstdint>
#include <string>

namespace soupkernels {

struct MergeArgs {
  void* const* out_ptrs;        // [T]
  const void* const* in_ptrs;   // [T * n], row t holds tensor t's n inputs
  const int64_t* sizes;         // [T] elements per tensor
  int64_t num_tensors;          // T
  const int* in_dtypes;         // [n] DType of input k (same for every t)
  const float* coeffs;          // [n]
  int n;
  int out_dtype;
  bool nontemporal;             // streaming stores for the output
};

enum class Simd : int { kScalar = 0, kAVX2 = 1, kAVX512 = 2 };

Simd best_simd();                 // what this CPU and OS support
Simd active_simd();               // what merge() will use
void set_active_simd(Simd level);  // throws std::invalid_argument if unsupported
const char* simd_name(Simd level);

// Runs the merge with up to num_threads OpenMP threads (0 = all).
void merge_many(const MergeArgs& args, int num_threads);

}  // namespace soupkernels
