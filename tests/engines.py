"""The Docker engine the e2e tests start: PYOVERLAY_ENGINE (scripts/setup installs it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Mapping, Optional

# -- the engine under test ------------------------------------------------------
#: debian (default): the dockerd on PATH (Debian 12's docker.io, 20.10.24);
#: current: the engine scripts/setup unpacked into .engines/current (Debian's
#: newest docker.io and containerd). PYOVERLAY_ENGINE_ROOT names such a folder
#: directly (scripts/setup prints it).
ENGINE_ENV = "PYOVERLAY_ENGINE"
ENGINE_ROOT_ENV = "PYOVERLAY_ENGINE_ROOT"
REPO_DIR = Path(__file__).resolve().parent.parent


def engine_root(kind: Optional[str] = None) -> Optional[Path]:
    """The unpacked engine's root folder, or None for the system's engine.
    kind: debian or current; by default PYOVERLAY_ENGINE's."""
    kind = kind or os.environ.get(ENGINE_ENV, "debian") or "debian"
    root = os.environ.get(ENGINE_ROOT_ENV)
    if root:
        path = Path(root)
    elif kind == "debian":
        return None
    elif kind == "current":
        path = REPO_DIR / ".engines" / "current"
    else:
        raise RuntimeError(f"{ENGINE_ENV}={kind!r}: expected debian or current")
    if not (path / "usr" / "sbin" / "dockerd").is_file():
        raise RuntimeError(f"no dockerd under {path}: run `{ENGINE_ENV}={kind} ./scripts/setup` first")
    return path


def engine_env(base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment for a dockerd of the engine under test: its usr/sbin
    (dockerd, docker-proxy, which must match it) and containerd's usr/bin
    first in PATH; runc and docker-init stay the system's."""
    env = dict(os.environ if base is None else base)
    root = engine_root()
    if root is not None:
        env["PATH"] = f"{root}/usr/sbin:{root}/usr/bin:" + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def engine_version() -> str:
    """`dockerd --version` of the engine under test (what .ci/run prints before each run)."""
    return subprocess.run(["dockerd", "--version"], env=engine_env(), check=True, capture_output=True,
                          text=True).stdout.strip()
