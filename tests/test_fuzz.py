"""Property-based fuzzing of every call the plugin answers (hypothesis).

Three kinds of input go to the real app over a real dataplane (a throw-away
host namespace) and an in-memory store: structured near-valid bodies (the
right keys with wrong types, odd CIDRs, huge and unicode strings, nulls, the
IDs of objects that exist), arbitrary JSON to any call, and arbitrary bytes.
For every answer:

- it is a JSON object; 200 with a result of the call's shape, or an error
  status with exactly {"Err": msg} (network driver) / {"Error": msg} (IPAM);
- no refusal is an "internal error" (an exception the code did not expect);
- a refused request changes neither the store nor the kernel (links, overlay
  namespaces, their links, FDB and neighbour entries are compared).

A shorter run drives the real `pyoverlay serve` (gunicorn) over its unix
socket, adding malformed HTTP, and checks the process never dies.

Example counts: PYO_FUZZ_EXAMPLES scales them (default 1: about 3,300 inputs in 75 s).
Inputs follow from PYOVERLAY_TEST_SEED (tests/seed.py), printed by every test.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from pyroute2 import IPRoute

from plugin.app import _routes
from tests.conftest import HostNamespace, PluginUnderTest, new_id
from ops.client import UnixHTTPConnection
from tests.hosts import wait_for
from tests.reliability import record
from tests.seed import ENV as SEED_ENV, SEED, announce

SCALE = float(os.environ.get("PYO_FUZZ_EXAMPLES", "1"))
from unittest.mock import Mock  # noqa: E402

CALLS = sorted(_routes(Mock(), Mock()))  # every call the app routes
UNKNOWN = ["NetworkDriver.NoSuchCall", "IpamDriver.", "Plugin.Deactivate", "", "a" * 300, "Nétwork.Ünïcode"]
COUNTS: dict[str, int] = {}

FUZZ = settings(
    deadline=None,
    # The inputs follow from PYOVERLAY_TEST_SEED (tests/seed.py; fixed in CI,
    # fresh on a developer's run), printed by each test, so any run replays.
    database=None,  # nothing written into the checkout; failures print their reproduction
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz(n: int):
    """max_examples scaled by PYO_FUZZ_EXAMPLES, inputs drawn from the test seed."""
    def apply(test):
        return seed(SEED)(settings(FUZZ, max_examples=max(10, int(n * SCALE)))(test))
    return apply


@pytest.fixture(autouse=True)
def _print_seed(request):
    announce(request.node.name)


# -- strategies -----------------------------------------------------------------

# Stand-ins for the IDs of objects that exist when the example runs; the test
# substitutes them, so a shrunk failure still names "the existing network".
NET, EP, POOL, ADDR, GW = "@net", "@ep", "@pool", "@addr", "@gw"

huge = st.builds(lambda c, n: c * n, st.sampled_from(["A", "é", "\x00", "𝔘", "10.20.0.0/24,", "\\"]),
                 st.integers(1000, 300_000))
odd_text = st.sampled_from([
    "", " ", "..", ".", "-", "_", "../../etc/passwd", "a b", "a/b", "a\nb", "\x00", "é", "💥",
    "null", "true", "0", "-1", "1e400", "NaN", "0x10", "١٢٣", "a" * 129, "A" * 64,
])
junk = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63), st.floats(),
    st.text(max_size=30), odd_text, huge,
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
# IDs the engine never sends (it sends 64 lowercase hex digits): other lengths,
# upper case, non-hex, dotted quads, negative numbers, padding, lookalikes.
malformed_ids = st.one_of(
    st.sampled_from(["999.1.1.1", "-1", "0", "1.2.3.4", "0x" + "a" * 62, "a" * 64 + "\n", " " + "a" * 63, "a" * 63 + " ",
                     "../" + "a" * 61, "ａ" * 64, "a" * 64 + "\x00"]),
    st.text("0123456789abcdef", min_size=1, max_size=63),
    st.text("0123456789abcdef", min_size=65, max_size=130),
    hex64.filter(lambda h: any(c in "abcdef" for c in h)).map(str.upper),
    st.builds(lambda h, i, c: h[:i] + c + h[i + 1:], hex64, st.integers(0, 63), st.sampled_from("gGzZ-_.:/ xX")),
    st.from_regex(r"\A[0-9a-zA-Z_.-]{1,128}\Z").filter(lambda t: not re.fullmatch("[0-9a-f]{64}", t)),
)
ids = st.one_of(hex64, malformed_ids, odd_text, junk)
ipv4 = st.ip_addresses(v=4).map(str)
ODD_CIDRS = [
    "10.20.0.0/24", "10.20.0.0/33", "10.20.0.1/24", "10.20.0.0/-1", "10.20.0.0/", "/24", "10.20.0/24",
    "0.0.0.0/0", "255.255.255.255/32", "10.20.0.0/31", "10.20.0.0/30", "224.0.0.0/4", "127.0.0.0/8",
    " 10.20.0.0/24", "10.20.0.0/24\x00", "10.020.0.0/24", "1.2.3.4.5/24", "::/0", "fd00::/64",
    "10.20.0.0/255.255.255.0", "１０.20.0.0/24",
]
cidrs = st.one_of(
    st.sampled_from(ODD_CIDRS),
    st.builds(lambda a, n: f"{a}/{n}", ipv4, st.integers(-2, 40)),
    st.builds(lambda n: str(ipaddress.ip_network(f"10.{n >> 8 & 255}.{n & 255}.0/24")), st.integers(0, 2**16 - 1)),
    st.ip_addresses(v=6).map(lambda a: f"{a}/64"),
    st.text(max_size=20), junk,
)
addresses = st.one_of(ipv4, cidrs, st.sampled_from([ADDR, GW, "10.30.0.2", "10.30.0.1", "10.30.0.255", "10.30.0.0"]))
macs = st.one_of(
    st.sampled_from(["", "02:42:ac:11:00:02", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "00:00:00:00:00:00",
                     "02:42:AC:11:00:02", "0242ac110002", "zz:zz:zz:zz:zz:zz"]),
    st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b)),
    junk,
)
options = st.one_of(
    junk,
    st.fixed_dictionaries({}, optional={
        "com.docker.network.generic": st.one_of(junk, st.dictionaries(
            st.one_of(st.sampled_from(["vni", "com.docker.network.driver.mtu", "multicast"]), st.text(max_size=10)),
            st.one_of(st.integers(-5, 2**25).map(str), st.integers(-5, 2**25), st.sampled_from(["true", "false"]),
                      junk), max_size=3)),
        "com.docker.network.enable_ipv6": junk,
        "com.docker.network.internal": junk,
        "RequestAddressType": st.one_of(st.just("com.docker.network.gateway"), junk),
    }),
)
ipam_data = st.one_of(junk, st.lists(st.one_of(junk, st.fixed_dictionaries({}, optional={
    "AddressSpace": st.one_of(st.just("pyoverlay"), st.just("LocalDefault"), junk),
    "Pool": cidrs, "Gateway": cidrs, "AuxAddresses": junk,
})), max_size=3))

FIELDS = {
    "NetworkID": st.one_of(st.just(NET), ids),
    "EndpointID": st.one_of(st.just(EP), ids),
    "Options": options,
    "IPv4Data": ipam_data,
    "IPv6Data": ipam_data,
    "Interface": st.one_of(junk, st.fixed_dictionaries({}, optional={
        "Address": addresses, "AddressIPv6": st.one_of(st.just(""), cidrs), "MacAddress": macs})),
    "SandboxKey": st.one_of(st.text(max_size=40), junk),
    "DiscoveryType": st.one_of(st.integers(), junk),
    "DiscoveryData": junk,
    "AddressSpace": st.one_of(st.sampled_from(["pyoverlay", "", "LocalDefault", "GlobalDefault"]), junk),
    "Pool": st.one_of(st.just(""), cidrs),
    "SubPool": st.one_of(st.just(""), cidrs),
    "V6": st.one_of(st.booleans(), junk),
    "PoolID": st.one_of(st.just(POOL), cidrs),
    "Address": addresses,
}


@st.composite
def structured(draw):
    """A call with (mostly) its own keys, each filled with something plausible or odd."""
    call = draw(st.sampled_from(CALLS))
    keys = [k for k in FIELDS if draw(st.integers(0, 9)) < 6]
    body = {k: draw(FIELDS[k]) for k in keys}
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=10))] = draw(junk)  # an unknown key, as newer engines add
    return call, body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
any_call = st.one_of(st.sampled_from(CALLS), st.sampled_from(UNKNOWN), st.text(max_size=30))
raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"[" * 100_000, b'{"a":' * 50_000, b"\xff\xfe{}", b"{\"NetworkID\": \"\\ud800\"}", b"1e999999",
                     b"\x00" * 10, b"{} {}", b"\n\n", b'{"NetworkID": "a", "NetworkID": 5}']),
    json_values.map(lambda v: json.dumps(v).encode()),
)


# -- the system under test and its observers ------------------------------------


class Kernel:
    """What the kernel holds for one test host, read over netlink by handles of
    the test's own (the dataplane's are never consulted)."""

    def __init__(self, host: HostNamespace):
        self.host = host
        self._handles: dict[str, tuple[int, IPRoute]] = {}

    def _ipr(self, path: str) -> IPRoute:
        inode = os.stat(path).st_ino
        held = self._handles.get(path)
        if held and held[0] == inode:
            return held[1]
        if held:
            held[1].close()
        ipr = IPRoute(netns=path, flags=0, groups=0)
        self._handles[path] = (inode, ipr)
        return ipr

    @staticmethod
    def _links(ipr: IPRoute) -> frozenset:
        return frozenset(
            (l.get_attr("IFLA_IFNAME"), l.get_attr("IFLA_MTU"), l.get_attr("IFLA_ADDRESS"),
             l.get_attr("IFLA_MASTER"), l["flags"] & 1)
            for l in ipr.link("dump"))

    def snapshot(self) -> dict:
        state = {"host": self._links(self._ipr(f"/run/netns/{self.host.name}"))}
        for name in sorted(os.listdir(self.host.netns_dir)):
            path = os.path.join(self.host.netns_dir, name)
            if os.stat(path).st_dev != os.stat("/proc/self/ns/net").st_dev:
                state[name] = "not a namespace"
                continue
            ipr = self._ipr(path)
            # Unicast FDB entries and permanent neighbours: what a driver programs.
            # (The kernel adds and drops multicast entries on its own.)
            fdb = frozenset((m["ifindex"], m.get_attr("NDA_LLADDR"), m.get_attr("NDA_DST"), m["state"])
                            for m in ipr.fdb("dump") if not int(m.get_attr("NDA_LLADDR")[:2], 16) & 1)
            neigh = frozenset((m["ifindex"], m.get_attr("NDA_DST"), m.get_attr("NDA_LLADDR"))
                              for m in ipr.neigh("dump") if m["state"] & NUD_PERMANENT)
            state[name] = (self._links(ipr), fdb, neigh)
        return state

    def close(self) -> None:
        for _, ipr in self._handles.values():
            ipr.close()


class World:
    """The plugin with something in place (a network, a joined endpoint), so a
    refused request has something to damage. Rebuilt when a fuzzed request
    that was valid enough took it down."""

    def __init__(self, plugin: PluginUnderTest):
        self.plugin = plugin
        self.ids: dict[str, str] = {}
        self._subnets = (f"10.30.{n}.0/24" for n in range(256))

    def ensure(self) -> None:
        ids = self.ids
        if ids and self.plugin.store.get(f"endpoints/{ids[EP]}") and self.plugin.store.get(f"networks/{ids[NET]}"):
            return
        for attempt in range(2):
            try:
                self._build(next(self._subnets))
                return
            except AssertionError:
                # Fuzzed pools (0.0.0.0/0 ...) may overlap every subnet: let them go.
                self.release_pools()
        raise AssertionError("could not rebuild the baseline network")

    def release_pools(self, but: str = "") -> None:
        for kv in self.plugin.store.list("pools/")[0]:
            subnet = json.loads(kv.value)["subnet"]
            if subnet != but:
                self.plugin.call("IpamDriver.ReleasePool", {"PoolID": subnet})

    def _build(self, subnet: str) -> None:
        call = self.plugin.call
        status, pool = call("IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": subnet})
        assert status == 200, pool
        status, gw = call("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "",
                                                        "Options": {"RequestAddressType": "com.docker.network.gateway"}})
        assert status == 200, gw
        network_id, endpoint_id = new_id(), new_id()
        status, answer = call("NetworkDriver.CreateNetwork", {
            "NetworkID": network_id, "Options": {"com.docker.network.generic": {}},
            "IPv4Data": [{"AddressSpace": "pyoverlay", "Pool": pool["Pool"], "Gateway": gw["Address"]}]})
        assert status == 200, answer
        status, addr = call("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": None})
        assert status == 200, addr
        status, answer = call("NetworkDriver.CreateEndpoint", {
            "NetworkID": network_id, "EndpointID": endpoint_id, "Interface": {"Address": addr["Address"]}})
        assert status == 200, answer
        status, answer = call("NetworkDriver.Join", {"NetworkID": network_id, "EndpointID": endpoint_id,
                                                     "SandboxKey": "/var/run/docker/netns/fuzz"})
        assert status == 200, answer
        self.ids = {NET: network_id, EP: endpoint_id, POOL: pool["PoolID"],
                    ADDR: addr["Address"].split("/")[0], GW: gw["Address"].split("/")[0]}

    def substitute(self, value):
        if isinstance(value, str):
            return self.ids.get(value, value)
        if isinstance(value, list):
            return [self.substitute(v) for v in value]
        if isinstance(value, dict):
            return {k: self.substitute(v) for k, v in value.items()}
        return value


@pytest.fixture(scope="module")
def world():
    host = HostNamespace()
    plugin = PluginUnderTest(host)
    kernel = Kernel(host)
    try:
        yield World(plugin), kernel
    finally:
        kernel.close()
        for vni in plugin.dataplane.networks():
            plugin.dataplane.delete_network(vni)
        plugin.close()
        host.remove()
        total = sum(COUNTS.values())
        if total:
            record("fuzzing, in-process app", did=f"{total} requests to {len(CALLS)} calls "
                   f"({', '.join(f'{k} {v}' for k, v in sorted(COUNTS.items()))})",
                   held="every answer well-formed; no internal error; refused requests changed neither store nor kernel",
                   inputs=total, **{f"inputs_{k}": v for k, v in COUNTS.items()})


# -- checking one answer ----------------------------------------------------------

NUD_PERMANENT = 0x80
_CIDR = re.compile(r"^\d+\.\d+\.\d+\.\d+/\d+$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def check_result(call: str, result: dict) -> None:
    """A 200 answer has the shape the engine expects for that call."""
    if call == "Plugin.Activate":
        assert result == {"Implements": ["NetworkDriver", "IpamDriver"]}
    elif call == "NetworkDriver.GetCapabilities":
        assert result == {"Scope": "local", "ConnectivityScope": "global"}
    elif call == "IpamDriver.GetCapabilities":
        assert set(result) == {"RequiresMACAddress", "RequiresRequestReplay"}
    elif call == "IpamDriver.GetDefaultAddressSpaces":
        assert set(result) == {"LocalDefaultAddressSpace", "GlobalDefaultAddressSpace"}
    elif call == "IpamDriver.RequestPool":
        assert set(result) == {"PoolID", "Pool", "Data"}
        net = ipaddress.IPv4Network(result["Pool"])  # strict: a real network address
        assert str(net) == result["Pool"] and net.prefixlen <= 30
    elif call == "IpamDriver.RequestAddress":
        assert set(result) == {"Address", "Data"} and _CIDR.match(result["Address"])
        ipaddress.IPv4Interface(result["Address"])
    elif call == "NetworkDriver.CreateEndpoint":
        assert result == {} or (set(result) == {"Interface"} and set(result["Interface"]) == {"MacAddress"}
                                and _MAC.match(result["Interface"]["MacAddress"]))
    elif call == "NetworkDriver.Join":
        assert set(result) == {"InterfaceName"} and result["InterfaceName"]["DstPrefix"] == "eth"
        assert isinstance(result["InterfaceName"]["SrcName"], str)
    elif call == "NetworkDriver.EndpointOperInfo":
        assert set(result) == {"Value"} and isinstance(result["Value"], dict)
    elif call == "NetworkDriver.AllocateNetwork":
        assert result == {"Options": {}}
    else:
        assert result == {}, result


def exercise(world_and_kernel, kind: str, call: str, body=None, raw: bytes | None = None) -> None:
    world, kernel = world_and_kernel
    world.ensure()
    plugin = world.plugin
    # An earlier accepted Leave's veth deletion runs in the background: let it
    # finish, or it would read as this call's change to the kernel.
    wait_for(lambda: not plugin.dataplane.pending(), 10, "the dataplane's queued deletions")
    store_before, kernel_before = plugin.store_snapshot(), kernel.snapshot()
    # Quoted as a client would put it on the wire ("//x" would otherwise read as a host name).
    response = plugin.client.post("/" + urllib.parse.quote(call, safe=""), data=raw if raw is not None else json.dumps(body).encode())
    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    status, text = response.status_code, response.get_data(as_text=True)
    answer = json.loads(text)  # well-formed JSON, whatever came in
    assert isinstance(answer, dict), text
    key = "Error" if call.startswith("IpamDriver.") else "Err"
    if status == 200 and key not in answer:
        check_result(call, answer)
        return
    # A refused IPAM call is a 200 with "Error" (plugin/app.py: _refuse).
    assert status in ((200, 404) if key == "Error" else (400, 404, 500)) and set(answer) == {key}, (status, answer)
    assert isinstance(answer[key], str) and answer[key].strip()
    assert "internal error" not in answer[key], answer[key]
    assert status != 404 or call not in CALLS, answer
    assert plugin.store_snapshot() == store_before, f"refused {call} changed the store"
    assert kernel.snapshot() == kernel_before, f"refused {call} changed the kernel"


@fuzz(1800)
@given(request=structured())
def test_structured_near_valid_bodies(world, request):
    call, body = request
    exercise(world, "structured", call, world[0].substitute(body))


@fuzz(700)
@given(call=any_call, body=json_values)
def test_arbitrary_json_to_any_call(world, call, body):
    exercise(world, "json", call, body)


@fuzz(400)
@given(call=any_call, raw=raw_bodies)
def test_arbitrary_bytes_to_any_call(world, call, raw):
    exercise(world, "bytes", call, raw=raw)


ID_CALLS = {  # call -> the ID fields it carries
    "NetworkDriver.CreateNetwork": ("NetworkID",), "NetworkDriver.DeleteNetwork": ("NetworkID",),
    "NetworkDriver.CreateEndpoint": ("NetworkID", "EndpointID"), "NetworkDriver.Join": ("NetworkID", "EndpointID"),
    "NetworkDriver.Leave": ("NetworkID", "EndpointID"), "NetworkDriver.DeleteEndpoint": ("NetworkID", "EndpointID"),
    "NetworkDriver.EndpointOperInfo": ("NetworkID", "EndpointID"),
    "NetworkDriver.ProgramExternalConnectivity": ("NetworkID", "EndpointID"),
    "NetworkDriver.RevokeExternalConnectivity": ("NetworkID", "EndpointID"),
    "NetworkDriver.AllocateNetwork": ("NetworkID",), "NetworkDriver.FreeNetwork": ("NetworkID",),
    "IpamDriver.RequestAddress": ("PoolID",), "IpamDriver.ReleaseAddress": ("PoolID",), "IpamDriver.ReleasePool": ("PoolID",),
}
malformed_pool_ids = st.one_of(malformed_ids, st.sampled_from([
    "10.30.0.0/33", "10.30.0.0", "10.030.0.0/24", "LocalDefault/10.30.0.0/24", "10.30.0.0/24\n", "-1",
    # IPv6 pool IDs are pyoverlay's too (fd00::/64); these are not.
    "fd00::/129", "fd00::", "fd00::/64\n", "LocalDefault/fd00::/64"]))


def valid_body(world: World, call: str, fresh: dict) -> dict:
    """A body that would be accepted (and, for the create calls, stored) as it is."""
    w = world.ids
    pool = w[POOL]
    if call == "NetworkDriver.CreateNetwork":
        status, pool_answer = world.plugin.call("IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": ""})
        if "no free /24 left" in pool_answer.get("Error", ""):
            # Each such body holds a default /24 that no example gives back: after
            # 256 of them, let every pool but the baseline's go and ask again.
            world.release_pools(but=pool)
            status, pool_answer = world.plugin.call("IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": ""})
        assert status == 200 and "Pool" in pool_answer, pool_answer
        return {"NetworkID": fresh["NetworkID"], "Options": {"com.docker.network.generic": {}},
                "IPv4Data": [{"AddressSpace": "pyoverlay", "Pool": pool_answer["Pool"], "Gateway": ""}]}
    if call == "NetworkDriver.CreateEndpoint":
        return {"NetworkID": w[NET], "EndpointID": fresh["EndpointID"], "Interface": {"Address": ""}}
    if call.startswith("IpamDriver."):
        return {"PoolID": pool, "Address": "" if call == "IpamDriver.RequestAddress" else w[ADDR]}
    return {"NetworkID": w[NET], "EndpointID": w[EP], "SandboxKey": "/var/run/docker/netns/fuzz"}


@fuzz(300)
@given(call=st.sampled_from(sorted(ID_CALLS)), which=st.integers(0, 1), bad=st.data())
def test_malformed_ids_are_refused_and_nothing_is_stored(world, call, which, bad):
    """Each call, otherwise valid, with one of its IDs malformed: refused,
    with a message naming the field, and neither store nor kernel changes."""
    w, kernel = world
    w.ensure()
    fields = ID_CALLS[call]
    field = fields[which % len(fields)]
    value = bad.draw(malformed_pool_ids if field == "PoolID" else malformed_ids, label=field)
    body = valid_body(w, call, {"NetworkID": new_id(), "EndpointID": new_id()})
    body[field] = value
    store_before, kernel_before = w.plugin.store_snapshot(), kernel.snapshot()
    status, answer = w.plugin.call(call, body)
    COUNTS["malformed_id"] = COUNTS.get("malformed_id", 0) + 1
    key = "Error" if call.startswith("IpamDriver.") else "Err"
    assert set(answer) == {key} and field in answer[key], (call, body, status, answer)
    assert w.plugin.store_snapshot() == store_before, f"{call} with {field}={value!r} changed the store"
    assert kernel.snapshot() == kernel_before, f"{call} with {field}={value!r} changed the kernel"
    if call == "NetworkDriver.CreateNetwork":  # give back the pool valid_body took
        w.plugin.call("IpamDriver.ReleasePool", {"PoolID": body["IPv4Data"][0]["Pool"]})


def test_still_works_after_fuzzing(world):
    """The process did not die and is not wedged: a fresh network life cycle works."""
    w, kernel = world
    w.ids = {}
    w.ensure()
    call = w.plugin.call
    assert call("NetworkDriver.Leave", {"NetworkID": w.ids[NET], "EndpointID": w.ids[EP]}) == (200, {})
    assert call("NetworkDriver.DeleteEndpoint", {"NetworkID": w.ids[NET], "EndpointID": w.ids[EP]}) == (200, {})
    assert call("NetworkDriver.DeleteNetwork", {"NetworkID": w.ids[NET]}) == (200, {})


# -- the real process on its socket -------------------------------------------------


class ServedPlugin:
    """`pyoverlay serve` (gunicorn) in a test host namespace, with a private
    mount namespace whose /run/netns is a directory of the test's own."""

    def __init__(self, host: HostNamespace, workdir: Path, db: Path | None = None, store: str | None = None,
                 env: dict | None = None):
        """db: the SQLite file (default workdir/state.db); store: another store URL
        instead; env: PYOVERLAY_* settings on top of the test's environment."""
        self.dir = workdir
        self.socket = workdir / "pyoverlay.sock"
        self.db = db or workdir / "state.db"
        netns_dir = workdir / "netns"
        netns_dir.mkdir(exist_ok=True)  # a restart in the same workdir finds it
        exe = str(Path(sys.executable).with_name("pyoverlay"))
        script = 'mount --make-rprivate / && mount --bind "$1" /run/netns && shift && exec "$@"'
        self.log = open(workdir / "plugin.log", "ab")
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{host.name}", "unshare", "--mount", "sh", "-euc", script, "sh",
             str(netns_dir), exe, "serve", "--socket", str(self.socket), "--store", store or f"sqlite://{self.db}",
             "--advertise-addr", host.addr, "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **(env or {})})
        wait_for(self._answers, 20, lambda: f"the plugin to answer; log:\n{self.log_text()}")

    def _answers(self) -> bool:
        assert self.proc.poll() is None, f"plugin exited:\n{self.log_text()}"
        try:
            return self.request("Plugin.Activate", b"")[0] == 200
        except OSError:
            return False

    def log_text(self) -> str:
        return (self.dir / "plugin.log").read_text(errors="replace")[-3000:]

    def request(self, call: str, data: bytes) -> tuple[int, str]:
        conn = UnixHTTPConnection(str(self.socket), timeout=30)
        try:
            conn.request("POST", f"/{call}", body=data, headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()

    def raw(self, data: bytes) -> bytes:
        """Bytes straight onto the socket (malformed HTTP); whatever comes back."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.socket))
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            try:
                while chunk := s.recv(65536):
                    chunks.append(chunk)
            except ConnectionResetError:
                pass  # gunicorn drops a request it will not parse: fine, if it lives on
            return b"".join(chunks)

    def store_keys(self) -> dict:
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return {k: v for k, v in db.execute("SELECT key, value FROM kv") if not k.startswith("hosts/")}
        finally:
            db.close()

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def served():
    host = HostNamespace()
    workdir = Path(tempfile.mkdtemp(prefix="pyo-fuzz-"))
    plugin = None
    try:
        plugin = ServedPlugin(host, workdir)
        yield plugin
    finally:
        if plugin is not None:
            plugin.stop()
        host.remove()
        for entry in (workdir / "netns").iterdir() if (workdir / "netns").exists() else ():
            subprocess.run(["umount", "-l", str(entry)], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


SOCKET_COUNT = {"n": 0}


@fuzz(150)
@given(request=st.one_of(
    structured().map(lambda r: (r[0], json.dumps(r[1]).encode())),
    st.tuples(any_call, raw_bodies),
))
def test_socket_fuzz(served, request):
    call, data = request
    before = served.store_keys()
    status, text = served.request(urllib.parse.quote(call, safe=""), data)
    SOCKET_COUNT["n"] += 1
    assert served.proc.poll() is None, f"the plugin died:\n{served.log_text()}"
    answer = json.loads(text)
    assert isinstance(answer, dict), text
    if status != 200:
        assert len(answer) == 1 and next(iter(answer)) in ("Err", "Error"), answer
        assert "internal error" not in next(iter(answer.values())), answer
        assert served.store_keys() == before


MALFORMED_HTTP = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
    b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST /Plugin.Activate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /" + b"A" * 100_000 + b" HTTP/1.1\r\n\r\n",
    b"POST /Plugin.Activate HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
    b"\x00\x01\x02\xff" * 100,
    b"POST /NetworkDriver.CreateNetwork HTTP/9.9\r\n\r\n",
    b"POST /NetworkDriver.CreateNetwork HTTP/1.1\r\nContent-Length: 10\r\n\r\n{",  # short body, then EOF
    b"",
]


def test_socket_survives_malformed_http_and_still_serves(served):
    for data in MALFORMED_HTTP:
        served.raw(data)  # any answer, or none; the point is what follows
        SOCKET_COUNT["n"] += 1
        assert served.proc.poll() is None, f"the plugin died on {data[:60]!r}:\n{served.log_text()}"
    # Unroutable paths answer JSON too (the engine shows the body to the user).
    status, text = served.request("a/b", b"{}")
    assert status == 404 and "Err" in json.loads(text)
    # Still serving, and a whole network life cycle works.
    status, text = served.request("IpamDriver.RequestPool", json.dumps(
        {"AddressSpace": "pyoverlay", "Pool": "10.77.0.0/24"}).encode())
    assert status == 200, text
    status, text = served.request("IpamDriver.ReleasePool", json.dumps({"PoolID": "10.77.0.0/24"}).encode())
    assert (status, json.loads(text)) == (200, {})
    record("fuzzing, gunicorn on the unix socket",
           did=f"{SOCKET_COUNT['n']} requests (fuzzed bodies and {len(MALFORMED_HTTP)} malformed HTTP) to `pyoverlay serve`",
           held="the process never died; every answer JSON with Err/Error or a valid result; refusals left the store alone",
           inputs=SOCKET_COUNT["n"])
