#!/usr/bin/env python
"""The long fuzz run: the targets of tests/test_fuzz.py, for as long as asked.

    .venv/bin/python scripts/fuzz.py --seconds 3600              # an hour, seed from the clock
    .venv/bin/python scripts/fuzz.py --examples 200000 --seed 7  # a fixed, repeatable run
    .venv/bin/python scripts/fuzz.py --seconds 600 --hypothesis  # hypothesis-driven instead

Each iteration feeds one input to ``encfs.format.parse_fixed_fields``/``parse`` and to the reader
(``EncFileSystem.open(...).read(n)``/``readinto`` loops and ``cat_file``) under every backend
available (python, native, auto): arbitrary bytes (one iteration in four) or a valid file
mutated by bit flips, overwrites, insertions, deletions, truncations and splices of two
valid files. It stops at the first failure (an untyped exception, bytes that are not the
plaintext, or a modified file that reads without error), prints it with the seed and
iteration that reproduce it (``--seed S --start I --examples 1``), and exits 1; otherwise it
prints the iteration count and exits 0. The pytest run (tests/test_fuzz.py) is the short,
CI-sized version of the same thing.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_fuzz import BACKENDS, Corpus, apply_ops, check_parse, check_read, random_arbitrary, random_ops  # noqa: E402


def backends() -> list[str]:
    try:
        import encfs._native  # noqa: F401
    except ImportError as e:
        print(f"encfs._native not built ({e}): fuzzing the python backend only", file=sys.stderr)
        return ["python"]
    return list(BACKENDS)


def one(corpus: Corpus, rng: random.Random, bks: list[str]) -> None:
    if rng.random() < 0.25:
        blob = random_arbitrary(rng)
    else:
        base, _ = corpus.files[rng.randrange(len(corpus.files))]
        blob = apply_ops(base, random_ops(rng), corpus.files)
    check_parse(blob)
    for b in bks:
        check_read(corpus, blob, b)


def run_random(args: argparse.Namespace, corpus: Corpus, bks: list[str]) -> int:
    deadline = time.monotonic() + args.seconds if args.seconds else None
    i, last_report = args.start, time.monotonic()
    while (args.examples is None or i < args.start + args.examples) and (deadline is None or time.monotonic() < deadline):
        rng = random.Random(f"{args.seed}:{i}")  # each iteration reproducible on its own
        try:
            one(corpus, rng, bks)
        except Exception:
            traceback.print_exc()
            print(f"FAILURE at iteration {i}: reproduce with --seed {args.seed} --start {i} --examples 1", file=sys.stderr)
            print(f"iterations: {i - args.start + 1} (1 failed)")
            return 1
        i += 1
        if time.monotonic() - last_report > 30:
            last_report = time.monotonic()
            print(f"... {i - args.start} iterations", file=sys.stderr, flush=True)
    print(f"iterations: {i - args.start}, failures: 0 (seed {args.seed}, backends {','.join(bks)})")
    return 0


def run_hypothesis(args: argparse.Namespace, corpus: Corpus, bks: list[str]) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.test_fuzz import ops_strategy

    count = [0]
    deadline = time.monotonic() + args.seconds if args.seconds else None

    batch = min(args.examples or 2000, 2000)

    # Runs in batches of ``batch`` examples (a fresh random seed each) until the count or the
    # time is reached: a hypothesis run cannot be stopped cleanly from inside.
    @settings(max_examples=batch, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def target(data):
        count[0] += 1
        if data.draw(st.integers(0, 3)) == 0:
            blob = data.draw(st.binary(max_size=3000))
        else:
            base, _ = corpus.files[data.draw(st.integers(0, len(corpus.files) - 1))]
            blob = apply_ops(base, data.draw(ops_strategy), corpus.files)
        check_parse(blob)
        for b in bks:
            check_read(corpus, blob, b)

    try:
        while (args.examples is None or count[0] < args.examples) and (deadline is None or time.monotonic() < deadline):
            target()
    except Exception:
        traceback.print_exc()
        print(f"iterations: {count[0]} (failed; hypothesis printed the shrunk example above)")
        return 1
    print(f"iterations: {count[0]}, failures: 0 (hypothesis, backends {','.join(bks)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=None, help="stop after this many iterations")
    ap.add_argument("--seconds", type=float, default=None, help="stop after this long (default 60 s when --examples is not given)")
    ap.add_argument("--seed", default=None, help="seed of the random loop (default: from the clock; printed)")
    ap.add_argument("--start", type=int, default=0, help="first iteration number (to replay one)")
    ap.add_argument("--backend", choices=BACKENDS, action="append", help="only these backends (repeatable)")
    ap.add_argument("--hypothesis", action="store_true", help="draw inputs with hypothesis instead of the seeded loop")
    args = ap.parse_args(argv)
    if args.examples is None and args.seconds is None:
        args.seconds = 60.0
    if args.seed is None:
        args.seed = str(time.time_ns())
    bks = args.backend or backends()
    with tempfile.TemporaryDirectory(prefix="encfs-fuzz-") as d:
        # conftest's cheap Argon2 is irrelevant here: the corpus uses key files only.
        os.environ.pop("ENCFS_KEY", None)
        corpus = Corpus(Path(d), backends=bks)
        return run_hypothesis(args, corpus, bks) if args.hypothesis else run_random(args, corpus, bks)


if __name__ == "__main__":
    sys.exit(main())
