"""Direction estimators against closed forms computed naively in float64."""

from __future__ import annotations

import pytest
import torch

from refusalkit.directions import logistic, mean_difference, pca_paired, per_layer, rmd, wrmd
from refusalkit.errors import UserError


def naive_rmd(r: torch.Tensor, c: torch.Tensor, lam: float) -> torch.Tensor:
    r, c = r.double(), c.double()
    mu_c = c.mean(0)
    cov = (c - mu_c).T @ (c - mu_c) / len(c)
    v = torch.linalg.inv(cov + lam * torch.eye(c.shape[1], dtype=torch.float64)) @ (
        r.mean(0) - mu_c)
    return v / v.norm()


@pytest.mark.parametrize(("n", "d"), [(12, 40), (60, 16)])  # Woodbury path and direct path
def test_rmd_matches_naive_closed_form(n: int, d: int) -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(n, d, generator=g) + 0.5
    c = torch.randn(n + 3, d, generator=g) * torch.linspace(0.1, 3, d)
    got = rmd(r, c, lam=1e-2).double()
    want = naive_rmd(r, c, 1e-2)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_rmd_downweights_high_variance_nuisance_direction() -> None:
    # Classes differ along e0 and e1; complying prompts vary a lot along e1 (a topic axis).
    g = torch.Generator().manual_seed(1)
    c = torch.randn(200, 8, generator=g) * 0.1
    c[:, 1] += torch.randn(200, generator=g) * 5
    r = c.clone()[:100]
    r[:, 0] += 1.0
    r[:, 1] += 1.0
    md = mean_difference(r, c)
    v = rmd(r, c, lam=1e-2)
    assert abs(float(v[0])) > abs(float(md[0]))  # refusal axis gains weight
    assert abs(float(v[1])) < 0.1 < abs(float(md[1]))  # nuisance axis is shrunk out


def test_wrmd_with_equal_weights_equals_rmd() -> None:
    g = torch.Generator().manual_seed(2)
    r, c = torch.randn(10, 30, generator=g) + 1, torch.randn(14, 30, generator=g)
    got = wrmd(r, c, w_refused=torch.ones(10), w_complied=torch.full((14,), 3.0))
    assert torch.allclose(got, rmd(r, c), atol=1e-6)


def test_wrmd_weights_and_neutral_change_the_direction() -> None:
    g = torch.Generator().manual_seed(3)
    r, c, n = (torch.randn(10, 30, generator=g) + 1, torch.randn(14, 30, generator=g),
               torch.randn(20, 30, generator=g) + 2)
    base = rmd(r, c)
    weighted = wrmd(r, c, w_refused=torch.linspace(0.1, 1, 10))
    neutral = wrmd(r, c, neutral=n)
    assert not torch.allclose(weighted, base, atol=1e-4)
    assert not torch.allclose(neutral, base, atol=1e-4)
    assert abs(float(weighted.norm()) - 1) < 1e-5


def test_directions_are_bit_identical_across_runs() -> None:
    g = torch.Generator().manual_seed(4)
    r, c = torch.randn(16, 3, 24, generator=g), torch.randn(20, 3, 24, generator=g)
    for est in (mean_difference, rmd, wrmd, pca_paired):
        a, b = per_layer(est, r, c), per_layer(est, r.clone(), c.clone())
        assert torch.equal(a, b)
        assert a.shape == (3, 24)


def test_md_and_pca_point_towards_the_positive_side() -> None:
    g = torch.Generator().manual_seed(5)
    neg = torch.randn(30, 10, generator=g)
    pos = neg + torch.tensor([3.0] + [0.0] * 9) + 0.1 * torch.randn(30, 10, generator=g)
    for est, floor in ((mean_difference, 0.95), (pca_paired, 0.95), (rmd, 0.7)):
        v = est(pos, neg)  # rmd reweights by the sample covariance, so it tilts more
        assert float(v[0]) > floor, est.__name__


def test_empty_side_is_a_user_error() -> None:
    with pytest.raises(UserError, match="empty"):
        mean_difference(torch.zeros(0, 4), torch.zeros(3, 4))


def test_projected_md_is_orthogonal_to_the_benign_mean_and_keeps_the_rest() -> None:
    """projected = unit(MD minus its part along unit(mean of neg)): orthogonal to that mean,
    and equal to MD when MD is already orthogonal to it."""
    from refusalkit.directions import mean_difference, projected

    g = torch.Generator().manual_seed(5)
    shift = torch.zeros(8)
    shift[0] = 2.0
    pos, neg = torch.randn(20, 8, generator=g) + 1.0 + shift, torch.randn(30, 8, generator=g) + 1.0
    p = projected(pos, neg).double()
    mu = neg.double().mean(0)
    assert abs(float(p @ mu)) < 1e-6 * float(mu.norm())
    assert float(p @ mean_difference(pos, neg).double()) > 0.5  # still points to refusal
    # MD orthogonal to the benign mean: nothing to remove
    neg2 = torch.zeros(4, 8)
    neg2[:, 0] = 1.0
    pos2 = neg2.clone()
    pos2[:, 1] += 2.0
    torch.testing.assert_close(projected(pos2, neg2), mean_difference(pos2, neg2))


def _two_phrasings(n_pos: int, n_neg: int, seed: int):
    """Topic rows in two clusters (85 % along axis 0, 15 % along axis 1), others N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.randn(n_pos, 16, generator=g), torch.randn(n_neg, 16, generator=g)
    k = int(0.85 * n_pos)
    pos[:k, 0] += 4.0
    pos[k:, 1] += 4.0
    return pos, neg, k


def test_logistic_reads_a_minority_phrasing_that_lda_leaves_behind() -> None:
    """LDA's direction follows the class means, so the 15 % cluster barely counts; the
    logistic fit weights where the classes meet. At a 1 % false-open threshold on fresh
    draws, its worse cluster is read far better than LDA's."""
    pos, neg, _ = _two_phrasings(200, 600, 0)
    tp, tn, tk = _two_phrasings(2000, 20000, 1)

    def worst(v: torch.Tensor) -> float:
        t = (tn @ v).quantile(0.99)
        return min(float(((tp[:tk] @ v) > t).double().mean()),
                   float(((tp[tk:] @ v) > t).double().mean()))

    assert worst(logistic(pos, neg, lam=1e-2)) > worst(rmd(pos, neg, lam=1.0)) + 0.2


def test_logistic_ignores_a_coordinates_scale_and_is_deterministic() -> None:
    """Residual streams carry a few huge coordinates: scaling one by 1000 leaves the scores
    (up to a constant factor) as they were, and two fits agree exactly."""
    pos, neg, _ = _two_phrasings(100, 300, 2)
    big_p, big_n = pos.clone(), neg.clone()
    big_p[:, 5] *= 1000
    big_n[:, 5] *= 1000
    a, b = logistic(pos, neg).double(), logistic(big_p, big_n).double()
    corr = torch.corrcoef(torch.stack([pos.double() @ a, big_p.double() @ b]))[0, 1]
    assert float(corr) > 0.9999
    assert torch.equal(logistic(pos, neg), logistic(pos, neg))
    with torch.inference_mode():  # as under capture: the fit still runs, with the same result
        assert torch.equal(logistic(pos.clone(), neg.clone()), logistic(pos, neg))
    with torch.no_grad():
        assert torch.equal(logistic(pos, neg), logistic(pos, neg))
    assert abs(float(a.norm()) - 1.0) < 1e-5
    with pytest.raises(ValueError, match="penalty"):
        logistic(pos, neg, lam=0.0)
