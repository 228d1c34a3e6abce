"""`refusalkit analyze` configuration: splits (named contrasts) and analysis settings.

A split is a named set of prompts the model should not fully comply with (`refuse`) plus a
benign side (`benign`); each side is one or more prompt specs (shared dataset names with
filters, local files, builtin sets — see `refusalkit.prompts`). Prompt pools are sampled with
a seed derived from the config seed and the *specs* (not the split name), so splits with the
same benign side share the same benign prompts and their activations are computed once.
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

from pydantic import Field, field_validator, model_validator

from refusalkit.config import ConfigModel
from refusalkit.errors import UserError
from refusalkit.prompts import load_prompts

SpecList = list[str]


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


class Split(ConfigModel):
    """A named contrast: prompts the model should not fully comply with vs benign prompts."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Short unique name (letters, digits, _ . -).")
    refuse: SpecList = Field(min_length=1, description="Prompt spec(s) the model should not "
                             "fully comply with, e.g. \"harmful_train\" or "
                             "\"coconot_original?category=Humanizing requests\".")
    benign: SpecList = Field(min_length=1, description="Prompt spec(s) of the benign side; "
                             "several specs are pooled.")
    sweep: bool = Field(True, description="Steer along this split's direction in the sweeps.")

    _lists = field_validator("refuse", "benign", mode="before")(_as_list)


class DirectionsConfig(ConfigModel):
    """Per-split difference-in-means directions."""

    n: int = Field(32, ge=2, description="Prompts per side for a split's direction "
                   "(paper B: 32/32); fewer when a side's pool is smaller.")
    pool: int = Field(64, ge=2, description="Prompts per side sampled for resamples and "
                      "separability (activations are captured for all of them).")
    resamples: int = Field(2, ge=2, description="Independent (disjoint) resamples per "
                           "split for stability, each of min(n, pool // resamples) prompts "
                           "a side.")
    layer: int | float | Literal["middle"] = Field(
        "middle", description="Analysis and steering layer: index, fraction of depth "
        "(0.5) or \"middle\".")
    positions: list[int] = Field([-2, -1], min_length=1, description="Token positions "
                                 "(negative offsets); the first is primary (paper B: -2).")

    @field_validator("positions")
    @classmethod
    def _negative(cls, v: list[int]) -> list[int]:
        if any(p >= 0 for p in v) or len(set(v)) != len(v):
            raise ValueError("positions must be distinct negative offsets such as -2, -1")
        return v


class BucketsConfig(ConfigModel):
    """Behaviour buckets HR/HC/BR/BC from judged unsteered responses (paper B's oracles)."""

    harmful: SpecList = Field(["jailbreakbench", "harmful_val", "xstest?label=unsafe"],
                              description="Harmful prompt specs for the buckets and the "
                              "evaluation set.")
    benign: SpecList = Field(["xstest?label=safe", "coconot_contrast", "harmless_val"],
                             description="Benign prompt specs (look-alikes find "
                             "over-refusals).")
    n_harmful: int = Field(48, ge=2, description="Harmful prompts generated unsteered.")
    n_benign: int = Field(64, ge=2, description="Benign prompts generated unsteered.")
    prescreen: int = Field(192, ge=0, description="Benign candidates ranked by the "
                           "first-token refusal score to find over-refusals (0 = off).")
    enrich: float = Field(0.5, ge=0, le=1, description="Share of n_benign taken from the "
                          "highest-scoring candidates (the rest at random).")
    n_oracle: int = Field(32, ge=2, description="Max prompts per bucket for oracle "
                          "directions.")
    eval_per_bucket: int = Field(8, ge=1, description="Evaluation prompts per bucket for "
                                 "the sweeps (short buckets are filled from the same side).")

    _lists = field_validator("harmful", "benign", mode="before")(_as_list)


class SweepConfig(ConfigModel):
    """Steering sweeps: activation addition per direction over an α grid, plus ablation."""

    alphas: list[float] = Field([0.5, 0.75, 1.0], min_length=1, description="Addition "
                                "strengths α > 0: fractions of the calibrated α_max when "
                                "calibrate = true, else values in alpha_unit (α = 0, the "
                                "unsteered baseline, is always included).")
    alpha_unit: Literal["core_norm", "absolute"] = Field(
        "core_norm", description="core_norm: α in units of ‖μ_refuse − μ_benign‖ of the first "
        "split at the steering layer (α = 1 adds a vector as long as Arditi's raw one).")
    calibrate: bool = Field(True, description="Choose α_max on the first split's direction: "
                            "the first ladder value at which calibrate_target of the "
                            "complied benign evaluation prompts refuse (judged text), else "
                            "the value that refused most. One α grid for every direction.")
    ladder: list[float] = Field([2.0, 3.0, 4.0, 5.0, 6.0, 8.0], min_length=1,
                                description="α_max candidates in alpha_unit, tried in "
                                "increasing order.")
    calibrate_target: float = Field(0.75, gt=0, le=1, description="Refusal share that "
                                    "α_max must reach on the calibration prompts.")
    calibrate_prompts: int = Field(8, ge=1, description="Complied benign evaluation prompts "
                                   "used for calibration.")
    layer: int | float | Literal["middle"] | None = Field(
        None, description="Steering layer of the sweeps (index, depth fraction or \"middle\"); "
        "unset = directions.layer. A split's direction is re-read at this layer, so the "
        "geometry can stay at paper B's site while the sweeps steer where the model's "
        "refusal direction is causal.")
    position: int | None = Field(None, description="Which of directions.positions the swept "
                                 "directions are taken at; unset = the primary (first) one.")
    ablation: bool = Field(True, description="Also ablate each direction at every layer.")
    oracle: list[Literal["HR-BC", "BR-BC", "HC-BC", "HR-HC"]] = Field(
        ["HR-BC", "BR-BC"], description="Oracle bucket directions swept besides the splits.")
    max_new_tokens: int = Field(32, ge=1, description="Greedy tokens per response.")
    batch_size: int = Field(16, ge=1, description="Generation batch size.")
    examples: int = Field(3, ge=0, description="Example responses kept per direction for "
                          "the report.")

    @field_validator("alphas", "ladder")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(a <= 0 for a in v):
            raise ValueError("values must be positive (α = 0 is always included as the "
                             "baseline)")
        return sorted(set(v))


class StatsConfig(ConfigModel):
    """Resampling statistics."""

    bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples for the "
                           "trade-off-gap CI.")
    permutations: int = Field(2000, ge=10, description="Permutations for style tests.")
    folds: int = Field(4, ge=2, description="Cross-validation folds for separability.")
    pc_fraction: float = Field(0.9, gt=0, le=1, description="Share of the between-class "
                               "difference the PC count must hold.")


class AnalyzeConfig(ConfigModel):
    """refusalkit analyze: is refusal one direction or many, and what do they change?"""

    model: str = Field("qwen2.5-coder-0.5b", description="Model spec.")
    judge: str = Field("calibrated", description="Judge spec for responses (see refusalkit "
                       "judge --help); the default counts babble and off-topic answers as "
                       "refusal, as paper A does, where keyword counts only refusal phrases.")
    seed: int = Field(0, description="Seed for every sample and resample.")
    batch_size: int = Field(16, ge=1, description="Batch size for activations and scores.")
    splits: list[Split] = Field(min_length=2, description="At least two splits.")
    directions: DirectionsConfig = Field(default_factory=DirectionsConfig)
    buckets: BucketsConfig = Field(default_factory=BucketsConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)

    @model_validator(mode="after")
    def _unique(self) -> AnalyzeConfig:
        names = [s.name for s in self.splits]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"split names must be unique; repeated: {', '.join(dup)}")
        if self.sweep.position is not None and self.sweep.position not in \
                self.directions.positions:
            raise ValueError(f"sweep.position {self.sweep.position} must be one of "
                             f"directions.positions {self.directions.positions}")
        return self


def resolve_layer(spec: int | float | str, n_layers: int, key: str = "directions.layer"
                  ) -> int:
    """Layer index from an int, a depth fraction or "middle" (resid_pre, 1 … n_layers − 1)."""
    if spec == "middle":
        layer = n_layers // 2
    elif isinstance(spec, float) and 0 < spec < 1:
        layer = round(spec * n_layers)
    elif isinstance(spec, int) or (isinstance(spec, float) and spec.is_integer()):
        layer = int(spec)
    else:
        raise UserError(f"{key} {spec!r} is not a layer index, a fraction in (0, 1) "
                        "or \"middle\"")
    if not 1 <= layer < n_layers:
        raise UserError(f"{key} {spec!r} gives layer {layer}; the model has "
                        f"{n_layers} layers, use 1 … {n_layers - 1}")
    return layer


def _seed_for(seed: int, specs: list[str]) -> int:
    digest = hashlib.sha256(("\x1f".join(specs) + f"|{seed}").encode()).hexdigest()
    return int(digest[:12], 16)


def sample_pool(specs: list[str], size: int, seed: int) -> list[str]:
    """Up to `size` distinct prompts from the union of specs, in a seeded random order."""
    seen: dict[str, None] = {}
    for spec in specs:
        for p in load_prompts(spec).prompts:
            seen.setdefault(p, None)
    prompts = list(seen)
    random.Random(_seed_for(seed, specs)).shuffle(prompts)
    return prompts[:size]


def split_pools(cfg: AnalyzeConfig) -> dict[str, dict[str, list[str]]]:
    """{split: {"refuse": [...], "benign": [...]}}: each side's seeded pool.

    The first `directions.n` prompts of a pool are the split's main sample. A side with fewer
    than two prompts is a user error naming the split.
    """
    out: dict[str, dict[str, list[str]]] = {}
    cache: dict[tuple[str, ...], list[str]] = {}
    for s in cfg.splits:
        sides = {}
        for side in ("refuse", "benign"):
            specs = getattr(s, side)
            key = tuple(specs)
            if key not in cache:
                cache[key] = sample_pool(specs, cfg.directions.pool, cfg.seed)
            if len(cache[key]) < 2:
                raise UserError(f"split '{s.name}': the {side} side has {len(cache[key])} "
                                "prompt(s); a direction needs at least 2")
            sides[side] = cache[key]
        overlap = set(sides["refuse"]) & set(sides["benign"])
        if overlap:
            raise UserError(f"split '{s.name}': {len(overlap)} prompt(s) are on both sides; "
                            "make the refuse and benign specs disjoint")
        out[s.name] = sides
    return out
