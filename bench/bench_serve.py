"""Serving throughput with batching on vs off (max_batch=1), over real HTTP on 127.0.0.1.

C concurrent clients (threads with the official `openai` client) each send R chat requests
back to back. Both servers run the same loaded model; the modes alternate within each repeat
(order flipped every repeat) and medians are reported, so machine load hits both alike.

    python bench/bench_serve.py                      # smollm2-135m, 16 clients x 4 requests
    python bench/bench_serve.py --max-tokens 32 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch

from refusalkit.models import load_model
from refusalkit.serve import create_app, serve_in_thread

PROMPTS = [f"Write one sentence about {topic}." for topic in (
    "the sea", "autumn", "coffee", "mountains", "a lost key", "trains", "bees", "winter",
    "a library", "rain", "music", "the moon", "bread", "a bicycle", "clocks", "a garden")]


def run_load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, int, int]:
    """(seconds, completion tokens, errors) for clients x requests chat completions."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)

    def worker(i: int) -> tuple[int, int]:
        tokens = errors = 0
        for k in range(requests):
            try:
                r = client.chat.completions.create(
                    model="bench", max_tokens=max_tokens, temperature=0,
                    messages=[{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}])
                tokens += r.usage.completion_tokens
            except openai.APIError:
                errors += 1
        return tokens, errors

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(worker, range(clients)))
    elapsed = time.perf_counter() - start
    return elapsed, sum(t for t, _ in results), sum(e for _, e in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--window-ms", type=float, default=10.0)
    args = ap.parse_args()

    lm = load_model(args.model)
    apps = {"batched": create_app(lm, max_batch=args.max_batch, batch_window_ms=args.window_ms,
                                  max_concurrency=4 * args.clients),
            "unbatched": create_app(lm, max_batch=1, max_concurrency=4 * args.clients)}
    n = args.clients * args.requests
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, {args.clients} clients "
          f"x {args.requests} requests, max_tokens {args.max_tokens}, greedy")
    with serve_in_thread(apps["batched"]) as batched, serve_in_thread(apps["unbatched"]) as plain:
        urls = {"batched": batched, "unbatched": plain}
        for url in urls.values():  # warm-up
            run_load(url, 2, 1, 4)
        rows: dict[str, list[tuple[float, float]]] = {m: [] for m in urls}
        for rep in range(args.repeats):
            order = list(urls) if rep % 2 == 0 else list(reversed(urls))
            for mode in order:
                secs, tokens, errors = run_load(urls[mode], args.clients, args.requests,
                                                args.max_tokens)
                if errors:
                    raise SystemExit(f"{mode}: {errors} of {n} requests failed")
                rows[mode].append((n / secs, tokens / secs))
                print(f"  repeat {rep + 1} {mode:<9} {secs:7.2f} s  {n / secs:6.2f} req/s  "
                      f"{tokens / secs:7.1f} tok/s  ({tokens} tokens, 0 errors)")
        stats = apps["batched"].state.engine.stats
    med = {m: (statistics.median(r for r, _ in v), statistics.median(t for _, t in v))
           for m, v in rows.items()}
    for mode, (rps, tps) in med.items():
        print(f"median {mode:<9} {rps:6.2f} req/s  {tps:7.1f} tok/s")
    print(f"batched server: {stats.batches} forward batches for {stats.rows} rows "
          f"(largest {stats.max_rows})")
    print(f"ratio batched/unbatched: {med['batched'][0] / med['unbatched'][0]:.2f}x req/s, "
          f"{med['batched'][1] / med['unbatched'][1]:.2f}x tok/s")


if __name__ == "__main__":
    main()
