// Portability layer for the DLRT kernel bodies (csrc/kernels/*.h).
//
// Every small dense routine of the fused update (masked Cholesky, triangular inverse, Jacobi SVD, rank
// rule) is written ONCE as a body templated on an execution context ``Ctx``:
//   * SerialCtx (this file): one thread; used by the CPU extension (OpenMP runs one layer per thread);
//   * BlockCtx (csrc/cuda/block_ctx.cuh): one CUDA thread block per layer.
// A body distributes its loops as ``for (i = c.tid; i < n; i += c.nthreads)`` (or over warps / lanes)
// and separates phases with ``c.sync()``; with SerialCtx the strides are compile-time 1 and sync is a
// no-op, so the same source is the plain serial algorithm. The CPU tests therefore exercise the exact
// arithmetic the CUDA kernels run (only the thread decomposition differs).
//
// This header includes no CUDA or torch header: it compiles with g++ and with nvcc alone.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define LRT_FN __device__ __forceinline__
#define LRT_SIMD_SUM(var)
#else
#define LRT_FN inline
#if defined(_OPENMP)
#define LRT_PRAGMA(x) _Pragma(#x)
// Lets the host compiler vectorize a floating-point sum (the CPU extension builds with -fopenmp).
#define LRT_SIMD_SUM(var) LRT_PRAGMA(omp simd reduction(+ : var))
#else
#define LRT_SIMD_SUM(var)
#endif
#endif

namespace lrtrain {

// Numeric constants of the dtypes the kernels support (torch.finfo values).
template <class T> struct Num;
template <> struct Num<float> {
  static constexpr float eps = 1.1920928955078125e-07f;
  // dependent_tol(float32) in lrtrain/optim/linalg.py
  static constexpr double dependent_tol = 1e-5;
};
template <> struct Num<double> {
  static constexpr double eps = 2.220446049250313e-16;
  static constexpr double dependent_tol = 1e-12;
};
constexpr double kDoubleTiny = 2.2250738585072014e-308;  // torch.finfo(torch.float64).tiny
constexpr double kDoubleEps = 2.220446049250313e-16;  // torch.finfo(torch.float64).eps

LRT_FN float lrt_sqrt(float x) {
#ifdef __CUDA_ARCH__
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
LRT_FN double lrt_sqrt(double x) {
#ifdef __CUDA_ARCH__
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}
template <class T> LRT_FN T lrt_abs(T x) { return x < T(0) ? -x : x; }
template <class T> LRT_FN bool lrt_finite(T x) { return x - x == T(0); }  // false for inf and NaN
template <class T> LRT_FN T lrt_min(T a, T b) { return b < a ? b : a; }
template <class T> LRT_FN T lrt_max(T a, T b) { return a < b ? b : a; }

// Status bits a layer can report (any non-zero status makes the Python dispatcher rerun the reference
// update for that layer, which reproduces the reference's behaviour in these rare cases exactly).
enum Status : int {
  kOk = 0,
  kNonFinite = 1,        // the core Ŝ (or the new S) is not finite
  kNoConvergence = 2,    // Jacobi SVD did not converge within max_sweeps
  kReorthFailed = 4,     // Cholesky of the new bases' Gram failed (the reference then uses Householder QR)
  kComplementFailed = 8, // masked Cholesky of the orth-complement failed (the reference raises there)
};

// How the core Ŝ is decomposed (a backend may support only kSvdJacobi).
enum SvdMethod : int { kSvdJacobi = 0, kSvdLapack = 1 };

// One thread: the serial algorithm.
struct SerialCtx {
  static constexpr int tid = 0, nthreads = 1;
  static constexpr int lane = 0, nlanes = 1, warp = 0, nwarps = 1;
  void sync() const {}
  template <class T> T warp_sum(T x) const { return x; }
  void atomic_inc(int* p) const { ++*p; }
};

}  // namespace lrtrain
