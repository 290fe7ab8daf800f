"""Structured logs: one JSON object per line on stderr, with any ``extra={...}`` fields merged in.

Log collectors (Fluent Bit, Loki, Cloud Logging) parse these without a custom regex, and the admission line
carries the fields an operator filters on: uid, kind, namespace, operation, decision, reason, duration.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import orjson

# Attributes every LogRecord has; anything else on a record came from ``extra`` and is logged as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_STANDARD |= {"color_message"}  # uvicorn's ANSI-coloured copy of the message


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str) -> None:
    """Route meshguard's and uvicorn's logs through the JSON formatter; uvicorn's access log stays off."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True


class EventLog:
    """Writes one JSON line per event for ``logger``, in :class:`JSONFormatter`'s shape, to stderr.

    For the admission line, which every request writes: building a ``LogRecord`` and running it through a
    formatter and handler cost more than the admission decision, and a write system call per line as much again.
    Lines are buffered and written once per turn of the event loop, so a busy server writes the lines of all the
    requests it answered in that turn with one system call. The logger's level still decides whether a line is
    written.
    """

    FLUSH_BYTES = 64 * 1024

    def __init__(self, logger: logging.Logger, level: int = logging.INFO) -> None:
        self._logger = logger
        self._level = level
        self._level_name = logging.getLevelName(level).lower()
        self._buffer = bytearray()
        self._scheduled = False
        self._second, self._stamp = -1, ""

    def enabled(self) -> bool:
        return self._logger.isEnabledFor(self._level)

    def write(self, message: str, fields: dict[str, object]) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:  # formatting the date and time costs more than the rest of the line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry = {
            "ts": f"{self._stamp}.{int((now - second) * 1000):03d}Z",
            "level": self._level_name,
            "logger": self._logger.name,
            "msg": message,
            **fields,
        }
        self._buffer += orjson.dumps(entry, default=str, option=orjson.OPT_APPEND_NEWLINE)
        if len(self._buffer) >= self.FLUSH_BYTES:
            self.flush()
        elif not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:  # no event loop (a test calling the app directly): write now
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._buffer:
            return
        data = bytes(self._buffer)
        self._buffer.clear()
        sys.stderr.flush()  # keep the order with lines written through logging
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()
