"""The catalog's pass and events, carried out through the engine and the store.

A pass reads the engine's networks and this host's engine/ records, asks
plan.py what to do and does it; an engine event (a network created, removed,
joined or left here) updates the same records at once. Publish, Create and
Remove decide the rest at the moment they act: the store or the engine may
have changed since the plan was made.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

from ..engine import Engine, EngineNetworkInfo, EngineRefused, endpoint_in
from ..events import EngineEvent
from ..leftovers import Leftovers
from ..defaults import OPT_ENCAP, OPT_ENCRYPTED, OPT_MTU, OPT_MULTICAST, OPT_VNI
from ..model import EngineNetwork, NamedNetwork
from ..state import State
from .plan import Action, Create, DropRecord, Later, Publish, Record, Remove, plan, plan_network, refused
from .table import DesiredTable

log = logging.getLogger("driver.catalog")

#: How Docker Engine before 28.1 refuses to remove a network it counts endpoints on.
ENGINE_MISCOUNT = "has active endpoints"


class Applier:
    def __init__(self, state: State, engine: Engine, host: str, driver: str, table: DesiredTable,
                 metrics=None, leftovers: Optional[Leftovers] = None):
        self.state, self.engine, self.table = state, engine, table
        self.host, self.driver = host, driver
        self.metrics, self.leftovers = metrics, leftovers
        self.records: dict[str, EngineNetwork] = {}  # this host's engine/ records, as last written
        self._attached: dict[str, dict[str, str]] = {}  # network ID -> container ID -> endpoint ID
        self._removed_here: set[str] = set()  # network IDs we removed: their destroy event is ours
        self._withdraw: dict[str, str] = {}  # name -> subnet: removed here by a user, to delete from the catalog
        self.wants_pass = False  # an event asks for a full pass now
        self.passes = 0  # full passes completed

    def _count(self, action: str) -> None:
        if self.metrics is not None:
            self.metrics.catalog_action(action)

    # -- the full pass ----------------------------------------------------------

    def run_pass(self) -> bool:
        """Make the engine match the catalog; False if something must be retried soon."""
        ours = {info.name: info for info in self.engine.networks(self.driver)}
        self._attached = {info.id: dict(info.attached) for info in ours.values()}
        summaries = self.engine.network_summaries()
        names = {name: driver for _, name, driver, _ in summaries}
        desired = self.table.snapshot()
        self.records = self.state.engine_networks(self.host)
        for name in self.state.unreadable_engine_networks(self.host):
            self.state.delete_engine_network(self.host, name)  # our own record: the plan writes it again
        ok = self._withdraw_pending(desired)
        if self.leftovers is not None:
            self.leftovers.sweep(summaries, lambda network_id: self.engine.network(network_id) is not None)
        vnis = {info.id: self._vni(info) for info in ours.values()}
        ok &= self.apply(plan(self.host, self.driver, desired, ours, names, self.records, vnis, self._withdraw))
        self.passes += 1
        return ok

    def apply(self, actions: list[Action]) -> bool:
        ok = True
        for action in actions:
            if isinstance(action, DropRecord):
                self._drop_record(action.name)
            elif isinstance(action, Record):
                if action.note and self.records.get(action.record.name) != action.record:
                    (log.warning if action.warn else log.info)("catalog: %s", action.note)
                self._write(action.record)
            elif isinstance(action, Later):
                log.debug("catalog: network %s: %s", action.name, action.why)
                ok = False
            elif isinstance(action, Publish):
                ok &= self._publish(action.info, action.vni)
            elif isinstance(action, Create):
                ok &= self._create(action.entry)
            elif isinstance(action, Remove):
                ok &= self._remove(action.info)
        return ok

    def _vni(self, info: EngineNetworkInfo) -> int:
        network = self.state.network(info.id)
        if network is not None:
            return network.vni
        try:
            return int(info.options.get(OPT_VNI) or 0)
        except ValueError:
            return 0

    def _publish(self, info: EngineNetworkInfo, vni: int) -> bool:
        # Only a gateway given explicitly: the other hosts' IPAM hands out the
        # same shared one anyway, and every engine then shows the same settings.
        try:
            mtu = int(info.options.get(OPT_MTU) or 0)
        except ValueError:
            mtu = 0
        # The overlay's own setting: a host that left the option out joined it as it was made.
        overlay = self.state.overlay(vni) if vni else None
        multicast = overlay.multicast if overlay else info.options.get(OPT_MULTICAST) == "true"
        # -o gateway is each host's (it programs only that host) but travels with
        # the name, so every host's containers leave the same way.
        gateway_mode = "pyoverlay" if info.options.get("gateway") == "pyoverlay" else ""
        encrypted = overlay.encrypted if overlay else info.options.get(OPT_ENCRYPTED) == "true"
        # Direct mode travels with the name too; "always" is the default and stays out.
        encap = overlay.encap if overlay else info.options.get(OPT_ENCAP, "")
        encap = "" if encap == "always" else encap
        entry = NamedNetwork(info.name, info.subnet, info.gateway, vni, mtu, info.internal, origin=self.host,
                             multicast=multicast, gateway_mode=gateway_mode, encrypted=encrypted,
                             subnet6=info.subnet6, gateway6=info.gateway6 if info.subnet6 else "", encap=encap)
        if self.state.add_catalog_entry(entry):
            log.info("catalog: published network %s (%s, VNI %d) for every host", info.name, entry.subnets(), vni)
            self._count("published")
        else:
            existing, _ = self.state.catalog_entry(info.name)
            if existing is None:
                return False  # deleted meanwhile: the next pass decides
            if not existing.matches(info, vni):
                self._write(EngineNetwork(
                    info.name, self.host, info.id, info.subnet, dict(info.containers),
                    error=f"the catalog has another network {info.name} (on {existing.subnet}); this "
                          f"host's {info.name} on {info.subnet} stays local: rename one of them",
                ))
                return True
        self._write(EngineNetwork(info.name, self.host, info.id, info.subnet, dict(info.containers),
                                  catalogued=True))
        return True

    def _create(self, entry: NamedNetwork) -> bool:
        try:
            network_id = self.engine.create_network(entry.name, self.driver, entry.subnet, entry.gateway,
                                                    entry.options(), entry.internal, entry.subnet6, entry.gateway6)
        except EngineRefused as e:
            self.apply([refused(self.host, entry, f"the engine refused to create it: {e}")])
            self._count("refused")
            return False
        log.info("catalog: created network %s (%s, VNI %d) in the engine", entry.name, entry.subnets(), entry.vni)
        self._count("created")
        self._write(EngineNetwork(entry.name, self.host, network_id, entry.subnet, catalogued=True))
        return True

    def _remove(self, info: EngineNetworkInfo) -> bool:
        self._removed_here.add(info.id)
        try:
            self.engine.remove_network(info.id)
        except EngineRefused as e:
            self._removed_here.discard(info.id)
            if e.status == 404:
                self._drop_record(info.name)
                return True
            if ENGINE_MISCOUNT in str(e) and not info.containers:
                return self._miscounted(info, str(e))
            # A container joined in between: its connect event updates the record.
            log.info("catalog: network %s not removed yet: %s", info.name, e)
            return False
        log.info("catalog: removed network %s (no longer in the catalog)", info.name)
        self._count("removed")
        self._drop_record(info.name)
        return True

    def _miscounted(self, info: EngineNetworkInfo, refusal: str) -> bool:
        """The engine counts endpoints on a network it lists no container on.

        Docker Engine before 28.1 keeps that count apart from the endpoints
        and gets it wrong when many containers start and stop on the network
        at once (docs/engine-miscount.md); only its restart recounts. Said once in the log and in
        the record, for `pyoverlay network rm` and `status`; the pass keeps
        trying, so the network goes once the engine has restarted."""
        again = self.engine.network(info.id)
        if again is None or again.containers:
            return False  # removed meanwhile, or a container joined: the next pass sees which
        why = (f"this host's engine refuses to remove {info.name} ({refusal}) though no container is on it: "
               "Docker Engine before 28.1 miscounts endpoints when containers start and stop at once; "
               "restart the engine here (systemctl restart docker) to recount")
        record = EngineNetwork(info.name, self.host, info.id, info.subnet, catalogued=True, removing=True,
                               error=why)
        if self.records.get(info.name) != record:
            log.warning("catalog: %s", why)
            self._count("miscounted")
            self._write(record)
        return False

    def _withdraw_pending(self, desired: dict[str, NamedNetwork]) -> bool:
        """Delete catalog entries whose network a user removed here."""
        for name, subnet in list(self._withdraw.items()):
            entry, revision = self.state.catalog_entry(name)
            if entry is not None and entry.subnet == subnet:
                if not self.state.delete_catalog_entry(name, revision):
                    return False  # changed meanwhile: look again next pass
                log.info("catalog: network %s was removed here; removed it from the catalog", name)
                self._count("withdrawn")
                self.table.withdrawn(name, revision)
            del self._withdraw[name]
            if name in desired and desired[name].subnet == subnet:
                del desired[name]
        return True

    # -- engine events ----------------------------------------------------------

    def on_event(self, event: EngineEvent) -> bool:
        network_id, name = event.actor_id, event.attributes.get("name") or ""
        if event.attributes.get("type") != self.driver:
            # Another driver's network under a catalog name is a conflict the pass records.
            if event.action in ("create", "destroy") and self.table.entry(name) is not None:
                self.wants_pass = True
            return True
        if event.action == "create":
            info = self.engine.network(network_id)
            if info is not None:
                self._attached[info.id] = dict(info.attached)
                return self.apply(plan_network(self.host, self.driver, info, self.table.entry(name),
                                               self.records.get(info.name), self._vni(info)))
        elif event.action == "destroy":
            if network_id in self._removed_here:
                self._removed_here.discard(network_id)  # our own removal
                return True
            record = self.records.get(name)
            if record is None or record.network_id != network_id:
                return True
            self._drop_record(name)
            if record.catalogued and not record.removing:
                # `docker network rm` here: the network goes from every host, as
                # it would with one cluster-wide network.
                self._withdraw[name] = record.subnet
                self.wants_pass = True
        elif event.action in ("connect", "disconnect"):
            self._on_membership(event, network_id, name)
        return True

    def _on_membership(self, event: EngineEvent, network_id: str, name: str) -> None:
        record = self.records.get(name)
        if record is None or record.network_id != network_id:
            return
        attached = self._attached.setdefault(network_id, {})
        containers = dict(record.containers)
        container_id = event.container_id
        if event.action == "connect":
            # No network inspect while containers come and go (Engine.endpoint_of says why);
            # the container inspect is shared with the name publisher.
            data = event.container(self.engine)
            found = endpoint_in(data, network_id) if data is not None else None
            if found is None:
                return  # gone again: its disconnect follows
            endpoint_id, container_name = found
            attached[container_id] = endpoint_id
            containers[endpoint_id] = container_name
        else:
            endpoint_id = attached.pop(container_id, None)
            if endpoint_id is None:
                return  # never seen attached: the next pass sets the record right
            containers.pop(endpoint_id, None)
        self._write(replace(record, containers=containers))
        if record.removing and not containers:
            self.wants_pass = True  # the last container left: the pass removes it

    # -- this host's records ------------------------------------------------------

    def _write(self, record: EngineNetwork) -> None:
        if self.records.get(record.name) != record:
            self.state.put_engine_network(record)
            self.records[record.name] = record

    def _drop_record(self, name: str) -> None:
        if self.records.pop(name, None) is not None:
            self.state.delete_engine_network(self.host, name)
