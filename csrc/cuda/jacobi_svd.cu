// CUDA kernel: one-block one-sided Jacobi SVD of each layer's augmented core, with the rank rule.
// One thread block per layer runs the body of csrc/kernels/jacobi_svd.h with BlockCtx: a round of the
// round-robin ordering has ncols/2 disjoint column pairs, one warp per pair (lanes stride over the rows,
// the dot product is a warp butterfly sum), __syncthreads between rounds. B and V live in shared memory
// when (ncols·len + ncols² + …)·sizeof(T) fits the opt-in limit — float cores up to 128×128 (2r = 128)
// on H100 (~130 KiB); larger cores (double 128, any 256) run the same code on the global scratch.
// Compiles standalone: nvcc -arch=sm_90 -std=c++17 -O2 -c jacobi_svd.cu
#include <cuda_runtime.h>

#include "../kernels/jacobi_svd.h"
#include "block_ctx.cuh"
#include "launchers.h"

namespace lrtrain {
namespace {

constexpr int kMaxThreads = 512;

template <class T>
__global__ void __launch_bounds__(kMaxThreads)
    jacobi_kernel(const T* core, int p, int q, const int* max_rank, double tau, int min_rank, int spare,
                  int max_sweeps, T* P, T* sig, T* Q, int* rank, int* status, char* ws, size_t stride, int use_smem) {
  const int64_t l = blockIdx.x;
  const int kk = p < q ? p : q;
  void* mem = use_smem ? static_cast<void*>(dynamic_smem()) : static_cast<void*>(ws + l * stride);
  BlockCtx c;
  const int st = jacobi_svd_layer<T>(c, core + l * p * q, p, q, max_rank[l], tau, min_rank, spare, max_sweeps,
                                     P + l * p * kk, sig + l * kk, Q + l * q * kk, rank + l, mem);
  if (c.tid == 0 && st != kOk) status[l] |= st;
}

template <class T>
int launch(const T* core, int64_t L, int p, int q, const int* max_rank, double tau, int min_rank, int spare,
           int max_sweeps, T* P, T* sig, T* Q, int* rank, int* status, char* ws, size_t stride, void* stream) {
  if (L == 0 || p == 0 || q == 0) return cudaSuccess;
  const int nc = p < q ? p : q;
  // one warp per pair of a round (nc/2 pairs), at least 4 and at most kMaxThreads/32 warps
  int warps = (nc + 1) / 2;
  warps = warps < 4 ? 4 : (warps > kMaxThreads / 32 ? kMaxThreads / 32 : warps);
  size_t smem = jacobi_smem_bytes<T>(p, q);
  if (smem > smem_limit()) {
    smem = 0;
  } else if (smem > 48 * 1024 &&
             cudaFuncSetAttribute(jacobi_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) !=
                 cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the launch check below must not report this handled failure
    smem = 0;
  }
  jacobi_kernel<T><<<unsigned(L), warps * 32, smem, static_cast<cudaStream_t>(stream)>>>(
      core, p, q, max_rank, tau, min_rank, spare, max_sweeps, P, sig, Q, rank, status, ws, stride, smem > 0 ? 1 : 0);
  return int(cudaGetLastError());
}

}  // namespace

namespace cuda {

int jacobi_svd(const float* core, int64_t L, int p, int q, const int* max_rank, double tau, int min_rank,
               int spare, int max_sweeps, float* P, float* sig, float* Q, int* rank, int* status, char* ws, size_t stride,
               void* stream) {
  return launch<float>(core, L, p, q, max_rank, tau, min_rank, spare, max_sweeps, P, sig, Q, rank, status, ws, stride,
                       stream);
}
int jacobi_svd(const double* core, int64_t L, int p, int q, const int* max_rank, double tau, int min_rank,
               int spare, int max_sweeps, double* P, double* sig, double* Q, int* rank, int* status, char* ws, size_t stride,
               void* stream) {
  return launch<double>(core, L, p, q, max_rank, tau, min_rank, spare, max_sweeps, P, sig, Q, rank, status, ws, stride,
                        stream);
}
bool jacobi_in_shared_memory(int p, int q, int dtype_bytes) {
  const size_t bytes = dtype_bytes == 4 ? jacobi_smem_bytes<float>(p, q) : jacobi_smem_bytes<double>(p, q);
  return bytes <= smem_limit();
}

}  // namespace cuda
}  // namespace lrtrain
