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
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator, Optional, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from driver.defaults import ENCRYPTED_VXLAN_PORT, VXLAN_PORT

from .base import NS_PREFIX, DataplaneError, ipv4, missing, step

T = TypeVar("T")

log = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 0.5, 30.0  # seconds between attempts of a failing deferred job


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


class _Deferred:
    __slots__ = ("fn", "args", "due", "delay")

    def __init__(self, fn: Callable[..., None], args: tuple):
        self.fn, self.args, self.due, self.delay = fn, args, 0.0, RETRY_MIN


class _Thread:
    """The worker thread. Calls run one at a time in the order they came;
    deferred jobs run only when no call waits, so a Join never queues behind
    the veth deletions of a burst of Leaves."""

    def __init__(self, on_stop: Callable[[], None]):
        self._cond = threading.Condition()
        self._calls: deque[tuple[Callable, tuple, Future]] = deque()
        self._deferred: dict[Hashable, _Deferred] = {}  # insertion-ordered: oldest first
        self._stopping = False
        self._running: Optional[Hashable] = None  # the deferred job running now: still pending
        self._on_stop = on_stop
        self._thread = threading.Thread(target=self._loop, name="pyoverlay-netlink", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], args: tuple) -> "Future[T]":
        future: Future = Future()
        with self._cond:
            self._calls.append((fn, args, future))
            self._cond.notify()
        return future

    def defer(self, key: Hashable, fn: Callable[..., None], args: tuple) -> None:
        with self._cond:
            if key not in self._deferred:
                self._deferred[key] = _Deferred(fn, args)
                self._cond.notify()

    def take(self, keep: Callable[[Hashable], bool]) -> list[tuple[Hashable, Callable[..., None], tuple]]:
        """Remove the deferred jobs whose key matches and return them (to run now)."""
        with self._cond:
            keys = [k for k in self._deferred if keep(k)]
            return [(k, job.fn, job.args) for k, job in ((k, self._deferred.pop(k)) for k in keys)]

    def pending(self) -> list[Hashable]:
        with self._cond:
            return ([] if self._running is None else [self._running]) + list(self._deferred)

    def stop(self) -> None:
        """Finish every call, try every deferred job once more, run on_stop, end."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _next(self) -> tuple[Optional[tuple], Optional[tuple[Hashable, _Deferred]]]:
        with self._cond:
            while True:
                if self._calls:
                    return self._calls.popleft(), None
                now = time.monotonic()
                for key, job in self._deferred.items():
                    if job.due <= now or self._stopping:
                        self._running = key
                        return None, (key, self._deferred.pop(key))
                if self._stopping:
                    return None, None
                wake = min((job.due for job in self._deferred.values()), default=None)
                self._cond.wait(None if wake is None else max(wake - now, 0.0))

    def _loop(self) -> None:
        while True:
            call, deferred = self._next()
            if call is not None:
                fn, args, future = call
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as e:
                        future.set_exception(e)
            elif deferred is not None:
                self._run_deferred(*deferred)
            else:
                try:
                    self._on_stop()
                except Exception:
                    log.exception("closing the netlink handles failed")
                return

    def _run_deferred(self, key: Hashable, job: _Deferred) -> None:
        try:
            job.fn(*job.args)
        except BaseException as e:  # the thread must outlive any failure: every call waits on it
            with self._cond:
                self._running = None
                if self._stopping:
                    log.warning("%s failed: %s; left for the next start to clean up", key, e)
                    return
                if key in self._deferred:  # queued again meanwhile
                    return
                log.warning("%s failed: %s; retrying in %.1fs", key, e, job.delay)
                job.due = time.monotonic() + job.delay
                job.delay = min(job.delay * 2, RETRY_MAX)
                self._deferred[key] = job
        else:
            with self._cond:
                self._running = None


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
        encrypted_port: int | None = None,
    ):
        self.vtep = str(ipv4(vtep, "local (VTEP) address"))
        if not isinstance(vxlan_port, int) or not 1 <= vxlan_port <= 65535:
            raise DataplaneError(f"VXLAN port {vxlan_port!r} is out of range: use 1 to 65535 (IANA: 4789)")
        self.vxlan_port = vxlan_port
        # The VXLAN port of -o encrypted=true networks: routed into the tunnel (crypto.py).
        self.encrypted_port = encrypted_port or ENCRYPTED_VXLAN_PORT
        if self.encrypted_port == vxlan_port or not 1 <= self.encrypted_port <= 65535:
            raise DataplaneError(f"encrypted VXLAN port {self.encrypted_port!r} must be 1 to 65535 and differ "
                                 f"from the VXLAN port {vxlan_port}")
        self.netns_dir = os.path.abspath(netns_dir)
        self.host_netns = ns_path(host_netns) if host_netns else None
        # Nothing is opened here: a gunicorn master may build this before forking.
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._thread: _Thread | None = None
        self._host: Handle | None = None
        self._ns: dict[int, Handle] = {}

    def _worker(self) -> _Thread:
        """The worker thread; started on first use (call with self._lock held)."""
        if self._pid != os.getpid():
            # First use, or a forked child: the parent's worker thread does
            # not exist here and its sockets are not ours to use.
            self._thread = _Thread(on_stop=self._close_handles)
            self._host, self._ns, self._pid = None, {}, os.getpid()
        return self._thread

    def _call(self, fn: Callable[..., T], *args) -> T:
        with self._lock:
            future = self._worker().submit(fn, args)
        return future.result()

    def _defer(self, key: Hashable, fn: Callable[..., None], *args) -> None:
        """Run fn on the worker when it is idle; retried until it succeeds."""
        with self._lock:
            self._worker().defer(key, fn, args)

    def _run_deferred_now(self, keep: Callable[[Hashable], bool]) -> None:
        """On the worker: run now the deferred jobs whose key matches. One that
        fails is deferred again (and the first failure raised, after the rest ran)."""
        thread = self._thread
        failed: Optional[BaseException] = None
        for key, fn, args in (thread.take(keep) if thread is not None else []):
            try:
                fn(*args)
            except Exception as e:
                thread.defer(key, fn, args)
                failed = failed or e
        if failed is not None:
            raise failed

    def pending(self) -> list[Hashable]:
        """The deferred jobs not done yet (their keys, oldest first)."""
        with self._lock:
            thread = self._thread if self._pid == os.getpid() else None
        return thread.pending() if thread is not None else []

    def close(self) -> None:
        """Finish the deferred work, close every netlink handle and stop the
        worker; a later call reopens."""
        with self._lock:
            thread = self._thread if self._pid == os.getpid() else None
            self._thread, self._pid = None, None
        if thread is not None:
            thread.stop()

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
