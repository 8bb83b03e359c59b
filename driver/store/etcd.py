"""etcd v3 through its JSON gateway, with plain `requests` and our own watch.

Why not etcd3gw: its watch dies silently when etcd restarts and ignores a
compaction, so the watch had to be ours anyway; what is left is a few JSON
POSTs, and owning them gives failover that never repeats an ambiguous write,
short timeouts and errors that name the store, with no new dependency.

The watch is a streaming POST /v3/watch read from a raw socket: a timed-out
read on a socket is harmless (a buffered HTTP response would be corrupted by
one), so the reader can poll `stop` and notice a silent stream. A stream with
no bytes for `watch_idle_timeout` is checked with a probe request: if etcd does
not answer, the watch raises StoreError (the caller resumes elsewhere); if it
does, the stream was merely idle. TCP keepalive catches a dead peer.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import time
from typing import Iterable, Iterator, Mapping, Optional
from urllib.parse import urlsplit

import requests
import urllib3

from .base import Compacted, Event, KeyValue, Store, StoreError
from .memory import check_txn

#: Seconds to set up a TCP (and TLS) connection to one endpoint.
CONNECT_TIMEOUT = 1.0
#: Seconds for etcd to answer a request once connected.
REQUEST_TIMEOUT = 3.0
#: Seconds of silence on a watch stream before etcd is probed.
WATCH_IDLE_TIMEOUT = 10.0
#: How often a blocked watch read looks at its stop event.
_STOP_POLL = 0.1

# gRPC status codes the gateway returns in {"code": N}.
_NOT_FOUND, _UNAVAILABLE = 5, 14


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Optional[str]) -> bytes:
    return base64.b64decode(text) if text else b""


def _range_end(key: bytes) -> bytes:
    """etcd's prefix end: the key with its last byte incremented (b"\\0" = no end)."""
    key = key.rstrip(b"\xff")
    return key[:-1] + bytes([key[-1] + 1]) if key else b"\0"


def _not_sent(e: requests.RequestException) -> bool:
    """True when the request surely never reached etcd, so any call may be retried."""
    if isinstance(e, (requests.exceptions.ConnectTimeout, requests.exceptions.SSLError)):
        return True
    reason = e.args[0] if e.args else None
    reason = getattr(reason, "reason", reason)  # MaxRetryError wraps the cause
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


def _describe(e: BaseException, timeouts: tuple[float, float]) -> str:
    """A short reason, without urllib3's object reprs."""
    if isinstance(e, requests.exceptions.ConnectTimeout) or isinstance(e, (socket.timeout, TimeoutError)):
        return f"no connection within {timeouts[0]:g} s"
    if isinstance(e, requests.exceptions.ReadTimeout):
        return f"no answer within {timeouts[1]:g} s"
    if isinstance(e, (requests.exceptions.SSLError, ssl.SSLError)):
        return f"TLS error: {e}"
    text = str(e)
    marker = "Failed to establish a new connection: "
    if marker in text:
        text = text.split(marker, 1)[1].split("'))", 1)[0].rstrip(")'\"")
    if isinstance(e, ConnectionRefusedError):
        text = "connection refused"
    return text or type(e).__name__


class _Idle(Exception):
    """No byte on the watch stream for the idle timeout."""


class _WatchStream:
    """One streaming POST /v3/watch on its own socket, decoded message by message."""

    def __init__(self, endpoint: str, body: dict, ctx: Optional[ssl.SSLContext], timeouts: tuple[float, float]):
        self.endpoint = endpoint
        url = urlsplit(endpoint)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=timeouts[0])
        try:
            # Notice a vanished peer (host down, state dropped in between) within ~15 s.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 3)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
            if ctx is not None:
                self.sock = ctx.wrap_socket(self.sock, server_hostname=url.hostname)
            payload = json.dumps(body).encode()
            host = url.netloc.rsplit("@", 1)[-1]
            self.sock.settimeout(timeouts[1])
            self.sock.sendall(
                b"POST /v3/watch HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                b"Content-Type: application/json\r\n"
                # The gateway passes this on as gRPC metadata: etcd then cancels
                # the watch if its member loses the cluster leader, instead of
                # leaving a stream that will never carry another event.
                b"Grpc-Metadata-Hasleader: true\r\n"
                b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
            )
            self._raw = b""
            while b"\r\n\r\n" not in self._raw:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("connection closed before a response")
                self._raw += data
            head, self._raw = self._raw.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            status = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
            self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            self._payload = b""
            if len(status) < 2 or status[1] != "200":
                raise StoreError(f"etcd at {endpoint}: watch refused: {lines[0]} {self._raw[:300]!r}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _recv(self, stop: threading.Event, idle: float) -> bool:
        """Read more bytes; False if stop was set."""
        self.sock.settimeout(_STOP_POLL)
        quiet_since = time.monotonic()
        while not stop.is_set():
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                if time.monotonic() - quiet_since >= idle:
                    raise _Idle()
                continue
            if not data:
                raise ConnectionError("etcd closed the watch stream")
            self._raw += data
            return True
        return False

    def _dechunk(self) -> None:
        if not self._chunked:
            self._payload += self._raw
            self._raw = b""
            return
        while True:
            eol = self._raw.find(b"\r\n")
            if eol < 0:
                return
            size = int(self._raw[:eol].split(b";", 1)[0], 16)
            if size == 0:
                raise ConnectionError("etcd ended the watch stream")
            if len(self._raw) < eol + 2 + size + 2:
                return
            self._payload += self._raw[eol + 2 : eol + 2 + size]
            self._raw = self._raw[eol + 2 + size + 2 :]

    def messages(self, stop: threading.Event, idle: float) -> Iterator[dict]:
        """Decoded messages until stop is set; raises _Idle after `idle` silent seconds."""
        while True:
            self._dechunk()
            # The gateway ends every message with a newline; JSON text has none.
            while b"\n" in self._payload:
                line, self._payload = self._payload.split(b"\n", 1)
                if line.strip():
                    yield json.loads(line)
            if not self._recv(stop, idle):
                return


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
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._ssl: Optional[ssl.SSLContext] = None
        if any(e.startswith("https://") for e in self.endpoints):
            try:
                self._ssl = ssl.create_default_context(cafile=cacert)
                if cert:
                    self._ssl.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as e:
                raise StoreError(f"{self.url}: cannot load TLS files (cacert={cacert}, cert={cert}, key={key}): {e}") from e

    # Transport.

    @property
    def _timeouts(self) -> tuple[float, float]:
        return (self.connect_timeout, self.request_timeout)

    def _session(self) -> requests.Session:
        # requests.Session is not documented thread-safe: one per thread.
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False  # a proxy from the environment must not sit between us and etcd
            if self.cacert:
                s.verify = self.cacert
            if self.cert:
                s.cert = (self.cert, self.key) if self.key else self.cert
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._current + i) % n for i in range(n)]

    def _unreachable(self, errors: list[str]) -> StoreError:
        where = ", ".join(self.endpoints)
        return StoreError(
            f"etcd at {where} is unreachable: {'; '.join(errors)}; check --store and that etcd is running"
        )

    def _post(self, path: str, body: dict, *, retry: bool, endpoint: Optional[int] = None) -> dict:
        """POST to the first endpoint that answers. retry: the call may be sent
        again to another endpoint even if the first one may have applied it (reads,
        leases). A write is only moved on when it surely never reached etcd."""
        errors = []
        for i in self._order() if endpoint is None else [endpoint]:
            ep = self.endpoints[i]
            try:
                r = self._session().post(ep + path, json=body, timeout=self._timeouts)
            except requests.RequestException as e:
                why = _describe(e, self._timeouts)
                if not retry and not _not_sent(e):
                    raise StoreError(
                        f"etcd at {ep} failed during a write ({why}); it may or may not have been applied"
                    ) from e
                errors.append(f"{ep}: {why}")
                continue
            try:
                data = r.json()
            except ValueError:
                data = {}
            if r.status_code == 200 and "error" not in data:
                self._current = i
                return data
            err = data.get("error")
            if isinstance(err, dict):  # streaming endpoints wrap errors this way
                code, msg = err.get("grpc_code"), err.get("message")
            else:
                code, msg = data.get("code"), data.get("message") or err
            if not msg:  # not an etcd gateway error: say what did answer
                msg = f"unexpected answer HTTP {r.status_code} {r.text[:200]!r} (is this etcd's client URL?)"
            if code == _UNAVAILABLE and retry:
                errors.append(f"{ep}: {msg}")
                continue
            raise _GatewayError(f"etcd at {ep}: {msg}", code)
        raise self._unreachable(errors)

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
        return int(self._post("/v3/kv/put", body, retry=False)["header"]["revision"])

    def delete(self, key: str) -> bool:
        data = self._post("/v3/kv/deleterange", {"key": self._key(key)}, retry=False)
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
        data = self._post("/v3/kv/txn", {"compare": cmps, "success": ops, "failure": []}, retry=False)
        return bool(data.get("succeeded", False))

    def watch(self, prefix: str, start_revision: int, stop: threading.Event) -> Iterator[list[Event]]:
        start, end = self._prefix_range(prefix)
        nxt = start_revision
        while not stop.is_set():
            stream, errors = None, []
            request = {"create_request": {"key": _b64(start), "range_end": _b64(end), "progress_notify": True}}
            if nxt > 0:
                request["create_request"]["start_revision"] = str(nxt)
            for i in self._order():
                try:
                    stream = _WatchStream(self.endpoints[i], request, self._ssl, self._timeouts)
                    break
                except (OSError, ssl.SSLError, StoreError) as e:  # StoreError: e.g. "no leader"
                    errors.append(f"{self.endpoints[i]}: {_describe(e, self._timeouts)}")
            if stream is None:
                raise self._unreachable(errors)
            try:
                for msg in self._messages(stream, stop):
                    if "error" in msg:
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
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            s.close()
        self._local = threading.local()


class _GatewayError(StoreError):
    """etcd answered with an error (code is the gRPC status code)."""

    def __init__(self, message: str, code: Optional[int]):
        super().__init__(message)
        self.code = code
