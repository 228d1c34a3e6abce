"""Judge specs: one string names a judge everywhere (CLI, configs, caches, reports).

    keyword                      the extended phrase list (keyword:classic = Arditi's 12;
                                 keyword:xstest = XSTest's 2023 opening-phrase match;
                                 keyword:heretic = Heretic 1.4's markers)
    llm[:MODEL]                  local label-token judge (packaged name, HF id or folder;
                                 default qwen2.5-coder-0.5b)
    openai:BASE_URL#MODEL[?key_env=VAR&max_tokens=N&concurrency=N&timeout=S&retries=N]
                                 any OpenAI-compatible chat endpoint; API key from $VAR
                                 (default OPENAI_API_KEY)
    calibrated                   the default: a calibrated P(refusal), label, style and P(on
                                 topic) from cues, sentence embeddings, question-answer
                                 relevance and fluency under smollm2-135m (judge/calibrated.py)
    hybrid                       the first trained judge (patterns + sentence embedding)
    probe                        a linear probe on qwen2.5-coder-0.5b's hidden state while it
                                 reads the pair; the most accurate local judge (~1 s per item)
    trained:NAME|PATH.json[@MODEL]  other weights; @MODEL supplies the LLM for "llm" features
    ensemble:SPEC+SPEC[+…]       mean of the members' scores, refusal if the mean > 0
    loop:SPEC                    looping output counts as refusal (paper A's "nonsensical"
                                 style), the rest is judged by SPEC (see guard.py)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from refusalkit.errors import UserError
from refusalkit.judge.base import Judge, Judgement, check_pairs
from refusalkit.judge.keyword import CLASSIC, HERETIC_MARKERS, XSTEST_OPENINGS, KeywordJudge
from refusalkit.models import LoadedModel

DEFAULT_LLM = "qwen2.5-coder-0.5b"
HYBRID_WEIGHTS = "hybrid_v1"
PROBE_WEIGHTS = "probe_qwen_v1"
CALIBRATED_WEIGHTS = "calibrated_v2"
DEFAULT_JUDGE = "calibrated"  # the judge every command and config uses unless told otherwise
PACKAGED = {"hybrid": HYBRID_WEIGHTS, "probe": PROBE_WEIGHTS,
            "calibrated": CALIBRATED_WEIGHTS}  # short names of trained judges
SPEC_HELP = ("calibrated, keyword, keyword:classic, keyword:xstest, keyword:heretic, "
             "llm[:MODEL], "
             "openai:BASE_URL#MODEL, hybrid, probe, trained:NAME[@MODEL], ensemble:SPEC+SPEC or "
             "loop:SPEC")


@dataclass
class EnsembleJudge:
    """Averages member scores; style from the first member that calls it a refusal."""

    members: tuple[Judge, ...]
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = "ensemble(" + "+".join(m.id for m in self.members) + ")"

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]:
        check_pairs(prompts, responses)
        votes = [m.judge(prompts, responses) for m in self.members]
        out = []
        for row in zip(*votes, strict=True):
            mean = sum(j.score for j in row) / len(row)
            label = "refusal" if mean > 0 else "compliance"
            style = next((j.style for j in row if j.is_refusal), None) if mean > 0 else label
            out.append(Judgement(label, mean, style))  # type: ignore[arg-type]
        return out


def _openai(rest: str, api_key_env: str | None) -> Judge:
    from refusalkit.judge.remote import OpenAIJudge

    base, sep, model_q = rest.partition("#")
    model, _, query = model_q.partition("?")
    if not sep or not base or not model:
        raise UserError(f"bad openai judge spec 'openai:{rest}'; use openai:BASE_URL#MODEL, "
                        "e.g. openai:http://127.0.0.1:8000/v1#my-model")
    params = dict(parse_qsl(query))
    kinds = {"key_env": str, "max_tokens": int, "concurrency": int, "timeout": float,
             "retries": int}
    unknown = set(params) - set(kinds)
    if unknown:
        raise UserError(f"unknown openai judge option(s) {sorted(unknown)}; use {sorted(kinds)}")
    try:
        opts = {k: kinds[k](v) for k, v in params.items()}
    except ValueError as exc:
        raise UserError(f"bad openai judge option in '{query}': {exc}") from None
    return OpenAIJudge(
        base, model, api_key_env=opts.get("key_env") or api_key_env or "OPENAI_API_KEY",
        max_tokens=opts.get("max_tokens", 256), concurrency=opts.get("concurrency", 8),
        timeout_s=opts.get("timeout", 120.0), retries=opts.get("retries", 3))


def make_judge(spec: str, *, lm: LoadedModel | None = None,
               api_key_env: str | None = None) -> Judge:
    """Build the judge a spec names. `lm` reuses an already loaded model for llm judges
    (only when its name matches the spec's model)."""
    from refusalkit.judge.calibrated import FORMAT as CALIBRATED_FORMAT
    from refusalkit.judge.calibrated import CalibratedJudge
    from refusalkit.judge.llm import LLMJudge
    from refusalkit.judge.trained import TrainedJudge, load_weights, needs_llm

    spec = spec.strip()
    kind, _, rest = spec.partition(":")

    def llm_judge(model: str) -> LLMJudge:
        return LLMJudge(model, lm=lm if lm is not None and lm.name == model else None)

    if spec == "keyword":
        return KeywordJudge()
    if spec == "keyword:classic":
        return KeywordJudge(CLASSIC)
    if spec == "keyword:heretic":
        return KeywordJudge(HERETIC_MARKERS, heretic=True)
    if spec == "keyword:xstest":
        return KeywordJudge(XSTEST_OPENINGS, opening=True)
    if kind == "llm":
        return llm_judge(rest or DEFAULT_LLM)
    if kind == "openai":
        return _openai(rest, api_key_env)
    if spec in PACKAGED:
        kind, rest = "trained", PACKAGED[spec]
    if kind == "trained" and rest:
        name, _, model = rest.partition("@")
        weights = load_weights(name)
        if weights.get("format") == CALIBRATED_FORMAT:
            return CalibratedJudge(weights)
        model = model or weights.get("meta", {}).get("llm_model", DEFAULT_LLM)
        llm = LLMJudge(model, lm=lm if lm is not None and lm.name == model else None,
                       bias=0.0, styles=False) if needs_llm(weights["components"]) else None
        return TrainedJudge(weights, llm=llm)
    if kind == "loop" and rest:
        from refusalkit.judge.guard import guarded

        return guarded(make_judge(rest, lm=lm, api_key_env=api_key_env))
    if kind == "ensemble" and rest:
        return EnsembleJudge(tuple(make_judge(s, lm=lm, api_key_env=api_key_env)
                                   for s in rest.split("+")))
    raise UserError(f"unknown judge '{spec}'; use {SPEC_HELP}")
