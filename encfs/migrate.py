"""``encfs migrate SRC DST``: copy every object of a prefix into another, encrypting (a
plaintext source into an ``encfs::`` destination), re-encrypting (``encfs::`` to ``encfs::``,
other keys) or decrypting out, resumably and never touching the source.

Each object is one ``copy_object`` task (stream the source's plaintext to an atomic
destination write, hashing it on the way) and then one ``check_object`` task (read the new
copy back through its plaintext view, every chunk authenticated, and compare digests). The
journal (``journal.py``) records ``written`` after the first and ``committed`` after the
second; a rerun skips what is committed, checks what is written, and does the rest. A copy
that fails its check is deleted (it is never counted, nor left looking done). The source is
only ever opened for reading.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from . import bulk
from .copying import copy_stream
from .errors import EncfsError
from .filesystem import EncFileSystem
from .journal import COMMITTED, FAILED, LISTED, WRITTEN, Journal, Row, default_path
from .sink import fill_atomically, is_local, open_sink, remove_stale_temporaries


def copy_object(src_fs: Any, src: str, dst_fs: Any, dst: str, durable: bool = True) -> dict:
    """Copy one object's plaintext from ``src`` to ``dst`` (appearing whole or not at all);
    return its size, SHA-256 and the destination's version stamp. ``durable=False``: a local
    destination is not fsynced here (the driver syncs the filesystem once per batch, before
    the journal counts any of the batch as committed)."""
    with src_fs.open(src, "rb") as r:
        d = bulk.Digesting(r)
        if isinstance(dst_fs, EncFileSystem):
            with dst_fs.open(dst, "wb", durable=durable) as w:
                copy_stream(d, w)
        else:
            fill_atomically(open_sink(dst_fs, dst, durable=durable), lambda sink: copy_stream(d, sink))
    dst_fs.invalidate_cache(dst)
    return {"size": d.n, "sha256": d.h.hexdigest(), "dst_stamp": bulk.stamp(dst_fs.info(dst))}


def check_object(dst_fs: Any, dst: str, sha256: str, size: int, keep_failed: bool = False) -> dict:
    """Read ``dst`` back through its plaintext view and compare with what was copied. A copy
    that does not match (or does not authenticate) is deleted, unless ``keep_failed`` (in place,
    where it is the only copy left: reported, never deleted); ``ok`` says which."""
    try:
        got, n = bulk.digest_of(dst_fs, dst)
        why = None if (got, n) == (sha256, size) else f"read back {n} bytes with SHA-256 {got[:16]}..., copied {size} with {sha256[:16]}..."
    except (EncfsError, OSError, ValueError) as e:
        why = f"{type(e).__name__}: {e}"
    if why is not None and not keep_failed:
        try:
            dst_fs.rm_file(dst)
        except FileNotFoundError:
            pass
    return {"ok": why is None, "why": why}


@dataclass
class Summary:
    objects: int = 0
    bytes: int = 0
    copied: int = 0
    checked: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    journal: str = ""
    dry_run: bool = False

    def as_dict(self) -> dict:
        return {
            "objects": self.objects, "bytes": self.bytes, "copied": self.copied, "checked": self.checked,
            "skipped": self.skipped, "failed": [{"path": p, "error": e} for p, e in self.failed],
            "seconds": round(self.seconds, 3), "mb_per_s": round(self.bytes / self.seconds / 1e6, 1) if self.seconds else None,
            "journal": self.journal, "dry_run": self.dry_run,
        }


def _keep(include: list[str], exclude: list[str]):
    def keep(rel: str) -> bool:
        if include and not any(fnmatch.fnmatchcase(rel, g) for g in include):
            return False
        return not any(fnmatch.fnmatchcase(rel, g) for g in exclude)

    return keep


def _join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if rel else root


def migrate(
    src_fs: Any, src_root: str, dst_fs: Any, dst_root: str, *, src_url: str, dst_url: str,
    journal_path: str | None = None, jobs: int = 4, dask: str | None = None, include: list[str] | None = None,
    exclude: list[str] | None = None, dry_run: bool = False, progress: bool = True, op: str = "migrate",
    in_place: bool = False,
) -> Summary:
    """Copy ``src_root`` (a file or everything below it) to ``dst_root``; see the module doc.
    ``in_place``: source and destination are the same objects (``reencrypt``), so an object
    whose version is the one this journal wrote is done (or, if only written, to be checked)."""
    t0 = time.perf_counter()
    if not in_place:
        _refuse_overlap(src_fs, src_root, dst_fs, dst_root, src_url, dst_url)
    keep = _keep(include or [], exclude or [])
    others: list[str] = []
    sources = bulk.all_files(src_fs, src_root, keep, others)
    single = src_fs.isfile(src_root.rstrip("/")) if sources else False
    if single:
        (rel,) = sources
        sources = {"": sources[rel]}
    jpath = journal_path or str(default_path(op, src_url, dst_url))
    out = Summary(objects=len(sources), journal=jpath, dry_run=dry_run)
    out.failed = [(_join(src_root, rel), "not a regular file (a symlink or special file): not migrated") for rel in others]
    with Journal(jpath, op, src_url, dst_url, readonly=dry_run) as journal:
        known = journal.rows()
        dst_now = {rel: bulk.stamp(e) for rel, e in bulk.all_files(dst_fs, dst_root).items()} if not single else _single_stamp(dst_fs, dst_root)
        rows: dict[str, Row] = {}
        for rel, entry in sources.items():
            row = known.get(rel)
            if in_place and row is not None and row.state in (COMMITTED, WRITTEN) and row.dst_stamp == bulk.stamp(entry):
                rows[rel] = row
                continue
            rows[rel] = journal.listed(rel, _size(src_fs, entry), bulk.stamp(entry), row)
        to_copy, to_check = [], []
        for rel, row in rows.items():
            present = dst_now.get(rel)
            if row.state == COMMITTED and present is not None and present == row.dst_stamp:
                out.skipped += 1
            elif row.state == WRITTEN and present is not None and present == row.dst_stamp:
                to_check.append(rel)
            else:
                to_copy.append(rel)
        if dry_run:
            out.copied, out.checked = len(to_copy), len(to_check)
            out.seconds = time.perf_counter() - t0
            return out
        durable = dask is not None or not is_local(_storage(dst_fs))  # (Dask workers' writes are theirs to sync)
        if not durable:
            journal.before_commit = lambda: sync_filesystem(_storage(dst_fs)._strip_protocol(dst_root))
        journal.flush()
        _run(journal, rows, to_copy, to_check, src_fs, src_root, dst_fs, dst_root, jobs, dask, progress, out, durable, in_place)
        _sweep_temporaries(dst_fs, dst_root, rows)
    out.seconds = time.perf_counter() - t0
    return out


def _storage(fs: Any) -> Any:
    return fs.fs if isinstance(fs, EncFileSystem) else fs


def _refuse_overlap(src_fs: Any, src_root: str, dst_fs: Any, dst_root: str, src_url: str, dst_url: str) -> None:
    """SRC and DST on the same storage must not contain one another: the copies would be
    written over the source (SRC == DST replaces each object with its encrypted copy), or a
    rerun would list the copies as sources and nest them ever deeper (DST inside SRC)."""
    a, b = _storage(src_fs), _storage(dst_fs)
    if type(a) is not type(b):
        return
    if not is_local(a) and getattr(a, "storage_options", None) != getattr(b, "storage_options", None):
        return  # two differently configured stores (endpoints): cannot tell; assume apart
    s, d = (posixpath.normpath(fs._strip_protocol(root)) for fs, root in ((a, src_root), (b, dst_root)))
    if s == d or d.startswith(s.rstrip("/") + "/") or s.startswith(d.rstrip("/") + "/"):
        raise EncfsError(f"SRC {src_url} and DST {dst_url} overlap: the copies would be written into the source; pick a DST outside SRC")


def _sweep_temporaries(dst_fs: Any, dst_root: str, rows: dict[str, Row]) -> None:
    """Remove the temporaries that killed runs left in the destination's folders (local disk:
    those whose writer's ``flock`` is gone, whatever their age; a rerun right after a kill
    would otherwise leave them for good, since the writers' own clean-up waits ``STALE_AFTER``)."""
    target = dst_fs.fs if isinstance(dst_fs, EncFileSystem) else dst_fs
    if not is_local(target):
        return
    dirs = {posixpath.dirname(_join(dst_root, rel)) for rel in rows} if "" not in rows else {posixpath.dirname(dst_root.rstrip("/"))}
    for d in dirs:
        try:
            remove_stale_temporaries(target, d, older_than=0.0)
        except OSError:
            pass


def _single_stamp(fs: Any, path: str) -> dict[str, str | None]:
    try:
        return {"": bulk.stamp(fs.info(path))}
    except FileNotFoundError:
        return {}


def _size(fs: Any, entry: dict) -> int:
    return int(entry.get("size") or 0)


def sync_filesystem(path: str) -> None:
    """Make every write to the filesystem holding ``path`` durable (``syncfs``; ``sync`` where
    that is missing): one call for a batch of files instead of an fsync each."""
    import ctypes
    import os

    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs of {path} failed")
    except AttributeError:
        os.sync()
    finally:
        os.close(fd)


def _run(journal: Journal, rows: dict[str, Row], to_copy: list[str], to_check: list[str], src_fs: Any, src_root: str,
         dst_fs: Any, dst_root: str, jobs: int, dask: str | None, progress: bool, out: Summary, durable: bool = True,
         in_place: bool = False) -> None:
    from tqdm import tqdm

    work = [("copy", rel) for rel in to_copy] + [("check", rel) for rel in to_check]
    total_bytes = sum(rows[rel].size for _, rel in work)
    with bulk.Runner(jobs, dask) as runner, tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                                                 desc="migrate", disable=None if progress else True, leave=False) as bar:
        pending = list(reversed(work))

        def feed() -> None:
            while pending and not runner.full:
                kind, rel = pending.pop()
                if kind == "copy":
                    runner.submit((kind, rel), copy_object, src_fs, _join(src_root, rel), dst_fs, _join(dst_root, rel), durable)
                else:
                    row = rows[rel]
                    runner.submit((kind, rel), check_object, dst_fs, _join(dst_root, rel), row.digest, row.size, in_place)

        feed()
        while len(runner):
            for (kind, rel), result in runner.finished():
                if isinstance(result, BaseException):
                    journal.mark(rel, FAILED, error=f"{type(result).__name__}: {result}")
                    out.failed.append((_join(dst_root, rel), f"{type(result).__name__}: {result}"))
                    bar.update(rows[rel].size)
                elif kind == "copy":
                    journal.mark(rel, WRITTEN, digest=result["sha256"], dst_stamp=result["dst_stamp"])
                    rows[rel].digest, rows[rel].size = result["sha256"], result["size"]
                    out.copied += 1
                    out.bytes += result["size"]
                    pending.append(("check", rel))
                elif result["ok"]:
                    journal.mark(rel, COMMITTED)
                    out.checked += 1
                    bar.update(rows[rel].size)
                else:
                    journal.mark(rel, FAILED, error=result["why"])
                    out.failed.append((_join(dst_root, rel), result["why"]))
                    bar.update(rows[rel].size)
            feed()
        journal.flush()


def report(out: Summary, as_json: bool, verb: str = "copied") -> int:
    """Print the summary (one JSON object with ``as_json``); the exit status: 1 if anything failed."""
    if as_json:
        print(json.dumps(out.as_dict()), flush=True)
    else:
        what = f"would have {verb}" if out.dry_run else verb
        rate = f", {out.bytes / out.seconds / 1e6:.1f} MB/s" if out.seconds and out.bytes else ""
        print(
            f"{out.objects} object(s): {what} {out.copied}, checked {out.checked}, skipped {out.skipped} (done before), "
            f"failed {len(out.failed)}; {out.bytes / 1e6:.1f} MB in {out.seconds:.1f} s{rate}; journal {out.journal}",
            file=sys.stderr,
        )
        for path, why in out.failed:
            print(f"failed: {path}: {why}", file=sys.stderr)
    return 1 if out.failed else 0


__all__ = ["LISTED", "Summary", "check_object", "copy_object", "migrate", "report"]
