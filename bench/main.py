"""bench/run [--quick] [--only NAME[,NAME]] [--no-write]: run the benchmarks,
print a summary table, write the results into docs/benchmarks.md."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

from bench.env import PLUGIN_EXE, EtcdServer, PlainHost, Underlay, UNDERLAY_ADDR, UNDERLAY_NETNS, make_workdir
from tests.hosts import NamespaceHost, SessionLock, build_image_tar, sweep_leftovers

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BENCHES = ["latency", "dockerrun", "convergence", "throughput", "swarm", "encrypted", "scale", "dns", "etcdclient"]


class Context:
    """What a benchmark gets: sizes (quick or full), hosts and etcd on the
    shared underlay, each closed when the benchmark ends, failed or not."""

    def __init__(self, quick: bool, workdir: Path, underlay: Underlay, plugin_exe: str):
        self.quick = quick
        self.plugin_exe = plugin_exe
        self.workdir = workdir
        self.underlay = underlay
        self.stack = contextlib.ExitStack()
        self._image_tar: Optional[Path] = None
        self.t0 = time.monotonic()

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def etcd(self) -> EtcdServer:
        """A fresh etcd on the underlay (10.99.0.254), in its own data dir."""
        server = EtcdServer(UNDERLAY_ADDR, netns=UNDERLAY_NETNS)
        self.stack.callback(server.close)
        server.start()
        return server

    def plain_host(self, index: int, mtu: Optional[int] = None) -> PlainHost:
        host = PlainHost(index, self.underlay, self.workdir, mtu=mtu, plugin_exe=self.plugin_exe)
        self.stack.callback(host.close)
        return host.start()

    @property
    def image_tar(self) -> Path:
        if self._image_tar is None:
            self._image_tar = build_image_tar(self.workdir)
        return self._image_tar

    def docker_host(self, index: int, mtu: Optional[int] = None) -> NamespaceHost:
        host = NamespaceHost(index, self.underlay, self.workdir, self.image_tar, mtu=mtu,
                             plugin_exe=self.plugin_exe)
        self.stack.callback(host.close)
        return host.start()


def machine_notes() -> str:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    model = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        mem = f"{int(open('/proc/meminfo').readline().split()[1]) // 1024 // 1024} GB"
    docker = out(["dockerd", "--version"]).replace("Docker version ", "")
    etcd = out(["etcd", "--version"]).splitlines()[0] if shutil.which("etcd") else "?"
    iperf = out(["iperf3", "--version"]).splitlines()[0] if shutil.which("iperf3") else "?"
    return (f"Linux {platform.release()}, {os.cpu_count()} cores ({model}), {mem} RAM; "
            f"dockerd {docker}; {etcd}; {iperf}; Python {platform.python_version()}")


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


# -- docs/benchmarks.md ---------------------------------------------------------

INTRO = """# Benchmarks

Measured by `bench/run` (all of them, about 10 minutes on 2 cores) or
`bench/run --quick` (small sizes, a few minutes, not written here);
`bench/run --only NAME` runs one of: {names}. Every figure is measured side by
side in one run on this machine: medians and ratios, never single runs, since
these machines are noisy (other sessions' tests may run at the same time: the
load average at the start and end of each benchmark is noted). All traffic
stays on this machine, between network namespaces.

The sections between `bench:` markers are rewritten by `bench/run`; the
analysis at the end ("What moved it") is written by hand from those numbers.
""".format(names=", ".join(BENCHES))


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} begin -->", f"<!-- bench:{name} end -->"


def _replace(doc: str, name: str, body: str) -> str:
    begin, end = _markers(name)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return doc.rstrip() + "\n\n" + block + "\n"


def _headlines(doc: str) -> list[tuple[str, list]]:
    found = []
    for name in BENCHES:
        begin, end = _markers(name)
        if begin in doc and end in doc:
            section = doc.split(begin, 1)[1].split(end, 1)[0]
            for line in section.splitlines():
                if line.startswith("<!-- headline "):
                    found.append((name, json.loads(line[len("<!-- headline "):-len(" -->")])))
    return found


def summary_rows(headlines: list[tuple[str, list]]) -> list[str]:
    rows = ["| benchmark | measure | result | goal | met |", "|---|---|---|---|---|"]
    for name, items in headlines:
        for metric, value, goal, met in items:
            mark = "" if met is None else ("yes" if met else "**no**")
            rows.append(f"| {name} | {metric} | {value} | {goal} | {mark} |")
    return rows


def _stamp_line(name: str, notes: str) -> str:
    """The section's stamp when a clean commit was measured (none for uncommitted code)."""
    import re

    from tests.docstamp import by_key

    m = re.search(r"code: (?:the checkout at|commit) ([0-9a-f]+)($| \(`git archive`\))", notes)
    try:
        return by_key(name).stamp_line(m[1]) if m else ""
    except KeyError:
        return ""


def write_doc(results: list[dict], command: str, notes: str) -> None:
    doc = DOC.read_text() if DOC.exists() else INTRO
    for r in results:
        body = [f"## {r['title']}", "",
                f"`{command}` on {r['date']}, {r['seconds']:.0f} s; load average {r['load']}.  ",
                f"Machine: {notes}", ""]
        stamp = _stamp_line(r["name"], notes) if not r.get("error") else ""
        if stamp:  # tests/docstamp.py: the commit measured and what moves the figures
            body += [stamp, ""]
        if r.get("error"):
            body += ["**The benchmark failed:**", "", "```", r["error"].rstrip(), "```", ""]
        else:
            body += [r["markdown"].rstrip(), ""]
        body.append("<!-- headline " + json.dumps(r.get("headline", [])) + " -->")
        doc = _replace(doc, r["name"], "\n".join(body))
    summary = ["## Summary", "", "The headline of each benchmark's latest full run (details below).", "",
               *summary_rows(_headlines(doc))]
    doc = _replace(doc, "summary", "\n".join(summary))
    # The summary goes right after the intro, before the first benchmark.
    begin, end = _markers("summary")
    block = doc[doc.index(begin):doc.index(end) + len(end)]
    doc = doc.replace(block, "").replace("\n\n\n\n", "\n\n")
    first = min((doc.index(_markers(n)[0]) for n in BENCHES if _markers(n)[0] in doc), default=len(doc))
    doc = doc[:first].rstrip() + "\n\n" + block + "\n\n" + doc[first:].lstrip()
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(doc.rstrip() + "\n")


# -- the code under test --------------------------------------------------------

def code_under_test(commit: Optional[str], workdir: Path) -> tuple[str, str]:
    """(the pyoverlay command to run, what it is). Without commit: this
    checkout as it is. With one: `git archive` of it, run by this venv's
    Python (its dependencies) with the archive first on PYTHONPATH."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    if not commit:
        try:
            rev = git("rev-parse", "--short", "HEAD")
            dirty = git("status", "--porcelain", "--", "plugin", "driver")
        except (OSError, subprocess.CalledProcessError):
            return PLUGIN_EXE, "this checkout (not a git repository)"
        return PLUGIN_EXE, f"the checkout at {rev}" + (" with uncommitted changes in plugin/ or driver/" if dirty else "")
    rev = git("rev-parse", "--short", commit)
    src = workdir / f"src-{rev}"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    exe = workdir / "pyoverlay"
    exe.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={src} exec {sys.executable} -c "
        "'import sys; from plugin.cli import main; sys.argv[0] = \"pyoverlay\"; sys.exit(main())' \"$@\"\n")
    exe.chmod(0o755)
    return str(exe), f"commit {rev} (`git archive`)"


# -- main --------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes in all")
    parser.add_argument("--only", action="append", default=[],
                        help=f"run only these (repeat or comma-separate): {', '.join(BENCHES)}")
    parser.add_argument("--commit", help="benchmark this commit (git archive) instead of the checkout as it is")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--details", action="store_true", help="also print each benchmark's full tables")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md even with --quick")
    args = parser.parse_args(argv)
    only = [n for item in args.only for n in item.split(",") if n]
    unknown = [n for n in only if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    if os.geteuid() != 0:
        parser.error("run as root: the benchmarks make namespaces, engines and etcd servers")
    selected = [n for n in BENCHES if not only or n in only]
    write = (args.write or not args.quick) and not args.no_write
    command = ("bench/run" + (" --quick" if args.quick else "") + "".join(f" --only {n}" for n in only)
               + (f" --commit {args.commit}" if args.commit else ""))
    notes = machine_notes()

    # The e2e harness's session lock is held per benchmark, not for the whole
    # run, so an e2e session waiting for it (10 minutes at most) gets a turn
    # between benchmarks. Each benchmark gets a fresh work directory and
    # underlay: another session's sweep removes pyo-e2e-* leftovers.
    lock = SessionLock(timeout=3600)
    # SIGTERM unwinds like Ctrl-C: every host, engine and etcd is still removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    srcdir = Path(tempfile.mkdtemp(prefix="pyo-bench-src-"))
    results = []
    try:
        plugin_exe, code = code_under_test(args.commit, srcdir)
        notes += f"; code: {code}"
        for name in selected:
            module = importlib.import_module(f"bench.{name}")
            print(f"{name}: waiting for the e2e session lock {lock.path} ...", file=sys.stderr, flush=True)
            lock.acquire()
            try:
                removed = sweep_leftovers()
                if removed:
                    print(f"removed leftovers of an earlier run: {', '.join(removed)}", file=sys.stderr)
                workdir = make_workdir()
                underlay = Underlay(workdir / "underlay")
                ctx = Context(args.quick, workdir, underlay, plugin_exe)
                started, load0 = time.monotonic(), loadavg()
                ctx.log(f"== {name}: {module.TITLE} (load {load0})")
                try:
                    with ctx.stack:
                        ctx.stack.callback(shutil.rmtree, workdir, ignore_errors=True)
                        ctx.stack.callback(underlay.close)
                        underlay.setup()
                        result = module.run(ctx)
                except Exception:
                    result = {"name": name, "title": module.TITLE, "error": traceback.format_exc(),
                              "headline": [("run", "FAILED (see docs/benchmarks.md or stderr)", "", False)]}
                    print(result["error"], file=sys.stderr)
            finally:
                lock.release()
            result.update(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                          seconds=time.monotonic() - started, load=f"{load0} -> {loadavg()}")
            results.append(result)
            ctx.log(f"== {name} done in {result['seconds']:.0f} s")
    finally:
        shutil.rmtree(srcdir, ignore_errors=True)

    print()
    print(f"{command}  ({notes})")
    print()
    width = max((len(m) for r in results for m, *_ in r["headline"]), default=10)
    for r in results:
        for metric, value, goal, met in r["headline"]:
            mark = "" if met is None else ("  [goal met]" if met else "  [GOAL NOT MET]")
            goal_text = f"  (goal {goal})" if goal else ""
            print(f"{r['name']:<12} {metric:<{width}}  {value}{goal_text}{mark}")
    if args.details:
        for r in results:
            print(f"\n## {r['title']}\n\n{r.get('markdown') or r.get('error')}")
    if write:
        write_doc(results, command, notes)
        print(f"\nwritten to {DOC.relative_to(ROOT)}")
    return 1 if any(r.get("error") for r in results) else 0
