"""AWS KMS recipients: file keys wrapped under a key-encryption key (KEK) that KMS issued.

A writer asks KMS once for a data key (``GenerateDataKey``, AES-256, with an encryption context
naming the dataset) and uses it as the KEK of a writing session: each file's key is wrapped
under ``HKDF(KEK, file id)`` with the common AES-GCM wrap (bound to the file's context and the
stanza's fields), and the stanza carries the KMS key ARN, the dataset name and the KMS
ciphertext of the KEK. The KEK is renewed after ``kek_max_age`` seconds or ``kek_max_uses``
files. A reader sends the KEK's ciphertext to KMS (``Decrypt``, the same encryption context)
once per cache lifetime and opens every file of that session with it: through the host's
agent (``encfs agent``, shared by all processes of the user) when one is running, else from
this process's cache (shared by its threads and, after fork, its DataLoader workers).

Reference: ``kms:KEY[?option=value&...]``, KEY an ARN (``arn:aws:kms:REGION:ACCOUNT:key/ID``
or ``...:alias/NAME``), ``alias/NAME`` or a key id. Options: ``region``, ``endpoint``,
``profile``, ``dataset`` (the encryption context's dataset; default ``default``),
``kek_max_age`` (s, default 3600), ``kek_max_uses`` (default 100000), ``cache_max_age`` (s,
default 3600), ``cache_max_uses`` (default 1000000), ``attempts`` (KMS calls tried per
operation, with backoff, default 5), ``timeout`` (s per KMS request, default 10). docs/KEYS.md
describes the flow, docs/FORMAT.md the stanza.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qsl

from ..errors import EncfsError, FormatError, KeyReferenceError
from ..forking import ForkLocal
from ..format import Stanza
from ..secret import SecretBytes
from .base import check_shape, hkdf32, open_stanza, seal_stanza
from .registry import RecipientType, register

TYPE = "kms"
SCHEME = "kms"
PARAMS_VERSION = 1
KEK_ID_SIZE = 8
_WRAP_INFO = b"encfs/v1 kms-wrap"
_CONTEXT_PURPOSE = "kek/v1"


class KmsError(EncfsError):
    """A KMS call failed; ``code`` is KMS's error code, ``key`` the key reference."""

    def __init__(self, message: str, *, code: str = "", key: str = ""):
        super().__init__(message)
        self.code, self.key = code, key


class KmsUnavailableError(KmsError, ConnectionError):
    """KMS could not be reached, or kept refusing for throttling after every retry."""


class KmsAccessDeniedError(KmsError, PermissionError):
    """KMS refused the caller: no permission on the key (key policy, grants, IAM)."""


class KmsKeyDisabledError(KmsError):
    """The KMS key is disabled, pending deletion or otherwise unusable."""


class KmsKeyNotFoundError(KmsError, KeyReferenceError):
    """No such KMS key or alias."""


_ERRORS: dict[str, type[KmsError]] = {
    "AccessDeniedException": KmsAccessDeniedError,
    "DisabledException": KmsKeyDisabledError,
    "KeyUnavailableException": KmsKeyDisabledError,
    "KMSInvalidStateException": KmsKeyDisabledError,
    "NotFoundException": KmsKeyNotFoundError,
    "ThrottlingException": KmsUnavailableError,
    "LimitExceededException": KmsUnavailableError,
    "RequestLimitExceeded": KmsUnavailableError,
    "DependencyTimeoutException": KmsUnavailableError,
    "KMSInternalException": KmsUnavailableError,
}
NOT_FOR_US = ("InvalidCiphertextException", "IncorrectKeyException")
"""Decrypt errors meaning "this ciphertext is not for this key" (or was altered): the stanza
does not open with this identity, as a wrong symmetric key would not."""


@dataclass(frozen=True)
class KmsOptions:
    key: str
    region: str | None = None
    endpoint: str | None = None
    profile: str | None = None
    dataset: str = "default"
    kek_max_age: float = 3600.0
    kek_max_uses: int = 100_000
    cache_max_age: float = 3600.0
    cache_max_uses: int = 1_000_000
    attempts: int = 5
    timeout: float = 10.0

    @property
    def client_key(self) -> tuple:
        return (self.region, self.endpoint, self.profile, self.attempts, self.timeout)

    def cache_limits(self) -> tuple[float, int]:
        return self.cache_max_age, self.cache_max_uses


_NUMERIC = {"kek_max_age": float, "kek_max_uses": int, "cache_max_age": float, "cache_max_uses": int, "attempts": int, "timeout": float}


def parse_reference(value: str, ref: str) -> KmsOptions:
    key, _, query = value.partition("?")
    if not (key.startswith("arn:aws") and (":key/" in key or ":alias/" in key)) and not key.startswith("alias/") and not _is_key_id(key):
        raise KeyReferenceError(f"{ref}: expected kms:arn:aws:kms:REGION:ACCOUNT:key/ID, kms:alias/NAME or kms:KEY_ID")
    opts: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=False, strict_parsing=bool(query))
    except ValueError:
        raise KeyReferenceError(f"{ref}: malformed options after '?'") from None
    for name, raw in pairs:
        if name in opts:
            raise KeyReferenceError(f"{ref}: option {name!r} given twice")
        if name in _NUMERIC:
            try:
                val = _NUMERIC[name](raw)
            except ValueError:
                raise KeyReferenceError(f"{ref}: option {name} must be a number, got {raw!r}") from None
            if val <= 0:
                raise KeyReferenceError(f"{ref}: option {name} must be positive")
            opts[name] = val
        elif name in ("region", "endpoint", "profile", "dataset"):
            opts[name] = raw
        else:
            raise KeyReferenceError(f"{ref}: unknown option {name!r}; known: {', '.join(sorted([*_NUMERIC, 'region', 'endpoint', 'profile', 'dataset']))}")
    if key.startswith("arn:") and "region" not in opts:
        opts["region"] = key.split(":")[3] or None
    if not 1 <= len(opts.get("dataset", "default").encode()) <= 256:
        raise KeyReferenceError(f"{ref}: dataset must be 1-256 bytes")
    return KmsOptions(key=key, **opts)


def _is_key_id(key: str) -> bool:
    parts = key.split("-")
    return len(key) == 36 and [len(p) for p in parts] == [8, 4, 4, 4, 12] and all(c in "0123456789abcdef-" for c in key.lower())


# -- stanza ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KmsParams:
    """What a ``kms`` stanza's params hold (docs/FORMAT.md): the KMS key ARN, the dataset of the
    encryption context, and the KMS ciphertext of the KEK."""

    arn: str
    dataset: str
    blob: bytes

    def encode(self) -> bytes:
        arn, ds = self.arn.encode(), self.dataset.encode()
        return struct.pack(">BH", PARAMS_VERSION, len(arn)) + arn + struct.pack(">H", len(ds)) + ds + self.blob

    @classmethod
    def decode(cls, params: bytes) -> "KmsParams":
        try:
            version, n = struct.unpack_from(">BH", params, 0)
            if version != PARAMS_VERSION:
                raise FormatError(f"kms stanza params version {version} is not supported (this reader knows {PARAMS_VERSION})")
            arn = params[3 : 3 + n].decode("utf-8")
            (m,) = struct.unpack_from(">H", params, 3 + n)
            dataset = params[5 + n : 5 + n + m].decode("utf-8")
            blob = params[5 + n + m :]
        except (struct.error, UnicodeDecodeError):
            raise FormatError("malformed kms stanza params") from None
        if len(arn.encode()) != n or len(dataset.encode()) != m or not arn.startswith("arn:") or not 1 <= m <= 256 or not blob:
            raise FormatError("malformed kms stanza params")
        return cls(arn, dataset, bytes(blob))

    @property
    def kek_id(self) -> bytes:
        return kek_id(self.blob)

    def context(self) -> dict[str, str]:
        return encryption_context(self.dataset)


def kek_id(blob: bytes) -> bytes:
    return hashlib.sha256(b"encfs/v1 kms-kek-id" + blob).digest()[:KEK_ID_SIZE]


def encryption_context(dataset: str) -> dict[str, str]:
    return {"encfs": _CONTEXT_PURPOSE, "encfs:dataset": dataset}


def check_stanza(stanza: Stanza) -> None:
    if len(stanza.key_id) != KEK_ID_SIZE:
        check_shape(stanza, KEK_ID_SIZE, len(stanza.params), "8-byte KEK id")
    p = KmsParams.decode(stanza.params)
    if stanza.key_id != p.kek_id:
        raise FormatError("malformed kms stanza: key id is not the id of its KEK ciphertext")


def wrap_key(kek: SecretBytes, salt: bytes) -> SecretBytes:
    """The key that wraps one file's key: ``HKDF(KEK, salt = file id)``."""
    return hkdf32(kek.view(), salt, _WRAP_INFO)


# -- KMS calls ---------------------------------------------------------------------------------

_clients: ForkLocal[dict[tuple, Any]] = ForkLocal(dict)
_clients_lock: ForkLocal[threading.Lock] = ForkLocal(threading.Lock)
_calls: dict[str, int] = {}


def client(opts: KmsOptions) -> Any:
    """A boto3 KMS client for these options (one per process and set of options: a forked
    child makes its own)."""
    with _clients_lock.get():
        clients = _clients.get()
        c = clients.get(opts.client_key)
        if c is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise KeyReferenceError("kms: keys need boto3: pip install 'encfs[kms]'") from None
            session = boto3.session.Session(profile_name=opts.profile) if opts.profile else boto3.session.Session()
            config = Config(
                retries={"mode": "standard", "total_max_attempts": opts.attempts},
                connect_timeout=opts.timeout, read_timeout=opts.timeout,
            )
            c = clients[opts.client_key] = session.client("kms", region_name=opts.region, endpoint_url=opts.endpoint, config=config)
        return c


_executor: ForkLocal[ThreadPoolExecutor] = ForkLocal(lambda: ThreadPoolExecutor(8, thread_name_prefix="encfs-kms"))


def deadline(opts: KmsOptions) -> float:
    """Seconds one operation may take in all: every attempt's connect and read timeouts, plus
    botocore's backoff between attempts (doubling, at most 20 s)."""
    return opts.attempts * 2 * opts.timeout + sum(min(2.0**i, 20.0) for i in range(opts.attempts - 1))


def call(opts: KmsOptions, operation: str, **kwargs: Any) -> dict:
    """One KMS operation, retried with backoff by botocore (``attempts``), bounded as a whole by
    ``deadline`` (a peer trickling its answer byte by byte never trips a per-read timeout), its
    failures as typed errors naming the key (never a payload)."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    _calls[operation] = _calls.get(operation, 0) + 1
    fut = _executor.get().submit(getattr(client(opts), _snake(operation)), **kwargs)
    try:
        return fut.result(timeout=deadline(opts))
    except FutureTimeout:
        fut.cancel()
        raise KmsUnavailableError(
            f"KMS {operation} with key {opts.key} failed: no answer within {deadline(opts):g} s (Timeout)", code="Timeout", key=opts.key
        ) from None
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "") or "Unknown"
        message = e.response.get("Error", {}).get("Message", "")
        cls = _ERRORS.get(code, KmsError)
        raise cls(f"KMS {operation} with key {opts.key} failed: {code}: {message}", code=code, key=opts.key) from None
    except (NoCredentialsError, PartialCredentialsError) as e:
        raise KmsAccessDeniedError(f"KMS {operation} with key {opts.key} failed: no AWS credentials ({e})", code="NoCredentials", key=opts.key) from None
    except BotoCoreError as e:
        raise KmsUnavailableError(f"KMS {operation} with key {opts.key} failed: {type(e).__name__}: {e}", code=type(e).__name__, key=opts.key) from None


def calls() -> dict[str, int]:
    """KMS operations this process made, by name (for ``encfs doctor`` and tests)."""
    return dict(_calls)


def _snake(operation: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in operation).lstrip("_")


def decrypt_kek(opts: KmsOptions, p: KmsParams) -> SecretBytes | None:
    """The KEK of a stanza, from KMS; None when KMS says the ciphertext is not for this key."""
    try:
        out = call(opts, "Decrypt", CiphertextBlob=p.blob, EncryptionContext=p.context(), KeyId=p.arn)
    except KmsError as e:
        if e.code in NOT_FOR_US:
            return None
        raise
    plain = out["Plaintext"]
    if len(plain) != 32:
        raise FormatError("KMS returned a KEK that is not 32 bytes")
    return SecretBytes(plain)


# -- caches --------------------------------------------------------------------------------------


class _Flight:
    """One fetch in progress: the others asking for the same KEK wait for its outcome."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


class KekCache:
    """Unwrapped KEKs, each opened by KMS at most once per lifetime (``max_age`` seconds,
    ``max_uses`` files), whatever the number of threads asking at once: one asks, the others
    wait for its answer, a failure included. KMS saying a ciphertext is not for the key is
    remembered for ``NEGATIVE_TTL`` seconds (a hostile file reopened costs no more calls). A KEK
    is only ever used under the cache's lock (``use`` derives from it there), so an entry
    wiped at its limits or by ``clear``/``drop`` is never read half-wiped. Shared by this
    process's threads and, after fork, by its children (re-locked by ``SecretBytes``)."""

    NEGATIVE_TTL = 60.0

    def __init__(self) -> None:
        self._items: dict[tuple, list] = {}  # key -> [kek or None, expires, uses_left]
        self._lock: ForkLocal[threading.Lock] = ForkLocal(threading.Lock)
        self._flights: ForkLocal[dict[tuple, _Flight]] = ForkLocal(dict)

    def use(self, key: tuple, limits: tuple[float, int], fetch: Callable[[], SecretBytes | None],
            derive: Callable[[SecretBytes], Any]) -> tuple[Any, bool]:
        """(``derive(KEK)``, or None when KMS said the ciphertext is not for the key; whether the
        KEK came from the cache). ``derive`` runs under the lock: it must be quick."""
        while True:
            with self._lock.get():
                item = self._items.get(key)
                if item is not None and (item[1] < time.monotonic() or item[2] <= 0):
                    self._drop(key)
                    item = None
                if item is not None:
                    if item[0] is None:
                        return None, True
                    item[2] -= 1
                    return derive(item[0]), True
                flight = self._flights.get().get(key)
                if flight is None:
                    flight = self._flights.get()[key] = _Flight()
                    break
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
        try:
            kek = fetch()
            with self._lock.get():
                now = time.monotonic()
                if kek is None:
                    self._items[key] = [None, now + self.NEGATIVE_TTL, float("inf")]
                    return None, False
                self._items[key] = [kek, now + limits[0], limits[1] - 1]
                return derive(kek), False
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock.get():
                self._flights.get().pop(key, None)
            flight.done.set()

    def _drop(self, key: tuple) -> None:
        item = self._items.pop(key, None)
        if item is not None and item[0] is not None:
            item[0].wipe()

    def drop(self, keys: Any) -> None:
        """Wipe the KEKs cached under ``keys`` (a filesystem's ``wipe_keys``)."""
        with self._lock.get():
            for key in list(keys):
                self._drop(key)

    def clear(self) -> None:
        with self._lock.get():
            for key in list(self._items):
                self._drop(key)

    def __len__(self) -> int:
        return sum(1 for item in self._items.values() if item[0] is not None)


_cache = KekCache()


def local_cache() -> KekCache:
    return _cache


def cache_key(opts: KmsOptions, p: KmsParams) -> tuple:
    """What one cached KEK is: the KMS that opened it, the key, the dataset and the whole
    ciphertext (not the 8-byte id a hostile header could collide with)."""
    return (opts.endpoint, opts.region, opts.profile, p.arn, p.dataset, hashlib.sha256(p.blob).digest())


def file_wrap_key(opts: KmsOptions, p: KmsParams, salt: bytes) -> tuple[SecretBytes | None, str, tuple | None]:
    """The wrap key of one file's stanza, where its KEK came from ("agent", "cache", "kms"), and
    the cache key it was kept under (None through the agent): through the agent when one is
    configured and answering, else this process's cache."""
    from .. import agent

    conn = agent.connection()
    if conn is not None:
        wk = conn.wrap_key(opts, p, salt)
        if wk is not agent.UNAVAILABLE:
            return wk, "agent", None
    key = cache_key(opts, p)
    wk, cached = _cache.use(key, opts.cache_limits(), lambda: decrypt_kek(opts, p), lambda kek: wrap_key(kek, salt))
    return wk, ("cache" if cached else "kms"), key


# -- the key object ------------------------------------------------------------------------------


class _Session:
    """A writer's KEK: issued by KMS, used for at most ``kek_max_uses`` files or
    ``kek_max_age`` seconds."""

    def __init__(self, opts: KmsOptions):
        out = call(opts, "GenerateDataKey", KeyId=opts.key, KeySpec="AES_256", EncryptionContext=encryption_context(opts.dataset))
        self.kek = SecretBytes(out["Plaintext"])
        self.params = KmsParams(out["KeyId"], opts.dataset, out["CiphertextBlob"])
        self.expires = time.monotonic() + opts.kek_max_age
        self.uses_left = opts.kek_max_uses

    def spent(self) -> bool:
        return self.uses_left <= 0 or time.monotonic() >= self.expires


class KmsKey:
    """A KMS key: recipient (wraps under a session KEK) and identity (opens stanzas of this
    key, through the agent or this process's cache)."""

    type = TYPE

    def __init__(self, opts: KmsOptions, source: str):
        self.opts, self.source = opts, source
        self.key_id = b""
        self._session: ForkLocal[dict[str, _Session]] = ForkLocal(dict)  # a forked child asks KMS for its own
        self._lock: ForkLocal[threading.Lock] = ForkLocal(threading.Lock)
        self._arn: str | None = opts.key if ":key/" in opts.key else None
        self._fetched: set[tuple] = set()

    @property
    def label(self) -> str:
        return f"kms:{self.opts.key}"

    def _session_wrap_key(self, salt: bytes) -> tuple[SecretBytes, KmsParams]:
        """The wrap key of one new file under the session KEK (renewed at its limits; its
        ``kms-generate`` line written before it wraps anything), derived under the lock that
        guards the KEK's renewal and wiping."""
        with self._lock.get():
            s = self._session.get().get("kek")
            if s is None or s.spent():
                if s is not None:
                    del self._session.get()["kek"]
                    s.kek.wipe()
                s = _Session(self.opts)
                try:
                    _audit("kms-generate", s.params.arn, kek_id=s.params.kek_id.hex())
                except BaseException:
                    s.kek.wipe()
                    raise
                self._session.get()["kek"] = s
            s.uses_left -= 1
            return wrap_key(s.kek, salt), s.params

    def wrap(self, file_key: SecretBytes, context: bytes) -> Stanza:
        wk, params = self._session_wrap_key(context[12:28])
        return seal_stanza(TYPE, params.kek_id, params.encode(), wk, file_key, context)

    def arn(self) -> str:
        """The key's ARN (an alias or key id is resolved once, by ``DescribeKey``)."""
        if self._arn is None:
            self._arn = call(self.opts, "DescribeKey", KeyId=self.opts.key)["KeyMetadata"]["Arn"]
        return self._arn

    def owns(self, stanza: Stanza) -> bool:
        """Whether ``stanza`` was written under this KMS key (by ARN): what ``rewrap --remove``
        takes away."""
        return stanza.type == TYPE and KmsParams.decode(stanza.params).arn == self.arn()

    def matches(self, stanza: Stanza) -> bool:
        try:
            return self.owns(stanza)
        except FormatError:
            return True  # (tried, so that the malformed stanza is reported)

    def unwrap(self, stanza: Stanza, context: bytes) -> SecretBytes | None:
        check_stanza(stanza)
        p = KmsParams.decode(stanza.params)
        wk, source, key = file_wrap_key(self.opts, p, context[12:28])
        if key is not None:
            self._fetched.add(key)
        _audit(f"unwrap-{source}", p.arn, kek_id=p.kek_id.hex(), file_id=context[12:28], outcome="ok" if wk else "not-for-this-key")
        if wk is None:
            return None
        return open_stanza(stanza, wk, context)

    def wipe(self) -> None:
        """Wipe the session KEK and every KEK this key had the process cache open."""
        with self._lock.get():
            s = self._session.get().pop("kek", None)
            if s is not None:
                s.kek.wipe()
        _cache.drop(self._fetched)
        self._fetched.clear()

    def __repr__(self) -> str:
        return f"<KmsKey {self.opts.key} dataset={self.opts.dataset!r}>"


def _audit(op: str, key: str, outcome: str = "ok", file_id: bytes | None = None, **extra: Any) -> None:
    try:
        from .. import audit
    except ImportError:
        return
    audit.record(op, outcome=outcome, key=key, file_id=file_id, **extra)


def load_kms(value: str, ref: str) -> KmsKey:
    return KmsKey(parse_reference(value, ref), ref)


MAX_PER_HEADER = 4
"""``kms`` stanzas one header may hold (docs/FORMAT.md): each may cost a KMS call, so a hostile
header cannot make one open cost more than this many."""

register(RecipientType(TYPE, (KmsKey,), check_stanza, schemes={SCHEME: load_kms}, max_per_header=MAX_PER_HEADER))
