"""The CNM model as pyoverlay keeps it in the store.

An Overlay is the cluster-wide L2 segment (one VNI, one subnet). Each host's
engine has its own NetworkID for it (the driver is local-scope), so a Network
is one host's view of an Overlay. An Endpoint is one container interface on a
Network; its Peer record is what every other host needs to reach it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import json


class Record:
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Peer(Record):
    """A remote endpoint as the VXLAN device needs it."""

    ip: str
    mac: str
    vtep: str  # underlay address of the host that holds the endpoint
