"""Each geometry function on synthetic tensors with a known answer."""

from __future__ import annotations

import math

import pytest
import torch

from refusalkit.analyze import divergence as D
from refusalkit.analyze import geometry as G


def planted(n: int, d: int, direction: torch.Tensor, shift: float, noise: float,
            seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes that differ by `shift` along `direction`, isotropic noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    neg = noise * torch.randn(n, d, generator=g)
    pos = noise * torch.randn(n, d, generator=g) + shift * G.unit(direction).float()
    return pos, neg


def test_cosine_matrix_identical_opposite_orthogonal():
    e = torch.eye(4)
    v = torch.stack([e[0], 3 * e[0], -e[0], e[1]])
    c = G.cosine_matrix(v)
    assert c.shape == (4, 4)
    assert torch.allclose(c, c.T)
    assert torch.allclose(c.diagonal(), torch.ones(4, dtype=c.dtype))
    assert c[0, 1] == pytest.approx(1.0)
    assert c[0, 2] == pytest.approx(-1.0)
    assert c[0, 3] == pytest.approx(0.0)
    assert G.off_diagonal(c).shape == (6,)


def test_stability_planted_direction_is_near_one_and_noise_is_near_zero():
    d = 256
    r = torch.randn(d, generator=torch.Generator().manual_seed(1))
    pos, neg = planted(200, d, r, shift=20.0, noise=1.0, seed=0)
    dirs, info = G.resampled_directions(pos, neg, n=32, resamples=5, seed=0)
    assert info == {"n": 32, "overlap": 0.0}  # 5 × 32 ≤ 200: disjoint resamples
    assert G.stability(dirs) > 0.95
    assert float(G.unit(dirs.double().mean(0)) @ G.unit(r)) > 0.97
    pos0, neg0 = planted(200, d, r, shift=0.0, noise=1.0, seed=3)
    dirs0, _ = G.resampled_directions(pos0, neg0, n=32, resamples=5, seed=0)
    assert abs(G.stability(dirs0)) < 0.15


def test_projected_stability_matches_measured_stability_at_larger_n():
    d = 400
    r = torch.randn(d, generator=torch.Generator().manual_seed(5))
    pos, neg = planted(2000, d, r, shift=6.0, noise=1.0, seed=6)
    small, _ = G.resampled_directions(pos, neg, n=16, resamples=20, seed=0)
    large, _ = G.resampled_directions(pos, neg, n=64, resamples=20, seed=1)
    c16, c64 = G.stability(small), G.stability(large)
    assert c16 < 0.6 < c64  # noisy at 16, much better at 64
    assert G.projected_stability(c16, 16, 64) == pytest.approx(c64, abs=0.05)
    assert G.projected_stability(0.5, 16, 16) == pytest.approx(0.5)
    assert math.isnan(G.projected_stability(-0.1, 16, 32))
    assert math.isnan(G.projected_stability(0.5, 2, 32))  # too few prompts to extrapolate
    # the n the model asks for reaches 0.9 when measured there
    n90 = G.n_for_stability(c16, 16)
    assert 64 < n90 < 400
    big, _ = G.resampled_directions(pos, neg, n=round(n90), resamples=4, seed=2)
    assert G.stability(big) == pytest.approx(0.9, abs=0.04)
    assert G.projected_stability(c16, 16, round(n90)) == pytest.approx(0.9, abs=0.01)
    assert math.isinf(G.n_for_stability(-0.2, 16))


def test_resample_indices_are_disjoint_and_shrink_when_the_pool_is_small():
    sets = G.resample_indices(pool=40, n=32, resamples=4, seed=0)
    assert [len(s) for s in sets] == [10] * 4  # 40 // 4: independent, not overlapping
    assert G.mean_overlap(sets) == 0.0
    full = G.resample_indices(pool=128, n=32, resamples=4, seed=0)
    assert [len(s) for s in full] == [32] * 4 and G.mean_overlap(full) == 0.0
    tiny = G.resample_indices(pool=3, n=32, resamples=2, seed=0)  # no 2 disjoint pairs
    assert [len(s) for s in tiny] == [3, 3] and G.mean_overlap(tiny) == 1.0


def test_auc_and_cross_validated_separability():
    assert G.auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert G.auc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    assert G.auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    d = 300
    r = torch.randn(d, generator=torch.Generator().manual_seed(2))
    pos, neg = planted(60, d, r, shift=6.0, noise=1.0, seed=1)
    assert G.separability(pos, neg) > 0.95
    pos0, neg0 = planted(60, d, r, shift=0.0, noise=1.0, seed=4)
    # d ≫ n: in-sample projection would separate pure noise; cross-validation must not
    assert 0.3 < G.separability(pos0, neg0) < 0.7


def test_separability_profile_finds_the_layer_with_the_signal():
    d, n = 64, 40
    r = torch.randn(d, generator=torch.Generator().manual_seed(0))
    layers_pos, layers_neg = [], []
    for layer, shift in enumerate([0.0, 0.0, 5.0, 5.0]):
        p, q = planted(n, d, r, shift=shift, noise=1.0, seed=10 + layer)
        layers_pos.append(p)
        layers_neg.append(q)
    prof = G.separability_profile(torch.stack(layers_pos, 1), torch.stack(layers_neg, 1))
    assert len(prof) == 4
    assert max(prof[:2]) < 0.8 and min(prof[2:]) > 0.95


def test_participation_ratio_known_values():
    d = 50
    assert G.participation_ratio(torch.eye(d)[3]) == pytest.approx(1.0)
    assert G.participation_ratio(torch.ones(d)) == pytest.approx(d)
    half = torch.zeros(d)
    half[:10] = -2.0
    assert G.participation_ratio(half) == pytest.approx(10.0)


def test_count_for_fraction_on_known_spectrum():
    spec = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    assert G.count_for_fraction(spec, 0.9) == 3
    assert G.count_for_fraction(spec, 0.5) == 1
    assert G.count_for_fraction(spec, 0.8) == 2
    assert G.count_for_fraction(torch.zeros(3), 0.9) == 0
    assert G.count_for_fraction(spec, 0.9, total=10.0) == 4  # never reaches 90 % of 10


def test_difference_pcs_on_a_known_spectrum():
    g = torch.Generator().manual_seed(0)
    d, n = 40, 2000
    scales = 0.8 ** torch.arange(d, dtype=torch.float32)  # coordinate i = PC i
    reference = torch.randn(n, d, generator=g) * scales
    top = torch.zeros(d)
    top[0] = 1.0
    axes = G.principal_axes(reference)
    assert axes.shape == (d, d)
    assert torch.allclose(axes @ axes.T, torch.eye(d, dtype=axes.dtype), atol=1e-8)
    one = G.difference_pcs(top, axes)
    assert one["leading"] == 1 and one["minimal"] == 1
    assert one["captured"] == pytest.approx(1.0)
    third = torch.zeros(d)
    third[2] = 1.0
    assert G.difference_pcs(third, axes)["leading"] == 3
    spread = torch.ones(d)  # equal share on every axis: 90 % needs 36 of 40
    many = G.difference_pcs(spread, axes)
    assert abs(many["minimal"] - 36) <= 1 and abs(many["leading"] - 36) <= 1
    small_ref = G.difference_pcs(spread, G.principal_axes(reference[:10]))  # 9 PCs (N < d)
    assert small_ref["n_pcs"] == 9 and small_ref["captured"] < 0.5


def test_orr_at_rr_interpolates_and_refuses_to_extrapolate():
    grid = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    out = G.orr_at_rr([0.5, 1.0, 0.25], [0.0, 0.5, 0.0], grid)
    assert math.isnan(out[0])
    assert out[1:].tolist() == pytest.approx([0.0, 0.0, 0.25, 0.5])


def test_tradeoff_gap_zero_for_identical_and_known_for_shifted_curves():
    rr = [0.2, 0.5, 0.8, 1.0]
    same = G.tradeoff_gaps({"a": (rr, [0.0, 0.1, 0.3, 0.6]), "b": (rr, [0.0, 0.1, 0.3, 0.6])})
    assert same["max_gap"] == pytest.approx(0.0)
    shifted = G.tradeoff_gaps({"a": (rr, [0.0, 0.1, 0.3, 0.6]),
                               "b": (rr, [0.2, 0.3, 0.5, 0.8]),
                               "c": ([0.0, 0.1], [0.0, 0.0])})
    assert shifted["max_gap"] == pytest.approx(0.2)
    assert shifted["max_pair"] == ["a", "b"]
    assert ["a", "c"] in shifted["no_overlap"]


def test_tradeoff_bootstrap_ci_covers_point_and_separates_different_curves():
    g = torch.Generator().manual_seed(0)
    n = 200
    probs_rr = torch.tensor([0.2, 0.5, 0.8, 0.95])[:, None]
    harm = {k: (torch.rand(4, n, generator=g) < probs_rr).float() for k in "ab"}
    benign = {"a": (torch.rand(4, n, generator=g) < torch.tensor([0.0, 0.05, 0.1, 0.2])[:, None]),
              "b": (torch.rand(4, n, generator=g) < torch.tensor([0.3, 0.5, 0.7, 0.9])[:, None])}
    res = G.tradeoff_gap_bootstrap(harm, {k: v.float() for k, v in benign.items()},
                                   n_boot=200, seed=0)
    lo, hi = res["max_gap_ci"]
    assert lo <= res["max_gap"] <= hi + 1e-9
    assert lo > 0.3  # the curves really differ by ~0.4–0.7 ORR at matched RR
    same = {"a": harm["a"], "b": harm["a"].clone()}
    res0 = G.tradeoff_gap_bootstrap(same, {"a": benign["a"].float(), "b": benign["a"].float()},
                                    n_boot=100, seed=0)
    assert res0["max_gap"] == pytest.approx(0.0) and res0["max_gap_ci"][1] == pytest.approx(0.0)


def test_js_divergence_bounds():
    p = torch.tensor([1.0, 0.0])
    q = torch.tensor([0.0, 1.0])
    assert D.js_divergence(p, q) == pytest.approx(1.0)
    assert D.js_divergence(p, p) == pytest.approx(0.0)
    assert D.distribution(["x", "y", "y"], ["x", "y", "z"]).tolist() == pytest.approx(
        [1 / 3, 2 / 3, 0.0])


def test_permutation_test_small_p_for_different_and_large_for_equal_distributions():
    a = ["ai_identity"] * 30 + ["apology"] * 10
    b = ["safety"] * 30 + ["apology"] * 10
    diff = D.permutation_test([a, b], n_perm=500, seed=0)
    assert diff["p_value"] < 0.01
    g = torch.Generator().manual_seed(0)
    cats = ["x", "y", "z"]
    same_a = [cats[int(i)] for i in torch.randint(3, (60,), generator=g)]
    same_b = [cats[int(i)] for i in torch.randint(3, (60,), generator=g)]
    eq = D.permutation_test([same_a, same_b], n_perm=500, seed=0)
    assert eq["p_value"] > 0.05


def test_style_divergence_pairs_global_and_holm():
    labels = {"hum": ["ai_identity"] * 20 + ["apology"] * 5,
              "safety": ["safety"] * 20 + ["apology"] * 5,
              "safety2": ["safety"] * 19 + ["apology"] * 6,
              "empty": []}
    res = D.style_divergence(labels, n_perm=300, seed=0)
    assert res["groups"] == ["hum", "safety", "safety2"]
    assert res["pairs"]["hum|safety"]["p_holm"] < 0.05
    assert res["pairs"]["safety|safety2"]["p_value"] > 0.2
    assert res["pairs"]["safety|safety2"]["jsd"] < 0.05
    assert res["overall"]["p_value"] < 0.01
    assert D.holm_adjust({"a": 0.01, "b": 0.04, "c": 0.5}) == pytest.approx(
        {"a": 0.03, "b": 0.08, "c": 0.5})


def test_claims_bench_reads_depth_spread_and_separability(monkeypatch) -> None:
    """bench_claims on data with a known answer: a refusal signal planted in one coordinate
    is 'concentrated' (top coordinate ≈ all the energy, PR ≈ 3/d of random), one spread over
    every coordinate is as spread as a random direction; out-of-fold AUC is ≈ 1 for
    separable classes and ≈ 0.5 for identical ones (a direction fitted in-sample would
    separate noise, so this checks the folds hold out)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    from bench_claims import METHODS, oof_auc, spread

    d = 64
    one = torch.zeros(d)
    one[3] = 1.0
    s = spread(one)
    assert s["top1"] == pytest.approx(1.0) and s["pr_ratio"] == pytest.approx(3.0 / d)
    flat = spread(torch.ones(d))
    assert flat["pr_ratio"] == pytest.approx(3.0) and flat["k90_share"] > 0.85

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(40, 2, d, generator=g)
    shift = torch.zeros(2, d)
    shift[1] = 3.0 * torch.randn(d, generator=g) / d ** 0.5  # layer 1 only
    x = {"r": noise[:20] + shift, "c": noise[20:], "wr": torch.ones(20), "wc": torch.ones(20),
         "n": torch.randn(10, 2, d, generator=g)}
    for m in METHODS:
        assert oof_auc(m, x, 1, 1e-2) > 0.9
        assert abs(oof_auc(m, x, 0, 1e-2) - 0.5) < 0.2
