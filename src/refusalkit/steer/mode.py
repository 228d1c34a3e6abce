"""Remove or induce, as one strategy object.

The two modes differ in the sign of the steering, the classes that define the direction,
the prompts the search's proxies read, whose behaviour must be kept and how the profile is
chosen. Each of those lives here, once per mode, so the pipeline never branches on the mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from refusalkit.errors import UserError
from refusalkit.judge.protocol import THRESHOLD
from refusalkit.steer.choose import choose_induce, choose_remove, keep_rate


@dataclass(frozen=True)
class Classes:
    """Activations [n, L, d] of the refusing and the answering class, with weights [n]."""

    refused: torch.Tensor
    complied: torch.Tensor
    w_refused: torch.Tensor
    w_complied: torch.Tensor


@dataclass(frozen=True)
class ProxyPrompts:
    pick: list[int]  # target_fit rows the search and the verification read
    target: list[str]  # behaviour to change (at most n_proxy)
    keep: list[str]  # behaviour to keep (at most n_proxy)


class Mode:
    name: ClassVar[str]
    sign: ClassVar[float]  # the strength's sign: -1 subtracts the refusal direction
    keep_set: ClassVar[str]  # the fitting set whose baseline behaviour must be kept
    arditi_baseline: ClassVar[bool]  # Arditi's ablation is a baseline (removal only)
    correlates: ClassVar[bool]  # the layer table correlates target projections with c(x)

    def classes(self, acts: dict[str, torch.Tensor], c_target: torch.Tensor,
                c_safety: torch.Tensor) -> Classes:
        raise NotImplementedError

    def moved(self, cl: Classes) -> torch.Tensor:
        """The class the steering moves (a clamp starts from its projection)."""
        raise NotImplementedError

    def proxies(self, target_fit: list[str], neutral: list[str], safety_fit: list[str],
                base: dict[str, Any], n: int) -> ProxyPrompts:
        raise NotImplementedError

    def choose(self, rows: list[dict[str, Any]], base: dict[str, Any], keep: float,
               keep_prompts: list[str]) -> dict[str, Any]:
        raise NotImplementedError


class Remove(Mode):
    name, sign, keep_set, arditi_baseline, correlates = "remove", -1.0, "safety_fit", True, True

    def classes(self, acts: dict[str, torch.Tensor], c_target: torch.Tensor,
                c_safety: torch.Tensor) -> Classes:
        c = c_target
        r_mask, c_mask = c > THRESHOLD, c < -THRESHOLD
        refused, complied = acts["target_fit"][r_mask], acts["target_fit"][c_mask]
        w_r, w_c = c[r_mask].abs(), c[c_mask].abs()
        if len(complied) < 4:  # too few answered topic prompts: answered neutral ones stand in
            complied = torch.cat([complied, acts["neutral"]])
            w_c = torch.cat([w_c, torch.ones(len(acts["neutral"]))])
        if len(refused) < 2:
            raise UserError("fewer than 2 target prompts were refused at baseline; add target "
                            "prompts or check the judge")
        return Classes(refused, complied, w_r, w_c)

    def moved(self, cl: Classes) -> torch.Tensor:
        return cl.refused

    def proxies(self, target_fit: list[str], neutral: list[str], safety_fit: list[str],
                base: dict[str, Any], n: int) -> ProxyPrompts:
        pick = [i for i, r in enumerate(base["target_fit"]) if r["confidence"] > THRESHOLD]
        if not pick:
            raise UserError("the model does not refuse any target prompt at baseline; nothing "
                            "to remove (check the target sets or use mode = \"induce\")")
        keep = [r["prompt"] for r in base["safety_fit"] if r["confidence"] > THRESHOLD]
        return ProxyPrompts(pick, [target_fit[i] for i in pick][:n],
                            keep[:n] or safety_fit[:n])

    def choose(self, rows: list[dict[str, Any]], base: dict[str, Any], keep: float,
               keep_prompts: list[str]) -> dict[str, Any]:
        return choose_remove(rows, keep * keep_rate(base[self.keep_set], keep_prompts))


class Induce(Mode):
    name, sign, keep_set, arditi_baseline, correlates = "induce", 1.0, "neutral", False, False

    def classes(self, acts: dict[str, torch.Tensor], c_target: torch.Tensor,
                c_safety: torch.Tensor) -> Classes:
        # The model's own refusals (safety prompts it refused) vs its answers (topic prompts
        # it answered, and neutral ones): the refuse-vs-answer direction, added on the topic.
        # (A "refuse everything" system prompt was tried instead: its direction encodes the
        # system-prompt change and lowered refusal when added, measured on qwen.)
        r_mask, a_mask = c_safety > THRESHOLD, c_target < -THRESHOLD
        if int(r_mask.sum()) < 2:
            raise UserError("the model refused fewer than 2 safety_fit prompts at baseline; "
                            "inducing refusal needs examples of its own refusals (check the "
                            "judge, or use a model that refuses harmful requests)")
        complied = torch.cat([acts["target_fit"][a_mask], acts["neutral"]])
        w_c = torch.cat([c_target[a_mask].abs(), torch.ones(len(acts["neutral"]))])
        return Classes(acts["safety_fit"][r_mask], complied, c_safety[r_mask].abs(), w_c)

    def moved(self, cl: Classes) -> torch.Tensor:
        return cl.complied

    def proxies(self, target_fit: list[str], neutral: list[str], safety_fit: list[str],
                base: dict[str, Any], n: int) -> ProxyPrompts:
        pick = ([i for i, r in enumerate(base["target_fit"]) if r["confidence"] < -THRESHOLD]
                or list(range(len(target_fit))))
        return ProxyPrompts(pick, [target_fit[i] for i in pick][:n],
                            list(neutral)[:n] or safety_fit[:n])

    def choose(self, rows: list[dict[str, Any]], base: dict[str, Any], keep: float,
               keep_prompts: list[str]) -> dict[str, Any]:
        return choose_induce(rows, keep_rate(base[self.keep_set], keep_prompts))


MODES: dict[str, Mode] = {m.name: m for m in (Remove(), Induce())}


def mode_of(name: str) -> Mode:
    if name not in MODES:
        raise UserError(f"unknown steer mode '{name}'; use remove or induce")
    return MODES[name]
