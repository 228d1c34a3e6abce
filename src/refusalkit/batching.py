"""The serving engine: one worker thread batches concurrent chat requests through the model.

HTTP handlers submit `Job`s; the worker takes the first waiting job, keeps collecting for
`batch_window_ms` (or until `max_batch` rows), groups the jobs by steering setting (a
profile's hooks act on the whole batch, so rows in one forward must share them) and decodes
each group as one left-padded batch with a KV cache. Finished rows are dropped from the
batch as they end. Events (text deltas, token log-probs, finish reasons) go back to the
handler's asyncio queue thread-safely, so streaming and non-streaming share one path.

The decode loop is our own rather than `model.generate` because every row carries its own
temperature, top-p, seed, stop strings, length limit and log-prob request.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from refusalkit.activations import left_padded
from refusalkit.generation import eos_ids
from refusalkit.interventions import Profile, Steering, steer
from refusalkit.models import LoadedModel

OFF = None  # steering key of rows that run without any hooks


@dataclass(frozen=True)
class Sampling:
    """Per-choice decoding settings (OpenAI semantics: temperature 0 is greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Event:
    """What one decode step produced for one choice of a job."""

    index: int
    text: str
    logprobs: list[dict[str, Any]]
    finish_reason: str | None = None


class Row:
    """One choice being decoded: token ids, decoded text, stop handling, streamed offsets."""

    def __init__(self, job: Job, index: int, sampling: Sampling, tokenizer: Any) -> None:
        self.job, self.index, self.sampling, self.tok = job, index, sampling, tokenizer
        seed = sampling.seed + index if sampling.seed is not None else None
        self.gen = torch.Generator().manual_seed(
            seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        self.ids: list[int] = []
        self.entries: list[dict[str, Any]] = []  # OpenAI log-prob entries, one per token
        self.ends: list[int] = []  # text length after each token (running max)
        self.text = ""
        self.finish: str | None = None
        self.cut = False  # ended by a stop string (tokens after the cut are not reported)
        self.sent_chars = 0
        self.sent_tokens = 0

    def push(self, token: int, logprob: float, top: list[tuple[int, float]],
             eos: set[int]) -> None:
        if token in eos:
            self.finish = "stop"
            return
        self.ids.append(token)
        if self.sampling.logprobs:
            self.entries.append({**_token_entry(self.tok, token, logprob), "top_logprobs": [
                _token_entry(self.tok, t, lp) for t, lp in top]})
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        self.ends.append(max(len(full), self.ends[-1] if self.ends else 0))
        cuts = [i for i in (full.find(s) for s in self.sampling.stop) if i >= 0]
        if cuts:
            self.text, self.finish, self.cut = full[: min(cuts)], "stop", True
            return
        self.text = full
        if len(self.ids) >= self.sampling.max_tokens:
            self.finish = "length"

    def delta(self) -> Event:
        """Text and log-probs not yet sent: holds back an incomplete character and any tail
        that could still grow into a stop string, so a stream never shows stop text."""
        safe = len(self.text)
        if self.finish is None:
            while safe and self.text[safe - 1] == "\ufffd":
                safe -= 1
            safe -= max((_overlap(self.text[:safe], s) for s in self.sampling.stop), default=0)
            n_tok = sum(1 for end in self.ends if end <= safe)
        elif self.cut:  # the tokens that start inside the final text
            n_tok = sum(1 for start in [0, *self.ends[:-1]] if start < safe)
        else:
            n_tok = len(self.ids)
        safe = max(safe, self.sent_chars)
        ev = Event(self.index, self.text[self.sent_chars:safe],
                   self.entries[self.sent_tokens:n_tok] if self.sampling.logprobs else [],
                   self.finish)
        self.sent_chars, self.sent_tokens = safe, max(self.sent_tokens, n_tok)
        return ev


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for k in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def _token_entry(tok: Any, token: int, logprob: float) -> dict[str, Any]:
    text = tok.decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


@dataclass
class Job:
    """One chat request: its prompt, `n` rows and the queue its events go to."""

    prompt_ids: list[int]
    sampling: Sampling
    key: float | None  # steering scale, or OFF
    n: int = 1
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_done: Any = None  # called once (in the worker thread) when the job ends
    rows: list[Row] = field(default_factory=list)
    _ended: bool = False

    def send(self, item: Event | BaseException | None) -> None:
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shut down): nobody is listening
            pass

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.prompt_ids), sum(len(r.ids) for r in self.rows)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    async def stream(self) -> AsyncIterator[Event]:
        """The job's events as they come; re-raises a failure of the batch it ran in."""
        assert self.events is not None, "submit the job from a running event loop"
        while True:
            item = await self.events.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def collect(self) -> tuple[list[str], list[list[dict]], list[str | None]]:
        """(text, log-prob entries, finish reason) per choice, once the job has ended."""
        texts: list[list[str]] = [[] for _ in range(self.n)]
        logprobs: list[list[dict]] = [[] for _ in range(self.n)]
        finish: list[str | None] = [None] * self.n
        async for ev in self.stream():
            texts[ev.index].append(ev.text)
            logprobs[ev.index].extend(ev.logprobs)
            finish[ev.index] = ev.finish_reason or finish[ev.index]
        return ["".join(t) for t in texts], logprobs, finish

    def end(self, error: BaseException | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self.send(error)  # None marks a normal end
        if self.on_done is not None:
            self.on_done()


@dataclass
class Stats:
    batches: int = 0
    rows: int = 0
    max_rows: int = 0


class Engine:
    """Owns the model while the server runs: a single worker thread, so hooks never mix."""

    def __init__(self, lm: LoadedModel, profile: Profile | None, *, max_batch: int = 16,
                 batch_window_ms: float = 10.0) -> None:
        self.lm, self.profile = lm, profile
        self.max_batch = max(1, max_batch)
        self.window = max(0.0, batch_window_ms) / 1000.0
        self.pending: queue.Queue[Job | None] = queue.Queue()
        self.stats = Stats()
        self.eos = eos_ids(lm)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="refusalkit-engine",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker after the current batch; jobs still waiting end with an error."""
        if self._thread is None:
            return
        self._stopping.set()
        self.pending.put(None)
        self._thread.join()
        self._thread = None
        while True:
            try:
                job = self.pending.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.end(RuntimeError("the server is shutting down"))

    def submit(self, job: Job) -> None:
        job.rows = [Row(job, i, job.sampling, self.lm.tokenizer) for i in range(job.n)]
        self.pending.put(job)

    # ------------------------------------------------------------------ worker

    def _collect(self) -> list[Job]:
        first = self.pending.get()
        if first is None:
            return []
        jobs, rows = [first], first.n
        deadline = time.monotonic() + self.window
        while rows < self.max_batch and not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            try:
                job = self.pending.get(timeout=remaining) if remaining > 0 else \
                    self.pending.get_nowait()
            except queue.Empty:
                break
            if job is None:
                break
            jobs.append(job)
            rows += job.n
        return jobs

    def _loop(self) -> None:
        while not self._stopping.is_set():
            jobs = self._collect()
            groups: dict[float | None, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for key, group in groups.items():
                for chunk in _chunks(group, self.max_batch):
                    self._run(key, chunk)

    def _run(self, key: float | None, jobs: list[Job]) -> None:
        rows = [r for job in jobs if not job.cancelled.is_set() for r in job.rows]
        for job in jobs:
            if job.cancelled.is_set():
                job.end()
        if not rows:
            return
        self.stats.batches += 1
        self.stats.rows += len(rows)
        self.stats.max_rows = max(self.stats.max_rows, len(rows))
        profile = None if key is OFF or self.profile is None else self.profile.scaled(key)
        try:
            with steer(self.lm, profile) as steering, torch.inference_mode():
                self._decode(rows, steering)
        except Exception as exc:  # a bug or resource error fails these jobs, not the server
            for job in jobs:
                job.end(exc)
            return
        for job in jobs:
            job.end()

    def _decode(self, rows: list[Row], steering: Steering) -> None:
        """Left-padded prefill, then one token per step for the rows still running (a gate
        keeps the decisions it took on the remaining rows' prompts)."""
        lm, dev = self.lm, self.lm.device
        ids, mask, pos = left_padded([r.job.prompt_ids for r in rows],
                                     lm.tokenizer.pad_token_id or 0, dev)
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                       logits_to_keep=1)
        live = list(rows)
        while True:
            if self._stopping.is_set():
                raise RuntimeError("the server is shutting down")
            chosen = self._choose(out.logits[:, -1].float(), live)
            keep = []
            for i, row in enumerate(live):
                if row.job.cancelled.is_set():
                    row.finish = "cancelled"
                else:
                    row.push(*chosen[i], self.eos)
                    row.job.send(row.delta())
                if row.finish is None:
                    keep.append(i)
            if not keep:
                return
            nxt = torch.tensor([chosen[i][0] for i in keep], device=dev)[:, None]
            past = out.past_key_values
            if len(keep) < len(live):
                idx = torch.tensor(keep, device=dev)
                past.reorder_cache(idx)
                steering.keep_rows(idx)
                mask, pos = mask[idx], pos[idx]
                live = [live[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
            pos = pos[:, -1:] + 1
            out = lm.model(input_ids=nxt, attention_mask=mask, position_ids=pos,
                           past_key_values=past, use_cache=True)

    @staticmethod
    def _choose(logits: torch.Tensor, rows: Sequence[Row]
                ) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """Next token per row (greedy or seeded top-p sampling) with its raw log-prob and the
        top alternatives; log-probs are the model's own distribution (temperature 1)."""
        logp = logits.log_softmax(-1)
        greedy = logits.argmax(-1).tolist()
        result = []
        for i, row in enumerate(rows):
            s = row.sampling
            token = greedy[i]
            if s.temperature > 0:
                probs = (logits[i] / s.temperature).softmax(-1).cpu()
                if s.top_p < 1.0:
                    sp, order = probs.sort(descending=True)
                    cut = (sp.cumsum(0) - sp) >= s.top_p  # keep until mass reaches top_p
                    probs = torch.zeros_like(probs).scatter(0, order, sp.masked_fill(cut, 0.0))
                token = int(torch.multinomial(probs, 1, generator=row.gen))
            top: list[tuple[int, float]] = []
            if s.logprobs and s.top_logprobs:
                vals, idx = logp[i].topk(s.top_logprobs)
                top = list(zip(idx.tolist(), vals.tolist(), strict=True))
            result.append((token, float(logp[i, token]), top))
        return result


def _chunks(jobs: list[Job], max_rows: int) -> list[list[Job]]:
    """Consecutive runs of jobs with at most `max_rows` rows (a larger job runs alone)."""
    out: list[list[Job]] = []
    for job in jobs:
        if out and sum(j.n for j in out[-1]) + job.n <= max_rows:
            out[-1].append(job)
        else:
            out.append([job])
    return out


def request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
