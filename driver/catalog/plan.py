"""The catalog's pass as a pure function: what the engine and this host's
records must become, given the catalog. No store, no engine: data in, actions
out (as Dataplane.set_peers plans before it programs). apply.py carries the
actions out; an action whose outcome depends on the store or the engine at
that moment (Publish, Create, Remove) decides the rest there.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Union

from ..engine import EngineNetworkInfo
from ..model import EngineNetwork, NamedNetwork


# The actions (apply.py carries them out, in order):
DropRecord = NamedTuple("DropRecord", [("name", str)])  # engine/<host>/<name> no longer says anything true
Publish = NamedTuple("Publish", [("info", EngineNetworkInfo), ("vni", int)])  # offer it to the catalog (if absent)
Create = NamedTuple("Create", [("entry", NamedNetwork)])  # the catalog has it, this engine does not
Remove = NamedTuple("Remove", [("info", EngineNetworkInfo)])  # out of the catalog, unused here: remove it
Later = NamedTuple("Later", [("name", str), ("why", str)])  # nothing to do yet: make the next pass soon


class Record(NamedTuple):
    """Write this record if it differs from the last one written; note: logged when it does."""

    record: EngineNetwork
    note: str = ""
    warn: bool = False  # note at warning level


Action = Union[DropRecord, Record, Publish, Create, Remove, Later]


def plan(host: str, driver: str, desired: Mapping[str, NamedNetwork], ours: Mapping[str, EngineNetworkInfo],
         names: Mapping[str, str], records: Mapping[str, EngineNetwork], vnis: Mapping[str, int],
         withdrawing=()) -> list[Action]:
    """One full pass.

    desired: the catalog (name -> entry); ours: our driver's networks in the
    engine, inspected (name -> info); names: every engine network's name ->
    its driver; records: this host's engine/ records (name -> record); vnis:
    network ID -> the VNI of its overlay (0: not in the store yet);
    withdrawing: names removed here by a user, still to leave the catalog."""
    actions: list[Action] = []
    kept = dict(records)
    for name, record in records.items():
        info = ours.get(name)
        if record.network_id and (info is None or info.id != record.network_id):
            actions.append(DropRecord(name))  # removed or replaced while nobody was watching
            del kept[name]
        elif not record.network_id and (name not in desired or name in ours):
            actions.append(DropRecord(name))  # a refusal that no longer applies
            del kept[name]
    for name, info in ours.items():
        actions += plan_network(host, driver, info, desired.get(name), kept.get(name), vnis.get(info.id, 0))
    for name, entry in desired.items():
        if name in ours or name in withdrawing:
            continue
        other = names.get(name)
        if other is not None:
            actions.append(refused(host, entry, f"a {other or 'other'} network named {name} already exists "
                                                 "on this host; remove or rename it to get the catalog's network"))
        else:
            actions.append(Create(entry))
    return actions


def plan_network(host: str, driver: str, info: EngineNetworkInfo, entry: Optional[NamedNetwork],
                 record: Optional[EngineNetwork], vni: int) -> list[Action]:
    """One of our driver's networks in the engine, against its catalog entry
    (None: not in the catalog) and this host's record of it."""
    if record is not None and record.network_id != info.id:
        record = None
    if entry is None:
        if record is not None and record.catalogued:
            return remove(host, info)
        if info.ipam_driver != driver:
            return []  # the driver refuses such networks; nothing to share
        if not vni:
            return [Later(info.name, "the driver's record is not in the store (yet)")]
        return [Publish(info, vni)]
    if entry.matches(info, vni):
        return [Record(EngineNetwork(info.name, host, info.id, info.subnet, dict(info.containers), catalogued=True))]
    if record is not None and record.removing:
        return remove(host, info)  # the old definition, still in use; the new one comes after it
    # An operator must act; retrying changes nothing.
    return [Record(EngineNetwork(
        info.name, host, info.id, info.subnet, dict(info.containers),
        error=f"this host's network {info.name} on {_subnets(info)} differs from the catalog's on "
              f"{entry.subnets()}; remove it here (docker network rm {info.name}) to get the catalog's",
    ))]


def _subnets(info: EngineNetworkInfo) -> str:
    return " ".join(filter(None, (info.subnet, info.subnet6)))


def remove(host: str, info: EngineNetworkInfo) -> list[Action]:
    if not info.containers:
        return [Remove(info)]
    names = ", ".join(sorted(info.containers.values()))
    return [Record(EngineNetwork(info.name, host, info.id, info.subnet, dict(info.containers),
                                 catalogued=True, removing=True),
                   note=f"network {info.name} left the catalog; kept while in use by {names}")]


def refused(host: str, entry: NamedNetwork, why: str) -> Record:
    """The record of a catalog network this engine does not have, and why."""
    return Record(EngineNetwork(entry.name, host, subnet=entry.subnet, error=why),
                  note=f"network {entry.name}: {why}", warn=True)
