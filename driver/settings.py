"""Flag defaults and the PYOVERLAY_* environment, in one bottom-level module.

Every command line (plugin/cli.py's `serve`, ops/'s operator commands) takes
its defaults from here, so none imports another to learn one. It imports
nothing of plugin/ or ops/ (only driver/defaults.py's constants), so any
module may import it without a circle. A default is written as the text a
PYOVERLAY_<FLAG> would carry: argparse converts both the same way, and
packaging/pyoverlay.env shows the same text.
"""

from __future__ import annotations

import os
from typing import Optional

from driver.defaults import DEFAULT_POOL, DRIVER_NAME, ENCRYPTED_VXLAN_PORT, KEY_ROTATION, VXLAN_PORT, WIREGUARD_PORT

DEFAULT_SOCKET = f"/run/docker/plugins/{DRIVER_NAME}.sock"
DEFAULT_STORE = "sqlite:///var/lib/pyoverlay/state.db"
DEFAULT_ETCD_PREFIX = "/pyoverlay/"
DEFAULT_VXLAN_PORT = str(VXLAN_PORT)
DEFAULT_DEFAULT_POOL = DEFAULT_POOL
DEFAULT_LOG_LEVEL = "info"
DEFAULT_LOG_FORMAT = "text"
DEFAULT_BLOCK_GRACE = "120"  # seconds an empty address block stays with its host
DEFAULT_DNS_ADDR = "169.254.53.53"
DEFAULT_NAMES_TTL = "10"  # seconds a dead host's names outlive it
DEFAULT_DAEMON_JSON = "/etc/docker/daemon.json"
# Encrypted overlays (driver/encryption.py).
DEFAULT_KEY_ROTATION = str(KEY_ROTATION)  # "43200"  # seconds between a host's exchange keys
DEFAULT_KEY_DIR = "/var/lib/pyoverlay/keys"  # this host's private keys (<dir>/<host>.json, 0600)
DEFAULT_ENCRYPTED_VXLAN_PORT = str(ENCRYPTED_VXLAN_PORT)
DEFAULT_WIREGUARD_PORT = str(WIREGUARD_PORT)
DEFAULT_WAIT = 10.0  # seconds `pyoverlay network create|rm` waits for the hosts

_OFF = ("0", "false", "no", "off")


def env(name: str, default: Optional[str] = None) -> Optional[str]:
    """PYOVERLAY_<name>, else default."""
    return os.environ.get("PYOVERLAY_" + name, default)


def env_on(name: str, default: str = "1") -> bool:
    """A switch (--catalog, --dns): off when PYOVERLAY_<name> is 0/false/no/off."""
    return env(name, default).lower() not in _OFF
