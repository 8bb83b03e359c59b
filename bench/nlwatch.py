"""Watch vxlan0's FDB and neighbour tables in many namespaces at once, from
kernel notifications (what `ip monitor neigh` / `bridge monitor fdb` read).

One raw rtnetlink socket per namespace, subscribed to RTNLGRP_NEIGH, all read
by one thread that stamps each message with time.monotonic() as it arrives.
A socket is created inside its namespace by a short-lived thread that enters
it with setns(2) (which moves only the calling thread), so nothing forks.

Recorded per MAC: when each namespace got a vxlan FDB entry for it (an
AF_BRIDGE RTM_NEWNEIGH carrying NDA_DST, i.e. a remote VTEP) and when the
matching neighbour entry (AF_INET, lladdr = MAC) appeared; likewise removals.
"""

from __future__ import annotations

import ctypes
import errno
import os
import selectors
import socket
import struct
import threading
import time
from collections import defaultdict
from typing import Iterable, Optional

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
RTNLGRP_NEIGH = 3
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NLMSG_HDR = struct.Struct("=IHHII")
NDMSG = struct.Struct("=BxxxiHBB")
RTA = struct.Struct("=HH")
NDA_DST, NDA_LLADDR = 1, 2
AF_BRIDGE = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_in_netns(path: str, make):
    """Call make() with the calling thread inside the network namespace at path."""
    result: dict = {}

    def worker() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                result["value"] = make()
            finally:
                _setns(own)
        except BaseException as exc:  # handed to the caller
            result["error"] = exc
        finally:
            os.close(own)
            os.close(target)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _neigh_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE: bursts of 1,000 peers
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    s.bind((0, 0))
    s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, RTNLGRP_NEIGH)
    s.setblocking(False)
    return s


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def parse(data: bytes) -> Iterable[tuple[str, str, str, Optional[str]]]:
    """(kind, table, mac, dst) per neighbour message: kind 'new'/'del', table
    'fdb' (vxlan FDB entry with a remote) or 'neigh' (an IPv4 neighbour)."""
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size:
            break
        if mtype in (RTM_NEWNEIGH, RTM_DELNEIGH):
            family, _ifindex, _state, _nflags, _ntype = NDMSG.unpack_from(data, off + NLMSG_HDR.size)
            attrs: dict[int, bytes] = {}
            a = off + NLMSG_HDR.size + NDMSG.size
            end = off + length
            while a + RTA.size <= end:
                alen, atype = RTA.unpack_from(data, a)
                if alen < RTA.size:
                    break
                attrs[atype & 0x3FFF] = data[a + RTA.size:a + alen]
                a += (alen + 3) & ~3
            lladdr = attrs.get(NDA_LLADDR)
            kind = "new" if mtype == RTM_NEWNEIGH else "del"
            if lladdr is not None and len(lladdr) == 6:
                dst = attrs.get(NDA_DST)
                if family == AF_BRIDGE and dst is not None:
                    yield kind, "fdb", _mac(lladdr), socket.inet_ntoa(dst) if len(dst) == 4 else None
                elif family == socket.AF_INET and dst is not None:
                    yield kind, "neigh", _mac(lladdr), socket.inet_ntoa(dst)
        off += (length + 3) & ~3


class FdbWatch:
    """seen[(kind, table)][mac][label] = monotonic time of the first such event."""

    def __init__(self):
        self._sel = selectors.DefaultSelector()
        self._cond = threading.Condition()
        self.seen: dict[tuple[str, str], dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        self.overflows: dict[str, int] = defaultdict(int)
        self.events = 0
        self.counts: dict[str, dict[tuple[str, str], int]] = defaultdict(lambda: defaultdict(int))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._socks: dict[str, socket.socket] = {}

    def add(self, label: str, netns_path: str) -> None:
        s = open_in_netns(netns_path, _neigh_socket)
        with self._cond:
            old = self._socks.pop(label, None)
            if old is not None:
                self._sel.unregister(old)
                old.close()
            self._socks[label] = s
            self._sel.register(s, selectors.EVENT_READ, label)

    def start(self) -> "FdbWatch":
        self._thread = threading.Thread(target=self._loop, name="fdb-watch", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            # epoll: add() may register sockets while this waits
            try:
                ready = self._sel.select(0.05)
            except (OSError, ValueError, KeyError):
                continue
            for key, _ in ready:
                label = key.data
                while True:
                    try:
                        data = key.fileobj.recv(1 << 20)
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno == errno.ENOBUFS:
                            self.overflows[label] += 1
                            continue
                        break
                    now = time.monotonic()
                    with self._cond:
                        for kind, table, mac, _dst in parse(data):
                            self.events += 1
                            self.counts[label][(kind, table)] += 1
                            self.seen[(kind, table)][mac].setdefault(label, now)
                        self._cond.notify_all()

    def forget(self, macs: Iterable[str], label: Optional[str] = None) -> None:
        """Drop what was seen of these MACs (in one namespace, or in all)."""
        with self._cond:
            for per_mac in self.seen.values():
                for mac in macs:
                    if label is None:
                        per_mac.pop(mac, None)
                    else:
                        per_mac.get(mac, {}).pop(label, None)

    def counted(self, label: str) -> dict[tuple[str, str], int]:
        with self._cond:
            return dict(self.counts[label])

    def reset(self) -> None:
        with self._cond:
            self.seen.clear()

    def wait(self, mac: str, labels: set[str], kind: str = "new", tables: tuple[str, ...] = ("fdb",),
             timeout: float = 10.0) -> dict[str, dict[str, float]]:
        """Until every label has seen mac in every table (or timeout); returns
        {table: {label: time}} for what was seen."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = {t: {l: v for l, v in self.seen[(kind, t)].get(mac, {}).items() if l in labels}
                       for t in tables}
                if all(len(got[t]) == len(labels) for t in tables):
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return got
                self._cond.wait(left)

    def count(self, label: str, macs: set[str], kind: str = "new", table: str = "fdb") -> int:
        with self._cond:
            per_mac = self.seen[(kind, table)]
            return sum(1 for m in macs if label in per_mac.get(m, {}))

    def wait_count(self, label: str, macs: set[str], kind: str = "new", table: str = "fdb",
                   timeout: float = 10.0) -> Optional[float]:
        """Until label has seen all macs; returns the time of the last one (None on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                per_mac = self.seen[(kind, table)]
                times = [per_mac.get(m, {}).get(label) for m in macs]
                if all(t is not None for t in times):
                    return max(times) if times else time.monotonic()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        with self._cond:
            for s in self._socks.values():
                try:
                    self._sel.unregister(s)
                except (KeyError, ValueError):
                    pass
                s.close()
            self._socks.clear()
        self._sel.close()
