"""How differently directions make the model refuse (paper B §2.5): style distributions,
their Jensen–Shannon divergence, mutual information between direction and style with a
permutation test, and Holm's correction across directions. Labels in, numbers out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import torch


def distribution(labels: Sequence[str], categories: Sequence[str]) -> torch.Tensor:
    """Relative frequencies of labels over a fixed category order (zeros if no labels)."""
    c = Counter(labels)
    v = torch.tensor([c[k] for k in categories], dtype=torch.float64)
    return v / v.sum() if v.sum() > 0 else v


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen–Shannon divergence in bits (0 = identical, 1 = disjoint supports)."""
    p, q = p.double() / p.double().sum(), q.double() / q.double().sum()
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> float:
        nz = a > 0
        return float((a[nz] * (a[nz] / m[nz]).log2()).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def _mi_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """I(group; label) in bits from contingency counts [..., groups, labels]."""
    counts = counts.double()
    total = counts.sum((-2, -1), keepdim=True).clamp_min(1e-300)
    joint = counts / total
    expected = joint.sum(-1, keepdim=True) * joint.sum(-2, keepdim=True)
    ratio = torch.where(joint > 0, joint / expected.clamp_min(1e-300), torch.ones_like(joint))
    return (joint * ratio.log2()).sum((-2, -1))


def _codes(groups: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    cats = {c: i for i, c in enumerate(sorted({x for g in groups for x in g}))}
    labels = torch.tensor([cats[x] for g in groups for x in g], dtype=torch.long)
    gid = torch.tensor([i for i, g in enumerate(groups) for _ in g], dtype=torch.long)
    return labels, gid, len(cats)


def mutual_information(groups: Sequence[Sequence[str]]) -> float:
    """I(group; label) in bits from per-group label lists (generalised JS divergence)."""
    labels, gid, k = _codes(groups)
    if len(labels) == 0:
        return 0.0
    counts = torch.bincount(gid * k + labels, minlength=len(groups) * k)
    return float(_mi_from_counts(counts.view(len(groups), k)))


def permutation_test(groups: Sequence[Sequence[str]], *, n_perm: int = 2000,
                     seed: int = 0) -> dict[str, float]:
    """Does the label distribution differ between groups? Permutation test on I(group; label).

    With two groups the statistic is the JS divergence weighted by group sizes. Labels are
    shuffled across groups (group sizes kept); p = (1 + #{perm ≥ observed}) / (1 + n_perm).
    """
    if sum(1 for g in groups if len(g) > 0) < 2:
        return {"statistic": float("nan"), "p_value": float("nan"), "n_perm": 0}
    labels, gid, k = _codes(groups)
    n_groups = len(groups)
    observed = mutual_information(groups)
    gen = torch.Generator().manual_seed(seed)
    hits, done = 0, 0
    while done < n_perm:
        b = min(256, n_perm - done)
        perm = torch.rand(b, len(labels), generator=gen).argsort(dim=1)
        flat = gid[None, :] * k + labels[perm]
        flat = flat + torch.arange(b)[:, None] * (n_groups * k)
        counts = torch.bincount(flat.flatten(), minlength=b * n_groups * k)
        mi = _mi_from_counts(counts.view(b, n_groups, k))
        hits += int((mi >= observed - 1e-12).sum())
        done += b
    return {"statistic": observed, "p_value": (1 + hits) / (1 + n_perm), "n_perm": n_perm}


def style_divergence(labels: Mapping[str, Sequence[str]], *, n_perm: int = 2000,
                     seed: int = 0) -> dict[str, object]:
    """Pairwise JS divergence of style distributions, each with a permutation p-value
    (Holm-adjusted over pairs), plus one global test over all groups."""
    names = [k for k, v in labels.items() if len(v) > 0]
    cats = sorted({x for k in names for x in labels[k]})
    pairs: dict[str, dict[str, float]] = {}
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            la, lb = labels[names[a]], labels[names[b]]
            test = permutation_test([la, lb], n_perm=n_perm, seed=seed + a * 1000 + b)
            pairs[f"{names[a]}|{names[b]}"] = {
                "jsd": js_divergence(distribution(la, cats), distribution(lb, cats)),
                "p_value": test["p_value"], "n": [len(la), len(lb)]}
    holm = holm_adjust({k: v["p_value"] for k, v in pairs.items()})
    for k, v in pairs.items():
        v["p_holm"] = holm[k]
    overall = permutation_test([labels[k] for k in names], n_perm=n_perm, seed=seed)
    return {"categories": cats, "groups": names, "pairs": pairs, "overall": overall}


def holm_adjust(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values (monotone, capped at 1)."""
    items = sorted(pvalues.items(), key=lambda kv: kv[1])
    m, out, running = len(items), {}, 0.0
    for i, (k, p) in enumerate(items):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out
