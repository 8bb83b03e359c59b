"""What every stage of the kernel layer shares: device names, the one error
type, turning a netlink failure into a message that says what to do, and the
checks run on every argument before any kernel work is queued."""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import threading
from contextlib import contextmanager
from typing import Iterator

from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from driver.defaults import VNI_MAX  # noqa: F401 (the stages take it from here)
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

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_ENDPOINT_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


class DataplaneError(Exception):
    """A kernel operation failed; the message says what failed and what to do."""


@contextmanager
def step(what: str, hint: str = "") -> Iterator[None]:
    """Turn a netlink/OS failure into a DataplaneError naming the step."""
    try:
        yield
    except DataplaneError:
        raise
    except NetlinkError as e:
        raise DataplaneError(message(what, os.strerror(e.code), hint)) from e
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise DataplaneError(message(what, reason, hint)) from e


def message(what: str, reason: str, hint: str) -> str:
    return f"{what} failed: {reason}" + (f"; {hint}" if hint else "")


def missing(e: NetlinkError) -> bool:
    return e.code in (errno.ENOENT, errno.ENODEV)


def norm_ip(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise DataplaneError(f"{what} {value!r} is not an IP address") from None


def norm_mac(value: str, what: str) -> str:
    mac = str(value).lower()
    if not _MAC.match(mac):
        raise DataplaneError(f"{what} {value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        raise DataplaneError(f"{what} {value!r} must be a unicast MAC address")
    return mac


def norm_peer(peer: Peer) -> Peer:
    return Peer(
        ip=norm_ip(peer.ip, "peer IP"),
        mac=norm_mac(peer.mac, "peer MAC"),
        vtep=str(ipv4(peer.vtep, "peer VTEP")),
        ip6=norm_ip(peer.ip6, "peer IPv6") if peer.ip6 else "",
    )


def ipv4(value: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise DataplaneError(f"{what} {value!r} must be an IPv4 address") from None


def check_vni(vni: int) -> None:
    if not isinstance(vni, int) or not 1 <= vni <= VNI_MAX:
        raise DataplaneError(f"VNI {vni!r} is out of range: use 1 to {VNI_MAX}")


def check_mtu(mtu: int) -> None:
    if not isinstance(mtu, int) or not 68 <= mtu <= 65535:
        raise DataplaneError(f"MTU {mtu!r} is out of range: use 68 to 65535")


def check_endpoint_id(endpoint_id: str) -> str:
    if not isinstance(endpoint_id, str) or not _ENDPOINT_ID.match(endpoint_id):
        raise DataplaneError(
            f"endpoint ID {endpoint_id!r} is not usable in an interface name: "
            "use letters, digits, '_', '.', '-'"
        )
    return endpoint_id[:ID_CHARS]


def in_namespace(fd, fn) -> None:
    """Run fn() in the network namespace of fd (None: ours), in a short thread
    that entered it: /proc/sys/net is the namespace of the thread that opens
    it, and the calling thread must stay where it is. fn's exception is raised here."""
    failed: list[BaseException] = []

    def inside() -> None:
        try:
            if fd is not None:
                pr_netns.setns(fd, flags=0)
            fn()
        except BaseException as e:
            failed.append(e)

    thread = threading.Thread(target=inside, name="pyoverlay-netns")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def sysctls_in(fd, settings: dict[str, str]) -> None:
    """Write /proc/sys/<key> = value in the namespace of fd (None: ours)."""
    def write() -> None:
        for key, value in settings.items():
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)

    in_namespace(fd, write)
