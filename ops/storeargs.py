"""The store an operator command names with its --store/--etcd-* flags
(plugin/cli.py adds them), shared by commands.py and doctor.py."""

from __future__ import annotations

from driver.store import open_store
from driver.store.base import Store


def open_store_from(args) -> Store:
    return open_store(args.store, prefix=args.etcd_prefix, cacert=args.etcd_cacert,
                      cert=args.etcd_cert, key=args.etcd_key,
                      user=args.etcd_user, password=args.etcd_password)
