// Python module lrtrain.update._cuda: thin torch binding of the CUDA kernels (compiled only when torch has
// CUDA and a CUDA toolkit is found). The GEMMs of the fused update are at::bmm (cuBLAS) on torch's current
// stream; the kernels run on the same stream, passed from Python as an integer (the caller also makes
// the tensors' device current), so this file needs no CUDA or ATen/cuda header.
#include <torch/extension.h>

#include <string>

#include "../batched/update.h"
#include "../common/binding.h"
#include "backend.h"

namespace {

using lrtrain::CudaBackend;
using lrtrain::Tensor;

// Results on the device, nothing synchronized: lrtrain/update/dispatch.py reads the ranks of all groups
// back at once.
lrtrain::GroupResult update_group(const std::vector<std::vector<Tensor>>& inputs, const lrtrain::UpdateArgs& args,
                                  int64_t stream) {
  const std::vector<lrtrain::LayerInputs> layers = lrtrain::group_inputs(inputs);
  TORCH_CHECK(layers[0].U.is_cuda(), "lrtrain.update._cuda takes CUDA tensors");
  void* s = reinterpret_cast<void*>(stream);
  lrtrain::GroupTensors g;
  if (layers[0].U.scalar_type() == at::kFloat) {
    g = lrtrain::fused_update_group<CudaBackend, float>(layers, args, lrtrain::kSvdJacobi, s);
  } else {
    TORCH_CHECK(layers[0].U.scalar_type() == at::kDouble, "lrtrain.update._cuda supports float32 and float64");
    g = lrtrain::fused_update_group<CudaBackend, double>(layers, args, lrtrain::kSvdJacobi, s);
  }
  return {g.layers(), g.rank, g.status};
}

// A (L,p,q) CUDA → [P (L,p,kk), sigma (L,kk), Q (L,q,kk), rank (L), status (L)], asynchronously on `stream`.
std::vector<Tensor> jacobi_svd(const Tensor& A, double tau, int64_t min_rank, int64_t max_rank, int64_t max_sweeps,
                               int64_t stream) {
  TORCH_CHECK(A.dim() == 3 && A.is_cuda(), "jacobi_svd: A must be a (L, p, q) CUDA tensor");
  void* s = reinterpret_cast<void*>(stream);
  if (A.scalar_type() == at::kFloat)
    return lrtrain::jacobi_svd_batched<CudaBackend, float>(A, tau, min_rank, max_rank, max_sweeps, s);
  TORCH_CHECK(A.scalar_type() == at::kDouble, "jacobi_svd supports float32 and float64");
  return lrtrain::jacobi_svd_batched<CudaBackend, double>(A, tau, min_rank, max_rank, max_sweeps, s);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrtrain fused DLRT update, CUDA backend (plain CUDA C++ kernels + torch binding)";
  lrtrain::bind_common(m);
  m.def("update_group", &update_group,
        "Fused DLRT update of L CUDA layers of one (m, n, r), asynchronous on `stream`: inputs, one list "
        "[U, S, V, G_K, G_L, D_K, D_L, D_S] per layer; returns ([U, S, V, R_U, R_V] per layer padded to a width "
        ">= its rank, rank (L) int32, status (L) int32), all on the device",
        py::arg("inputs"), py::arg("args"), py::arg("stream"));
  m.def("jacobi_svd", &jacobi_svd, "Batched one-block Jacobi SVD + rank rule: [P, sigma, Q, rank, status]",
        py::arg("A"), py::arg("tau"), py::arg("min_rank"), py::arg("max_rank"), py::arg("max_sweeps"),
        py::arg("stream"));
  m.def("jacobi_in_shared_memory", &lrtrain::cuda::jacobi_in_shared_memory, py::arg("p"), py::arg("q"),
        py::arg("dtype_bytes"));
}
