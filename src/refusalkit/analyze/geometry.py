"""Pure analysis functions for refusal geometry (paper B, METHODS.md §2): tensors in, numbers out.

Nothing here touches a model. Directions are [d] or [k, d] tensors; statistics are computed in
float64. Every function that samples takes an explicit seed, so results are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from refusalkit.geometry import auc, unit


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosines of [k, d] vectors → symmetric [k, k] with a unit diagonal."""
    u = unit(vectors)
    c = (u @ u.T).clamp(-1.0, 1.0)
    c = (c + c.T) / 2
    c.fill_diagonal_(1.0)
    return c


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened (upper triangle only)."""
    i, j = torch.triu_indices(c.shape[0], c.shape[1], offset=1)
    return c[i, j]


def stability(directions: torch.Tensor) -> float:
    """Mean pairwise cosine of R directions estimated on independent resamples ([R, d]).

    1 means every resample gives the same direction; for pure noise in d dimensions it is
    ≈ 0. This is paper B's within-split stability.
    """
    if directions.shape[0] < 2:
        raise ValueError("stability needs at least two resampled directions")
    return float(off_diagonal(cosine_matrix(directions)).mean())


def n_for_stability(stability: float, n_measured: int, target: float = 0.9) -> float:
    """Prompts a side at which the same noise model expects `target` stability: the answer
    to "why is this split below target" when it is sampling noise (inf for c ≤ 0)."""
    if stability <= 0:
        return float("inf")
    return n_measured * (1.0 / stability - 1.0) / (1.0 / target - 1.0)


def projected_stability(stability: float, n_measured: int, n_target: int,
                        min_n: int = 8) -> float:
    """Stability expected at n_target prompts a side from one measured at n_measured.

    Model: a resample's direction is δ + ε with ‖ε‖² ∝ 1/n, so the cosine of two independent
    estimates is c_n ≈ ‖δ‖² / (‖δ‖² + e/n) and 1/c − 1 scales as 1/n (Spearman–Brown for
    directions): c_target = 1 / (1 + (1/c − 1)·n_measured/n_target). Lets splits whose
    pools forced smaller resamples be compared at the same n. NaN for c ≤ 0, and when
    fewer than `min_n` prompts a side were measured (one cosine of tiny resamples is too
    noisy to extrapolate from).
    """
    if stability <= 0 or n_measured < min_n:
        return float("nan")
    return 1.0 / (1.0 + (1.0 / stability - 1.0) * n_measured / n_target)


def resample_indices(pool: int, n: int, resamples: int, seed: int) -> list[torch.Tensor]:
    """R disjoint index sets drawn from range(pool), each of size min(n, pool // R).

    Disjoint sets make the resamples truly independent (overlap would inflate stability), so
    a small pool gives smaller sets rather than shared prompts. Only when pool < 2·R (no two
    disjoint sets of 2) do sets of size min(n, pool) overlap; `mean_overlap` reports it.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(pool, generator=g)
    k = min(n, pool // resamples)
    if k >= 2:
        return [perm[r * k:(r + 1) * k].sort().values for r in range(resamples)]
    k = min(n, pool)
    return [torch.randperm(pool, generator=g)[:k].sort().values for _ in range(resamples)]


def mean_overlap(index_sets: Sequence[torch.Tensor]) -> float:
    """Mean fraction of shared members over all pairs of index sets (0 = disjoint)."""
    fr = []
    for a in range(len(index_sets)):
        for b in range(a + 1, len(index_sets)):
            sa, sb = set(index_sets[a].tolist()), set(index_sets[b].tolist())
            fr.append(len(sa & sb) / max(1, min(len(sa), len(sb))))
    return float(sum(fr) / len(fr)) if fr else 0.0


def mean_difference_dirs(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Unit μ_pos − μ_neg along the example axis; works for [n, d] and [n, L, d] inputs."""
    return unit(pos.double().mean(0) - neg.double().mean(0)).float()


def resampled_directions(pos: torch.Tensor, neg: torch.Tensor, n: int, resamples: int,
                         seed: int) -> tuple[torch.Tensor, dict[str, float | int]]:
    """Difference-in-means directions on R independent resamples → ([R, ...], info).

    info: `n` = prompts per side in each resample (smaller than requested when a pool is
    short), `overlap` = mean share of prompts two resamples have in common (0 = disjoint).
    """
    ip = resample_indices(len(pos), n, resamples, seed)
    ineg = resample_indices(len(neg), n, resamples, seed + 7919)
    dirs = torch.stack([mean_difference_dirs(pos[a], neg[b])
                        for a, b in zip(ip, ineg, strict=True)])
    info = {"n": min(len(ip[0]), len(ineg[0])),
            "overlap": (mean_overlap(ip) + mean_overlap(ineg)) / 2}
    return dirs, info


# ---------------------------------------------------------------- where the signal lives

def separability(pos: torch.Tensor, neg: torch.Tensor, *, folds: int = 4, seed: int = 0,
                 direction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                 ) -> float:
    """Cross-validated AUC of a linear probe ([n, d] vs [m, d]); by default the difference in
    means.

    The direction is fitted on the other folds and scores the held-out fold, so with d ≫ n
    the number is not inflated by fitting noise (in-sample AUC is ~1 for any two sets).
    0.5 = no linear signal along the class-mean axis, 1 = perfectly separated.
    `direction(train_pos, train_neg)` (boolean row masks) fits another estimator — one that
    needs per-row weights or a reference set reads them through the masks.
    """
    folds = max(2, min(folds, len(pos), len(neg)))
    g = torch.Generator().manual_seed(seed)
    fp = torch.randperm(len(pos), generator=g) % folds
    fn = torch.randperm(len(neg), generator=g) % folds
    sp, sn = torch.empty(len(pos), dtype=torch.float64), torch.empty(len(neg), dtype=torch.float64)
    for k in range(folds):
        tp, tn = fp == k, fn == k
        mid = (pos[~tp].double().mean(0) + neg[~tn].double().mean(0)) / 2
        v = (unit(pos[~tp].double().mean(0) - neg[~tn].double().mean(0)) if direction is None
             else direction(~tp, ~tn).double())
        sp[tp] = (pos[tp].double() - mid) @ v
        sn[tn] = (neg[tn].double() - mid) @ v
    return auc(sp, sn)


def separability_profile(pos: torch.Tensor, neg: torch.Tensor, *, folds: int = 4,
                         seed: int = 0) -> list[float]:
    """Cross-validated AUC per layer of [n, L, d] / [m, L, d] activations."""
    return [separability(pos[:, layer], neg[:, layer], folds=folds, seed=seed)
            for layer in range(pos.shape[1])]


def participation_ratio(v: torch.Tensor) -> float:
    """(Σ v_i²)² / Σ v_i⁴: the effective number of coordinates a vector spreads over.

    1 for a one-hot vector, d for a vector with equal magnitude on all d coordinates.
    """
    sq = v.double().flatten() ** 2
    return float(sq.sum() ** 2 / (sq**2).sum().clamp_min(1e-300))


def count_for_fraction(energies: torch.Tensor, fraction: float = 0.9,
                       total: float | None = None) -> int:
    """How many leading entries of a non-negative sequence hold `fraction` of `total`
    (default: of their sum). If they never do, the length of the sequence."""
    e = energies.double().flatten()
    total = float(e.sum()) if total is None else float(total)
    if total <= 0:
        return 0
    cum = torch.cumsum(e, 0) / total
    return min(len(e), int((cum < fraction - 1e-9).sum()) + 1)


def principal_axes(reference: torch.Tensor) -> torch.Tensor:
    """Principal axes [k, d] of [N, d] activations, by decreasing variance (float64).

    Axes with (numerically) zero variance are dropped, so k ≤ min(N − 1, d). Uses the d×d
    covariance when N ≥ d (one eigendecomposition), the SVD of the data otherwise.
    """
    x = reference.double()
    centred = x - x.mean(0)
    if centred.shape[0] >= centred.shape[1]:
        evals, evecs = torch.linalg.eigh(centred.T @ centred)
        order = evals.argsort(descending=True)
        evals, axes = evals[order], evecs[:, order].T
        return axes[evals > evals[0].clamp_min(1e-300) * 1e-10]
    _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
    return vh[sv > sv.max() * 1e-10]


def difference_pcs(delta: torch.Tensor, axes: torch.Tensor,
                   fraction: float = 0.9) -> dict[str, int | float]:
    """How many principal components carry `fraction` of ‖δ‖².

    `axes` = `principal_axes` of a broad reference set of activations at the same layer
    (e.g. every prompt of every split), so all splits are measured in one shared basis of
    the model's natural variation. `leading`: PCs taken in variance order — is δ in the
    dominant axes (small) or spread over many minor ones (large)? `minimal`: PCs taken by
    their share of ‖δ‖² — the fewest that can hold it. `captured` is the share of ‖δ‖²
    inside the PCs' span (< 1 when the reference has fewer prompts than dimensions);
    counts are of ‖δ‖² itself.
    """
    delta = delta.double().flatten()
    total = float(delta @ delta)
    energy = (axes.double() @ delta) ** 2
    return {
        "leading": count_for_fraction(energy, fraction, total),
        "minimal": count_for_fraction(energy.sort(descending=True).values, fraction, total),
        "n_pcs": len(axes),
        "captured": float(energy.sum() / max(total, 1e-300)),
    }


# ---------------------------------------------------------------- trade-off curves

def orr_at_rr(rr: Sequence[float], orr: Sequence[float], grid: torch.Tensor) -> torch.Tensor:
    """ORR as a function of RR, piecewise linear through a curve's points, on an RR grid.

    Points are sorted by RR; equal RR values are merged by their mean ORR. Grid values
    outside the curve's RR range give NaN (no extrapolation).
    """
    by: dict[float, list[float]] = {}
    for r, o in zip(rr, orr, strict=True):
        by.setdefault(float(r), []).append(float(o))
    xs = sorted(by)
    ys = [sum(by[x]) / len(by[x]) for x in xs]
    x = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    grid = grid.double()
    out = torch.full((len(grid),), float("nan"), dtype=torch.float64)
    inside = (grid >= x[0] - 1e-12) & (grid <= x[-1] + 1e-12)
    if len(x) == 1:
        out[inside] = y[0]
        return out
    seg = (torch.searchsorted(x, grid.clamp(x[0], x[-1]), right=True) - 1).clamp(0, len(x) - 2)
    t = (grid - x[seg]) / (x[seg + 1] - x[seg])
    val = y[seg] + t * (y[seg + 1] - y[seg])
    out[inside] = val[inside]
    return out


def tradeoff_gaps(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                  grid_points: int = 101) -> dict[str, object]:
    """Largest and mean |ΔORR| between any two curves at matched RR (over shared RR range).

    `curves` maps a direction to (RR values, ORR values) over its α sweep. Pairs whose RR
    ranges share fewer than two grid points are skipped (listed in `no_overlap`).
    """
    grid = torch.linspace(0, 1, grid_points, dtype=torch.float64)
    interp = {k: orr_at_rr(rr, orr, grid) for k, (rr, orr) in curves.items()}
    names = list(curves)
    best, best_pair, means, pairs, no_overlap = float("nan"), None, [], {}, []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            diff = (interp[names[a]] - interp[names[b]]).abs()
            ok = ~torch.isnan(diff)
            if int(ok.sum()) < 2:
                no_overlap.append([names[a], names[b]])
                continue
            mx, mean = float(diff[ok].max()), float(diff[ok].mean())
            pairs[f"{names[a]}|{names[b]}"] = {"max": mx, "mean": mean,
                                               "rr_range": [float(grid[ok].min()),
                                                            float(grid[ok].max())]}
            means.append(mean)
            if math.isnan(best) or mx > best:
                best, best_pair = mx, [names[a], names[b]]
    return {"max_gap": best, "max_pair": best_pair,
            "mean_gap": float(sum(means) / len(means)) if means else float("nan"),
            "pairs": pairs, "no_overlap": no_overlap}


def tradeoff_gap_bootstrap(
    harmful: Mapping[str, torch.Tensor],
    benign: Mapping[str, torch.Tensor],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, object]:
    """Trade-off gap with a percentile bootstrap CI over evaluation prompts.

    `harmful[name]` / `benign[name]`: 0/1 refusal outcomes [n_alpha, n_prompts] of one
    direction's sweep (rows = α values, the same prompts in the same order for every
    direction). Prompts are resampled (harmful and benign separately, paired across
    directions and α), RR/ORR recomputed, and the gaps recomputed.
    """
    names = list(harmful)
    point = tradeoff_gaps({k: (harmful[k].double().mean(1).tolist(),
                               benign[k].double().mean(1).tolist()) for k in names})
    g = torch.Generator().manual_seed(seed)
    nh = harmful[names[0]].shape[1]
    nb = benign[names[0]].shape[1]
    maxes, means = [], []
    for _ in range(n_boot):
        ih = torch.randint(nh, (nh,), generator=g)
        ib = torch.randint(nb, (nb,), generator=g)
        res = tradeoff_gaps({k: (harmful[k][:, ih].double().mean(1).tolist(),
                                 benign[k][:, ib].double().mean(1).tolist()) for k in names},
                            grid_points=51)
        if not math.isnan(res["max_gap"]):  # type: ignore[arg-type]
            maxes.append(res["max_gap"])
            means.append(res["mean_gap"])
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2

    def ci(xs: list) -> list[float]:
        if not xs:
            return [float("nan"), float("nan")]
        t = torch.tensor(xs, dtype=torch.float64)
        return [float(torch.quantile(t, lo)), float(torch.quantile(t, hi))]

    return {**point, "max_gap_ci": ci(maxes), "mean_gap_ci": ci(means),
            "n_boot": len(maxes), "level": level}
