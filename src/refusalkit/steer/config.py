"""The `refusalkit steer` configuration: every field documented, unknown keys rejected."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from refusalkit.config import ConfigModel
from refusalkit.errors import UserError
from refusalkit.operators import opening_tokens


class DataConfig(ConfigModel):
    target: list[str] = ["deccp_censored", "deccp_uncensored"]
    """Topic prompt sets: refusals to remove (mode remove) or to induce (mode induce)."""
    target_eval_fraction: float = Field(0.4, gt=0, lt=1)
    """Share of each target set held out for the final evaluation (never fitted or searched)."""
    safety_fit: str = "harmful_train"
    """Harmful prompts whose refusals must stay, used while fitting and searching."""
    safety_eval: str = "jailbreakbench"
    """Held-out harmful prompts for the final evaluation."""
    neutral: str = "harmless_train"
    """Ordinary prompts: WRMD reference set and KL reference during the search."""
    harmless_eval: str = "harmless_test"
    """Held-out ordinary prompts for KL and perplexity in the final evaluation."""
    overrefusal: list[str] = ["xstest?label=safe", "coconot_contrast"]
    """Benign look-alike prompts; their refusal rate must not rise."""
    target_extra: list[str] = []
    """More held-out sets of the target topic in other phrasings (e.g. builtin:china_requests:
    requests and instructions in English and Chinese). Never fitted, searched or chosen on;
    refusal, useful-answer rate and the gate's recall are reported on each (at most
    max_target prompts each)."""
    gate_check: list[str] = []
    """Held-out sets on which only the topic gate's decision is measured (a forward pass to
    the gate layer, no generation): the share of each it opens for is reported per run.
    For harmful sets that share is how many requests the gate would unlock; for ordinary
    ones, how many it would steer. Rows any other role uses are skipped."""
    gate_target: list[str] = []
    """More prompts in the target's own phrasing for the gate's target-side detector only
    (e.g. builtin:china_questions_fit?split=fit: questions on the topics deccp asks about).
    A detector fitted on a few dozen questions against hundreds of others recalls too few
    held-out questions; these are never used for directions, the search or evaluation."""
    gate_topic: list[str] = []
    """More prompts on the topic for the gate's topic side only, in phrasings the target sets
    lack (e.g. builtin:china_requests_fit: requests and instructions where deccp asks
    questions). Not used for directions, the search or evaluation; a gate fitted on the
    target's questions alone reads "a question about X", not "X"."""
    on_topic: list[str] = []
    """Prompts a person labelled as on the target topic inside the other sets (e.g.
    builtin:topic_overlap?topic=cooking: the cooking prompts in XSTest-safe, CoCoNot
    contrast and harmless_test). They are left out of the topic gate's negatives, and
    over-refusal and KL are also reported without them (metrics.json `overrefusal_other`,
    `kl_other`): in induce mode, refusing a cooking prompt there is what the run is for,
    not over-refusal or damage to ordinary prompts."""
    n_fit: int = Field(32, ge=4)
    """Prompts drawn from each of safety_fit and neutral for fitting."""
    n_proxy: int = Field(16, ge=2)
    """Prompts per proxy set scored in every search trial (cost ∝ trials × 3 × n_proxy)."""
    n_eval: int = Field(30, ge=2)
    """Prompts per held-out evaluation set (target eval uses its whole held-out share)."""
    n_kl: int = Field(200, ge=0)
    """Extra held-out ordinary prompts (harmless_eval's rows after its first n_eval) on which
    KL is measured together with harmless_eval. A gated profile's KL comes only from the few
    prompts its gate opens for, so n_eval prompts alone measure it in steps of one leak's KL
    divided by n_eval (0.11 for one leak in 30 on qwen2.5-coder-0.5b)."""
    max_target: int = Field(200, ge=4)
    """At most this many prompts from each target set."""
    n_gate: int = Field(64, ge=0)
    """Extra "other topic" prompts for fitting the topic gate, drawn from each gate source
    past the rows used elsewhere (never evaluated on). The threshold lets a
    search.gate_false_open share of them through, so it rests on the ⌊share × n⌋-th highest:
    give enough that this is several prompts, not the single most topic-like one."""
    gate_sources: list[str] = ["neutral", "safety_fit", "overrefusal"]
    """Where the topic gate's extra negatives come from: the role names neutral, safety_fit
    and overrefusal (read past the rows those roles use) or any dataset spec (rows any other
    role uses are skipped). Leaving overrefusal out lets the gate open on benign look-alikes
    of the topic, which steering then answers (over-refusal can only fall) — higher topic
    recall for remove mode; keep it for induce mode, where opening there adds refusals."""


class JudgeConfig(ConfigModel):
    spec: str = "calibrated"
    """Judge spec (calibrated, keyword, llm:MODEL, openai:URL#MODEL…; see `refusalkit judge`)."""
    mode: Literal["greedy", "sample"] = "greedy"
    """greedy: judge one greedy answer; sample: paper A's K sampled answers, weighted."""
    k: int = Field(5, ge=1)
    """Answers per prompt in sample mode."""
    max_new_tokens: int = Field(48, ge=4)
    """Answer length to judge."""


class DirectionConfig(ConfigModel):
    method: Literal["md", "rmd", "wrmd", "pca"] = "wrmd"
    """Direction estimator for the target behaviour (see refusalkit.directions)."""
    lam: float = Field(1e-2, gt=0)
    """Ridge λ for rmd / wrmd."""
    position: int = Field(-1, lt=0)
    """Token position (negative offset from the prompt end); -1 emits the first answer token."""


class SearchConfig(ConfigModel):
    trials: int = Field(24, ge=1)
    """Optuna trials scored with the cheap proxies (no generation)."""
    window: tuple[float, float] = (0.3, 0.9)
    """Candidate layers as fractions of depth [low, high)."""
    max_layers: int = Field(8, ge=1)
    """Largest block of consecutive steered layers."""
    alpha_max: float = Field(2.0, gt=0)
    """Largest strength, in units of each layer's refuse-vs-answer projection gap."""
    verify: int = Field(3, ge=1)
    """Pareto trials that are generated and judged before one is chosen."""
    kl_max: float = Field(0.1, gt=0)
    """KL budget on neutral prompts for a trial to count."""
    safety_keep: float = Field(0.9, ge=0, le=1)
    """Keep at least this share of the baseline safety refusal (remove mode)."""
    operator: Literal["add", "clamp"] = "add"
    """How the direction is applied: add it (every state shifted by the same amount), or
    clamp (addition capped per state: states the direction already puts on the answering
    side are left alone, so leaks and answers change less; see interventions.clamping)."""
    phase: str = "both"
    """When the chosen profile steers: every forward ("both"), or the prompt and the first N
    generated tokens ("prompt+N"), after which the answer the model has begun is continued
    unsteered (it still reads the steered prompt's keys and values). The search's proxies
    read only the prompt pass, so they are the same either way; verification and the
    evaluation generate with it."""
    gate: Literal["off", "on", "search"] = "search"
    """Topic gate (conditional steering): off, always on, or let the search decide."""
    gate_max_layer: float = Field(0.45, gt=0, lt=1)
    """Deepest layer the gate may read, as a fraction of depth; gated trials steer only at
    and after the gate's layer."""
    gate_pool: Literal["mean", "user", "last"] = "mean"
    """What the gate reads: the mean state over the formatted prompt, the mean over the
    user's own tokens (no system prompt or template), or the last prompt token. "user" finds
    the user's tokens by the lengths of the model's own chat format (its default system
    prompt): a chat served with another system prompt, or several turns, shifts that span."""
    gate_per_source: bool = False
    """With data.gate_topic: one detector for the target's prompts and one for gate_topic's,
    the gate opening when either passes (the false-open budget holds for the pair). One
    direction for questions and requests together read both worse than each alone."""
    gate_per_language: bool = False
    """With gate_per_source: each source's detector is split by script as well (prompts
    mostly in Chinese characters get their own), so one direction need not read the topic
    in two languages at once against negatives in both."""
    gate_detector: Literal["lda", "logistic"] = "lda"
    """How each detector's direction is fitted: ridge-LDA, or an L2 logistic regression
    (discriminative: it reads a topic that comes as two phrasings, questions and requests,
    better than LDA's shared-covariance fit; RESULTS.md). Either is one linear direction, so
    the gate, its hook and its artifact do not change."""
    gate_thresholds: Literal["shared", "per_detector"] = "shared"
    """With gate_per_source: one threshold on every detector's standardised score, or one
    per detector, chosen together so the union keeps the false-open budget and the worst
    source's recall is highest (gates._union_thresholds)."""
    gate_veto: float = Field(0.0, ge=0, lt=0.5)
    """Share of the topic's prompts (out of fold) a harm veto may shut; 0: no veto. With it,
    a second detector at the gate's layer, fitted to tell the gate's must-stay-shut
    negatives (every other-side prompt not drawn from data.neutral: harmful requests,
    look-alikes, and any other gate source) from the topic, shuts the gate where it reads
    them. A two-sided gate: the topic detectors can then open wider without letting the
    harmful look-alikes through."""
    gate_false_open: float = Field(0.0, ge=0, lt=0.5)
    """Share of other-topic prompts (out of fold) the gate may open for: higher opens on more
    of the topic, and steers more prompts it should leave alone."""
    gate_phrasings: list[str] = []
    """Templates with "{prompt}" (e.g. "Draft a briefing note that answers: {prompt}"): the
    gate is also fitted on every topic *and* other prompt wrapped in each, so it learns the
    topic across phrasings without learning the wrapper (both sides carry it); a prompt's
    copies stay in one fold."""
    verify_prompts: int = Field(32, ge=2)
    """At most this many baseline-refused (remove) / answered (induce) target prompts are
    generated and judged per verified candidate."""

    @field_validator("phase")
    @classmethod
    def _known_phase(cls, v: str) -> str:
        try:
            opening_tokens(v)
            ok = v != "generation"
        except UserError:
            ok = False
        if not ok:
            raise ValueError("use both, prompt or prompt+N (the prompt and the first N "
                             "generated tokens, e.g. prompt+4); a profile that skips the "
                             "prompt pass cannot change the first answer token")
        return v

    @field_validator("gate_phrasings")
    @classmethod
    def _has_slot(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if "{prompt}" not in t]
        if bad:
            raise ValueError(f"each phrasing needs a {{prompt}} slot for the prompt: {bad[0]!r}")
        return v


class EvalConfig(ConfigModel):
    baselines: bool = True
    """Also evaluate single-direction Arditi ablation and plain MD steering."""
    examples: int = Field(8, ge=0)
    """Before/after example responses per evaluation set in the report."""


class SteerConfig(ConfigModel):
    model: str = "qwen2.5-coder-0.5b"
    """Model spec: packaged name, Hugging Face id, folder or .gguf file."""
    mode: Literal["remove", "induce"] = "remove"
    """remove: stop refusing the target topic; induce: start refusing it."""
    seed: int = 0
    """Seed for data splits, sampling and the search."""
    batch_size: int = Field(16, ge=1)
    """Prompts per forward pass."""
    data: DataConfig = DataConfig()
    judge: JudgeConfig = JudgeConfig()
    directions: DirectionConfig = DirectionConfig()
    search: SearchConfig = SearchConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _per_source_needs_sources(self) -> SteerConfig:
        if self.search.gate_per_source and not self.data.gate_topic:
            raise ValueError("search.gate_per_source fits one detector per topic source: set "
                             "data.gate_topic (e.g. [\"builtin:china_requests_fit\"]) or "
                             "leave it off")
        if self.search.gate_per_language and not self.search.gate_per_source:
            raise ValueError("search.gate_per_language splits gate_per_source's detectors by "
                             "language: set search.gate_per_source = true as well")
        return self
