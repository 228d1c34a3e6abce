"""`analyze(config) -> run folder`: is refusal one direction or many (paper B, METHODS.md §2)?

Stages (each stored in the run folder, so an interrupted run resumes where it stopped):
1. `prompts` — seeded prompt pools per split side (`splits.split_pools`);
2. `baseline` — unsteered judged responses for the behaviour buckets (`sweeps.baseline`);
3. `activations` — resid_pre at every layer 1 … L (L = last layer's output) and every
   configured position, for every pooled prompt, captured once;
4. `geometry` — per split: direction (difference in means of the first n/n prompts, unit),
   stability over resamples, cosine maps per layer, cross-validated separability per layer,
   participation ratio and PCs holding 90 % of ‖δ‖²; oracle bucket directions;
5. `eval_baseline` — the evaluation prompts regenerated unsteered (α = 0 of every curve);
   `sweep-NAME` — one per swept direction: addition over the α grid and ablation, judged;
6. `summary` — trade-off gap at matched RR with a bootstrap CI, style distributions and
   permutation tests. Tables, figures, metrics.json and report.html are then (re)written.
Directions are also saved as a direction artifact (`directions/`) usable with `steer`.
With `reuse_from`, the stages up to `eval_baseline` are taken from an earlier run whose
inputs (STAGE_READS) were the same: a changed sweep keeps the judged baseline and the
activations.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from refusalkit.activations import capture
from refusalkit.analyze import divergence as D
from refusalkit.analyze import geometry as G
from refusalkit.analyze.config import AnalyzeConfig, resolve_layer, split_pools
from refusalkit.analyze.styles import marker_rates
from refusalkit.analyze.sweeps import (
    BUCKETS,
    baseline,
    bucket_prompts,
    calibrate,
    choose_eval,
    outcome_matrix,
    rates,
    run_sweeps,
    steered_styles,
    sweep_direction,
    unsteered_eval,
)
from refusalkit.artifacts import DirectionSet, dataset_record, model_record, save_directions
from refusalkit.examiner import Decoding, Examiner
from refusalkit.judge import JudgementCache
from refusalkit.models import LoadedModel
from refusalkit.prompts import load_prompts
from refusalkit.runs import Reads, RunDir, check_run_folder, run_manifest

# What each early stage reads besides the model (runs.Reads): the prompt sources' contents
# are in the manifest (`source:SPEC`), so an edited prompt file is never taken as unchanged.
# The examiner generates with sweep.max_new_tokens in batches of sweep.batch_size. Later
# stages (calibration, sweeps, summary) read nearly everything and are always computed.
_EXAMINER = ("model", "judge", "seed", "sweep.max_new_tokens", "sweep.batch_size")
STAGE_READS: dict[str, Reads] = {
    "prompts": Reads(("splits", "directions.pool", "seed"), ("source:*",)),
    "baseline": Reads((*_EXAMINER, "batch_size", "buckets"), ("source:*",)),
    "activations": Reads(("model", "batch_size", "directions.positions"),
                         after=("prompts", "baseline")),
    "directions": Reads(("splits", "directions.n"),
                        after=("prompts", "baseline", "activations")),
    "geometry": Reads(("model", "splits", "directions", "stats", "seed"),
                      after=("prompts", "baseline", "activations", "directions")),
    "oracle_directions": Reads(("buckets.n_oracle",),
                               after=("prompts", "baseline", "activations")),
    "oracle": Reads(("model", "buckets", "directions", "stats", "seed", "splits"),
                    after=("prompts", "baseline", "activations", "directions",
                           "oracle_directions")),
    "eval_baseline": Reads((*_EXAMINER, "buckets.eval_per_bucket"), after=("baseline",)),
}

ORACLES = {"HR-BC": ("HR", "BC"), "BR-BC": ("BR", "BC"), "HC-BC": ("HC", "BC"),
           "HR-HC": ("HR", "HC")}


def load_analyze_config(path: str | Path | None, overrides: dict[str, Any] | None = None
                        ) -> AnalyzeConfig:
    return AnalyzeConfig.load(path, overrides)


def analyze(config: AnalyzeConfig | str | Path, out: str | Path, *, resume: bool = False,
            lm: LoadedModel | None = None, show_progress: bool = True,
            reuse_from: str | Path | None = None) -> Path:
    """Run the whole analysis into run folder `out` and return its path.

    `config` is an `AnalyzeConfig` or a TOML path; `lm` reuses an already loaded model (its
    name is recorded in the manifest). With `resume`, finished stages are read back; with
    `reuse_from`, an earlier run's stages whose inputs are unchanged are copied.
    """
    from refusalkit.judge import make_judge
    from refusalkit.models import load_model

    cfg = config if isinstance(config, AnalyzeConfig) else load_analyze_config(config)
    check_run_folder(out, resume, reuse_from)  # before the (slow) model load
    # every prompt source's content, read before the (slow) model load so a bad spec fails first
    sources = sorted({spec for s in cfg.splits for spec in (*s.refuse, *s.benign)}
                     | {*cfg.buckets.harmful, *cfg.buckets.benign})
    datasets = [dataset_record(f"source:{spec}", load_prompts(spec).prompts) for spec in sources]
    if lm is None:
        lm = load_model(cfg.model)
    judge = make_judge(cfg.judge, lm=lm)
    layer = resolve_layer(cfg.directions.layer, lm.n_layers)
    manifest = run_manifest("analyze", cfg.model_dump(mode="json"), model=model_record(lm),
                            datasets=datasets,
                            seeds={"seed": cfg.seed}, title=f"refusalkit analyze — {lm.name}",
                            judge=judge.id, layer=layer)
    with RunDir(out, manifest, resume=resume, reuse_from=reuse_from,
                defaults=type(cfg).defaults()) as run:
        ex = Examiner(lm, judge, Decoding(max_new_tokens=cfg.sweep.max_new_tokens),
                      cache=JudgementCache(run.file("judgements.sqlite")),
                      batch_size=cfg.sweep.batch_size, show_progress=show_progress)
        _pipeline(run, cfg, ex, layer)
        return run.path


def _pipeline(run: RunDir, cfg: AnalyzeConfig, ex: Examiner, layer: int) -> None:
    lm, show_progress = ex.lm, ex.show_progress
    reads = STAGE_READS
    pools = run.stage("prompts", lambda: split_pools(cfg), reads["prompts"])
    base = run.stage("baseline", lambda: baseline(ex, cfg), reads["baseline"])
    buckets = bucket_prompts(base)
    prompts = _unique([p for sides in pools.values() for side in sides.values() for p in side]
                      + [p for b in BUCKETS for p in buckets[b]])
    layers = list(range(1, lm.n_layers + 1))
    acts = run.tensor_stage("activations", lambda: {"acts": capture(
        lm, prompts, layers, cfg.directions.positions, batch_size=cfg.batch_size,
        show_progress=show_progress)}, reads["activations"])["acts"]
    index = {p: i for i, p in enumerate(prompts)}

    def rows(ps: list[str]) -> torch.Tensor:
        return acts[[index[p] for p in ps]]

    geo_t = run.tensor_stage("directions", lambda: split_directions(cfg, pools, rows),
                             reads["directions"])
    geo = run.stage("geometry", lambda: geometry(cfg, pools, rows, acts, geo_t, layer),
                    reads["geometry"])
    oracle_t = run.tensor_stage("oracle_directions", lambda: oracle_directions(
        cfg, buckets, rows), reads["oracle_directions"])
    oracle = run.stage("oracle", lambda: oracle_geometry(cfg, buckets, rows, geo_t, oracle_t,
                                                         layer), reads["oracle"])
    _save_direction_artifact(run, lm, cfg, geo_t, oracle_t, layers)

    chosen = choose_eval(base, cfg.buckets.eval_per_bucket, cfg.seed)
    eval_rows = run.stage("eval_baseline", lambda: unsteered_eval(ex, chosen),
                          reads["eval_baseline"])
    sl, pi = sweep_site(cfg, lm.n_layers, layer)
    oracle_sweep = oracle_t if pi == 0 else oracle_directions(cfg, buckets, rows, pi)
    vectors = swept_vectors(cfg, geo_t, oracle_sweep, sl, pi)
    unit_scale = 1.0
    if cfg.sweep.alpha_unit == "core_norm":
        unit_scale = float(geo_t["raw_norm"][0, pi, sl - 1])
    scale = unit_scale
    if cfg.sweep.calibrate:
        cal = run.stage("calibration", lambda: calibrate(
            ex, cfg, geo_t["dirs"][0, pi, sl - 1], sl, unit_scale, eval_rows))
        scale = unit_scale * cal["alpha_max"]
    alphas_abs = [a * scale for a in cfg.sweep.alphas]
    sweeps = run_sweeps(list(vectors), run.stage, lambda n: sweep_direction(
        ex, cfg, vectors[n], sl, alphas_abs, eval_rows))
    summary = run.stage("summary", lambda: summarize(cfg, eval_rows, sweeps))
    summary["site"] = {"layer": sl, "position": cfg.directions.positions[pi]}

    from refusalkit.analyze.report import write_outputs

    write_outputs(run, cfg, lm.name, layer, pools, base, eval_rows, geo, oracle, sweeps,
                  summary, scale, ex.judge.id)


def sweep_site(cfg: AnalyzeConfig, n_layers: int, layer: int) -> tuple[int, int]:
    """(steering layer, index into directions.positions) of the sweeps."""
    sl = layer if cfg.sweep.layer is None else resolve_layer(cfg.sweep.layer, n_layers,
                                                             "sweep.layer")
    p = cfg.sweep.position
    return sl, 0 if p is None else cfg.directions.positions.index(p)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------- geometry
def split_directions(cfg: AnalyzeConfig, pools: dict, rows) -> dict[str, torch.Tensor]:
    """dirs [S, P, L, d] (unit) and raw_norm [S, P, L] of each split's main n/n sample."""
    n = cfg.directions.n
    dirs, norms = [], []
    for s in cfg.splits:
        pos, neg = rows(pools[s.name]["refuse"][:n]), rows(pools[s.name]["benign"][:n])
        delta = (pos.double().mean(0) - neg.double().mean(0)).permute(1, 0, 2)  # [P, L, d]
        norms.append(delta.norm(dim=-1))
        dirs.append(G.unit(delta).float())
    return {"dirs": torch.stack(dirs), "raw_norm": torch.stack(norms).float()}


def geometry(cfg: AnalyzeConfig, pools: dict, rows, acts: torch.Tensor,
             geo_t: dict[str, torch.Tensor], layer: int) -> dict[str, Any]:
    """Stability, cosine maps, separability, participation ratio and PC counts (JSON)."""
    names = [s.name for s in cfg.splits]
    dc, st = cfg.directions, cfg.stats
    li = layer - 1  # index into layers 1 … L
    dirs = geo_t["dirs"]  # [S, P, L, d]
    n_layers = dirs.shape[2]
    per_split: dict[str, Any] = {}
    for k, s in enumerate(cfg.splits):
        pos_all, neg_all = rows(pools[s.name]["refuse"]), rows(pools[s.name]["benign"])
        stab = {}
        for pi, p in enumerate(dc.positions):
            rd, info = G.resampled_directions(pos_all[:, :, pi], neg_all[:, :, pi], dc.n,
                                              dc.resamples, cfg.seed)  # [R, L, d]
            c = G.stability(rd[:, li])
            stab[str(p)] = {"stability": c, **info,
                            f"projected_at_{dc.n}": G.projected_stability(c, info["n"], dc.n),
                            "by_layer": [G.stability(rd[:, j]) for j in range(n_layers)]}
        pos, neg = pos_all[:, :, 0], neg_all[:, :, 0]
        per_split[s.name] = {
            "n_refuse": min(dc.n, len(pools[s.name]["refuse"])),
            "n_benign": min(dc.n, len(pools[s.name]["benign"])),
            "pool_refuse": len(pos_all), "pool_benign": len(neg_all),
            "stability": stab,
            "separability": G.separability_profile(pos, neg, folds=st.folds, seed=cfg.seed),
            "participation_ratio": [G.participation_ratio(dirs[k, 0, j])
                                    for j in range(n_layers)],
            "raw_norm": geo_t["raw_norm"][k, 0].tolist(),
            "position_cosine": {str(p): float(G.unit(dirs[k, 0, li]) @ G.unit(dirs[k, pi, li]))
                                for pi, p in enumerate(dc.positions)},
            "self_cosine_layers": G.cosine_matrix(dirs[k, 0]).tolist(),
        }
    # PCs of the model's activations at each layer (all prompts of the run, primary position)
    deltas = dirs * geo_t["raw_norm"][..., None]  # back to raw δ
    pcs: dict[str, list[dict]] = {n: [] for n in names}
    for j in range(n_layers):
        axes = G.principal_axes(acts[:, j, 0])
        for k, n in enumerate(names):
            pcs[n].append(G.difference_pcs(deltas[k, 0, j], axes, st.pc_fraction))
    for n in names:
        per_split[n]["pcs"] = pcs[n]
    cos = {str(p): [G.cosine_matrix(dirs[:, pi, j]).tolist() for j in range(n_layers)]
           for pi, p in enumerate(dc.positions)}
    return {"names": names, "layer": layer, "layers": list(range(1, n_layers + 1)),
            "positions": dc.positions, "splits": per_split, "cosine": cos}


def oracle_directions(cfg: AnalyzeConfig, buckets: dict[str, list[str]],
                      rows, pi: int = 0) -> dict[str, torch.Tensor]:
    """Oracle bucket directions [L, d] at position index pi (default the primary one);
    an oracle whose bucket is empty is left out."""
    k = cfg.buckets.n_oracle
    out = {}
    for name, (a, b) in ORACLES.items():
        if len(buckets[a]) >= 1 and len(buckets[b]) >= 1:
            out[name] = G.mean_difference_dirs(rows(buckets[a][:k])[:, :, pi],
                                               rows(buckets[b][:k])[:, :, pi])
    return out


def oracle_geometry(cfg: AnalyzeConfig, buckets: dict[str, list[str]], rows,
                    geo_t: dict[str, torch.Tensor], oracle_t: dict[str, torch.Tensor],
                    layer: int) -> dict[str, Any]:
    """Bucket sizes, oracle stabilities, and cosines of oracle vs split directions."""
    li = layer - 1
    k = cfg.buckets.n_oracle
    stab = {}
    for name, (a, b) in ORACLES.items():
        pa, pb = buckets[a][:k], buckets[b][:k]
        if min(len(pa), len(pb)) >= 2:
            rd, info = G.resampled_directions(rows(pa)[:, li, 0], rows(pb)[:, li, 0],
                                              cfg.directions.n, cfg.directions.resamples,
                                              cfg.seed)
            c = G.stability(rd)
            stab[name] = {"stability": c, **info, "bucket_sizes": [len(pa), len(pb)],
                          f"projected_at_{cfg.directions.n}": G.projected_stability(
                              c, info["n"], cfg.directions.n)}
    onames = list(oracle_t)
    split_names = [s.name for s in cfg.splits]
    vecs = [oracle_t[n][li] for n in onames] + [geo_t["dirs"][i, 0, li]
                                                 for i in range(len(split_names))]
    cos = G.cosine_matrix(torch.stack(vecs)) if vecs else torch.zeros(0, 0)
    by_layer = {}
    if "HR-BC" in oracle_t and "BR-BC" in oracle_t:
        by_layer["HR-BC|BR-BC"] = [float(G.unit(oracle_t["HR-BC"][j]) @
                                         G.unit(oracle_t["BR-BC"][j]))
                                   for j in range(oracle_t["HR-BC"].shape[0])]
    return {"sizes": {b: len(buckets[b]) for b in BUCKETS}, "stability": stab,
            "names": onames + split_names, "cosine": cos.tolist(), "cosine_by_layer": by_layer}


def swept_vectors(cfg: AnalyzeConfig, geo_t: dict[str, torch.Tensor],
                  oracle_t: dict[str, torch.Tensor], layer: int, pi: int
                  ) -> dict[str, torch.Tensor]:
    """Directions to sweep at (layer, position index pi), in order: splits with
    sweep = true, then configured oracles (`oracle_t` taken at the same position)."""
    out = {s.name: geo_t["dirs"][i, pi, layer - 1] for i, s in enumerate(cfg.splits)
           if s.sweep}
    for name in cfg.sweep.oracle:
        if name in oracle_t:
            out[name] = oracle_t[name][layer - 1]
    return out


def _save_direction_artifact(run: RunDir, lm: LoadedModel, cfg: AnalyzeConfig,
                             geo_t: dict[str, torch.Tensor], oracle_t: dict[str, torch.Tensor],
                             layers: list[int]) -> None:
    if (run.path / "directions" / "manifest.json").is_file():
        return
    dirs = {s.name: geo_t["dirs"][i, 0] for i, s in enumerate(cfg.splits)}
    dirs.update(oracle_t)
    meta = {"site": "resid_pre", "position": cfg.directions.positions[0], "method": "md",
            "source": "refusalkit analyze"}
    save_directions(DirectionSet(dirs, layers, meta), run.path / "directions", lm)


# ---------------------------------------------------------------------------- summary
def summarize(cfg: AnalyzeConfig, eval_rows: dict[str, list[dict]],
              sweeps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Curves, trade-off gap (bootstrap CI), style distributions and permutation tests."""
    curves, harm, benign, ablate = {}, {}, {}, {}
    for name, sw in sweeps.items():
        h, b = outcome_matrix(eval_rows, sw, "harmful"), outcome_matrix(eval_rows, sw, "benign")
        harm[name], benign[name] = h, b
        alphas = [0.0] + [c["alpha"] for c in sw["conditions"] if c["kind"] == "add"]
        curves[name] = [{"alpha": a, **rates(h[i].int().tolist(), b[i].int().tolist())}
                        for i, a in enumerate(alphas)]
        abl = [c for c in sw["conditions"] if c["kind"] == "ablate"]
        if abl:
            ablate[name] = rates([r["refusal"] for r in abl[0]["harmful"]],
                                 [r["refusal"] for r in abl[0]["benign"]])
    gap: dict[str, Any] = {"max_gap": float("nan")}
    if len(sweeps) >= 2 and eval_rows["harmful"] and eval_rows["benign"]:
        gap = G.tradeoff_gap_bootstrap(harm, benign, n_boot=cfg.stats.bootstrap, seed=cfg.seed)
    lexical = {n: steered_styles(eval_rows, sw, "style") for n, sw in sweeps.items()}
    judged = {n: steered_styles(eval_rows, sw, "judge_style") for n, sw in sweeps.items()}
    informative = len({x for v in judged.values() for x in v} - {"None"}) > 1
    tests = {"lexical": D.style_divergence(lexical, n_perm=cfg.stats.permutations,
                                           seed=cfg.seed)}
    if informative:
        tests["judge"] = D.style_divergence(judged, n_perm=cfg.stats.permutations,
                                            seed=cfg.seed)
    markers = {}
    for n, sw in sweeps.items():
        texts = [r["response"] for c in sw["conditions"] if c["kind"] == "add"
                 for side in ("harmful", "benign") for r in c[side] if r["refusal"]]
        markers[n] = {"n_refusals": len(texts), **marker_rates(texts)}
    return {"curves": curves, "ablation": ablate, "gap": _clean(gap),
            "styles": {"lexical": lexical, "judge": judged if informative else {}},
            "style_tests": _clean(tests), "markers": markers}


def _clean(obj: Any) -> Any:
    """NaN → None so the JSON stays standard."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj
