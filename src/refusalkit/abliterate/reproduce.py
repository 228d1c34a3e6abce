"""Remake an abliterated checkpoint from a run's `reproduce.json`: same model, same prompts,
same kernel, no search. The file records the checksums of the directions and of the saved
weights, so the remake says whether it is bit-identical."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from refusalkit.abliterate.config import AbliterateConfig
from refusalkit.abliterate.output import REPRODUCE_FORMAT, checkpoint_stamp, save_checkpoint
from refusalkit.abliterate.pipeline import fit_directions, split_data
from refusalkit.artifacts import model_record
from refusalkit.errors import UserError, json_error
from refusalkit.kernels import Kernel
from refusalkit.models import LoadedModel, load_model


def read_reproduce(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "reproduce.json"
    if not path.is_file():
        raise UserError(f"'{path}' not found; give the reproduce.json an abliterate run wrote "
                        "(or its run folder)")
    try:
        rec = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"'{path}' is not valid JSON ({json_error(exc)})") from None
    if not isinstance(rec, dict) or rec.get("format") != REPRODUCE_FORMAT:
        raise UserError(f"'{path}' is not a refusalkit abliterate reproduce file "
                        f"(format {REPRODUCE_FORMAT})")
    return rec


def reproduce(path: str | Path, out: str | Path, *, lm: LoadedModel | None = None,
              show_progress: bool = False) -> dict[str, Any]:
    """Rewrite the checkpoint into `out`; returns what matched the original run."""
    rec = read_reproduce(path)
    cfg = AbliterateConfig.model_validate(rec["config"])
    splits = split_data(cfg)
    if splits.records() != rec["datasets"]:
        changed = [d["name"] for d, o in zip(splits.records(), rec["datasets"], strict=False)
                   if d != o]
        raise UserError(f"the prompt sets differ from the run's ({', '.join(changed)}); the "
                        "same checkpoint needs the same prompts — restore the datasets")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"'{out}' exists and is not an empty folder; choose a new --out")
    lm = lm or load_model(cfg.model, reasoning=cfg.reasoning,
                           system_prompt=cfg.system_prompt)
    if model_record(lm)["fingerprint"] != rec["model"]["fingerprint"]:
        raise UserError(f"'{lm.name}' is not the model the run abliterated (its fingerprint "
                        "differs); load the same model files")
    directions = fit_directions(lm, splits, cfg.batch_size, show_progress,
                                cfg.direction_method)["directions"]
    kernel = Kernel.from_json(rec["kernel"])
    stamp = {**checkpoint_stamp(lm, kernel, directions, rec["trial"]),
             "reproduced_from": str(path)}
    card = (f"# {lm.name}, abliterated with refusalkit (reproduced)\n\nRemade from "
            f"{Path(path).name} (trial {rec['trial']}); see the original run's model card.\n")
    sha = save_checkpoint(lm, kernel, directions, out, stamp, card)
    return {"out": str(out), "directions_match": stamp["directions_sha256"]
            == rec["directions_sha256"], "checkpoint_match": sha == rec["checkpoint_sha256"],
            "checkpoint_sha256": sha}
