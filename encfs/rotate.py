"""Rotation and revocation across a prefix: ``encfs rewrap PREFIX --add R --remove R``,
``encfs revoke R PREFIX`` and ``encfs reencrypt PREFIX``, in parallel and resumable with the
same journal as ``migrate`` (``journal.py``), on threads or a Dask cluster (``bulk.Runner``).

``rewrap`` touches headers only (``rewrap.rewrap``: on S3 the payload is copied server-side).
Each object is one task that reads its header, adds the recipients it lacks and removes the
stanzas named that it has (so a rerun, or a prefix half done by a killed run, converges), and
reads the new header back; the journal marks the object ``committed`` with the version stamp
it has afterwards, so a rerun skips it unless it changed since. ``reencrypt`` gives files new
file keys: ``migrate`` of the prefix onto itself (read, re-encrypt, atomic replace, read back
and compare digests). Tasks take key *references*; keys are loaded where the task runs.
"""

from __future__ import annotations

import os
import time
from typing import Any

from . import bulk
from .errors import EncfsError, naming
from .header import read_header, unlock
from .journal import COMMITTED, FAILED, Journal, default_path
from .keys import KeyRing, load_reference
from .keys.base import key_label
from .migrate import Summary
from .rewrap import has_recipient, names, rewrap
from .target import Target


def removal_for(value: str) -> Any:
    """A ``--remove`` value as what ``rewrap`` removes: ``type:keyidhex``, key id hex or a bare
    type are labels; anything else is a key reference, loaded to learn its label, or kept as
    the key when its stanzas carry no fixed id (``kms``: every stanza written under it)."""
    from .keys import registry

    kind, sep, rest = value.partition(":")
    hexdigits = set("0123456789abcdefABCDEF")
    if not sep and (value in registry.names() or (value and set(value) <= hexdigits)):
        return value
    if sep and kind in registry.names() and rest and set(rest) <= hexdigits and len(rest) % 2 == 0 and len(rest) <= 32:
        return value.lower()
    key = load_reference(value)
    if hasattr(key, "owns"):
        return key
    try:
        return key_label(key)
    finally:
        getattr(key, "wipe", lambda: None)()


def _header(fs: Any, path: str):
    raw = fs.open(path, "rb")
    target = Target(raw)
    try:
        return read_header(target.read_at, raw.seek(0, os.SEEK_END))[0]
    finally:
        target.close()


def rewrap_object(fs: Any, path: str, key: list[str], identities: list[str], add: list[str], remove: list[str],
                  tolerant: bool, header_length: int | None, signers: list[str] | None = None) -> dict:
    """Bring one file's recipients to the asked set; return its labels and version stamp after.
    ``tolerant``: a removal the file does not have is not an error (``revoke``). ``signers``:
    refuse to rewrap a file no trusted writer signed."""
    with naming(path):
        keyring = KeyRing(key or None, identities=identities or None, signers=signers or None)
        try:
            header = _header(fs, path)
            adding = [r for r in (load_reference(ref) for ref in add) if not has_recipient(header.stanzas, r)]
            removals = [removal_for(v) for v in remove]
            if tolerant:
                removals = [r for r in removals if any(names(r, s) for s in header.stanzas)]
            changed = bool(adding or removals)
            if changed:
                rewrap(fs, path, keyring, add=adding, remove=removals, in_place=False, header_length=header_length)
                fs.invalidate_cache(path)
            after = _header(fs, path)
            if keyring.identities():
                try:
                    unlock(after, keyring).wipe()
                except EncfsError:
                    pass  # (the keys given may have been the ones removed: the header was still parsed whole)
            for r in removals:
                if any(names(r, s) for s in after.stanzas):
                    raise EncfsError(f"{getattr(r, 'label', r)} is still in the header after the rewrap")
            return {"changed": changed, "labels": after.labels(), "dst_stamp": bulk.stamp(fs.info(path))}
        finally:
            keyring.wipe()


def rewrap_prefix(
    fs: Any, root: str, *, url: str, key: list[str], identities: list[str], add: list[str], remove: list[str],
    tolerant: bool = False, header_length: int | None = None, journal_path: str | None = None, jobs: int = 4,
    dask: str | None = None, progress: bool = True, op: str = "rewrap", signers: list[str] | None = None,
) -> Summary:
    """``rewrap_object`` for every file below ``root``, journaled (see the module doc)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    files = bulk.all_files(fs, root)
    single = len(files) == 1 and fs.isfile(root.rstrip("/"))
    jpath = journal_path or str(default_path(op, url, repr((sorted(add), sorted(remove)))))
    out = Summary(objects=len(files), journal=jpath)
    with Journal(jpath, op, url, repr((sorted(add), sorted(remove)))) as journal:
        known = journal.rows()
        todo = []
        for rel, entry in files.items():
            now, row = bulk.stamp(entry), known.get(rel)
            if row is not None and row.state == COMMITTED and row.dst_stamp == now:
                out.skipped += 1
                continue
            journal.listed(rel, int(entry.get("size") or 0), now, None if row is None or row.src_stamp != now else row)
            todo.append(rel)
        journal.flush()
        with bulk.Runner(jobs, dask) as runner, tqdm(total=len(todo), unit="file", desc=op, disable=None if progress else True, leave=False) as bar:
            pending = list(reversed(todo))

            def feed() -> None:
                while pending and not runner.full:
                    rel = pending.pop()
                    path = root if single else f"{root.rstrip('/')}/{rel}"
                    runner.submit(rel, rewrap_object, fs, path, key, identities, add, remove, tolerant, header_length, signers)

            feed()
            while len(runner):
                for rel, result in runner.finished():
                    bar.update(1)
                    if isinstance(result, BaseException):
                        journal.mark(rel, FAILED, error=f"{type(result).__name__}: {result}")
                        out.failed.append((rel, f"{type(result).__name__}: {result}"))
                    else:
                        journal.mark(rel, COMMITTED, dst_stamp=result["dst_stamp"])
                        out.copied += result["changed"]
                        out.checked += 1
                feed()
    out.seconds = time.perf_counter() - t0
    return out
