// One-sided Jacobi SVD of one layer's augmented core Ŝ (p×q), with the rank rule (body; see hd.h).
//
// Algorithm (Hestenes one-sided Jacobi): orthogonalize the columns of B (B = Ŝ if q <= p, else Ŝᵀ, so
// B has ncols = min(p, q) columns of length len = max(p, q)) by plane rotations B ← B J, accumulating
// V = Π J. A pair (i, j) with α = ‖b_i‖², β = ‖b_j‖², γ = b_iᵀb_j is rotated iff |γ| > tol·√α·√β,
// tol = √len·eps (LAPACK gesvj's criterion), with ζ = (β-α)/(2γ), t = sign(ζ)/(|ζ| + √(1+ζ²)),
// c = 1/√(1+t²), s = c·t: b_i ← c b_i - s b_j, b_j ← s b_i + c b_j (the pair becomes orthogonal),
// applied in Rutishauser's rounding-stable form (below).
// Pairs are visited in the round-robin ("circle") order: ncols-1 rounds of ncols/2 disjoint pairs, so
// a CUDA block rotates all pairs of a round concurrently (one warp per pair); with one thread it is an
// ordinary cyclic sweep. Convergence = a sweep without rotation; at most max_sweeps sweeps.
//
// Sweeps: the issue expected 1-2 on the nearly diagonal Ŝ of later steps; measured (benchmarks/results/
// kernels.md) warm cores take 8-16, about as many as random ones: only Ŝ's top-left block is nearly diagonal,
// while the O(lr) coupling blocks pose a generic r-column problem that is resolved to full relative accuracy.
//
// Then: σ_j = ‖b_j‖ sorted descending; rank k = tolerance_rank(σ, τ, min_rank, max_rank, spare); the outputs
// are the first k singular vectors (columns ≥ k are written as zeros): the accumulated side is V's
// columns; the other side is b_j/σ_j, except for numerically zero σ_j (≤ p·eps·σ_1, only ever kept when
// min_rank forces it), which are completed to an orthonormal set by Gram-Schmidt (twice) from unit vectors.
#pragma once

#include "hd.h"
#include "rank_rule.h"

namespace lrtrain {

// Shared-memory layout of the body (elements): W ncols*len T, V ncols*ncols T, nrm ncols T, ssig ncols T,
// then ints: perm ncols, 4 counters.
template <class T>
inline size_t jacobi_smem_bytes(int p, int q) {
  const size_t nc = size_t(p < q ? p : q), len = size_t(p < q ? q : p);
  return (nc * len + nc * nc + 2 * nc) * sizeof(T) + (nc + 4) * sizeof(int);
}

// Round-robin pair s of round t for n2 (even) players: player n2-1 is fixed, the others rotate.
LRT_FN void round_robin_pair(int t, int s, int n2, int* i, int* j) {
  const int m = n2 - 1;
  if (s == 0) {
    *i = t;
    *j = m;
  } else {
    *i = (t + s) % m;
    *j = (t - s + m) % m;
  }
}

// A (p×q, row-major, leading dimension q) → P_out (p×kk), sig_out (kk), Q_out (q×kk), kk = min(p, q),
// *rank_out; returns a Status. mem: jacobi_smem_bytes<T>(p, q) bytes (shared memory on CUDA).
template <class T, class Ctx>
LRT_FN int jacobi_svd_layer(const Ctx& c, const T* A, int p, int q, int max_rank, double tau, int min_rank,
                            int spare, int max_sweeps, T* P_out, T* sig_out, T* Q_out, int* rank_out, void* mem) {
  const bool trans = q > p;
  const int nc = trans ? p : q, len = trans ? q : p, kk = nc;
  T* W = static_cast<T*>(mem);  // column j of B at W + j*len
  T* V = W + size_t(nc) * len;  // column j of V at V + j*nc
  T* nrm = V + size_t(nc) * nc;
  T* ssig = nrm + nc;
  int* perm = reinterpret_cast<int*>(ssig + nc);
  int* cnt = perm + nc;  // cnt[0]: rotations in this sweep, cnt[1]: non-finite flag, cnt[2]: rank
  if (c.tid == 0) {
    cnt[0] = 0;
    cnt[1] = 0;
    cnt[2] = 0;
  }
  c.sync();
  for (int idx = c.tid; idx < nc * len; idx += c.nthreads) {
    const int j = idx / len, i = idx % len;
    const T v = trans ? A[size_t(j) * q + i] : A[size_t(i) * q + j];
    W[idx] = v;
    if (!lrt_finite(v)) cnt[1] = 1;  // benign race: every writer stores 1
  }
  for (int idx = c.tid; idx < nc * nc; idx += c.nthreads) V[idx] = (idx / nc == idx % nc) ? T(1) : T(0);
  c.sync();
  if (cnt[1]) {
    const T nan = T(0) / T(0);
    for (int idx = c.tid; idx < p * kk; idx += c.nthreads) P_out[idx] = nan;
    for (int idx = c.tid; idx < q * kk; idx += c.nthreads) Q_out[idx] = nan;
    for (int idx = c.tid; idx < kk; idx += c.nthreads) sig_out[idx] = nan;
    const int hi = rank_cap(max_rank, kk);
    if (c.tid == 0) *rank_out = lrt_min(min_rank, hi);  // what the rule gives for NaN σ
    return kNonFinite;
  }

  const T tol = lrt_sqrt(T(len)) * Num<T>::eps;
  const int n2 = nc + (nc & 1);
  bool converged = false;
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    for (int j = c.warp; j < nc; j += c.nwarps) {
      T s = T(0);
      LRT_SIMD_SUM(s)
      for (int i = c.lane; i < len; i += c.nlanes) s += W[j * len + i] * W[j * len + i];
      s = c.warp_sum(s);
      if (c.lane == 0) nrm[j] = s;
    }
    c.sync();
    // Columns at the rounding-noise level, ‖b‖ ≤ eps·max‖b‖ (≤ eps·σ_1), are left alone: they are
    // below the rank rule's numerical-zero threshold kk·eps·σ_1 (never kept, or re-completed when
    // min_rank forces them), and rotating them would move any other column by at most that noise level,
    // the accuracy LAPACK has too. (A larger threshold, e.g. kk·eps·σ_1, saves sweeps but leaves errors of
    // that size in the singular values just above the numerical-rank cap.)
    T maxn = T(0);
    for (int j = 0; j < nc; ++j) maxn = lrt_max(maxn, nrm[j]);
    const T zt = Num<T>::eps * Num<T>::eps * maxn;
    // Every thread has read all of nrm[] (maxn) before lane 0 of a pair's warp rewrites nrm[i], nrm[j]
    // in the first round below; without this barrier a fast warp races the slower warps' maxn loop.
    c.sync();
    for (int t = 0; t < n2 - 1; ++t) {
      for (int s = c.warp; s < n2 / 2; s += c.nwarps) {
        int i, j;
        round_robin_pair(t, s, n2, &i, &j);
        if (i >= nc || j >= nc) continue;
        T* wi = W + i * len;
        T* wj = W + j * len;
        const T a = nrm[i], b = nrm[j];
        if (!(a > zt && b > zt)) continue;
        T g = T(0);
        LRT_SIMD_SUM(g)
        for (int r = c.lane; r < len; r += c.nlanes) g += wi[r] * wj[r];
        g = c.warp_sum(g);
        if (!(lrt_abs(g) > tol * lrt_sqrt(a) * lrt_sqrt(b)) || g == T(0)) continue;
        const T zeta = (b - a) / (T(2) * g);
        const T az = lrt_abs(zeta);
        // For huge |ζ|, √(1+ζ²) overflows: t = 1/(2ζ) to working precision there.
        T tn = az > T(1e10) ? T(0.5) / az : T(1) / (az + lrt_sqrt(T(1) + zeta * zeta));
        if (zeta < T(0)) tn = -tn;
        const T cs = T(1) / lrt_sqrt(T(1) + tn * tn), sn = cs * tn, rho = sn / (T(1) + cs);
        // Rutishauser's form x' = x - s(y + ρx), y' = y + s(x - ρy), ρ = s/(1+c) = tan(θ/2): the same
        // rotation, but its determinant is 1 + O(eps·s²) whatever c rounds to. The textbook c·x - s·y
        // with c rounded to 1 (θ < √eps, the common case here) scales by 1 + s²/2 per rotation, which over
        // ~10³ rotations per column biased fp32 singular values by ~1e-5.
        for (int r = c.lane; r < len; r += c.nlanes) {
          const T x = wi[r], y = wj[r];
          wi[r] = x - sn * (y + rho * x);
          wj[r] = y + sn * (x - rho * y);
        }
        T* vi = V + i * nc;
        T* vj = V + j * nc;
        for (int r = c.lane; r < nc; r += c.nlanes) {
          const T x = vi[r], y = vj[r];
          vi[r] = x - sn * (y + rho * x);
          vj[r] = y + sn * (x - rho * y);
        }
        if (c.lane == 0) {
          nrm[i] = a - tn * g;
          nrm[j] = b + tn * g;
          c.atomic_inc(&cnt[0]);
        }
      }
      c.sync();
    }
    const int rotations = cnt[0];
    c.sync();  // everybody has read the counter before it is reset
    if (c.tid == 0) cnt[0] = 0;
    if (rotations == 0) {
      converged = true;
      break;
    }
  }

  // σ_j = ‖b_j‖ (recomputed), then the descending order: perm[pos] = j.
  for (int j = c.warp; j < nc; j += c.nwarps) {
    T s = T(0);
    LRT_SIMD_SUM(s)
    for (int i = c.lane; i < len; i += c.nlanes) s += W[j * len + i] * W[j * len + i];
    s = c.warp_sum(s);
    if (c.lane == 0) nrm[j] = lrt_sqrt(s);
  }
  c.sync();
  for (int j = c.tid; j < nc; j += c.nthreads) {
    const T sj = nrm[j];
    int pos = 0;
    for (int l = 0; l < nc; ++l) pos += (nrm[l] > sj || (nrm[l] == sj && l < j)) ? 1 : 0;
    perm[pos] = j;
  }
  c.sync();
  for (int o = c.tid; o < nc; o += c.nthreads) ssig[o] = nrm[perm[o]];
  c.sync();
  if (c.tid == 0) cnt[2] = tolerance_rank(ssig, kk, tau, min_rank, max_rank, spare);
  c.sync();
  const int k = cnt[2];
  const int nd = numerical_rank(ssig, kk);  // columns o < nd have σ > kk·eps·σ_1: b/σ is well defined
  if (c.tid == 0) *rank_out = k;
  for (int o = c.tid; o < kk; o += c.nthreads) sig_out[o] = ssig[o];

  // Accumulated side (V): rows nc; normalized side (B/σ): rows len.
  T* acc_out = trans ? P_out : Q_out;
  T* nrm_out = trans ? Q_out : P_out;
  for (int idx = c.tid; idx < nc * kk; idx += c.nthreads) {
    const int r = idx / kk, o = idx % kk;
    acc_out[idx] = o < k ? V[perm[o] * nc + r] : T(0);
  }
  for (int idx = c.tid; idx < len * kk; idx += c.nthreads) {
    const int r = idx / kk, o = idx % kk;
    nrm_out[idx] = (o < k && o < nd) ? W[perm[o] * len + r] / ssig[o] : T(0);
  }
  c.sync();
  // Orthonormal completion for forced, numerically zero columns (one warp; rare).
  if (c.warp == 0) {
    for (int o = nd; o < k; ++o) {
      T* v = W + perm[o] * len;  // that column is numerically zero: reuse it as scratch
      for (int cand = 0; cand < len; ++cand) {
        for (int r = c.lane; r < len; r += c.nlanes) v[r] = (r == cand) ? T(1) : T(0);
        for (int pass = 0; pass < 2; ++pass) {
          for (int o2 = 0; o2 < o; ++o2) {
            T d = T(0);
            for (int r = c.lane; r < len; r += c.nlanes) d += nrm_out[r * kk + o2] * v[r];
            d = c.warp_sum(d);
            for (int r = c.lane; r < len; r += c.nlanes) v[r] -= d * nrm_out[r * kk + o2];
          }
        }
        T s = T(0);
        for (int r = c.lane; r < len; r += c.nlanes) s += v[r] * v[r];
        s = lrt_sqrt(c.warp_sum(s));
        if (s > T(0.5)) {
          for (int r = c.lane; r < len; r += c.nlanes) nrm_out[r * kk + o] = v[r] / s;
          break;
        }
      }
    }
  }
  c.sync();
  return converged ? kOk : kNoConvergence;
}

}  // namespace lrtrain
