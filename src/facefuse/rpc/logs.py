"""Structured logs: one JSON object per line, tagged with the service and the request id in flight."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import uuid
from typing import Any

LOG = logging.getLogger("facefuse")
REQUEST_ID_KEY = "x-request-id"
"""Metadata key carrying the request id from the client through the gateway to every backend."""

current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("facefuse_request_id", default="")


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def log_event(event: str, **fields: Any) -> None:
    if LOG.isEnabledFor(logging.INFO):
        request_id = fields.pop("request_id", None) or current_request_id.get()
        payload = {"event": event, **({"request_id": request_id} if request_id else {}), **fields}
        LOG.info(json.dumps(payload, default=str))


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        try:
            payload = json.loads(message) if message.startswith("{") else {"message": message}
        except ValueError:
            payload = {"message": message}
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "service": self.service, **payload}
        request_id = current_request_id.get()
        if request_id and "request_id" not in entry:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger("facefuse")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
