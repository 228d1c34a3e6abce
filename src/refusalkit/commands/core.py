"""Core commands: list models, extract directions, generate responses."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from refusalkit.errors import UserError


def _parse_layers(spec: str, n_layers: int) -> list[int]:
    """'all', '8,12,16', '8-16' or 'frac:0.66' (one layer at that fraction of depth)."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n_layers))
    if spec.startswith("frac:"):
        return [min(n_layers - 1, round(float(spec[5:]) * n_layers))]
    out: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise UserError(f"bad layer list '{spec}'; use all, 8,12,16, 8-16 or frac:0.66") from None
    return out


def _parse_position(spec: str) -> int | str:
    try:
        return int(spec)
    except ValueError:
        return spec


def register(app: typer.Typer) -> None:
    from refusalkit.cli import options

    @app.command("models")
    def models_cmd(ctx: typer.Context) -> None:
        """List the packaged offline models and whether they are installed."""
        from refusalkit.models import installed_models

        rows = installed_models()
        if options(ctx).json:
            typer.echo(json.dumps(rows))
            return
        for r in rows:
            state = "installed" if r["installed"] else f"not installed — {r['install']}"
            typer.echo(f"{r['name']:<22} {state}\n    {r['description']}")

    @app.command("extract")
    def extract_cmd(
        ctx: typer.Context,
        positive: str = typer.Option(..., "--positive", help="Prompts the model refuses "
                                     "(file or dataset name)."),
        negative: str = typer.Option(..., "--negative", help="Prompts it answers."),
        out: Path = typer.Option(..., "--out", help="Artifact folder to write."),
        model: str = typer.Option("qwen2.5-coder-0.5b", "--model", help="Model spec."),
        layers: str = typer.Option("all", "--layers", help="all | 8,12 | 8-16 | frac:0.66"),
        position: str = typer.Option("-1", "--position", help="-1, -2, … or mean_post"),
        method: str = typer.Option("md", "--method", help="md | rmd | wrmd | pca"),
        lam: float = typer.Option(1e-2, "--lambda", help="Ridge λ for rmd / wrmd."),
        limit: int | None = typer.Option(None, "--limit", help="Use at most N prompts a side."),
        batch_size: int = typer.Option(16, "--batch-size"),
        cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Activation cache."),
    ) -> None:
        """Prompt files → per-layer refusal directions (a direction artifact)."""
        from refusalkit.activations import capture
        from refusalkit.artifacts import DirectionSet, dataset_record, save_directions
        from refusalkit.directions import get_method, per_layer
        from refusalkit.models import load_model
        from refusalkit.prompts import load_prompts

        opts = options(ctx)
        estimator = get_method(method)
        pos_set = load_prompts(positive, limit=limit)
        neg_set = load_prompts(negative, limit=limit)
        lm = load_model(model)
        layer_list = _parse_layers(layers, lm.n_layers)
        pos_arg = _parse_position(position)
        acts_p = capture(lm, pos_set.prompts, layer_list, [pos_arg], batch_size=batch_size,
                         cache_dir=cache_dir, show_progress=opts.progress)[:, :, 0]
        acts_n = capture(lm, neg_set.prompts, layer_list, [pos_arg], batch_size=batch_size,
                         cache_dir=cache_dir, show_progress=opts.progress)[:, :, 0]
        kwargs = {"lam": lam} if method in ("rmd", "wrmd") else {}
        dirs = per_layer(estimator, acts_p, acts_n, **kwargs)
        meta = {"site": "resid_pre", "position": pos_arg, "method": method,
                "lambda": lam if kwargs else None,
                "datasets": [dataset_record(positive, pos_set.prompts),
                             dataset_record(negative, neg_set.prompts)]}
        save_directions(DirectionSet({"refusal": dirs}, layer_list, meta), out, lm)
        if opts.json:
            typer.echo(json.dumps({"out": str(out), "layers": layer_list}))
        elif not opts.quiet:
            typer.echo(f"wrote {out} ({len(layer_list)} layers, method {method})")

    @app.command("generate")
    def generate_cmd(
        ctx: typer.Context,
        prompts: str = typer.Option(..., "--prompts", help="Prompt file or dataset name."),
        out: Path = typer.Option(..., "--out", help="Responses JSONL to write."),
        model: str = typer.Option("qwen2.5-coder-0.5b", "--model"),
        profile: Path | None = typer.Option(None, "--profile", help="Steering profile folder."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
        limit: int | None = typer.Option(None, "--limit"),
        batch_size: int = typer.Option(16, "--batch-size"),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Prompts → responses JSONL (prompt, response), optionally steered."""
        from refusalkit.generation import generate
        from refusalkit.interventions import load_profile
        from refusalkit.models import load_model
        from refusalkit.prompts import load_prompts, write_jsonl

        opts = options(ctx)
        ps = load_prompts(prompts, limit=limit)
        lm = load_model(model)
        prof = load_profile(profile, lm) if profile is not None else None
        gens = generate(lm, ps.prompts, profile=prof, max_new_tokens=max_new_tokens,
                        temperature=temperature, batch_size=batch_size, seed=seed,
                        show_progress=opts.progress)
        rows = [{"prompt": g[0].prompt, "response": g[0].text,
                 "mean_logprob": g[0].mean_logprob} for g in gens]
        write_jsonl(out, rows)
        if opts.json:
            typer.echo(json.dumps({"out": str(out), "n": len(rows)}))
        elif not opts.quiet:
            typer.echo(f"wrote {len(rows)} responses to {out}")
