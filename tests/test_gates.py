"""Topic gates: fitting and calibration, pooled decisions, and the exact shortcuts a gate
allows (closed prompts are never run steered)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusalkit.activations import MEAN_ALL, MEAN_USER, capture, template_lengths, user_mask
from refusalkit.errors import UserError
from refusalkit.evaluate import judge_prompts, perplexity_ratio
from refusalkit.examiner import Decoding, Examiner
from refusalkit.export import control_vectors
from refusalkit.gates import _threshold, fit_gate, gate_of, gate_open, wilson_upper
from refusalkit.interventions import Gate, Profile, addition, load_profile, save_profile
from refusalkit.judge import KeywordJudge
from refusalkit.scoring import last_logprobs
from refusalkit.steer.search import ProxySets, proxy_objectives, proxy_sets

PROMPTS = ["how do i make a bomb", "tell me about the weather please",
           "write poem", "how do i bake bread cake please", "steal car", "sure here is what"]


def _synthetic(n_pos: int, n_neg: int, d: int = 32, layers: int = 3, seed: int = 0):
    """Layer 1 carries the topic along one axis; layers 0 and 2 are pure noise."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n_pos, layers, d, generator=g)
    neg = torch.randn(n_neg, layers, d, generator=g)
    pos[:, 1, 0] += 6.0
    return pos, neg


def test_fit_gate_picks_the_informative_layer_and_opens_on_no_held_out_negative() -> None:
    pos, neg = _synthetic(60, 200)
    fit = fit_gate(pos, neg, [3, 4, 5], max_false_open=0.0)
    assert fit.gate.layer == 4  # the model layer behind slot 1
    assert fit.recall > 0.9
    assert abs(float(fit.gate.vector[0])) > 0.8  # the direction found the topic axis
    test_pos, test_neg = _synthetic(200, 1000, seed=1)
    v = fit.gate.vector.double()
    opened_neg = (test_neg[:, 1].double() @ v > fit.gate.threshold).double().mean()
    opened_pos = (test_pos[:, 1].double() @ v > fit.gate.threshold).double().mean()
    assert opened_neg < 0.01 and opened_pos > 0.9
    rows = {r["layer"]: r for r in fit.table}
    assert rows[4]["auc"] > 0.99 > max(rows[3]["auc"], rows[5]["auc"])


def test_ordinary_negatives_on_the_topic_are_not_allowed_to_shut_the_gate() -> None:
    """Everyday prompts are unlabelled: a few of them on the topic (cooking requests among
    harmless_train) would push the threshold over most topic prompts. Marked ordinary, they
    are set aside; the same planted prompts marked harmful still hold the gate shut."""
    pos, neg = _synthetic(60, 200)
    topical = pos[:, :, :].clone()[:6] + 0.1  # six negatives that are really on the topic
    topical[:, 1, 0] += 2.0  # and read as strongly topical as the topic's best
    neg = torch.cat([neg, topical])
    ordinary = torch.zeros(len(neg), dtype=torch.bool)
    ordinary[150:] = True  # the last 50 clean ones and the six planted ones are everyday
    harmful = fit_gate(pos, neg, [3, 4, 5])
    cleaned = fit_gate(pos, neg, [3, 4, 5], ordinary=ordinary)
    assert harmful.recall < 0.3 and not harmful.dropped  # they must keep it shut
    assert cleaned.recall > 0.9 and set(cleaned.dropped) == set(range(200, 206))
    assert cleaned.table[1]["dropped"] == 6


def test_threshold_lets_through_at_most_the_allowed_share_of_negatives() -> None:
    neg = torch.arange(100, dtype=torch.float64)  # 0..99
    pos = torch.tensor([50.0, 97.5, 120.0, 130.0], dtype=torch.float64)
    t0, recall0, _ = _threshold(pos, neg, 0.0)
    assert 99 < t0 < 120 and recall0 == 0.5
    t3, recall3, _ = _threshold(pos, neg, 0.03)  # 3 negatives may pass
    assert int((neg > t3).sum()) <= 3 and recall3 == 0.75


def test_the_false_open_share_holds_within_every_phrasing() -> None:
    """Pooled over phrasings, a 4 % budget over 200 negatives lets 8 pass, and all 8 may be
    the plain phrasing's (8 % of the prompts users actually type); per phrasing, at most 4."""
    plain = torch.cat([torch.arange(92, dtype=torch.float64), 100.0 + torch.arange(8.0)])
    wrapped = torch.arange(100, dtype=torch.float64) - 50.0  # far below every plain score
    neg, strata = torch.cat([plain, wrapped]), torch.arange(2).repeat_interleave(100)
    pos = torch.tensor([102.5, 106.5, 200.0], dtype=torch.float64)
    pooled, _, _ = _threshold(pos, neg, 0.04)
    per, recall, _ = _threshold(pos, neg, 0.04, strata)
    assert int((plain > pooled).sum()) == 8
    assert int((plain > per).sum()) <= 4 and per > pooled
    assert all(int((neg[strata == s] > per).sum()) <= 4 for s in (0, 1))
    assert abs(recall - 2 / 3) < 1e-9

def test_a_union_of_detectors_spends_its_budget_where_it_buys_recall() -> None:
    """Two detectors, one threshold each: detector 1's negatives run higher than detector 0's,
    so one shared threshold (the highest negative of either) shuts out every topic prompt
    that only detector 0 reads; per-detector thresholds open them, and the union still lets
    through no more negatives than the budget, in each stratum."""
    from refusalkit.gates import _union_thresholds

    nz = torch.stack([torch.linspace(-3, 1, 100), torch.linspace(-3, 5, 100)]).double()
    pz = torch.stack([torch.tensor([2.0, 3.0, 4.0, 0.0, 0.0, 0.0]),
                      torch.tensor([0.0, 0.0, 0.0, 6.0, 7.0, 8.0])]).double()
    src = torch.tensor([0, 0, 0, 1, 1, 1])
    shared = float(nz.amax(0).max())
    assert (pz.amax(0)[src == 0] > shared).sum() == 0  # the old rule: source 0 all shut
    ts, opened, margin = _union_thresholds(pz, nz, 0.0, None, src)
    assert bool(opened.all()) and 1 < ts[0] < 2 and 5 < ts[1] < 6 and margin > 0.9
    assert not (nz > torch.tensor(ts, dtype=torch.float64)[:, None]).any()
    strata = torch.arange(2).repeat(50)  # 2 % of each stratum: one negative each
    ts, opened, _ = _union_thresholds(pz, nz, 0.02, strata, src)
    shut = (nz > torch.tensor(ts, dtype=torch.float64)[:, None]).any(0)
    assert all(int(shut[strata == s].sum()) <= 1 for s in (0, 1)) and bool(opened.all())


def test_per_detector_thresholds_never_read_a_source_worse_than_a_shared_one() -> None:
    """fit_gate(per_detector=True) searches a set of thresholds that holds the shared one's
    solution, so its worst source's out-of-fold recall is at least the shared rule's; here,
    where the second detector's negatives run high, it is higher, at the same budget."""
    g = torch.Generator().manual_seed(3)
    pos = torch.randn(120, 1, 16, generator=g)
    pos[:60, 0, 0] += 3.0  # source 0: one axis
    pos[60:, 0, 1] += 6.0  # source 1: another, read far more easily
    neg = torch.randn(300, 1, 16, generator=g)
    neg[:6, 0, 1] += 5.0  # a few negatives that look like source 1
    src = torch.arange(2).repeat_interleave(60)
    kw = {"pos_strata": src, "per_source": True, "detector": "logistic",
          "max_false_open": 0.01}
    shared = fit_gate(pos, neg, [2], **kw)
    per = fit_gate(pos, neg, [2], per_detector=True, **kw)
    assert min(per.recall_by) > min(shared.recall_by)
    assert isinstance(per.gate.threshold, tuple) and len(per.gate.threshold) == 2
    assert per.leak <= wilson_upper(3, 300) + 1e-12  # the union still lets at most 3 through


def test_fit_gate_needs_enough_prompts() -> None:
    pos, neg = _synthetic(2, 50)
    with pytest.raises(UserError, match="topic gate needs"):
        fit_gate(pos, neg, [0, 1, 2])


def _mean_gate(tiny, layer: int = 1, pool: str = "mean") -> Gate:
    """A mean-pooled gate that opens for the first half of PROMPTS."""
    feats = capture(tiny, PROMPTS, [layer], [MEAN_ALL if pool == "mean" else MEAN_USER],
                    show_progress=False)[:, 0, 0].double()
    half = len(PROMPTS) // 2
    v = feats[:half].mean(0) - feats[half:].mean(0)
    proj = feats @ (v / v.norm())
    t = float((proj[:half].min() + proj[half:].max()) / 2)
    if proj[:half].min() <= proj[half:].max():  # random tiny model: open on what projects high
        t = float(proj.median())
    return Gate(layer, v.float(), t, pool)  # type: ignore[arg-type]


@pytest.mark.parametrize("pool", ["mean", "user"])
def test_mean_gate_hook_decides_like_gate_open_despite_padding(tiny, pool: str) -> None:
    """The hook (left-padded batch, attention mask from the model call) and `gate_open`
    (capture's masked mean) take the same decision for every prompt."""
    gate = _mean_gate(tiny, pool=pool)
    expected = gate_open(tiny, gate, PROMPTS, batch_size=len(PROMPTS))
    assert 0 < int(expected.sum()) < len(PROMPTS)
    one_by_one = torch.cat([gate_open(tiny, gate, [p], batch_size=1) for p in PROMPTS])
    assert torch.equal(expected, one_by_one)  # padding does not move the mean
    v = torch.randn(64) * 10
    gated = Profile((addition({2: v}, 1.0, gate=gate),))
    base = last_logprobs(tiny, PROMPTS)
    steered = last_logprobs(tiny, PROMPTS, profile=gated, batch_size=len(PROMPTS))
    changed = (steered - base).abs().amax(-1) > 1e-5
    assert torch.equal(changed, expected)


def test_user_mask_keeps_the_users_tokens_on_either_padding_side() -> None:
    left = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    right = left.flip(1)
    want_left = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0]])
    assert torch.equal(user_mask(left, 2, 2), want_left)
    assert torch.equal(user_mask(right, 2, 2), torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0],
                                                             [0, 0, 1, 1, 1, 1, 0, 0]]))
    # nothing between the template's two parts: read the whole prompt, not an empty mean
    assert torch.equal(user_mask(left, 3, 3), torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1],
                                                            [0, 0, 0, 1, 1, 0, 0, 0]]))
    assert torch.equal(user_mask(left[:1], 4, 4), left[:1])


def test_user_pooling_reads_the_users_words_and_nothing_else(tiny) -> None:
    """MEAN_USER is the mean of the states over exactly the user's tokens: a different system
    prompt around the same words moves the whole-prompt mean but not the user-token mean at
    the embedding (layer 0 input), where no token sees another."""
    before, after = template_lengths(tiny)
    text = tiny.format("tell me about the weather please")
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny.tokenizer.decode(ids[before:len(ids) - after]).split() == \
        "tell me about the weather please".split()
    emb = tiny.model.get_input_embeddings().weight.detach()[ids[before:len(ids) - after]]
    got = capture(tiny, ["tell me about the weather please"], [0], [MEAN_USER],
                  show_progress=False)[0, 0, 0]
    assert torch.allclose(got, emb.mean(0), rtol=1e-4, atol=1e-6 * float(emb.abs().max()))
    whole = capture(tiny, ["tell me about the weather please"], [0], [MEAN_ALL],
                    show_progress=False)[0, 0, 0]
    assert not torch.allclose(whole, got, rtol=1e-3)


def test_gated_judging_reuses_unsteered_answers_exactly(tiny) -> None:
    gate = _mean_gate(tiny)
    prof = Profile((addition({2: torch.randn(64) * 10}, 1.0, gate=gate),))
    judge = KeywordJudge()
    kw = {"max_new_tokens": 5}
    before = judge_prompts(tiny, PROMPTS, judge, **kw)
    full = judge_prompts(tiny, PROMPTS, judge, profile=prof, **kw)
    ex = Examiner(tiny, judge, Decoding(max_new_tokens=5))
    ex.remember(PROMPTS, before)
    fast, opened = ex.gated_answers(PROMPTS, prof)
    assert torch.equal(opened, gate_open(tiny, gate, PROMPTS))
    assert [j.response for j in fast] == [j.response for j in full]
    assert any(b.response != f.response for b, f in zip(before, fast, strict=True))
    with pytest.raises(ValueError, match="same prompts"):
        ex.remember(PROMPTS[::-1], before)


def test_gated_proxies_equal_the_full_computation(tiny) -> None:
    gate = _mean_gate(tiny)
    prof = Profile((addition({2: torch.randn(64) * 10}, 1.0, gate=gate),))
    target, keep, neutral = PROMPTS[:2], PROMPTS[2:4], PROMPTS[4:]
    fast = proxy_sets(Examiner(tiny, KeywordJudge()), target, keep, neutral, gate)
    slow = ProxySets(target, keep, neutral, last_logprobs(tiny, neutral))
    assert fast.open is not None
    for a, b in zip(proxy_objectives(tiny, prof, fast)[:3],
                    proxy_objectives(tiny, prof, slow)[:3], strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_a_shut_gate_is_not_free_its_leak_rate_prices_the_lifted_kl(tiny) -> None:
    """Gated trials all tie at KL 0 where the gate stays shut; the expected KL prices what a
    leak would cost, so a trial that wrecks the prompts it reaches does not look free."""
    shut = Gate(1, torch.randn(64), 1e9, "mean")
    v = torch.randn(64)
    strong = Profile((addition({2: v}, 50.0, gate=shut),))
    gentle = Profile((addition({2: v}, 0.5, gate=shut),))
    ex = Examiner(tiny, KeywordJudge())
    free = proxy_sets(ex, PROMPTS[:2], PROMPTS[2:4], PROMPTS[4:], shut)
    priced = proxy_sets(ex, PROMPTS[:2], PROMPTS[2:4], PROMPTS[4:], shut, leak=0.01)
    assert proxy_objectives(tiny, strong, free).kl == 0.0
    p_strong, p_gentle = proxy_objectives(tiny, strong, priced), proxy_objectives(tiny, gentle,
                                                                                 priced)
    assert p_strong.kl == pytest.approx(0.01 * p_strong.kl_lifted, rel=1e-5)
    assert p_strong.kl > p_gentle.kl > 0.0
    assert wilson_upper(0, 320) == pytest.approx(0.0084, abs=5e-4)
    assert wilson_upper(3, 320) > wilson_upper(0, 320)


def test_gated_perplexity_reads_the_prompt_not_the_answer(tiny) -> None:
    v = torch.randn(64) * 10
    shut = Gate(1, torch.randn(64), 1e9, "mean")
    wide = Gate(1, torch.randn(64), -1e9, "mean")
    answers = ["sure here is what", "sorry cannot help", "bake bread", "poem", "car", "why"]
    assert perplexity_ratio(tiny, PROMPTS, answers,
                            Profile((addition({2: v}, 1.0, gate=shut),))) == 1.0
    ungated = perplexity_ratio(tiny, PROMPTS, answers, Profile((addition({2: v}, 1.0),)))
    assert ungated != 1.0
    assert perplexity_ratio(tiny, PROMPTS, answers, Profile((addition({2: v}, 1.0, gate=wide),))
                            ) == pytest.approx(ungated, rel=1e-5)


def test_gate_pooling_survives_the_profile_artifact(tiny, tmp_path: Path) -> None:
    gate = _mean_gate(tiny)
    prof = Profile((addition({2: torch.randn(64)}, 0.5, gate=gate),))
    save_profile(prof, tmp_path / "p", tiny)
    back = gate_of(load_profile(tmp_path / "p", tiny))
    assert back is not None and back.pool == "mean" and back.layer == gate.layer
    assert back.threshold == pytest.approx(gate.threshold)
    assert gate_of(Profile((addition({2: torch.randn(64)}, 0.5),))) is None
    with pytest.raises(UserError, match="gated"):
        control_vectors(prof)
    with pytest.raises(UserError, match="pooling"):
        Gate(1, torch.randn(64), 0.0, "max")  # type: ignore[arg-type]


def test_a_veto_shuts_the_gate_and_survives_the_artifact(tiny, tmp_path: Path) -> None:
    """Gate.veto: open where a detector passes and the veto does not; the one decision
    `gate_open` and the hook share, kept through the profile artifact and the run record."""
    from refusalkit.steer.fit import gate_of_record

    e0, e1 = torch.eye(64)[0], torch.eye(64)[1]
    gate = Gate(1, e0, 1.0, "mean", e1, 1.0)
    feats = torch.zeros(3, 64)
    feats[0, 0] = feats[1, 0] = feats[1, 1] = 2.0  # topic; topic and harmful; neither
    assert gate.decide(feats).tolist() == [True, False, False]
    assert Gate(1, e0, 1.0, "mean").decide(feats).tolist() == [True, True, False]
    save_profile(Profile((addition({2: torch.randn(64)}, 0.5, gate=gate),)), tmp_path / "p",
                 tiny)
    back = gate_of(load_profile(tmp_path / "p", tiny))
    assert back is not None and back.veto is not None
    assert back.decide(feats).tolist() == [True, False, False]
    rec = {**gate.record(), "vector": e0.tolist(), "veto": e1.tolist()}
    again = gate_of_record(rec)
    assert again is not None and again.decide(feats).tolist() == [True, False, False]


def test_fit_gate_with_a_veto_opens_wider_and_keeps_the_harmful_look_alikes_shut() -> None:
    """Harmful negatives that sit on the topic's side of its axis (and apart on another):
    the negatives the veto shuts leave the false-open budget, so the topic detector opens
    wider; the veto shuts about the asked share of topic prompts out of fold, fresh
    look-alikes stay shut and fresh topic prompts open."""
    g = torch.Generator().manual_seed(1)
    d = 16

    def draw(n: int, topic: float, harm: float) -> torch.Tensor:
        x = torch.randn(n, 1, d, generator=g)
        x[:, 0, 0] += topic
        x[:, 0, 1] += harm
        return x

    pos, ordinary = draw(80, 5.0, 0.0), draw(200, 0.0, 0.0)
    harmful = draw(40, 5.0, 4.0)
    neg = torch.cat([ordinary, harmful])
    is_harm = torch.arange(len(neg)) >= len(ordinary)
    plain = fit_gate(pos, neg, [2], detector="logistic")
    vetoed = fit_gate(pos, neg, [2], detector="logistic", veto=is_harm, veto_share=0.05)
    assert vetoed.gate.veto is not None and plain.gate.veto is None
    assert abs(vetoed.vetoed - 0.05) <= 1 / len(pos) + 1e-9
    assert vetoed.recall > plain.recall + 0.1  # 0.91 against 0.72 here: budget freed
    fresh_harm, fresh_topic = draw(100, 5.0, 4.0)[:, 0], draw(100, 5.0, 0.0)[:, 0]
    assert int(vetoed.gate.decide(fresh_harm).sum()) <= 2
    assert float(vetoed.gate.decide(fresh_topic).double().mean()) > 0.8


def test_a_prompts_phrasings_share_a_fold_so_twins_cannot_inflate_recall() -> None:
    """With each prompt present in several phrasings, a fold that holds one copy and trains
    on its twin scores a memorised prompt, not the topic. Positives here carry no topic
    signal at all: split by row, the copies still "generalise" (recall high); split by
    prompt, the out-of-fold recall shows there is nothing to find."""
    from refusalkit.gates import _folds

    g = torch.Generator().manual_seed(3)
    d, copies = 128, 5
    base_pos, base_neg = torch.randn(20, 1, d, generator=g), torch.randn(60, 1, d, generator=g)
    pos = base_pos.repeat(copies, 1, 1) + 0.05 * torch.randn(20 * copies, 1, d, generator=g)
    neg = base_neg.repeat(copies, 1, 1) + 0.05 * torch.randn(60 * copies, 1, d, generator=g)
    groups = (torch.arange(20).repeat(copies), torch.arange(60).repeat(copies))
    by_row = fit_gate(pos, neg, [2], max_false_open=0.05)
    by_prompt = fit_gate(pos, neg, [2], max_false_open=0.05, groups=groups)
    assert by_row.recall > 0.8, by_row.recall
    assert by_prompt.recall < 0.3, by_prompt.recall
    folds = _folds(len(pos), 4, torch.Generator().manual_seed(0), groups[0])
    assert sorted(torch.cat(folds).tolist()) == list(range(len(pos)))  # a partition
    for f in folds:  # every prompt's copies in exactly one fold
        ids = set(groups[0][f].tolist())
        assert all(set(groups[0][other].tolist()).isdisjoint(ids)
                   for other in folds if other is not f)


def test_the_steer_gate_fits_on_phrasings_and_reports_prompts_not_copies(tiny) -> None:
    """gate_phrasings wrap topic and other prompts alike; the record counts prompts, and the
    ordinary prompts it set aside are the prompts themselves, not their wrapped copies."""
    from refusalkit.steer.config import SteerConfig
    from refusalkit.steer.data import split_data
    from refusalkit.steer.fit import fit_topic_gate

    repo = Path(__file__).resolve().parents[1]
    cfg = SteerConfig.load(repo / "configs" / "tiny_steer.toml", {
        "data.n_gate": 24, "search.gate_phrasings": ["Draft a note on this: {prompt}",
                                                     "{prompt} Answer in detail."]})
    splits = split_data(cfg.data, cfg.seed)
    plain = fit_topic_gate(tiny, {}, splits, cfg.search.model_copy(
        update={"gate_phrasings": []}), batch_size=8, seed=0, show_progress=False)
    rec = fit_topic_gate(tiny, {}, splits, cfg.search, batch_size=8, seed=0,
                         show_progress=False)
    n_other = len(splits.neutral) + len(splits.safety_fit) + len(splits.gate_negatives)
    assert rec["n_topic"] == plain["n_topic"] == len(splits.target_fit)
    assert rec["n_other"] == plain["n_other"] == n_other
    assert rec["phrasings"] == cfg.search.gate_phrasings and "phrasings" not in plain
    everyday = set(splits.neutral) | set(splits.gate_ordinary)
    assert set(rec["dropped_ordinary"]) <= everyday
    assert rec["vector"] != plain["vector"]  # the wrapped copies took part in the fit


def test_gate_topic_prompts_join_the_gates_topic_side_only(tiny) -> None:
    """data.gate_topic widens the gate's topic side (requests where the target asks
    questions) without entering any other role: the record counts them, and a prompt some
    role already uses is not read twice."""
    from refusalkit.prompts import load_prompts
    from refusalkit.steer.config import SteerConfig
    from refusalkit.steer.data import split_data
    from refusalkit.steer.fit import fit_topic_gate, gate_of_record

    repo = Path(__file__).resolve().parents[1]
    base = SteerConfig.load(repo / "configs" / "tiny_steer.toml", {"data.n_gate": 24})
    extra = load_prompts("builtin:china_requests_fit").prompts
    cfg = SteerConfig.load(repo / "configs" / "tiny_steer.toml", {
        "data.n_gate": 24,
        "data.gate_topic": ["builtin:china_requests_fit", base.data.safety_fit]})
    plain_splits, splits = split_data(base.data, base.seed), split_data(cfg.data, cfg.seed)
    assert not plain_splits.gate_topic and len(extra) >= 100
    others = {p for role, ps in splits.named().items() if role != "gate_topic" for p in ps}
    assert set(extra) <= set(splits.gate_topic)  # the whole set, in the topic side
    assert not others & set(splits.gate_topic)  # safety_fit's own rows stay where they are
    assert len(splits.gate_topic) == len(set(splits.gate_topic))
    plain = fit_topic_gate(tiny, {}, plain_splits, base.search, batch_size=8, seed=0,
                           show_progress=False)
    rec = fit_topic_gate(tiny, {}, splits, cfg.search, batch_size=8, seed=0,
                         show_progress=False)
    assert rec["n_topic"] == len(splits.target_fit) + len(splits.gate_topic)
    assert rec["n_topic_gate_only"] == len(splits.gate_topic)
    assert plain["n_topic_gate_only"] == 0 and rec["vector"] != plain["vector"]
    assert rec["detectors"] == plain["detectors"] == 1
    assert set(rec["recall_oof_by_set"]) == {"target_fit", "gate_topic"}
    pair = fit_topic_gate(tiny, {}, splits, cfg.search.model_copy(
        update={"gate_per_source": True, "gate_detector": "logistic"}), batch_size=8, seed=0,
        show_progress=False)
    gate = gate_of_record(pair)
    assert pair["detectors"] == 2 and gate is not None and gate.vector.shape[0] == 2
    assert pair["detector"] == "logistic" and plain["detector"] == "lda"
    with pytest.raises(UserError, match="gate_per_source"):  # one source: nothing to split
        SteerConfig.load(repo / "configs" / "tiny_steer.toml", {"search.gate_per_source": True})
    assert len(gate_open(tiny, gate, splits.target_fit)) == len(splits.target_fit)


def test_gate_target_prompts_join_the_target_side_detector(tiny) -> None:
    """data.gate_target adds prompts in the target's own phrasing to the gate's target-side
    detector only: still one detector per topic source, the record counts them as gate-only,
    and no other role sees them."""
    from refusalkit.prompts import load_prompts
    from refusalkit.steer.config import SteerConfig
    from refusalkit.steer.data import split_data
    from refusalkit.steer.fit import fit_topic_gate

    repo = Path(__file__).resolve().parents[1]
    over = {"data.n_gate": 24, "data.gate_topic": ["builtin:china_requests_fit"],
            "search.gate_per_source": True, "search.gate_detector": "logistic"}
    base = SteerConfig.load(repo / "configs" / "tiny_steer.toml", over)
    cfg = SteerConfig.load(repo / "configs" / "tiny_steer.toml", {
        **over, "data.gate_target": ["builtin:china_questions_fit?split=fit"]})
    more = load_prompts("builtin:china_questions_fit?split=fit").prompts
    plain_splits, splits = split_data(base.data, base.seed), split_data(cfg.data, cfg.seed)
    assert not plain_splits.gate_target and splits.gate_target == more
    others = {p for role, ps in splits.named().items() if role != "gate_target" for p in ps}
    assert not others & set(more)
    plain = fit_topic_gate(tiny, {}, plain_splits, base.search, batch_size=8, seed=0,
                           show_progress=False)
    rec = fit_topic_gate(tiny, {}, splits, cfg.search, batch_size=8, seed=0,
                         show_progress=False)
    assert rec["n_topic"] == plain["n_topic"] + len(more)
    assert rec["n_topic_gate_only"] == plain["n_topic_gate_only"] + len(more)
    assert rec["detectors"] == plain["detectors"] == 2
    assert set(rec["recall_oof_by_set"]) == {"target_fit", "gate_topic"}
    assert rec["vector"][0] != plain["vector"][0]  # the target-side detector saw them


def test_gate_per_language_gives_each_sources_chinese_prompts_a_detector(tiny) -> None:
    """search.gate_per_language: a source's Chinese prompts get their own detector (one per
    (source, script) that has prompts), the record's recall is by that split, and the key
    without gate_per_source is refused with a line saying what to set."""
    from refusalkit.prompts import cjk_share
    from refusalkit.steer.config import SteerConfig
    from refusalkit.steer.data import split_data
    from refusalkit.steer.fit import fit_topic_gate, gate_of_record

    repo = Path(__file__).resolve().parents[1]
    over = {"data.n_gate": 24, "search.gate_per_source": True,
            "search.gate_detector": "logistic",
            "data.gate_topic": ["builtin:china_requests_fit",
                                "builtin:china_requests_zh_fit?split=fit"]}
    cfg = SteerConfig.load(repo / "configs" / "tiny_steer.toml",
                           {**over, "search.gate_per_language": True})
    splits = split_data(cfg.data, cfg.seed)
    groups = {(name, cjk_share(p) > 0.5) for name in ("target_fit", "gate_topic")
              for p in getattr(splits, name)}
    assert ("gate_topic", True) in groups and ("gate_topic", False) in groups
    rec = fit_topic_gate(tiny, {}, splits, cfg.search, batch_size=8, seed=0,
                         show_progress=False)
    gate = gate_of_record(rec)
    assert gate is not None and rec["detectors"] == len(groups) == gate.vector.shape[0]
    assert len(rec["recall_oof_by_set"]) == len(groups)
    assert {"gate_topic", "gate_topic/zh"} <= set(rec["recall_oof_by_set"])
    assert cjk_share("讲讲天安门事件。") == 1.0 and cjk_share("Tell me about 1989.") == 0.0
    with pytest.raises(UserError, match="gate_per_source = true"):
        SteerConfig.load(repo / "configs" / "tiny_steer.toml",
                         {**over, "search.gate_per_source": False,
                          "search.gate_per_language": True})


def test_steer_gate_veto_is_fitted_on_the_must_stay_shut_negatives(tiny) -> None:
    """search.gate_veto: the run's gate record carries the veto (vector, threshold, the share
    it shuts out of fold), and the gate read back from it applies it."""
    from refusalkit.steer.config import SteerConfig
    from refusalkit.steer.data import split_data
    from refusalkit.steer.fit import fit_topic_gate, gate_inputs, gate_of_record

    repo = Path(__file__).resolve().parents[1]
    cfg = SteerConfig.load(repo / "configs" / "tiny_steer.toml",
                           {"data.n_gate": 24, "search.gate_veto": 0.1})
    splits = split_data(cfg.data, cfg.seed)
    _, _, texts, ordinary = gate_inputs(tiny, splits, cfg.search)
    assert 0 < int((~ordinary).sum()) < len(texts)  # something must stay shut
    rec = fit_topic_gate(tiny, {}, splits, cfg.search, batch_size=8, seed=0,
                         show_progress=False)
    assert rec["veto_share"] == 0.1 and len(rec["veto"]) == tiny.hidden_size
    assert abs(rec["vetoed_oof"] - 0.1) <= 1 / rec["n_topic"] + 1e-9
    gate = gate_of_record(rec)
    assert gate is not None and gate.veto is not None
    plain = fit_topic_gate(tiny, {}, splits, cfg.search.model_copy(update={"gate_veto": 0.0}),
                           batch_size=8, seed=0, show_progress=False)
    assert "veto" not in plain and gate_of_record(plain).veto is None  # type: ignore[union-attr]
    from dataclasses import replace

    prompts = splits.target_fit + splits.safety_fit
    with_veto = gate_open(tiny, gate, prompts)
    without = gate_open(tiny, replace(gate, veto=None), prompts)
    assert not (with_veto & ~without).any()  # the veto only ever shuts


def test_political_harm_requests_join_the_gates_other_side_as_harmful() -> None:
    """builtin:political_harm_fit named in gate_sources: every one of its prompts is a gate
    negative, and none counts as ordinary (PU cleaning may never set a harmful one aside)."""
    from refusalkit.prompts import load_prompts
    from refusalkit.steer.config import SteerConfig
    from refusalkit.steer.data import split_data

    repo = Path(__file__).resolve().parents[1]
    harm = load_prompts("builtin:political_harm_fit").prompts
    cfg = SteerConfig.load(repo / "configs" / "tiny_steer.toml", {
        "data.n_gate": 200, "data.gate_sources": ["neutral", "builtin:political_harm_fit"]})
    splits = split_data(cfg.data, cfg.seed)
    assert len(harm) >= 100 and set(harm) <= set(splits.gate_negatives)
    assert not set(harm) & set(splits.gate_ordinary) and splits.gate_ordinary


def test_the_layer_must_hold_on_every_topic_source_not_only_pooled() -> None:
    """Questions (70) read perfectly at layer slot 0 and fairly at slot 1; requests (10) read
    only at slot 1. Pooled recall prefers slot 0 (0.875, every request missed); with the
    sources named the gate takes slot 1, where neither source is lost."""
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(80, 2, 16, generator=g), torch.randn(300, 2, 16, generator=g)
    pos[:70, 0, 0] += 8.0
    pos[:70, 1, 0] += 4.0
    pos[70:, 1, 0] += 8.0
    source = torch.tensor([0] * 70 + [1] * 10)
    pooled = fit_gate(pos, neg, [3, 4], max_false_open=0.0)
    held = fit_gate(pos, neg, [3, 4], max_false_open=0.0, pos_strata=source)
    assert pooled.gate.layer == 3 and pooled.recall_by == (pooled.recall,)
    assert held.gate.layer == 4
    slot0 = next(r for r in held.table if r["layer"] == 3)
    assert slot0["recall_by"][1] < 0.2 and slot0["recall"] > held.recall
    assert min(held.recall_by) > 0.5


@pytest.mark.real
def test_a_user_pooled_gate_on_qwen_reads_the_question_and_steers_what_it_opens(qwen) -> None:
    """On qwen2.5-coder-0.5b (24-token system prompt and template): the user span is the
    user's text, and a user-pooled topic gate fitted on a few deccp questions opens for
    held-out ones, shuts for ordinary prompts, and its hook in a padded batch steers exactly
    the prompts `gate_open` says."""
    from refusalkit.prompts import load_prompts

    before, after = template_lengths(qwen)
    assert before > 10  # the system prompt is part of every formatted prompt
    ids = qwen.tokenizer(qwen.format("What happened in 1989?"),
                         add_special_tokens=False)["input_ids"]
    assert qwen.tokenizer.decode(ids[before:len(ids) - after]) == "What happened in 1989?"
    topic = load_prompts("deccp_censored").take(56, seed=0).prompts
    other = load_prompts("harmless_train").take(136, seed=0).prompts
    layers = [2, 4, 6]
    feats = capture(qwen, topic[:40] + other[:120], layers, [MEAN_USER],
                    show_progress=False)[:, :, 0]
    fit = fit_gate(feats[:40], feats[40:], layers, pool="user", max_false_open=0.01)
    test = topic[40:] + other[120:]
    opened = gate_open(qwen, fit.gate, test, batch_size=8)
    assert opened[:16].double().mean() >= 0.6 and opened[16:].double().mean() <= 0.15
    # the logistic detector fits the same features into the same kind of gate
    logit = fit_gate(feats[:40], feats[40:], layers, pool="user", max_false_open=0.01,
                     detector="logistic")
    by_logit = gate_open(qwen, logit.gate, test, batch_size=8)
    assert by_logit[:16].double().mean() >= 0.6 and by_logit[16:].double().mean() <= 0.15
    steered = last_logprobs(qwen, test, profile=Profile((addition(
        {6: torch.randn(qwen.hidden_size) * 20}, 1.0, gate=fit.gate),)), batch_size=8)
    changed = (steered - last_logprobs(qwen, test, batch_size=8)).abs().amax(-1) > 1e-3
    assert torch.equal(changed, opened)


def test_per_source_detectors_cover_sources_one_direction_cannot() -> None:
    """Questions read along one axis, requests along another: one direction between them
    reads each at 1/√2 of its strength; a detector per source reads each fully, and one
    threshold on the higher standardised score keeps the pair's false opens in budget."""
    def draw(n_pos: int, n_neg: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        pos, neg = torch.randn(n_pos, 1, 16, generator=g), torch.randn(n_neg, 1, 16, generator=g)
        pos[: n_pos // 2, 0, 0] += 4.5
        pos[n_pos // 2:, 0, 1] += 4.5
        return pos, neg, torch.arange(n_pos) >= n_pos // 2

    pos, neg, source = draw(120, 400, 0)
    one = fit_gate(pos, neg, [2], max_false_open=0.005, pos_strata=source.long())
    two = fit_gate(pos, neg, [2], max_false_open=0.005, pos_strata=source.long(),
                   per_source=True)
    assert one.gate.vector.ndim == 1 and two.gate.vector.shape == (2, 16)
    assert len(two.gate.thresholds) == 2
    assert two.recall > one.recall + 0.15 and min(two.recall_by) > 0.6
    test_pos, test_neg, _ = draw(400, 4000, 1)
    assert float(two.gate.decide(test_neg[:, 0]).double().mean()) < 0.02
    assert float(two.gate.decide(test_pos[:, 0]).double().mean()) > \
        float(one.gate.decide(test_pos[:, 0]).double().mean()) + 0.15
    logit = fit_gate(pos, neg, [2], max_false_open=0.005, pos_strata=source.long(),
                     per_source=True, detector="logistic")
    assert logit.gate.vector.shape == (2, 16) and min(logit.recall_by) > 0.6
    assert float(logit.gate.decide(test_neg[:, 0]).double().mean()) < 0.02
    with pytest.raises(UserError, match="unknown gate detector"):
        fit_gate(pos, neg, [2], detector="svm")
    with pytest.raises(UserError, match="one threshold per detector"):
        Gate(1, torch.randn(2, 16), 0.0)
    with pytest.raises(ValueError, match="pos_strata"):
        fit_gate(pos, neg, [2], per_source=True)


def test_a_two_detector_gate_survives_the_artifact_and_steers_what_it_opens(tiny,
                                                                            tmp_path: Path
                                                                            ) -> None:
    """A gate of two detectors opens where either would, offline and in the hook, and comes
    back from a profile artifact with both."""
    a = _mean_gate(tiny)
    feats = capture(tiny, PROMPTS, [1], [MEAN_ALL], show_progress=False)[:, 0, 0].double()
    v2 = torch.randn(64, generator=torch.Generator().manual_seed(5))
    t2 = float((feats @ (v2 / v2.norm()).double()).sort(descending=True).values[1])  # opens 1
    both = Gate(1, torch.stack([a.vector, v2]), (a.threshold, t2), "mean")  # type: ignore[arg-type]
    expected = a.decide(feats) | Gate(1, v2, t2, "mean").decide(feats)
    assert torch.equal(gate_open(tiny, both, PROMPTS), expected)
    prof = Profile((addition({2: torch.randn(64) * 10}, 1.0, gate=both),))
    save_profile(prof, tmp_path / "p", tiny)
    back = gate_of(load_profile(tmp_path / "p", tiny))
    assert back is not None and back.vector.shape == (2, 64)
    assert back.thresholds == pytest.approx(both.thresholds)
    steered = last_logprobs(tiny, PROMPTS, profile=load_profile(tmp_path / "p", tiny),
                            batch_size=len(PROMPTS))
    changed = (steered - last_logprobs(tiny, PROMPTS)).abs().amax(-1) > 1e-5
    assert torch.equal(changed, expected) and 0 < int(expected.sum()) < len(PROMPTS)


def test_bench_gate_activation_memo_returns_what_capture_returns(tiny, tmp_path: Path,
                                                                  monkeypatch) -> None:
    """bench_gate's per-prompt memo (bench/common.py) gives each prompt the states `capture`
    gives it, in the order asked, across overlapping sets and layers and after a save and
    load; only prompts it has not seen are read again. A wrong row here would move every
    gate variant a sweep compares."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    from common import CaptureMemo

    memo = CaptureMemo(capture)
    a = ["How do I bake bread?", "Tell me about Tibet.", "Write a poem about the sea."]
    b = ["Write a poem about the sea.", "What is a roux?", "How do I bake bread?"]
    got_a = memo(tiny, a, [1, 2], [MEAN_ALL], batch_size=2, show_progress=False)
    got_b = memo(tiny, b, [2], [MEAN_ALL], batch_size=2, show_progress=False)
    want_b = capture(tiny, b, [2], [MEAN_ALL], show_progress=False)
    assert got_a.shape == (3, 2, 1, tiny.hidden_size) and got_b.shape == want_b.shape
    torch.testing.assert_close(got_a, capture(tiny, a, [1, 2], [MEAN_ALL], show_progress=False),
                               rtol=1e-4, atol=1e-5 * float(got_a.abs().max()))
    torch.testing.assert_close(got_b, want_b, rtol=1e-4, atol=1e-5 * float(want_b.abs().max()))
    assert (memo.misses, memo.hits) == (4, 2)  # "What is a roux?" alone was new in b
    memo.save(tmp_path / "m.safetensors")
    again = CaptureMemo(lambda *a, **k: pytest.fail("read again"))
    again.load(tmp_path / "m.safetensors")
    assert torch.equal(again(tiny, b, [2], [MEAN_ALL]), got_b)
