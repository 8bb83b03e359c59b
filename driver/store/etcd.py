"""etcd v3 through its JSON gateway, with urllib3 and our own watch.

Why not etcd3gw: its watch dies silently when etcd restarts and ignores a
compaction (`python -m bench.etcdclient` shows both), so the watch had to be ours anyway; what is left is a few JSON
POSTs, and owning them gives failover that settles an ambiguous write (below),
short timeouts and errors that name the store, with no new dependency.
The POSTs go through urllib3's connection pools directly, not through
requests (built on it): requests' per-call work (merging session settings,
hooks, cookies) cost 0.4 ms of CPU per store call, twice the HTTP itself, and
every engine call makes one to several store calls.

A write whose answer is lost (the member it went to lost its leader, which
drops the proposal it had forwarded; or the read timed out) may or may not
have been applied. Instead of failing the engine's call, the client settles
it: a txn is sent again, which its compares make safe (had the first applied,
they now fail), and when the second one fails its compares the keys are read
back: holding exactly what this txn wrote, it was ours. Records that two
writers could write byte for byte alike carry a token of their own for this
(model.Address.token). A plain put or delete is simply sent again.

The watch is a streaming POST /v3/watch read from a raw socket: a timed-out
read on a socket is harmless (a buffered HTTP response would be corrupted by
one), so the reader can poll `stop` and notice a silent stream. A stream with
no bytes for `watch_idle_timeout` is checked with a probe request: if etcd does
not answer, the watch raises StoreError (the caller resumes elsewhere); if it
does, the stream was merely idle. TCP keepalive catches a dead peer.

With etcd authentication on, user and password buy a token from
/v3/auth/authenticate; it travels as the Authorization header (the gateway
hands it to etcd as the gRPC token) and is bought again when etcd says it is
no longer valid (its TTL ran out, or the member restarted and forgot it).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import threading
from typing import Iterable, Iterator, Mapping, Optional

import urllib3

from .base import Compacted, Event, KeyValue, Store, StoreError
from .etcd_watch import _Idle, _WatchStream
from .memory import check_txn

log = logging.getLogger(__name__)

#: Seconds to set up a TCP (and TLS) connection to one endpoint.
CONNECT_TIMEOUT = 1.0
#: Seconds for etcd to answer a request once connected. A write that waited
#: this long for a new leader is settled by sending it again (above), so this
#: need not outlast an election; it is short enough that `docker run` fails
#: within seconds when etcd is cut off (a write: twice this, for the resend).
REQUEST_TIMEOUT = 5.0
#: Seconds of silence on a watch stream before etcd is probed.
WATCH_IDLE_TIMEOUT = 10.0

# gRPC status codes the gateway returns in {"code": N}.
_INVALID_ARGUMENT, _NOT_FOUND, _PERMISSION_DENIED, _UNAVAILABLE, _UNAUTHENTICATED = 3, 5, 7, 14, 16
_AUTH_FLAGS = "--etcd-user and --etcd-password (PYOVERLAY_ETCD_USER, PYOVERLAY_ETCD_PASSWORD)"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Optional[str]) -> bytes:
    return base64.b64decode(text) if text else b""


def _range_end(key: bytes) -> bytes:
    """etcd's prefix end: the key with its last byte incremented (b"\\0" = no end)."""
    key = key.rstrip(b"\xff")
    return key[:-1] + bytes([key[-1] + 1]) if key else b"\0"


def _not_sent(e: Exception) -> bool:
    """True when the request surely never reached etcd, so any call may be retried
    (no connection, or no TLS session: nothing was sent on it)."""
    return isinstance(e, (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.SSLError))


def _describe(e: BaseException, timeouts: tuple[float, float]) -> str:
    """A short reason, without urllib3's object reprs."""
    if isinstance(e, urllib3.exceptions.NewConnectionError):
        pass  # refused, unreachable: said below
    elif isinstance(e, urllib3.exceptions.ConnectTimeoutError) or isinstance(e, (socket.timeout, TimeoutError)):
        return f"no connection within {timeouts[0]:g} s"
    if isinstance(e, urllib3.exceptions.ReadTimeoutError):
        return f"no answer within {timeouts[1]:g} s"
    if isinstance(e, (urllib3.exceptions.SSLError, ssl.SSLError)):
        return f"TLS error: {e}"
    text = str(e)
    marker = "Failed to establish a new connection: "
    if marker in text:
        text = text.split(marker, 1)[1].split("'))", 1)[0].rstrip(")'\"")
    if isinstance(e, ConnectionRefusedError):
        text = "connection refused"
    return text or type(e).__name__


class EtcdStore(Store):
    def __init__(
        self,
        endpoints: list[str],
        prefix: str = "/pyoverlay/",
        cacert: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        watch_idle_timeout: float = WATCH_IDLE_TIMEOUT,
        user: Optional[str] = None,
        password: Optional[str] = None,
    ):
        if not endpoints:
            raise ValueError("etcd store needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.url = "etcd at " + ",".join(self.endpoints)
        self.prefix = prefix.encode()
        self.cacert, self.cert, self.key = cacert, cert, key
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.watch_idle_timeout = watch_idle_timeout
        self._current = 0  # the endpoint that answered last: tried first
        self._lock = threading.Lock()
        self._ssl: Optional[ssl.SSLContext] = None
        if bool(user) != (password is not None):
            raise StoreError(f"{self.url}: give both {_AUTH_FLAGS}, or neither")
        self.user, self._password = user, password
        self._token: Optional[str] = None
        self._token_lock = threading.Lock()
        if any(e.startswith("https://") for e in self.endpoints):
            try:
                self._ssl = ssl.create_default_context(cafile=cacert)
                if cert:
                    self._ssl.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as e:
                raise StoreError(f"{self.url}: cannot load TLS files (cacert={cacert}, cert={cert}, key={key}): {e}") from e
        self._http = self._pools()

    # Transport.

    @property
    def _timeouts(self) -> tuple[float, float]:
        return (self.connect_timeout, self.request_timeout)

    def _pools(self) -> urllib3.PoolManager:
        # Thread-safe, a pool of kept-alive connections per endpoint (one per
        # request thread at most); never a proxy from the environment; no
        # retries of its own: _post_once decides what may be sent again.
        return urllib3.PoolManager(num_pools=max(4, len(self.endpoints)), maxsize=16, block=False,
                                   retries=False, ssl_context=self._ssl)

    def _send(self, url: str, body: dict, headers: dict) -> tuple[int, bytes]:
        r = self._http.request("POST", url, body=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json", **headers},
                               timeout=urllib3.Timeout(connect=self.connect_timeout, read=self.request_timeout))
        return r.status, r.data

    # Authentication.

    def _headers(self) -> dict:
        token = self._current_token() if self.user else ""
        return {"Authorization": token} if token else {}

    def _current_token(self) -> str:
        with self._token_lock:
            if self._token is None:
                self._token = self._authenticate()
            return self._token

    def _token_expired(self, token: Optional[str]) -> None:
        with self._token_lock:
            if self._token == token:
                self._token = None

    def _authenticate(self) -> str:
        try:
            data = self._post("/v3/auth/authenticate", {"name": self.user, "password": self._password},
                              retry=True, auth=False)
        except _GatewayError as e:
            if e.code == _INVALID_ARGUMENT:  # "authentication failed, invalid user ID or password"
                raise StoreError(
                    f"{e}: etcd refused user {self.user!r}; check {_AUTH_FLAGS} against the etcd user "
                    "(etcdctl user get " + self.user + ")") from None
            if "not enabled" in str(e):  # an etcd without authentication: nothing to log in to
                log.warning("%s: authentication is off in etcd; --etcd-user is not needed", self.url)
                return ""
            raise
        token = data.get("token")
        if not token:  # authentication is off in etcd: no token needed
            return ""
        return token

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._current + i) % n for i in range(n)]

    def _unreachable(self, errors: list[str]) -> StoreError:
        where = ", ".join(self.endpoints)
        return StoreError(
            f"etcd at {where} is unreachable: {'; '.join(errors)}; check --store and that etcd is running"
        )

    def _post(self, path: str, body: dict, *, retry: bool, endpoint: Optional[int] = None, auth: bool = True) -> dict:
        """POST to the first endpoint that answers. retry: the call may be sent
        again to another endpoint even if the first one may have applied it (reads,
        leases). A write is only moved on when it surely never reached etcd."""
        if not (auth and self.user):
            return self._post_once(path, body, retry=retry, endpoint=endpoint, headers={})
        token = self._current_token()
        try:
            return self._post_once(path, body, retry=retry, endpoint=endpoint,
                                   headers={"Authorization": token} if token else {})
        except _GatewayError as e:
            # A token etcd no longer knows was refused before any work: buy a new one and send again.
            if e.code != _UNAUTHENTICATED:
                raise
            self._token_expired(token)
            return self._post_once(path, body, retry=retry, endpoint=endpoint, headers=self._headers())

    def _post_once(self, path: str, body: dict, *, retry: bool, endpoint: Optional[int], headers: dict) -> dict:
        errors = []
        for i in self._order() if endpoint is None else [endpoint]:
            ep = self.endpoints[i]
            try:
                status, raw = self._send(ep + path, body, headers)
            except (urllib3.exceptions.HTTPError, OSError) as e:
                why = _describe(e, self._timeouts)
                if not retry and not _not_sent(e):
                    raise _Unsure(f"etcd at {ep} failed during a write ({why}); it may or may not have been applied",
                                  None) from e
                errors.append(f"{ep}: {why}")
                continue
            try:
                data = json.loads(raw)
            except ValueError:
                data = {}
            if not isinstance(data, dict):
                data = {}
            text = raw.decode("utf-8", "replace")
            if status == 200 and "error" not in data:
                self._current = i
                return data
            err = data.get("error")
            if isinstance(err, dict):  # streaming endpoints wrap errors this way
                code, msg = err.get("grpc_code"), err.get("message")
            else:
                code, msg = data.get("code"), data.get("message") or err
            if not msg and "CommonName of client" in text:
                # etcd 3.4's gateway would act as its own certificate's user, so with
                # authentication on it refuses any client certificate that has a CN.
                msg = (f"{text.strip()}: with authentication on, etcd's JSON gateway cannot log in by "
                       "certificate name; use a client certificate without a common name (CN) and "
                       f"log in with {_AUTH_FLAGS}")
            if not msg:  # not an etcd gateway error: say what did answer
                msg = f"unexpected answer HTTP {status} {text[:200]!r} (is this etcd's client URL?)"
            if code == _UNAVAILABLE and retry:
                errors.append(f"{ep}: {msg}")
                continue
            if code == _UNAVAILABLE:  # "leader changed", "request timed out": the proposal's fate is unknown
                raise _Unsure(f"etcd at {ep}: {msg} during a write; it may or may not have been applied", code)
            raise _GatewayError(f"etcd at {ep}: {msg}{self._auth_hint(code, msg)}", code)
        raise self._unreachable(errors)

    def _auth_hint(self, code: Optional[int], msg: str) -> str:
        """What to do about an authentication or permission error."""
        if code == _PERMISSION_DENIED:
            who = f"user {self.user!r}" if self.user else "the client certificate's user"
            return (f"; {who} needs a role with readwrite on the prefix {self.prefix.decode()!r} "
                    f"(etcdctl role grant-permission ROLE --prefix readwrite {self.prefix.decode()})")
        if "user name is empty" in str(msg):
            return f"; etcd has authentication on: pass {_AUTH_FLAGS}"
        return ""

    def _key(self, key: str) -> str:
        return _b64(self.prefix + key.encode())

    def _kv(self, kv: dict) -> KeyValue:
        key = _unb64(kv.get("key"))[len(self.prefix):].decode()
        return KeyValue(key, _unb64(kv.get("value")).decode(), int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))

    def _prefix_range(self, prefix: str) -> tuple[bytes, bytes]:
        start = self.prefix + prefix.encode()
        if not start:
            return b"\0", b"\0"  # every key
        return start, _range_end(start)

    # The interface.

    def get(self, key: str) -> Optional[KeyValue]:
        data = self._post("/v3/kv/range", {"key": self._key(key)}, retry=True)
        kvs = data.get("kvs") or []
        return self._kv(kvs[0]) if kvs else None

    def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        start, end = self._prefix_range(prefix)
        data = self._post("/v3/kv/range", {"key": _b64(start), "range_end": _b64(end)}, retry=True)
        return [self._kv(kv) for kv in data.get("kvs") or []], int(data["header"]["revision"])

    def put(self, key: str, value: str, lease: int = 0) -> int:
        body = {"key": self._key(key), "value": _b64(value.encode())}
        if lease:
            body["lease"] = str(lease)
        return int(self._write("/v3/kv/put", body)["header"]["revision"])

    def delete(self, key: str) -> bool:
        data = self._write("/v3/kv/deleterange", {"key": self._key(key)})
        return int(data.get("deleted", 0)) > 0

    def txn(
        self,
        compare: Mapping[str, int],
        put: Mapping[str, str] = {},
        delete: Iterable[str] = (),
        lease: int = 0,
    ) -> bool:
        delete = check_txn(put, delete)
        cmps = []
        for key, rev in compare.items():
            if rev == 0:
                # A missing key has create_revision 0; mod_revision alone could
                # not tell "absent" from a value etcd never produces.
                cmps.append({"key": self._key(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
            else:
                cmps.append({"key": self._key(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(rev)})
        ops = []
        for key, value in put.items():
            req = {"key": self._key(key), "value": _b64(value.encode())}
            if lease:
                req["lease"] = str(lease)
            ops.append({"request_put": req})
        ops += [{"request_delete_range": {"key": self._key(key)}} for key in delete]
        body = {"compare": cmps, "success": ops, "failure": []}
        try:
            data = self._post("/v3/kv/txn", body, retry=False)
        except _Unsure as unsure:
            data = self._resend(body, unsure)
            if not data.get("succeeded", False) and self._holds(put, delete):
                log.warning("%s: a txn whose answer was lost had been applied (read back)", self.url)
                return True
        return bool(data.get("succeeded", False))

    def _write(self, path: str, body: dict) -> dict:
        """A put or delete: sent again if its answer was lost (the same value, the same key)."""
        try:
            return self._post(path, body, retry=False)
        except _Unsure as unsure:
            return self._resend(body, unsure, path)

    def _resend(self, body: dict, unsure: "_Unsure", path: str = "/v3/kv/txn") -> dict:
        log.warning("%s; sending it again", unsure)
        try:
            return self._post(path, body, retry=True)
        except StoreError as e:
            raise StoreError(f"{unsure}; sent again: {e}") from e

    def _holds(self, put: Mapping[str, str], delete: Iterable[str]) -> bool:
        """True if every key of put holds exactly its value and every key of delete is gone."""
        for key, value in put.items():
            kv = self.get(key)
            if kv is None or kv.value != value:
                return False
        return all(self.get(key) is None for key in delete) and bool(put or delete)

    def watch(self, prefix: str, start_revision: int, stop: threading.Event) -> Iterator[list[Event]]:
        start, end = self._prefix_range(prefix)
        nxt = start_revision
        while not stop.is_set():
            stream, errors = None, []
            request = {"create_request": {"key": _b64(start), "range_end": _b64(end), "progress_notify": True}}
            if nxt > 0:
                request["create_request"]["start_revision"] = str(nxt)
            token = self._current_token() if self.user else None
            for i in self._order():
                try:
                    stream = _WatchStream(self.endpoints[i], request, self._ssl, self._timeouts, token)
                    break
                except (OSError, ssl.SSLError, StoreError) as e:  # StoreError: e.g. "no leader"
                    errors.append(f"{self.endpoints[i]}: {_describe(e, self._timeouts)}")
            if stream is None:
                raise self._unreachable(errors)
            try:
                for msg in self._messages(stream, stop):
                    if "error" in msg:
                        if "auth token" in json.dumps(msg["error"]):
                            self._token_expired(token)  # the next attempt buys a new one
                        raise StoreError(f"etcd at {stream.endpoint}: watch failed: {msg['error']}")
                    result = msg.get("result", {})
                    revision = int(result.get("header", {}).get("revision", 0))
                    if result.get("canceled"):
                        compact = int(result.get("compact_revision", 0))
                        if compact:
                            raise Compacted(
                                f"etcd at {stream.endpoint}: revision {nxt} is compacted (oldest kept {compact})",
                                compact,
                            )
                        raise StoreError(
                            f"etcd at {stream.endpoint}: watch canceled: {result.get('cancel_reason', 'no reason given')}"
                        )
                    events = result.get("events") or []
                    if events:
                        batch = [self._event(e) for e in events]
                        nxt = batch[-1].revision + 1
                        yield batch
                    elif revision and (nxt <= 0 or not result.get("created")):
                        # Created (from "now") or a progress notification: every
                        # event up to this revision has been delivered.
                        nxt = max(nxt, revision + 1)
            except Compacted:
                raise
            except (OSError, ValueError, StoreError) as e:
                # This member may be down or cut off from its cluster: resume on the next one.
                self._current = (self.endpoints.index(stream.endpoint) + 1) % len(self.endpoints)
                if isinstance(e, StoreError):
                    raise
                raise StoreError(f"etcd at {stream.endpoint}: watch stream broke: {_describe(e, self._timeouts)}") from e
            finally:
                stream.close()

    def _messages(self, stream: _WatchStream, stop: threading.Event) -> Iterator[dict]:
        """The stream's messages; on silence, probe etcd and carry on only if it answers."""
        while True:
            try:
                yield from stream.messages(stop, self.watch_idle_timeout)
                return
            except _Idle:
                i = self.endpoints.index(stream.endpoint)
                try:
                    self._post("/v3/kv/range", {"key": _b64(self.prefix or b"\0"), "keys_only": True, "limit": 1},
                               retry=True, endpoint=i)
                except StoreError as e:
                    # Resume on another endpoint next time.
                    self._current = (i + 1) % len(self.endpoints)
                    raise StoreError(
                        f"etcd at {stream.endpoint} stopped answering: watch silent for "
                        f"{self.watch_idle_timeout:g} s and a probe failed ({e})"
                    ) from e

    def _event(self, e: dict) -> Event:
        kv = self._kv(e["kv"])
        if e.get("type") == "DELETE":
            return Event("delete", kv.key, None, kv.mod_revision)
        return Event("put", kv.key, kv.value, kv.mod_revision)

    def grant_lease(self, ttl: int) -> int:
        # Retrying may leak a lease that then expires by itself: harmless.
        return int(self._post("/v3/lease/grant", {"TTL": str(ttl)}, retry=True)["ID"])

    def keepalive(self, lease: int) -> bool:
        data = self._post("/v3/lease/keepalive", {"ID": str(lease)}, retry=True)
        return int(data.get("result", {}).get("TTL", 0)) > 0

    def revoke(self, lease: int) -> None:
        try:
            self._post("/v3/lease/revoke", {"ID": str(lease)}, retry=True)
        except _GatewayError as e:
            if e.code != _NOT_FOUND:  # already gone is what we wanted
                raise

    # Not in the interface.

    def compact(self, revision: int) -> None:
        """Compact etcd's history below revision (normally etcd's own --auto-compaction does this)."""
        self._post("/v3/kv/compaction", {"revision": str(revision), "physical": True}, retry=True)

    def close(self) -> None:
        with self._lock:
            http, self._http = self._http, self._pools()
        http.clear()


class _GatewayError(StoreError):
    """etcd answered with an error (code is the gRPC status code)."""

    def __init__(self, message: str, code: Optional[int]):
        super().__init__(message)
        self.code = code


class _Unsure(_GatewayError):
    """A write was sent and its answer lost: it may or may not have been applied."""
