// Small Cholesky-based factorizations of the fused DLRT update (bodies; see hd.h for the Ctx model).
//
// * masked_cholqr_factor: the factor of one pass of lrtrain.optim.linalg._masked_cholqr. From the
//   Gram G = XᵀX (w×w, double) it returns Rinv' = R'⁻¹·diag(keep) so that Q = X·Rinv' is the pass's
//   output; on the first pass it also decides keep (columns whose squared distance to the span of the
//   previous columns is ≤ tol·max diag G are dependent and get an exactly zero column of Q).
// * reorth_factor: lrtrain.optim.linalg.reorthonormalize for the leading k columns: R = chol(G_k),
//   returns R and R⁻¹ (zero-padded to kk×kk).
//
// Matrices are row-major with leading dimension ld; R is upper triangular (G = RᵀR).
#pragma once

#include "hd.h"

namespace lrtrain {

// In-place right-looking Cholesky of the upper triangle of A (k×k): on return the upper triangle is R.
// tolerate=false: stops at the first pivot that is not > 0 (or NaN) and returns false (LAPACK potrf
// semantics, what torch.linalg.cholesky(_ex) reports as failure). tolerate=true: such a column gets a
// zero row in R (R_jj = 0, it then counts as dependent and takes no part in later columns); returns true.
// Parallel over the columns l of the trailing update: thread tid owns columns l ≡ tid (mod nthreads).
template <class Ctx>
LRT_FN bool cholesky_upper(const Ctx& c, double* A, int k, int ld, bool tolerate) {
  for (int j = 0; j < k; ++j) {
    const double d = A[j * ld + j];
    const bool bad = !(d > 0.0);
    if (bad && !tolerate) return false;  // every thread read the same d: all return together
    const double rjj = bad ? 0.0 : lrt_sqrt(d);
    c.sync();  // everybody has read the pivot before it is overwritten
    for (int l = j + c.tid; l < k; l += c.nthreads)
      A[j * ld + l] = (l == j) ? rjj : (bad ? 0.0 : A[j * ld + l] / rjj);
    c.sync();
    if (!bad) {
      for (int i = j + 1; i < k; ++i) {
        const double rji = A[j * ld + i];
        for (int l = i + c.tid; l < k; l += c.nthreads) A[i * ld + l] -= rji * A[j * ld + l];
      }
    }
    c.sync();
  }
  return true;
}

// X = R⁻¹ for upper-triangular R (k×k, all R_jj > 0), X upper triangular; X's strict lower part is zeroed.
// Each thread computes whole columns (back substitution of R x = e_col).
template <class Ctx>
LRT_FN void upper_inverse(const Ctx& c, const double* R, int ldr, double* X, int ldx, int k) {
  for (int col = c.tid; col < k; col += c.nthreads) {
    X[col * ldx + col] = 1.0 / R[col * ldr + col];
    for (int i = col - 1; i >= 0; --i) {
      double s = 0.0;
      for (int l = i + 1; l <= col; ++l) s += R[i * ldr + l] * X[l * ldx + col];
      X[i * ldx + col] = -s / R[i * ldr + i];
    }
    for (int i = col + 1; i < k; ++i) X[i * ldx + col] = 0.0;
  }
  c.sync();
}

// One pass of the masked, shifted CholeskyQR for one layer.
//   G: w×w Gram (double); keep: w flags (output on the first pass, input on the second);
//   Rinv_out: w×w in T, = R'⁻¹ with the rows of dropped columns zeroed;
//   W, X: w×w double scratch. Returns a Status (kComplementFailed where the reference would raise).
// scale = max(max diag G, tiny), shift = (kCholqrShift·tol + 2·w·eps64)·scale (the second term covers the
// rounding of a float64 Gram of w columns, which alone exceeds kCholqrShift·tol·scale for float64 inputs);
// first pass: R = chol(G + shift·I), keep_j = R_jj² > tol·scale;
// both: R' = chol(G∘(m mᵀ) + diag(1-m) + shift·diag(m)), Rinv_out = R'⁻¹·diag-rows(m).
template <class T, class Ctx>
LRT_FN int masked_cholqr_factor(const Ctx& c, const double* G, int w, double tol, bool first_pass,
                                unsigned char* keep, T* Rinv_out, double* W, double* X) {
  double scale = 0.0;
  bool finite = true;
  for (int j = 0; j < w; ++j) {
    const double d = G[j * w + j];
    finite = finite && lrt_finite(d);
    scale = lrt_max(scale, d);
  }
  if (!finite) return kComplementFailed;  // torch.linalg.cholesky raises on non-finite input
  scale = lrt_max(scale, kDoubleTiny);
  const double shift = (kCholqrShift * tol + 2.0 * w * kDoubleEps) * scale;
  if (first_pass) {
    for (int idx = c.tid; idx < w * w; idx += c.nthreads) {
      const int i = idx / w, l = idx % w;
      W[idx] = G[idx] + (i == l ? shift : 0.0);
    }
    c.sync();
    cholesky_upper(c, W, w, w, /*tolerate=*/true);
    for (int j = c.tid; j < w; j += c.nthreads) {
      const double rjj = W[j * w + j];
      keep[j] = (rjj * rjj > tol * scale) ? 1 : 0;
    }
    c.sync();
  }
  for (int idx = c.tid; idx < w * w; idx += c.nthreads) {
    const int i = idx / w, l = idx % w;
    const bool mi = keep[i] != 0, ml = keep[l] != 0;
    double v = (mi && ml) ? G[idx] : 0.0;
    if (i == l) v += mi ? shift : 1.0;
    W[idx] = v;
  }
  c.sync();
  if (!cholesky_upper(c, W, w, w, /*tolerate=*/false)) return kComplementFailed;
  upper_inverse(c, W, w, X, w, w);
  for (int idx = c.tid; idx < w * w; idx += c.nthreads) {
    const int i = idx / w;
    Rinv_out[idx] = keep[i] ? T(X[idx]) : T(0);
  }
  c.sync();
  return kOk;
}

// reorthonormalize for the leading k of kk columns: R = chol(G[:k,:k]) (no shift).
//   G: kk×kk Gram (double); R_out, Rinv_out: kk×kk in T, zero outside the leading k×k block;
//   W, X: kk×kk double scratch. Returns kOk or kReorthFailed (the reference then takes Householder QR).
template <class T, class Ctx>
LRT_FN int reorth_factor(const Ctx& c, const double* G, int kk, int k, T* R_out, T* Rinv_out, double* W,
                         double* X) {
  for (int idx = c.tid; idx < k * k; idx += c.nthreads) {
    const int i = idx / k, l = idx % k;
    W[i * kk + l] = G[i * kk + l];
  }
  c.sync();
  const bool ok = cholesky_upper(c, W, k, kk, /*tolerate=*/false);
  if (ok) upper_inverse(c, W, kk, X, kk, k);
  for (int idx = c.tid; idx < kk * kk; idx += c.nthreads) {
    const int i = idx / kk, l = idx % kk;
    const bool in = ok && i < k && l < k && i <= l;
    R_out[idx] = in ? T(W[idx]) : T(0);
    Rinv_out[idx] = in ? T(X[idx]) : T(0);
  }
  c.sync();
  return ok ? kOk : kReorthFailed;
}

}  // namespace lrtrain
