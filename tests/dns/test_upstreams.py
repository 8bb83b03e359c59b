"""Where forwarded queries go: resolv.conf and --dns-upstream."""

from __future__ import annotations

import pytest

from driver.dns.server import upstreams_from_resolv_conf
from driver.dns.upstreams import parse_upstreams

RESOLV_CONF = """\
# written by a DHCP client
; and a comment of the other kind
search example.org corp.example
nameserver 127.0.0.53
nameserver 10.0.0.2   # trailing words are ignored
nameserver   2001:db8::53
nameserver fe80::1%eth0
nameserver 169.254.53.53
nameserver 10.0.0.2
nameserver not-an-address
nameserver
options edns0 trust-ad
"""


def test_resolv_conf(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text(RESOLV_CONF)
    assert upstreams_from_resolv_conf(str(path)) == [
        ("127.0.0.53", 53),     # loopback kept: the resolver forwards from the host's namespace
        ("10.0.0.2", 53),       # once
        ("2001:db8::53", 53),
        ("fe80::1%eth0", 53),   # the zone kept, the kernel needs it
    ]                           # 169.254.53.53, the resolver itself, left out


def test_resolv_conf_with_another_dns_address_excluded(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 169.254.53.53\nnameserver 10.1.2.3\nnameserver 2001:DB8::0:53\n")
    assert upstreams_from_resolv_conf(str(path), exclude=("10.1.2.3", "2001:db8::53")) == [("169.254.53.53", 53)]


def test_missing_resolv_conf_is_no_upstreams(tmp_path):
    assert upstreams_from_resolv_conf(str(tmp_path / "absent")) == []


def test_the_hosts_own_resolv_conf_reads():
    for host, port in upstreams_from_resolv_conf():
        assert port == 53 and host != "169.254.53.53"


@pytest.mark.parametrize("text, upstreams", [
    ("10.0.0.2", [("10.0.0.2", 53)]),
    ("10.0.0.2:5353", [("10.0.0.2", 5353)]),
    ("10.0.0.2, 10.0.0.3:54,", [("10.0.0.2", 53), ("10.0.0.3", 54)]),
    ("127.0.0.53,127.0.0.53:53", [("127.0.0.53", 53)]),
    ("fd00::2", [("fd00::2", 53)]),
    ("[fd00::2]:5353", [("fd00::2", 5353)]),
    ("[fd00::2]", [("fd00::2", 53)]),
    ("[fe80::1%eth0]:53", [("fe80::1%eth0", 53)]),
])
def test_dns_upstream_flag(text, upstreams):
    assert parse_upstreams(text) == upstreams


@pytest.mark.parametrize("text", ["", ",", "dns.example", "10.0.0.2:", "10.0.0.2:0", "10.0.0.2:70000",
                                  "10.0.0.2:dns", "[fd00::2", "[fd00::2]5353", "10.0.0.256", "fd00::2:53:x"])
def test_bad_dns_upstream_flag(text):
    with pytest.raises(ValueError, match="--dns-upstream"):
        parse_upstreams(text)
