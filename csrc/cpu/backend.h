// CPU backend of the fused DLRT update: the small-matrix kernels of csrc/kernels/ run one layer per
// OpenMP thread (SerialCtx), with as many threads as torch uses (at::get_num_threads()).
// Signatures match csrc/cuda/backend.h so csrc/batched/update.h drives either.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../kernels/cholesky.h"
#include "../kernels/hd.h"
#include "../kernels/jacobi_svd.h"
#include "../kernels/rank_rule.h"

namespace lrtrain {

struct CpuBackend {
  static constexpr bool kHostRanks = true;  // ranks written by the kernels are readable right away
  static int threads(int64_t L) {
    const int n = at::get_num_threads();
    return int(L < n ? L : n);
  }

  // G (L,w,w) double, keep (L,w), Rinv (L,w,w): one masked CholeskyQR pass factor per layer.
  template <class T>
  static void masked_cholqr(const double* G, int64_t L, int w, double tol, bool first, uint8_t* keep, T* Rinv,
                            int* status, char* ws, size_t stride, void*) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads(L))
    for (int64_t l = 0; l < L; ++l) {
      double* W = reinterpret_cast<double*>(ws + l * stride);
      const size_t ww = size_t(w) * w;
      status[l] |= masked_cholqr_factor<T>(SerialCtx{}, G + l * ww, w, tol, first, keep + l * w, Rinv + l * ww, W,
                                           W + ww);
    }
  }

  // core (L,p,q) → P (L,p,kk), sig (L,kk), Q (L,q,kk), rank (L); columns ≥ rank zero.
  // method kSvdJacobi: the one-sided Jacobi body; kSvdLapack: torch.linalg.svd (LAPACK gesdd through
  // ATen) followed by the same rank rule (a LinAlgError or non-finite σ → kNoConvergence).
  template <class T>
  static void svd(int method, const T* core, int64_t L, int p, int q, const int* max_rank, double tau,
                  int min_rank, int spare, int max_sweeps, T* P, T* sig, T* Q, int* rank, int* status, char* ws, size_t stride,
                  void* stream) {
    if (method == kSvdJacobi) {
      jacobi<T>(core, L, p, q, max_rank, tau, min_rank, spare, max_sweeps, P, sig, Q, rank, status, ws, stride,
                stream);
      return;
    }
    const int kk = p < q ? p : q;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads(L))
    for (int64_t l = 0; l < L; ++l) {
      status[l] |= lapack_svd_layer<T>(core + l * p * q, p, q, max_rank[l], tau, min_rank, spare, P + l * p * kk,
                                       sig + l * kk, Q + l * q * kk, rank + l);
    }
  }

  template <class T>
  static int lapack_svd_layer(const T* core, int p, int q, int max_rank, double tau, int min_rank, int spare, T* P_out,
                              T* sig_out, T* Q_out, int* rank_out) {
    const int kk = p < q ? p : q;
    const auto dt = std::is_same<T, float>::value ? at::kFloat : at::kDouble;
    at::Tensor A = at::from_blob(const_cast<T*>(core), {p, q}, at::TensorOptions().dtype(dt));
    at::Tensor U, S, Vh;
    bool ok = true;
    try {
      std::tie(U, S, Vh) = at::linalg_svd(A, /*full_matrices=*/false);
      ok = bool(at::isfinite(S).all().item<bool>());
    } catch (const c10::Error&) {  // torch.linalg.LinAlgError (gesdd did not converge)
      ok = false;
    }
    if (!ok) {
      const int hi = rank_cap(max_rank, kk);
      *rank_out = std::min(min_rank, hi);
      return kNoConvergence;
    }
    U = U.contiguous();
    S = S.contiguous();
    Vh = Vh.contiguous();
    const T* u = U.data_ptr<T>();
    const T* s = S.data_ptr<T>();
    const T* vh = Vh.data_ptr<T>();
    const int k = tolerance_rank(s, kk, tau, min_rank, max_rank, spare);
    *rank_out = k;
    for (int o = 0; o < kk; ++o) sig_out[o] = s[o];
    for (int i = 0; i < p; ++i)
      for (int o = 0; o < kk; ++o) P_out[i * kk + o] = o < k ? u[i * kk + o] : T(0);
    for (int i = 0; i < q; ++i)
      for (int o = 0; o < kk; ++o) Q_out[i * kk + o] = o < k ? vh[o * q + i] : T(0);
    return kOk;
  }

  template <class T>
  static void jacobi(const T* core, int64_t L, int p, int q, const int* max_rank, double tau, int min_rank,
                     int spare, int max_sweeps, T* P, T* sig, T* Q, int* rank, int* status, char* ws, size_t stride, void*) {
    const int kk = p < q ? p : q;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads(L))
    for (int64_t l = 0; l < L; ++l) {
      status[l] |= jacobi_svd_layer<T>(SerialCtx{}, core + l * p * q, p, q, max_rank[l], tau, min_rank, spare,
                                       max_sweeps, P + l * p * kk, sig + l * kk, Q + l * q * kk, rank + l,
                                       ws + l * stride);
    }
  }

  // G (L,kk,kk) double → R, Rinv (L,kk,kk), leading rank[l] block.
  template <class T>
  static void reorth(const double* G, int64_t L, int kk, const int* rank, T* R, T* Rinv, int* status, char* ws,
                     size_t stride, void*) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads(L))
    for (int64_t l = 0; l < L; ++l) {
      double* W = reinterpret_cast<double*>(ws + l * stride);
      const size_t kk2 = size_t(kk) * kk;
      status[l] |= reorth_factor<T>(SerialCtx{}, G + l * kk2, kk, rank[l], R + l * kk2, Rinv + l * kk2, W, W + kk2);
    }
  }
};

}  // namespace lrtrain
