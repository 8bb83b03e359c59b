"""JSON schemas of the requests the engine sends, checked before any work.

Every field pyoverlay reads is held to what the engine sends: NetworkID and
EndpointID are 64 lowercase hex digits (libnetwork's stringid), a PoolID is
pyoverlay's own (the subnet it handed out, see driver/ipam.py), addresses
and CIDRs are dotted IPv4 or (where the engine sends IPv6) of IPv6's
characters and length (the driver parses them and says what is wrong with
one that has the shape but is no address), MACs six colon-separated octets, options
maps of the types the engine marshals. A request that fails is refused before
the driver sees it, so it can change nothing.

Unknown fields and unknown option keys pass: newer engines add some
(com.docker.network.enable_ipv4 in 28.0, com.docker.network.endpoint.ifname,
sysctls, and in 29.0 com.docker.network.endpoint.name on RequestAddress).
The clean-up calls (Delete*, Leave, Revoke, Release*) also accept an empty
ID: the engine's clean-up after a crash may hold one, and there is nothing
to undo for it.

Patterns are Python `re` (jsonschema uses re.search): `\\Z`, unlike `$`,
does not match before a trailing newline.
"""

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_PREFIX = r"/(?:3[0-2]|[12]?[0-9])"
# IPv6's shape: hex digits and colons (at least one), a dotted tail allowed; ipaddress decides the rest.
_IPV6 = r"[0-9a-fA-F]{0,4}:[0-9a-fA-F:.]{1,44}"
_PREFIX6 = r"/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9])"
_ANY_CIDR = f"{_IPV4}{_PREFIX}|{_IPV6}{_PREFIX6}"
_ANY_ADDRESS = f"{_IPV4}(?:{_PREFIX})?|{_IPV6}(?:{_PREFIX6})?"


def _pattern(regex: str, meaning: str, allow_empty: bool = False, null: bool = False) -> dict:
    """A string of one shape; `description` is what the refusal says was expected."""
    body = f"(?:{regex})?" if allow_empty else f"(?:{regex})"
    if allow_empty:
        meaning += " or empty"
    return {"type": ["string", "null"] if null else "string", "pattern": rf"^{body}\Z", "description": meaning}


_HEX64 = "[0-9a-f]{64}"
_ID_MEANING = "an ID of 64 lowercase hexadecimal digits, as Docker sends"
_POOL_MEANING = "a pool ID that pyoverlay handed out (a subnet such as 10.20.0.0/24 or fd00:20::/64)"
_CIDR_MEANING = "an IPv4 address or network in CIDR form such as 10.20.0.0/24"
_ADDRESS_MEANING = "an IP address such as 10.20.0.5 or fd00:20::5"
_CIDR6_MEANING = "an IPv6 address or network in CIDR form such as fd00:20::/64"
_ID = _pattern(_HEX64, _ID_MEANING)
_ID_OR_EMPTY = _pattern(_HEX64, _ID_MEANING, allow_empty=True)  # clean-up calls: unknown or empty is "nothing to do"
_POOL_ID = _pattern(_ANY_CIDR, _POOL_MEANING)
_POOL_ID_OR_EMPTY = _pattern(_ANY_CIDR, _POOL_MEANING, allow_empty=True)
_CIDR = _pattern(_IPV4 + _PREFIX, _CIDR_MEANING)  # a network or an address with its prefix length
_CIDR_OR_EMPTY = _pattern(_IPV4 + _PREFIX, _CIDR_MEANING, allow_empty=True, null=True)
_ADDRESS_OR_EMPTY = _pattern(_ANY_ADDRESS, _ADDRESS_MEANING, allow_empty=True, null=True)  # "a.b.c.d" or "a.b.c.d/n"
_ADDRESS = _pattern(_ANY_ADDRESS, _ADDRESS_MEANING)
_MAC_OR_EMPTY = _pattern("[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}", "a MAC address such as 02:42:ac:11:00:02",
                         allow_empty=True, null=True)
_CIDR6 = _pattern(_IPV6 + _PREFIX6, _CIDR6_MEANING)
_V6_OR_EMPTY = _pattern(_IPV6 + _PREFIX6, _CIDR6_MEANING, allow_empty=True, null=True)
# What `--subnet`/`--ip-range` may hold: either family (the driver checks it against V6).
_POOL_REQUEST = _pattern(_ANY_CIDR, _CIDR_MEANING + " or fd00:20::/64", allow_empty=True, null=True)
_SANDBOX_KEY = _pattern(r"/[^\x00]{0,4095}", "an absolute path", allow_empty=True)
_STR = {"type": "string", "maxLength": 256}
_BOOL = {"type": ["boolean", "null"]}
# The engine sends booleans; a hand-written request may say "true"/"false".
_FLAG = {"anyOf": [{"type": ["boolean", "null"]}, {"enum": ["true", "false", ""]}]}
_OPTIONS = {"type": ["object", "null"]}
# map[string]string on the engine's side (driver -o options, IPAM options).
_STRING_MAP = {"type": ["object", "null"], "additionalProperties": {"type": "string", "maxLength": 4096}}

def _ipam_data(cidr: dict, cidr_or_empty: dict) -> dict:
    return {
        "type": ["array", "null"],
        "maxItems": 16,
        "items": {
            "type": "object",
            "properties": {
                "AddressSpace": _STR,
                "Pool": cidr,
                "Gateway": cidr_or_empty,
                "AuxAddresses": {"type": ["object", "null"], "additionalProperties": cidr},
            },
            "required": ["Pool"],
        },
    }


_IPAM_DATA = _ipam_data(_CIDR, _CIDR_OR_EMPTY)
_IPAM_DATA6 = _ipam_data(_CIDR6, _V6_OR_EMPTY)


def _call(required: dict, optional: dict | None = None) -> dict:
    return {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": sorted(required),
    }


_NET = {"NetworkID": _ID}
_EP = {"NetworkID": _ID, "EndpointID": _ID}
_NET_CLEANUP = {"NetworkID": _ID_OR_EMPTY}
_EP_CLEANUP = {"NetworkID": _ID_OR_EMPTY, "EndpointID": _ID_OR_EMPTY}

_NETWORK_OPTIONS = {
    **_OPTIONS,
    "properties": {
        # The -o options: map[string]string on the engine's side.
        "com.docker.network.generic": _STRING_MAP,
        "com.docker.network.enable_ipv6": _FLAG,
        "com.docker.network.enable_ipv4": _FLAG,
        "com.docker.network.internal": _FLAG,
    },
}
_PORT = {"type": "integer", "minimum": 0, "maximum": 65535}
# libnetwork's types.PortBinding; gateway mode publishes these (driver/gateway.py).
_PORTMAP = {
    "type": ["array", "null"],
    "maxItems": 65536,
    "items": {
        "type": "object",
        "properties": {"Proto": {"type": "integer"}, "IP": {"type": ["string", "null"], "maxLength": 64},
                       "Port": _PORT, "HostIP": {"type": ["string", "null"], "maxLength": 64},
                       "HostPort": _PORT, "HostPortEnd": _PORT},
        "required": ["Proto", "Port"],
    },
}
_ENDPOINT_OPTIONS = {
    **_OPTIONS,
    "properties": {
        "com.docker.network.endpoint.ifname": {"type": ["string", "null"], "maxLength": 15},
        "com.docker.network.portmap": _PORTMAP,
        "com.docker.network.endpoint.exposedports": {"type": ["array", "null"]},
    },
}

SCHEMAS = {
    "NetworkDriver.CreateNetwork": _call(
        _NET,
        {"Options": _NETWORK_OPTIONS, "IPv4Data": _IPAM_DATA, "IPv6Data": _IPAM_DATA6},
    ),
    "NetworkDriver.DeleteNetwork": _call(_NET_CLEANUP),
    "NetworkDriver.CreateEndpoint": _call(
        _EP,
        {
            "Options": _ENDPOINT_OPTIONS,
            "Interface": {
                "type": ["object", "null"],
                "properties": {"Address": _CIDR_OR_EMPTY, "AddressIPv6": _V6_OR_EMPTY, "MacAddress": _MAC_OR_EMPTY},
            },
        },
    ),
    "NetworkDriver.DeleteEndpoint": _call(_EP_CLEANUP),
    "NetworkDriver.EndpointOperInfo": _call(_EP),
    "NetworkDriver.Join": _call(_EP, {"SandboxKey": _SANDBOX_KEY, "Options": _ENDPOINT_OPTIONS}),
    "NetworkDriver.Leave": _call(_EP_CLEANUP),
    "NetworkDriver.ProgramExternalConnectivity": _call(_EP, {"Options": _ENDPOINT_OPTIONS}),
    "NetworkDriver.RevokeExternalConnectivity": _call(_EP_CLEANUP),
    "NetworkDriver.AllocateNetwork": _call(_NET, {"Options": _OPTIONS}),
    "NetworkDriver.FreeNetwork": _call(_NET_CLEANUP),
    "NetworkDriver.DiscoverNew": _call({"DiscoveryType": {"type": "integer"}}),
    "NetworkDriver.DiscoverDelete": _call({"DiscoveryType": {"type": "integer"}}),
    "IpamDriver.RequestPool": _call(
        {"AddressSpace": _STR},
        {"Pool": _POOL_REQUEST, "SubPool": _POOL_REQUEST, "Options": _STRING_MAP, "V6": _BOOL},
    ),
    "IpamDriver.ReleasePool": _call({"PoolID": _POOL_ID_OR_EMPTY}),
    "IpamDriver.RequestAddress": _call({"PoolID": _POOL_ID}, {"Address": _ADDRESS_OR_EMPTY, "Options": _STRING_MAP}),
    "IpamDriver.ReleaseAddress": _call({"PoolID": _POOL_ID_OR_EMPTY, "Address": _ADDRESS}),
}
