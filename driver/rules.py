"""The network rules, in one place: what a network may be, what conflicts with
what, and the defaults chosen when nothing is asked.

The driver (network.py), the IPAM (ipam.py) and `pyoverlay network create`
(ops/commands.py) all call these, so a refusal reads the same from
`docker network create` and from `pyoverlay network create`. Pure functions
over plain values: the callers read the store and hand in what they found.
A refusal is a DriverError whose text says what to do, in the spelling of
`docker network create` (`pyoverlay network create` takes the same `-o`).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional

from .defaults import OPT_ENCAP, OPT_MTU, OPT_MULTICAST, OPT_VNI, VNI_MAX  # noqa: F401 (the rules' names)
from .errors import DriverError

# Options of `docker network create -o` (also `pyoverlay network create -o`).

VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
MIN_MTU = 576  # the smallest datagram every IPv4 host must accept
MAX_MTU = 65535 - VXLAN_OVERHEAD  # the largest IPv4 datagram, less what VXLAN adds
VNI_MIN = 1
VNI_AUTO_START = 4096  # as Docker's overlay, away from hand-picked low VNIs


# -- options ---------------------------------------------------------------------

def int_option(options: dict, name: str, low: int, high: int, meaning: str) -> Optional[int]:
    """options[name] as a whole number from low to high; None when not given."""
    if name not in options:
        return None
    value = options[name]
    try:
        number = int(str(value), 10)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise DriverError(f"-o {name}={value} is not valid: {meaning} must be a whole number from {low} to {high}")
    return number


def vni_option(options: dict) -> Optional[int]:
    return int_option(options, OPT_VNI, VNI_MIN, VNI_MAX, "the VXLAN network identifier")


def mtu_option(options: dict, max_mtu: Optional[int] = None) -> Optional[int]:
    """The overlay MTU asked for. max_mtu: what this host's underlay carries
    inside VXLAN (None where no host is at hand, as for `pyoverlay network create`)."""
    mtu = int_option(options, OPT_MTU, MIN_MTU, MAX_MTU,
                     f"the MTU (at most each host's underlay MTU minus {VXLAN_OVERHEAD})")
    if mtu is not None and max_mtu is not None and mtu > max_mtu:
        raise DriverError(f"-o {OPT_MTU}={options[OPT_MTU]} is not valid: this host's underlay carries at most "
                          f"{max_mtu} inside VXLAN; use -o {OPT_MTU}={max_mtu} or less")
    return mtu


def bool_option(options: dict, key: str, meaning: str) -> Optional[bool]:
    """-o KEY=true|false; None when not given (the overlay's own, else off).
    meaning completes "use -o KEY=true to ..." in the error."""
    if key not in options:
        return None
    value = options[key]
    if value in (True, "true"):
        return True
    if value in (False, "false"):
        return False
    raise DriverError(f"-o {key}={value} is not valid: use -o {key}=true to {meaning}, "
                      f"or -o {key}=false (the default)")


def multicast_option(options: dict) -> Optional[bool]:
    """-o multicast=true|false; None when not given (the overlay's own, else off)."""
    return bool_option(options, OPT_MULTICAST, "flood broadcast and multicast to every host of the network")


def parse_subnet(text: str, what: str = "subnet", v6: bool = False):
    """An IPv4 network (v6: an IPv6 one, parse_subnet6)."""
    if v6:
        return parse_subnet6(text, what)
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise DriverError(
            f"{what} {text!r} is not a valid IPv4 network in CIDR form such as 10.20.0.0/24"
        ) from None
    if net.version != 4:
        raise DriverError(f"{what} {text} is an IPv6 network where the engine asked for IPv4; give IPv6 subnets "
                          "with --ipv6 (docker network create --ipv6 --subnet <v4 cidr> --subnet <v6 cidr>)")
    if net.prefixlen > 30:
        raise DriverError(f"{what} {text} is too small: use a /30 or larger")
    return net


#: The smallest IPv6 subnet: a /124 holds 14 usable addresses.
V6_MAX_PREFIX = 124


def parse_subnet6(text: str, what: str = "IPv6 subnet") -> ipaddress.IPv6Network:
    """A unicast IPv6 network a pyoverlay network may use (a ULA such as fd00:20::/64, or global)."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise DriverError(f"{what} {text!r} is not a valid IPv6 network in CIDR form such as fd00:20::/64") from None
    if net.version != 6:
        raise DriverError(f"{what} {text} is an IPv4 network where the engine asked for IPv6; pass an IPv6 "
                          "--subnet such as fd00:20::/64 with --ipv6")
    if net.is_link_local or net.is_multicast or net.is_loopback or net.is_unspecified or \
            net.overlaps(ipaddress.ip_network("::ffff:0:0/96")):
        raise DriverError(f"{what} {text} is not a unicast range a network can use (link-local, multicast, "
                          "loopback and IPv4-mapped are not); use a ULA such as fd00:20::/64")
    if net.prefixlen > V6_MAX_PREFIX:
        raise DriverError(f"{what} {text} is too small: use a /{V6_MAX_PREFIX} or larger (a /64 is usual)")
    return net


def parse_ip(text: str, v6: bool = False):
    """An IPv4 address (v6: IPv4 or IPv6)."""
    try:
        ip = ipaddress.ip_interface(text).ip  # the engine sends both "a.b.c.d" and "a.b.c.d/n"
    except ValueError:
        raise DriverError(f"{text!r} is not a valid {'IP' if v6 else 'IPv4'} address") from None
    if ip.version != 4 and not v6:
        raise DriverError(f"{ip} is an IPv6 address where an IPv4 one is needed")
    return ip


def usable_address(subnet, text: str):
    """An address a container or gateway may have: in the subnet, neither its
    network nor its broadcast (IPv6: last) address."""
    ip = parse_ip(text, v6=subnet.version == 6)
    if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address):
        raise DriverError(f"address {ip} is not a usable address of {subnet}")
    return ip


# -- conflicts with what the cluster already has ----------------------------------

def check_overlap(subnet: ipaddress.IPv4Network, pools: Iterable[str]) -> None:
    """A subnet may equal a pool (the same overlay on another host), not overlap one."""
    for other in pools:
        net = ipaddress.ip_network(other)
        if net != subnet and net.overlaps(subnet):
            raise DriverError(
                f"subnet {subnet} overlaps {net}, already used by a pyoverlay network; "
                "choose a --subnet that does not overlap it"
            )


def check_subnet_vni(subnet: str, vni: Optional[int], claimed: Optional[int]) -> None:
    """A subnet belongs to one overlay: the VNI that claimed it (claimed), if any."""
    if vni is not None and claimed is not None and claimed != vni:
        raise DriverError(
            f"subnet {subnet} is already used by the pyoverlay network with VNI "
            f"{claimed}; use -o {OPT_VNI}={claimed} or another --subnet"
        )


def check_vni_subnet(vni: int, subnet: str, overlay_subnet: Optional[str]) -> None:
    """A VNI carries one subnet: that of its overlay (overlay_subnet), if it has one."""
    if overlay_subnet is not None and overlay_subnet != subnet:
        raise DriverError(
            f"VNI {vni} is already used by the pyoverlay network on "
            f"{overlay_subnet}; choose another -o {OPT_VNI} or use --subnet {overlay_subnet}"
        )


def check_overlay_mtu(vni: int, mtu: Optional[int], overlay_mtu: int) -> None:
    """Every host of an overlay uses the MTU it was made with."""
    if mtu is not None and mtu != overlay_mtu:
        raise DriverError(
            f"the pyoverlay network with VNI {vni} uses MTU {overlay_mtu} on other "
            f"hosts; use -o {OPT_MTU}={overlay_mtu} or leave the option out"
        )


def check_overlay_multicast(vni: int, multicast: Optional[bool], overlay_multicast: bool) -> None:
    """An overlay floods on every host or on none: as it was made (it cannot change later)."""
    if multicast is not None and multicast != overlay_multicast:
        state = "floods" if overlay_multicast else "does not flood"
        raise DriverError(
            f"the pyoverlay network with VNI {vni} {state} broadcast and multicast on other hosts "
            f"(-o {OPT_MULTICAST}={str(overlay_multicast).lower()}); use -o {OPT_MULTICAST}="
            f"{str(overlay_multicast).lower()} or leave the option out. It is fixed when the network is made: "
            "to change it, remove the network on every host and create it again"
        )


def check_overlay_subnet6(vni: int, subnet6: str, overlay_subnet6: str) -> None:
    """Every host of a dual-stack overlay gives it the same IPv6 subnet (and an IPv4-only one none)."""
    if subnet6 != overlay_subnet6:
        have = f"IPv6 subnet {overlay_subnet6}" if overlay_subnet6 else "no IPv6"
        use = f"--ipv6 --subnet {overlay_subnet6}" if overlay_subnet6 else "no --ipv6"
        raise DriverError(f"the pyoverlay network with VNI {vni} has {have} on other hosts; create it here with "
                          f"the same subnets ({use}) or use another VNI and IPv4 --subnet")


def check_underlay_carries(vni: int, overlay_mtu: int, max_mtu: int) -> None:
    """This host's underlay must carry the overlay's MTU inside VXLAN (max_mtu)."""
    if overlay_mtu > max_mtu:
        raise DriverError(
            f"the pyoverlay network with VNI {vni} uses MTU {overlay_mtu}, but this "
            f"host's underlay carries at most {max_mtu} inside VXLAN; recreate the "
            f"network everywhere with -o {OPT_MTU}={max_mtu}"
        )


def check_gateway(subnet: ipaddress.IPv4Network, wanted: Optional[ipaddress.IPv4Address], shared: str) -> None:
    """A network has one gateway on every host: the first one given (shared)."""
    if shared and wanted and str(wanted) != shared:
        raise DriverError(
            f"the pyoverlay network on {subnet} already has gateway {shared} "
            f"on other hosts; use --gateway {shared} or leave --gateway out"
        )


# -- defaults ---------------------------------------------------------------------

def default_gateway(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The subnet's first address, as Docker's default IPAM picks."""
    return next(subnet.hosts())


def free_vni(used: Iterable[int]) -> int:
    """The lowest VNI from VNI_AUTO_START that no overlay uses."""
    taken = set(used)
    for vni in range(VNI_AUTO_START, VNI_MAX + 1):
        if vni not in taken:
            return vni
    raise DriverError(f"every VNI from {VNI_AUTO_START} to {VNI_MAX} is in use; pass -o {OPT_VNI}=<a free one below "
                      f"{VNI_AUTO_START}> or remove unused networks")


# -- direct mode (-o encap=...) ------------------------------------------------------

ENCAP_ALWAYS = "always"  # VXLAN to every host: the default
ENCAP_CROSS_SUBNET = "cross-subnet"  # routed to hosts on this host's underlay subnet, VXLAN to the others
ENCAP_NEVER = "never"  # routed only; a host off the underlay subnet is unreachable
ENCAP_MODES = (ENCAP_ALWAYS, ENCAP_CROSS_SUBNET, ENCAP_NEVER)


def encap_option(options: dict) -> Optional[str]:
    """-o encap=always|cross-subnet|never; None when not given (the overlay's own, else always)."""
    if OPT_ENCAP not in options:
        return None
    value = str(options[OPT_ENCAP]).strip().lower()
    if value not in ENCAP_MODES:
        raise DriverError(f"-o {OPT_ENCAP}={options[OPT_ENCAP]} is not valid: use -o {OPT_ENCAP}=always (VXLAN to "
                          f"every host, the default), -o {OPT_ENCAP}=cross-subnet (no VXLAN to hosts on this "
                          f"host's underlay subnet) or -o {OPT_ENCAP}=never (no VXLAN at all)")
    return value


def check_encap_fits(encap: Optional[str], multicast: Optional[bool], encrypted: Optional[bool],
                     ipv6: bool) -> None:
    """Direct mode routes IPv4 unicast in clear text: refuse what it cannot carry."""
    if encap in (None, ENCAP_ALWAYS):
        return
    if multicast:
        raise DriverError(f"-o {OPT_ENCAP}={encap} routes unicast only and cannot flood broadcast and multicast: "
                          f"leave out -o {OPT_MULTICAST}=true, or leave out -o {OPT_ENCAP} (VXLAN)")
    if encrypted:
        raise DriverError(f"-o {OPT_ENCAP}={encap} sends container traffic between hosts unencapsulated, so it "
                          f"cannot be encrypted: leave out -o encrypted=true, or leave out -o {OPT_ENCAP} (VXLAN)")
    if ipv6:
        raise DriverError(f"-o {OPT_ENCAP}={encap} routes IPv4 only: leave out --ipv6 (and its IPv6 subnet), "
                          f"or leave out -o {OPT_ENCAP} (VXLAN)")


def check_overlay_encap(vni: int, encap: Optional[str], overlay_encap: str) -> None:
    """Every host of an overlay encapsulates as it was made (it cannot change later)."""
    have = overlay_encap or ENCAP_ALWAYS
    if encap is not None and encap != have:
        raise DriverError(
            f"the pyoverlay network with VNI {vni} was made with -o {OPT_ENCAP}={have} on other hosts; use "
            f"-o {OPT_ENCAP}={have} or leave the option out. It is fixed when the network is made: to change it, "
            "remove the network on every host and create it again"
        )
