"""Running one task per object, many at once: on this machine's threads, or on a Dask cluster
(``--dask ADDRESS``), with the same tasks and the same journal either way.

Tasks are module-level functions of picklable arguments (filesystems travel as their
constructor arguments, keys as references, never as bytes). The driver keeps a bounded
number in flight and hands each result back in the order they finish; only the driver
writes the journal. A Dask worker that dies mid-task has its task run again elsewhere (the
tasks are idempotent: destinations are written atomically).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import queue
from typing import Any, Callable, Iterator

from .copying import copy_stream
from .errors import EncfsError

def stamp(entry: dict) -> str | None:
    """What names one version of a listed object (its ETag, generation or modification time)."""
    from .filesystem import VERSION_STAMPS

    return next((str(entry[k]) for k in VERSION_STAMPS if entry.get(k) is not None), None)


class Runner:
    """Runs ``submit``-ted calls; ``finished`` yields ``(tag, result or exception)`` as they end.

    Locally, on a pool of ``jobs`` threads. With ``dask`` (a scheduler address), on that Dask
    cluster: each call is one task of a module-level function and its pickled arguments (an
    ``EncFileSystem`` pickles as its constructor arguments, keys as references), retried up to
    ``RETRIES`` times when it raises; a task whose worker dies is run again on another worker by
    the scheduler itself (up to ``distributed.scheduler.allowed-failures`` deaths). Reaching the
    scheduler is bounded by ``connect_timeout``; a lost scheduler (not back within that time) is
    an ``EncfsError`` from ``finished``, not a wait forever: the journal keeps what was done and
    a rerun does the rest."""

    RETRIES = 2
    CONNECT_TIMEOUT_S = 30.0
    POLL_S = 2.0  # how often a wait on Dask futures looks at the client's connection

    def __init__(self, jobs: int, dask: str | None = None, *, connect_timeout: float | None = None):
        self.jobs = max(1, jobs)
        self._client: Any = None
        self._address = dask
        self._pool: cf.ThreadPoolExecutor | None = None
        if dask:
            self._client = self._connect(dask, self.CONNECT_TIMEOUT_S if connect_timeout is None else connect_timeout)
            try:
                threads = sum(self._client.nthreads().values())
            except Exception as e:
                self._client.close()
                raise EncfsError(f"the Dask scheduler at {dask} did not answer: {type(e).__name__}: {e}") from None
            self.jobs = max(self.jobs, 2 * threads)
        else:
            self._pool = cf.ThreadPoolExecutor(self.jobs, thread_name_prefix="encfs-bulk")
        self._futures: dict[Any, Any] = {}
        self._done: queue.SimpleQueue = queue.SimpleQueue()

    @staticmethod
    def _connect(address: str, timeout: float) -> Any:
        try:
            from distributed import Client
        except ImportError:
            raise EncfsError("--dask needs dask.distributed: pip install 'encfs[dask]'") from None
        try:
            # timeout bounds the first connection and, later, how long a lost scheduler is
            # waited for before the client closes (its futures are cancelled at once).
            return Client(address, set_as_default=False, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as e:
            raise EncfsError(f"could not reach the Dask scheduler at {address} within {timeout:g} s: {type(e).__name__}: {e}") from None

    @property
    def full(self) -> bool:
        return len(self._futures) >= self.jobs

    def submit(self, tag: Any, fn: Callable[..., Any], *args: Any) -> None:
        if self._client is not None:
            self._check_connected()
            fut = self._client.submit(fn, *args, pure=False, retries=self.RETRIES)
            self._futures[fut] = tag
            fut.add_done_callback(self._done.put)  # on the client's callback thread; finished() takes them
        else:
            assert self._pool is not None
            fut = self._pool.submit(fn, *args)
            self._futures[fut] = tag

    def __len__(self) -> int:
        return len(self._futures)

    def finished(self) -> Iterator[tuple[Any, Any]]:
        """Wait for at least one call to end; yield each ended one's (tag, result or exception)."""
        if not self._futures:
            return
        if self._client is not None:
            done = self._dask_wait()
        else:
            done = cf.wait(list(self._futures), return_when=cf.FIRST_COMPLETED).done
        for fut in done:
            tag = self._futures.pop(fut)
            try:
                yield tag, fut.result()
            except Exception as e:
                yield tag, e

    def _dask_wait(self) -> list:
        """The Dask futures that ended (at least one), as their done-callbacks reported them;
        the client's connection is looked at every ``POLL_S`` seconds meanwhile."""
        done: list = []
        while not done:
            self._check_connected()
            try:
                done.append(self._done.get(timeout=self.POLL_S))
            except queue.Empty:
                continue
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                break
        done = [f for f in dict.fromkeys(done, None) if f in self._futures]
        lost = [f for f in done if f.status == "cancelled"]
        if lost and (self._client.status != "running" or any(self._lost_scheduler(f) for f in lost)):
            self._lost(len(self._futures))
        return done

    @staticmethod
    def _lost_scheduler(fut: Any) -> bool:
        """Whether a cancelled Dask future was cancelled because the scheduler went away."""
        try:
            fut.result(timeout=0)
        except Exception as e:
            return "connection" in str(getattr(e, "reason", ""))
        return False

    def _check_connected(self) -> None:
        if self._client.status not in ("running", "connecting"):
            self._lost(len(self._futures))

    def _lost(self, in_flight: int) -> None:
        raise EncfsError(
            f"lost the Dask scheduler at {self._address} (client {self._client.status}) with {in_flight} task(s) "
            "in flight; the journal keeps what was done: run the same command again to finish"
        )

    def close(self) -> None:
        if self._pool is not None:
            for fut in self._futures:
                fut.cancel()
            self._pool.shutdown(wait=True)
        if self._client is not None:
            client, self._client = self._client, None
            try:
                if self._futures and client.status == "running":
                    client.cancel(list(self._futures))
            except Exception:
                pass
            self._futures.clear()
            try:
                client.close(timeout=self.CONNECT_TIMEOUT_S)
            except Exception:  # a dead scheduler must not turn cleanup into a second error
                pass

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Digesting:
    """``readinto`` over a file object, hashing what passes (SHA-256 and a byte count)."""

    def __init__(self, f: Any):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)
        if n:
            self.h.update(memoryview(b)[:n])
            self.n += n
        return n or 0


def digest_of(fs: Any, path: str) -> tuple[str, int]:
    """SHA-256 and size of what ``fs`` reads at ``path`` (for an encfs filesystem, the plaintext,
    every chunk authenticated on the way)."""
    with fs.open(path, "rb") as f:
        d = Digesting(f)
        copy_stream(d, _Discard())
    return d.h.hexdigest(), d.n


class _Discard:
    def write(self, b: Any) -> int:
        return len(b)


def all_files(fs: Any, root: str, keep: Callable[[str], bool] = lambda rel: True, others: list[str] | None = None) -> dict[str, dict]:
    """Every file below ``root`` (or ``root`` itself) by path relative to it, with its listing
    entry; encfs temporaries are not files of the dataset, and symlinks inside the tree are
    not followed (a link's target is not the tree's to change). ``others`` collects what was
    left out that is neither a directory nor a temporary (symlinks, devices), so that callers
    can say so rather than drop it silently."""
    from .sink import is_temp_name

    root = root.rstrip("/")
    try:
        if fs.isfile(root):
            entry = fs.info(root)
            return {root.rsplit("/", 1)[-1]: entry}
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for path, entry in found.items():
        rel = path[len(root) :].lstrip("/") if path.startswith(root) else path
        if entry.get("type", "file") == "directory" or is_temp_name(path) or not keep(rel):
            continue
        if entry.get("type", "file") != "file" or entry.get("islink"):
            if others is not None:
                others.append(rel)
            continue
        out[rel] = entry
    return out
