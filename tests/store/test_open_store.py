"""open_store(): the URL forms the command line accepts."""

from __future__ import annotations

import pytest

import driver.store as store_pkg
from driver.store import StoreError, open_store
from driver.store.etcd import EtcdStore
from driver.store.memory import MemoryStore
from driver.store.sqlite import SqliteStore


def test_reexports_the_interface():
    for name in ("Store", "KeyValue", "Event", "StoreError", "Compacted", "open_store"):
        assert hasattr(store_pkg, name)


def test_memory():
    assert isinstance(open_store("memory://"), MemoryStore)


def test_sqlite(tmp_path):
    s = open_store(f"sqlite://{tmp_path}/x/state.db")
    assert isinstance(s, SqliteStore) and s.path == f"{tmp_path}/x/state.db"


@pytest.mark.parametrize("url, kw, endpoints", [
    ("etcd://h1:2379,h2:2380", {}, ["http://h1:2379", "http://h2:2380"]),
    ("etcd://h1", {}, ["http://h1:2379"]),
    ("etcds://h1:2379", {}, ["https://h1:2379"]),
    ("etcd://[fd00::1]:2379,10.0.0.1", {}, ["http://[fd00::1]:2379", "http://10.0.0.1:2379"]),
])
def test_etcd_endpoints(url, kw, endpoints):
    s = open_store(url, prefix="/x/", **kw)
    assert isinstance(s, EtcdStore)
    assert s.endpoints == endpoints and s.prefix == b"/x/"
    assert s.url == "etcd at " + ",".join(endpoints)


def test_missing_tls_file_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="cannot load TLS files.*nope.pem"):
        open_store("etcd://h1:2379", cacert=str(tmp_path / "nope.pem"))


@pytest.mark.parametrize("url", ["redis://h:6379", "consul://h", "h1:2379", "sqlite://relative/state.db",
                                 "etcd://", "etcd://h:port", "etcd://fd00::1"])
def test_bad_urls_say_what_is_accepted(url):
    with pytest.raises(ValueError) as info:
        open_store(url)
    message = str(info.value)
    assert url in message or "sqlite" in message or "IPv6" in message or "port" in message
    if not url.startswith(("sqlite", "etcd://h", "etcd://f")):
        assert "memory://" in message and "sqlite:///" in message and "etcd://" in message


@pytest.mark.parametrize("url, hosts, root", [
    ("zk://h1:2181,h2:2182", "h1:2181,h2:2182", "/pyoverlay"),
    ("zk://h1", "h1:2181", "/pyoverlay"),
    ("zk://h1:2181/apps/overlay/", "h1:2181", "/apps/overlay"),
    ("zk://[fd00::1]:2181,10.0.0.1/x", "[fd00::1]:2181,10.0.0.1:2181", "/x"),
])
def test_zookeeper_hosts_and_root(url, hosts, root):
    from driver.store.zookeeper import ZooKeeperStore

    s = open_store(url)
    try:
        assert isinstance(s, ZooKeeperStore)
        assert (s.hosts, s.root) == (hosts, root)
        assert s.url == f"ZooKeeper at {hosts}{root}"
    finally:
        s.close()


@pytest.mark.parametrize("url", ["zk://", "zk://h:port", "zk://fd00::1", "zk://h1/a//b"])
def test_bad_zookeeper_urls_say_what_is_accepted(url):
    with pytest.raises(ValueError, match="ZooKeeper|zk://"):
        open_store(url)


def test_unreachable_zookeeper_is_a_clear_store_error():
    from tests.etcdserver import _free_ports

    (port,) = _free_ports("127.0.0.1", 1)  # nothing listens there
    s = open_store(f"zk://127.0.0.1:{port}")
    try:
        with pytest.raises(StoreError) as info:
            s.get("k")
        message = str(info.value)
        assert f"ZooKeeper at 127.0.0.1:{port}" in message and "check that ZooKeeper runs" in message
    finally:
        s.close()
