"""One seed for every randomised test, printed so a failure can be replayed.

    PYOVERLAY_TEST_SEED=1234 .venv/bin/pytest tests/e2e/test_faults.py

Without the variable a run picks a fresh seed (CI: a fixed one, so a red run
is the same run each time). The seed is printed to stdout, which pytest shows
with a failing test's output (and always with -s).
"""

from __future__ import annotations

import os
import random
import time

ENV = "PYOVERLAY_TEST_SEED"


def _pick() -> int:
    if os.environ.get(ENV):
        return int(os.environ[ENV])
    if os.environ.get("CI"):
        return 0
    return time.time_ns() % 2**32


SEED = _pick()


def rng(test: str) -> random.Random:
    """A generator for one test: replayable from the printed seed alone."""
    print(f"[seed] {test}: {ENV}={SEED}")
    return random.Random(f"{SEED}:{test}")


def announce(test: str) -> int:
    print(f"[seed] {test}: {ENV}={SEED}")
    return SEED
