"""The local Docker engine's API, as the catalog needs it (docker SDK).

Never used on a request path: the engine calls the plugin while it starts
and while it creates networks, so a plugin request that waited on the engine
could wait on itself (field notes 2 and 3). Only background threads and the
operator commands talk to the engine, every call with a timeout.

Errors come in two kinds: EngineUnavailable (no socket, no answer, a broken
stream: try again later) and EngineRefused (the engine answered with an
error: retrying the same call will not help until something changes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

import docker
import requests
from docker.types import IPAMConfig, IPAMPool

DEFAULT_URL = "unix:///var/run/docker.sock"
#: Seconds for one API call. Creating a network makes the engine call the
#: plugin several times, which under load takes a while; never unbounded.
TIMEOUT = 30.0


class EngineUnavailable(Exception):
    """The engine cannot be reached now (socket absent, starting, hung)."""


class EngineRefused(Exception):
    """The engine answered with an error; the message is the engine's."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EngineNetworkInfo:
    """A network as `docker network inspect` shows it, reduced to what we use."""

    id: str
    name: str
    driver: str
    ipam_driver: str = ""
    subnet: str = ""
    gateway: str = ""
    internal: bool = False
    options: Mapping[str, str] = field(default_factory=dict)
    containers: Mapping[str, str] = field(default_factory=dict)  # endpoint ID -> container name
    attached: Mapping[str, str] = field(default_factory=dict)  # container ID -> endpoint ID
    ipv6: bool = False  # --ipv6 (dual stack, or IPv6 only)
    subnet6: str = ""  # a dual-stack network's IPv6 subnet (an IPv6-only one's is in subnet)
    gateway6: str = ""

    @classmethod
    def from_inspect(cls, data: dict) -> "EngineNetworkInfo":
        ipam = data.get("IPAM") or {}
        configs = [c for c in (ipam.get("Config") or []) if c] or [{}]
        # The IPv4 pool first, as the driver keeps them: subnet is IPv4 unless there is none.
        configs.sort(key=lambda c: ":" in (c.get("Subnet") or ""))
        config = configs[0]
        six = configs[1] if len(configs) > 1 and ":" in (configs[1].get("Subnet") or "") else {}
        members = {cid: c for cid, c in (data.get("Containers") or {}).items() if c.get("EndpointID")}
        return cls(
            id=data["Id"],
            name=data["Name"],
            driver=data.get("Driver") or "",
            ipam_driver=ipam.get("Driver") or "",
            subnet=config.get("Subnet") or "",
            gateway=(config.get("Gateway") or "").split("/")[0],
            internal=bool(data.get("Internal")),
            options=dict(data.get("Options") or {}),
            containers={c["EndpointID"]: c.get("Name") or cid[:12] for cid, c in members.items()},
            attached={cid: c["EndpointID"] for cid, c in members.items()},
            ipv6=bool(data.get("EnableIPv6")),
            subnet6=six.get("Subnet") or "",
            gateway6=(six.get("Gateway") or "").split("/")[0],
        )


def engine_url(explicit: Optional[str] = None, environ: Mapping[str, str] = os.environ) -> str:
    """--docker-host if given, else DOCKER_HOST as the docker CLI reads it, else the local socket."""
    return explicit or environ.get("DOCKER_HOST") or DEFAULT_URL


class Engine:
    """One engine, reached lazily: construction never touches it."""

    def __init__(self, url: Optional[str] = None, timeout: float = TIMEOUT,
                 environ: Mapping[str, str] = os.environ):
        self.url = engine_url(url, environ)
        self.timeout = timeout
        # TLS settings come from the environment, as for the docker CLI.
        self._tls = docker.utils.kwargs_from_env(environment={**environ, "DOCKER_HOST": self.url}).get("tls")
        self._api: Optional[docker.APIClient] = None

    def _client(self) -> docker.APIClient:
        if self._api is None:
            try:
                # version="auto" asks the engine which API it speaks (Docker 20.10
                # stops at 1.41, Docker 29 starts at 1.44); that is a call, hence here.
                self._api = docker.APIClient(base_url=self.url, version="auto", timeout=self.timeout, tls=self._tls)
            except docker.errors.DockerException as e:
                raise EngineUnavailable(f"the Docker engine at {self.url} does not answer: {_reason(e)}") from None
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    def _call(self, fn, *args, **kwargs):
        api = self._client()
        try:
            return fn(api, *args, **kwargs)
        except docker.errors.APIError as e:
            # An answer, even a 500 (a plugin error is one): the engine is there.
            raise EngineRefused(e.explanation or str(e), e.status_code) from None
        except (requests.exceptions.RequestException, docker.errors.DockerException, OSError) as e:
            self.close()  # the connection pool may hold a dead socket: start afresh
            raise EngineUnavailable(f"the Docker engine at {self.url} does not answer: {_reason(e)}") from None

    def version(self) -> str:
        return self._call(lambda api: api.version().get("Version", "?"))

    def networks(self, driver: Optional[str] = None) -> list[EngineNetworkInfo]:
        """Networks (of one driver), inspected: the list call omits the containers."""
        filters = {"driver": driver} if driver else None
        found = []
        for summary in self._call(lambda api: api.networks(filters=filters)):
            info = self.network(summary["Id"])
            if info is not None and (driver is None or info.driver == driver):
                found.append(info)
        return found

    def network_summaries(self) -> list[tuple[str, str, str, tuple[str, ...]]]:
        """(id, name, driver, subnets) of every network, whatever its driver."""
        return [
            (n["Id"], n["Name"], n.get("Driver") or "",
             tuple(c.get("Subnet") or "" for c in ((n.get("IPAM") or {}).get("Config") or [])))
            for n in self._call(lambda api: api.networks())
        ]

    def network(self, id_or_name: str) -> Optional[EngineNetworkInfo]:
        try:
            return EngineNetworkInfo.from_inspect(self._call(lambda api: api.inspect_network(id_or_name)))
        except EngineRefused as e:
            if e.status == 404:
                return None  # gone meanwhile
            raise

    def endpoint_of(self, container_id: str, network_id: str) -> Optional[tuple[str, str]]:
        """(endpoint ID, container name) of a container on a network; None if it is not (any more).

        Container inspect, not network inspect: every network inspect is a
        listing of the engine's networks, and Docker Engine before 28.1
        miscounts a network's endpoints when many containers start on it at
        once, listings among them (docs/engine-miscount.md); the catalog adds
        none to such a burst."""
        data = self.container(container_id)
        return endpoint_in(data, network_id) if data is not None else None

    def create_network(self, name: str, driver: str, subnet: str, gateway: str,
                       options: Mapping[str, str], internal: bool, subnet6: str = "", gateway6: str = "") -> str:
        """subnet is IPv4, or IPv6 for an IPv6-only network (then --ipv4=false,
        which needs Docker 28: an older engine is refused here, saying so)."""
        pools = [IPAMPool(subnet=subnet, gateway=gateway or None)]
        if subnet6:
            pools.append(IPAMPool(subnet=subnet6, gateway=gateway6 or None))
        ipam = IPAMConfig(driver=driver, pool_configs=pools)
        if ":" not in subnet:
            result = self._call(lambda api: api.create_network(
                name, driver=driver, options=dict(options), ipam=ipam, internal=internal, check_duplicate=True,
                enable_ipv6=bool(subnet6)))
            return result["Id"]

        def only6(api) -> dict:
            version = api.api_version
            if tuple(int(p) for p in version.split(".")) < (1, 48):
                raise EngineRefused(f"this engine (API {version}) cannot make an IPv6-only network: "
                                    "--ipv4=false came with Docker 28.0 (API 1.48); upgrade the engine on "
                                    "this host, or make the network dual-stack (an IPv4 and an IPv6 --subnet)")
            # docker-py has no enable_ipv4: the request as the API takes it.
            body = {"Name": name, "Driver": driver, "Options": dict(options), "IPAM": ipam,
                    "Internal": internal, "EnableIPv6": True, "EnableIPv4": False, "CheckDuplicate": True}
            response = api._post_json(api._url("/networks/create"), data=body)
            return api._result(response, json=True)

        return self._call(only6)["Id"]

    def remove_network(self, network_id: str) -> None:
        self._call(lambda api: api.remove_network(network_id))

    def events(self) -> "EventStream":
        """Subscribe to what the catalog and the name publisher follow (driver/events.py):
        network create, destroy, connect and disconnect, container rename and destroy.
        The engine ANDs the two filters, so container create comes too (subscribers skip it);
        no exec or attach chatter. The subscription holds once this returns."""
        filters = {"type": ["container", "network"],
                   "event": ["create", "destroy", "connect", "disconnect", "rename"]}
        stream = self._call(lambda api: api.events(filters=filters, decode=True))
        return EventStream(stream)

    # -- for the name publisher (driver/namepub.py) ----------------------------

    def container(self, container_id: str) -> Optional[dict]:
        """Container inspect; None if it is gone."""
        try:
            return self._call(lambda api: api.inspect_container(container_id))
        except EngineRefused as e:
            if e.status == 404:
                return None
            raise

    def running_containers(self) -> list[str]:
        """IDs of the running containers (only they have endpoints)."""
        return [c["Id"] for c in self._call(lambda api: api.containers(quiet=True))]


    # -- for the endpoint sweep (driver/sweep.py) -------------------------------

    def container_endpoints(self) -> set[str]:
        """Endpoint IDs of every container the engine has, running or not: the
        container list (no network listing, see endpoint_of), one call."""
        return {settings["EndpointID"] for c in self._call(lambda api: api.containers(all=True))
                for settings in ((c.get("NetworkSettings") or {}).get("Networks") or {}).values()
                if (settings or {}).get("EndpointID")}


class EventStream:
    """Iterate events until the engine goes away; close() from another thread ends it."""

    def __init__(self, stream):
        self._stream = stream

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._stream
        except (requests.exceptions.RequestException, docker.errors.DockerException, OSError, ValueError):
            return  # a broken stream ends like a closed one: the caller reconnects

    def close(self) -> None:
        try:
            self._stream.close()
        except Exception:
            pass  # already closed or never fully open


def endpoint_in(inspect: dict, network_id: str) -> Optional[tuple[str, str]]:
    """(endpoint ID, container name) of an inspected container on a network; None if it is not on it."""
    for settings in ((inspect.get("NetworkSettings") or {}).get("Networks") or {}).values():
        if (settings or {}).get("NetworkID") == network_id and settings.get("EndpointID"):
            return settings["EndpointID"], (inspect.get("Name") or (inspect.get("Id") or "")[:12]).lstrip("/")
    return None


def _reason(e: BaseException) -> str:
    text = str(e)
    for marker in ("FileNotFoundError", "ConnectionRefusedError", "No such file or directory", "Connection refused"):
        if marker in text:
            return "no engine listening (is dockerd running?)"
    if "timed out" in text.lower():
        return "no answer in time"
    return text
