"""Within-/between-class statistics of embeddings: streaming (no embeddings kept) and reference.

Notation. Embeddings x_i ∈ R^d with labels c(i) ∈ {0..K-1}; n_c samples in class c, N = Σ_c n_c;
class means μ_c = (1/n_c) Σ_{i∈c} x_i, global mean μ = (1/N) Σ_i x_i = Σ_c n_c μ_c / N.

    TCV = Σ_i ‖x_i − μ_{c(i)}‖²             total within-class (cluster) variation
    BCV = Σ_c n_c ‖μ_c − μ‖²                between-class variation;  TCV + BCV = Σ_i ‖x_i − μ‖²
    ν   = TCV / (TCV + BCV)                 normalized within-class variability, in [0, 1]
    NC1 = tr(Σ_W Σ_B⁺) / K                  Σ_W = (1/N) Σ_i (x_i − μ_c)(x_i − μ_c)ᵀ, Σ_B = (1/K) Σ_c (μ_c − μ)(μ_c − μ)ᵀ

Why not sums of squares: TCV = Σ_i ‖x_i‖² − Σ_c ‖Σ_{i∈c} x_i‖² / n_c subtracts two large, nearly equal
numbers (post-ReLU embeddings have a large common mean), which loses all digits in float32.
:class:`ClassStats` instead centres each batch on its own class means (a direct sum of squared deviations,
no cancellation) and merges batches with Chan et al.'s update written with float64 class sums
(K × d numbers of state; the batch itself is touched once, in its own dtype).

NC1 of one batch, without forming a d × d matrix: with M̃ (K × d) the rows μ_c − μ of the classes present
(K_b of them), G = M̃ M̃ᵀ and P = X̃ M̃ᵀ (X̃: the batch centred on its class means),

    tr(Σ_W Σ_B⁺)/K_b = tr( (PᵀP/N) · (G⁺)² )                                  (O(N·d·K) work)

because Σ_B = M̃ᵀM̃/K_b has pseudo-inverse K_b·M̃ᵀ(G⁺)²M̃. The monitor reports the average of this
per-batch NC1 over batches (each batch with its own class means).
"""
from __future__ import annotations

import torch

__all__ = ["ClassStats", "check_labels", "batch_class_stats", "nc1_terms", "nc1_from_terms", "scatter_reference",
           "one_hot"]


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    """ValueError unless ``y`` is a 1-D integer tensor with values in [0, num_classes)."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class indices, got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, num_classes - 1 = {num_classes - 1}], "
                         f"got values in [{int(y.min())}, {int(y.max())}]")


def one_hot(y: torch.Tensor, num_classes: int, dtype=torch.float32, check: bool = True) -> torch.Tensor:
    """(N,) int labels in [0, num_classes) -> (N, K) one-hot matrix (ValueError outside the range)."""
    if check:
        check_labels(y, num_classes)
    out = torch.zeros(y.shape[0], num_classes, dtype=dtype, device=y.device)
    out.scatter_(1, y[:, None].long(), 1.0)
    return out


def batch_class_stats(x: torch.Tensor, onehot: torch.Tensor, counts: torch.Tensor):
    """Per-batch class means and deviations.

    x: (N, d) embeddings; onehot: (N, K) in x's dtype; counts: (K,) class counts (float, x's dtype).
    Returns (means (K, d) — zero rows for absent classes —, deviations X̃ = x − μ_{c(i)} (N, d)).
    """
    sums = onehot.mT @ x
    means = sums / counts.clamp_min(1.0)[:, None]
    dev = torch.addmm(x, onehot, means, alpha=-1.0)
    return means, dev


def nc1_terms(dev: torch.Tensor, means: torch.Tensor, counts: torch.Tensor):
    """The two K × K matrices of one batch's NC1: A = PᵀP with P = X̃ M̃ᵀ (dev's dtype), G = M̃ M̃ᵀ (float64).

    dev: (N, d) deviations from the class means; means: (K, d) (zero rows for absent classes);
    counts: (K,). M̃ = (means − μ)·[n_c > 0] with μ the sample-weighted global mean. O(N·d·K) work.
    """
    m64, c64 = means.double(), counts.double()
    Mt = (m64 - (c64 @ m64) / c64.sum().clamp_min(1.0)) * (c64 > 0).double()[:, None]
    P = dev @ Mt.to(dev.dtype).mT
    return P.mT @ P, Mt @ Mt.mT


def nc1_from_terms(A: torch.Tensor, G: torch.Tensor, n, counts: torch.Tensor) -> torch.Tensor:
    """NC1 = tr(A (G⁺)²) / n for one or a stack (..., K, K) of batches, evaluated in float64.

    Σ_c n_c (μ_c − μ) = 0, so w = (n_c) is a null vector of G exactly; in floating point it is only
    approximately null, and 1/λ² would blow up its rounding. Both matrices are therefore projected onto
    w's orthogonal complement first (Π = I − ŵŵᵀ), then eigenvalues of ΠGΠ below K·eps·λ_max (eps of
    G's dtype, float64 from :func:`nc1_terms`) are treated as zero, as ``torch.linalg.pinv`` would.
    """
    eps = torch.finfo(G.dtype).eps
    A, G, w = A.double(), G.double(), counts.double()
    K = G.shape[-1]
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    Pi = torch.eye(K, dtype=G.dtype, device=G.device) - w[..., :, None] * w[..., None, :]
    A, G = Pi @ A @ Pi, Pi @ G @ Pi
    evals, evecs = torch.linalg.eigh(G)
    cut = K * eps * evals[..., -1:].clamp_min(0)
    inv2 = torch.where(evals > cut, 1.0 / evals.clamp_min(1e-300) ** 2, torch.zeros_like(evals))
    Ginv2 = (evecs * inv2[..., None, :]) @ evecs.mT
    return (A * Ginv2).sum((-2, -1)) / torch.as_tensor(n, dtype=G.dtype, device=G.device)


class ClassStats:
    """Streaming per-class counts and sums and the pooled within-class variation (float64 state, K × d).

    Per batch b (centred on its own class means μ_{b,c}, so TCV_b is a plain sum of squares) it adds, in
    float64, the class sums S_{b,c}, the counts n_{b,c} and q_b = TCV_b + Σ_c ‖S_{b,c}‖²/n_{b,c}. Then, with
    S_c = Σ_b S_{b,c} and n_c = Σ_b n_{b,c}, exactly (Chan et al.'s pooled update written with sums)

        TCV = Σ_b q_b − Σ_c ‖S_c‖²/n_c = Σ_b TCV_b + Σ_{b,c} n_{b,c} ‖μ_{b,c} − μ_c‖².

    The subtraction only removes the between-batch spread of the class means — of the order of TCV, not
    of N‖μ‖² as in the one-pass formula — and runs in float64 on sums that both terms share, so no
    digits are lost that matter (tests/test_collapse.py compares with a float64 two-pass reference: 1e-6
    relative on MNIST embeddings, 1e-4 with a common offset of 1e3, where the one-pass float32 formula is off by ~5%).
    Nothing of the batches is kept. Properties: counts (K,), sums (K, d), means (K, d), TCV, BCV,
    ν = TCV/(TCV+BCV).
    """

    def __init__(self, num_classes: int, dim: int, device=None):
        self.num_classes, self.dim = int(num_classes), int(dim)
        kw = dict(dtype=torch.float64, device=device)
        self.count = torch.zeros(self.num_classes, **kw)
        self.sum = torch.zeros(self.num_classes, self.dim, **kw)
        self.q = torch.zeros((), **kw)

    def add(self, sums: torch.Tensor, counts: torch.Tensor, tcv: torch.Tensor) -> None:
        """Add batches: class sums (K, d) or (B, K, d), class counts (K,) or (B, K), TCV_b () or (B,),
        each batch's TCV around its own class means."""
        S = sums.double().reshape(-1, *sums.shape[-2:])
        c = counts.double().reshape(-1, counts.shape[-1])
        self.sum += S.sum(0)
        self.count += c.sum(0)
        self.q += tcv.double().sum() + (S.square().sum(-1) / c.clamp_min(1.0)).sum()

    def update(self, x: torch.Tensor, onehot: torch.Tensor, counts: torch.Tensor):
        """Add batch x (N, d). Returns the batch's (means (K, d), deviations (N, d), TCV_b scalar)."""
        means, dev = batch_class_stats(x, onehot, counts)
        flat = dev.reshape(-1)
        tcv = flat @ flat
        self.add(means * counts[:, None], counts, tcv)
        return means, dev, tcv

    @property
    def total(self) -> torch.Tensor:
        return self.count.sum()

    @property
    def sums(self) -> torch.Tensor:
        return self.sum.clone()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp_min(1.0)[:, None]

    @property
    def global_mean(self) -> torch.Tensor:
        return self.sum.sum(0) / self.total.clamp_min(1.0)

    @property
    def tcv(self) -> torch.Tensor:
        return (self.q - (self.sum.square().sum(1) / self.count.clamp_min(1.0)).sum()).clamp_min(0)

    @property
    def bcv(self) -> torch.Tensor:
        return (self.count * (self.mean - self.global_mean).square().sum(1)).sum()

    @property
    def ntcv(self) -> torch.Tensor:
        t, b = self.tcv, self.bcv
        return t / (t + b) if float(t + b) > 0 else torch.zeros((), dtype=torch.float64)


def scatter_reference(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    """TCV, BCV, ν and NC1 of stored embeddings x (N, d) with labels y (N,), directly in float64.

    Forms Σ_W and Σ_B (d × d) explicitly and uses ``torch.linalg.pinv`` — the definitions, for checking
    the streaming code, not for use in a training loop.
    """
    x = x.double().reshape(x.shape[0], -1)
    K = num_classes
    counts = torch.bincount(y, minlength=K).double()
    present = counts > 0
    means = torch.zeros(K, x.shape[1], dtype=torch.float64).index_add_(0, y, x) / counts.clamp_min(1)[:, None]
    mu = x.mean(0)
    dev = x - means[y]
    tcv = dev.square().sum()
    bcv = (counts * (means - mu).square().sum(1)).sum()
    Sw = dev.mT @ dev / x.shape[0]
    Mt = (means - mu)[present]
    Sb = Mt.mT @ Mt / Mt.shape[0]
    nc1 = torch.trace(Sw @ torch.linalg.pinv(Sb, hermitian=True)) / Mt.shape[0]
    return {"tcv": tcv, "bcv": bcv, "ntcv": tcv / (tcv + bcv), "nc1": nc1, "means": means, "counts": counts}
