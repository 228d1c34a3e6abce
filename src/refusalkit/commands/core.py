"""Core commands: list models, extract directions, generate responses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import typer
from pydantic import Field, field_validator

from refusalkit.config import ConfigModel
from refusalkit.errors import UserError

if TYPE_CHECKING:
    import torch

    from refusalkit.models import LoadedModel


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


class ExtractConfig(ConfigModel):
    """refusalkit extract: prompt sets → per-layer refusal directions."""

    positive: str = Field(description="Prompts the model refuses (file or dataset name).")
    negative: str = Field(description="Prompts the model answers (file or dataset name).")
    model: str = Field("qwen2.5-coder-0.5b", description="Model spec.")
    layers: str = Field("all", description="Layers: all | 8,12,16 | 8-16 | frac:0.66.")
    position: int | str = Field(-1, description="Token position: -1, -2, … or mean_post.")
    method: Literal["md", "rmd", "wrmd", "pca"] = Field("md", description="Direction "
                                                       "estimator.")
    lam: float = Field(1e-2, ge=0, description="Ridge λ for rmd / wrmd.")
    limit: int | None = Field(None, ge=1, description="Use at most N prompts a side.")
    batch_size: int = Field(16, ge=1, description="Prompts per forward pass.")

    @field_validator("position", mode="before")
    @classmethod
    def _int_position(cls, v: Any) -> Any:
        """'-1' from a flag and -1 from TOML are the same position (and the same manifest)."""
        return int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v


def quiet_libraries() -> None:
    """Silence transformers' own progress bars and warnings: our rich bars show progress,
    and a user error must stay one line on stderr. Cheap: sets the environment variables
    the libraries read at import (a user's own settings win), no import needed."""
    import os
    import sys

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _separation(pos: torch.Tensor, neg: torch.Tensor,
                dirs: torch.Tensor) -> list[dict[str, float]]:
    """Per layer: gap of the mean projections onto the direction, and that gap in pooled
    standard deviations (d') — how cleanly the layer's direction splits the two sides."""
    import torch

    out = []
    for i in range(dirs.shape[0]):
        v = dirs[i].double()
        pp, pn = pos[:, i].double() @ v, neg[:, i].double() @ v
        gap = float(pp.mean() - pn.mean())
        pooled = float(torch.sqrt((pp.var(correction=0) + pn.var(correction=0)) / 2))
        out.append({"gap": round(gap, 6), "d_prime": round(gap / max(pooled, 1e-12), 6)})
    return out


def class_projections(pos: torch.Tensor, neg: torch.Tensor,
                      dirs: torch.Tensor) -> dict[str, list[float]]:
    """Per layer, each prompt set's mean projection on the unit direction. Stored in the
    artifact: `refusalkit profile` needs their gap for a relative strength and the
    refusing (or answering) side's level for a clamp."""
    unit = dirs.double() / dirs.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return {name: [float(acts[:, i].double().mean(0) @ unit[i]) for i in range(len(unit))]
            for name, acts in (("positive", pos), ("negative", neg))}


def _extract_report(run: Any, layer_list: list[int], sep: list[dict[str, float]],
                    dirs: torch.Tensor) -> None:
    """Layer profile, cross-layer cosine heatmap and a per-layer table for report.html."""
    from refusalkit.report import figure, save_figure, save_table

    fig = figure(6.4, 3.4)
    ax = fig.add_subplot()
    ax.plot(layer_list, [s["d_prime"] for s in sep], marker="o", color="#2f5fb3")
    ax.set_xlabel("layer")
    ax.set_ylabel("separation d′")
    ax.set_title("Refused vs answered prompts: separation by layer")
    ax.grid(alpha=0.3)
    save_figure(run, "layer_profile", fig, section="Layers",
                caption="Mean projection gap between the two prompt sets, in pooled standard "
                        "deviations, per layer.")
    unit = dirs.double() / dirs.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (unit @ unit.T).numpy()
    fig = figure(5.2, 4.4)
    ax = fig.add_subplot()
    im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
    ticks = list(range(0, len(layer_list), max(1, len(layer_list) // 8)))
    ax.set_xticks(ticks, [str(layer_list[t]) for t in ticks])
    ax.set_yticks(ticks, [str(layer_list[t]) for t in ticks])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title("Cosine between per-layer directions")
    fig.colorbar(im, ax=ax, shrink=0.85)
    save_figure(run, "direction_cosines", fig, section="Geometry",
                caption="Cosine similarity of the refusal directions of every pair of layers.")
    save_table(run, "layers", [{"layer": la, **s} for la, s in zip(layer_list, sep, strict=True)],
               section="Layers", caption="Per-layer separation of the two prompt sets.")


def run_extract(cfg: ExtractConfig, out: Path, *, run_dir: Path | None = None,
                resume: bool = False, cache_dir: Path | None = None,
                progress: bool = True, lm: LoadedModel | None = None) -> list[int]:
    """Extract directions; with `run_dir`, every step is a stage that survives a kill.

    Everything a user can get wrong is checked before torch is imported or a model loaded,
    so those mistakes cost a second, not a model load.
    """
    from refusalkit.prompts import load_prompts
    from refusalkit.runs import RunDir, check_run_folder, run_manifest

    _parse_layers(cfg.layers, 1)  # syntax only; the range is checked against the model
    if run_dir is not None:
        check_run_folder(run_dir, resume)
    pos_set = load_prompts(cfg.positive, limit=cfg.limit)
    neg_set = load_prompts(cfg.negative, limit=cfg.limit)

    from refusalkit.activations import capture
    from refusalkit.artifacts import DirectionSet, dataset_record, model_record, save_directions
    from refusalkit.directions import get_method, per_layer
    from refusalkit.models import load_model

    estimator = get_method(cfg.method)
    lm = lm if lm is not None else load_model(cfg.model)
    layer_list = _parse_layers(cfg.layers, lm.n_layers)
    lm.arch.check_layers(layer_list, allow_final=True)
    pos_arg = _parse_position(str(cfg.position))
    datasets = [dataset_record(cfg.positive, pos_set.prompts),
                dataset_record(cfg.negative, neg_set.prompts)]
    kwargs = {"lam": cfg.lam} if cfg.method in ("rmd", "wrmd") else {}

    def acts(prompts: list[str]) -> torch.Tensor:
        return capture(lm, prompts, layer_list, [pos_arg], batch_size=cfg.batch_size,
                       cache_dir=cache_dir, show_progress=progress)[:, :, 0]

    run = None
    if run_dir is None:
        acts_p, acts_n = acts(pos_set.prompts), acts(neg_set.prompts)
        dirs = per_layer(estimator, acts_p, acts_n, **kwargs)
    else:
        run = RunDir(run_dir, run_manifest("extract", cfg.model_dump(mode="json"),
                                           model=model_record(lm), datasets=datasets),
                     resume=resume, defaults=type(cfg).defaults())
        acts_p = run.tensor_stage("activations.positive",
                                  lambda: {"acts": acts(pos_set.prompts)})["acts"]
        acts_n = run.tensor_stage("activations.negative",
                                  lambda: {"acts": acts(neg_set.prompts)})["acts"]
        dirs = run.tensor_stage("directions", lambda: {
            "refusal": per_layer(estimator, acts_p, acts_n, **kwargs)})["refusal"]
    meta = {"site": "resid_pre", "position": pos_arg, "method": cfg.method,
            "lambda": cfg.lam if kwargs else None, "datasets": datasets,
            "projections": class_projections(acts_p, acts_n, dirs)}
    save_directions(DirectionSet({"refusal": dirs}, layer_list, meta), out, lm)
    if run is not None:
        _finish_extract(run, lm, cfg, pos_arg, (len(pos_set), len(neg_set)), layer_list,
                        (acts_p, acts_n, dirs), out)
    return layer_list


def _finish_extract(run: Any, lm: LoadedModel, cfg: ExtractConfig, pos_arg: Any,
                    counts: tuple[int, int], layer_list: list[int],
                    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor], out: Path) -> None:
    """An extract run folder's metrics and report, then close it."""
    from refusalkit.report import build_report

    acts_p, acts_n, dirs = tensors
    sep = _separation(acts_p, acts_n, dirs)
    best = max(range(len(sep)), key=lambda i: sep[i]["d_prime"])
    run.write_metrics({
        "model": lm.name, "method": cfg.method, "position": pos_arg,
        "prompts": {"positive": counts[0], "negative": counts[1]},
        "best_layer": layer_list[best], "best_layer_separation": sep[best],
        "layers": f"{layer_list[0]}–{layer_list[-1]} ({len(layer_list)})"})
    _extract_report(run, layer_list, sep, dirs)
    build_report(run, title=f"refusalkit extract — {lm.name}")
    run.log.info("finished (artifact %s): ran %s, reused %s", out, run.ran, run.reused)
    run.close()


def register(app: typer.Typer) -> None:
    from refusalkit.commands.context import options

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
        positive: str | None = typer.Option(None, "--positive", help="Prompts the model "
                                            "refuses (file or dataset name)."),
        negative: str | None = typer.Option(None, "--negative", help="Prompts it answers."),
        out: Path | None = typer.Option(None, "--out", help="Artifact folder to write "
                                        "(default with --run-dir: RUN_DIR/directions)."),
        model: str | None = typer.Option(None, "--model", help="Model spec "
                                         "[default: qwen2.5-coder-0.5b]."),
        layers: str | None = typer.Option(None, "--layers", help="all | 8,12 | 8-16 | "
                                          "frac:0.66 [default: all]"),
        position: str | None = typer.Option(None, "--position", help="-1, -2, … or "
                                            "mean_post [default: -1]"),
        method: str | None = typer.Option(None, "--method", help="md | rmd | wrmd | pca "
                                          "[default: md]"),
        lam: float | None = typer.Option(None, "--lambda", help="Ridge λ for rmd / wrmd "
                                         "[default: 0.01]."),
        limit: int | None = typer.Option(None, "--limit", help="Use at most N prompts a side."),
        batch_size: int | None = typer.Option(None, "--batch-size", help="[default: 16]"),
        cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Activation cache."),
        run_dir: Path | None = typer.Option(None, "--run-dir", help="Run folder: one file per "
                                            "finished stage, metrics.json, report.html."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in "
                                    "--run-dir, reusing its finished stages."),
        config: Path | None = typer.Option(None, "--config", help="TOML config; flags "
                                           "override it."),
        sets: list[str] = typer.Option([], "--set", help="Override a config key: key=value."),
        print_config: bool = typer.Option(False, "--print-config", help="Print the documented "
                                          "default config and exit."),
    ) -> None:
        """Prompt files → per-layer refusal directions (a direction artifact)."""
        from refusalkit.config import cli_overrides, load_config, render_config

        if print_config:
            typer.echo(render_config(ExtractConfig), nl=False)
            return
        flags = {"positive": positive, "negative": negative, "model": model,
                 "layers": layers, "position": position, "method": method, "lam": lam,
                 "limit": limit, "batch_size": batch_size}
        cfg = load_config(config, ExtractConfig, cli_overrides(sets, flags))
        if resume and run_dir is None:
            raise UserError("--resume needs --run-dir (the folder of the run to continue)")
        if out is None and run_dir is None:
            raise UserError("give --out (the artifact folder) or --run-dir")
        out = out if out is not None else run_dir / "directions"  # type: ignore[operator]
        opts = options(ctx)
        quiet_libraries()
        layer_list = run_extract(cfg, out, run_dir=run_dir, resume=resume,
                                 cache_dir=cache_dir, progress=opts.progress)
        if opts.json:
            typer.echo(json.dumps({"out": str(out), "layers": layer_list,
                                   "run_dir": str(run_dir) if run_dir else None}))
        elif not opts.quiet:
            where = f"; run folder {run_dir}" if run_dir else ""
            typer.echo(f"wrote {out} ({len(layer_list)} layers, method {cfg.method}){where}")

    @app.command("generate")
    def generate_cmd(
        ctx: typer.Context,
        prompts: str = typer.Option(..., "--prompts", help="Prompt file or dataset name."),
        out: Path = typer.Option(..., "--out", help="Responses JSONL to write."),
        model: str = typer.Option("qwen2.5-coder-0.5b", "--model"),
        profile: Path | None = typer.Option(None, "--profile", help="Steering profile folder."),
        allow_other_model: bool = typer.Option(False, "--allow-other-model", help="Use a "
                                               "profile made for another model of the same "
                                               "hidden size."),
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
        quiet_libraries()
        ps = load_prompts(prompts, limit=limit)
        lm = load_model(model)
        prof = (load_profile(profile, lm, allow_other_model=allow_other_model)
                if profile is not None else None)
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
