"""The HTTP face: parse, validate, call one driver operation, shape the answer.

No store or kernel call happens here. Errors become {"Err": ...} for the
network driver and {"Error": ...} for IPAM, with the message the user reads
in `docker ...` output.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

import jsonschema
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from driver.errors import DriverError
from driver.store.base import StoreError

from .schemas import SCHEMAS

log = logging.getLogger("pyoverlay.request")

IMPLEMENTS = ["NetworkDriver", "IpamDriver"]
_VALIDATORS = {call: jsonschema.Draft7Validator(schema) for call, schema in SCHEMAS.items()}


def _routes(network, ipam) -> dict[str, Callable[[dict], dict]]:
    def none(_body):
        return {}

    def ep(method):
        return lambda b: method(b["NetworkID"], b["EndpointID"]) or {}

    return {
        "Plugin.Activate": lambda b: {"Implements": IMPLEMENTS},
        "NetworkDriver.GetCapabilities": lambda b: network.capabilities(),
        "NetworkDriver.CreateNetwork": lambda b: network.create_network(
            b["NetworkID"], b.get("Options") or {}, b.get("IPv4Data") or [], b.get("IPv6Data") or []
        ) or {},
        "NetworkDriver.DeleteNetwork": lambda b: network.delete_network(b["NetworkID"]) or {},
        "NetworkDriver.CreateEndpoint": lambda b: network.create_endpoint(
            b["NetworkID"], b["EndpointID"], b.get("Interface") or {}
        ),
        "NetworkDriver.DeleteEndpoint": ep(network.delete_endpoint),
        "NetworkDriver.EndpointOperInfo": lambda b: {
            "Value": network.endpoint_oper_info(b["NetworkID"], b["EndpointID"])
        },
        "NetworkDriver.Join": lambda b: network.join(b["NetworkID"], b["EndpointID"], b.get("SandboxKey", "")),
        "NetworkDriver.Leave": ep(network.leave),
        # In gateway mode (-o gateway=pyoverlay) published ports are ours; in
        # the default mode they travel through docker_gwbridge and these do nothing.
        "NetworkDriver.ProgramExternalConnectivity": lambda b: network.program_external_connectivity(
            b["NetworkID"], b["EndpointID"], b.get("Options") or {}
        ) or {},
        "NetworkDriver.RevokeExternalConnectivity": ep(network.revoke_external_connectivity),
        # Swarm-only calls; answered so a swarm agent does not see errors.
        "NetworkDriver.AllocateNetwork": lambda b: {"Options": {}},
        "NetworkDriver.FreeNetwork": none,
        "NetworkDriver.DiscoverNew": none,
        "NetworkDriver.DiscoverDelete": none,
        "IpamDriver.GetCapabilities": lambda b: ipam.capabilities(),
        "IpamDriver.GetDefaultAddressSpaces": lambda b: ipam.default_address_spaces(),
        "IpamDriver.RequestPool": lambda b: {
            "PoolID": (pool := ipam.request_pool(
                b["AddressSpace"], b.get("Pool") or "", b.get("SubPool") or "", bool(b.get("V6"))
            )),
            "Pool": pool,
            "Data": {},
        },
        "IpamDriver.ReleasePool": lambda b: ipam.release_pool(b["PoolID"]) or {},
        "IpamDriver.RequestAddress": lambda b: {
            "Address": ipam.request_address(b["PoolID"], b.get("Address") or "", b.get("Options")),
            "Data": {},
        },
        "IpamDriver.ReleaseAddress": lambda b: ipam.release_address(b["PoolID"], b["Address"]) or {},
    }


def _reply(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/vnd.docker.plugins.v1.2+json")


def _refuse(call: str, message: str, status: int) -> Response:
    """The engine's plugin client reads only "Err" out of a non-200 answer and
    shows anything else as raw JSON; its IPAM client reads "Error" out of a 200.
    So a refused IPAM call is a 200 with "Error": the user reads the message."""
    if call.startswith("IpamDriver."):
        return _reply({"Error": message})
    return _reply({"Err": message}, status)


def create_app(network, ipam, observe: Callable[[str, float, bool], None] | None = None) -> Flask:
    """observe(call, seconds, ok) is told of every call (logs, metrics)."""
    app = Flask("pyoverlay")
    routes = _routes(network, ipam)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        # Unroutable paths and methods: JSON like every other answer, not Flask's HTML page.
        return _reply({"Err": f"pyoverlay: {request.method} {request.path}: {exc.name}"}, exc.code or 500)

    @app.post("/<call>")
    def dispatch(call: str):
        handler = routes.get(call)
        if handler is None:
            # 404 tells the engine "not implemented", which it accepts for optional calls.
            key = "Error" if call.startswith("IpamDriver.") else "Err"
            return _reply({key: f"pyoverlay does not implement {call}"}, 404)
        started = time.perf_counter()
        ok = False
        body: dict = {}
        try:
            body = _parse(call)
            answer = handler(body)
            ok = True
            return _reply(answer)
        except DriverError as exc:
            return _refuse(call, str(exc), 400)
        except StoreError as exc:
            return _refuse(call, f"pyoverlay's store failed: {exc}", 500)
        except Exception as exc:
            log.exception("%s failed", call)
            return _refuse(call, f"pyoverlay internal error in {call}: {exc}; see the plugin log", 500)
        finally:
            took = time.perf_counter() - started
            ids = " ".join(f"{k}={v[:12]}" for k, v in body.items() if k.endswith("ID") and isinstance(v, str))
            log.info("%s %s %.1fms %s", call, ids, took * 1000, "ok" if ok else "refused")
            if observe:
                observe(call, took, ok)

    return app


def _parse(call: str) -> dict:
    raw = request.get_data()
    if not raw.strip():
        body = {}  # Activate, GetCapabilities, GetDefaultAddressSpaces have no body
    else:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
            raise DriverError(f"{call}: the request is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise DriverError(f"{call}: the request must be a JSON object")
    validator = _VALIDATORS.get(call)
    if validator:
        error = next(iter(sorted(validator.iter_errors(body), key=lambda e: e.path)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "request"
            if error.validator == "pattern" and "description" in error.schema:
                # The regex means nothing to a user; say what was expected.
                raise DriverError(f"{call}: invalid {where} {str(error.instance)[:80]!r}: "
                                  f"expected {error.schema['description']}")
            raise DriverError(f"{call}: invalid {where}: {error.message[:300]}")
    return body
