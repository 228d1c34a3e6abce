"""Steering profiles straight from a directions artifact: what `refusalkit profile` does.

`refusalkit extract` writes per-layer refusal directions; `generate`, `serve` and `export`
read profiles. This module turns the one into the other without a search, so a user who
knows the layers and the strength they want (from the extract report, a paper, an earlier
steer run) does not have to run `steer`.

Sign convention (directions.py): a direction points from the answered prompts (extract's
`--negative`) toward the refused ones (`--positive`). A negative strength moves states away
from refusal (removes it), a positive one toward it (induces it). Ablation removes the
direction whatever the sign. A relative strength is α × the layer's refuse-vs-answer gap (the
difference of the two prompt sets' mean projections on the direction), as in `steer`, so one
α means the same push at every depth.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from refusalkit.artifacts import (
    DIRECTIONS_FORMAT,
    MANIFEST,
    PROFILE_FORMAT,
    DirectionSet,
    load_directions,
)
from refusalkit.errors import UserError
from refusalkit.interventions import Gate, Op, Phase, Profile, ablation, addition, clamping
from refusalkit.operators import opening_tokens

OPS = ("add", "ablate", "clamp")
NO_PROJECTIONS = ("'{path}' does not record the prompt sets' projections (written by an older "
                  "refusalkit); {why} — re-run `refusalkit extract` to get an artifact that has "
                  "them{alt}")


def parse_layer_spec(spec: str, available: list[int], n_layers: int) -> list[int]:
    """'10-15', '10,12,14', '3,10-12', 'frac:0.66' or 'all' (every layer the artifact
    holds) → layers, each of which the artifact must hold."""
    from refusalkit.commands.core import _parse_layers

    available = [la for la in available if la < n_layers]  # the final state has no layer
    if not available:
        raise UserError("the directions artifact holds only the final state, which cannot be "
                        "steered; extract with --layers covering the layers to steer")
    if spec.strip() == "all":
        return list(available)
    layers = sorted(set(_parse_layers(spec, n_layers)))
    if layers and layers[-1] >= n_layers:
        raise UserError(f"layer {layers[-1]} cannot be steered: the model has layers "
                        f"0..{n_layers - 1} (layer {n_layers} is its final state)")
    missing = [la for la in layers if la not in available]
    if missing:
        have = (f"{available[0]}-{available[-1]}" if available == list(
            range(available[0], available[-1] + 1)) else ",".join(map(str, available)))
        raise UserError(f"the directions artifact has no layer {missing[0]}; it holds layers "
                        f"{have} (extract more with --layers)")
    return layers


def _projections(ds: DirectionSet, path: Path, why: str, alt: str) -> dict[str, list[float]]:
    proj = ds.meta.get("projections")
    if not isinstance(proj, Mapping) or not {"positive", "negative"} <= set(proj):
        raise UserError(NO_PROJECTIONS.format(path=path, why=why, alt=alt))
    return {k: [float(x) for x in proj[k]] for k in ("positive", "negative")}


def layer_gaps(ds: DirectionSet, path: Path) -> dict[int, float]:
    """Each layer's refuse-vs-answer gap: mean projection of the refused prompts minus that
    of the answered ones, on the layer's unit direction."""
    proj = _projections(ds, path, "a relative strength is a multiple of each layer's gap",
                        ", or give an absolute --alpha without --relative")
    return {la: p - n for la, p, n in zip(ds.layers, proj["positive"], proj["negative"],
                                          strict=True)}


def clamp_levels(ds: DirectionSet, path: Path, alpha: float) -> dict[int, float]:
    """Where a clamp starts: the refused prompts' mean projection when removing refusal
    (α < 0), the answered prompts' when inducing it (as `steer` does)."""
    proj = _projections(ds, path, "a clamp needs the level of the side it moves", "")
    side = proj["positive"] if alpha < 0 else proj["negative"]
    return dict(zip(ds.layers, side, strict=True))


def read_gate(path: str | Path, model: Mapping[str, Any]) -> Gate:
    """A topic gate to reuse: a steer run folder's fitted gate (`stages/gate.json`), or the
    gate of a gated profile (e.g. RUN/profile). It must come from the same model."""
    path = Path(path)
    stage = path / "stages" / "gate.json"
    if stage.is_file():
        rec = json.loads(stage.read_text())
        run = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).is_file() else {}
        _same_model(run.get("model", {}), model, path)
        return Gate.from_record(rec)
    from refusalkit.gates import gate_of
    from refusalkit.interventions import load_profile

    if (path / "profile" / MANIFEST).is_file():
        path = path / "profile"
    if not (path / MANIFEST).is_file():
        raise UserError(f"--gate '{path}' is neither a steer run folder with a fitted gate nor "
                        "a gated profile")
    prof = load_profile(path)
    gate = gate_of(prof)
    if gate is None:
        raise UserError(f"--gate '{path}': this profile has no topic gate (a steer run with "
                        "search.gate = \"on\" or \"search\" fits one)")
    _same_model(prof.meta.get("model", {}), model, path)
    return gate


def _same_model(rec: Mapping[str, Any], model: Mapping[str, Any], path: Path) -> None:
    if rec.get("fingerprint") != model.get("fingerprint"):
        raise UserError(f"--gate '{path}' was made for model '{rec.get('name')}', the "
                        f"directions for '{model.get('name')}'; use a gate of the same model")


@dataclass(frozen=True)
class Recipe:
    """What `refusalkit profile` was asked for (stored in the profile's manifest)."""

    layers: str
    op: str = "add"
    alpha: float | None = None
    relative: bool = False
    direction: str = "refusal"
    direction_layer: int | None = None  # one direction (this layer's) at every layer
    phase: Phase = "both"

    def check(self) -> None:
        """Every mistake that needs no file, with the fix in one line."""
        if self.op not in OPS:
            raise UserError(f"unknown --op '{self.op}'; use add, ablate or clamp")
        try:
            opening_tokens(self.phase)
        except UserError:
            raise UserError(f"unknown --phase '{self.phase}'; use prompt, generation, both or "
                            "prompt+N (the prompt and the first N generated tokens)") from None
        if self.op == "ablate" and (self.alpha is not None or self.relative):
            raise UserError("--op ablate projects the direction out and takes no --alpha")
        if self.op != "ablate" and self.alpha is None:
            raise UserError(f"--op {self.op} needs --alpha (negative removes refusal, "
                            "positive induces it)")
        if self.op == "clamp" and self.direction_layer is not None:
            raise UserError("--op clamp uses each layer's own direction and level; drop "
                            "--direction-layer")


def _vectors(ds: DirectionSet, recipe: Recipe, n_layers: int) -> dict[int, torch.Tensor]:
    """Layer → vector: each layer's own direction, or one layer's direction everywhere
    (then any model layer can be steered, e.g. all of them for an exportable ablation)."""
    src = recipe.direction_layer
    if src is None:
        ls = parse_layer_spec(recipe.layers, list(ds.layers), n_layers)
        return {la: ds.vector(recipe.direction, la) for la in ls}
    v = ds.vector(recipe.direction, src)
    ls = parse_layer_spec(recipe.layers, list(range(n_layers)), n_layers)
    return dict.fromkeys(ls, v)


def _operator(ds: DirectionSet, path: Path, recipe: Recipe, vectors: dict[int, torch.Tensor],
              gate: Gate | None) -> Op:
    ls = sorted(vectors)
    if recipe.op == "ablate":
        return ablation(vectors, ls, recipe.phase)
    assert recipe.alpha is not None
    alpha = recipe.alpha
    if recipe.relative:  # with --direction-layer: that layer's gap, at every layer
        gaps = layer_gaps(ds, path)
        strengths = {la: alpha * abs(gaps[recipe.direction_layer
                                          if recipe.direction_layer is not None else la])
                     for la in ls}
    else:
        strengths = dict.fromkeys(ls, alpha)
    if recipe.op == "clamp":
        return clamping(vectors, strengths, clamp_levels(ds, path, alpha), recipe.phase, gate)
    return addition(vectors, strengths, recipe.phase, gate)


def profile_from_directions(path: str | Path, recipe: Recipe, gate: str | Path | None = None
                            ) -> tuple[Profile, dict[str, Any]]:
    """(profile, model record) for `save_profile`, from a directions artifact; no model load.
    `gate`: a steer run folder or gated profile whose topic gate the profile reuses."""
    path = Path(path)
    recipe.check()
    if recipe.op == "ablate" and gate is not None:
        raise UserError("--gate applies to add and clamp only (ablation is not gated)")
    ds = load_directions(path)
    model = dict(ds.meta.get("model", {}))
    n_layers = int(model.get("n_layers", max(ds.layers) + 1))
    vectors = _vectors(ds, recipe, n_layers)
    the_gate = read_gate(gate, model) if gate is not None else None
    built = _operator(ds, path, recipe, vectors, the_gate)
    meta = {"made_by": "refusalkit profile", "source_format": DIRECTIONS_FORMAT,
            "source_tensors_sha256": ds.meta.get("tensors_sha256"),
            "recipe": {**asdict(recipe), "layers": sorted(vectors),
                       "gated": the_gate is not None},
            "method": ds.meta.get("method"), "position": ds.meta.get("position")}
    return Profile((built,), meta=meta), model


def check_out(out: Path, source: Path) -> None:
    """Refuse to write over the directions themselves or over a folder that is not a
    profile (the writer replaces the folder)."""
    if out.resolve() == source.resolve():
        raise UserError("--out is the directions artifact itself; give a new folder")
    if out.exists() and any(out.iterdir()):
        fmt = None
        if (out / MANIFEST).is_file():
            try:
                fmt = json.loads((out / MANIFEST).read_text()).get("format")
            except (json.JSONDecodeError, AttributeError):
                fmt = None
        if fmt != PROFILE_FORMAT:
            raise UserError(f"--out '{out}' exists and is not a steering profile; give a new "
                            "or empty folder")
