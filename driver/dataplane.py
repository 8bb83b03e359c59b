"""Everything pyoverlay asks of the kernel, in one place (pyroute2 only).

Layout on one host, for the overlay with VNI ``n``::

    host namespace                      overlay namespace <netns_dir>/pyo-<n>
    --------------                      -------------------------------------
    underlay NIC (local_addr)           br0 ---- vxlan0 (VNI n, dstport, local)
    UDP socket :dstport  <------------- (vxlan0's socket stays in the host ns)
    pyo<id10>  (container end) <-veth-> pyb<id10> (bridge end, port of br0)

libnetwork moves ``pyo<id10>`` into the container and renames it; the bridge
end stays on br0. The bridge lives in a namespace of its own, as in Docker's
overlay driver, so the engine's iptables FORWARD policy never sees its frames.

vxlan0 is created by the host namespace's netlink socket straight into the
overlay namespace (the namespace fd rides in the create request). The kernel
binds a vxlan's UDP socket in the namespace that asked, so this is what
create-in-host-then-move achieves, in one atomic step, with no temporary
device name that a crash could leave behind.

VXLAN and ARP: no multicast and no flooding. vxlan0 has learning off and ARP
proxy on. A container's ARP request reaches vxlan0 through br0; the vxlan
device answers it locally from its neighbour table (one permanent entry per
remote IP) and sends unicast frames to the VTEP its FDB names (one entry per
remote MAC). Why: the underlay needs no multicast (clouds have none), nothing
is broadcast to every host, and what each host knows is exactly what the
control plane programmed, so a stale entry can be found and replaced rather
than waiting for learning to age it out. Unknown destinations are dropped,
never flooded. The cost: a peer must be programmed before anyone can reach it.

Peers obey one rule, which is what makes IP or MAC reuse safe: the kernel
holds at most one entry per IP and one per MAC. Adding a peer evicts whatever
held its IP or its MAC; removing a peer only removes entries that still
describe exactly that peer, so a late delete of an old record never takes
down its successor.

Threads: pyroute2 0.9's IPRoute keeps its socket and event loop per thread
(a second thread silently opens another socket, forking again for a netns,
and close() cannot release it), so a lock cannot make one handle shareable.
Instead one worker thread per Dataplane owns every handle and runs every
kernel operation; callers hand it work and wait. RTNL serialises these
operations in the kernel anyway. Across processes (gunicorn workers), creating
and deleting networks is serialised by flock on ``netns_dir``; endpoint and
peer operations are idempotent.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from driver.model import Peer

BRIDGE = "br0"
VXLAN = "vxlan0"
NS_PREFIX = "pyo-"
HOST_END = "pyo"  # container end, in the host namespace until libnetwork moves it
BRIDGE_END = "pyb"  # bridge end, in the overlay namespace
ID_CHARS = 10  # 3 + 10 characters stays inside the kernel's 15-character ifname
assert len(HOST_END) + ID_CHARS <= 15 and len(BRIDGE_END) + ID_CHARS <= 15

NTF_SELF = ndmsg.flags["self"]
NTF_MASTER = ndmsg.flags["master"]
NUD_PERMANENT = ndmsg.states["permanent"]
NUD_NOARP = ndmsg.states["noarp"]
IFA_F_SECONDARY = 0x01
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
VNI_MAX = (1 << 24) - 1
_CHUNK = 32  # peer operations per worker job (about 5 ms of kernel work)

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_ENDPOINT_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
_NS_NAME = re.compile(r"^" + NS_PREFIX + r"([0-9]+)$")

T = TypeVar("T")


class DataplaneError(Exception):
    """A kernel operation failed; the message says what failed and what to do."""


@contextmanager
def _step(what: str, hint: str = "") -> Iterator[None]:
    """Turn a netlink/OS failure into a DataplaneError naming the step."""
    try:
        yield
    except DataplaneError:
        raise
    except NetlinkError as e:
        raise DataplaneError(_message(what, os.strerror(e.code), hint)) from e
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise DataplaneError(_message(what, reason, hint)) from e


def _message(what: str, reason: str, hint: str) -> str:
    return f"{what} failed: {reason}" + (f"; {hint}" if hint else "")


def _nsfs_dev() -> int:
    return os.stat("/proc/self/ns/net").st_dev


def _is_netns(path: str) -> bool:
    """True if path is a mounted network namespace (not a leftover empty file)."""
    try:
        return os.stat(path).st_dev == _nsfs_dev()
    except FileNotFoundError:
        return False


def _ns_path(netns: str) -> str:
    return netns if "/" in netns else os.path.join("/run/netns", netns)


def _norm_ip(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise DataplaneError(f"{what} {value!r} is not an IP address") from None


def _norm_mac(value: str, what: str) -> str:
    mac = str(value).lower()
    if not _MAC.match(mac):
        raise DataplaneError(f"{what} {value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        raise DataplaneError(f"{what} {value!r} must be a unicast MAC address")
    return mac


def _norm_peer(peer: Peer) -> Peer:
    return Peer(
        ip=_norm_ip(peer.ip, "peer IP"),
        mac=_norm_mac(peer.mac, "peer MAC"),
        vtep=str(_ipv4(peer.vtep, "peer VTEP")),
    )


def _ipv4(value: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise DataplaneError(f"{what} {value!r} must be an IPv4 address") from None


def _check_vni(vni: int) -> None:
    if not isinstance(vni, int) or not 1 <= vni <= VNI_MAX:
        raise DataplaneError(f"VNI {vni!r} is out of range: use 1 to {VNI_MAX}")


def _check_mtu(mtu: int) -> None:
    if not isinstance(mtu, int) or not 68 <= mtu <= 65535:
        raise DataplaneError(f"MTU {mtu!r} is out of range: use 68 to 65535")


def _check_endpoint_id(endpoint_id: str) -> str:
    if not isinstance(endpoint_id, str) or not _ENDPOINT_ID.match(endpoint_id):
        raise DataplaneError(
            f"endpoint ID {endpoint_id!r} is not usable in an interface name: "
            "use letters, digits, '_', '.', '-'"
        )
    return endpoint_id[:ID_CHARS]


def _missing(e: NetlinkError) -> bool:
    return e.code in (errno.ENOENT, errno.ENODEV)


def default_route_address(netns: str | None = None) -> str:
    """IPv4 address of the interface holding the default route (main table).

    The route's preferred source wins if it has one; otherwise the interface's
    first primary global address. netns is a name or path (None: our own).
    """
    where = f"namespace {netns}" if netns else "this host"
    hint = "give the underlay address explicitly (--advertise-addr)"
    with _step(f"reading the default route in {where}", hint):
        ipr = IPRoute(netns=_ns_path(netns), flags=0, groups=0) if netns else IPRoute(groups=0)
    try:
        with _step(f"reading the default route in {where}", hint):
            routes = [
                r
                for r in ipr.route("dump", family=socket.AF_INET)
                if r["dst_len"] == 0
                and r["type"] == RTN_UNICAST
                and r.get_attr("RTA_TABLE", r["table"]) == RT_TABLE_MAIN
            ]
            if not routes:
                raise DataplaneError(f"{where} has no IPv4 default route; {hint}")
            route = min(routes, key=lambda r: r.get_attr("RTA_PRIORITY", 0))
            if route.get_attr("RTA_PREFSRC"):
                return route.get_attr("RTA_PREFSRC")
            oif = route.get_attr("RTA_OIF")
            if oif is None:
                hops = route.get_attr("RTA_MULTIPATH") or []
                oif = hops[0]["oif"] if hops else None
            for addr in ipr.addr("dump", family=socket.AF_INET, index=oif):
                if addr["scope"] == 0 and not addr["flags"] & IFA_F_SECONDARY:
                    return addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS")
            raise DataplaneError(
                f"the default route's interface (index {oif}) in {where} has no global IPv4 address; {hint}"
            )
    finally:
        ipr.close()


class _Handle:
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
            if _missing(e):
                return None
            raise

    def close(self) -> None:
        try:
            self.ipr.close()
        finally:
            os.close(self.fd)


class Dataplane:
    """One host's overlays: namespaces, bridges, vxlans, veths and peers.

    Thread-safe; every kernel call runs on one worker thread (see the module
    docstring). Netlink handles open on first use, one per namespace, and the
    one for an overlay closes when its network is deleted.
    """

    def __init__(
        self,
        local_addr: str,
        vxlan_port: int = 4789,
        netns_dir: str = "/run/netns",
        host_netns: str | None = None,
    ):
        self.local_addr = str(_ipv4(local_addr, "local (VTEP) address"))
        if not isinstance(vxlan_port, int) or not 1 <= vxlan_port <= 65535:
            raise DataplaneError(f"VXLAN port {vxlan_port!r} is out of range: use 1 to 65535 (IANA: 4789)")
        self.vxlan_port = vxlan_port
        self.netns_dir = os.path.abspath(netns_dir)
        self.host_netns = _ns_path(host_netns) if host_netns else None
        # Nothing is opened here: a gunicorn master may build this before forking.
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._host: _Handle | None = None
        self._ns: dict[int, _Handle] = {}

    # -- worker thread ---------------------------------------------------------

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

    def _host_handle(self) -> _Handle:
        if self._host is None:
            where = self.host_netns or "this process's namespace"
            with _step(
                f"opening netlink in the host namespace ({where})",
                "check that the host namespace exists",
            ):
                self._host = _Handle(self.host_netns)
        return self._host

    def _path(self, vni: int) -> str:
        return os.path.join(self.netns_dir, f"{NS_PREFIX}{vni}")

    def _ns_handle(self, vni: int) -> _Handle | None:
        """The handle for the overlay namespace, or None if there is none."""
        handle = self._ns.get(vni)
        if handle is not None and handle.current():
            return handle
        if handle is not None:  # deleted or re-created by another process
            del self._ns[vni]
            handle.close()
        path = self._path(vni)
        if not _is_netns(path):
            return None
        with _step(f"opening netlink in {path}"):
            self._ns[vni] = handle = _Handle(path)
        return handle

    def _need_ns(self, vni: int, what: str) -> _Handle:
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
        with _step(f"locking {self.netns_dir}", "check that it is a writable directory"):
            os.makedirs(self.netns_dir, mode=0o755, exist_ok=True)
            fd = os.open(self.netns_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- host ------------------------------------------------------------------

    def underlay_mtu(self) -> int:
        """MTU of the host interface holding local_addr (netlink, not /sys:
        a process that only entered the netns sees the root namespace's /sys)."""
        return self._call(self._underlay_mtu)

    def _underlay_mtu(self) -> int:
        host = self._host_handle()
        with _step(f"reading the MTU of the interface holding {self.local_addr}"):
            for addr in host.ipr.addr("dump", family=socket.AF_INET):
                if self.local_addr in (addr.get_attr("IFA_LOCAL"), addr.get_attr("IFA_ADDRESS")):
                    return host.ipr.link("get", index=addr["index"])[0].get_attr("IFLA_MTU")
        raise DataplaneError(
            f"no interface in the host namespace has address {self.local_addr}: "
            "the VTEP address must be one of this host's underlay addresses (check --advertise-addr)"
        )

    # -- networks --------------------------------------------------------------

    def create_network(self, vni: int, mtu: int) -> None:
        """Make <netns_dir>/pyo-<vni> with br0 and vxlan0, all up. Idempotent
        (a repeat converges the MTU); on failure removes what this call made."""
        _check_vni(vni)
        _check_mtu(mtu)
        self._call(self._create_network, vni, mtu)

    def _create_network(self, vni: int, mtu: int) -> None:
        path = self._path(vni)
        host = self._host_handle()
        with self._dir_lock():
            made_ns = not _is_netns(path)
            if made_ns:
                with _step(f"create_network VNI {vni}: creating namespace {path}"):
                    if os.path.lexists(path):  # an unmounted file left by a crash mid-create
                        os.unlink(path)
                    pr_netns.create(path)
            made: list[str] = []
            try:
                ns = self._need_ns(vni, f"create_network VNI {vni}")
                ns.bridge = ns.vxlan = None
                self._build_network(host, ns, vni, mtu, made)
            except BaseException as error:
                try:
                    if made_ns:
                        self._destroy_ns(vni)
                    else:
                        self._delete_links(self._ns_handle(vni), made)
                except DataplaneError as cleanup:
                    error.add_note(f"cleaning up also failed: {cleanup}")
                raise

    def _build_network(self, host: _Handle, ns: _Handle, vni: int, mtu: int, made: list[str]) -> None:
        what = f"create_network VNI {vni}"
        with _step(f"{what}: creating {BRIDGE}"):
            if ns.index(BRIDGE) is None:
                ns.ipr.link("add", ifname=BRIDGE, kind="bridge", mtu=mtu)
                made.append(BRIDGE)
            ns.bridge = ns.index(BRIDGE)
        vxlan = None
        with _step(f"{what}: reading {VXLAN}"):
            if ns.index(VXLAN) is not None:
                vxlan = ns.ipr.link("get", ifname=VXLAN)[0]
        if vxlan is None:
            # Created by the host namespace's socket straight into the overlay
            # namespace: the kernel binds the UDP socket in the namespace that
            # asked (the underlay's), and no temporary name is ever visible.
            with _step(
                f"{what}: creating {VXLAN} (VNI {vni}, port {self.vxlan_port}, local {self.local_addr})",
                f"is VNI {vni} already used by another VXLAN device on port {self.vxlan_port} "
                "in the host namespace? Delete that device or use another VNI",
            ):
                host.ipr.link(
                    "add",
                    ifname=VXLAN,
                    kind="vxlan",
                    vxlan_id=vni,
                    vxlan_port=self.vxlan_port,
                    vxlan_local=self.local_addr,
                    vxlan_learning=0,
                    vxlan_proxy=1,
                    mtu=mtu,
                    net_ns_fd=ns.fd,
                )
            made.append(VXLAN)
        else:
            self._check_vxlan(vxlan, vni)
        with _step(f"{what}: enslaving {VXLAN} to {BRIDGE} and bringing both up"):
            ns.vxlan = ns.index(VXLAN)
            ns.ipr.link("set", index=ns.vxlan, master=ns.bridge, mtu=mtu, state="up")
            ns.ipr.link("set", index=ns.bridge, mtu=mtu, state="up")

    def _check_vxlan(self, link, vni: int) -> None:
        data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        have = {
            "VNI": data.get_attr("IFLA_VXLAN_ID") if data else None,
            "port": data.get_attr("IFLA_VXLAN_PORT") if data else None,
            "local": data.get_attr("IFLA_VXLAN_LOCAL") if data else None,
            "learning": data.get_attr("IFLA_VXLAN_LEARNING") if data else None,
            "proxy": data.get_attr("IFLA_VXLAN_PROXY") if data else None,
        }
        want = {"VNI": vni, "port": self.vxlan_port, "local": self.local_addr, "learning": 0, "proxy": 1}
        if have != want:
            raise DataplaneError(
                f"create_network VNI {vni}: {self._path(vni)} already holds a {VXLAN} with "
                f"{have}, expected {want}: delete the network and create it again"
            )

    def delete_network(self, vni: int) -> None:
        """Remove the overlay namespace and every device in it. Idempotent."""
        _check_vni(vni)
        self._call(self._delete_network, vni)

    def _delete_network(self, vni: int) -> None:
        with self._dir_lock():
            self._destroy_ns(vni)

    def _destroy_ns(self, vni: int) -> None:
        path = self._path(vni)
        ns = self._ns_handle(vni)
        if ns is not None:
            # Delete the devices explicitly: a handle another process still
            # holds would keep the namespace, and with it vxlan0's VNI and UDP
            # port, alive after the unmount. vxlan0 first, to free them soonest.
            with _step(f"delete_network VNI {vni}: listing devices"):
                names = [link.get_attr("IFLA_IFNAME") for link in ns.ipr.link("dump")]
            names = sorted((n for n in names if n != "lo"), key=lambda n: n != VXLAN)
            self._delete_links(ns, names)
            del self._ns[vni]
            ns.close()
        with _step(f"delete_network VNI {vni}: removing namespace {path}"):
            if _is_netns(path):
                pr_netns.remove(path)
            elif os.path.lexists(path):
                os.unlink(path)

    def _delete_links(self, ns: _Handle | None, names: Iterable[str]) -> None:
        for name in names:
            with _step(f"deleting {name}"):
                index = ns.index(name) if ns is not None else None
                if index is not None:
                    self._link_del(ns, index)

    @staticmethod
    def _link_del(handle: _Handle, index: int) -> bool:
        try:
            handle.ipr.link("del", index=index)
            return True
        except NetlinkError as e:
            if _missing(e):
                return False
            raise

    # -- the cluster resolver's addresses (driver/dnsplane.py) -------------------

    def add_dns_address(self, vni: int, subnet: str, address: str) -> None:
        """address on the overlay's br0, and its subnet routed via br0 from it. Idempotent."""
        from . import dnsplane

        def apply() -> None:
            ns = self._need_ns(vni, f"DNS address for VNI {vni}")
            with _step(f"VNI {vni}: putting {address} on {BRIDGE} with a route for {subnet}"):
                bridge = ns.bridge or ns.index(BRIDGE)
                dnsplane.add_address(ns.ipr, bridge, address)
                dnsplane.route_subnet(ns.ipr, bridge, subnet, address)

        self._call(apply)

    def add_local_address(self, address: str, present: bool = True) -> None:
        """address/32 on the host namespace's lo (present=False: take it off)."""
        from . import dnsplane

        def apply() -> None:
            host = self._host_handle()
            with _step(f"{'putting' if present else 'removing'} {address} on lo"):
                (dnsplane.add_address if present else dnsplane.remove_address)(host.ipr, host.index("lo"), address)

        self._call(apply)

    def routes(self) -> list[str]:
        """IPv4 destinations routed in the host namespace (main table), so IPAM
        never hands out a subnet the host already reaches some other way."""
        return self._call(self._routes)

    def _routes(self) -> list[str]:
        host = self._host_handle()
        with _step("reading the host's routes"):
            return [
                f"{r.get_attr('RTA_DST')}/{r['dst_len']}"
                for r in host.ipr.route("dump", family=socket.AF_INET)
                if r["dst_len"] > 0 and r.get_attr("RTA_TABLE", r["table"]) == RT_TABLE_MAIN
            ]

    def netns_name(self, vni: int) -> str:
        """Where the overlay's namespace is (for operators: ip netns exec)."""
        return self._path(vni)

    @staticmethod
    def endpoint_ifname(endpoint_id: str) -> str:
        """The container end's name before libnetwork renames it."""
        return HOST_END + endpoint_id[:ID_CHARS]

    def networks(self) -> set[int]:
        """VNIs whose overlay namespace exists (a mounted one, not a leftover file)."""
        try:
            names = os.listdir(self.netns_dir)
        except FileNotFoundError:
            return set()
        found = set()
        for name in names:
            m = _NS_NAME.match(name)
            if m and _is_netns(os.path.join(self.netns_dir, name)):
                found.add(int(m.group(1)))
        return found

    # -- endpoints -------------------------------------------------------------

    def create_endpoint(self, vni: int, endpoint_id: str, mac: str, mtu: int) -> str:
        """Make the veth pair; return the container end's name (Join's SrcName).
        Idempotent: a repeat leaves an existing pair in place."""
        _check_vni(vni)
        _check_mtu(mtu)
        short = _check_endpoint_id(endpoint_id)
        mac = _norm_mac(mac, "endpoint MAC")
        return self._call(self._create_endpoint, vni, short, mac, mtu)

    def _create_endpoint(self, vni: int, short: str, mac: str, mtu: int) -> str:
        what = f"create_endpoint {short} on VNI {vni}"
        host_end, bridge_end = HOST_END + short, BRIDGE_END + short
        host = self._host_handle()
        ns = self._need_ns(vni, what)
        with _step(f"{what}: finding {BRIDGE}", "delete the network and create it again"):
            if ns.bridge is None:
                ns.bridge = ns.index(BRIDGE)
            if ns.bridge is None:
                raise DataplaneError(
                    f"{what}: {self._path(vni)} has no {BRIDGE}: delete the network and create it again"
                )
        try:
            # One request: the bridge end is born in the overlay namespace,
            # enslaved and up; its peer, the container end, lands in the host
            # namespace with the container's MAC. The kernel undoes all of it
            # if any part fails. libnetwork never sets the MTU: set both.
            ns.ipr.link(
                "add",
                ifname=bridge_end,
                kind="veth",
                mtu=mtu,
                master=ns.bridge,
                state="up",
                peer={"ifname": host_end, "address": mac, "mtu": mtu, "net_ns_fd": host.fd},
            )
            self._forget_learned(ns, mac)
            return host_end
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise DataplaneError(
                    _message(f"{what}: creating veth {host_end}/{bridge_end}", os.strerror(e.code), "")
                ) from e
        # A name is taken. If the bridge end is on this network, this is a
        # repeated call: converge and keep the pair (it may already be in use).
        with _step(f"{what}: checking the existing veth {host_end}/{bridge_end}"):
            index = ns.index(bridge_end)
            if index is not None:
                ns.ipr.link("set", index=index, master=ns.bridge, mtu=mtu, state="up")
                host_index = host.index(host_end)
                if host_index is not None:  # not moved into a container yet
                    host.ipr.link("set", index=host_index, address=mac, mtu=mtu)
                return host_end
        # Not deleted here: it may be a live endpoint of another network.
        raise DataplaneError(
            f"{what}: {host_end} already exists in the host namespace but is not this network's: "
            f"is the endpoint ID used on another network? If {host_end} is debris, delete it "
            f"(ip link del {host_end}) and retry"
        )

    @staticmethod
    def _forget_learned(ns: _Handle, mac: str) -> None:
        """br0 learns remote MACs on vxlan0's port. A MAC that was remote and
        is now local (its IP, hence its MAC, reused here) would stay pinned to
        vxlan0 until it ages out (300 s) and its traffic blackholed: drop it."""
        try:
            ns.ipr.fdb("del", ifindex=ns.index(VXLAN), lladdr=mac, master=ns.bridge, flags=NTF_MASTER)
        except NetlinkError as e:
            if not _missing(e):
                raise

    def delete_endpoint(self, vni: int, endpoint_id: str) -> None:
        """Delete the pair wherever its ends are now. Idempotent."""
        _check_vni(vni)
        short = _check_endpoint_id(endpoint_id)
        self._call(self._delete_endpoint, vni, short)

    def _delete_endpoint(self, vni: int, short: str) -> None:
        # Deleting either end of a veth deletes the pair. The bridge end is
        # always reachable; the container end may be inside a container.
        with _step(f"delete_endpoint {short} on VNI {vni}"):
            ns = self._ns_handle(vni)
            if ns is not None:
                index = ns.index(BRIDGE_END + short)
                if index is not None and self._link_del(ns, index):
                    return
            host = self._host_handle()
            index = host.index(HOST_END + short)
            if index is not None:
                self._link_del(host, index)

    def endpoints(self, vni: int) -> set[str]:
        """endpoint_id[:10] of every pair on the network (empty if no network)."""
        _check_vni(vni)
        return self._call(self._endpoints, vni)

    def _endpoints(self, vni: int) -> set[str]:
        ns = self._ns_handle(vni)
        if ns is None:
            return set()
        with _step(f"listing endpoints of VNI {vni}"):
            names = [link.get_attr("IFLA_IFNAME") for link in ns.ipr.link("dump")]
        return {n[len(BRIDGE_END):] for n in names if n.startswith(BRIDGE_END)}

    # -- peers -----------------------------------------------------------------

    # Peers on this host (vtep == local_addr) are never programmed: br0
    # reaches them directly, and an FDB entry pointing at ourselves would
    # loop flooded frames back into br0 and teach it the wrong port.

    def add_peer(self, vni: int, peer: Peer) -> None:
        """Program peer; evict whatever held its IP or its MAC."""
        _check_vni(vni)
        peer = _norm_peer(peer)
        if peer.vtep != self.local_addr:
            self._call(self._add_peer, vni, peer)

    def remove_peer(self, vni: int, peer: Peer) -> None:
        """Remove peer if the kernel still holds exactly it. Idempotent."""
        _check_vni(vni)
        self._call(self._remove_peer, vni, _norm_peer(peer))

    def set_peers(self, vni: int, peers: Iterable[Peer]) -> tuple[int, int]:
        """Make vxlan0's entries exactly peers (one dump, then the differences).

        Returns (added, removed): peers programmed that were not there as
        such, and peers that were there and are gone (a changed peer counts
        in both). Debris that is not a whole peer is removed too, and peers
        on this host are left out (see above).
        """
        _check_vni(vni)
        want = {p for p in map(_norm_peer, peers) if p.vtep != self.local_addr}
        for key in ("ip", "mac"):
            seen: dict[str, Peer] = {}
            for p in sorted(want, key=lambda p: (p.ip, p.mac, p.vtep)):
                other = seen.setdefault(getattr(p, key), p)
                if other is not p:
                    raise DataplaneError(
                        f"set_peers VNI {vni}: {other} and {p} have the same {key.upper()}; the kernel "
                        "holds one entry per IP and per MAC: fix the peer records in the store"
                    )
        what = f"set_peers on VNI {vni}"
        neigh, fdb = self._call(self._dump, vni, what)
        have = _join(neigh, fdb)
        want_neigh = {p.ip: p.mac for p in want}
        want_fdb = {p.mac: p.vtep for p in want}
        ops = [
            *(("neigh_del", ip) for ip in neigh.keys() - want_neigh.keys()),
            # also drops all-zeros (flooding) entries
            *(("fdb_del", mac) for mac in fdb.keys() - want_fdb.keys()),
            *(("fdb_set", mac, vtep) for mac, vtep in want_fdb.items() if fdb.get(mac) != {vtep}),
            *(("neigh_set", ip, mac) for ip, mac in want_neigh.items() if neigh.get(ip) != mac),
        ]
        # Applied in chunks, each its own job on the worker thread, so a Join
        # (create_endpoint) waits for one chunk, not for the whole reconcile.
        for start in range(0, len(ops), _CHUNK):
            self._call(self._apply, vni, what, ops[start : start + _CHUNK])
        return len(want - have), len(have - want)

    def peers(self, vni: int) -> set[Peer]:
        """Peers as the kernel holds them: permanent neighbour joined with its FDB entry."""
        _check_vni(vni)
        return self._call(self._peers, vni)

    def _vxlan(self, vni: int, what: str) -> _Table:
        ns = self._need_ns(vni, what)
        if ns.vxlan is None:
            with _step(f"{what}: finding {VXLAN}"):
                ns.vxlan = ns.index(VXLAN)
            if ns.vxlan is None:
                raise DataplaneError(
                    f"{what}: {self._path(vni)} has no {VXLAN}: delete the network and create it again"
                )
        return _Table(ns.ipr, ns.vxlan, what)

    def _add_peer(self, vni: int, peer: Peer) -> None:
        table = self._vxlan(vni, f"add_peer {peer.ip} on VNI {vni}")
        with _step(table.what):
            old_mac = table.neigh_get(peer.ip)
            old_vtep = table.fdb_get(peer.mac)
            if old_mac is not None and old_mac != peer.mac:
                # IP reuse: the old MAC belonged to this IP alone.
                table.fdb_del(old_mac)
            if old_vtep is not None and old_mac != peer.mac:
                # MAC reuse under a new IP (rare): find who else points at it.
                for ip, mac in table.neigh_dump().items():
                    if mac == peer.mac and ip != peer.ip:
                        table.neigh_del(ip)
            # FDB before neighbour, so ARP is never answered with a MAC
            # that cannot be delivered yet.
            if old_vtep != peer.vtep:
                table.fdb_set(peer.mac, peer.vtep)
            if old_mac != peer.mac:
                table.neigh_set(peer.ip, peer.mac)

    def _remove_peer(self, vni: int, peer: Peer) -> None:
        ns = self._ns_handle(vni)
        if ns is None:
            return
        table = self._vxlan(vni, f"remove_peer {peer.ip} on VNI {vni}")
        with _step(table.what):
            mac = table.neigh_get(peer.ip)
            vtep = table.fdb_get(peer.mac)
            if mac != peer.mac:
                return  # IP gone or reused: the entry is someone else's now
            if vtep not in (None, peer.vtep):
                return  # the MAC moved to another host: a newer record
            table.neigh_del(peer.ip)
            if vtep is not None:
                table.fdb_del(peer.mac)

    def _dump(self, vni: int, what: str) -> tuple[dict[str, str], dict[str, set[str]]]:
        table = self._vxlan(vni, what)
        with _step(what):
            return table.neigh_dump(), table.fdb_dump()

    def _apply(self, vni: int, what: str, ops: list[tuple]) -> None:
        table = self._vxlan(vni, what)
        with _step(what):
            for op, *args in ops:
                getattr(table, op)(*args)

    def _peers(self, vni: int) -> set[Peer]:
        if self._ns_handle(vni) is None:
            return set()
        table = self._vxlan(vni, f"reading peers of VNI {vni}")
        with _step(table.what):
            return _join(table.neigh_dump(), table.fdb_dump())


def _join(neigh: dict[str, str], fdb: dict[str, set[str]]) -> set[Peer]:
    return {Peer(ip=ip, mac=mac, vtep=vtep) for ip, mac in neigh.items() for vtep in fdb.get(mac, ())}


class _Table:
    """vxlan0's neighbour table and FDB, as pyoverlay programs them."""

    def __init__(self, ipr: IPRoute, index: int, what: str):
        self.ipr, self.index, self.what = ipr, index, what

    def neigh_get(self, ip: str) -> str | None:
        try:
            msg = self.ipr.neigh("get", dst=ip, ifindex=self.index)[0]
        except NetlinkError as e:
            if _missing(e):
                return None
            raise
        return msg.get_attr("NDA_LLADDR") if msg["state"] & NUD_PERMANENT else None

    def neigh_dump(self) -> dict[str, str]:
        return {
            m.get_attr("NDA_DST"): m.get_attr("NDA_LLADDR")
            for m in self.ipr.neigh("dump", ifindex=self.index)
            if m["ifindex"] == self.index and m["state"] & NUD_PERMANENT and m.get_attr("NDA_LLADDR")
        }

    def neigh_set(self, ip: str, mac: str) -> None:
        self.ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=self.index, state=NUD_PERMANENT)

    def neigh_del(self, ip: str) -> None:
        try:
            self.ipr.neigh("del", dst=ip, ifindex=self.index)
        except NetlinkError as e:
            if not _missing(e):
                raise

    def fdb_get(self, mac: str) -> str | None:
        try:
            msg = self.ipr.fdb("get", ifindex=self.index, lladdr=mac, flags=NTF_SELF)[0]
        except NetlinkError as e:
            if _missing(e):
                return None
            raise
        return msg.get_attr("NDA_DST")

    def fdb_dump(self) -> dict[str, set[str]]:
        entries: dict[str, set[str]] = {}
        for m in self.ipr.fdb("dump", ifindex=self.index):
            # only vxlan0's own entries (self, with a remote), not br0's
            if m["ifindex"] == self.index and m["flags"] & NTF_SELF and m.get_attr("NDA_DST"):
                entries.setdefault(m.get_attr("NDA_LLADDR"), set()).add(m.get_attr("NDA_DST"))
        return entries

    def fdb_set(self, mac: str, vtep: str) -> None:
        # pyroute2 fills in self/permanent only for add/del, so say it here;
        # without NTF_SELF the entry would land in br0's FDB instead.
        self.ipr.fdb(
            "replace",
            ifindex=self.index,
            lladdr=mac,
            dst=vtep,
            flags=NTF_SELF,
            state=NUD_PERMANENT | NUD_NOARP,
        )

    def fdb_del(self, mac: str) -> None:
        try:
            self.ipr.fdb("del", ifindex=self.index, lladdr=mac)  # no dst: the whole entry
        except NetlinkError as e:
            if not _missing(e):
                raise
