"""Structured logs: one JSON object per line on stderr (or plain text for humans).

Call sites pass fields with ``extra={...}``; they become top-level keys of the line.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        return f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()} {extras}".rstrip()


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class Throttled:
    """At most ``burst`` lines per ``interval_s`` through ``logger`` for one kind of event;
    the rest are counted and reported with the next line that gets through. A flood of
    garbage from peers then costs a few lines a minute, not one per message."""

    def __init__(self, logger: logging.Logger, burst: int = 10, interval_s: float = 60.0) -> None:
        self.logger, self.burst, self.interval_s = logger, burst, interval_s
        self._lock = threading.Lock()
        self._window_start = 0.0
        self._in_window = 0
        self.suppressed = 0       # since the last line that got through

    def info(self, msg: str, **fields: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self.interval_s:
                self._window_start, self._in_window = now, 0
            if self._in_window >= self.burst:
                self.suppressed += 1
                return
            self._in_window += 1
            suppressed, self.suppressed = self.suppressed, 0
        self.logger.info(msg, extra=fields | ({"suppressed_since_last": suppressed} if suppressed else {}))
