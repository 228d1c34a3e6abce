"""The steer run's prompt sets: seeded, disjoint lists for every role."""

from __future__ import annotations

from dataclasses import dataclass, field

from refusalkit.prompts import load_prompts
from refusalkit.steer.config import DataConfig

FITTING = ("target_fit", "safety_fit", "neutral")  # the sets the baseline and directions read


@dataclass(frozen=True)
class Splits:
    """Every role's prompts. Fitting: target_fit (the topic), safety_fit (harmful requests),
    neutral (ordinary prompts) and neutral_proxy (the search's KL reference). Held out:
    target_eval, safety_eval, each over-refusal set, harmless_eval and kl_eval (more ordinary
    prompts for KL). gate_negatives: other prompts the topic gate is fitted against."""

    target_fit: list[str]
    target_eval: list[str]
    safety_fit: list[str]
    neutral: list[str]
    neutral_proxy: list[str]
    safety_eval: list[str]
    harmless_eval: list[str]
    kl_eval: list[str]
    overrefusal: dict[str, list[str]] = field(default_factory=dict)  # spec -> prompts
    gate_negatives: list[str] = field(default_factory=list)
    target_extra: dict[str, list[str]] = field(default_factory=dict)  # spec -> prompts
    # gate negatives read from the everyday (neutral) source: unlabelled, may be on the topic
    gate_ordinary: list[str] = field(default_factory=list)
    gate_topic: list[str] = field(default_factory=list)  # more topic prompts, gate only
    gate_target: list[str] = field(default_factory=list)  # more target-phrased, gate only
    gate_check: dict[str, list[str]] = field(default_factory=dict)  # spec -> prompts
    on_topic: frozenset[str] = frozenset()  # labelled on the topic inside other sets

    @property
    def kl_prompts(self) -> list[str]:
        """The ordinary prompts KL is measured on, in the order every per-prompt KL follows
        (kl_harmless, kl_other, kl.jsonl): harmless_eval, then kl_eval."""
        return self.harmless_eval + self.kl_eval

    def named(self) -> dict[str, list[str]]:
        """Every set by its name (over-refusal sets as overrefusal:SPEC), as run records
        and the gate fit name them."""
        out = {name: getattr(self, name) for name in (
            "target_fit", "target_eval", "safety_fit", "neutral", "neutral_proxy",
            "safety_eval", "harmless_eval", "kl_eval")}
        out.update({f"overrefusal:{spec}": ps for spec, ps in self.overrefusal.items()})
        out["gate_negatives"] = self.gate_negatives
        out["gate_topic"] = self.gate_topic
        out["gate_target"] = self.gate_target
        out.update({f"target_extra:{spec}": ps for spec, ps in self.target_extra.items()})
        out.update({f"gate_check:{spec}": ps for spec, ps in self.gate_check.items()})
        return out

    def taken(self) -> set[str]:
        """Every prompt a role fits, chooses or reports on. The gate-check sets are left out:
        only the gate reads them, and a benchmark measuring opens wants exactly those rows."""
        return {p for name, ps in self.named().items() if not name.startswith("gate_check:")
                for p in ps}

    def held_out(self) -> dict[str, list[str]]:
        """The held-out sets whose refusal is reported before and after."""
        return {"target_eval": self.target_eval,
                **{f"target_extra:{spec}": ps for spec, ps in self.target_extra.items()},
                "safety_eval": self.safety_eval,
                **{f"overrefusal:{spec}": ps for spec, ps in self.overrefusal.items()}}


def split_data(d: DataConfig, seed: int) -> Splits:
    """Seeded, disjoint prompt lists for every role in the pipeline."""
    fit, held = [], []
    for spec in d.target:
        ps = load_prompts(spec).take(d.max_target, seed=seed).prompts
        cut = max(1, round(len(ps) * d.target_eval_fraction))
        held += ps[:cut]
        fit += ps[cut:]
    safety = load_prompts(d.safety_fit).take(d.n_fit, seed=seed).prompts
    neutral_all = load_prompts(d.neutral).take(d.n_fit + d.n_proxy, seed=seed).prompts
    out = {
        "target_fit": fit, "target_eval": held, "safety_fit": safety,
        "neutral": neutral_all[: d.n_fit], "neutral_proxy": neutral_all[d.n_fit:],
        "safety_eval": load_prompts(d.safety_eval).take(d.n_eval, seed=seed).prompts,
        "harmless_eval": load_prompts(d.harmless_eval).take(d.n_eval, seed=seed).prompts,
        "kl_eval": load_prompts(d.harmless_eval).take(d.n_kl, seed=seed,
                                                      offset=d.n_eval).prompts,
    }
    over = {spec: load_prompts(spec).take(d.n_eval, seed=seed).prompts for spec in d.overrefusal}
    extra = {spec: load_prompts(spec).take(d.max_target, seed=seed).prompts
             for spec in d.target_extra}
    # The topic gate's negatives: more and more varied "other" prompts than the fitting sets,
    # each source read past the rows every other role took (so they never overlap).
    roles = {"neutral": [(d.neutral, d.n_fit + d.n_proxy)],
             "safety_fit": [(d.safety_fit, d.n_fit)],
             "overrefusal": [(spec, d.n_eval) for spec in d.overrefusal]}
    sources = [src for name in d.gate_sources for src in roles.get(name, [(name, 0)])]
    taken = {p for ps in [*out.values(), *over.values(), *extra.values()] for p in ps}
    def gate_only(specs: list[str]) -> list[str]:
        return list(dict.fromkeys(p for spec in specs for p in load_prompts(spec).prompts
                                  if p not in taken))

    topic = gate_only(d.gate_topic)
    taken |= set(topic)
    target_more = gate_only(d.gate_target)
    taken |= set(target_more)
    read = {(spec, offset): load_prompts(spec).take(d.n_gate, seed=seed, offset=offset).prompts
            for spec, offset in sources}
    on_topic = frozenset(p for spec in d.on_topic for p in load_prompts(spec).prompts)
    negatives = list(dict.fromkeys(p for ps in read.values() for p in ps
                                   if p not in taken and p not in on_topic))
    ordinary = set(read.get(roles["neutral"][0], ()))
    taken |= set(negatives)
    check = {spec: [p for p in load_prompts(spec).prompts if p not in taken]
             for spec in d.gate_check}
    return Splits(**out, overrefusal=over, gate_negatives=negatives, target_extra=extra,
                  gate_ordinary=[p for p in negatives if p in ordinary], gate_topic=topic,
                  gate_target=target_more, gate_check=check, on_topic=on_topic)
