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
  m.def("best_simd", [] { return std::string(simd_name(best_simd())); },
        "Widest SIMD path this CPU supports: 'avx512', 'avx2' or 'scalar'.");
  m.def("simd", [] { return std::string(simd_name(active_simd())); }, "SIMD path the kernels use now.");
  m.def("set_simd", [](const std::string& name) { set_active_simd(parse_simd(name)); }, py::arg("name"),
        "Force a SIMD path (tests, benchmarks); refuses one the CPU lacks.");
  m.def("max_threads", [] { return omp_get_max_threads(); }, "OpenMP threads the kernels may use.");
}
