"""Talking to a plugin socket the way the engine does (used by `doctor`,
the tests and the benchmarks)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Optional

ACCEPT = "application/vnd.docker.plugins.v1.2+json"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def call(path: str, method: str, body: Optional[dict] = None, timeout: float = 10) -> tuple[int, object]:
    """POST /<method> with the engine's Accept header and no Content-Type;
    returns the status and the decoded answer (the raw text if not JSON)."""
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request("POST", f"/{method}", body=b"" if body is None else json.dumps(body).encode(),
                     headers={"Accept": ACCEPT})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw) if raw else None
    except ValueError:
        return response.status, raw.decode(errors="replace")
