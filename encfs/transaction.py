"""``fs.transaction`` for encfs: files written inside it appear when it ends, in the order
they were opened. Commits are not atomic across files (no filesystem offers that): when one
fails, the files committed before it stay, it and every later file are discarded (no
temporary is left), and ``TransactionError`` says which is which."""

from __future__ import annotations

from typing import Any

from fsspec.transaction import Transaction

from .errors import TransactionError


class EncTransaction(Transaction):
    def complete(self, commit: bool = True) -> None:
        committed: list[str] = []
        failure: BaseException | None = None
        failed_path = ""
        try:
            while self.files:
                f = self.files.popleft()
                if failure is None and commit:
                    try:
                        f.commit()
                        committed.append(_path(f))
                        continue
                    except BaseException as e:
                        failure, failed_path = e, _path(f)
                _discard(f)
        finally:
            if self.fs is not None:
                self.fs._intrans = False
                self.fs._transaction = None
            self.fs = None
        if failure is not None:
            raise TransactionError(
                f"transaction failed committing {failed_path}: {failure}; committed before it: "
                f"{committed or 'none'}; it and the files after it were discarded",
                committed=committed,
                failed=failed_path,
            ) from failure


def _path(f: Any) -> str:
    return str(getattr(f, "path", f))


def _discard(f: Any) -> None:
    try:
        f.discard()
    except Exception:
        pass
