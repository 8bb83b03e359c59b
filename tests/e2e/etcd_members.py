"""Three-member etcd clusters on the e2e underlay, and what tests do to them
(tests/e2e/test_faults.py: losing one member, losing the quorum, wiping one)."""

from __future__ import annotations

import base64
import threading
from typing import Callable

from tests.etcdserver import EtcdServer, _free_ports
from tests.hosts import UNDERLAY_ADDR

PREFIX = "/pyoverlay/"


def three_members(underlay) -> list[EtcdServer]:
    """A three-member etcd cluster on the underlay (not yet started)."""
    ports = _free_ports("127.0.0.1", 6)
    members = []
    for i in range(3):
        m = EtcdServer(UNDERLAY_ADDR, netns=underlay.netns, name=f"m{i}")
        m.client_port, m.peer_port = ports[2 * i], ports[2 * i + 1]
        members.append(m)
    initial = ",".join(f"m{i}=http://{UNDERLAY_ADDR}:{ports[2 * i + 1]}" for i in range(3))
    for m in members:
        m.extra_args = ("--initial-cluster", initial, "--heartbeat-interval", "100", "--election-timeout", "1000")
    return members


def start_together(members: list[EtcdServer]) -> None:
    starting = [threading.Thread(target=m.start) for m in members]  # each waits for a quorum
    for t in starting:
        t.start()
    for t in starting:
        t.join()
    assert all(m.proc and m.proc.poll() is None for m in members), [m.log_tail() for m in members]


def members_url(members: list[EtcdServer]) -> str:
    return "etcd://" + ",".join(f"{UNDERLAY_ADDR}:{m.client_port}" for m in members)


def reconfigure(member: EtcdServer, op: str, body: dict, done: Callable[[list[dict]], bool]) -> bool:
    """etcd's member remove/add through one member's gateway (what etcdctl
    member remove/add send), unless the member list shows it done already
    (an earlier try whose answer was lost); True once the list shows it."""
    def members() -> list[dict]:
        return member.request("POST", "/v3/cluster/member/list", {}).get("members", [])

    try:
        if not done(members()):
            member.request("POST", f"/v3/cluster/member/{op}", body)
        return done(members())
    except OSError:  # no leader yet: the gateway gives up after our timeout
        return False


def run_keys(member: EtcdServer) -> list[str]:
    """pyoverlay's keys as one member serves them (serializable: its own copy)."""
    try:
        data = member.request("POST", "/v3/kv/range", {"key": base64.b64encode(PREFIX.encode()).decode(),
                              "range_end": base64.b64encode(PREFIX[:-1].encode() + b"0").decode(),
                              "keys_only": True, "serializable": True})
    except OSError:
        return []
    return sorted(base64.b64decode(kv["key"]).decode() for kv in data.get("kvs", []))
