"""`pyoverlay doctor`'s check of gateway mode (-o gateway=pyoverlay): are the
uplinks, the published ports in the NAT table and the FORWARD accepts what
the store says? Read-only, as every doctor check."""

from __future__ import annotations

import ipaddress
from typing import Optional

from driver.dataplane.egress import uplink_name
from driver.gateway import wanted_nat
from driver.state import State

from .checks import FAIL, OK, WARN, Check


def _port(m) -> str:
    where = f"[{m.host_ip}]" if ":" in m.host_ip else (m.host_ip or "*")
    return f"{where}:{m.host_port}/{m.proto} -> {m.ip}:{m.port}"


def check_gateway(state: State, dataplane, host: str, nat) -> Optional[Check]:
    """None where there is nothing to check: no gateway-mode network here and no table left."""
    try:
        uplinks, mappings = wanted_nat(state, host)
    except Exception as e:  # the store: said, not raised
        return Check("gateway", FAIL, f"cannot compare: {e}")
    try:
        have_uplinks = dataplane.uplinks()
        published = nat.published()
    except Exception as e:  # the kernel or nft
        return Check("gateway", FAIL, f"cannot read the kernel's state: {e}")
    vnis = {u.vni for u in uplinks}
    if not vnis:
        if published:
            return Check("gateway", WARN, f"{len(published)} published port(s) in the nft table pyoverlay-gw but "
                                          "no gateway-mode network here: debris; restart the plugin (it rewrites "
                                          "the table from the store)")
        return None
    problems = []
    for vni in sorted(vnis - have_uplinks):
        problems.append(f"VNI {vni}: no uplink {uplink_name(vni)}: its containers cannot leave the overlay and "
                        "its published ports answer nothing; restart the plugin (its start re-creates it)")
    if published is None:
        problems.append("the nft table ip pyoverlay-gw is missing: no egress masquerade and no published port; "
                        "restart the plugin")
    else:
        want = set(mappings)
        problems += [f"published port {_port(m)} is missing from the nft table" for m in sorted(want - published)]
        problems += [f"published port {_port(m)} is in the nft table but no endpoint in the store has it: stale"
                     for m in sorted(published - want)]
    families = {ipaddress.ip_network(u.subnet).version for u in uplinks}
    for family in sorted(families):
        if not nat.forward_accepted(ipv6=family == 6):
            tool = "ip6tables" if family == 6 else "iptables"
            problems.append(f"the two `{tool} FORWARD -i/-o pyg+ -j ACCEPT` rules are missing: the engine's "
                            "DROP policy stops gateway-mode traffic; restart the plugin (it appends them)")
    if problems:
        return Check("gateway", FAIL, "gateway mode's kernel state does not match the store", problems)
    return Check("gateway", OK, f"{len(vnis)} gateway-mode network(s): uplinks and {len(mappings)} published "
                                "port(s) as the store says")
