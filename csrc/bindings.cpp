// pybind11 bindings: raw pointers (as Python ints), element counts and dtype
// codes in; no torch headers, so pip's isolated build needs no torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "merge.h"
#include "philox.h"
#include "sample.h"

namespace py = pybind11;
using namespace soupkernels;

namespace {

void merge_many_py(const std::vector<uintptr_t>& out_ptrs, int out_dtype,
                   const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes,
                   const std::vector<float>& coeffs, const std::vector<int64_t>& sizes,
                   bool nontemporal, int num_threads) {
  const size_t T = out_ptrs.size(), n = coeffs.size();
  if (n == 0) throw std::invalid_argument("coeffs must not be empty");
  if (in_dtypes.size() != n) throw std::invalid_argument("in_dtypes and coeffs differ in length");
  if (sizes.size() != T) throw std::invalid_argument("sizes and out_ptrs differ in length");
  if (in_ptrs.size() != T * n) throw std::invalid_argument("in_ptrs must hold len(out_ptrs) * len(coeffs) entries");
  for (int64_t s : sizes)
    if (s < 0) throw std::invalid_argument("sizes must be non-negative");
  std::vector<void*> outs(T);
  std::vector<const void*> ins(T * n);
  for (size_t i = 0; i < T; ++i) outs[i] = reinterpret_cast<void*>(out_ptrs[i]);
  for (size_t i = 0; i < T * n; ++i) ins[i] = reinterpret_cast<const void*>(in_ptrs[i]);
  MergeArgs a{outs.data(), ins.data(), sizes.data(), static_cast<int64_t>(T), in_dtypes.data(),
              coeffs.data(), static_cast<int>(n), out_dtype, nontemporal};
  py::gil_scoped_release release;
  merge_many(a, num_threads);
}

SampleArgs sample_args(const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes,
                       const std::vector<int64_t>& row_strides, int64_t B, int64_t V, uintptr_t coeffs,
                       uintptr_t temperature, uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seed,
                       uintptr_t offset, uintptr_t tokens, uintptr_t logprobs, std::vector<const void*>& ins) {
  const size_t M = in_ptrs.size();
  if (in_dtypes.size() != M || row_strides.size() != M)
    throw std::invalid_argument("in_ptrs, in_dtypes and row_strides differ in length");
  ins.resize(M);
  for (size_t m = 0; m < M; ++m) ins[m] = reinterpret_cast<const void*>(in_ptrs[m]);
  return SampleArgs{ins.data(), in_dtypes.data(), row_strides.data(), static_cast<int>(M), B, V,
                    reinterpret_cast<const float*>(coeffs), reinterpret_cast<const float*>(temperature),
                    reinterpret_cast<const int64_t*>(top_k), reinterpret_cast<const float*>(top_p),
                    reinterpret_cast<const float*>(min_p), reinterpret_cast<const int64_t*>(seed),
                    reinterpret_cast<const int64_t*>(offset), reinterpret_cast<int64_t*>(tokens),
                    reinterpret_cast<float*>(logprobs)};
}

// Returns the number of rows that got token -1 (NaN, +inf or all -inf).
int64_t guided_sample_py(const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes,
                         const std::vector<int64_t>& row_strides, int64_t B, int64_t V, uintptr_t coeffs,
                         uintptr_t temperature, uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seed,
                         uintptr_t offset, uintptr_t tokens, uintptr_t logprobs, int num_threads) {
  std::vector<const void*> ins;
  SampleArgs a = sample_args(in_ptrs, in_dtypes, row_strides, B, V, coeffs, temperature, top_k, top_p, min_p,
                             seed, offset, tokens, logprobs, ins);
  py::gil_scoped_release release;
  guided_sample(a, num_threads);
  int64_t invalid = 0;
  for (int64_t b = 0; b < B; ++b) invalid += a.tokens[b] < 0;
  return invalid;
}

void guided_logits_py(const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes,
                      const std::vector<int64_t>& row_strides, int64_t B, int64_t V, uintptr_t coeffs,
                      uintptr_t out, int num_threads) {
  std::vector<const void*> ins;
  SampleArgs a = sample_args(in_ptrs, in_dtypes, row_strides, B, V, coeffs, 0, 0, 0, 0, 0, 0, 0, 0, ins);
  py::gil_scoped_release release;
  guided_logits(a, reinterpret_cast<float*>(out), num_threads);
}

Simd parse_simd(const std::string& name) {
  if (name == "scalar") return Simd::kScalar;
  if (name == "avx2") return Simd::kAVX2;
  if (name == "avx512") return Simd::kAVX512;
  throw std::invalid_argument("unknown SIMD level '" + name + "' (expected scalar, avx2 or avx512)");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "soupkernels CPU kernels (C++17, OpenMP, run-time SIMD dispatch)";
  m.def("merge_many", &merge_many_py, py::arg("out_ptrs"), py::arg("out_dtype"), py::arg("in_ptrs"),
        py::arg("in_dtypes"), py::arg("coeffs"), py::arg("sizes"), py::arg("nontemporal") = false,
        py::arg("num_threads") = 0,
        "out[t] = sum_k coeffs[k] * in[t*n + k] over T tensors of one dtype signature.\n"
        "Pointers are addresses of contiguous buffers; dtype codes 0=f32, 1=bf16, 2=f16.");
  m.def("guided_sample", &guided_sample_py, py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("row_strides"),
        py::arg("B"), py::arg("V"), py::arg("coeffs"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("min_p"), py::arg("seed"), py::arg("offset"), py::arg("tokens"), py::arg("logprobs"),
        py::arg("num_threads") = 0,
        "One token per row from sum_m coeffs[b, m] * in_m[b] under temperature / top-k / top-p / min-p.\n"
        "Addresses of contiguous per-row buffers: coeffs f32 [B*M], temperature/top_p/min_p f32 [B],\n"
        "top_k/seed/offset/tokens i64 [B], logprobs f32 [B] or 0. Returns the number of rows given -1.");
  m.def("guided_logits", &guided_logits_py, py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("row_strides"),
        py::arg("B"), py::arg("V"), py::arg("coeffs"), py::arg("out"), py::arg("num_threads") = 0,
        "out[b, :] = sum_m coeffs[b, m] * in_m[b, :] in fp32 (out contiguous [B, V]).");
  m.def("philox_uniform", [](int64_t seed, int64_t offset) { return philox_uniform(uint64_t(seed), uint64_t(offset)); },
        py::arg("seed"), py::arg("offset"), "The sampler's uniform for (seed, offset): Triton's tl.rand, bit for bit.");
  m.def("best_simd", [] { return std::string(simd_name(best_simd())); },
        "Widest SIMD path this CPU supports: 'avx512', 'avx2' or 'scalar'.");
  m.def("simd", [] { return std::string(simd_name(active_simd())); }, "SIMD path the kernels use now.");
  m.def("set_simd", [](const std::string& name) { set_active_simd(parse_simd(name)); }, py::arg("name"),
        "Force a SIMD path (tests, benchmarks); refuses one the CPU lacks.");
  m.def("max_threads", [] { return omp_get_max_threads(); }, "OpenMP threads the kernels may use.");
}
