"""fsspec's own abstract test suites (``fsspec.tests.abstract``) run against ``EncFileSystem``
over local disk and over memory, as s3fs runs them in ``s3fs/tests/derived/``: the fsspec
semantics of ``cp``, ``get``, ``put``, ``pipe`` and ``open`` (lists, globs, ``recursive``,
``maxdepth``, trailing slashes, exclusive create) are checked by fsspec's authors' tests.

Each target gets its own fixtures (``fs``, ``fs_path``, ``fs_join``); the files the suites
write are encrypted on the target like any other (``test_targets_hold_ciphertext_only``).
"""

from __future__ import annotations

import posixpath
import uuid

import fsspec
import fsspec.tests.abstract as abstract
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from encfs import format as fmt
from encfs.filesystem import EncFileSystem

from .conftest import write_key


@pytest.fixture(scope="module")
def abstract_key(tmp_path_factory) -> str:
    return write_key(tmp_path_factory.mktemp("abstract-key") / "k.key")


class LocalTarget(abstract.AbstractFixtures):
    """``EncFileSystem`` over local disk, rooted in a temporary directory of its own (the
    suites' local side, ``local_path``, is pytest's ``tmpdir``). The target is configured as
    fsspec's own local suite configures ``LocalFileSystem``: ``auto_mkdir=True``."""

    @pytest.fixture
    def fs(self, abstract_key):
        return EncFileSystem(target_protocol="file", target_options={"auto_mkdir": True}, key=abstract_key, skip_instance_cache=True)

    @pytest.fixture
    def fs_path(self, tmp_path_factory):
        return str(tmp_path_factory.mktemp("encfs-local-target"))


class MemoryTarget(abstract.AbstractFixtures):
    """``EncFileSystem`` over fsspec's memory filesystem. Its store is shared by every
    instance, so each test gets a root of its own and removes it afterwards."""

    @pytest.fixture
    def fs(self, abstract_key):
        return EncFileSystem(fs=MemoryFileSystem(skip_instance_cache=True), key=abstract_key, skip_instance_cache=True)

    @pytest.fixture
    def fs_join(self):
        return posixpath.join

    @pytest.fixture
    def fs_path(self, fs):
        root = f"/encfs-abstract-{uuid.uuid4().hex[:12]}"
        yield root
        if fs.fs.exists(root):
            fs.fs.rm(root, recursive=True)


class TestLocalCopy(abstract.AbstractCopyTests, LocalTarget):
    pass


class TestLocalGet(abstract.AbstractGetTests, LocalTarget):
    pass


class TestLocalPut(abstract.AbstractPutTests, LocalTarget):
    pass


class TestLocalPipe(abstract.AbstractPipeTests, LocalTarget):
    pass


class TestLocalOpen(abstract.AbstractOpenTests, LocalTarget):
    pass


class TestMemoryCopy(abstract.AbstractCopyTests, MemoryTarget):
    pass


class TestMemoryGet(abstract.AbstractGetTests, MemoryTarget):
    pass


class TestMemoryPut(abstract.AbstractPutTests, MemoryTarget):
    pass


class TestMemoryPipe(abstract.AbstractPipeTests, MemoryTarget):
    pass


class TestMemoryOpen(abstract.AbstractOpenTests, MemoryTarget):
    pass


@pytest.mark.parametrize("target", ["file", "memory"])
def test_targets_hold_ciphertext_only(target, abstract_key, tmp_path):
    """What the suites write lands on the target encrypted: pipe, put and cp all produce encfs files."""
    inner = fsspec.filesystem("file") if target == "file" else MemoryFileSystem(skip_instance_cache=True)
    fs = EncFileSystem(fs=inner, key=abstract_key, skip_instance_cache=True)
    root = str(tmp_path / "t") if target == "file" else f"/encfs-abstract-{uuid.uuid4().hex[:12]}"
    try:
        fs.pipe(posixpath.join(root, "a"), b"plaintext one")
        (tmp_path / "plain").write_bytes(b"plaintext two")
        fs.put(str(tmp_path / "plain"), posixpath.join(root, "b"))
        fs.cp(posixpath.join(root, "a"), posixpath.join(root, "c"))
        for name, data in (("a", b"plaintext one"), ("b", b"plaintext two"), ("c", b"plaintext one")):
            raw = inner.cat_file(posixpath.join(root, name))
            assert raw[: len(fmt.MAGIC)] == fmt.MAGIC and data not in raw
            assert fs.cat_file(posixpath.join(root, name)) == data
            assert fs.info(posixpath.join(root, name))["size"] == len(data)
    finally:
        if inner.exists(root):
            inner.rm(root, recursive=True)


# The abstract suites reach listing only through cp/get/put. These cases run the rest of
# fsspec's namespace API on EncFileSystem and on its bare target side by side: the answers
# must be the same (names, types, order, plaintext sizes and contents), trailing slashes too.
NAMESPACE_CASES = {
    "ls": lambda fs, j, r: sorted(fs.ls(r, detail=False)),
    "ls trailing slash": lambda fs, j, r: sorted(fs.ls(r + "/", detail=False)),
    "ls detail": lambda fs, j, r: sorted((e["name"], e["type"], e["size"]) for e in fs.ls(j(r, "a"), detail=True) if e["type"] == "file"),
    "ls of a file": lambda fs, j, r: fs.ls(j(r, "a", "x"), detail=False),
    "info of a directory": lambda fs, j, r: [(fs.info(p)["type"], fs.info(p)["name"]) for p in (j(r, "a"), j(r, "a") + "/")],
    "info of a file": lambda fs, j, r: (fs.info(j(r, "a", "x"))["type"], fs.info(j(r, "a", "x"))["size"]),
    "find": lambda fs, j, r: fs.find(r),
    "find withdirs maxdepth": lambda fs, j, r: (fs.find(r, withdirs=True), fs.find(r, maxdepth=1, withdirs=True)),
    "find of a file": lambda fs, j, r: fs.find(j(r, "a", "x")),
    "glob": lambda fs, j, r: [sorted(fs.glob(j(r, p))) for p in ("*", "**", "**/y", "a/")],
    "walk": lambda fs, j, r: [(p, sorted(d), sorted(f)) for p, d, f in fs.walk(r)],
    "du": lambda fs, j, r: (fs.du(r), fs.du(r, total=False)),
    "isdir isfile exists": lambda fs, j, r: [(fs.isdir(p), fs.isfile(p), fs.exists(p)) for p in (j(r, "a"), j(r, "a") + "/", j(r, "a", "x"), j(r, "no"))],
    "cat glob, list, recursive": lambda fs, j, r: (fs.cat(j(r, "a", "*")), fs.cat([j(r, "a", "x"), j(r, "a", "sub", "y")]), fs.cat(j(r, "a"), recursive=True)),
    "cat ranges, head, tail, sizes": lambda fs, j, r: (fs.cat_file(j(r, "a", "x"), 2, 5), fs.head(j(r, "a", "x"), 3), fs.tail(j(r, "a", "x"), 3), fs.sizes([j(r, "a", "x"), j(r, "t")])),
    "text modes": lambda fs, j, r: (fs.write_text(j(r, "w.txt"), "héllo\n"), fs.read_text(j(r, "w.txt")), fs.open(j(r, "w.txt"), "rt").readlines()),
    "touch truncates": lambda fs, j, r: (fs.touch(j(r, "w.txt")), fs.cat(j(r, "w.txt"))),
    "expand_path": lambda fs, j, r: sorted(fs.expand_path(j(r, "a"), recursive=True)),
    "mv a directory": lambda fs, j, r: (fs.mv(j(r, "a", "sub"), j(r, "moved"), recursive=True), fs.find(r)),
    "cp and rm recursive": lambda fs, j, r: (fs.cp(j(r, "a"), j(r, "a2"), recursive=True), fs.find(j(r, "a2")), fs.rm(j(r, "a2"), recursive=True), fs.exists(j(r, "a2"))),
    "rmdir": lambda fs, j, r: (fs.rmdir(j(r, "empty")), fs.exists(j(r, "empty"))),
}


def _outcome(call):
    try:
        return call()
    except Exception as e:  # the same exception type on both sides counts as the same answer
        return type(e).__name__


def _relative(value, root):
    if isinstance(value, str):
        return value.replace(root, "<root>")
    if isinstance(value, (list, tuple)):
        return type(value)(_relative(v, root) for v in value)
    if isinstance(value, dict):
        return {_relative(k, root): _relative(v, root) for k, v in value.items()}
    return value


@pytest.mark.parametrize("target", ["file", "memory"])
@pytest.mark.parametrize("case", list(NAMESPACE_CASES))
def test_namespace_answers_match_the_target(case, target, abstract_key, tmp_path):
    def fresh():
        return fsspec.filesystem("file", auto_mkdir=True) if target == "file" else MemoryFileSystem(skip_instance_cache=True)

    answers = []
    for fs in (EncFileSystem(fs=fresh(), key=abstract_key, skip_instance_cache=True), fresh()):
        root = str(tmp_path / f"r{len(answers)}") if target == "file" else f"/encfs-abstract-{uuid.uuid4().hex[:12]}"
        try:
            fs.pipe({posixpath.join(root, "a", "x"): b"0123456789", posixpath.join(root, "a", "sub", "y"): b"yy"})
            fs.makedirs(posixpath.join(root, "empty"), exist_ok=True)
            fs.touch(posixpath.join(root, "t"))
            answers.append(_relative(_outcome(lambda: NAMESPACE_CASES[case](fs, posixpath.join, root)), root))
        finally:
            inner = fs.fs if isinstance(fs, EncFileSystem) else fs
            if inner.exists(root):
                inner.rm(root, recursive=True)
    encfs_answer, target_answer = answers
    assert encfs_answer == target_answer


def test_cp_makes_parents_and_touch_keeps_ciphertext(tmp_path, keyref):
    """cp into a new directory works as every other encfs write does (local targets need
    no auto_mkdir); touch(truncate=False) on an existing file leaves its ciphertext alone."""
    import os


    from encfs.filesystem import EncFileSystem

    fs = EncFileSystem(target_protocol="file", key=keyref, skip_instance_cache=True)
    fs.pipe_file(f"{tmp_path}/a", b"payload")
    fs.cp_file(f"{tmp_path}/a", f"{tmp_path}/new/dir/b")
    assert fs.cat_file(f"{tmp_path}/new/dir/b") == b"payload"
    before = open(f"{tmp_path}/a", "rb").read()
    old = os.stat(f"{tmp_path}/a").st_mtime - 100
    os.utime(f"{tmp_path}/a", (old, old))
    fs.touch(f"{tmp_path}/a", truncate=False)
    assert open(f"{tmp_path}/a", "rb").read() == before and os.stat(f"{tmp_path}/a").st_mtime > old
    fs.touch(f"{tmp_path}/empty")
    assert fs.cat_file(f"{tmp_path}/empty") == b"" and fs.info(f"{tmp_path}/empty")["size"] == 0
