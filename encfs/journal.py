"""The journal of a bulk operation (``encfs migrate``, ``rewrap``, ``reencrypt`` over a prefix):
the state of each object, kept in SQLite on local disk so that it survives ``kill -9``.

An object goes ``listed`` -> ``written`` (its new copy is complete at the destination, not yet
checked) -> ``committed`` (read back, authenticated, its plaintext digest equal to the
source's); ``failed`` records why it did not. Only ``committed`` counts as done: a rerun
skips those whose source is unchanged (same size and version stamp) and whose destination is
still the one recorded, checks ``written`` ones without copying them again, and redoes the
rest. Destinations are written atomically, so an object cut off by a kill is simply redone;
nothing is ever marked ``committed`` before its check passed.

Only the process driving the operation writes the journal (workers, threads or Dask tasks
return their results to it). Commits are grouped (at most ``FLUSH_EVERY`` seconds apart): a
kill loses at most the states of that interval, which a rerun redoes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import EncfsError

LISTED, WRITTEN, COMMITTED, FAILED = "listed", "written", "committed", "failed"
STATES = (LISTED, WRITTEN, COMMITTED, FAILED)
FLUSH_EVERY = 0.25
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    rel TEXT PRIMARY KEY, size INTEGER NOT NULL, src_stamp TEXT, state TEXT NOT NULL,
    digest TEXT, dst_stamp TEXT, error TEXT, attempts INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL
);
"""


class JournalError(EncfsError):
    """The journal cannot be used: another operation's, or unreadable."""


@dataclass
class Row:
    rel: str
    size: int
    src_stamp: str | None
    state: str
    digest: str | None = None
    dst_stamp: str | None = None
    error: str | None = None
    attempts: int = 0


def default_path(op: str, src: str, dst: str) -> Path:
    """Where the journal of ``op`` from ``src`` to ``dst`` lives unless ``--journal`` says:
    ``$XDG_STATE_HOME/encfs/journals/`` (else ``~/.local/state/...``), named by a digest of
    the operation and both URLs, so the same command finds its journal again."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "encfs" / "journals"
    name = hashlib.sha256(json.dumps([op, src, dst]).encode()).hexdigest()[:20]
    return base / f"{op}-{name}.sqlite"


class Journal:
    """``readonly``: only read what is recorded (a dry run writes nothing, not even a journal).
    ``before_commit``: called before a flush that records objects as ``committed`` (a local
    destination written without a per-file fsync is synced there, once for the batch)."""

    def __init__(self, path: str | os.PathLike, op: str, src: str, dst: str, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.before_commit: Callable[[], None] | None = None
        self._committing = False
        try:
            if readonly and self.path.exists():
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            elif readonly:
                self._db = sqlite3.connect(":memory:")
                self._db.executescript(_SCHEMA)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, isolation_level="DEFERRED")
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
            meta = dict(self._db.execute("SELECT k, v FROM meta"))
        except sqlite3.DatabaseError as e:
            raise JournalError(f"{self.path}: not a usable journal ({e})") from None
        want = {"op": op, "src": src, "dst": dst}
        if meta and {k: meta.get(k) for k in want} != want:
            raise JournalError(
                f"{self.path} is the journal of '{meta.get('op')} {meta.get('src')} {meta.get('dst')}', "
                f"not of '{op} {src} {dst}'; pass another --journal"
            )
        if not meta and not readonly:
            self._db.executemany("INSERT INTO meta VALUES (?, ?)", [*want.items(), ("created", str(time.time()))])
            self._db.commit()
        self._last_flush = time.monotonic()

    def rows(self) -> dict[str, Row]:
        cur = self._db.execute("SELECT rel, size, src_stamp, state, digest, dst_stamp, error, attempts FROM objects")
        return {r[0]: Row(*r) for r in cur}

    def listed(self, rel: str, size: int, src_stamp: str | None, known: Row | None) -> Row:
        """Record ``rel`` as found in the source; a source that changed since it was recorded
        (size or stamp) starts over at ``listed``."""
        if known is not None and known.size == size and known.src_stamp == src_stamp:
            return known
        if self.readonly:
            return Row(rel, size, src_stamp, LISTED)
        self._db.execute(
            "INSERT OR REPLACE INTO objects (rel, size, src_stamp, state, updated) VALUES (?, ?, ?, ?, ?)",
            (rel, size, src_stamp, LISTED, time.time()),
        )
        self._maybe_flush()
        return Row(rel, size, src_stamp, LISTED)

    def mark(self, rel: str, state: str, *, digest: str | None = None, dst_stamp: str | None = None, error: str | None = None) -> None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        self._db.execute(
            "UPDATE objects SET state = ?, digest = COALESCE(?, digest), dst_stamp = COALESCE(?, dst_stamp), error = ?, "
            "attempts = attempts + ?, updated = ? WHERE rel = ?",
            (state, digest, dst_stamp, error, 1 if state in (WRITTEN, FAILED) else 0, time.time(), rel),
        )
        self._committing = self._committing or state == COMMITTED
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.readonly:
            return
        if self._committing and self.before_commit is not None:
            self.before_commit()
        self._db.commit()
        self._committing = False
        self._last_flush = time.monotonic()

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, COUNT(*) FROM objects GROUP BY state"))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._db.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
