"""Log setup (plain text or JSON lines) and the one line every request leaves: id, RPC, status, time.

The request id is the request's own `request_id` when it is a plain token (letters, digits, `._:/@+-`,
up to 128 characters), else a generated one; it goes back to the client in the trailing metadata
`x-request-id` and is the id an INTERNAL error's message names. Metadata (tokens) is never logged.
"""
from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import grpc

from adaptclip.server.metrics import Metrics

access = logging.getLogger("adaptclip.requests")
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("adaptclip_request_id", default=None)
_PLAIN_ID = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's `fields`, and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Root logging to stderr, as JSON lines with `json_lines` (`adaptclip serve --log-json`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def request_id_for(request: object) -> str:
    """The request's own id when it is a plain token, else a new one."""
    own = getattr(request, "request_id", "")
    return own if isinstance(own, str) and _PLAIN_ID.fullmatch(own) else new_request_id()


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def current_request_id() -> str:
    """The id of the request being served on this task, or a new one outside any (in-process callers)."""
    return REQUEST_ID.get() or new_request_id()


def finished(metrics: Metrics, rpc: str, code: grpc.StatusCode, started: float, request_id: str, peer: str) -> None:
    """Count the request and log its line (`started`: its time.perf_counter() on arrival; `peer` read on
    arrival too: grpc's context.peer() on a call the server is shutting down can crash the process)."""
    seconds = time.perf_counter() - started
    metrics.request(rpc, code.name, seconds)
    fields = {"request_id": request_id, "rpc": rpc, "status": code.name, "ms": round(seconds * 1000, 2),
              "peer": peer}
    access.info("request_id=%s rpc=%s status=%s ms=%.1f peer=%s", *fields.values(), extra={"fields": fields})
