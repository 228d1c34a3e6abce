"""Does a topic detector over several layers read requests better than one layer? (issue 15 §2)

The shipped gate is ridge-LDA on the mean prompt state of one early layer; it misses about a
fifth of English requests ("Draft…", "Outline…") about the topics it catches as questions.
This compares, on DEV data only (builtin:china_requests_dev; nothing held out is read), the
single-layer detector against the same fit over concatenated layer windows, each layer scaled
to unit mean coordinate variance first (layers differ in scale by orders of magnitude). Every
variant is fitted and thresholded by `gates.fit_gate` on the steer config's fitting prompts,
at the config's false-open budget, so recall is compared at equal out-of-fold leak.

    python bench/bench_gate_detectors.py [--config C] [--widths 1 3 5]
"""

from __future__ import annotations

import argparse
import time

from common import REPO, md_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "steer_qwen.toml"))
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 3, 5])
    args = ap.parse_args()

    import torch

    from refusalkit.activations import MEAN_ALL, capture
    from refusalkit.gates import fit_gate
    from refusalkit.models import load_model
    from refusalkit.prompts import load_prompts
    from refusalkit.steer.config import SteerConfig
    from refusalkit.steer.data import split_data
    from refusalkit.steer.fit import gate_inputs

    cfg = SteerConfig.load(args.config, {})
    splits = split_data(cfg.data, cfg.seed)
    lm = load_model(cfg.model)
    layers, _, texts, ordinary = gate_inputs(lm, splits, cfg.search)
    dev = load_prompts("builtin:china_requests_dev").prompts

    def read(prompts: list[str]) -> torch.Tensor:
        return capture(lm, prompts, layers, [MEAN_ALL], batch_size=cfg.batch_size,
                       show_progress=False)[:, :, 0].double()

    t0 = time.perf_counter()
    pos, neg, dv = read(splits.target_fit), read(texts), read(dev)
    print(f"read {len(pos)} topic, {len(neg)} other, {len(dv)} dev prompts in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    scale = neg.var(0).mean(-1).sqrt()  # [layers]: one scale per layer, from the negatives

    rows = []
    for width in args.widths:
        starts = list(range(0, len(layers) - width + 1))

        def windows(x: torch.Tensor, starts: list[int] = starts, width: int = width
                    ) -> torch.Tensor:
            z = x / scale[None, :, None]
            return torch.stack([z[:, s:s + width].flatten(1) for s in starts], dim=1)

        t = time.perf_counter()
        fit = fit_gate(windows(pos), windows(neg), starts,
                       max_false_open=cfg.search.gate_false_open, pool="mean",
                       seed=cfg.seed, ordinary=ordinary)
        s = fit.gate.layer
        opened = int(fit.gate.decide(windows(dv)[:, s]).sum())
        rows.append([width, f"{layers[s]}–{layers[s + width - 1]}", f"{fit.recall:.3f}",
                     f"{fit.leak:.4f}", f"{opened}/{len(dv)}",
                     f"{time.perf_counter() - t:.0f} s"])
        print(" | ".join(str(x) for x in rows[-1]), flush=True)
    print(md_table(["layers pooled", "chosen window", "out-of-fold recall", "leak (95 % UB)",
                    "china_requests_dev opened (DEV)", "fit time"], rows))


if __name__ == "__main__":
    main()
