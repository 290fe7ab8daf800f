"""The admission line's shape: one JSON object per line, timestamped like every other log line."""

from __future__ import annotations

import logging
import time

import orjson
import pytest

from webhook.logs import EventLog, JSONFormatter


@pytest.mark.parametrize("now", [1700000000.0, 1700000000.9996, 1700000001.25])
def test_event_line_has_the_formatter_timestamp(now: float, monkeypatch: pytest.MonkeyPatch,
                                                capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    logger = logging.getLogger("meshguard.test-events")
    logger.setLevel(logging.INFO)
    events = EventLog(logger)
    monkeypatch.setattr(time, "time", lambda: now)
    events.write("admission", {"uid": "u-1", "decision": "allowed"})
    events.write("admission", {"uid": "u-2", "decision": "denied"})
    lines = [orjson.loads(line) for line in capsysbinary.readouterr().err.splitlines()]
    record = logging.LogRecord("x", logging.INFO, "", 0, "msg", (), None)
    record.created, record.msecs = now, int(now % 1 * 1000)
    expected = orjson.loads(JSONFormatter().format(record))["ts"]
    assert [line["ts"] for line in lines] == [expected, expected]
    assert [(line["msg"], line["uid"], line["level"]) for line in lines] == [
        ("admission", "u-1", "info"), ("admission", "u-2", "info")]
