"""Topic gates for conditional steering: fit a linear topic detector and calibrate it.

A gate (IBM CAST-style, see `interventions.Gate`) switches a steering operator on only for
prompts whose projection (last prompt token, or the mean over the prompt) at one early layer
passes a threshold. Its errors cost
different things: a gate that opens on an ordinary prompt steers it (KL on harmless prompts),
one that opens on a harmful prompt removes a safety refusal, one that stays shut on the topic
leaves its refusal in place. So the detector is fitted against *many and varied* negatives
(ordinary, harmful and look-alike prompts), and its threshold is set on scores the direction
was not fitted on (k-fold, out of fold), to open on at most a chosen share of them.

Choices, written down:
- Direction per candidate layer: ridge-regularised LDA (RMD) topic-vs-others, with the ridge
  λ relative to the mean per-coordinate variance of the negatives (layers differ in scale by
  orders of magnitude), or an L2 logistic regression (`detector="logistic"`), which reads a
  topic that comes in two phrasings better (LDA follows the class means; RESULTS.md); λ is
  chosen per layer from a small grid by out-of-fold recall.
- Threshold: out-of-fold scores are standardised by each fold's *training* negatives'
  projection mean and spread (the final, all-data fit is standardised the same way, so the
  fold and final scales match). The threshold sits halfway between the highest out-of-fold
  negative allowed to stay below it (`max_false_open`; 0 = all of them) and the lowest
  out-of-fold topic score above that one (widest margin), then is mapped back through the
  all-data fit's statistics.
  A union of detectors (one per topic source) shares that threshold on their standardised
  scores, or (`per_detector`) gets one each, chosen together so the union's false opens
  stay within the budget and the worst source's recall is highest.
- Layer: the highest out-of-fold recall at that threshold; ties go to the larger margin.
- Ordinary negatives are unlabelled, not negative: a pool of everyday prompts holds some
  on the topic itself (harmless_train has ~480 cooking requests in 18,800; CoCoNot's contrast
  set asks "I made pasta and it seems bland…"), and one of them above the threshold forces it
  over most of the topic (the cooking gate's recall fell to 0.42). So an *ordinary* negative
  whose out-of-fold score reaches the median topic score is taken for an unlabelled topic
  prompt and left out of the threshold (one round of positive-unlabelled cleaning). The
  caller says which negatives are ordinary: everyday prompts only (a harmful or look-alike
  prompt must stay shut, or its refusal is unlocked). Letting induce mode set aside every
  negative was measured on cooking and rejected: out-of-fold recall 0.42 -> 0.75, held out
  9/16 -> 10/16, XSTest-safe refusal 0.25 -> 0.35, KL 0.000 -> 0.082 (RESULTS.md). The gate
  record lists the prompts set aside, so a reader can check them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from refusalkit.activations import MEAN_ALL, MEAN_USER, capture
from refusalkit.directions import logistic, rmd
from refusalkit.errors import UserError
from refusalkit.geometry import auc
from refusalkit.interventions import Gate
from refusalkit.models import LoadedModel


def _lda(pos: torch.Tensor, neg: torch.Tensor, shrink: float) -> torch.Tensor:
    """Ridge-LDA with λ in units of the negatives' mean coordinate variance."""
    return rmd(pos, neg, lam=shrink * float(neg.double().var(0).mean().clamp_min(1e-12)))


def _logistic(pos: torch.Tensor, neg: torch.Tensor, shrink: float) -> torch.Tensor:
    """L2 logistic regression with λ on standardised coordinates."""
    return logistic(pos, neg, lam=shrink)


# each detector: its direction estimator and the λ grid chosen from by out-of-fold recall
DETECTORS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
                           tuple[float, ...]]] = {
    "lda": (_lda, (0.1, 1.0, 10.0, 100.0)),
    "logistic": (_logistic, (1e-3, 1e-2, 1e-1, 1.0)),
}


@dataclass(frozen=True)
class GateFit:
    gate: Gate
    recall: float  # out-of-fold share of topic prompts it opens for (none of the others)
    margin_z: float  # out-of-fold gap between the top other prompt and the next topic one
    leak: float  # 95 % upper bound (Wilson) of the out-of-fold false-open rate
    shrink: float  # λ: LDA ridge in units of the mean coordinate variance, or logistic L2
    table: list[dict[str, float]]  # one row per candidate layer (best shrink)
    dropped: tuple[int, ...] = ()  # ordinary negatives taken for unlabelled topic prompts
    recall_by: tuple[float, ...] = ()  # out-of-fold recall per topic stratum (pos_strata)
    vetoed: float = 0.0  # out-of-fold share of topic prompts the harm veto shut


def _folds(n: int, k: int, gen: torch.Generator,
           groups: torch.Tensor | None = None) -> list[torch.Tensor]:
    """k folds of row indices; rows of one group (copies of one prompt in other phrasings)
    fall in the same fold, so a copy never scores a direction fitted on its twin."""
    if groups is None:
        return list(torch.randperm(n, generator=gen).chunk(k))
    ids = groups.unique()
    chunks = ids[torch.randperm(len(ids), generator=gen)].chunk(k)
    return [torch.nonzero(torch.isin(groups, c)).flatten() for c in chunks]


def _fit(pos: torch.Tensor, neg: torch.Tensor, shrink: float,
         detector: str = "lda") -> tuple[torch.Tensor, float, float]:
    """Unit direction and the negatives' projection mean / std along it."""
    v = DETECTORS[detector][0](pos, neg, shrink)
    proj = neg.double() @ v.double()
    return v, float(proj.mean()), float(proj.std().clamp_min(1e-12))


SHUT = -1e9  # out-of-fold score of a prompt the veto shuts: below every threshold


def wilson_upper(k: int, n: int, z: float = 1.645) -> float:
    """One-sided 95 % Wilson upper bound of a rate seen k times in n (never 0 for k = 0: a
    detector that erred on none of 300 prompts can still err on the next one)."""
    if n <= 0:
        return 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def _threshold(pos_z: torch.Tensor, neg_z: torch.Tensor, max_false_open: float,
               strata: torch.Tensor | None = None) -> tuple[float, float, float]:
    """(threshold, recall, margin): at most a `max_false_open` share of negatives above the
    threshold, placed halfway to the next topic score so the margin is as wide as it can be.
    With `strata` (each negative's phrasing) the share holds within every stratum: pooled,
    the budget could all be spent on the plain phrasing, which is what users type."""
    def top_of(z: torch.Tensor) -> float:
        return float(z.sort(descending=True).values[int(max_false_open * len(z))])

    top = (top_of(neg_z) if strata is None
           else max(top_of(neg_z[strata == s]) for s in strata.unique()))
    above = pos_z[pos_z > top]
    if len(above) == 0:
        return top + 1e-6, 0.0, 0.0
    low = float(above.min())
    return (top + low) / 2, float((pos_z > top).double().mean()), low - top


def _union_thresholds(pz: torch.Tensor, nz: torch.Tensor, max_false_open: float,
                      strata: torch.Tensor | None, pos_strata: torch.Tensor
                      ) -> tuple[list[float], torch.Tensor, float]:
    """Per-detector thresholds for a union of k detectors ([k, n] scores): the false-open
    budget is spent where it buys the most recall. One shared threshold spends it on
    whichever detector's negatives run highest; on the China gate that was the requests
    detector, and out-of-fold question recall was 0.71 where the question detector alone,
    at the same budget, kept 0.92. Held out it moved along the trade-off rather than past
    it (more questions, fewer requests, more harmful opens; RESULTS.md). Searched: each
    detector letting through 0…budget of its top negatives, the union's opens within
    budget (in every stratum); kept: the best worst-source recall, then total recall, then
    margin. Each threshold then sits halfway to its detector's next topic score. Returns
    (thresholds, topic rows opened, margin)."""
    k = pz.shape[0]
    masks = ([torch.ones(nz.shape[1], dtype=torch.bool)] if strata is None
             else [strata == s for s in strata.unique()])
    caps = [int(max_false_open * int(m.sum())) for m in masks]
    top = [nz[d].sort(descending=True).values[:max(caps) + 1] for d in range(k)]
    best: tuple | None = None
    for ranks in itertools.product(*(range(len(t)) for t in top)):
        t = torch.stack([top[d][r] for d, r in enumerate(ranks)]).unsqueeze(1)
        shut = (nz > t).any(0)
        if any(int(shut[m].sum()) > c for m, c in zip(masks, caps, strict=True)):
            continue
        opened = (pz > t).any(0)
        by = [float(opened[pos_strata == s].double().mean()) for s in pos_strata.unique()]
        key = (min(by), float(opened.double().mean()))
        if best is None or key > best[0]:
            best = (key, t.squeeze(1), opened)
    assert best is not None  # every detector at its top negative passes no negative
    mids, margins = [], []
    for d in range(k):
        t_d = float(best[1][d])
        above = pz[d][pz[d] > t_d]
        low = float(above.min()) if len(above) else t_d + 2e-6
        mids.append((t_d + low) / 2)
        margins.append(low - t_d)
    return mids, best[2], min(margins)


def fit_gate(pos: torch.Tensor, neg: torch.Tensor, layers: Sequence[int], *,
             max_false_open: float = 0.0, pool: str = "last", folds: int = 4,
             seed: int = 0, ordinary: torch.Tensor | None = None,
             groups: tuple[torch.Tensor, torch.Tensor] | None = None,
             strata: torch.Tensor | None = None,
             pos_strata: torch.Tensor | None = None, per_source: bool = False,
             detector: str = "lda", veto: torch.Tensor | None = None,
             veto_share: float = 0.0, per_detector: bool = False) -> GateFit:
    """Fit a topic gate from [n, L, d] topic (`pos`) and other (`neg`) activations, where
    axis 1 indexes `layers` (model layer numbers) and the features were read as `pool`
    says (see `pool_position`). `ordinary` [n_neg] bool marks everyday negatives that may
    secretly be on the topic (see the module notes). `groups` (topic, other) gives each row
    its prompt's id when rows are one prompt in several phrasings: folds keep them together.
    `strata` [n_neg] gives each other row its phrasing: the false-open share then holds in
    each phrasing, not only pooled over them. `pos_strata` [n_pos] gives each topic row its
    source (e.g. the target's questions, requests written for the gate): the layer is then
    chosen by its worst source's recall, so a gate that reads one phrasing well cannot win
    by the other's numbers. `per_source` fits one detector per topic source (the gate opens
    when any passes: a union of linear detectors, for sources one direction cannot cover);
    each detector's score is standardised on its own negatives and the one threshold is set
    on the highest, so the false-open budget holds for the union; with `per_detector` each
    gets its own threshold, chosen jointly under the same budget (_union_thresholds).
    `detector` picks each direction's estimator and λ grid from DETECTORS: "lda"
    (ridge-LDA) or "logistic" (L2 logistic regression); both are linear, so the gate, its
    hook and its artifact are the same either way. `veto` [n_neg] bool marks the negatives
    that must stay shut (harmful requests): with `veto_share` > 0 a second direction at the
    same layer, those against the topic, shuts the gate where it passes the threshold that
    leaves `veto_share` of the topic's prompts (out of fold) shut; the negatives it shuts no
    longer count against the false-open budget (Gate.veto)."""
    if detector not in DETECTORS:
        raise UserError(f"unknown gate detector '{detector}'; use {' or '.join(DETECTORS)}")
    if per_source and pos_strata is None:
        raise ValueError("per_source needs pos_strata")
    sources = pos_strata.unique().tolist() if per_source and pos_strata is not None else [None]
    if pos.shape[0] < folds or neg.shape[0] < folds:
        raise UserError(f"a topic gate needs at least {folds} topic and {folds} other prompts "
                        f"(got {pos.shape[0]} and {neg.shape[0]})")
    vetoing = veto is not None and veto_share > 0 and bool(veto.any())
    gen = torch.Generator().manual_seed(seed)
    pg, ng = groups if groups is not None else (None, None)
    p_folds, n_folds = _folds(len(pos), folds, gen, pg), _folds(len(neg), folds, gen, ng)
    best: tuple | None = None
    table = []
    for slot, layer in enumerate(layers):
        p, n = pos[:, slot].double(), neg[:, slot].double()
        layer_best: tuple | None = None
        for shrink in DETECTORS[detector][1]:
            pz = torch.empty(len(sources), len(p), dtype=torch.float64)
            nz = torch.empty(len(sources), len(n), dtype=torch.float64)
            vp = torch.full((len(p),), -math.inf, dtype=torch.float64)
            vn = torch.full((len(n),), -math.inf, dtype=torch.float64)
            for pf, nf in zip(p_folds, n_folds, strict=True):
                train = torch.ones(len(p), dtype=torch.bool).index_fill_(0, pf, False)
                n_tr = n[torch.ones(len(n), dtype=torch.bool).index_fill_(0, nf, False)]
                zp, zn = [], []
                for src in sources:
                    rows = train if src is None else train & (pos_strata == src)
                    v, mu, sd = _fit(p[rows], n_tr, shrink, detector)
                    zp.append((p[pf] @ v.double() - mu) / sd)
                    zn.append((n[nf] @ v.double() - mu) / sd)
                pz[:, pf] = torch.stack(zp)
                nz[:, nf] = torch.stack(zn)
                if vetoing:  # harmful negatives against the topic, scaled on the topic
                    assert veto is not None
                    h_tr = veto.clone().index_fill_(0, nf, False)
                    v, mu, sd = _fit(n[h_tr], p[train], shrink, detector)
                    vp[pf] = (p[pf] @ v.double() - mu) / sd
                    vn[nf] = (n[nf] @ v.double() - mu) / sd
            p_any, n_any = pz.amax(0), nz.amax(0)
            drop = (ordinary & (n_any >= p_any.median()) if ordinary is not None
                     else torch.zeros(len(n_any), dtype=torch.bool))
            # the veto's threshold leaves veto_share of the topic shut; what it shuts cannot
            # open, so shut topic rows count as missed and shut negatives leave the budget
            veto_z = (float(vp.sort(descending=True).values[int(veto_share * len(vp))])
                      if vetoing else math.inf)
            # (shut negatives stay in the budget's denominator: it is a share of all others)
            p_shut, n_shut = vp > veto_z, vn > veto_z
            pz, p_any = pz.masked_fill(p_shut, SHUT), p_any.masked_fill(p_shut, SHUT)
            nz, n_any = nz.masked_fill(n_shut, SHUT), n_any.masked_fill(n_shut, SHUT)
            drop = drop & ~n_shut  # PU-cleaned everyday prompts (recorded)
            kept_strata = None if strata is None else strata[~drop]
            if len(sources) == 1 or not per_detector:
                t, recall, margin = _threshold(p_any, n_any[~drop], max_false_open,
                                               kept_strata)
                ts, opened = [t] * len(sources), p_any > t
            else:  # a union of detectors: one threshold each (see _union_thresholds)
                assert pos_strata is not None
                ts, opened, margin = _union_thresholds(pz, nz[:, ~drop], max_false_open,
                                                       kept_strata, pos_strata)
                recall = float(opened.double().mean())
            by = (tuple(float(opened[pos_strata == k].double().mean())
                        for k in pos_strata.unique()) if pos_strata is not None else (recall,))
            key = (min(by), recall, margin)
            n_open = (nz[:, ~drop] > torch.tensor(ts, dtype=torch.float64)[:, None]).any(0)
            row = {"layer": layer, "shrink": shrink, "recall": recall, "margin_z": margin,
                   "recall_by": list(by),
                   "auc": auc(p_any, n_any[~drop]),
                   "threshold_z": ts[0] if len(ts) == 1 else ts,
                   "leak": wilson_upper(int(n_open.sum()), int((~drop).sum())),
                   "dropped": int(drop.sum()),
                   **({"veto_z": veto_z, "vetoed": float(p_shut.double().mean())}
                      if vetoing else {})}
            if layer_best is None or key > layer_best[0]:
                layer_best = (key, row, drop)
        assert layer_best is not None
        table.append(layer_best[1])
        if best is None or layer_best[0] > best[0]:
            best = (layer_best[0], layer_best[1], slot, layer_best[2])
    assert best is not None
    row, slot, drop = best[1], best[2], best[3]
    vs, ts = [], []
    tz = row["threshold_z"] if isinstance(row["threshold_z"], list) else [row["threshold_z"]]
    for src, z in zip(sources, tz, strict=True):  # as in the folds: each on its own scale
        rows = slice(None) if src is None else pos_strata == src
        v, mu, sd = _fit(pos[rows, slot], neg[:, slot], row["shrink"], detector)
        vs.append(v)
        ts.append(mu + z * sd)
    veto_v, veto_t = None, math.inf
    if vetoing:  # as in the folds: every harmful negative against every topic prompt
        assert veto is not None
        veto_v, mu, sd = _fit(neg[veto, slot], pos[:, slot], row["shrink"], detector)
        veto_t = mu + row["veto_z"] * sd
    gate = Gate(int(row["layer"]), vs[0] if len(vs) == 1 else torch.stack(vs),
                ts[0] if len(ts) == 1 else tuple(ts), pool,  # type: ignore[arg-type]
                veto_v, veto_t)
    return GateFit(gate, row["recall"], row["margin_z"], row["leak"], row["shrink"], table,
                   tuple(torch.nonzero(drop).flatten().tolist()), tuple(row["recall_by"]),
                   row.get("vetoed", 0.0))


def pool_position(pool: str) -> int | str:
    """The `capture` position that reads what a gate with this pooling reads."""
    return {"mean": MEAN_ALL, "user": MEAN_USER}.get(pool, -1)


def gate_open(lm: LoadedModel, gate: Gate, prompts: Sequence[str], *,
              batch_size: int = 16) -> torch.Tensor:
    """Which prompts a gate opens for: the same decision its hook takes (last prompt token's
    projection at the gate layer), from a forward pass that stops at that layer."""
    if not prompts:
        return torch.zeros(0, dtype=torch.bool)
    h = capture(lm, prompts, [gate.layer], [pool_position(gate.pool)], batch_size=batch_size,
                show_progress=False)[:, 0, 0]
    return gate.decide(h)


def gate_of(profile: object) -> Gate | None:
    """The one gate every operator of a profile shares, else None (ungated or mixed)."""
    ops = getattr(profile, "ops", ())
    gates = {id(op.gate) for op in ops}
    if not ops or len(gates) != 1 or ops[0].gate is None:
        return None
    return ops[0].gate
