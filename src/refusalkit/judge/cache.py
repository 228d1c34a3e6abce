"""On-disk judgement cache (sqlite, WAL) and a judge wrapper that uses it.

Keyed by sha256(judge id, prompt, response): re-running a report or a search never pays for a
judgement twice. `CachedJudge` judges cache misses in chunks and commits each chunk as soon as
it is done, so an interrupted run loses at most the chunk in flight and the next run resumes.
sqlite's WAL mode with a busy timeout lets several processes and threads write at once without
corrupting the file (each thread uses its own connection).
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from refusalkit.errors import UserError
from refusalkit.judge.base import Judge, Judgement, check_pairs

SCHEMA = """CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY, judge TEXT NOT NULL, label TEXT NOT NULL, score REAL NOT NULL,
    style TEXT, created REAL NOT NULL, on_topic REAL)"""


def default_cache_path() -> Path:
    from refusalkit.models import cache_root

    return cache_root() / "judgements.sqlite"


def cache_key(judge_id: str, prompt: str, response: str) -> str:
    h = hashlib.sha256()
    for part in (judge_id, prompt, response):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguity at joins
        h.update(data)
    return h.hexdigest()


class JudgementCache:
    """A sqlite file of judgements; safe to share between threads and processes."""

    def __init__(self, path: str | Path | None = None, timeout_s: float = 60.0) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.timeout_s = timeout_s
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn()
        except (OSError, sqlite3.DatabaseError) as exc:
            raise UserError(f"cannot open judgement cache {self.path}: {exc}") from None

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(SCHEMA)
            cols = {row[1] for row in conn.execute("PRAGMA table_info(judgements)")}
            if "on_topic" not in cols:  # caches written before judges estimated it
                conn.execute("ALTER TABLE judgements ADD COLUMN on_topic REAL")
            conn.commit()
            self._local.conn = conn
        return conn

    def get_many(self, keys: Sequence[str]) -> dict[str, Judgement]:
        found: dict[str, Judgement] = {}
        conn = self._conn()
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT key, label, score, style, on_topic FROM judgements WHERE key IN "
                f"({marks})", chunk)
            for key, label, score, style, on_topic in rows:
                found[key] = Judgement(label, score, style, on_topic)
        return found

    def put_many(self, judge_id: str, items: Sequence[tuple[str, Judgement]]) -> None:
        """Write a chunk in one transaction (all or nothing), retrying if the file is busy."""
        now = time.time()
        rows = [(k, judge_id, j.label, j.score, j.style, now, j.on_topic) for k, j in items]
        conn = self._conn()
        for attempt in range(5):
            try:
                with conn:
                    conn.executemany(
                        "INSERT OR REPLACE INTO judgements (key, judge, label, score, style, "
                        "created, on_topic) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                return
            except sqlite3.OperationalError as exc:  # "database is locked" past the timeout
                if "locked" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.1 * 2**attempt)

    def count(self, judge_id: str | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM judgements", ()
        if judge_id is not None:
            sql, args = sql + " WHERE judge = ?", (judge_id,)
        return int(self._conn().execute(sql, args).fetchone()[0])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


@dataclass
class CachedJudge:
    """Wraps a judge: cached judgements are reused, misses judged in committed chunks."""

    inner: Judge
    cache: JudgementCache
    chunk: int = 16
    on_chunk: Callable[[int], None] | None = None  # called with the number judged so far
    hits: int = field(default=0, init=False)
    misses: int = field(default=0, init=False)

    @property
    def id(self) -> str:
        return self.inner.id

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]:
        check_pairs(prompts, responses)
        judge_id = self.inner.id
        keys = [cache_key(judge_id, p, r) for p, r in zip(prompts, responses, strict=True)]
        found = self.cache.get_many(keys)
        todo: list[int] = []
        seen: set[str] = set()
        for i, k in enumerate(keys):  # judge each distinct missing pair once
            if k not in found and k not in seen:
                seen.add(k)
                todo.append(i)
        self.hits += len(keys) - len(todo)
        for start in range(0, len(todo), self.chunk):
            idx = todo[start : start + self.chunk]
            out = self.inner.judge([prompts[i] for i in idx], [responses[i] for i in idx])
            self.cache.put_many(judge_id, [(keys[i], j) for i, j in zip(idx, out, strict=True)])
            found.update({keys[i]: j for i, j in zip(idx, out, strict=True)})
            self.misses += len(idx)
            if self.on_chunk is not None:
                self.on_chunk(start + len(idx))
        return [found[k] for k in keys]
