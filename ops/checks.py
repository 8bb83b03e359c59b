"""A doctor check and its verdicts, apart from doctor.py so that the checks in
other modules (doctor_dns.py) import them without importing doctor."""

from __future__ import annotations

from dataclasses import dataclass, field

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass
class Check:
    name: str
    status: str  # OK, WARN, FAIL or SKIP
    summary: str
    details: list[str] = field(default_factory=list)
