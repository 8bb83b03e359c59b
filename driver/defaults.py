"""Values with one meaning across the tree, defined once (issue 12, item 6).

Imports nothing: the driver, the HTTP face, the operator commands and the
flag defaults (driver/settings.py) all read them from here.
"""

#: What the engine calls the driver when the socket is pyoverlay.sock (a managed
#: plugin is pyoverlay:latest); also the IPAM's address space.
DRIVER_NAME = "pyoverlay"
ADDRESS_SPACE = "pyoverlay"
#: IANA's VXLAN port; every host of an overlay must use the same one.
VXLAN_PORT = 4789
#: The UDP port of -o encrypted=true overlays' VXLAN, carried inside the hosts'
#: WireGuard tunnel (driver/dataplane/crypto.py); the same on every host.
ENCRYPTED_VXLAN_PORT = 4790
#: What the tunnel adds per packet: IPv4 + UDP + WireGuard's header and tag.
TUNNEL_OVERHEAD = 60
#: WireGuard's listen port for the tunnel between hosts.
WIREGUARD_PORT = 51820
#: Seconds between rotations of a host's key-exchange key (as Docker's 12 h).
KEY_ROTATION = 12 * 3600
#: The network create options every door reads (docker -o, the catalog, pyoverlay network create).
OPT_VNI = "vni"
OPT_MTU = "com.docker.network.driver.mtu"
#: true: the overlay floods broadcast and multicast to every host with a container on it.
OPT_MULTICAST = "multicast"
#: true: the overlay's VXLAN between hosts is encrypted and authenticated (driver/encryption.py).
OPT_ENCRYPTED = "encrypted"
#: -o encap=always|cross-subnet|never (direct mode, driver/dataplane/direct.py)
OPT_ENCAP = "encap"
#: The VXLAN network identifier is 24 bits; 0 means none.
VNI_MAX = 2**24 - 1
#: Where a /24 comes from for a network created without --subnet.
DEFAULT_POOL = "10.213.0.0/16"
