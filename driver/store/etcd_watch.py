"""One streaming POST /v3/watch of etcd's JSON gateway on a raw socket.

A timed-out read on a socket is harmless (a buffered HTTP response would be
corrupted by one), so the reader can poll `stop` and notice a silent stream.
Used by driver/store/etcd.py.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from typing import Iterator, Optional
from urllib.parse import urlsplit

from .base import StoreError

#: How often a blocked watch read looks at its stop event.
_STOP_POLL = 0.1


class _Idle(Exception):
    """No byte on the watch stream for the idle timeout."""


class _WatchStream:
    """One streaming POST /v3/watch on its own socket, decoded message by message."""

    def __init__(self, endpoint: str, body: dict, ctx: Optional[ssl.SSLContext], timeouts: tuple[float, float],
                 token: Optional[str] = None):
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
                + (b"Authorization: " + token.encode() + b"\r\n" if token else b"")
                + b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
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
