// Python module lrtrain.update._cpu: the fused DLRT update on CPU tensors (csrc/batched/update.h driven by
// csrc/cpu/backend.h), and the batched Jacobi SVD alone (for the benchmarks and tests).
#include <torch/extension.h>

#include <omp.h>

#include <exception>
#include <string>

#include "../batched/update.h"
#include "../common/binding.h"
#include "backend.h"

namespace {

using lrtrain::CpuBackend;
using lrtrain::GroupTensors;
using lrtrain::LayerInputs;
using lrtrain::Tensor;
using lrtrain::UpdateArgs;

// The CPU kernels with the device-side rank branch of csrc/batched/update.h (kHostRanks = false: padded
// widths from max_rank, as on CUDA), so the CPU tests cover that branch too.
struct CpuDeviceRanksBackend : CpuBackend {
  static constexpr bool kHostRanks = false;
};

// How the CPU runs a group (lrtrain.update.dispatch.CPU_OPTIONS).
struct Schedule {
  bool batched;     // the CUDA path's schedule: every step batched over the L layers (same m, n, r)
  int svd;          // kSvdLapack or kSvdJacobi
  bool host_ranks;  // false: the device-side rank branch
};

template <class Backend, class T>
lrtrain::GroupResult update_group_t(const std::vector<LayerInputs>& layers, const UpdateArgs& args, int svd,
                                    bool batched) {
  if (batched) {
    GroupTensors g = lrtrain::fused_update_group<Backend, T>(layers, args, svd, nullptr);
    return {g.layers(), g.rank, g.status};
  }
  // Default CPU schedule: OpenMP over layers, each thread runs the whole sequence for its layer (L = 1:
  // no stacking copies; ATen/MKL calls inside the parallel region are single-threaded). Layers may differ
  // in their rank r (only m, n, dtype and the augment setting are shared).
  const int64_t L = int64_t(layers.size());
  TORCH_CHECK(args.max_rank.size() == size_t(L), "update_group: one max_rank per layer");
  std::vector<std::vector<Tensor>> outs(L);
  Tensor rank = at::empty({L}, at::kInt), status = at::empty({L}, at::kInt);
  int* rk = rank.data_ptr<int>();
  int* st = status.data_ptr<int>();
  std::vector<std::exception_ptr> err(L);
  const int nt = int(std::min<int64_t>(L, at::get_num_threads()));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t l = 0; l < L; ++l) {
    try {
      UpdateArgs one = args;
      one.max_rank = {args.max_rank[l]};
      GroupTensors g = lrtrain::fused_update_group<Backend, T>({layers[l]}, one, svd, nullptr);
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
lrtrain::GroupResult dispatch_schedule(const std::vector<LayerInputs>& layers, const UpdateArgs& args,
                                       const Schedule& s) {
  if (s.host_ranks) return update_group_t<CpuBackend, T>(layers, args, s.svd, s.batched);
  return update_group_t<CpuDeviceRanksBackend, T>(layers, args, s.svd, s.batched);
}

lrtrain::GroupResult update_group(const std::vector<std::vector<Tensor>>& inputs, const UpdateArgs& args,
                                  bool batched, const std::string& svd, bool host_ranks) {
  const std::vector<LayerInputs> layers = lrtrain::group_inputs(inputs);
  TORCH_CHECK(layers[0].U.device().is_cpu(), "lrtrain.update._cpu takes CPU tensors");
  TORCH_CHECK(svd == "lapack" || svd == "jacobi", "svd must be 'lapack' or 'jacobi', got ", svd);
  const Schedule s{batched, svd == "jacobi" ? lrtrain::kSvdJacobi : lrtrain::kSvdLapack, host_ranks};
  if (layers[0].U.scalar_type() == at::kFloat) return dispatch_schedule<float>(layers, args, s);
  TORCH_CHECK(layers[0].U.scalar_type() == at::kDouble, "lrtrain.update._cpu supports float32 and float64");
  return dispatch_schedule<double>(layers, args, s);
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
  lrtrain::bind_common(m);
  m.def("update_group", &update_group,
        "Fused DLRT update of L layers of one (m, n) (batched: and one r): inputs, one list "
        "[U, S, V, G_K, G_L, D_K, D_L, D_S] per layer; returns ([U, S, V, R_U, R_V] per layer, padded to a width "
        ">= its rank, rank (L) int32, status (L) int32). host_ranks=False: the device-side rank branch (padded "
        "widths from max_rank) that the CUDA backend runs",
        py::arg("inputs"), py::arg("args"), py::arg("batched") = false, py::arg("svd") = "lapack",
        py::arg("host_ranks") = true);
  m.def("jacobi_svd", &jacobi_svd, "Batched one-sided Jacobi SVD + rank rule: [P, sigma, Q, rank, status]",
        py::arg("A"), py::arg("tau"), py::arg("min_rank"), py::arg("max_rank"), py::arg("max_sweeps"));
  m.def("openmp_max_threads", []() { return omp_get_max_threads(); });
}
