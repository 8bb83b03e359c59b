"""etcd clients side by side (issue 12, item 7): pyoverlay's own client of
etcd's v3 JSON gateway (driver/store/etcd.py) against etcd3gw, the
maintained client of the same gateway, on one real etcd.

    .venv/bin/python -m bench.etcdclient [--quick] [--write]   # or bench/run --only etcdclient

Each operation is timed for both clients in the same loop, alternating which
goes first, so drift in machine load hits both alike: get, put, a
compare-and-set txn (compare on mod_revision), a range of 1000 keys, and a
watch event (from the start of a put by a third client until the watching
client hands the event over). Then two behaviours the follow loop
(driver/store/follow.py) relies on: a watch from a compacted revision, and a
watch across an etcd restart.

etcd3gw is installed only for this: `.venv/bin/pip install -e '.[bench]'`.
The etcd is the tests' (tests/etcdserver.py) on free loopback ports, so no
e2e lock is needed when run on its own.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import queue
import sys
import threading
import time
from typing import Callable, Optional
from urllib.parse import urlsplit

import requests

from bench.stats import fmt, ratio, summary
from driver.store.base import Compacted, StoreError
from driver.store.etcd import REQUEST_TIMEOUT, EtcdStore
from driver.store.follow import follow
from tests.etcdserver import EtcdServer

NAME = "etcdclient"
TITLE = "etcd clients: pyoverlay's own against etcd3gw"
OPS = ["get", "put", "txn CAS", "range 1000 keys", "watch event"]
PREFIX = "/pyo-bench/"
RANGE_KEYS = 1000


def _b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


def _etcd3gw():
    try:
        import etcd3gw
    except ImportError:
        sys.exit("bench.etcdclient needs etcd3gw: .venv/bin/pip install -e '.[bench]'")
    return etcd3gw


class Ours:
    """pyoverlay's EtcdStore, as the driver uses it."""

    name = "pyoverlay"

    def __init__(self, endpoint: str):
        self.store = EtcdStore([endpoint], prefix=PREFIX)

    def get(self, key: str) -> int:
        return self.store.get(key).mod_revision

    def put(self, key: str, value: str) -> None:
        self.store.put(key, value)

    def cas(self, key: str, rev: int, value: str) -> bool:
        return self.store.txn({key: rev}, put={key: value})

    def range(self, prefix: str) -> int:
        kvs, _revision = self.store.list(prefix)
        return len(kvs)

    def watch(self, prefix: str, start: int, stop: threading.Event, out: queue.Queue) -> None:
        """The follow loop (what the driver runs): events and errors go to out."""
        def on_events(batch):
            now = time.perf_counter()
            for e in batch:
                out.put((now, e.value))
        def on_snapshot(kvs, revision):  # the values already there count as delivered too
            now = time.perf_counter()
            for kv in kvs:
                out.put((now, kv.value))
        follow(self.store, prefix, stop, on_snapshot, on_events,
               on_error=lambda exc: out.put((time.perf_counter(), exc)))

    def close(self) -> None:
        self.store.close()


class Theirs:
    """etcd3gw's Etcd3Client, through its public API (one host: it has no list of endpoints)."""

    def __init__(self, endpoint: str, default_session: bool = False):
        url = urlsplit(endpoint)
        # As pyoverlay would use it: a session that ignores proxy and .netrc
        # settings from the environment (they must not sit between us and
        # etcd, and looking them up costs every request ~0.3 ms). etcd3gw's
        # own default session looks them up: measured too, as "default".
        session = None
        if not default_session:
            session = requests.Session()
            session.trust_env = False
        self.name = "etcd3gw default" if default_session else "etcd3gw"
        self.client = _etcd3gw().client(host=url.hostname, port=url.port, protocol=url.scheme,
                                        timeout=REQUEST_TIMEOUT, session=session)
        self._cancels: list[Callable[[], None]] = []

    def get(self, key: str) -> int:
        # metadata=True: the driver needs mod_revision, not just the value.
        (_value, meta), = self.client.get(PREFIX + key, metadata=True)
        return int(meta["mod_revision"])

    def put(self, key: str, value: str) -> None:
        self.client.put(PREFIX + key, value)

    def cas(self, key: str, rev: int, value: str) -> bool:
        k = _b64(PREFIX + key)
        txn = {"compare": [{"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": str(rev)}],
               "success": [{"request_put": {"key": k, "value": _b64(value)}}], "failure": []}
        return bool(self.client.transaction(txn).get("succeeded"))

    def range(self, prefix: str) -> int:
        # get_prefix returns (value, metadata) pairs without the response's
        # revision, which the follow loop needs to start its watch from.
        return len(self.client.get_prefix(PREFIX + prefix))

    def watch(self, prefix: str, start: int, stop: threading.Event, out: queue.Queue) -> None:
        """watch_prefix's iterator: etcd3gw has no resume loop, and raises nothing into it."""
        events, cancel = self.client.watch_prefix(PREFIX + prefix, start_revision=start)
        self._cancels.append(cancel)
        threading.Thread(target=lambda: (stop.wait(), cancel()), daemon=True).start()
        try:
            for ev in events:
                out.put((time.perf_counter(), ev["kv"].get("value", b"").decode()))
        except Exception as e:  # never seen: its reader thread swallows errors
            out.put((time.perf_counter(), e))

    def close(self) -> None:
        for cancel in self._cancels:
            cancel()
        self.client.session.close()


def _watcher(client, prefix: str, start: int) -> tuple[threading.Event, queue.Queue]:
    stop, out = threading.Event(), queue.Queue()
    threading.Thread(target=client.watch, args=(prefix, start, stop, out), daemon=True,
                     name=f"watch-{client.name}").start()
    return stop, out


def _await(out: queue.Queue, value: str, timeout: float) -> Optional[float]:
    """When value arrived (perf_counter), None if it did not within timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            t, got = out.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if got == value:
            return t


def measure(etcd: EtcdServer, n: int, n_range: int, warm: int, log) -> dict[str, dict[str, list[float]]]:
    clients = [Ours(etcd.endpoint), Theirs(etcd.endpoint), Theirs(etcd.endpoint, default_session=True)]
    writer = EtcdStore([etcd.endpoint], prefix=PREFIX)  # a client of its own makes the watched puts
    stops = []
    samples = {c.name: {op: [] for op in OPS} for c in clients}
    try:
        for c in clients:
            writer.put(f"{c.name}/k", "0")
        log(f"etcdclient: writing {RANGE_KEYS} keys for the range")
        for i in range(0, RANGE_KEYS, 100):
            writer.txn({}, put={f"range/{j:04d}": f"value {j}" for j in range(i, i + 100)})
        watches = {}
        for c in clients:
            rev = writer.put(f"w-{c.name}/k", "start")
            stop, out = _watcher(c, f"w-{c.name}/", rev + 1)
            stops.append(stop)
            watches[c.name] = out
        for c in clients:  # each watch delivers before the first timed put
            writer.put(f"w-{c.name}/k", "ready")
            if _await(watches[c.name], "ready", 5.0) is None:
                raise RuntimeError(f"{c.name}: the watch did not start within 5 s")

        def timed(c, op: str, i: int) -> float:
            key = f"{c.name}/k"
            if op == "get":
                t0 = time.perf_counter()
                c.get(key)
            elif op == "put":
                t0 = time.perf_counter()
                c.put(key, f"v{i}")
            elif op == "txn CAS":
                rev = c.get(key)
                t0 = time.perf_counter()
                if not c.cas(key, rev, f"c{i}"):
                    raise RuntimeError(f"{c.name}: a compare-and-set on an unchanged key failed")
            elif op == "range 1000 keys":
                t0 = time.perf_counter()
                got = c.range("range/")
                if got != RANGE_KEYS:
                    raise RuntimeError(f"{c.name}: range returned {got} keys, not {RANGE_KEYS}")
            else:
                value = f"e{i}"
                t0 = time.perf_counter()
                writer.put(f"w-{c.name}/k", value)
                arrived = _await(watches[c.name], value, 5.0)
                if arrived is None:
                    raise RuntimeError(f"{c.name}: watch event {value} did not arrive within 5 s")
                return (arrived - t0) * 1000
            return (time.perf_counter() - t0) * 1000

        for op in OPS:
            reps = n_range if op.startswith("range") else n
            log(f"etcdclient: {op}: {warm} warm-up + {reps} per client, taking turns to go first")
            for i in range(warm + reps):
                for c in clients[i % len(clients):] + clients[:i % len(clients)]:  # each goes first in turn
                    ms = timed(c, op, i)
                    if i >= warm:
                        samples[c.name][op].append(ms)
    finally:
        for stop in stops:
            stop.set()
        for c in clients:
            c.close()
        writer.close()
    return samples


def probe_compacted(etcd: EtcdServer, wait: float) -> dict[str, str]:
    """A watch from a revision etcd has compacted away."""
    writer = EtcdStore([etcd.endpoint], prefix=PREFIX)
    first = writer.put("compact/k", "1")
    writer.put("compact/k", "2")
    last = writer.put("compact/k", "3")
    writer.compact(last)
    found = {}
    for c in (Ours(etcd.endpoint), Theirs(etcd.endpoint)):
        if isinstance(c, Ours):  # the store's own watch: follow() answers Compacted with a fresh list
            stop, out = threading.Event(), queue.Queue()

            def run(c=c, stop=stop, out=out):
                try:
                    for batch in c.store.watch("compact/", first, stop):
                        out.put((time.perf_counter(), batch))
                except Exception as e:
                    out.put((time.perf_counter(), e))
            threading.Thread(target=run, daemon=True).start()
        else:
            stop, out = _watcher(c, "compact/", first)
        t0 = time.perf_counter()
        try:
            t, got = out.get(timeout=wait)
            if isinstance(got, Compacted):
                found[c.name] = f"raises Compacted after {(t - t0) * 1000:.0f} ms (follow() lists again)"
            else:
                found[c.name] = f"delivers {got!r}"
        except queue.Empty:
            found[c.name] = f"nothing: no event, no error within {wait:g} s"
        stop.set()
        c.close()
    writer.close()
    return found


def probe_restart(etcd: EtcdServer, wait: float) -> dict[str, str]:
    """A watch across an etcd restart: is a put made after it delivered?"""
    writer = EtcdStore([etcd.endpoint], prefix=PREFIX)
    rev = writer.put("restart/k", "before")
    clients = [Ours(etcd.endpoint), Theirs(etcd.endpoint)]
    watches = {c.name: _watcher(c, "restart/", rev + 1) for c in clients}
    writer.put("restart/k", "ready")
    for c in clients:
        if _await(watches[c.name][1], "ready", 5.0) is None:
            raise RuntimeError(f"{c.name}: watch did not deliver before the restart")
    etcd.restart()
    t0 = time.perf_counter()
    writer.put("restart/k", "after")
    found = {}
    for c in clients:
        stop, out = watches[c.name]
        errors = []
        deadline = time.monotonic() + wait
        result = None
        while result is None:
            try:
                t, got = out.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if isinstance(got, Exception):
                errors.append(type(got).__name__)
            elif got == "after":
                result = f"delivered {(t - t0) * 1000:.0f} ms after the put"
        said = f" (reported {', '.join(sorted(set(errors)))} on the way)" if errors else ""
        found[c.name] = (result or f"nothing: no event within {wait:g} s") + said
        stop.set()
        c.close()
    writer.close()
    return found


def report(samples, probes: dict[str, dict[str, str]], n: int, n_range: int, warm: int) -> tuple[str, list]:
    table = {c: {op: summary(v) for op, v in per.items()} for c, per in samples.items()}
    rows = ["| operation | pyoverlay p50 | pyoverlay p99 | etcd3gw p50 | etcd3gw p99 | etcd3gw / pyoverlay p50 | p99 "
            "| etcd3gw default p50 | p99 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for op in OPS:
        a, b, d = table["pyoverlay"][op], table["etcd3gw"][op], table["etcd3gw default"][op]
        rows.append(f"| {op} | {fmt(a['p50'], 2)} | {fmt(a['p99'], 2)} | {fmt(b['p50'], 2)} | {fmt(b['p99'], 2)} "
                    f"| {fmt(ratio(b['p50'], a['p50']), 2)}x | {fmt(ratio(b['p99'], a['p99']), 2)}x "
                    f"| {fmt(d['p50'], 2)} | {fmt(d['p99'], 2)} |")
    prow = ["| behaviour | pyoverlay | etcd3gw |", "|---|---|---|"]
    for what, found in probes.items():
        prow.append(f"| {what} | {found['pyoverlay']} | {found['etcd3gw']} |")
    md = (
        f"{n} of each operation per client ({n_range} of the range) after {warm} warm-up, the "
        "clients taking turns to go first, on one etcd on loopback; milliseconds. pyoverlay is "
        "`driver/store/etcd.py` (its watch through `follow()`, as the driver runs it), etcd3gw its "
        "`Etcd3Client` (`get(metadata=True)`, `put`, `transaction` with a compare on mod_revision, "
        "`get_prefix`, `watch_prefix`) given a session with `trust_env` off as pyoverlay's own; "
        "\"etcd3gw default\" is the same with etcd3gw's own session, which looks up proxy and "
        ".netrc settings from the environment on every request. A watch event is timed from the "
        "start of a put by a third client until the watching client hands the event over.\n\n" + "\n".join(rows)
        + "\n\n" + "\n".join(prow) + "\n"
    )
    headline = []
    for op in ("get", "watch event"):
        a, b = table["pyoverlay"][op], table["etcd3gw"][op]
        headline.append((f"etcd {op} p50, pyoverlay vs etcd3gw",
                         f"{fmt(a['p50'], 2)} vs {fmt(b['p50'], 2)} ms ({fmt(ratio(b['p50'], a['p50']), 2)}x)",
                         "", None))
    return md, headline


def bench(quick: bool, log) -> dict:
    n, n_range, warm = (100, 20, 10) if quick else (500, 100, 20)
    with EtcdServer() as etcd:
        samples = measure(etcd, n, n_range, warm, log)
        log("etcdclient: probing a watch from a compacted revision")
        probes = {"watch from a compacted revision": probe_compacted(etcd, 3.0)}
        log("etcdclient: probing a watch across an etcd restart")
        probes["watch across an etcd restart, then a put"] = probe_restart(etcd, 5.0)
    md, headline = report(samples, probes, n, n_range, warm)
    return {"name": NAME, "title": TITLE, "markdown": md, "headline": headline, "data": samples}


def run(ctx) -> dict:
    """bench/run's entry: its own etcd on loopback (the shared underlay is not needed)."""
    return bench(ctx.quick, ctx.log)


def main(argv: Optional[list[str]] = None) -> int:
    from bench.main import code_under_test, loadavg, machine_notes, write_doc

    parser = argparse.ArgumentParser(prog="python -m bench.etcdclient", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args(argv)
    _etcd3gw()
    t0, load0 = time.monotonic(), loadavg()
    result = bench(args.quick, lambda msg: print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True))
    result.update(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), seconds=time.monotonic() - t0,
                  load=f"{load0} -> {loadavg()}")
    notes = machine_notes() + "; code: " + code_under_test(None, None)[1]
    print(f"\n{notes}\n\n{result['markdown']}")
    if args.write:
        write_doc([result], ".venv/bin/python -m bench.etcdclient" + (" --quick" if args.quick else ""), notes)
        print("written to docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
