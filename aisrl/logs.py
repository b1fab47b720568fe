"""Structured logging for every process: `key=value` text or JSON lines, on stderr.

Invariant: configure_logging is idempotent (calling it again replaces the handler it added),
and log records carry their structured fields in `extra={"fields": {...}}`.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_HANDLER_NAME = "aisrl"


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        if self.as_json:
            payload = {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
                **fields,
            }
            if record.exc_info:
                payload["exc"] = self.formatException(record.exc_info)
            return json.dumps(payload, default=str)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}" + (f" {extra}" if extra else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "INFO", as_json: bool = False) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_Formatter(as_json))
    root.addHandler(handler)
    root.setLevel(level.upper())


def log_fields(**fields: object) -> dict:
    """`logger.info("msg", extra=log_fields(step=3))` attaches structured fields."""
    return {"fields": fields}
