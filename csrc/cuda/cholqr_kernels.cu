// CUDA kernels: masked shifted CholeskyQR factor (orth-complement) and the re-orthonormalization factor.
// One thread block per layer runs the bodies of csrc/kernels/cholesky.h with BlockCtx: the Cholesky is
// right-looking (pivot, scale the row, rank-1 trailing update; threads own columns), the triangular
// inverse is column-parallel back substitution, everything in double. The working matrix W lives in
// shared memory when w²·8 bytes fit the device's opt-in limit (w ≤ 128 on H100), else in the global
// scratch; the inverse X always goes to the global scratch.
// Compiles standalone: nvcc -arch=sm_90 -std=c++17 -O2 -c cholqr_kernels.cu
#include <cuda_runtime.h>

#include "../kernels/cholesky.h"
#include "block_ctx.cuh"
#include "launchers.h"

namespace lrtrain {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void __launch_bounds__(kThreads)
    masked_cholqr_kernel(const double* G, int w, double tol, int first, unsigned char* keep, T* Rinv, int* status,
                         char* ws, size_t stride, int use_smem) {
  const int64_t l = blockIdx.x;
  const size_t ww = size_t(w) * w;
  double* scratch = reinterpret_cast<double*>(ws + l * stride);
  double* W = use_smem ? reinterpret_cast<double*>(dynamic_smem()) : scratch;
  BlockCtx c;
  const int st = masked_cholqr_factor<T>(c, G + l * ww, w, tol, first != 0, keep + l * w, Rinv + l * ww, W,
                                         scratch + ww);
  if (c.tid == 0 && st != kOk) status[l] |= st;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    reorth_kernel(const double* G, int kk, const int* rank, T* R, T* Rinv, int* status, char* ws, size_t stride,
                  int use_smem) {
  const int64_t l = blockIdx.x;
  const size_t kk2 = size_t(kk) * kk;
  double* scratch = reinterpret_cast<double*>(ws + l * stride);
  double* W = use_smem ? reinterpret_cast<double*>(dynamic_smem()) : scratch;
  BlockCtx c;
  const int st = reorth_factor<T>(c, G + l * kk2, kk, rank[l], R + l * kk2, Rinv + l * kk2, W, scratch + kk2);
  if (c.tid == 0 && st != kOk) status[l] |= st;
}

// Shared-memory bytes for a w×w double working matrix, or 0 when it must stay in global memory.
template <class K>
size_t configure_smem(K kernel, int w) {
  const size_t bytes = size_t(w) * w * sizeof(double);
  if (bytes > smem_limit()) return 0;
  if (bytes > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the launch check after the global-memory launch must not see it
    return 0;
  }
  return bytes;
}

template <class T>
int launch_masked(const double* G, int64_t L, int w, double tol, bool first, uint8_t* keep, T* Rinv, int* status,
                  char* ws, size_t stride, void* stream) {
  if (L == 0 || w == 0) return cudaSuccess;
  const size_t smem = configure_smem(masked_cholqr_kernel<T>, w);
  masked_cholqr_kernel<T><<<unsigned(L), kThreads, smem, static_cast<cudaStream_t>(stream)>>>(
      G, w, tol, first ? 1 : 0, keep, Rinv, status, ws, stride, smem > 0 ? 1 : 0);
  return int(cudaGetLastError());
}

template <class T>
int launch_reorth(const double* G, int64_t L, int kk, const int* rank, T* R, T* Rinv, int* status, char* ws,
                  size_t stride, void* stream) {
  if (L == 0 || kk == 0) return cudaSuccess;
  const size_t smem = configure_smem(reorth_kernel<T>, kk);
  reorth_kernel<T><<<unsigned(L), kThreads, smem, static_cast<cudaStream_t>(stream)>>>(G, kk, rank, R, Rinv, status,
                                                                                      ws, stride, smem > 0 ? 1 : 0);
  return int(cudaGetLastError());
}

}  // namespace

namespace cuda {

int masked_cholqr(const double* G, int64_t L, int w, double tol, bool first, uint8_t* keep, float* Rinv, int* status,
                  char* ws, size_t stride, void* stream) {
  return launch_masked<float>(G, L, w, tol, first, keep, Rinv, status, ws, stride, stream);
}
int masked_cholqr(const double* G, int64_t L, int w, double tol, bool first, uint8_t* keep, double* Rinv, int* status,
                  char* ws, size_t stride, void* stream) {
  return launch_masked<double>(G, L, w, tol, first, keep, Rinv, status, ws, stride, stream);
}
int reorth(const double* G, int64_t L, int kk, const int* rank, float* R, float* Rinv, int* status, char* ws,
           size_t stride, void* stream) {
  return launch_reorth<float>(G, L, kk, rank, R, Rinv, status, ws, stride, stream);
}
int reorth(const double* G, int64_t L, int kk, const int* rank, double* R, double* Rinv, int* status, char* ws,
           size_t stride, void* stream) {
  return launch_reorth<double>(G, L, kk, rank, R, Rinv, status, ws, stride, stream);
}
const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace lrtrain
