"""The cluster resolver (issue 10): DNS wire handling with dnspython, the
server that answers cluster names and forwards the rest, and where the
upstream servers come from. `driver.dns.server` is the interface."""

from driver.dns.server import Answer, Lookup, Resolver
from driver.dns.upstreams import parse_upstreams, upstreams_from_resolv_conf

__all__ = ["Answer", "Lookup", "Resolver", "parse_upstreams", "upstreams_from_resolv_conf"]
