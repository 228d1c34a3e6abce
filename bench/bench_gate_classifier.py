"""Does a small trained classifier read the topic as questions *and* requests? (issue 15 §2)

One ridge-LDA direction at one early layer, fitted on deccp questions plus request-style
topic prompts (builtin:china_requests_fit), could not keep out-of-fold recall on the questions
at 0.95 while opening for the dev requests (RESULTS.md, "Request-style prompts on the gate's
topic side"). This compares, on DEV data only, that linear detector with an L2 logistic
regression and a one-hidden-layer MLP over the same pooled prompt state, at every candidate
gate layer. Each is thresholded the way `gates.fit_gate` does it: 4 folds, out-of-fold scores,
the PU cleaning of everyday negatives, at most the config's false-open share of the other
prompts above the threshold. The final model is refitted on all rows and keeps that threshold.

Read (nothing held out): the topic fitting questions and requests, the gate's other prompts,
builtin:china_requests_dev (40 requests) and 200 harmless_train prompts no role used.
Rule written before the run: keep deccp out-of-fold recall ≥ 0.95 (§5's bound) and ordinary
opens within the budget's reach, then the most dev requests opened.

    python bench/bench_gate_classifier.py [--kinds lda logreg mlp ps-logreg@1] [--layers 5 7]

Kinds: lda (gates.fit_gate per source), logreg / mlp (AdamW-trained; "@1" sets the weight
decay), and a "ps-" prefix for one model per topic source (the gate opens on the higher
standardised score). The winner became `directions.logistic` (deterministic L-BFGS) behind
`search.gate_detector`; bench_gate.py measures that one through the pipeline's own fit.
"""

from __future__ import annotations

import argparse
import time

from common import REPO, md_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "steer_qwen.toml"))
    ap.add_argument("--set", dest="set_", action="append", default=[])
    ap.add_argument("--pool", default="mean", choices=["mean", "user"])
    ap.add_argument("--kinds", nargs="+", default=["lda", "logreg", "mlp"])
    ap.add_argument("--layers", type=int, nargs="*", help="candidate layers (default: all)")
    args = ap.parse_args()

    import torch

    from refusalkit.activations import capture
    from refusalkit.config import parse_set
    from refusalkit.gates import _folds, _threshold, fit_gate, pool_position
    from refusalkit.models import load_model
    from refusalkit.prompts import load_prompts
    from refusalkit.steer.config import SteerConfig
    from refusalkit.steer.data import split_data
    from refusalkit.steer.fit import gate_inputs

    overrides = {"data.gate_topic": ["builtin:china_requests_fit"], **parse_set(args.set_)}
    cfg = SteerConfig.load(args.config, overrides)
    splits = split_data(cfg.data, cfg.seed)
    lm = load_model(cfg.model)
    layers, _, texts, ordinary = gate_inputs(lm, splits, cfg.search)
    if args.layers:
        layers = [x for x in layers if x in args.layers]
    used = {p for ps in splits.named().values() for p in ps}
    dev = load_prompts("builtin:china_requests_dev").prompts
    plain = [p for p in load_prompts("harmless_train").prompts if p not in used][:200]

    def read(prompts: list[str]) -> torch.Tensor:
        return capture(lm, prompts, layers, [pool_position(args.pool)],
                       batch_size=cfg.batch_size, show_progress=False)[:, :, 0].double()

    t0 = time.perf_counter()
    q, r = read(splits.target_fit), read(splits.gate_topic)
    neg, dv, od = read(texts), read(dev), read(plain)
    print(f"read {len(q)} questions, {len(r)} requests, {len(neg)} other, {len(dv)} dev, "
          f"{len(od)} ordinary in {time.perf_counter() - t0:.0f} s", flush=True)
    pos = torch.cat([q, r])
    src = torch.cat([torch.zeros(len(q), dtype=torch.long), torch.ones(len(r), dtype=torch.long)])
    budget = cfg.search.gate_false_open

    def train(kind: str, p: torch.Tensor, n: torch.Tensor, seed: int,
              ps: torch.Tensor | None = None):
        """A scorer fitted on topic rows p and other rows n (one layer's [rows, d]).
        kind "logreg@0.1" sets the weight decay; a "ps-" prefix fits one per topic source
        (ps) and scores the highest, each standardised on its training negatives."""
        if kind.startswith("ps-"):
            assert ps is not None
            parts = []
            for k in ps.unique():
                f = train(kind[3:], p[ps == k], n, seed)
                sn = f(n)
                parts.append((f, sn.mean(), sn.std()))
            return lambda z: torch.stack([(f(z) - m) / s for f, m, s in parts]).amax(0)
        kind, _, wd = kind.partition("@")
        mu, sd = n.mean(0), n.std(0).clamp_min(1e-6)
        x = torch.cat([p, n]).sub(mu).div(sd).float()
        y = torch.cat([torch.ones(len(p)), torch.zeros(len(n))])
        w = torch.where(y > 0, len(n) / len(p), 1.0)  # balanced classes
        g = torch.Generator().manual_seed(seed)
        if kind == "logreg":
            net = torch.nn.Linear(x.shape[1], 1)
        else:
            torch.manual_seed(seed)
            net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.GELU(),
                                      torch.nn.Dropout(0.2), torch.nn.Linear(64, 1))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=float(wd or 1e-2))
        for _ in range(300):
            idx = torch.randperm(len(x), generator=g)
            for b in idx.split(128):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    net(x[b]).squeeze(-1), y[b], weight=w[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()

        def score(z: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return net(z.sub(mu).div(sd).float()).squeeze(-1).double()
        return score

    rows = []
    for kind in args.kinds:
        for slot, layer in enumerate(layers):
            t = time.perf_counter()
            if kind == "lda":  # the shipped fit, one detector per source (the closest so far)
                fit = fit_gate(pos[:, slot:slot + 1], neg[:, slot:slot + 1], [layer],
                               max_false_open=budget, pool=args.pool, seed=cfg.seed,
                               ordinary=ordinary, pos_strata=src, per_source=True)
                by = fit.recall_by
                d_open = int(fit.gate.decide(dv[:, slot]).sum())
                o_open = int(fit.gate.decide(od[:, slot]).sum())
            else:
                gen = torch.Generator().manual_seed(cfg.seed)
                pf_, nf_ = _folds(len(pos), 4, gen), _folds(len(neg), 4, gen)
                p, n = pos[:, slot], neg[:, slot]
                pz = torch.empty(len(p), dtype=torch.float64)
                nz = torch.empty(len(n), dtype=torch.float64)
                for i, (pf, nf) in enumerate(zip(pf_, nf_, strict=True)):
                    keep_p = torch.ones(len(p), dtype=torch.bool).index_fill_(0, pf, False)
                    keep_n = torch.ones(len(n), dtype=torch.bool).index_fill_(0, nf, False)
                    s = train(kind, p[keep_p], n[keep_n], cfg.seed + i, src[keep_p])
                    pz[pf], nz[nf] = s(p[pf]), s(n[nf])
                drop = ordinary & (nz >= pz.median())
                thr, _, _ = _threshold(pz, nz[~drop], budget)
                by = tuple(float((pz[src == k] > thr).double().mean()) for k in (0, 1))
                s = train(kind, p, n, cfg.seed, src)
                d_open = int((s(dv[:, slot]) > thr).sum())
                o_open = int((s(od[:, slot]) > thr).sum())
            rows.append([kind, layer, f"{by[0]:.3f}", f"{by[1]:.3f}", f"{d_open}/{len(dv)}",
                         f"{o_open}/{len(od)}", f"{time.perf_counter() - t:.0f} s"])
            print(" | ".join(str(x) for x in rows[-1]), flush=True)
    print(md_table(["detector", "layer", "deccp OOF", "requests OOF", "dev opened (DEV)",
                    "ordinary opens", "fit time"], rows))


if __name__ == "__main__":
    main()
