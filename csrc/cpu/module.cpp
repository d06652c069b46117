// Python module lrtrain.ext._cpu: the fused DLRT update on CPU tensors (csrc/batched/update.h driven by
// csrc/cpu/backend.h), and the batched Jacobi SVD alone (for the benchmarks and tests).
#include <torch/extension.h>

#include <omp.h>

#include <exception>
#include <string>

#include "../batched/update.h"
#include "backend.h"

namespace {

using lrtrain::CpuBackend;
using lrtrain::GroupTensors;
using lrtrain::Tensor;

// The CPU kernels with the device-side rank branch of csrc/batched/update.h (kHostRanks = false: padded
// widths from max_rank, as on CUDA), so the CPU tests cover that branch too.
struct CpuDeviceRanksBackend : CpuBackend {
  static constexpr bool kHostRanks = false;
};

// ([U, S, V, R_U, R_V] per layer, padded to a width ≥ its rank; rank (L) int; status (L) int).
using GroupResult = std::tuple<std::vector<std::vector<Tensor>>, Tensor, Tensor>;

template <class Backend, class T>
GroupResult update_group_t(const std::vector<Tensor>& U, const std::vector<Tensor>& S, const std::vector<Tensor>& V,
                           const std::vector<Tensor>& GK, const std::vector<Tensor>& GL, const std::vector<Tensor>& DK,
                           const std::vector<Tensor>& DL, const std::vector<Tensor>& DS,
                           const std::vector<int64_t>& max_rank, int64_t augment, double lr, double tau,
                           int64_t min_rank, int64_t spare, int64_t max_sweeps, bool batched, int svd) {
  if (batched) {  // the CUDA path's schedule: every step batched over the L layers (same m, n, r)
    GroupTensors g = lrtrain::fused_update_group<Backend, T>(U, S, V, GK, GL, DK, DL, DS, max_rank, augment, lr, tau,
                                                             min_rank, spare, max_sweeps, svd, nullptr);
    return {g.layers(), g.rank, g.status};
  }
  // Default CPU schedule: OpenMP over layers, each thread runs the whole sequence for its layer (L = 1:
  // no stacking copies; ATen/MKL calls inside the parallel region are single-threaded). Layers may differ
  // in their rank r (only m, n, dtype and the augment setting are shared).
  const int64_t L = int64_t(U.size());
  TORCH_CHECK(S.size() == size_t(L) && V.size() == size_t(L) && GK.size() == size_t(L) && GL.size() == size_t(L) &&
                  DK.size() == size_t(L) && DL.size() == size_t(L) && DS.size() == size_t(L) &&
                  max_rank.size() == size_t(L),
              "update_group: every argument needs one entry per layer");
  std::vector<std::vector<Tensor>> outs(L);
  Tensor rank = at::empty({L}, at::kInt), status = at::empty({L}, at::kInt);
  int* rk = rank.data_ptr<int>();
  int* st = status.data_ptr<int>();
  std::vector<std::exception_ptr> err(L);
  const int nt = int(std::min<int64_t>(L, at::get_num_threads()));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t l = 0; l < L; ++l) {
    try {
      GroupTensors g = lrtrain::fused_update_group<Backend, T>({U[l]}, {S[l]}, {V[l]}, {GK[l]}, {GL[l]}, {DK[l]},
                                                               {DL[l]}, {DS[l]}, {max_rank[l]}, augment, lr, tau,
                                                               min_rank, spare, max_sweeps, svd, nullptr);
      outs[l] = g.layers()[0];
      rk[l] = g.rank.data_ptr<int>()[0];
      st[l] = g.status.data_ptr<int>()[0];
    } catch (...) {
      err[l] = std::current_exception();
    }
  }
  for (auto& e : err)
    if (e) std::rethrow_exception(e);
  return {outs, rank, status};
}

template <class T>
GroupResult dispatch_backend(bool host_ranks, const std::vector<Tensor>& U, const std::vector<Tensor>& S,
                             const std::vector<Tensor>& V, const std::vector<Tensor>& GK, const std::vector<Tensor>& GL,
                             const std::vector<Tensor>& DK, const std::vector<Tensor>& DL,
                             const std::vector<Tensor>& DS, const std::vector<int64_t>& max_rank, int64_t augment,
                             double lr, double tau, int64_t min_rank, int64_t spare, int64_t max_sweeps, bool batched, int svd) {
  if (host_ranks)
    return update_group_t<CpuBackend, T>(U, S, V, GK, GL, DK, DL, DS, max_rank, augment, lr, tau, min_rank,
                                         spare, max_sweeps, batched, svd);
  return update_group_t<CpuDeviceRanksBackend, T>(U, S, V, GK, GL, DK, DL, DS, max_rank, augment, lr, tau, min_rank,
                                                  spare, max_sweeps, batched, svd);
}

GroupResult update_group(const std::vector<Tensor>& U, const std::vector<Tensor>& S, const std::vector<Tensor>& V,
                         const std::vector<Tensor>& GK, const std::vector<Tensor>& GL, const std::vector<Tensor>& DK,
                         const std::vector<Tensor>& DL, const std::vector<Tensor>& DS,
                         const std::vector<int64_t>& max_rank, int64_t augment, double lr, double tau,
                         int64_t min_rank, int64_t spare, int64_t max_sweeps, bool batched, const std::string& svd,
                         bool host_ranks) {
  TORCH_CHECK(!U.empty(), "update_group: no layers");
  TORCH_CHECK(U[0].device().is_cpu(), "lrtrain.ext._cpu takes CPU tensors");
  TORCH_CHECK(svd == "lapack" || svd == "jacobi", "svd must be 'lapack' or 'jacobi', got ", svd);
  const int method = svd == "jacobi" ? lrtrain::kSvdJacobi : lrtrain::kSvdLapack;
  if (U[0].scalar_type() == at::kFloat)
    return dispatch_backend<float>(host_ranks, U, S, V, GK, GL, DK, DL, DS, max_rank, augment, lr, tau, min_rank,
                                   spare, max_sweeps, batched, method);
  TORCH_CHECK(U[0].scalar_type() == at::kDouble, "lrtrain.ext._cpu supports float32 and float64");
  return dispatch_backend<double>(host_ranks, U, S, V, GK, GL, DK, DL, DS, max_rank, augment, lr, tau, min_rank,
                                  spare, max_sweeps, batched, method);
}

// A (L,p,q) → [P (L,p,kk), sigma (L,kk), Q (L,q,kk), rank (L), status (L)]; columns ≥ rank are zero.
std::vector<Tensor> jacobi_svd(const Tensor& A, double tau, int64_t min_rank, int64_t max_rank, int64_t max_sweeps) {
  TORCH_CHECK(A.dim() == 3 && A.device().is_cpu(), "jacobi_svd: A must be a (L, p, q) CPU tensor");
  if (A.scalar_type() == at::kFloat)
    return lrtrain::jacobi_svd_batched<CpuBackend, float>(A, tau, min_rank, max_rank, max_sweeps, nullptr);
  TORCH_CHECK(A.scalar_type() == at::kDouble, "jacobi_svd supports float32 and float64");
  return lrtrain::jacobi_svd_batched<CpuBackend, double>(A, tau, min_rank, max_rank, max_sweeps, nullptr);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrtrain fused DLRT update, CPU backend (C++/OpenMP)";
  m.def("update_group", &update_group,
        "Fused DLRT update of L layers of one (m, n) (batched: and one r): returns ([U, S, V, R_U, R_V] per layer, "
        "padded to a width >= its rank, rank (L) int32, status (L) int32). augment < 0: r new columns per side. "
        "host_ranks=False: the device-side rank branch (padded widths from max_rank) that the CUDA backend runs",
        py::arg("U"), py::arg("S"), py::arg("V"), py::arg("G_K"), py::arg("G_L"), py::arg("D_K"), py::arg("D_L"),
        py::arg("D_S"), py::arg("max_rank"), py::arg("augment"), py::arg("lr"), py::arg("tau"), py::arg("min_rank"),
        py::arg("spare"), py::arg("max_sweeps"), py::arg("batched") = false, py::arg("svd") = "lapack", py::arg("host_ranks") = true);
  m.def("jacobi_svd", &jacobi_svd, "Batched one-sided Jacobi SVD + rank rule: [P, sigma, Q, rank, status]",
        py::arg("A"), py::arg("tau"), py::arg("min_rank") = 1, py::arg("max_rank") = -1, py::arg("max_sweeps") = 40);
  m.def("openmp_max_threads", []() { return omp_get_max_threads(); });
}
