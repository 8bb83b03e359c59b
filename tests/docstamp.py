"""Stamps on measured figures: each section of docs/benchmarks.md, and
docs/reliability.md as a whole, carries the commit it was measured at and the
files whose change would move its figures, on one line:

    measured at: 908fe53 · covers: driver/network.py driver/store/

tests/test_docs_fresh.py fails when a covered file changed after that commit
(`git log COMMIT..HEAD -- FILES`), or when a section's prose quotes a figure
none of its tables holds. After re-measuring a section, stamp it:

    scripts/stamp-docs SECTION COMMIT      # e.g. scripts/stamp-docs latency 1a2b3c4
    scripts/stamp-docs --list              # the sections, their stamps, how to re-measure each

bench/run writes the stamp of each section it measured at a clean commit, and
tests/reliability_report.py stamps docs/reliability.md: re-running them re-stamps.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS, RELIABILITY = "docs/benchmarks.md", "docs/reliability.md"
STAMP = re.compile(r"^measured at: (?P<commit>\S+) · covers: (?P<files>.+)$", re.M)

# What moves each figure: the request path, the kernel layer, the store, and the bench itself.
_REQUEST = ["plugin/app.py", "plugin/schemas.py", "plugin/server.py", "driver/network.py", "driver/ipam.py",
            "driver/blocks.py", "driver/state.py", "driver/model.py", "driver/store/", "driver/dataplane/"]
_PEERS = ["driver/peersync.py", "driver/dataplane/", "driver/network.py", "driver/store/"]
# The etcd backend alone, for the runs that use no other store (a new backend changes none of their figures).
_ETCD = ["driver/store/base.py", "driver/store/etcd.py", "driver/store/etcd_watch.py", "driver/store/follow.py"]
_DNS = ["driver/dns/", "driver/names.py", "driver/namepub.py", "driver/events.py", "driver/dataplane/dnsplane.py",
        "driver/dnslisteners.py"]


@dataclass(frozen=True)
class Section:
    key: str  # what scripts/stamp-docs calls it
    doc: str
    heading: str  # the start of its "## " heading ("" for the whole document)
    covers: tuple[str, ...]
    rerun: str  # how to measure it again

    def stamp_line(self, commit: str) -> str:
        return f"measured at: {commit} · covers: {' '.join(self.covers)}"


def _bench(key: str, heading: str, covers: list[str], rerun: str = "") -> Section:
    return Section(key, BENCHMARKS, heading, tuple(covers + [f"bench/{key}.py"]),
                   rerun or f"bench/run --only {key}")


SECTIONS = [
    _bench("latency", "Socket latency", _REQUEST + ["bench/calls.py"]),
    _bench("dockerrun", "docker run on a pyoverlay network", _REQUEST + ["driver/catalog/", "driver/events.py"]),
    _bench("convergence", "Convergence", _PEERS + ["plugin/app.py", "plugin/schemas.py"]),
    _bench("throughput", "Throughput", ["driver/dataplane/"]),
    _bench("swarm", "Side by side with Docker's swarm overlay", _REQUEST + ["bench/throughput.py"]),
    _bench("encrypted", "Encrypted overlay", ["driver/dataplane/", "driver/encryption.py", "driver/keys.py",
                                              "bench/throughput.py"]),
    _bench("scale", "Scale without Docker", _PEERS + ["driver/ipam.py", "driver/blocks.py", "plugin/server.py"]),
    _bench("dns", "Names across hosts", _DNS),
    _bench("ipamscale", "Cluster IPAM at scale", ["driver/ipam.py", "driver/blocks.py", "driver/state.py"] + _ETCD,
           ".venv/bin/python -m bench.ipamscale --hosts 20,100 --endpoints 100,20 (then edit the table by hand)"),
    _bench("dns_resolver", "Cluster resolver (DNS), resolver alone", ["driver/dns/"],
           ".venv/bin/python -m bench.dns_resolver (then edit the table by hand)"),
    _bench("etcdclient", "etcd clients", ["driver/store/etcd.py", "driver/store/etcd_watch.py", "driver/store/follow.py"],
           ".venv/bin/python -m bench.etcdclient --write"),
    Section("reliability", RELIABILITY, "", ("driver/", "plugin/", "tests/reliability.py", "tests/soak.py",
                                             "tests/test_fuzz.py", "tests/test_isolation.py", "tests/e2e/test_isolation.py",
                                             "tests/e2e/test_faults.py", "tests/e2e/test_concurrency.py",
                                             "tests/test_sqlite_trouble.py", "tests/store/test_etcd_auth.py",
                                             "tests/e2e/test_soak.py"),  # tests/reliability_report.py's TESTS
            ".venv/bin/python -m tests.reliability_report (stamps itself)"),
]
#: Sections without figures of their own, exempt from stamps.
UNSTAMPED = ("Summary",)  # bench/run's headlines, copied from the sections below it


def by_key(key: str) -> Section:
    for s in SECTIONS:
        if s.key == key:
            return s
    raise KeyError(f"no section {key!r}; sections: {', '.join(s.key for s in SECTIONS)}")


def split_sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) for each '## ' section; what comes before the first is ("", preamble)."""
    parts = re.split(r"^## (.*)$", text, flags=re.M)
    out = [("", parts[0])]
    out += [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts), 2)]
    return out


def section_text(section: Section, text: str) -> str | None:
    if not section.heading:
        return text
    for heading, body in split_sections(text):
        if heading.startswith(section.heading):
            return body
    return None


def read_stamp(body: str) -> tuple[str, list[str]] | None:
    m = STAMP.search(body)
    return (m["commit"], m["files"].split()) if m else None


def stamp(section: Section, commit: str, root: Path = ROOT) -> None:
    """Write the section's stamp line: in place of its old one, else right under its heading."""
    path = root / section.doc
    text = path.read_text()
    line = section.stamp_line(commit)
    if not section.heading:
        body_start, body_end = 0, len(text)
    else:
        m = re.search(r"^## " + re.escape(section.heading) + r".*\n", text, re.M)
        if m is None:
            raise SystemExit(f"{section.doc}: no section headed '## {section.heading}'")
        body_start = m.end()
        nxt = re.search(r"^## ", text[body_start:], re.M)
        body_end = body_start + nxt.start() if nxt else len(text)
    body = text[body_start:body_end]
    if STAMP.search(body):
        body = STAMP.sub(line.replace("\\", "\\\\"), body, count=1)
    elif section.heading:
        body = f"\n{line}\n" + body
    else:
        body = body.replace("\n\n", f"\n\n{line}\n\n", 1)
    path.write_text(text[:body_start] + body + text[body_end:])


def git(*args: str, root: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def history_problem(root: Path = ROOT) -> str:
    """Why the commit history cannot be read here ("" if it can)."""
    inside = git("rev-parse", "--is-inside-work-tree", root=root)
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        return f"{root} is not a git checkout: the stamps cannot be checked without its history"
    if git("rev-parse", "--is-shallow-repository", root=root).stdout.strip() == "true":
        return (f"{root} is a shallow clone: the stamps' commits may be missing; "
                "clone with history (git fetch --unshallow)")
    return ""


def changed_since(commit: str, files: list[str], root: Path = ROOT) -> list[str] | str:
    """Commits after `commit` that touch `files` (one line each); a str says why it cannot tell."""
    if git("cat-file", "-e", f"{commit}^{{commit}}", root=root).returncode != 0:
        return f"commit {commit} is not in this checkout's history"
    out = git("log", "--format=%h %s", f"{commit}..HEAD", "--", *files, root=root)
    if out.returncode != 0:
        return out.stderr.strip()
    return out.stdout.splitlines()


# -- figures quoted in prose -------------------------------------------------------

_UNIT = r"(?:ms|us|s|MB|kB|Gbit/s|%|x)"
_FIGURE = re.compile(r"\*\*(\d+(?:\.\d+)?)|(?<![\w.\-/])(\d+(?:\.\d+)?)\s?" + _UNIT + r"(?![\w/])")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")
#: Lines a benchmark or the report writes about the run itself (command, date, load, machine).
_META = ("`", "Machine:", "Commit ", "Generated by", "measured at:", "<!--")


_GOAL = re.compile(r"(goal|under|<|>)\W*$", re.I)


def hand_written(text: str) -> str:
    """The text without the sections bench/run writes (between its markers): those
    are written from the same run as their tables."""
    return re.sub(r"<!-- bench:(\w+) begin -->.*?<!-- bench:\1 end -->", "", text, flags=re.S)


def prose_figures(body: str) -> list[tuple[str, str]]:
    """(figure, its line) for every figure quoted outside tables: a number with a
    unit (ms, s, MB, Gbit/s, %, x) or in bold; not a goal ("goal under 50 ms",
    "< 2 ms", "the 100 MB goal")."""
    found = []
    for line in body.splitlines():
        s = line.strip()
        if not s or s.startswith("|") or s.startswith(_META):
            continue
        s = re.sub(r"`[^`]*`", "", s)  # commands
        for m in _FIGURE.finditer(s):
            if _GOAL.search(s[max(0, m.start() - 12):m.start()]) or s[m.end():].lstrip().startswith("goal"):
                continue
            found.append((m[1] or m[2], line.strip()))
    return found


def table_numbers(body: str) -> list[str]:
    return [n for line in body.splitlines() if line.strip().startswith("|") for n in _NUMBER.findall(line)]


def held(figure: str, numbers: list[str]) -> bool:
    """A table number equal to the figure at the figure's precision (12.19 holds 12.2)."""
    places = len(figure.split(".")[1]) if "." in figure else 0
    return any(round(float(n), places) == float(figure) for n in numbers)


def unheld_figures(body: str) -> list[tuple[str, str]]:
    numbers = table_numbers(body)
    return [(f, line) for f, line in prose_figures(body) if not held(f, numbers)]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "--list":
        for s in SECTIONS:
            body = section_text(s, (ROOT / s.doc).read_text())
            st = read_stamp(body or "")
            print(f"{s.key:13} {s.doc:20} {'measured at ' + st[0] if st else 'NOT STAMPED':22} re-measure: {s.rerun}")
        return 0
    if len(argv) != 2:
        print("usage: scripts/stamp-docs SECTION COMMIT | --list", file=sys.stderr)
        return 2
    section, commit = by_key(argv[0]), argv[1]
    full = git("rev-parse", "--short", f"{commit}^{{commit}}")
    if full.returncode != 0:
        print(f"stamp-docs: {commit} is not a commit here", file=sys.stderr)
        return 2
    stamp(section, full.stdout.strip())
    print(f"{section.doc}: {section.key} stamped at {full.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
