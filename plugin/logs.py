"""`--log-format json`: one JSON object per line, for log shippers.

Every line has time, level, logger and message. The request line (logger
pyoverlay.request, logged by the HTTP face as "<call> <ids> <ms>ms <outcome>")
also gets its parts as fields: call, ids, duration_ms, outcome.
"""

from __future__ import annotations

import json
import logging
import time

from gunicorn.glogging import Logger as GunicornLogger

REQUEST_LOGGER = "pyoverlay.request"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.name == REQUEST_LOGGER and isinstance(record.args, tuple) and len(record.args) == 4:
            call, ids, ms, outcome = record.args
            entry.update(
                call=call,
                ids=dict(pair.split("=", 1) for pair in str(ids).split() if "=" in pair),
                duration_ms=round(float(ms), 3),
                outcome=outcome,
            )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def use_json(level: int) -> None:
    """Send every log record to stderr as JSON."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class JsonGunicornLogger(GunicornLogger):
    """gunicorn's own lines (master, worker start and exit) as JSON too."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(JsonFormatter())
