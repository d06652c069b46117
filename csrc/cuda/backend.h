// CUDA backend of the fused DLRT update for csrc/batched/update.h: the small-matrix kernels of
// csrc/kernels/ as one thread block per layer (csrc/cuda/*.cu). Ranks stay on the device
// (kHostRanks = false): the orchestration keeps padded widths and syncs once at the end.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

#include "../kernels/hd.h"
#include "launchers.h"

namespace lrtrain {

struct CudaBackend {
  static constexpr bool kHostRanks = false;

  static void check(int err, const char* what) {
    TORCH_CHECK(err == 0, "lrtrain CUDA kernel ", what, " failed: ", cuda::error_string(err));
  }

  template <class T>
  static void masked_cholqr(const double* G, int64_t L, int w, double tol, bool first, uint8_t* keep, T* Rinv,
                            int* status, char* ws, size_t stride, void* stream) {
    check(cuda::masked_cholqr(G, L, w, tol, first, keep, Rinv, status, ws, stride, stream), "masked_cholqr");
  }

  template <class T>
  static void svd(int method, const T* core, int64_t L, int p, int q, const int* max_rank, double tau, int min_rank,
                  int spare, int max_sweeps, T* P, T* sig, T* Q, int* rank, int* status, char* ws, size_t stride, void* stream) {
    TORCH_CHECK(method == kSvdJacobi, "the CUDA backend decomposes the core by Jacobi only");
    check(cuda::jacobi_svd(core, L, p, q, max_rank, tau, min_rank, spare, max_sweeps, P, sig, Q, rank, status, ws, stride,
                           stream),
          "jacobi_svd");
  }

  template <class T>
  static void reorth(const double* G, int64_t L, int kk, const int* rank, T* R, T* Rinv, int* status, char* ws,
                     size_t stride, void* stream) {
    check(cuda::reorth(G, L, kk, rank, R, Rinv, status, ws, stride, stream), "reorth");
  }
};

}  // namespace lrtrain
