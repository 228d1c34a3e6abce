"""`refusalkit export ...` and `refusalkit import ...`: steering to and from deployable formats."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    from refusalkit.commands.context import options

    export_app = typer.Typer(help="Export steering to formats other tools load.",
                             no_args_is_help=True, rich_markup_mode=None)
    import_app = typer.Typer(help="Import steering made elsewhere as a refusalkit profile.",
                             no_args_is_help=True, rich_markup_mode=None)
    app.add_typer(export_app, name="export")
    app.add_typer(import_app, name="import")

    @export_app.command("abliterated")
    def abliterated_cmd(
        ctx: typer.Context,
        model: str = typer.Option(..., "--model", help="Model spec the profile was made for."),
        profile: Path = typer.Option(..., "--profile", help="Ablation profile folder."),
        out: Path = typer.Option(..., "--out", help="Checkpoint folder to write."),
        dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
        force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder."),
        allow_other_model: bool = typer.Option(False, "--allow-other-model",
                                               help="Use a profile made for another model."),
    ) -> None:
        """Fold a single-direction ablation into the weights; save a Hugging Face checkpoint."""
        from refusalkit.export import ablation_direction, export_abliterated
        from refusalkit.interventions import load_profile
        from refusalkit.models import load_model

        opts = options(ctx)
        lm = load_model(model, dtype=dtype, device="cpu")
        prof = load_profile(profile, lm, allow_other_model=allow_other_model)
        ablation_direction(lm, prof)  # refuse before any work when it cannot be expressed
        export_abliterated(lm, prof, out, overwrite=force)
        if opts.json:
            typer.echo(json.dumps({"out": str(out)}))
        elif not opts.quiet:
            typer.echo(f"wrote abliterated checkpoint {out} (load it with transformers)")

    @export_app.command("gguf-control-vector")
    def gguf_cmd(
        ctx: typer.Context,
        profile: Path = typer.Option(..., "--profile", help="Addition profile folder."),
        out: Path = typer.Option(..., "--out", help="Control-vector .gguf file to write."),
        model_hint: str | None = typer.Option(None, "--model-hint",
                                              help="controlvector.model_hint (default: the "
                                              "profile's model name)."),
    ) -> None:
        """Write an addition profile as a llama.cpp control vector (--control-vector FILE)."""
        from refusalkit.export import LAYER_OFFSET, control_vectors, export_control_vector
        from refusalkit.interventions import load_profile

        opts = options(ctx)
        prof = load_profile(profile)
        hint = model_hint if model_hint is not None else str(
            prof.meta.get("model", {}).get("name", ""))
        vectors = control_vectors(prof)
        export_control_vector(prof, out, model_hint=hint)
        layers = [k + LAYER_OFFSET for k in vectors]
        if opts.json:
            typer.echo(json.dumps({"out": str(out), "directions": list(vectors),
                                   "layers": layers}))
        elif not opts.quiet:
            typer.echo(f"wrote {out}: direction.{min(vectors)}..{max(vectors)} "
                       f"({len(vectors)} tensors; refusalkit layer L = direction.L-1)")

    @import_app.command("control-vector")
    def import_cmd(
        ctx: typer.Context,
        file: Path = typer.Argument(..., help="llama.cpp / repeng control-vector .gguf file."),
        model: str = typer.Option(..., "--model", help="Model the vector is for."),
        out: Path = typer.Option(..., "--out", help="Profile folder to write."),
        strength: float = typer.Option(1.0, "--strength",
                                       help="Multiplier (llama.cpp --control-vector-scaled)."),
    ) -> None:
        """Turn a control-vector GGUF into a refusalkit addition profile."""
        from refusalkit.export import import_control_vector, read_control_vector
        from refusalkit.interventions import save_profile
        from refusalkit.models import load_model

        opts = options(ctx)
        read_control_vector(file)  # a bad file fails before the model loads
        lm = load_model(model)
        prof = import_control_vector(file, lm, strength)
        save_profile(prof, out, lm)
        if opts.json:
            typer.echo(json.dumps({"out": str(out), "layers": prof.layers}))
        elif not opts.quiet:
            typer.echo(f"wrote profile {out} (adds at layers {prof.layers})")
