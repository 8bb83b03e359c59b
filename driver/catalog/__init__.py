"""Cluster-wide network names: a network created on one host appears on all.

The driver protocol never carries a network's name, so the catalog learns
names from the local engine's API and keeps them in the store:

    local engine   -- events, inspect -->  catalog/<name>   (publish)
    catalog/<name> -- store watch ----->   local engine     (create, remove)

One module per job:
    table.py   the store watch: catalog/ as a table of desired networks
    plan.py    pure: desired vs the engine's networks vs this host's records -> actions
    apply.py   carries the actions out (engine, store) and handles engine events
    worker.py  Catalog: the threads, passes and back-off
The engine's events come from driver/events.py (one stream per process,
shared with the name publisher); what the store holds for this host that the
engine lost is swept by driver/leftovers.py, on every pass.

Each host keeps engine/<host>/<name> for the catalog names its engine holds:
the network ID, the containers on it (names for `pyoverlay status`), whether
it waits for containers to leave before it goes (for `pyoverlay network rm`),
or why the engine refused to create it. After a restart, that record tells a
network deleted from the catalog while this host was away (it had a record:
remove it) from one created here meanwhile (no record: publish it).

Deleting a catalog entry (`pyoverlay network rm`, or `docker network rm` on
any host) removes the network from every engine where no container uses it;
where one does, the record says so and the network goes when the last
container leaves.
"""

from ..leftovers import PHANTOM_GRACE
from .apply import ENGINE_MISCOUNT
from .worker import RESYNC, Catalog

__all__ = ["Catalog", "ENGINE_MISCOUNT", "PHANTOM_GRACE", "RESYNC"]
