"""What the cluster resolver asks of the kernel (pyroute2; part of the kernel layer).

    overlay namespace pyo-<vni>:  br0 holds DNS_ADDR/32; route <subnet> dev br0 src DNS_ADDR
    host namespace:               lo holds DNS_ADDR/32
    sockets:                      UDP and TCP on DNS_ADDR:53, created inside the namespace

A container's query for DNS_ADDR leaves through its pyoverlay interface (the
/32 route Join hands the engine); br0 answers its ARP (vxlan0's ARP proxy has
no entry for the address and floods nothing, so no other host ever sees it),
and the reply to the container's overlay address goes back over br0. The
address and route are applied by the Dataplane's worker (Dataplane.add_dns_address);
the functions here take its netlink handle.

A socket belongs to the namespace it was created in, whatever thread uses it
later: listen() creates them from a short-lived thread that entered the
namespace (setns affects only the calling thread).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
from typing import Optional

from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

SCOPE_LINK = 253
DNS_PORT = 53


def add_address(ipr, index: int, address: str) -> None:
    """address/32 on the link; already there is fine."""
    try:
        ipr.addr("add", index=index, address=address, prefixlen=32)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


def remove_address(ipr, index: int, address: str) -> None:
    try:
        ipr.addr("del", index=index, address=address, prefixlen=32)
    except NetlinkError as e:
        if e.code not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
            raise


def route_subnet(ipr, index: int, subnet: str, source: str) -> None:
    """The overlay's subnet on br0, with the DNS address as source: replies go back there."""
    net = ipaddress.ip_network(subnet)
    ipr.route("replace", dst=str(net.network_address), dst_len=net.prefixlen, oif=index,
              prefsrc=source, scope=SCOPE_LINK)


def listen(netns_path: Optional[str], address: str, port: int = DNS_PORT) -> tuple[socket.socket, socket.socket]:
    """A bound UDP socket and a listening TCP socket on address:port in that
    namespace (None: this process's own)."""
    result: dict = {}

    def make() -> tuple[socket.socket, socket.socket]:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            udp.bind((address, port))
            tcp.bind((address, port))
            tcp.listen(128)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        return udp, tcp

    def run() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if netns_path is not None:
                pr_netns.setns(netns_path, flags=0)
            result["sockets"] = make()
        except BaseException as e:  # handed to the caller
            result["error"] = e
        finally:
            try:
                pr_netns.setns(own, flags=0)  # the thread ends anyway; be tidy
            finally:
                os.close(own)

    if netns_path is None:
        return make()
    thread = threading.Thread(target=run, name="dns-listen", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["sockets"]
