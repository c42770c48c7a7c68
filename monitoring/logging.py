"""JSON logs, one object per line, each carrying the request id of the work it belongs to.

The request id lives in a context variable: set by the web app for a request,
carried in the headers of the tasks that request enqueues, and set again by the
task base class, so one id follows a send from the API through the worker.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get()
        return True


def configure_logging(level: str = "INFO") -> None:
    """Send every log record to stderr as JSON. Safe to call more than once."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in root.handlers:
        if getattr(handler, "_switchboard", False):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler._switchboard = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
            rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
        )
    )
    root.addHandler(handler)
