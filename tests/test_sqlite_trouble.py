"""The embedded store (SQLite) under trouble, through the real `pyoverlay serve`.

- A damaged state.db: the plugin starts all the same and serves its socket
  (a service manager would otherwise restart it in a loop); every call that
  needs the store answers with an error naming the file and what to do;
  once the file is moved aside, as the message says, calls work again.
- A full disk (state.db on a 1 MiB tmpfs filled by the test): the refused
  call says the disk is full and where, and writes nothing; once there is
  room the same call works, with no restart.
- SIGKILL during writes, cycle after cycle: every write the plugin
  acknowledged is in the file, and the file passes SQLite's integrity check.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from itertools import count
from pathlib import Path

import pytest

from driver.state import pool_key
from tests.conftest import HostNamespace
from tests.hosts import wait_for
from tests.reliability import record
from tests.seed import rng as seeded
from tests.test_fuzz import ServedPlugin

KILL_CYCLES = int(os.environ.get("PYO_SQLITE_KILL_CYCLES", "8"))


@pytest.fixture
def lab():
    host = HostNamespace()
    workdir = Path(tempfile.mkdtemp(prefix="pyo-sqlite-"))
    plugins: list[ServedPlugin] = []

    def start(db: Path | None = None) -> ServedPlugin:
        plugin = ServedPlugin(host, workdir, db=db)
        plugins.append(plugin)
        return plugin

    try:
        yield workdir, start
    finally:
        for plugin in plugins:
            if plugin.proc.poll() is None or not plugin.log.closed:
                plugin.stop()
        host.remove()
        for entry in (workdir / "netns").iterdir() if (workdir / "netns").exists() else ():
            subprocess.run(["umount", "-l", str(entry)], capture_output=True)
        subprocess.run(["umount", "-l", str(workdir / "small")], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


def call(plugin: ServedPlugin, method: str, body: dict) -> dict:
    status, text = plugin.request(method, json.dumps(body).encode())
    assert status == 200, (status, text)  # IPAM: refusals are a 200 with "Error" (plugin/app.py)
    return json.loads(text)


def pool(subnet: str) -> dict:
    return {"AddressSpace": "pyoverlay", "Pool": subnet}


def test_damaged_state_db_is_named_with_what_to_do_and_never_a_crash_loop(lab):
    workdir, start = lab
    db = workdir / "state.db"
    db.write_bytes(b"this is not a database, it was damaged " * 2000)
    plugin = start()  # waits for Plugin.Activate: the socket is served
    pid = plugin.proc.pid
    for _ in range(3):
        answer = call(plugin, "IpamDriver.RequestPool", pool("10.80.0.0/24"))
        message = answer.get("Error", "")
        assert str(db) in message and "damaged" in message and f"mv {db}" in message, answer
    status, text = plugin.request("NetworkDriver.GetCapabilities", b"")
    assert status == 200, text  # calls that need no store still work
    assert plugin.proc.poll() is None and plugin.proc.pid == pid, f"the plugin exited:\n{plugin.log_text()}"
    # What the message says to do; a restart is not needed for the plugin to see it.
    db.rename(db.with_suffix(".db.damaged"))
    assert "PoolID" in call(plugin, "IpamDriver.RequestPool", pool("10.80.0.0/24"))
    record("embedded store: damaged state.db", did="state.db overwritten with garbage, then `pyoverlay serve`",
           held="the plugin started and served its socket; calls answered with an error naming the file and "
                "'move it aside'; after the file was moved aside the next call worked, same process",
           restarts=0)


def fill(path: Path) -> None:
    """Write zeros to path until the filesystem has no room left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 512):  # then a smaller tail, so not even a page is left
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


def test_full_disk_is_named_and_writes_nothing_then_recovers_by_itself(lab):
    workdir, start = lab
    small = workdir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    db, filler = small / "state.db", small / "filler"
    fill(filler)
    plugin = start(db=db)  # starts with no room for the file at all
    answer = call(plugin, "IpamDriver.RequestPool", pool("10.81.0.0/24"))
    assert str(db) in answer.get("Error", "") and "full" in answer["Error"], answer
    filler.unlink()
    assert call(plugin, "IpamDriver.RequestPool", pool("10.81.0.0/24"))["PoolID"] == "10.81.0.0/24"
    before = plugin.store_keys()

    fill(filler)  # full while running
    refused = 0
    for n in range(2, 6):
        answer = call(plugin, "IpamDriver.RequestPool", pool(f"10.81.{n}.0/24"))
        if "Error" in answer:
            refused += 1
            assert str(db) in answer["Error"] and "full" in answer["Error"] and "free space" in answer["Error"], answer
    assert refused, "every write went through on a full disk?"
    filler.unlink()
    after = plugin.store_keys()
    assert set(before) <= set(after), "a full disk lost records"
    # Whatever was refused left nothing; whatever was acknowledged is there.
    for n in range(2, 6):
        subnet = f"10.81.{n}.0/24"
        answer = call(plugin, "IpamDriver.RequestPool", pool(subnet))
        assert answer.get("PoolID") == subnet or "already used" in answer.get("Error", ""), answer
    assert plugin.proc.poll() is None, f"the plugin exited:\n{plugin.log_text()}"
    record("embedded store: full disk", did="state.db on a 1 MiB tmpfs filled up, before the plugin started and "
           "while it ran; RequestPool calls meanwhile; then the space freed",
           held=f"{refused + 1} calls refused naming the file and 'the disk is full'; no record lost; after the "
                "space was freed the same calls worked, with no restart", refused=refused + 1)


def test_sigkill_during_writes_loses_no_acknowledged_write(lab):
    workdir, start = lab
    rng = seeded("test_sigkill_during_writes_loses_no_acknowledged_write")
    subnets = (f"10.{82 + n // 256}.{n % 256}.0/24" for n in count())
    acked: set[str] = set()
    acked_lock = threading.Lock()
    kills_mid_flight = 0
    for cycle in range(KILL_CYCLES):
        plugin = start()
        stop = threading.Event()
        in_flight = [0]

        def writer():
            while not stop.is_set():
                with acked_lock:
                    subnet = next(subnets)
                    in_flight[0] += 1
                try:
                    status, text = plugin.request("IpamDriver.RequestPool", json.dumps(pool(subnet)).encode())
                except (OSError, http.client.HTTPException):
                    return  # killed under us: not acknowledged
                finally:
                    with acked_lock:
                        in_flight[0] -= 1
                if status == 200 and json.loads(text).get("PoolID") == subnet:
                    with acked_lock:
                        acked.add(subnet)

        threads = [threading.Thread(target=writer) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(acked) > 0, 10, "the first acknowledged write")
        time.sleep(rng.uniform(0.05, 0.4))  # the random kill point itself, not a wait for a condition
        with acked_lock:
            kills_mid_flight += in_flight[0] > 0
        plugin.stop()  # SIGKILL to the whole process group
        stop.set()
        for t in threads:
            t.join(30)
        db = sqlite3.connect(f"file:{plugin.db}?mode=ro", uri=True)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok", f"cycle {cycle}: damaged"
            keys = {k for (k,) in db.execute("SELECT key FROM kv")}
        finally:
            db.close()
        lost = sorted(s for s in acked if pool_key(s) not in keys)
        assert not lost, f"cycle {cycle}: acknowledged writes lost after SIGKILL: {lost[:10]}"
    plugin = start()
    assert "Address" in call(plugin, "IpamDriver.RequestAddress", {"PoolID": sorted(acked)[0], "Address": ""})
    record("embedded store: SIGKILL during writes", did=f"{KILL_CYCLES} cycles of 4 threads writing pools through "
           f"`pyoverlay serve` and a SIGKILL at a random moment ({kills_mid_flight} with calls in flight)",
           held=f"all {len(acked)} acknowledged writes in state.db after every kill; integrity check ok; the "
                "plugin started on the file each time", cycles=KILL_CYCLES, acknowledged=len(acked), lost=0)
