"""This host's keys for encrypted overlays, and what two hosts derive from them.

Each host holds, in a file only root reads (never in the store):

- a static WireGuard key pair: its identity in the tunnel, made once;
- an exchange key pair (X25519) that it replaces every --key-rotation
  seconds: its "epoch".

The store gets only the public halves (driver/state.py, crypto/<host>). Two
hosts A and B each compute X25519(own exchange private, other's exchange
public), the same secret that no third host can compute, and from it the
pair's WireGuard preshared key (psk below). WireGuard mixes that key into
every handshake, on top of its own static and ephemeral Diffie-Hellman, and
makes new session keys every two minutes. So:

- a host removed from the store is removed from every tunnel at once, and
  could not compute another pair's key anyway (each pair's key is its own);
- a rotation changes every pair's preshared key: a host whose static key
  leaked, but who is no longer given the exchange keys, cannot complete a
  handshake after the next rotation;
- changing a preshared key does not end running sessions (WireGuard keeps
  each for up to three minutes, starting a new handshake after two), so a
  rotation drops nothing while both hosts learn the new key within a minute.

X25519 and HKDF come from the cryptography package (OpenSSL's constant-time
implementations), never from code of our own.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}


def new_private() -> bytes:
    """A new X25519 private key, raw and clamped, as WireGuard stores them."""
    raw = X25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                    serialization.NoEncryption())
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64  # X25519 clamps anyway; stored clamped so `wg` shows the same key
    return bytes(b)


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(**_RAW)


def pair_psk(own_exchange: bytes, other_exchange_public: bytes, own_static_public: bytes,
             other_static_public: bytes, own_epoch: int, other_epoch: int) -> bytes:
    """The preshared key of one host pair for their current exchange keys: the
    same on both sides (the inputs are put in one order), 32 bytes."""
    try:
        shared = X25519PrivateKey.from_private_bytes(own_exchange).exchange(
            X25519PublicKey.from_public_bytes(other_exchange_public))
    except ValueError as e:  # a low-order point gives the all-zero secret, which cryptography refuses
        raise ValueError("the other host's exchange key is a low-order point") from e
    ends = sorted([(own_static_public, own_epoch), (other_static_public, other_epoch)])
    info = b"pyoverlay psk v2" + b"".join(key + epoch.to_bytes(8, "big") for key, epoch in ends)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


@dataclass
class LocalKeys:
    """What the key file holds."""

    static: bytes  # the WireGuard private key
    exchange: bytes  # the current exchange private key
    epoch: int  # how many exchange keys this host has made (1: the first)
    made: float  # when the current exchange key was made (time.time())

    @property
    def static_public(self) -> bytes:
        return public_of(self.static)

    @property
    def exchange_public(self) -> bytes:
        return public_of(self.exchange)

    def due(self, rotation: float, now: Optional[float] = None) -> float:
        """Seconds until the next rotation (<= 0: now)."""
        return self.made + rotation - (time.time() if now is None else now)

    def rotated(self, now: Optional[float] = None) -> "LocalKeys":
        return LocalKeys(self.static, new_private(), self.epoch + 1, time.time() if now is None else now)


class KeyFile:
    """The host's keys on disk: JSON, mode 0600, replaced atomically. Kept
    across restarts so the tunnel and every pair's key survive a restart."""

    def __init__(self, path: str):
        self.path = path

    def load(self) -> Optional[LocalKeys]:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return LocalKeys(bytes.fromhex(data["static"]), bytes.fromhex(data["exchange"]),
                             int(data["epoch"]), float(data["made"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"the key file {self.path} is unreadable ({e}): move it away to make new keys") from e

    def load_or_make(self) -> LocalKeys:
        keys = self.load()
        if keys is None:
            keys = LocalKeys(new_private(), new_private(), 1, time.time())
            self.save(keys)
        return keys

    def save(self, keys: LocalKeys) -> None:
        folder = os.path.dirname(self.path) or "."
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".keys-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"static": keys.static.hex(), "exchange": keys.exchange.hex(),
                           "epoch": keys.epoch, "made": keys.made}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
