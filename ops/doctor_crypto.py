"""`pyoverlay doctor`'s check of encrypted overlays: does the tunnel (peers,
their endpoints and pair keys, the routing and the nft filter) match what the
store and this host's key file say? Read-only, as every doctor check."""

from __future__ import annotations

import os
import time
from typing import Optional

from driver.encryption import expected_peers
from driver.keys import KeyFile
from driver.state import State

from .checks import FAIL, OK, WARN, Check


def check_encryption(state: State, dataplane, host: str, key_dir: str,
                     now: Optional[float] = None) -> Optional[Check]:
    """None where there is nothing to check: no encrypted network here, and no tunnel."""
    now = time.time() if now is None else now
    try:
        overlays = {o.vni for o in state.overlays() if o.encrypted}
        local = {n.vni for n in state.networks(host=host)} & overlays
        records = state.host_keys()
    except Exception as e:  # the store: said, not raised
        return Check("encryption", FAIL, f"cannot compare: {e}")
    device = dataplane.tunnel_device
    if not local:
        if dataplane.tunnel_present():
            return Check("encryption", WARN, f"{device} exists but this host carries no encrypted network: "
                                             "debris of an earlier run; `ip link del` it")
        return None
    problems = []
    try:
        keys = KeyFile(os.path.join(key_dir, f"{host}.json")).load()
    except ValueError as e:
        keys, problems = None, [str(e)]
    if keys is None:
        problems.append(f"no key file in {key_dir}: pass the plugin's --key-dir")
        return Check("encryption", FAIL, "cannot compare the tunnel's keys", problems)
    mine = records.get(host)
    if mine is None or mine.public != keys.static_public.hex() or mine.exchange != keys.exchange_public.hex():
        problems.append(f"the store's crypto/{host} does not hold this host's public keys: other hosts cannot "
                        "reach it; restart the plugin (it publishes them)")
    if not dataplane.tunnel_present():
        problems.append(f"no tunnel device {device}: encrypted networks carry nothing (never clear text); "
                        "restart the plugin")
    else:
        want = {p.public: p for p in expected_peers(records, keys, host, dataplane.vtep, now)}
        have = {p.public: p for p in dataplane.tunnel_peers()}
        for public, p in want.items():
            got = have.get(public)
            if got is None:
                problems.append(f"tunnel peer {p.vtep} is missing: its containers are unreachable")
            elif (got.vtep, got.port) != (p.vtep, p.port):
                problems.append(f"tunnel peer {p.vtep} has endpoint {got.vtep}:{got.port}, expected "
                                f"{p.vtep}:{p.port}")
            elif got.psk != p.psk:
                problems.append(f"tunnel peer {p.vtep} holds another pair key than the current exchange keys give "
                                "(a rotation not applied yet, if it lasts: restart the plugin)")
        for public in have.keys() - want.keys():
            problems.append(f"tunnel peer {have[public].vtep} is not (or no longer) in the store: stale")
    if not dataplane.tunnel_filter_present():
        problems.append("the nft table inet pyoverlay-crypto is missing: restart the plugin")
    if problems:
        return Check("encryption", FAIL, f"the tunnel {device} does not match the store", problems)
    return Check("encryption", OK, f"{device}: {len(want)} peer host(s) with the current "
                                   f"pair keys; exchange key {keys.epoch}, {int(now - keys.made)}s old")
