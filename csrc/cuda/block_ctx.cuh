// CUDA execution context for the kernel bodies of csrc/kernels/ (see hd.h): one thread block per layer,
// block size a multiple of 32. Warp sums use an xor butterfly, so every lane gets the bitwise-identical
// sum (each step adds the same two operands, in either order) and warp-level branches stay uniform.
#pragma once

#include "../kernels/hd.h"

namespace lrtrain {

struct BlockCtx {
  int tid, nthreads, lane, warp, nwarps;
  static constexpr int nlanes = 32;
  __device__ BlockCtx()
      : tid(threadIdx.x), nthreads(blockDim.x), lane(threadIdx.x & 31), warp(threadIdx.x >> 5),
        nwarps(blockDim.x >> 5) {}
  __device__ void sync() const { __syncthreads(); }
  template <class T> __device__ T warp_sum(T x) const {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
  }
  __device__ void atomic_inc(int* p) const { atomicAdd(p, 1); }
};

// Dynamic shared memory of the calling kernel (16-byte aligned), shared by all instantiations.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char lrtrain_smem[];
  return lrtrain_smem;
}

// Bytes of shared memory a block may use on the current device (opt-in maximum), or 48 KiB if unknown.
inline size_t smem_limit() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess || bytes <= 0) {
    (void)cudaGetLastError();  // a failed query must not surface as the next launch's error
    return 48 * 1024;
  }
  return size_t(bytes);
}

}  // namespace lrtrain
