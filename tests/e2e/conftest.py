"""Fixtures for end-to-end tests: an underlay for the session, hosts per test.

Every test under tests/e2e is marked `e2e`. On a failure the report carries
each host's plugin log and the tail of its dockerd log.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests.etcdserver import EtcdServer
from tests.hosts import UNDERLAY_ADDR, NamespaceHost, SessionLock, Underlay, build_image_tar, sweep_leftovers, wait_for
from tests.hosts_ssh import HOSTS_ENV, hosts_from_env
from tests.engines import engine_version

HERE = Path(__file__).parent
FACTORY = pytest.StashKey["HostFactory"]()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)
            if "vm" not in item.keywords:
                # Only the `vm` slice claims to run on VMs; the rest needs namespace hosts.
                item.add_marker(pytest.mark.namespace_only)
    if os.environ.get(HOSTS_ENV):
        # On VMs (or the sshd "VMs"): what cannot run there is left out, and said so.
        skipped = [i for i in items if "namespace_only" in i.keywords]
        if skipped:
            config.hook.pytest_deselected(items=skipped)
            items[:] = [i for i in items if "namespace_only" not in i.keywords]
            reporter = config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"e2e: {HOSTS_ENV} is set: {len(skipped)} test(s) marked namespace_only "
                                    "(they need namespace hosts) deselected")


@pytest.fixture(scope="session", autouse=True)
def sshd_vms(request):
    """PYOVERLAY_E2E_HOSTS=sshd: three namespace hosts running sshd, set up as
    the Vagrantfile sets up VMs (tests/sshd_vms.py); the tests then reach
    them as vagrant:<their ssh-config>, through SSHHost."""
    if os.environ.get(HOSTS_ENV) != "sshd":
        yield None
        return
    from tests.sshd_vms import SshdVMs

    vms = SshdVMs(request.getfixturevalue("underlay"), request.getfixturevalue("e2e_workdir"),
                  request.getfixturevalue("image_tar"))
    try:
        vms.start()
        os.environ[HOSTS_ENV] = f"vagrant:{vms.ssh_config}"
        yield vms
    finally:
        os.environ[HOSTS_ENV] = "sshd"
        vms.close()


@pytest.fixture(scope="session")
def e2e_workdir(request):
    """Lock, sweep a crashed run's leftovers, then a work directory for the session."""
    lock = SessionLock()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if not lock.try_acquire():
        if reporter is not None:
            reporter.write_line(f"e2e: waiting for another e2e session to finish (lock {lock.path})")
        lock.acquire()
    try:
        removed = sweep_leftovers()
        if removed and reporter is not None:
            reporter.write_line(f"e2e: removed leftovers of an earlier run: {', '.join(removed)}")
        if reporter is not None:
            reporter.write_line(f"e2e: engine under test: {engine_version()}")
        workdir = Path(tempfile.mkdtemp(prefix="pyo-e2e-"))
        try:
            yield workdir
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        lock.release()


@pytest.fixture(scope="session")
def image_tar(e2e_workdir):
    return build_image_tar(e2e_workdir)


@pytest.fixture(scope="session")
def underlay(e2e_workdir):
    net = Underlay(e2e_workdir / "underlay")
    try:
        net.setup()
        yield net
    finally:
        net.close()


class HostFactory:
    """make_hosts(n, mtu=None): n more hosts, engines up, plugin not started."""

    def __init__(self, underlay: Underlay, workdir: Path, image_tar: Path):
        self.underlay = underlay
        self.workdir = workdir
        self.image_tar = image_tar
        self.hosts: list[NamespaceHost] = []

    def __call__(self, n: int, mtu: int | None = None, engine_gwbridge: bool = False,
                 daemon_config: dict | None = None) -> list[NamespaceHost]:
        """engine_gwbridge: the engine makes docker_gwbridge itself (on VMs it always does)."""
        if os.environ.get(HOSTS_ENV):
            return self._vms(n, mtu)
        made = []
        for _ in range(n):
            host = NamespaceHost(len(self.hosts) + 1, self.underlay, self.workdir, self.image_tar, mtu=mtu,
                                 engine_gwbridge=engine_gwbridge, daemon_config=daemon_config)
            self.hosts.append(host)  # registered first: a half-started host is torn down too
            host.start()
            made.append(host)
        return made

    def _vms(self, n: int, mtu: int | None):
        """The same tests on real machines (Vagrantfile): PYOVERLAY_E2E_HOSTS=vagrant:SSH-CONFIG."""
        if mtu is not None:
            pytest.skip(f"{HOSTS_ENV}: the VMs' underlay MTU is fixed")
        vms = hosts_from_env(image_tar=self.image_tar)
        if len(self.hosts) + n > len(vms):
            pytest.fail(f"{HOSTS_ENV} names {len(vms)} hosts; this test needs {len(self.hosts) + n}")
        made = vms[len(self.hosts):len(self.hosts) + n]
        for host in made:
            self.hosts.append(host)
            host.start()
        return made

    def close(self) -> None:
        errors = []
        for host in reversed(self.hosts):
            try:
                host.close()
            except Exception as exc:  # tear the others down anyway
                errors.append(f"{host.name}: {exc!r}")
        if errors:
            raise RuntimeError("host teardown failed: " + "; ".join(errors))


@contextmanager
def etcd_and_hosts(underlay: Underlay, workdir, image_tar, n: int, etcd: Optional[EtcdServer] = None,
                   **host_options) -> Iterator[tuple[EtcdServer, HostFactory, list[NamespaceHost]]]:
    """A module's cluster: etcd on the underlay (or the one given) and n hosts
    with their engines up, plugins not started; torn down after, hosts first."""
    etcd = etcd or EtcdServer(UNDERLAY_ADDR, netns=underlay.netns)
    factory = HostFactory(underlay, workdir, image_tar)
    try:
        etcd.start()
        yield etcd, factory, factory(n, **host_options)
    finally:
        try:
            factory.close()
        finally:
            etcd.close()


@pytest.fixture
def make_hosts(request, underlay, e2e_workdir, image_tar):
    factory = HostFactory(underlay, e2e_workdir, image_tar)
    request.node.stash[FACTORY] = factory  # for the failure report
    try:
        yield factory
    finally:
        factory.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    factory = item.stash.get(FACTORY, None)
    if report.failed and factory is not None:
        for host in factory.hosts:
            report.sections.append((f"{host.name} plugin log", host.plugin_log()))
            report.sections.append((f"{host.name} dockerd log (tail)", host.engine_log()))


@pytest.fixture(scope="session")
def underlay_http(underlay):
    """A web server on the underlay (10.99.0.254:8000) serving one random
    token: what "outbound from a container works" is checked against."""
    token = uuid.uuid4().hex
    url = underlay.serve_http(8000, {"token": token + "\n"})
    return f"{url}/token", token


def ensure_network(hosts, name: str, subnet: str, vni: int) -> None:
    """The network on each host. Tolerates a host where it appeared by itself
    (pyoverlay's catalog, when on, shares network names between hosts)."""
    for host in hosts:
        if host.docker_proc("network", "inspect", name, check=False).returncode == 0:
            continue
        made = host.docker_proc("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay",
                                "--subnet", subnet, "-o", f"vni={vni}", name, check=False)
        if made.returncode != 0:
            wait_for(lambda: host.docker_proc("network", "inspect", name, check=False).returncode == 0, 5,
                     f"network {name} on {host.name} (create said: {made.stderr.strip()})")


def clear_hosts(hosts, timeout: float = 60, recount=None, unstick=None) -> None:
    """Remove every container, then every pyoverlay network, from hosts; again
    until none is left (the catalog, when on, removes and may re-add networks
    on other hosts meanwhile). recount(host, name), if given, is called when
    an engine refuses with "has active endpoints" though no container is
    attached, after every host has had its turn (so the catalog has seen the
    network withdrawn). unstick(host, error), if given, is called when
    `docker rm -f` hangs, and raises unless it got the engine going again."""
    for h in hosts:
        containers = h.docker("ps", "-aq").split()
        if containers:
            try:
                h.docker("rm", "-f", *containers, timeout=120)
            except TimeoutError as e:
                if unstick is None:
                    raise
                unstick(h, e)
                left = h.docker("ps", "-aq").split()
                if left:
                    h.docker("rm", "-f", *left, timeout=120)
    why: list[str] = []

    def removed() -> bool:
        left, miscounted = False, []
        for h in hosts:
            for net in h.docker("network", "ls", "--format", "{{.Name}}", "--filter", "driver=pyoverlay").split():
                left = True
                done = h.docker_proc("network", "rm", net, check=False)
                if done.returncode:
                    why[:] = [f"{h.name}: {done.stderr.strip()}"]
                    if recount and "has active endpoints" in done.stderr and not _attached(h, net):
                        miscounted.append((h, net))
        for h, net in miscounted:
            recount(h, net)
        return not left

    wait_for(removed, timeout, lambda: f"pyoverlay networks to go from every host (last refusal: {why})",
             interval=0.5)


def _attached(host, network: str) -> int:
    return int(host.docker("network", "inspect", "-f", "{{len .Containers}}", network).strip() or 0)
