"""Figures the hardening tests measure, for docs/reliability.md.

A test calls record("what it checked", did="...", held="...", **numbers).
The lines go to the JSON-lines file named by PYO_RELIABILITY_LOG (set by
`python -m tests.reliability_report`, which runs the tests and writes the
document); without it they are only printed (visible with pytest -s).
"""

from __future__ import annotations

import json
import os
import time

LOG_ENV = "PYO_RELIABILITY_LOG"


def record(test: str, did: str, held: str, **figures) -> None:
    line = {"test": test, "did": did, "held": held, "figures": figures, "at": time.time()}
    print(f"[reliability] {test}: {did} -> {held} {figures}")
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
