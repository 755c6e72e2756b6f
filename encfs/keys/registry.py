"""Recipient types, registered once each: everything encfs must know about one kind of key.

A registration (``RecipientType``) names the stanza type the kind writes into headers
(docs/FORMAT.md §1.2), the reference schemes that name its keys and the loader of each, the
classes of its key objects (recipients wrap a file key, identities unwrap it; see
``base.Recipient`` / ``base.Identity``), the shape its stanzas must have, and how many of its
stanzas one header may hold. Everything else asks this module: ``load_reference`` dispatches
on the registered schemes, ``KeyRing`` accepts registered key objects, ``KeyRing.unwrap``
refuses headers holding a stanza type nobody registered, and the per-header limits are
checked by ``check_per_header`` wherever a header is sealed, configured or opened. What is not
registered stays an error (``FormatError`` for a stanza type, ``KeyReferenceError`` for a
scheme), never a fallback; a name is never registered twice (``ValueError``), so a plug-in
cannot replace a built-in type.

Adding a type (e.g. KMS) is one module that defines its key class(es), a stanza shape check
and a reference loader, then makes one call at import::

    register(RecipientType(
        name="kms",                                  # the stanza type in headers
        classes=(KmsKey,),                           # what KeyRing accepts as a key object
        check_stanza=check_kms_stanza,               # FormatError when a stanza is malformed
        schemes={"kms": load_kms_reference},         # "kms:arn:aws:kms:..." -> KmsKey(...)
    ))

and has that module imported (the built-in types are imported by ``encfs.keys``; a plug-in
names its module in the ``encfs.key_providers`` entry-point group, imported the first time a
scheme or stanza type is not known, whose ``register`` call is the same). The type also gets
its section in docs/FORMAT.md (a new stanza type: old readers reject it as unknown).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from ..errors import FormatError

if TYPE_CHECKING:
    from ..format import Stanza
    from ..secret import SecretBytes

Loader = Callable[[str, str], Any]
"""A reference loader: ``(value after 'SCHEME:', the whole reference) -> key object``. Its
errors are ``KeyReferenceError`` naming the reference, never key material."""

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")  # docs/FORMAT.md §1.1 stanza types
_SCHEME = re.compile(r"[a-z0-9-]{1,16}")


@dataclass(frozen=True)
class RecipientType:
    """One kind of key. ``key_file_prefix`` / ``from_secret``: a type whose 32-byte secret can
    stand in a key file (docs/FORMAT.md §5), as the line ``PREFIX<base64url>``, loaded with
    ``from_secret(secret, source)``; those keys are named by the ``keyfile:`` and ``env:``
    references. ``max_per_header``: how many stanzas of this type one header may hold."""

    name: str
    classes: tuple[type, ...]
    check_stanza: Callable[["Stanza"], None]
    schemes: Mapping[str, Loader] = field(default_factory=dict)
    key_file_prefix: str = ""
    from_secret: Callable[["SecretBytes", str], Any] | None = None
    max_per_header: int | None = None


_TYPES: dict[str, RecipientType] = {}
_SCHEMES: dict[str, Loader] = {}
_CLASSES: tuple[type, ...] = ()


def register(rtype: RecipientType) -> RecipientType:
    """Make ``rtype`` known: its stanza type, schemes and key classes."""
    global _CLASSES
    if not _NAME.fullmatch(rtype.name):
        raise ValueError(f"recipient type name {rtype.name!r} is not 1-32 chars of [a-z0-9-]")
    if rtype.name in _TYPES:
        raise ValueError(f"recipient type {rtype.name!r} is already registered")
    if bool(rtype.key_file_prefix) != (rtype.from_secret is not None):
        raise ValueError("key_file_prefix and from_secret go together")
    if any(rtype.key_file_prefix == t.key_file_prefix for t in key_file_types()):
        raise ValueError(f"key file prefix {rtype.key_file_prefix!r} is already registered")
    for scheme in rtype.schemes:
        _check_new_scheme(scheme)
    _SCHEMES.update(rtype.schemes)
    _TYPES[rtype.name] = rtype
    _CLASSES = _CLASSES + tuple(c for c in rtype.classes if c not in _CLASSES)
    return rtype


def register_scheme(scheme: str, loader: Loader) -> None:
    """A reference scheme that no one type owns (``keyfile:`` and ``env:`` hold key files of
    any type with a ``key_file_prefix``). A type's own schemes go in its ``RecipientType``."""
    _check_new_scheme(scheme)
    _SCHEMES[scheme] = loader


def _check_new_scheme(scheme: str) -> None:
    if not _SCHEME.fullmatch(scheme):
        raise ValueError(f"reference scheme {scheme!r} is not 1-16 chars of [a-z0-9-]")
    if scheme in _SCHEMES:
        raise ValueError(f"reference scheme {scheme!r} is already registered")


def is_scheme(text: str) -> bool:
    """Whether ``text`` has the form of a scheme (registered or not)."""
    return bool(_SCHEME.fullmatch(text))


PLUGIN_GROUP = "encfs.key_providers"
"""Entry-point group of key-provider plug-ins (docs/KEYS.md): each entry point names a module
whose import registers its types (``register``), as the built-in modules do."""
_plugins_loaded = False
_plugin_errors: list[str] = []


def load_plugins() -> None:
    """Import every installed key-provider plug-in, once per process. Called when a scheme or
    stanza type is not (yet) known, so plug-ins cost nothing until one is needed. A plug-in
    that fails to import does not stop the others; it is a ``ConfigError`` naming it on every
    lookup that plug-ins were consulted for, never skipped silently."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=PLUGIN_GROUP):
            try:
                ep.load()
            except Exception as e:
                _plugin_errors.append(f"{ep.name!r} ({ep.value}): {type(e).__name__}: {e}")
    if _plugin_errors:
        from ..errors import ConfigError

        raise ConfigError(f"key provider plug-in(s) failed to load: {'; '.join(_plugin_errors)}")


def loader(scheme: str) -> Loader | None:
    if scheme not in _SCHEMES:
        load_plugins()
    return _SCHEMES.get(scheme)


def schemes() -> list[str]:
    return sorted(_SCHEMES)


def get(name: str) -> RecipientType | None:
    return _TYPES.get(name)


def names() -> list[str]:
    return sorted(_TYPES)


def key_file_types() -> list[RecipientType]:
    """The types whose secrets key files hold, by prefix."""
    return sorted((t for t in _TYPES.values() if t.key_file_prefix), key=lambda t: t.key_file_prefix)


def is_key_object(obj: object) -> bool:
    """Whether ``obj`` is a key object of a registered type (not a reference string)."""
    return isinstance(obj, _CLASSES)


def check_known(types: Iterable[str]) -> None:
    """``FormatError`` if any stanza type is not registered: never skipped, never guessed."""
    unknown = sorted({t for t in types if t not in _TYPES})
    if unknown:
        load_plugins()
        unknown = [t for t in unknown if t not in _TYPES]
    if unknown:
        raise FormatError(
            f"unknown recipient type(s) {unknown} in header: written by a newer encfs, or for a key "
            "provider plug-in that is not installed here (docs/KEYS.md)"
        )


def check_per_header(types: Iterable[str], error: type[Exception] = FormatError, noun: str = "stanza") -> None:
    """The per-header limits (``max_per_header``; at most one ``passphrase``, docs/FORMAT.md
    §1.2), for the types of a header's stanzas or of the recipients about to write one.
    ``error`` is what the caller's users expect: ``FormatError`` for a header being sealed or
    opened, ``KeyReferenceError`` for configured recipients (``noun="recipient"``)."""
    counts: dict[str, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    if counts and all(t in _TYPES and not _TYPES[t].classes for t in counts):
        raise error("a header needs at least one recipient stanza besides its signatures (docs/FORMAT.md §1.5)")
    for t, n in counts.items():
        rtype = _TYPES.get(t)
        limit = rtype.max_per_header if rtype is not None else None
        if limit is not None and n > limit:
            most, s = ("one", "") if limit == 1 else (str(limit), "s")
            raise error(f"more than {most} {t} {noun}{s}: a header holds at most {most} {t} stanza{s} (docs/FORMAT.md §1.2, §1.5)")
