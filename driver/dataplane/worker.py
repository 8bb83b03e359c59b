"""The netlink worker: one thread per Dataplane owns every handle.

pyroute2 0.9's IPRoute keeps its socket and event loop per thread (a second
thread silently opens another socket, forking again for a netns, and close()
cannot release it), so a lock cannot make one handle shareable. Instead one
worker thread per Dataplane owns every handle and runs every kernel
operation; callers hand it work and wait. RTNL serialises these operations in
the kernel anyway. Across processes (gunicorn workers), creating and deleting
networks is serialised by flock on ``netns_dir``; endpoint and peer
operations are idempotent.
"""

from __future__ import annotations

import fcntl
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from driver.defaults import VXLAN_PORT

from .base import NS_PREFIX, DataplaneError, ipv4, missing, step

T = TypeVar("T")


def _nsfs_dev() -> int:
    return os.stat("/proc/self/ns/net").st_dev


def is_netns(path: str) -> bool:
    """True if path is a mounted network namespace (not a leftover empty file)."""
    try:
        return os.stat(path).st_dev == _nsfs_dev()
    except FileNotFoundError:
        return False


def ns_path(netns: str) -> str:
    return netns if "/" in netns else os.path.join("/run/netns", netns)


class Handle:
    """A netlink socket into one namespace, plus an fd pinning that namespace.

    The socket is opened through our own fd, so both refer to the same
    namespace even if the path is replaced in between; current() notices when
    another process has deleted or re-created the namespace behind the path.
    """

    def __init__(self, path: str | None):
        self.path = path
        self.fd = os.open(path or "/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if path is None:
                self.ipr = IPRoute(groups=0)
            else:
                # flags=0: never create a namespace; groups=0: no event flood to queue up
                self.ipr = IPRoute(netns=f"/proc/self/fd/{self.fd}", flags=0, groups=0)
        except BaseException:
            os.close(self.fd)
            raise
        self.inode = os.fstat(self.fd).st_ino
        self.bridge: int | None = None  # ifindex of br0, looked up once
        self.vxlan: int | None = None  # ifindex of vxlan0

    def current(self) -> bool:
        try:
            return self.path is None or os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            return False

    def index(self, ifname: str) -> int | None:
        try:
            return self.ipr.link("get", ifname=ifname)[0]["index"]
        except NetlinkError as e:
            if missing(e):
                return None
            raise

    def link_del(self, index: int) -> bool:
        """Delete a link; False if it was already gone."""
        try:
            self.ipr.link("del", index=index)
            return True
        except NetlinkError as e:
            if missing(e):
                return False
            raise

    def close(self) -> None:
        try:
            self.ipr.close()
        finally:
            os.close(self.fd)


class Worker:
    """The part of Dataplane that owns the thread and the handles; every
    stage (host, networks, endpoints, peers) runs its kernel work through
    _call and finds its namespace through _host_handle / _ns_handle."""

    def __init__(
        self,
        vtep: str,
        vxlan_port: int = VXLAN_PORT,
        netns_dir: str = "/run/netns",
        host_netns: str | None = None,
    ):
        self.vtep = str(ipv4(vtep, "local (VTEP) address"))
        if not isinstance(vxlan_port, int) or not 1 <= vxlan_port <= 65535:
            raise DataplaneError(f"VXLAN port {vxlan_port!r} is out of range: use 1 to 65535 (IANA: 4789)")
        self.vxlan_port = vxlan_port
        self.netns_dir = os.path.abspath(netns_dir)
        self.host_netns = ns_path(host_netns) if host_netns else None
        # Nothing is opened here: a gunicorn master may build this before forking.
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._host: Handle | None = None
        self._ns: dict[int, Handle] = {}

    def _call(self, fn: Callable[..., T], *args) -> T:
        with self._lock:
            if self._pid != os.getpid():
                # First use, or a forked child: the parent's worker thread does
                # not exist here and its sockets are not ours to use.
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="pyoverlay-netlink")
                self._host, self._ns, self._pid = None, {}, os.getpid()
            future = self._executor.submit(fn, *args)
        return future.result()

    def close(self) -> None:
        """Close every netlink handle and stop the worker; a later call reopens."""
        with self._lock:
            executor = self._executor if self._pid == os.getpid() else None
            self._executor, self._pid = None, None
            if executor is not None:
                executor.submit(self._close_handles)
        if executor is not None:
            executor.shutdown(wait=True)

    def _close_handles(self) -> None:
        for handle in [self._host, *self._ns.values()]:
            if handle is not None:
                handle.close()
        self._host, self._ns = None, {}

    def _host_handle(self) -> Handle:
        if self._host is None:
            where = self.host_netns or "this process's namespace"
            with step(
                f"opening netlink in the host namespace ({where})",
                "check that the host namespace exists",
            ):
                self._host = Handle(self.host_netns)
        return self._host

    def _path(self, vni: int) -> str:
        return os.path.join(self.netns_dir, f"{NS_PREFIX}{vni}")

    def _ns_handle(self, vni: int) -> Handle | None:
        """The handle for the overlay namespace, or None if there is none."""
        handle = self._ns.get(vni)
        if handle is not None and handle.current():
            return handle
        if handle is not None:  # deleted or re-created by another process
            del self._ns[vni]
            handle.close()
        path = self._path(vni)
        if not is_netns(path):
            return None
        with step(f"opening netlink in {path}"):
            self._ns[vni] = handle = Handle(path)
        return handle

    def _need_ns(self, vni: int, what: str) -> Handle:
        handle = self._ns_handle(vni)
        if handle is None:
            raise DataplaneError(
                f"{what}: network VNI {vni} does not exist on this host "
                f"(no namespace {self._path(vni)}): create the network first"
            )
        return handle

    @contextmanager
    def _dir_lock(self) -> Iterator[None]:
        """Serialise network create/delete across threads and processes."""
        with step(f"locking {self.netns_dir}", "check that it is a writable directory"):
            os.makedirs(self.netns_dir, mode=0o755, exist_ok=True)
            fd = os.open(self.netns_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
