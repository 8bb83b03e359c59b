"""Operator commands over an in-memory store (and, for the command line
itself, a sqlite file): what they check, write, wait for and print."""

from __future__ import annotations

import ipaddress
import json

import pytest

from driver.model import EngineNetwork, NamedNetwork
from driver.lastseen import LastSeen, LastSeenWriter
from driver.model import Endpoint, Host, Overlay, Pool, SubnetClaim
from driver.network import endpoint_mac
from driver.state import (
    catalog_key,
    endpoint_key,
    engine_network_key,
    host_key,
    overlay_key,
    pool_key,
    seen_key,
    subnet_index_key,
)
from driver.state import State
from driver.store import open_store
from ops import commands
from plugin.cli import main
from ops.commands import CommandError, collect_status, network_create, network_rm, render_status
from tests.hosts import wait_for

NOW = 1_700_000_000.0
H1, H2, H3 = "10.99.0.1", "10.99.0.2", "10.99.0.3"


@pytest.fixture
def store():
    s = open_store("memory://")
    yield s
    s.close()


def put(store, key, record, lease=0):
    store.put(key, record.to_json(), lease=lease)


def alive(store, *hosts):
    lease = store.grant_lease(3600)
    for h in hosts:
        put(store, host_key(h), Host(host=h, vtep=h, started=NOW - 3700, version="0.1.0"), lease)


def populate(store) -> None:
    """Two live hosts, one gone; a catalog network on two hosts with three
    containers (-o multicast=true), and an overlay made without the catalog."""
    alive(store, H1, H2)
    put(store, seen_key(H3), LastSeen(H3, H3, NOW - 600))
    put(store, catalog_key("web"), NamedNetwork("web", "10.40.0.0/24", "10.40.0.1", 4096, 0, False, "10.99.0.1",
                                                multicast=True))
    put(store, overlay_key(4096), Overlay(4096, "10.40.0.0/24", 1450, {H1: "n1" * 32, H2: "n2" * 32},
                                          multicast=True))
    put(store, overlay_key(77), Overlay(77, "10.41.0.0/24", 1400, {H3: "n3" * 32}))
    eps = [("e1", H1, "10.40.0.2"), ("e2", H2, "10.40.0.3"), ("e3", H2, "10.40.0.4"), ("e4", H3, "10.41.0.2")]
    for ep, host, ip in eps:
        vni = 77 if host == H3 else 4096
        net = {H1: "n1", H2: "n2", H3: "n3"}[host] * 32
        put(store, endpoint_key(ep * 32), Endpoint(ep * 32, net, vni, host, ip + "/24",
                                                   endpoint_mac(ipaddress.ip_address(ip)), host))
    put(store, engine_network_key(H1, "web"), EngineNetwork("web", H1, "n1" * 32, "10.40.0.0/24",
                                                            {"e1" * 32: "front"}, catalogued=True))
    put(store, engine_network_key(H2, "web"), EngineNetwork("web", H2, "n2" * 32, "10.40.0.0/24",
                                                            {"e2" * 32: "api", "e3" * 32: "db"}, catalogued=True))


# -- network create -----------------------------------------------------------

def test_create_writes_the_catalog_entry_with_defaults(store):
    entry = network_create(store, "web", "10.40.0.0/24")
    assert entry == NamedNetwork("web", "10.40.0.0/24", "10.40.0.1", 4096, 0, False, "cli")
    assert NamedNetwork.from_json(store.get(catalog_key("web")).value) == entry
    # The next one takes the next free VNI, and keeps what was given.
    other = network_create(store, "db", "10.41.0.0/24", gateway="10.41.0.254", mtu=1400, internal=True)
    assert (other.vni, other.gateway, other.mtu, other.internal) == (4097, "10.41.0.254", 1400, True)


def test_create_reuses_what_the_store_already_has_for_the_subnet(store):
    # An overlay made by `docker network create` on hosts without the catalog.
    put(store, subnet_index_key("10.40.0.0/24"), SubnetClaim(vni=5001))
    put(store, overlay_key(5001), Overlay(5001, "10.40.0.0/24", 1450, {H1: "x"}))
    put(store, pool_key("10.40.0.0/24"), Pool("10.40.0.0/24", [H1], gateway="10.40.0.9"))
    entry = network_create(store, "web", "10.40.0.0/24")
    assert (entry.vni, entry.gateway) == (5001, "10.40.0.9")


@pytest.mark.parametrize("args, message", [
    (("-bad", "10.40.0.0/24"), "network name '-bad' is not valid"),
    (("web", "10.40.0.1/24"), "not a valid IPv4 network"),
    # The driver's own words (driver/rules.py): --vni N is -o vni=N.
    (("web", "10.40.0.0/24", "", 0), "-o vni=0 is not valid"),
    (("web", "10.40.0.0/24", "", None, 100), "-o com.docker.network.driver.mtu=100 is not valid"),
    (("web", "10.40.0.0/24", "", None, 65486), "-o com.docker.network.driver.mtu=65486 is not valid"),
    (("web", "10.40.0.0/24", "10.41.0.1"), "address 10.41.0.1 is not a usable address of 10.40.0.0/24"),
    (("web", "10.40.0.0/24", "gw"), "'gw' is not a valid IPv4 address"),
    (("web", "10.40.0.0/24", "10.40.0.255"), "not a usable address"),
])
def test_create_refuses_bad_input(store, args, message):
    with pytest.raises(CommandError, match=message.replace("(", r"\(")):
        network_create(store, *args)
    assert store.list("catalog/")[0] == []


def test_create_takes_docker_s_options(store):
    # -o as `docker network create` takes it, so the driver's refusals ("use -o vni=N") apply here too.
    entry = network_create(store, "web", "10.40.0.0/24", options={"vni": "5000", "com.docker.network.driver.mtu": "1400"})
    assert (entry.vni, entry.mtu) == (5000, 1400)
    same = network_create(store, "db", "10.41.0.0/24", vni=5001, options={"vni": "5001"})
    assert same.vni == 5001


@pytest.mark.parametrize("args, options, message", [
    ((), {"block_size": "26"}, "unknown option -o block_size; pyoverlay network create accepts -o vni="),
    ((5000,), {"vni": "5001"}, "--vni 5000 and -o vni=5001 disagree"),
    ((), {"vni": "ten"}, "-o vni=ten is not valid: the VXLAN network identifier must be a whole number"),
    ((), {"multicast": "yes"}, "-o multicast=yes is not valid: use -o multicast=true to flood"),
    ((), {"gateway": "bridge"}, "-o gateway=bridge is not valid: use -o gateway=pyoverlay"),
])
def test_create_refuses_bad_options(store, args, options, message):
    with pytest.raises(CommandError, match=message):
        network_create(store, "web", "10.40.0.0/24", "", *args, options=options)
    assert store.list("catalog/")[0] == []


def test_create_with_multicast_and_what_an_existing_overlay_says(store):
    entry = network_create(store, "web", "10.40.0.0/24", options={"multicast": "true"})
    assert entry.multicast and entry.options()["multicast"] == "true"
    assert not network_create(store, "db", "10.41.0.0/24", options={"multicast": "false"}).multicast
    # An overlay hosts already carry floods as it was made: left out, the option is the overlay's.
    put(store, subnet_index_key("10.42.0.0/24"), SubnetClaim(vni=5002))
    put(store, overlay_key(5002), Overlay(5002, "10.42.0.0/24", 1450, {H1: "x"}, multicast=True))
    with pytest.raises(CommandError, match="VNI 5002 floods broadcast and multicast on other hosts "
                                           r"\(-o multicast=true\); use -o multicast=true or leave the option out"):
        network_create(store, "api", "10.42.0.0/24", options={"multicast": "false"})
    assert network_create(store, "api", "10.42.0.0/24").multicast


def test_create_with_direct_mode_and_what_it_refuses(store):
    entry = network_create(store, "web", "10.40.0.0/24", options={"encap": "never"})
    assert entry.encap == "never" and entry.options()["encap"] == "never"
    assert network_create(store, "db", "10.41.0.0/24", options={"encap": "always"}).encap == ""
    with pytest.raises(CommandError, match="-o encap=never routes unicast only"):
        network_create(store, "mc", "10.43.0.0/24", options={"encap": "never", "multicast": "true"})
    with pytest.raises(CommandError, match="-o encap=cross-subnet routes IPv4 only"):
        network_create(store, "v6", "10.44.0.0/24", subnet6="fd00:44::/64", options={"encap": "cross-subnet"})
    put(store, subnet_index_key("10.45.0.0/24"), SubnetClaim(vni=5003))
    put(store, overlay_key(5003), Overlay(5003, "10.45.0.0/24", 1450, {H1: "x"}, encap="cross-subnet"))
    with pytest.raises(CommandError, match="made with -o encap=cross-subnet on other hosts"):
        network_create(store, "api", "10.45.0.0/24", options={"encap": "never"})
    assert network_create(store, "api", "10.45.0.0/24").encap == "cross-subnet"
    assert set(State(store).catalog_entries()) == {"web", "db", "api"}  # the refused ones wrote nothing


def test_create_with_gateway_mode(store):
    entry = network_create(store, "web", "10.40.0.0/24", options={"gateway": "pyoverlay"})
    assert entry.gateway_mode == "pyoverlay" and entry.options()["gateway"] == "pyoverlay"
    assert "gateway" not in network_create(store, "db", "10.41.0.0/24",
                                           options={"gateway": "docker_gwbridge"}).options()


def test_create_refuses_conflicts_with_what_exists(store):
    network_create(store, "web", "10.40.0.0/24", vni=5000)
    with pytest.raises(CommandError, match="a network named web already exists"):
        network_create(store, "web", "10.50.0.0/24")
    with pytest.raises(CommandError, match="overlaps 10.40.0.0/24 of network web"):
        network_create(store, "big", "10.40.0.0/16")
    with pytest.raises(CommandError, match="VNI 5000 is already used by another network"):
        network_create(store, "db", "10.50.0.0/24", vni=5000)
    put(store, pool_key("10.60.0.0/24"), Pool("10.60.0.0/24", [H1]))
    with pytest.raises(CommandError, match="overlaps 10.60.0.0/24, already used"):
        network_create(store, "db", "10.60.0.0/23")
    put(store, subnet_index_key("10.70.0.0/24"), SubnetClaim(vni=6000))
    with pytest.raises(CommandError, match="already used by the pyoverlay network with VNI 6000; use -o vni=6000"):
        network_create(store, "db", "10.70.0.0/24", vni=6001)
    put(store, overlay_key(7000), Overlay(7000, "10.80.0.0/24", 1450))
    with pytest.raises(CommandError, match="VNI 7000 is already used by the pyoverlay network on 10.80.0.0/24"):
        network_create(store, "db", "10.90.0.0/24", vni=7000)
    put(store, pool_key("10.91.0.0/24"), Pool("10.91.0.0/24", [H1], gateway="10.91.0.1"))
    with pytest.raises(CommandError, match="already has gateway 10.91.0.1"):
        network_create(store, "db", "10.91.0.0/24", gateway="10.91.0.2")


def test_wait_created_follows_the_hosts_until_each_answered(store):
    alive(store, H1, H2, H3)
    network_create(store, "web", "10.40.0.0/24")
    clock = [0.0]
    # Each poll, one more host's catalog acts, as the hosts' agents would.
    acts = [
        lambda: put(store, engine_network_key(H2, "web"),
                    EngineNetwork("web", H2, "b" * 64, "10.40.0.0/24", catalogued=True)),
        lambda: put(store, engine_network_key(H1, "web"),
                    EngineNetwork("web", H1, subnet="10.40.0.0/24", error="the engine refused to create it: x")),
        lambda: put(store, engine_network_key(H3, "web"),
                    EngineNetwork("web", H3, "c" * 64, "10.40.0.0/24", catalogued=True)),
    ]

    def sleep(_):
        clock[0] += 0.2
        acts.pop(0)()

    results = commands.wait_created(store, "web", 10, clock=lambda: clock[0], sleep=sleep)
    assert [(r.host, r.result) for r in results] == [(H1, "refused"), (H2, "created"), (H3, "created")]
    assert results[0].detail == "the engine refused to create it: x"
    assert results[1].detail == "network id " + "b" * 12
    assert acts == []


def test_wait_created_gives_up_at_the_deadline(store):
    alive(store, H1, H2)
    network_create(store, "web", "10.40.0.0/24")
    put(store, engine_network_key(H1, "web"), EngineNetwork("web", H1, "a" * 64, "10.40.0.0/24", catalogued=True))
    clock = [0.0]

    def sleep(seconds):
        clock[0] += seconds

    results = commands.wait_created(store, "web", 1.0, clock=lambda: clock[0], sleep=sleep)
    assert [(r.host, r.result) for r in results] == [(H1, "created"), (H2, "pending")]
    assert 1.0 <= clock[0] < 1.5


# -- network rm -----------------------------------------------------------------

def test_rm_deletes_the_entry_and_reports_where_it_stays(store):
    alive(store, H1, H2)  # H3 is down
    network_create(store, "web", "10.40.0.0/24")
    for h in (H1, H2, H3):
        put(store, engine_network_key(h, "web"), EngineNetwork("web", h, h[-1] * 64, "10.40.0.0/24", catalogued=True))
    assert network_rm(store, "web").name == "web"
    assert store.get(catalog_key("web")) is None
    clock = [0.0]
    acts = [
        lambda: store.delete(engine_network_key(H1, "web")),
        lambda: put(store, engine_network_key(H2, "web"),
                    EngineNetwork("web", H2, "2" * 64, "10.40.0.0/24", {"e" * 64: "db", "f" * 64: "api"},
                                  catalogued=True, removing=True)),
    ]

    def sleep(_):
        clock[0] += 0.2
        acts.pop(0)()

    results = commands.wait_removed(store, "web", 10, clock=lambda: clock[0], sleep=sleep)
    assert [(r.host, r.result) for r in results] == [(H1, "removed"), (H2, "in use"), (H3, "down")]
    assert results[1].containers == ["api", "db"]
    assert results[1].detail == "by api, db: removed when they leave"
    assert acts == []


def test_rm_reports_a_host_whose_engine_refuses_with_the_reason(store):
    alive(store, H1, H2)
    network_create(store, "web", "10.40.0.0/24")
    why = "this host's engine refuses to remove web (...); restart the engine here (systemctl restart docker)"
    put(store, engine_network_key(H1, "web"), EngineNetwork("web", H1, "a" * 64, "10.40.0.0/24", catalogued=True,
                                                            removing=True, error=why))
    network_rm(store, "web")
    results = commands.wait_removed(store, "web", 0)
    assert [(r.host, r.result, r.detail) for r in results] == [(H1, "refused", why)]


def test_rm_of_an_unknown_network_says_so(store):
    with pytest.raises(CommandError, match="no network named nope in the catalog"):
        network_rm(store, "nope")


# -- status ---------------------------------------------------------------------

def test_status_collects_hosts_networks_and_endpoints(store):
    populate(store)
    status = collect_status(store, now=NOW)
    assert status["hosts"] == [
        {"host": H1, "address": H1, "alive": True, "started": NOW - 3700, "last_seen": NOW, "version": "0.1.0"},
        {"host": H2, "address": H2, "alive": True, "started": NOW - 3700, "last_seen": NOW, "version": "0.1.0"},
        {"host": H3, "address": H3, "alive": False, "started": None, "last_seen": NOW - 600, "version": ""},
    ]
    assert [(n["name"], n["vni"], n["subnet"], n["mtu"], n["hosts"], n["endpoints"], n["in_catalog"])
            for n in status["networks"]] == [
        ("", 77, "10.41.0.0/24", 1400, [H3], 1, False),
        ("web", 4096, "10.40.0.0/24", 1450, [H1, H2], 3, True),
    ]
    # Only web floods, to the hosts with a container on it.
    assert [(n["multicast"], n["flood"]) for n in status["networks"]] == [(False, []), (True, [H1, H2])]
    assert [(e["host"], e["network"], e["container"], e["ip"]) for e in status["endpoints"]] == [
        (H1, "web", "front", "10.40.0.2"),
        (H2, "web", "api", "10.40.0.3"),
        (H2, "web", "db", "10.40.0.4"),
        (H3, "", "", "10.41.0.2"),
    ]


def test_status_table(store):
    populate(store)
    put(store, engine_network_key(H3, "web"), EngineNetwork("web", H3, subnet="10.40.0.0/24", error="refused: x"))
    text = render_status(collect_status(store, now=NOW), now=NOW)
    assert text == (
        "HOSTS\n"
        "HOST       ADDRESS    STATE         LAST SEEN  VERSION\n"
        "10.99.0.1  10.99.0.1  alive, up 1h  now        0.1.0\n"
        "10.99.0.2  10.99.0.2  alive, up 1h  now        0.1.0\n"
        "10.99.0.3  10.99.0.3  down          10m ago    -\n"
        "\n"
        "NETWORKS\n"
        "NAME  VNI   SUBNET        MTU   MULTICAST     ENCRYPTED  HOSTS                ENDPOINTS\n"
        "-     77    10.41.0.0/24  1400  off           off        10.99.0.3            1\n"
        "web   4096  10.40.0.0/24  1450  on (2 hosts)  off        10.99.0.1,10.99.0.2  3\n"
        "notes:\n"
        "  web: 10.99.0.3: refused: x\n"
        "\n"
        "ENDPOINTS\n"
        "HOST       NETWORK  CONTAINER  IP         MAC                ENDPOINT\n"
        "10.99.0.1  web      front      10.40.0.2  02:50:0a:28:00:02  e1e1e1e1e1e1\n"
        "10.99.0.2  web      api        10.40.0.3  02:50:0a:28:00:03  e2e2e2e2e2e2\n"
        "10.99.0.2  web      db         10.40.0.4  02:50:0a:28:00:04  e3e3e3e3e3e3\n"
        "10.99.0.3  -        -          10.41.0.2  02:50:0a:29:00:02  e4e4e4e4e4e4\n"
    )


def test_last_seen_is_kept_after_the_host_is_gone(store):
    writer = LastSeenWriter(store, H3, H3, interval=0.05, clock=lambda: NOW)
    writer.start()
    try:
        wait_for(lambda: store.get(seen_key(H3)), 5, "the last-seen record")
    finally:
        writer.stop()
    (host,) = collect_status(store, now=NOW + 90)["hosts"]
    assert (host["host"], host["alive"], host["last_seen"]) == (H3, False, NOW)
    assert "10.99.0.3  10.99.0.3  down   1m ago" in render_status(collect_status(store, now=NOW + 90), now=NOW + 90)


def test_status_of_an_empty_store(store):
    text = render_status(collect_status(store, now=NOW), now=NOW)
    assert text == ("HOSTS\nHOST  ADDRESS  STATE  LAST SEEN  VERSION\n(none)\n\n"
                    "NETWORKS\nNAME  VNI  SUBNET  MTU  MULTICAST  ENCRYPTED  HOSTS  ENDPOINTS\n(none)\n\n"
                    "ENDPOINTS\nHOST  NETWORK  CONTAINER  IP  MAC  ENDPOINT\n(none)\n")


# -- the command line, end to end over a sqlite store ---------------------------

@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite://{tmp_path}/state.db"


def test_cli_create_status_rm_json(sqlite_url, capsys):
    assert main(["network", "create", "web", "--subnet", "10.40.0.0/24", "--vni", "4242", "--mtu", "1400",
                 "--wait", "0", "--store", sqlite_url, "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created == {"network": {"name": "web", "subnet": "10.40.0.0/24", "gateway": "10.40.0.1", "vni": 4242,
                                   "mtu": 1400, "internal": False, "origin": "cli", "multicast": False,
                                   "gateway_mode": "", "encrypted": False, "subnet6": "", "gateway6": "",
                                   "encap": ""},
                       "hosts": []}

    assert main(["status", "--store", sqlite_url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["networks"] == [{"name": "web", "vni": 4242, "subnet": "10.40.0.0/24", "mtu": 1400,
                                   "internal": False, "multicast": False, "flood": [], "encrypted": False, "key_age": None, "in_catalog": True,
                                   "hosts": [], "endpoints": 0,
                                   "notes": [], "names": []}]

    # A second create of the name fails with a message, not a traceback.
    assert main(["network", "create", "web", "--subnet", "10.50.0.0/24", "--wait", "0",
                 "--store", sqlite_url]) == 1
    assert "a network named web already exists" in capsys.readouterr().err

    assert main(["network", "rm", "web", "--wait", "0", "--store", sqlite_url]) == 0
    assert capsys.readouterr().out.startswith("network web removed from the catalog")
    assert main(["network", "rm", "web", "--store", sqlite_url]) == 1
    assert "no network named web" in capsys.readouterr().err


def test_cli_create_takes_dash_o_as_docker_does(sqlite_url, capsys):
    assert main(["network", "create", "web", "--subnet", "10.40.0.0/24", "-o", "vni=4343",
                 "--opt", "com.docker.network.driver.mtu=1400", "--wait", "0", "--store", sqlite_url, "--json"]) == 0
    created = json.loads(capsys.readouterr().out)["network"]
    assert (created["vni"], created["mtu"]) == (4343, 1400)
    assert main(["network", "create", "db", "--subnet", "10.50.0.0/24", "-o", "vni=4343", "--wait", "0",
                 "--store", sqlite_url]) == 1
    assert "VNI 4343 is already used by another network in the catalog; choose another -o vni" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["network", "create", "db", "--subnet", "10.50.0.0/24", "-o", "vni", "--store", sqlite_url])
    assert "'vni' is not KEY=VALUE" in capsys.readouterr().err


def test_cli_rm_says_where_the_network_is_still_in_use(sqlite_url, capsys):
    s = open_store(sqlite_url)
    try:
        alive(s, H1, H2)
        network_create(s, "web", "10.40.0.0/24")
        # H2's catalog already marked it: in use by one container.
        put(s, engine_network_key(H2, "web"), EngineNetwork("web", H2, "2" * 64, "10.40.0.0/24", {"e" * 64: "db"},
                                                           catalogued=True, removing=True))
    finally:
        s.close()
    assert main(["network", "rm", "web", "--wait", "1", "--store", sqlite_url]) == 1
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"network web removed from the catalog; still on {H2} (in use)",
        "HOST       RESULT  DETAIL",
        f"{H2}  in use  by db: removed when they leave",
    ]


def test_cli_store_failure_is_one_line(capsys):
    # Nothing listens on this port: the etcd store fails after its short timeouts.
    assert main(["status", "--store", "etcd://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyoverlay: ") and "127.0.0.1:9" in err and len(err.splitlines()) == 1


def test_create_dual_stack_and_ipv6_only(store):
    entry = network_create(store, "web", "10.40.0.0/24", subnet6="fd00:40::/64")
    assert (entry.subnet, entry.gateway, entry.subnet6, entry.gateway6) == ("10.40.0.0/24", "10.40.0.1",
                                                                            "fd00:40::/64", "fd00:40::1")
    assert NamedNetwork.from_json(store.get(catalog_key("web")).value) == entry
    six = network_create(store, "six", "fd00:41::/64", gateway="fd00:41::fe")
    assert (six.subnet, six.gateway, six.subnet6) == ("fd00:41::/64", "fd00:41::fe", "")
    # Refusals: the driver's words where it has them; nothing written.
    with pytest.raises(CommandError, match="overlaps fd00:40::/64 of network web"):
        network_create(store, "other", "10.42.0.0/24", subnet6="fd00:40::/56")
    with pytest.raises(CommandError, match="not a unicast range"):
        network_create(store, "other", "10.42.0.0/24", subnet6="fe80::/64")
    with pytest.raises(CommandError, match="is not a usable address of fd00:43::/64"):
        network_create(store, "other", "10.42.0.0/24", subnet6="fd00:43::/64", gateway6="fd00:44::1")
    assert sorted(State(store).catalog_entries()) == ["six", "web"]


def test_create_dual_stack_joins_an_overlay_only_with_its_ipv6_subnet(store):
    put(store, subnet_index_key("10.40.0.0/24"), SubnetClaim(vni=5001))
    put(store, overlay_key(5001), Overlay(5001, "10.40.0.0/24", 1450, {H1: "x"}, subnet6="fd00:40::/64"))
    with pytest.raises(CommandError, match="has IPv6 subnet fd00:40::/64 on other hosts"):
        network_create(store, "web", "10.40.0.0/24")
    assert network_create(store, "web", "10.40.0.0/24", subnet6="fd00:40::/64").vni == 5001


def test_cli_create_ipv6(sqlite_url, capsys):
    assert main(["network", "create", "web", "--ipv6", "--subnet", "10.40.0.0/24", "--subnet", "fd00:40::/64",
                 "--wait", "0", "--store", sqlite_url, "--json"]) == 0
    created = json.loads(capsys.readouterr().out)["network"]
    assert (created["subnet"], created["subnet6"], created["gateway6"]) == ("10.40.0.0/24", "fd00:40::/64",
                                                                           "fd00:40::1")
    for args, message in ((["--ipv6", "--subnet", "10.41.0.0/24"], "pass an IPv6 --subnet"),
                          (["--subnet", "fd00:41::/64", "--subnet", "fd00:42::/64"], "at most one IPv4 and one"),
                          (["--subnet", "fd00:41::/64", "--gateway", "10.0.0.1"], "has no IPv4 --subnet")):
        assert main(["network", "create", "bad", *args, "--wait", "0", "--store", sqlite_url]) == 1
        assert message in capsys.readouterr().err
