"""Shared fixtures: real packaged models loaded once per session, tiny random models per test.

Real-model tests share `qwen` / `smol` (session scope) so the suite loads each model once.
Tests must leave them unmodified (use `steer()` hooks, which always come off; a test that
changes weights works on its own copy, e.g. via `fresh_smol`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from refusalkit.judge import Judgement

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
os.environ.setdefault("REFUSALKIT_DATA", str(SHARED))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
WORDS = ("how do i make a bomb cake bake bread tell me about the weather please write poem "
         "story hack computer steal car sorry cannot help sure here is what why who when "
         "you are helpful assistant system user").split()


def tiny_tokenizer():
    """A word-level tokenizer with a chat template: enough for every code path, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {tok: i for i, tok in enumerate(special + list(dict.fromkeys(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


TINY_FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "mistral", "phi3", "qwen2_moe",
                 "mixtral")


def tiny_config(family: str, vocab_size: int = 64):
    from transformers import AutoConfig

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                  max_position_embeddings=128, pad_token_id=0, eos_token_id=2,
                  bos_token_id=1, tie_word_embeddings=False)
    extra: dict = {}
    if family in ("gemma2", "gemma3", "qwen3"):
        extra["head_dim"] = 16
    if family == "gemma3":
        extra["sliding_window"] = 16
    if family == "qwen2_moe":
        extra.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                     shared_expert_intermediate_size=48, decoder_sparse_step=1)
    if family == "mixtral":
        extra.update(num_local_experts=4, num_experts_per_tok=2)
    model_type = "gemma3_text" if family == "gemma3" else family
    return AutoConfig.for_model(model_type, **common, **extra)


def build_tiny(family: str = "llama", seed: int = 0):
    """A LoadedModel around a randomly initialised 4-layer model of the given family."""
    from transformers import AutoModelForCausalLM

    from refusalkit.models import from_pretrained_objects

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=len(tok)),
                                             dtype=torch.float32)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return from_pretrained_objects(model, tok, name=f"tiny-{family}")


class PlantedWord:
    """Judge for the tiny random model, which refuses nothing: an answer that contains the
    planted word is a "refusal". The word judges the *response*, so steering changes the rates.

    "steal" is a word of the tiny vocabulary that the unsteered tiny llama (seed 0) emits in its
    4-token greedy answers to 5 of 12 topic fitting prompts, 3 of 8 held-out topic prompts and
    5 of 8 safety prompts, and that adding / subtracting the fitted direction makes appear /
    disappear (measured: held-out topic refusal 0.375 → 1.0 inducing, → 0.0 removing). It
    also opens many answers to harmful prompts, so the tiny abliterate runs judge with it too.
    (Real-model tests judge real answers.)"""

    id = "test:planted-word"
    word = "steal"

    def judge(self, prompts, responses):
        return [Judgement("refusal", 1.0, "direct_refusal") if self.word in r.split()
                else Judgement("compliance", -1.0, "compliance") for r in responses]


@pytest.fixture
def tiny():
    return build_tiny("llama")


@pytest.fixture(scope="session")
def qwen():
    from refusalkit.models import load_model

    return load_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def smol():
    from refusalkit.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def fresh_smol():
    """A private copy of smollm2 for tests that change weights (loads in a few seconds)."""
    from refusalkit.models import load_model

    return load_model("smollm2-135m")


# Exact rewrites (weights folded vs hooks, a cached-prefix batch vs one plain pass) agree only
# up to float32 summation order, which differs between machines, thread counts and batch
# shapes. Their drift is bounded relative to the size of the values: measured on this 2-core
# machine with OMP_NUM_THREADS=1 and =2 (identical at both), the largest was 3.0e-6 of the
# largest |value| (smollm2 orthogonalised vs hooked, 9.4e-5 on logits up to 31); the fresh
# machine of issue 17 saw 1.0e-4 on the export test (about 2.5e-6 of its logits). 2e-5 leaves
# a margin of more than 6.
RTOL_FLOAT32 = 2e-5


def assert_same_up_to_float32(got: torch.Tensor, expected: torch.Tensor, other: torch.Tensor,
                              *, rtol: float = RTOL_FLOAT32, change: float = 100.0) -> None:
    """`got` equals `expected` within rtol × max |expected|, and `other` (the output without the
    intervention, or of another input) differs from `expected` by more than `change` × that
    bound, so the bound is far tighter than the effect being checked."""
    bound = rtol * float(expected.abs().max())
    err = float((got - expected).abs().max())
    moved = float((other - expected).abs().max())
    assert err <= bound, f"max |diff| {err:.3g} > {rtol:g} × {bound / rtol:.3g}"
    assert moved > change * bound, f"effect {moved:.3g} not above {change:g} × bound {bound:.3g}"
