"""Network namespaces as hosts, for the tests that start no engine.

A NamespaceLab makes named namespaces (/run/netns/<prefix>-<tag>-<role>) and a
work directory, where a Dataplane can keep its overlay namespaces; close()
removes both, unmounting what the Dataplane bind-mounted there (a mount left
behind keeps its namespace and devices alive). Commands run inside a namespace
with nsenter, so the observation never goes through the module under test.
"""

from __future__ import annotations

import subprocess
import tempfile
import uuid

from pyroute2 import netns as pr_netns

from tests.hosts import remove_tree


def run_in(ns: str, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """cmd in the namespace at path ns."""
    return subprocess.run(["nsenter", f"--net={ns}", *cmd], capture_output=True, text=True, timeout=timeout,
                          check=check)


def sh(ns: str, *cmd: str, check: bool = True) -> str:
    """cmd in the namespace at path ns; its output."""
    return run_in(ns, *cmd, check=check).stdout


def pings(ns: str, ip: str) -> bool:
    """One ping from ns answered within a second."""
    return run_in(ns, "ping", "-c1", "-W1", "-q", ip, check=False).returncode == 0


class NamespaceLab:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.tag = uuid.uuid4().hex[:6]
        self.dir = tempfile.mkdtemp(prefix=f"pyo-{prefix}-")
        self.names: list[str] = []

    def ns(self, role: str) -> str:
        """A new named namespace with lo up; its path."""
        name = f"{self.prefix}-{self.tag}-{role}"
        pr_netns.create(name)
        self.names.append(name)
        path = f"/run/netns/{name}"
        sh(path, "ip", "link", "set", "lo", "up")
        return path

    def close(self) -> None:
        for name in self.names:
            try:
                pr_netns.remove(name)
            except OSError:
                pass
        remove_tree(self.dir)
