"""The `refusalkit abliterate` configuration: every field documented, unknown keys rejected.

Layer positions are fractions of depth and the KL budget is a property of the output, so one
config serves every model size; nothing here was tuned to one model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from refusalkit.config import ConfigModel


class AbliterateData(ConfigModel):
    harmful_fit: str = "harmful_train"
    """Harmful prompts whose refusals define the direction (difference of means)."""
    harmless_fit: str = "harmless_train"
    """Ordinary prompts for the other side of the direction."""
    harmful_search: str = "harmful_val"
    """Harmful prompts whose judged refusals each trial is scored on (dev: the choice sees it)."""
    harmless_search: str = "harmless_val"
    """Ordinary prompts for each trial's KL (dev)."""
    harmful_eval: str = "jailbreakbench"
    """Held-out harmful prompts: the Pareto front's reported refusals (never used to choose)."""
    harmless_eval: str = "harmless_test"
    """Held-out ordinary prompts: the front's reported KL."""
    n_fit: int = Field(64, ge=4)
    """Prompts per side for the direction."""
    n_search: int = Field(32, ge=2)
    """Harmful prompts generated and judged in every trial (cost ∝ trials × n_search)."""
    n_search_kl: int = Field(64, ge=2)
    """Ordinary prompts for each trial's KL (one forward pass each, cheap)."""
    n_eval: int = Field(100, ge=2)
    """Held-out harmful prompts for the front's final figures."""
    n_eval_kl: int = Field(200, ge=2)
    """Held-out ordinary prompts for the front's final KL."""


class AbliterateSearch(ConfigModel):
    trials: int = Field(24, ge=1)
    """Optuna trials; each generates and judges n_search answers."""
    startup: int = Field(8, ge=1)
    """Trials before TPE models the front: the seeded points below, then random ones."""
    seeds: bool = True
    """Start from informed points derived from the layers where the direction separates
    harmful from harmless prompts best (see abliterate.search.seed_params)."""
    direction_range: tuple[float, float] = (0.4, 0.9)
    """Where the direction's layer may lie, as fractions of depth. The four ranges are
    Heretic 1.4's, which it chose from experiments on many models; the wider ranges used before
    spent a small budget on kernels too gentle to matter (bench/RESULTS.md)."""
    peak_range: tuple[float, float] = (0.6, 1.0)
    """Where each component's peak may lie, as fractions of depth."""
    max_weight: tuple[float, float] = (0.8, 1.5)
    """Range of each component's peak weight."""
    max_distance: float = Field(0.6, gt=0, le=1)
    """Largest fall-off distance, as a fraction of depth (1 reaches every layer)."""
    scopes: list[Literal["global", "per_layer"]] = ["global", "per_layer"]
    """Direction scopes to try: one (interpolated) direction everywhere, or each layer's own."""
    embed: bool = False
    """Also search a weight on the token embedding (Arditi ablates it; Heretic does not)."""
    preserve_norms: bool = False
    """Norm-preserving ablation: each writer row keeps its norm (Heretic 1.4's default
    "full" row normalisation, applied exactly rather than as a rank-3 LoRA). Off: with
    projected directions it did not improve the dev trade-off (bench/RESULTS.md)."""
    kl_floor: float = Field(0.01, ge=0)
    """KL below this counts as no damage: the sampler sees floor × refusal fraction instead,
    so trials that do nothing stop looking like the best KL (Heretic's kl_divergence_target).
    Recorded KL, the front and the choice use the measured value."""
    bracket: int = Field(3, ge=0)
    """Trials (after the seeded ones, counted in `trials`) spent landing a kernel at the KL
    budget: the secant in √KL between the nearest completed trials either side of
    0.9 × kl_max. The seeds jump from gentle kernels to ones past the budget (on qwen 0.5B:
    dev KL 0.015 then 0.105), and random and TPE trials rarely fill the gap, where the
    strongest kernel a user may ship lies (bench/RESULTS.md)."""
    kl_prune: float = Field(1.0, gt=0)
    """A trial whose KL is above this is not generated or judged (it cannot be chosen)."""

    @model_validator(mode="after")
    def _ranges(self) -> AbliterateSearch:
        for name in ("direction_range", "peak_range", "max_weight"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ValueError(f"must be [low, high] with low < high, got [{lo}, {hi}]")
        if not self.scopes:
            raise ValueError("scopes must name at least one of global, per_layer")
        return self


class AbliterateJudge(ConfigModel):
    spec: str = "calibrated"
    """Judge spec (see `refusalkit judge`). The default counts babble and off-topic answers as
    refusal, so a model that stops refusing by falling apart does not win; `keyword:heretic`
    is Heretic's marker list, for comparison."""
    max_new_tokens: int = Field(48, ge=4)
    """Answer tokens generated per prompt. A reasoning model needs room to finish thinking:
    only the answer after the thinking is judged."""
    compare: list[str] = ["keyword:heretic"]
    """Other judges the held-out front is also scored with (no extra generation)."""


class AbliterateConfig(ConfigModel):
    model: str = "qwen2.5-coder-0.5b"
    """Model spec: packaged name, Hugging Face id, folder or .gguf file."""
    seed: int = 0
    """Seed for prompt sampling and the search."""
    batch_size: int = Field(16, ge=1)
    """Prompts per forward pass."""
    reasoning: bool | None = None
    """Thinking switch for models that have one (None: the template's default)."""
    system_prompt: str | None = None
    """System message for every prompt (None: the chat template's default)."""
    direction_method: Literal["md", "projected"] = "projected"
    """Per-layer refusal direction: difference of means, or its part orthogonal to the
    harmless mean ("projected abliteration", Heretic 1.4's default). On qwen2.5-coder-0.5b's
    dev sets projected cut the KL of the same kernels 5x at equal refusals (bench/RESULTS.md)."""
    kl_max: float = Field(0.1, gt=0)
    """KL budget: without --trial the chosen trial is the one with the fewest (dev) refusals
    within it, ties to the lower KL."""
    data: AbliterateData = AbliterateData()
    search: AbliterateSearch = AbliterateSearch()
    judge: AbliterateJudge = AbliterateJudge()
    eval_front: int = Field(6, ge=1)
    """At most this many Pareto trials (within 2 × kl_max) are re-measured on held-out data."""
