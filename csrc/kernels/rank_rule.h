// The truncation rule of lrtrain.update.rank_rule.tolerance_rank (the spec), for one layer.
//
//   r = min{ k : (Σ_{j>k} σ_j²)^{1/2} ≤ τ ‖σ‖₂ } + spare, capped at the numerical rank #{σ_j > p·eps·σ_1},
//   then clamped to [min(min_rank, hi), hi], hi = min(max_rank, p).
//
// Bit-for-bit the same arithmetic as the torch code: squares and tails in double, tails accumulated
// from the end (torch's flip-cumsum-flip), the numerical threshold float(p·eps)·σ_1 in the dtype of σ.
#pragma once

#include "hd.h"

namespace lrtrain {

// Number of numerically non-zero singular values: σ_j > float(p·eps)·σ_1 (sigma descending).
template <class T>
LRT_FN int numerical_rank(const T* sigma, int p) {
  if (p == 0) return 0;
  const T num_thr = T(double(p) * double(Num<T>::eps)) * sigma[0];
  int numerical = 0;
  for (int k = 0; k < p; ++k)
    if (sigma[k] > num_thr) ++numerical;
  return numerical;
}

// The largest rank a core of p singular values may get: min(max_rank, p), or p where max_rank == kNoRankCap.
LRT_FN int rank_cap(int max_rank, int p) { return max_rank == kNoRankCap ? p : lrt_min(max_rank, p); }

// sigma: p singular values, descending. max_rank == kNoRankCap means "no cap"; spare: directions kept beyond
// the τ-rank. Returns the chosen rank.
template <class T>
LRT_FN int tolerance_rank(const T* sigma, int p, double tau, int min_rank, int max_rank, int spare) {
  if (p == 0) return 0;
  double total = 0.0;
  for (int k = p - 1; k >= 0; --k) total += double(sigma[k]) * double(sigma[k]);
  const double thr = (tau * tau) * total;
  int by_tol = 0;
  double tail = 0.0;
  for (int k = p - 1; k >= 0; --k) {
    tail += double(sigma[k]) * double(sigma[k]);
    if (tail > thr) ++by_tol;
  }
  const int hi = rank_cap(max_rank, p);
  const int lo = lrt_min(min_rank, hi);
  int k = lrt_min(by_tol + spare, numerical_rank(sigma, p));
  return lrt_min(lrt_max(k, lo), hi);
}

}  // namespace lrtrain
