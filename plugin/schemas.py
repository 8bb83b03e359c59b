"""JSON schemas of the requests the engine sends, checked before any work.

Only what pyoverlay reads is constrained; unknown fields pass, since newer
engines add some.
"""

_ID = {"type": "string", "pattern": "^[0-9a-zA-Z_.-]{1,128}$"}
_STR = {"type": "string"}
_OPT_STR = {"type": ["string", "null"]}
_OPTIONS = {"type": ["object", "null"]}

_IPAM_DATA = {
    "type": ["array", "null"],
    "items": {
        "type": "object",
        "properties": {
            "AddressSpace": _STR,
            "Pool": _STR,
            "Gateway": _OPT_STR,
            "AuxAddresses": {"type": ["object", "null"]},
        },
        "required": ["Pool"],
    },
}


def _call(required: dict, optional: dict | None = None) -> dict:
    return {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": sorted(required),
    }


_NET = {"NetworkID": _ID}
_EP = {"NetworkID": _ID, "EndpointID": _ID}

SCHEMAS = {
    "NetworkDriver.CreateNetwork": _call(
        _NET,
        {
            # The -o options: a map, or the driver would iterate a string or number.
            "Options": {**_OPTIONS, "properties": {"com.docker.network.generic": {"type": ["object", "null"]}}},
            "IPv4Data": _IPAM_DATA,
            "IPv6Data": _IPAM_DATA,
        },
    ),
    "NetworkDriver.DeleteNetwork": _call(_NET),
    "NetworkDriver.CreateEndpoint": _call(
        _EP,
        {
            "Options": _OPTIONS,
            "Interface": {
                "type": ["object", "null"],
                "properties": {"Address": _OPT_STR, "AddressIPv6": _OPT_STR, "MacAddress": _OPT_STR},
            },
        },
    ),
    "NetworkDriver.DeleteEndpoint": _call(_EP),
    "NetworkDriver.EndpointOperInfo": _call(_EP),
    "NetworkDriver.Join": _call(_EP, {"SandboxKey": _STR, "Options": _OPTIONS}),
    "NetworkDriver.Leave": _call(_EP),
    "NetworkDriver.ProgramExternalConnectivity": _call(_EP, {"Options": _OPTIONS}),
    "NetworkDriver.RevokeExternalConnectivity": _call(_EP),
    "NetworkDriver.AllocateNetwork": _call(_NET, {"Options": _OPTIONS}),
    "NetworkDriver.FreeNetwork": _call(_NET),
    "NetworkDriver.DiscoverNew": _call({"DiscoveryType": {"type": "integer"}}),
    "NetworkDriver.DiscoverDelete": _call({"DiscoveryType": {"type": "integer"}}),
    "IpamDriver.RequestPool": _call(
        {"AddressSpace": _STR},
        {"Pool": _OPT_STR, "SubPool": _OPT_STR, "Options": _OPTIONS, "V6": {"type": ["boolean", "null"]}},
    ),
    "IpamDriver.ReleasePool": _call({"PoolID": _STR}),
    "IpamDriver.RequestAddress": _call({"PoolID": _STR}, {"Address": _OPT_STR, "Options": _OPTIONS}),
    "IpamDriver.ReleaseAddress": _call({"PoolID": _STR, "Address": _STR}),
}
