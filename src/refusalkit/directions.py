"""Refusal directions from two sets of activations: MD, RMD, WRMD, paired-difference PCA,
projected MD, and (for topic detectors) an L2 logistic regression's weights.

All estimators take [n, d] tensors (one layer) and return a unit [d] vector in float32,
computed in float64. `per_layer` maps an estimator over the layer axis of [n, L, d]
activations. Sign convention: the vector points from the complying / benign side towards
the refusing side, so adding it induces refusal and subtracting it removes refusal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from refusalkit.errors import UserError
from refusalkit.geometry import unit

Estimator = Callable[..., torch.Tensor]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return unit(v).float()


def _check(pos: torch.Tensor, neg: torch.Tensor) -> None:
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise ValueError(f"expected [n, d] and [m, d] tensors, got {tuple(pos.shape)} and "
                         f"{tuple(neg.shape)}")
    if len(pos) == 0 or len(neg) == 0:
        raise UserError("a direction needs at least one prompt on each side; one side is empty")


def _weights(n: int, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = w.double().abs()
    if w.shape != (n,) or float(w.sum()) <= 0:
        raise ValueError("weights must be one non-negative value per example, not all zero")
    return w / w.sum()


def mean_difference(
    pos: torch.Tensor, neg: torch.Tensor, *, normalize: bool = True
) -> torch.Tensor:
    """MD: μ_pos − μ_neg (Arditi et al.)."""
    _check(pos, neg)
    v = pos.double().mean(0) - neg.double().mean(0)
    return _unit(v) if normalize else v.float()


def ridge_solve(x: torch.Tensor, w: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    """(Σ + λI)⁻¹ rhs with Σ = Σ_i w_i (x_i − μ)(x_i − μ)ᵀ, μ = Σ_i w_i x_i, w summing to 1.

    With n < d the d×d system is never formed: by Woodbury, with U = diag(√w)(X − μ),
    (λI + UᵀU)⁻¹ b = (b − Uᵀ (λI + UUᵀ)⁻¹ U b) / λ, a Cholesky solve on the n×n Gram matrix.
    """
    if lam <= 0:
        raise ValueError("the ridge λ must be positive")
    x = x.double()
    mu = (w[:, None] * x).sum(0)
    u = w.sqrt()[:, None] * (x - mu)
    n, d = u.shape
    rhs = rhs.double()
    if n < d:
        gram = u @ u.T
        gram.diagonal().add_(lam)
        chol = torch.linalg.cholesky(gram)
        inner = torch.cholesky_solve((u @ rhs)[:, None], chol)[:, 0]
        return (rhs - u.T @ inner) / lam
    cov = u.T @ u
    cov.diagonal().add_(lam)
    return torch.cholesky_solve(rhs[:, None], torch.linalg.cholesky(cov))[:, 0]


def rmd(
    refused: torch.Tensor, complied: torch.Tensor, *, lam: float = 1e-2, normalize: bool = True
) -> torch.Tensor:
    """RMD: (Σ_C + λI)⁻¹ (μ_R − μ_C), Σ_C the (biased) covariance of the complying class.

    The Fisher/LDA direction with shrinkage: within-class directions of large variance are
    down-weighted, isolating refuse-vs-answer from incidental topic variation.
    """
    _check(refused, complied)
    delta = refused.double().mean(0) - complied.double().mean(0)
    v = ridge_solve(complied, _weights(len(complied), None), delta, lam)
    return _unit(v) if normalize else v.float()


def wrmd(
    refused: torch.Tensor,
    complied: torch.Tensor,
    *,
    w_refused: torch.Tensor | None = None,
    w_complied: torch.Tensor | None = None,
    neutral: torch.Tensor | None = None,
    lam: float = 1e-2,
    normalize: bool = True,
) -> torch.Tensor:
    """WRMD — confidence-weighted RMD with a neutral reference set (our reconstruction).

    Exactly what is computed:
    - weights w_i = |c_i| normalised to sum 1 within each class (uniform when not given),
      so confidently judged prompts count more;
    - δ = Σ_R w_i x_i − Σ_C w_i x_i (weighted class means);
    - the covariance is taken over the *answer pool* A = C ∪ N: complying prompts with their
      weights and neutral (ordinary, off-topic) prompts uniformly, each group holding half the
      mass, centred on the pool mean. The topic contrast between C (on-topic, answered) and N
      (off-topic, answered) is then within-class variance and is shrunk out, so the vector
      encodes "refuse vs answer", not "topic";
    - v = (Σ_A + λI)⁻¹ δ, normalised.
    Without a neutral set and with equal weights this is exactly RMD.
    """
    _check(refused, complied)
    wr = _weights(len(refused), w_refused)
    wc = _weights(len(complied), w_complied)
    delta = (wr[:, None] * refused.double()).sum(0) - (wc[:, None] * complied.double()).sum(0)
    pool, wpool = complied, wc
    if neutral is not None and len(neutral) > 0:
        pool = torch.cat([complied.double(), neutral.double()])
        wpool = torch.cat([wc * 0.5, _weights(len(neutral), None) * 0.5])
    v = ridge_solve(pool, wpool, delta, lam)
    return _unit(v) if normalize else v.float()


def pca_paired(pos: torch.Tensor, neg: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """First singular direction of paired differences pos_i − neg_i (RepE-style).

    Pairs are taken in order (the shorter side sets the count); the sign is chosen to agree
    with the mean difference, so the convention matches the other estimators.
    """
    _check(pos, neg)
    n = min(len(pos), len(neg))
    diffs = pos[:n].double() - neg[:n].double()
    # Uncentred on purpose: the consistent part of the differences is the signal; centring
    # would remove it and leave only the pair-to-pair noise.
    v = torch.linalg.svd(diffs, full_matrices=False).Vh[0]
    if float(v @ (pos.double().mean(0) - neg.double().mean(0))) < 0:
        v = -v
    return _unit(v) if normalize else v.float()


def projected(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """MD with the part along the benign mean removed (grimjim's "projected abliteration",
    Heretic 1.4's default): ablating μ_pos − μ_neg also shrinks the component every ordinary
    prompt shares with it; only the part orthogonal to unit(μ_neg) is refusal-specific."""
    _check(pos, neg)
    r = mean_difference(pos, neg).double()
    g = neg.double().mean(0)
    g = g / g.norm().clamp_min(1e-12)
    return _unit(r - (r @ g) * g)


def logistic(pos: torch.Tensor, neg: torch.Tensor, *, lam: float = 1e-2,
             normalize: bool = True, max_iter: int = 200) -> torch.Tensor:
    """The weight vector of an L2-penalised logistic regression pos-vs-neg, classes weighted
    equally, on coordinates standardised by the negatives (residual streams carry a few
    coordinates orders of magnitude larger than the rest). Returned in raw coordinates, so
    a projection on it is the classifier's score up to a constant.

    Why beside RMD: LDA's direction is optimal when both classes share one covariance; a topic
    asked as questions *and* given as instructions is two clusters, and a discriminative fit
    puts its weight where the classes actually meet (measured on topic gates, RESULTS.md).
    Deterministic: full-batch L-BFGS from zero.
    """
    _check(pos, neg)
    if lam <= 0:
        raise ValueError("the logistic penalty λ must be positive")
    # callers may hold no_grad or inference_mode (capture does); the fit needs autograd
    with torch.inference_mode(False), torch.enable_grad():
        n = neg.double().clone()
        mu, sd = n.mean(0), n.std(0).clamp_min(1e-6)
        xp, xn = (pos.double().clone() - mu) / sd, (n - mu) / sd
        w = torch.zeros(pos.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-9, tolerance_change=1e-12)
        sp = torch.nn.functional.softplus

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = (0.5 * sp(-(xp @ w + b)).mean() + 0.5 * sp(xn @ w + b).mean()
                    + 0.5 * lam * (w @ w))
            loss.backward()
            return loss

        opt.step(closure)
        v = w.detach() / sd
    return _unit(v) if normalize else v.float()


METHODS: dict[str, Estimator] = {
    "md": mean_difference,
    "rmd": rmd,
    "wrmd": wrmd,
    "pca": pca_paired,
    "projected": projected,
}


def get_method(name: str) -> Estimator:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(
            f"unknown direction method '{name}'; use one of {', '.join(METHODS)}"
        ) from None


def per_layer(
    estimator: Estimator, pos: torch.Tensor, neg: torch.Tensor, **kwargs: object
) -> torch.Tensor:
    """Apply an estimator to every layer of [n, L, d] activations → [L, d].

    Keyword tensors whose first axis is the example axis of a [n, L, d] shape (e.g. `neutral`)
    are sliced per layer as well.
    """
    if pos.ndim != 3 or neg.ndim != 3:
        raise ValueError("per_layer expects [n, L, d] activations")
    out = []
    for layer in range(pos.shape[1]):
        kw = {k: (v[:, layer] if isinstance(v, torch.Tensor) and v.ndim == 3 else v)
              for k, v in kwargs.items()}
        out.append(estimator(pos[:, layer], neg[:, layer], **kw))
    return torch.stack(out)


def by_category(
    estimator: Estimator,
    categories: Mapping[str, torch.Tensor],
    baseline: torch.Tensor,
    **kwargs: object,
) -> dict[str, torch.Tensor]:
    """One direction per named category against a shared baseline ([n, L, d] → [L, d] each)."""
    return {name: per_layer(estimator, acts, baseline, **kwargs)
            for name, acts in categories.items()}
