"""Encrypted overlays (-o encrypted=true): the option, and the key sync.

An encrypted overlay's VXLAN between hosts travels inside a WireGuard tunnel
(driver/dataplane/crypto.py); this module keeps that tunnel's peers equal to
the store's crypto/ records, publishes this host's public keys there, and
rotates its exchange key every --key-rotation seconds (driver/keys.py says
what is derived from what, and why no private key ever leaves the host).

The tunnel is up while this host carries at least one encrypted overlay. The
driver calls network_added before it makes such a network's vxlan device and
network_removed after it deleted it, so no encrypted vxlan ever exists
without the tunnel's routing and filter in place.

A tunnel peer is every other host with a crypto/ record, unless the record is
stale: a host that stopped rotating for two of its periods (dead, or cut off
from the store) is dropped, so its last keys stop working soon after.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from .background import Background, store_watch
from .defaults import KEY_ROTATION, OPT_ENCRYPTED, TUNNEL_OVERHEAD, WIREGUARD_PORT
from .errors import DriverError
from .keys import KeyFile, LocalKeys, pair_psk
from .model import HostKey, TunnelPeer
from .rules import bool_option
from .state import CRYPTO, State, decode_host_key
from .store.base import Event, KeyValue, Store

log = logging.getLogger(__name__)

#: Extra seconds a peer's exchange key may be late past two periods (clocks, restarts).
STALE_SLACK = 60.0
MIN_ROTATION = 1.0


def encrypted_option(options: dict) -> Optional[bool]:
    """-o encrypted=true|false; None when not given (the overlay's own, else off)."""
    return bool_option(options, OPT_ENCRYPTED, "encrypt the network's traffic between hosts")


def check_overlay_encrypted(vni: int, encrypted: Optional[bool], overlay_encrypted: bool) -> None:
    """An overlay is encrypted on every host or on none, as it was made."""
    if encrypted is not None and encrypted != overlay_encrypted:
        state = "is" if overlay_encrypted else "is not"
        raise DriverError(
            f"the pyoverlay network with VNI {vni} {state} encrypted on other hosts "
            f"(-o {OPT_ENCRYPTED}={str(overlay_encrypted).lower()}); use -o {OPT_ENCRYPTED}="
            f"{str(overlay_encrypted).lower()} or leave the option out. It is fixed when the network is made: "
            "to change it, remove the network on every host and create it again"
        )


def expected_peers(records: dict[str, HostKey], keys: LocalKeys, host: str, vtep: str,
                   now: float) -> list[TunnelPeer]:
    """Every other host's record that is not stale, as a tunnel peer with the
    pair's current key (the plugin programs these; doctor compares with them)."""
    found = []
    for record in records.values():
        if record.host == host or record.vtep == vtep:
            continue
        if now - record.made > 2 * record.rotation + STALE_SLACK:
            continue  # stopped rotating: gone, or cut off from the store
        try:
            psk = pair_psk(keys.exchange, bytes.fromhex(record.exchange), keys.static_public,
                           bytes.fromhex(record.public), keys.epoch, record.epoch)
            found.append(TunnelPeer(bytes.fromhex(record.public), record.vtep, record.port, psk))
        except ValueError as e:
            log.warning("encryption: host %s's keys are unusable (%s); skipped", record.host, e)
    return found


class Encryption:
    def __init__(self, store: Store, dataplane, host: str, vtep: str, key_file: str,
                 rotation: float = KEY_ROTATION, port: int = WIREGUARD_PORT,
                 clock: Callable[[], float] = time.time):
        if rotation < MIN_ROTATION:
            raise ValueError(f"--key-rotation {rotation}: use {MIN_ROTATION:g} second or more")
        self.state = State(store)
        self.dataplane = dataplane
        self.host, self.vtep, self.port = host, vtep, port
        self.rotation = float(rotation)
        self.clock = clock
        self.key_file = KeyFile(key_file)
        self._keys: Optional[LocalKeys] = None
        self._local: set[int] = set()  # encrypted overlays this host carries
        self._records: dict[str, HostKey] = {}
        self._synced = False  # the first snapshot of crypto/ arrived
        self._lock = threading.RLock()
        self._watch = store_watch("crypto", "key-sync", store, CRYPTO, self._on_snapshot, self._on_events)
        self._timer = Background("key-rotation", self._rotate_loop)

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._watch.start()
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()
        self._watch.stop()

    @property
    def active(self) -> bool:
        return bool(self._local)

    def problem(self) -> str:
        return self.dataplane.encryption_problem()

    def check(self) -> None:
        """Refuse (before anything changes) when this host cannot encrypt."""
        problem = self.problem()
        if problem:
            raise DriverError(problem)

    # -- the driver's side -----------------------------------------------------------

    def network_added(self, vni: int) -> None:
        """Before the encrypted overlay's vxlan device is made: the tunnel is up."""
        with self._lock:
            if not self._local:
                self._up()
            self._local.add(vni)

    def network_removed(self, vni: int) -> None:
        """After the encrypted overlay's vxlan device is gone."""
        with self._lock:
            if vni not in self._local:
                return
            self._local.discard(vni)
            if not self._local:
                self._down()

    def _up(self) -> None:
        keys = self.key_file.load_or_make()
        if keys.due(self.rotation, self.clock()) <= 0:
            keys = keys.rotated(self.clock())
            self.key_file.save(keys)
        self.dataplane.tunnel_up(keys.static, self.port, self.dataplane.underlay_mtu() - TUNNEL_OVERHEAD)
        self._keys = keys
        self._publish()
        self._apply()
        log.info("encryption: tunnel %s up (exchange key %d)", self.dataplane.tunnel_device, keys.epoch)

    def _down(self) -> None:
        # The record first: other hosts drop this one before its tunnel goes.
        self.state.delete_host_key(self.host)
        self.dataplane.tunnel_down()
        self._keys = None
        log.info("encryption: no encrypted network left; tunnel removed")

    def _publish(self) -> None:
        keys = self._keys
        self.state.put_host_key(HostKey(
            host=self.host, vtep=self.vtep, port=self.port, public=keys.static_public.hex(),
            exchange=keys.exchange_public.hex(), epoch=keys.epoch, made=keys.made, rotation=self.rotation))

    # -- the store's side ------------------------------------------------------------

    def _on_snapshot(self, kvs: list[KeyValue], _revision: int) -> None:
        records = {}
        for kv in kvs:
            record = decode_host_key(kv.key, kv.value)
            if record is not None:
                records[record.host] = record
        with self._lock:
            self._records = records
            self._synced = True
            self._apply()

    def _on_events(self, events: list[Event]) -> None:
        with self._lock:
            for event in events:
                host = event.key[len(CRYPTO):]
                record = decode_host_key(event.key, event.value if event.kind == "put" else None)
                if record is None:
                    self._records.pop(host, None)
                else:
                    self._records[record.host] = record
            self._apply()

    def peers(self, now: Optional[float] = None) -> list[TunnelPeer]:
        """The tunnel peers the store asks for."""
        return expected_peers(self._records, self._keys, self.host, self.vtep, self.clock() if now is None else now)

    def _apply(self) -> None:
        """With the lock held. Not before the first snapshot: a restarted
        plugin leaves the running tunnel's peers as they are until it knows."""
        if not self._local or not self._synced or self._keys is None:
            return
        mine = self._records.get(self.host)
        if mine is None or mine.epoch != self._keys.epoch or mine.exchange != self._keys.exchange_public.hex():
            self._publish()  # deleted by someone, or an older run's: ours is the truth
        added, removed = self.dataplane.set_tunnel_peers(self.peers())
        if added or removed:
            log.info("encryption: tunnel peers +%d -%d", added, removed)

    # -- rotation --------------------------------------------------------------------

    def rotate(self) -> None:
        """A new exchange key now: saved, published, every pair's key changed."""
        with self._lock:
            if self._keys is None:
                return
            keys = self._keys.rotated(self.clock())
            self.key_file.save(keys)  # first: a restart from here on uses the new key
            self._keys = keys
            self._publish()
            self._apply()
        log.info("encryption: exchange key rotated (epoch %d)", keys.epoch)

    def _rotate_loop(self) -> None:
        stopping = self._timer.stopping
        while not stopping.is_set():
            wait = min(self.rotation / 2, 30.0)
            try:
                with self._lock:
                    keys = self._keys
                    due = keys.due(self.rotation, self.clock()) if keys is not None else None
                if due is not None and due <= 0:
                    self.rotate()
                    due = self.rotation
                with self._lock:
                    self._apply()  # drops peers that went stale meanwhile
                if due is not None:
                    wait = min(wait, max(due, 0.05))
            except Exception as e:  # store down, daemon restarting: try again soon
                log.warning("encryption: key rotation: %s; retrying", e)
                wait = min(wait, 1.0)
            stopping.wait(wait)

    # -- for operators ---------------------------------------------------------------

    def status(self) -> dict:
        with self._lock:
            keys = self._keys
            return {
                "active": bool(self._local),
                "networks": sorted(self._local),
                "epoch": keys.epoch if keys else 0,
                "key_age": round(self.clock() - keys.made, 1) if keys else None,
                "peers": sorted(r.host for r in self._records.values() if r.host != self.host),
            }

