// The fused DLRT layer update for a group of L layers of one shape, dtype and device (orchestration).
//
// Same spec as lrtrain/optim/step.py (reference_update), batched over the layers:
//   1. Q_U = orth_complement(U, G_K[:, :a], a_U = min(a, m - r)), Q_V likewise: X ← X - U(UᵀX); masked shifted
//      CholeskyQR2 (first-pass Gram in float64; dependent columns exactly zero; where a_U < a, only the
//      first a_U kept columns go into the second pass, and the kept columns are moved to the front)
//                                                                         [bmm + Backend::masked_cholqr]
//   2. Ŝ = [[S - lr·D_S, -lr·D_Lᵀ Q_V], [-lr·Q_Uᵀ D_K, 0]]                  [bmm]
//   3. Ŝ = P Σ Qᵀ (one-sided Jacobi, or LAPACK on CPU), rank k = the τ-rank + spare
//      (lrtrain.rank.tolerance_rank), on the device                         [Backend::svd]
//   4. U_raw = [U, Q_U] P_k, CholeskyQR: U_new = U_raw R_u⁻¹ (V likewise), S_new = R_u Σ_k R_vᵀ
//                                                                         [bmm + Backend::reorth]
// Ranks stay on the device: P_k is P with its columns ≥ k zeroed, so every tensor keeps a padded width
// and only the final slicing needs k. fused_update_group synchronizes nothing; the Python dispatcher
// (lrtrain/ext/dispatch.py) launches every group, then copies all (rank, status) pairs of a device to the
// host at once — one synchronization per step — and slices each layer's results to its rank.
//
// Backend provides the three small-matrix kernels on raw pointers (csrc/cpu/backend.h: OpenMP over
// layers; csrc/cuda/backend.h: one CUDA block per layer). GEMMs are at::bmm (MKL / cuBLAS).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../kernels/hd.h"
#include "../kernels/jacobi_svd.h"

namespace lrtrain {

using at::Tensor;

// Per-layer scratch bytes for all three kernels (reused one after the other).
template <class T>
inline size_t layer_workspace_bytes(int w_max, int p, int q) {
  const int kk = std::min(p, q);
  size_t b = std::max({size_t(2) * w_max * w_max * sizeof(double), jacobi_smem_bytes<T>(p, q),
                       size_t(2) * kk * kk * sizeof(double)});
  return (b + 255) / 256 * 256;
}

struct Workspace {
  Tensor buf;
  size_t stride;
  char* base() const { return static_cast<char*>(buf.data_ptr()); }
};

// (L, ...) view of L same-shape tensors: a copy for L > 1, a free view of the tensor for L = 1.
inline Tensor stack_layers(const std::vector<Tensor>& xs) { return xs.size() == 1 ? xs[0].unsqueeze(0) : at::stack(xs); }

// c = 2^-floor(e/2) per layer with max diag G = f·2^e (frexp): c² max diag G in [0.5, 2); (L, 1) double.
// A zero Gram takes max diag = DBL_MIN, a non-finite one c = 1 (as lrtrain.optim.linalg.column_scale).
inline Tensor column_scale(const Tensor& G) {
  Tensor d = G.diagonal(0, -2, -1).amax(-1, /*keepdim=*/true);
  d = at::where(at::isfinite(d), d.clamp_min(kDoubleTiny), at::ones_like(d));
  Tensor e = std::get<1>(at::frexp(d));
  return at::ldexp(at::ones_like(d), at::neg(at::div(e, 2, "floor")));
}

// (L, rows, w) → (L, rows, width), width ≤ w: orthonormal columns spanning (I - UUᵀ)X0 (see step 1 above).
template <class Backend, class T>
Tensor orth_complement_batched(const Tensor& U, const Tensor& X0, int64_t width, const Tensor& status,
                               const Workspace& ws, void* stream) {
  const int64_t L = U.size(0), w = X0.size(2);
  if (width == 0) return X0.narrow(2, 0, 0);
  const double tol = Num<T>::dependent_tol;
  Tensor X = at::baddbmm(X0, U, at::bmm(U.mT(), X0), /*beta=*/1, /*alpha=*/-1);
  Tensor Xd = X.to(at::kDouble);
  Tensor G = at::bmm(Xd.mT(), Xd);
  // column_scale (lrtrain/optim/linalg.py): factorize c²G for cX, c a power of two, so that R⁻¹ of a tiny
  // X stays representable in T; exact, so results are unchanged where the unscaled pass was fine.
  const Tensor c = column_scale(G).unsqueeze(-1);  // (L, 1, 1)
  X = (Xd * c).to(X.scalar_type());
  G = (G * (c * c)).contiguous();
  Tensor keep = at::empty({L, w}, X.options().dtype(at::kByte));
  Tensor Rinv = at::empty({L, w, w}, X.options());
  Backend::template masked_cholqr<T>(G.data_ptr<double>(), L, int(w), tol, true, keep.data_ptr<uint8_t>(),
                                     Rinv.data_ptr<T>(), status.data_ptr<int>(), ws.base(), ws.stride, stream);
  Tensor Q = at::bmm(X, Rinv);
  if (width < w)  // kept columns past `width` are rounding residue of an exhausted complement
    keep.mul_(keep.cumsum(1).le(width).to(at::kByte));
  Q = at::baddbmm(Q, U, at::bmm(U.mT(), Q), 1, -1);  // remove the rounding leak into span(U)
  Tensor G2 = at::bmm(Q.mT(), Q).to(at::kDouble).contiguous();
  Backend::template masked_cholqr<T>(G2.data_ptr<double>(), L, int(w), tol, false, keep.data_ptr<uint8_t>(),
                                     Rinv.data_ptr<T>(), status.data_ptr<int>(), ws.base(), ws.stride, stream);
  Q = at::bmm(Q, Rinv);
  if (width == w) return Q;
  // Kept columns first, in their order (a stable sort of the keep flags), then the first `width`.
  Tensor order = std::get<1>(at::sort(keep, /*stable=*/true, /*dim=*/1, /*descending=*/true)).narrow(1, 0, width);
  return Q.gather(2, order.unsqueeze(1).expand({L, Q.size(1), width}));
}

// [U, Q_U] P = U P[:r] + Q_U P[r:] (L, rows, kw).
inline Tensor rotate(const Tensor& U, const Tensor& QU, const Tensor& P) {
  const int64_t r = U.size(2), a = QU.size(2);
  Tensor out = at::bmm(U, P.narrow(1, 0, r));
  return a == 0 ? out : at::baddbmm(out, QU, P.narrow(1, r, a));
}

// U_raw (L, rows, kk) → U_raw R⁻¹ and R (L, kk, kk), both zero beyond each layer's rank.
template <class Backend, class T>
std::pair<Tensor, Tensor> reorthonormalize_batched(const Tensor& Uraw, const Tensor& rank, const Tensor& status,
                                                   const Workspace& ws, void* stream) {
  const int64_t L = Uraw.size(0), kk = Uraw.size(2);
  Tensor G = at::bmm(Uraw.mT(), Uraw).to(at::kDouble).contiguous();
  Tensor R = at::empty({L, kk, kk}, Uraw.options());
  Tensor Rinv = at::empty({L, kk, kk}, Uraw.options());
  Backend::template reorth<T>(G.data_ptr<double>(), L, int(kk), rank.data_ptr<int>(), R.data_ptr<T>(),
                              Rinv.data_ptr<T>(), status.data_ptr<int>(), ws.base(), ws.stride, stream);
  return {at::bmm(Uraw, Rinv), R};
}

// The SVD step alone, for the tests and benchmarks: A (L,p,q) → [P (L,p,kk), sigma (L,kk), Q (L,q,kk),
// rank (L), status (L)] by the Jacobi kernel with the rank rule; columns ≥ rank are zero.
template <class Backend, class T>
std::vector<Tensor> jacobi_svd_batched(const Tensor& A, double tau, int64_t min_rank, int64_t max_rank,
                                       int64_t max_sweeps, void* stream) {
  at::NoGradGuard no_grad;
  const int64_t L = A.size(0), p = A.size(1), q = A.size(2), kk = std::min(p, q);
  Tensor Ac = A.contiguous();
  auto o = A.options();
  Tensor P = at::empty({L, p, kk}, o), Q = at::empty({L, q, kk}, o), sig = at::empty({L, kk}, o);
  Tensor rank = at::empty({L}, o.dtype(at::kInt)), status = at::zeros({L}, o.dtype(at::kInt));
  Tensor maxr = at::full({L}, max_rank, o.dtype(at::kInt));
  const size_t stride = (jacobi_smem_bytes<T>(int(p), int(q)) + 255) / 256 * 256;
  Tensor ws = at::empty({int64_t(stride) * L}, o.dtype(at::kByte));
  Backend::template svd<T>(kSvdJacobi, Ac.data_ptr<T>(), L, int(p), int(q), maxr.data_ptr<int>(), tau, int(min_rank), 0,
                           int(max_sweeps), P.data_ptr<T>(), sig.data_ptr<T>(), Q.data_ptr<T>(), rank.data_ptr<int>(),
                           status.data_ptr<int>(), static_cast<char*>(ws.data_ptr()), stride, stream);
  return {P, sig, Q, rank, status};
}

// Padded results of one group, on the group's device, nothing synchronized: layer l's update is
// U[l][:, :k], S[l][:k, :k], V[l][:, :k], R_U[l][:, :k], R_V[l][:, :k] with k = rank[l] (columns ≥ k are
// zero). The widths are kw ≥ every rank (exactly max(rank) where the ranks live on the host).
struct GroupTensors {
  Tensor U, S, V, RU, RV, rank, status;  // (L,m,kw) (L,kw,kw) (L,n,kw) (L,r,kw) (L,r,kw) (L) int (L) int
  // Per layer [U, S, V, R_U, R_V] (padded views) for the Python binding.
  std::vector<std::vector<Tensor>> layers() const {
    std::vector<std::vector<Tensor>> out;
    const int64_t L = rank.size(0);
    out.reserve(L);
    for (int64_t l = 0; l < L; ++l) out.push_back({U[l], S[l], V[l], RU[l], RV[l]});
    return out;
  }
};

// One param group's update settings: the fields of lrtrain.update.dispatch.UpdateArgs, in the same order
// (the Python side checks the names the binding reports, UPDATE_ARGS, against its own).
struct UpdateArgs {
  std::vector<int64_t> max_rank;  // per layer; kNoRankCap: no cap
  int64_t augment = kAugmentAll;  // new columns per side: r (kAugmentAll), else min(r, augment)
  double lr = 0.0;
  double tau = 0.0;
  int64_t min_rank = 1;
  int64_t spare = 0;
  int64_t max_sweeps = 0;  // Jacobi sweeps before a layer reports kNoConvergence
};

// One layer's inputs, in the order of lrtrain.update.spec.LayerStep's tensor fields (LAYER_INPUTS).
struct LayerInputs {
  Tensor U, S, V, GK, GL, DK, DL, DS;  // (m,r) (r,r) (n,r) (m,≥a) (n,≥a) (m,r) (n,r) (r,r); S = decay(S)
};

// A layer's inputs from the binding's list of 8 tensors.
inline LayerInputs layer_inputs(const std::vector<Tensor>& t) {
  TORCH_CHECK(t.size() == 8, "a layer's inputs are 8 tensors [U, S, V, G_K, G_L, D_K, D_L, D_S], got ", t.size());
  return {t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]};
}

// max_ranks (host) as an int tensor on `device`: a plain CPU tensor there, else copied without blocking
// from pinned memory (the caching host allocator keeps the block alive until the copy is done).
inline Tensor max_rank_tensor(const std::vector<int64_t>& max_ranks, const at::Device& device) {
  const int64_t L = int64_t(max_ranks.size());
  const bool cuda = device.is_cuda();
  Tensor h = at::empty({L}, at::TensorOptions().dtype(at::kInt).pinned_memory(cuda));
  int* p = h.data_ptr<int>();
  for (int64_t l = 0; l < L; ++l) p[l] = int(max_ranks[l]);
  return cuda ? h.to(device, at::kInt, /*non_blocking=*/true) : h;
}

// (L, ...) stack of one input field over the layers.
template <class Field>
Tensor stack_field(const std::vector<LayerInputs>& layers, Field f) {
  std::vector<Tensor> xs;
  xs.reserve(layers.size());
  for (const auto& x : layers) xs.push_back(x.*f);
  return stack_layers(xs);
}

// The fused update of L layers of one shape (same m, n, r, dtype, device; inputs may be strided views).
// Launches everything, synchronizes nothing (on a device backend): the caller reads rank/status back, one
// copy for all its groups.
template <class Backend, class T>
GroupTensors fused_update_group(const std::vector<LayerInputs>& layers, const UpdateArgs& args, int svd_method,
                                void* stream) {
  at::NoGradGuard no_grad;
  const int64_t L = int64_t(layers.size());
  const std::vector<int64_t>& max_ranks = args.max_rank;
  TORCH_CHECK(L > 0 && max_ranks.size() == size_t(L), "fused_update_group: one max_rank per layer");
  const int64_t m = layers[0].U.size(0), r = layers[0].U.size(1), n = layers[0].V.size(0);
  for (const auto& x : layers)
    TORCH_CHECK(x.U.size(0) == m && x.U.size(1) == r && x.V.size(0) == n && x.V.size(1) == r && x.S.size(0) == r &&
                    x.S.size(1) == r && x.GK.size(0) == m && x.GL.size(0) == n,
                "fused_update_group: the layers of a batched group must share m, n and the rank r");
  const int64_t a = args.augment == kAugmentAll ? r : std::min(r, args.augment);
  const double lr = args.lr;
  const int64_t aU = std::min(a, m - r), aV = std::min(a, n - r);
  const int64_t p = r + aU, q = r + aV, kk = std::min(p, q);
  auto opts = layers[0].U.options();

  std::vector<Tensor> xu, xv;
  for (const auto& x : layers) {
    xu.push_back(x.GK.narrow(1, 0, aU == 0 ? 0 : a));
    xv.push_back(x.GL.narrow(1, 0, aV == 0 ? 0 : a));
  }
  Tensor U = stack_field(layers, &LayerInputs::U), V = stack_field(layers, &LayerInputs::V);
  Tensor status = at::zeros({L}, opts.dtype(at::kInt));
  Tensor max_rank = max_rank_tensor(max_ranks, opts.device());
  Workspace ws{Tensor(), layer_workspace_bytes<T>(int(a), int(p), int(q))};
  ws.buf = at::empty({int64_t(ws.stride) * L}, opts.dtype(at::kByte));

  // 1. augment
  Tensor QU = orth_complement_batched<Backend, T>(U, stack_layers(xu), aU, status, ws, stream);
  Tensor QV = orth_complement_batched<Backend, T>(V, stack_layers(xv), aV, status, ws, stream);
  // 2. Galerkin core
  Tensor core = at::zeros({L, p, q}, opts);
  core.narrow(1, 0, r).narrow(2, 0, r).copy_(at::sub(stack_field(layers, &LayerInputs::S), stack_field(layers, &LayerInputs::DS).mul(lr)));
  if (aV > 0) core.narrow(1, 0, r).narrow(2, r, aV).copy_(at::bmm(stack_field(layers, &LayerInputs::DL).mT(), QV).mul_(-lr));
  if (aU > 0) core.narrow(1, r, aU).narrow(2, 0, r).copy_(at::bmm(QU.mT(), stack_field(layers, &LayerInputs::DK)).mul_(-lr));
  // 3. SVD + rank (on the device)
  Tensor P = at::empty({L, p, kk}, opts), Q = at::empty({L, q, kk}, opts), sig = at::empty({L, kk}, opts);
  Tensor rank = at::empty({L}, opts.dtype(at::kInt));
  Backend::template svd<T>(svd_method, core.data_ptr<T>(), L, int(p), int(q), max_rank.data_ptr<int>(), args.tau,
                           int(args.min_rank), int(args.spare), int(args.max_sweeps), P.data_ptr<T>(), sig.data_ptr<T>(),
                           Q.data_ptr<T>(), rank.data_ptr<int>(), status.data_ptr<int>(), ws.base(), ws.stride, stream);
  // 4. rotate the bases, re-orthonormalize, fold R into S. Every rank is ≤ kw, so the padded width can
  // drop to kw: the largest max_rank (kNoRankCap: no cap) in general, the largest chosen rank where the ranks
  // live on the host (CPU).
  int64_t kw = 0;
  for (int64_t mr : max_ranks) kw = std::max<int64_t>(kw, rank_cap(int(mr), int(kk)));
  if (Backend::kHostRanks) {
    const int* rk = rank.data_ptr<int>();
    kw = *std::max_element(rk, rk + L);
  }
  kw = std::max<int64_t>(1, std::min(kw, kk));
  Tensor Pk = P.narrow(2, 0, kw), Qk = Q.narrow(2, 0, kw);
  auto [Unew, Ru] = reorthonormalize_batched<Backend, T>(rotate(U, QU, Pk), rank, status, ws, stream);
  auto [Vnew, Rv] = reorthonormalize_batched<Backend, T>(rotate(V, QV, Qk), rank, status, ws, stream);
  Tensor Snew = at::bmm(Ru * sig.narrow(1, 0, kw).unsqueeze(1), Rv.mT());
  Tensor bad = at::logical_not(at::isfinite(Snew).flatten(1).all(1)).to(at::kInt) * int(kNonFinite);
  status.bitwise_or_(bad);
  return {Unew, Snew, Vnew, Pk.narrow(1, 0, r), Qk.narrow(1, 0, r), rank, status};
}

}  // namespace lrtrain
