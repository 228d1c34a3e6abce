"""Which direction and which fold: difference of means vs projected, plain vs norm-preserving
ablation, on the same two kernels (dev data only; issue 17).

The kernels are abliterate's first two informed points (Arditi's flat kernel on the
best-separating layer, and the late peak); each variant is scored like a search trial: judged
refusals (calibrated) on 32 dev harmful prompts, 48 new tokens, and next-token KL on 64 dev
harmless prompts. The defaults in abliterate/config.py follow this table.

    REFUSALKIT_DATA=../shared/datasets python bench/bench_abliterate_variants.py [MODEL]
"""

from __future__ import annotations

import json
import sys
import time

from refusalkit.abliterate import AbliterateConfig
from refusalkit.abliterate.pipeline import best_layers, fit_directions, split_data
from refusalkit.abliterate.search import (
    components,
    kernel_from_params,
    score_kernel,
    seed_params,
)
from refusalkit.judge import make_judge
from refusalkit.models import load_model
from refusalkit.scoring import last_logprobs


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-0.5b"
    cfg = AbliterateConfig.load(None, {"model": model, "data.n_search": 32,
                                       "data.n_search_kl": 64})
    splits = split_data(cfg)
    lm = load_model(cfg.model)
    judge = make_judge("calibrated")
    base = last_logprobs(lm, splits.harmless_search, batch_size=16)
    print("| direction | kernel | norms | dev KL | dev refusals | s |")
    print("|---|---|---|---:|---:|---:|")
    for method in ("md", "projected"):
        fit = fit_directions(lm, splits, 16, False, method)
        layers = best_layers(fit["auc"].tolist(), cfg, lm.n_layers)
        seeds = seed_params(layers, cfg.search, lm.n_layers, components(lm))[:2]
        for name, params in zip((f"Arditi flat, layer {layers[0]}", "late peak"), seeds,
                                strict=True):
            for preserve in (False, True):
                kernel = kernel_from_params(params, components(lm), preserve)
                t = time.perf_counter()
                s = score_kernel(lm, kernel, fit["directions"], harmful=splits.harmful_search,
                                 harmless=splits.harmless_search, harmless_base=base,
                                 judge=judge, cache=None, max_new_tokens=48, batch_size=16)
                norms = "preserved" if preserve else "plain"
                print(f"| {method} | {name} | {norms} | {s.kl:.4f} | {s.refusals}/{s.n} | "
                      f"{time.perf_counter() - t:.0f} |", flush=True)
    print(json.dumps({"model": model, "best_layers": layers}))


if __name__ == "__main__":
    main()
