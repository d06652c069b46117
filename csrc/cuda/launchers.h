// Host entry points of the CUDA kernels (csrc/cuda/*.cu), plain C++: no CUDA or torch header needed.
// All pointers are device pointers; ``stream`` is a cudaStream_t; ``ws``/``stride``: per-layer global
// scratch (csrc/batched/update.h: layer_workspace_bytes). Each returns a cudaError_t (0 = success).
// Layer l's status bits (csrc/kernels/hd.h: Status) are OR-ed into status[l].
#pragma once

#include <cstddef>
#include <cstdint>

namespace lrtrain {
namespace cuda {

// One masked CholeskyQR pass factor per layer: G (L,w,w) double → Rinv (L,w,w), keep (L,w).
int masked_cholqr(const double* G, int64_t L, int w, double tol, bool first, uint8_t* keep, float* Rinv, int* status,
                  char* ws, size_t stride, void* stream);
int masked_cholqr(const double* G, int64_t L, int w, double tol, bool first, uint8_t* keep, double* Rinv, int* status,
                  char* ws, size_t stride, void* stream);

// Leading rank[l] block of G (L,kk,kk) double → R, Rinv (L,kk,kk) (zero-padded).
int reorth(const double* G, int64_t L, int kk, const int* rank, float* R, float* Rinv, int* status, char* ws,
           size_t stride, void* stream);
int reorth(const double* G, int64_t L, int kk, const int* rank, double* R, double* Rinv, int* status, char* ws,
           size_t stride, void* stream);

// One-block Jacobi SVD + rank rule (τ-rank + spare) per layer: core (L,p,q) → P (L,p,kk), sig (L,kk), Q (L,q,kk), rank (L).
int jacobi_svd(const float* core, int64_t L, int p, int q, const int* max_rank, double tau, int min_rank,
               int spare, int max_sweeps, float* P, float* sig, float* Q, int* rank, int* status, char* ws, size_t stride,
               void* stream);
int jacobi_svd(const double* core, int64_t L, int p, int q, const int* max_rank, double tau, int min_rank,
               int spare, int max_sweeps, double* P, double* sig, double* Q, int* rank, int* status, char* ws, size_t stride,
               void* stream);

// Whether layer scratch of this many bytes lives in shared memory on the current device (for reports).
bool jacobi_in_shared_memory(int p, int q, int dtype_bytes);

const char* error_string(int code);

}  // namespace cuda
}  // namespace lrtrain
