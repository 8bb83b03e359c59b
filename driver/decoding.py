"""One rule for a store record that does not decode, for driver/state.py's readers.

A value that is not JSON, is no JSON object, lacks a field or has a field of
the wrong type is skipped (it is absent to the caller), logged once per key
and counted by kind (plugin/metrics.py exports bad_records() as
pyoverlay_store_bad_records). Another version's record, or a hand edit, must
neither crash a request or a watch nor fill the log on every read. Only
state.py calls this module: callers get records from its typed readers.
"""

from __future__ import annotations

import logging
import threading
import typing
from collections import Counter
from typing import Optional, TypeVar

from .model import Record

R = TypeVar("R", bound=Record)

log = logging.getLogger(__name__)

_bad_lock = threading.Lock()
_bad_keys: set[str] = set()  # logged already (until the key decodes again)
_bad_count: Counter[str] = Counter()  # record kind (the key's first part) -> records skipped
_hints: dict[type, dict[str, tuple[type, ...]]] = {}


def bad_records() -> dict[str, int]:
    """Records skipped because they did not decode, by kind (plugin/metrics.py exports it)."""
    with _bad_lock:
        return dict(_bad_count)


def _field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """The plain types each field must have once decoded (an int is a fine float)."""
    known = _hints.get(cls)
    if known is None:
        known = {}
        for name, hint in typing.get_type_hints(cls).items():
            base = typing.get_origin(hint) or hint
            if base is float:
                known[name] = (int, float)
            elif base in (str, int, bool, list, dict, tuple):
                known[name] = (base,)
        _hints[cls] = known
    return known


def skipped(key: str, error: str) -> None:
    with _bad_lock:
        if key in _bad_keys:
            return
        _bad_keys.add(key)
        _bad_count[key.split("/", 1)[0]] += 1
    log.warning("store: skipping %s, which is not a record pyoverlay can read (%s); "
                "delete it or rewrite it", key, error)


def decode(key: str, value: str, cls: type[R]) -> Optional[R]:
    """The record in value, or None (logged once, counted) if it does not decode."""
    try:
        record = cls.from_json(value)
        for name, types in _field_types(cls).items():
            if not isinstance(getattr(record, name), types):
                raise TypeError(f"{name} is {type(getattr(record, name)).__name__}, not {types[-1].__name__}")
    except AttributeError:  # from_json met JSON that is no object
        skipped(key, "not a JSON object")
        return None
    except (TypeError, ValueError, KeyError) as e:
        skipped(key, str(e) or type(e).__name__)
        return None
    if _bad_keys and key in _bad_keys:  # mended: a later breakage is news again
        with _bad_lock:
            _bad_keys.discard(key)
    return record
