"""The access log: one structlog JSON line per request, written in batches.

Rendering a line is cheap next to writing it: a write (and flush) per request cost the gateway
more CPU than the rest of a small request's work. Lines are rendered by the role's structlog
processors, kept in memory and written together when 64 kB are waiting, when the oldest has
waited `max_age_s`, on the gateway's periodic flush (so a quiet gateway's lines appear within
that time) and at shutdown. Bounded: a write failure drops the batch rather than growing it.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

import structlog

MAX_BYTES = 64 << 10


class BufferedLines:
    """A structlog logger whose lines wait in memory; safe to call from several threads."""

    def __init__(self, file: TextIO | None = None, max_age_s: float = 0.2):
        self._file = file or sys.stderr
        self.max_age_s = max_age_s
        self._lines: list[str] = []
        self._bytes = 0
        self._since = 0.0
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            if not self._lines:
                self._since = time.monotonic()
            self._lines.append(message)
            self._bytes += len(message) + 1
            due = self._bytes >= MAX_BYTES or time.monotonic() - self._since >= self.max_age_s
        if due:
            self.flush()

    info = debug = warning = error = critical = exception = msg

    def flush(self) -> None:
        with self._lock:
            lines, self._lines, self._bytes = self._lines, [], 0
        if not lines:
            return
        try:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
        except (OSError, ValueError):  # a closed or full stderr: the lines are lost, serving is not
            pass


def access_logger(sink: BufferedLines):
    """A bound logger with the role's processors (same JSON lines as every other event) on `sink`."""
    cfg = structlog.get_config()
    return structlog.wrap_logger(sink, processors=cfg["processors"], wrapper_class=cfg["wrapper_class"])
