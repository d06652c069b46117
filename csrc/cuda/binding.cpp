// Python module lrtrain.ext._cuda: thin torch binding of the CUDA kernels (compiled only when torch has
// CUDA and a toolkit is found). The GEMMs of the fused update are at::bmm (cuBLAS) on torch's current
// stream; the kernels run on the same stream, passed from Python as an integer (the caller also makes
// the tensors' device current), so this file needs no CUDA or ATen/cuda header.
#include <torch/extension.h>

#include <string>

#include "../batched/update.h"
#include "backend.h"

namespace {

using lrtrain::CudaBackend;
using lrtrain::Tensor;
// ([U, S, V, R_U, R_V] per layer, padded to a width >= its rank; rank (L) int; status (L) int), all on the
// device and nothing synchronized: lrtrain/ext/dispatch.py reads the ranks of all groups back at once.
using GroupResult = std::tuple<std::vector<std::vector<Tensor>>, Tensor, Tensor>;

GroupResult update_group(const std::vector<Tensor>& U, const std::vector<Tensor>& S, const std::vector<Tensor>& V,
                         const std::vector<Tensor>& GK, const std::vector<Tensor>& GL, const std::vector<Tensor>& DK,
                         const std::vector<Tensor>& DL, const std::vector<Tensor>& DS,
                         const std::vector<int64_t>& max_rank, int64_t augment, double lr, double tau,
                         int64_t min_rank, int64_t spare, int64_t max_sweeps, int64_t stream) {
  TORCH_CHECK(!U.empty(), "update_group: no layers");
  TORCH_CHECK(U[0].is_cuda(), "lrtrain.ext._cuda takes CUDA tensors");
  void* s = reinterpret_cast<void*>(stream);
  lrtrain::GroupTensors g;
  if (U[0].scalar_type() == at::kFloat) {
    g = lrtrain::fused_update_group<CudaBackend, float>(U, S, V, GK, GL, DK, DL, DS, max_rank, augment, lr, tau,
                                                        min_rank, spare, max_sweeps, lrtrain::kSvdJacobi, s);
  } else {
    TORCH_CHECK(U[0].scalar_type() == at::kDouble, "lrtrain.ext._cuda supports float32 and float64");
    g = lrtrain::fused_update_group<CudaBackend, double>(U, S, V, GK, GL, DK, DL, DS, max_rank, augment, lr, tau,
                                                         min_rank, spare, max_sweeps, lrtrain::kSvdJacobi, s);
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
  m.def("update_group", &update_group,
        "Fused DLRT update of L CUDA layers of one (m, n, r), asynchronous on `stream`: ([U, S, V, R_U, R_V] per "
        "layer padded to a width >= its rank, rank (L) int32, status (L) int32), all on the device",
        py::arg("U"), py::arg("S"), py::arg("V"), py::arg("G_K"), py::arg("G_L"), py::arg("D_K"), py::arg("D_L"),
        py::arg("D_S"), py::arg("max_rank"), py::arg("augment"), py::arg("lr"), py::arg("tau"), py::arg("min_rank"),
        py::arg("spare"), py::arg("max_sweeps"), py::arg("stream"));
  m.def("jacobi_svd", &jacobi_svd, "Batched one-block Jacobi SVD + rank rule: [P, sigma, Q, rank, status]",
        py::arg("A"), py::arg("tau"), py::arg("min_rank"), py::arg("max_rank"), py::arg("max_sweeps"),
        py::arg("stream"));
  m.def("jacobi_in_shared_memory", &lrtrain::cuda::jacobi_in_shared_memory, py::arg("p"), py::arg("q"),
        py::arg("dtype_bytes"));
}
