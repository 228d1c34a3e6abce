"""`refusalkit profile DIRS ...`: a steering profile from a directions artifact, no search."""

from __future__ import annotations

import json
from pathlib import Path

import typer

PROFILE_HELP = """A steering profile from the directions `refusalkit extract` wrote, without a
search; `generate --profile`, `serve --profile` and `export` read the result.

\b
Layers (--layers): 10-15 (a range, both ends included), 10,12,14 (a list),
  3,10-12 (both), frac:0.66 (one layer at that depth) or all (every layer in DIRS).
  With --direction-layer L every steered layer uses layer L's direction, and any
  model layer can be named (all = every layer of the model).
\b
Signs: a direction points from the answered prompts (extract --negative) toward
  the refused ones (--positive). --alpha < 0 REMOVES refusal, --alpha > 0 induces
  it. --op ablate projects the direction out (removes refusal) and takes no --alpha.
\b
Strength: --alpha is added along the unit direction in the residual stream's own
  units; with --relative it is a multiple of each layer's refuse-vs-answer gap
  (steer's convention): --alpha -1 --relative moves the refused prompts' mean
  projection onto the answered prompts' at every steered layer; much beyond
  that, small models start to babble.
\b
Example:
  refusalkit extract --positive harmful_train --negative harmless_train \\
      --limit 64 --layers 10-18 --out dirs
  refusalkit profile dirs --layers 15-16 --alpha -1 --relative --out prof
  refusalkit generate --profile prof --prompts harmful_val --out answers.jsonl
"""


def register(app: typer.Typer) -> None:
    from refusalkit.commands.context import options

    @app.command("profile", help=PROFILE_HELP)
    def profile_cmd(
        ctx: typer.Context,
        dirs: Path = typer.Argument(..., metavar="DIRS",
                                    help="Directions artifact from refusalkit extract."),
        out: Path = typer.Option(..., "--out", help="Profile folder to write."),
        layers: str = typer.Option(..., "--layers", help="Layers to steer: 10-15 | 10,12,14 | "
                                   "frac:0.66 | all."),
        op: str = typer.Option("add", "--op", help="add | ablate | clamp (addition capped "
                               "per state, see interventions.clamping)."),
        alpha: float | None = typer.Option(None, "--alpha", help="Strength; < 0 removes "
                                           "refusal, > 0 induces it (add and clamp)."),
        relative: bool = typer.Option(False, "--relative", help="--alpha is a multiple of "
                                      "each layer's refuse-vs-answer gap."),
        gate: Path | None = typer.Option(None, "--gate", help="Reuse a topic gate: a steer "
                                         "run folder (its fitted gate) or a gated profile; "
                                         "steering then applies only to prompts it opens for."),
        direction_layer: int | None = typer.Option(
            None, "--direction-layer", help="Use this layer's direction at every steered "
            "layer (Arditi-style; with --op ablate --layers all the profile can be exported "
            "as an abliterated checkpoint)."),
        name: str = typer.Option("refusal", "--direction", help="Direction name in DIRS."),
        phase: str = typer.Option(
            "both", "--phase", help="prompt | generation | both | prompt+N (the prompt and "
            "the first N generated tokens)."),
    ) -> None:
        from refusalkit.interventions import save_profile
        from refusalkit.profiles import Recipe, check_out, profile_from_directions

        recipe = Recipe(layers=layers, op=op, alpha=alpha, relative=relative, direction=name,
                        direction_layer=direction_layer,
                        phase=phase)  # type: ignore[arg-type]
        recipe.check()
        check_out(out, dirs)
        prof, model = profile_from_directions(dirs, recipe, gate)
        save_profile(prof, out, model)
        the_op = prof.ops[0]
        opts = options(ctx)
        if opts.json:
            typer.echo(json.dumps({"out": str(out), "op": op, "layers": prof.layers,
                                   "strengths": {str(k): v for k, v in
                                                 the_op.strengths.items()},
                                   "gated": the_op.gate is not None}))
        elif not opts.quiet:
            s = ", ".join(f"{k}: {v:+.3g}" for k, v in sorted(the_op.strengths.items()))
            typer.echo(f"wrote profile {out} ({op} at layers {prof.layers}"
                       + (f"; strengths {s}" if s else "")
                       + ("; gated" if the_op.gate is not None else "") + ")")
