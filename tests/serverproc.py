"""What the test servers (tests/etcdserver.py, tests/zkserver.py) share: one
child process with its own data dir and log, stopped by signal."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import Optional


class ServerProcess:
    """Subclasses set proc, workdir, _own_dir, log_path and provide start()."""

    proc: Optional[subprocess.Popen] = None
    workdir: str
    _own_dir: bool
    log_path: str
    #: how long a graceful stop may take before SIGKILL
    stop_timeout: float = 10.0

    def start(self):
        raise NotImplementedError

    def _terminate(self, sig: int) -> None:
        if not self.proc:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        """Graceful stop (SIGTERM); data and ports are kept for start()/restart()."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self._terminate(signal.SIGKILL)

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same ports with the same data."""
        self.kill() if kill else self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the data dir (if this object made it)."""
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""
