"""How ``chatstream serve`` logs: one line format with timestamps for chatstream's and uvicorn's records,
routine requests (static files, health probes) below info, and no progress bars in a log file.

uvicorn's own logging setup has no timestamps, prints an info line for every static file and every
health probe, and leaves tqdm's progress bars (transformers uses them while it converts and loads
a model) to write carriage returns into whatever stderr is.
"""

from __future__ import annotations

import logging
import logging.config
import os
import sys
from typing import Any

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Answered often and by design, logged at debug: a page's assets (a failed one stays at info) and a
# load balancer's or Docker's health probes (the server logs its own changes of state: loading,
# ready, failed, draining).
ASSET_PREFIXES = ("/static/", "/favicon.ico")
PROBE_PATHS = ("/health", "/health/live")


class RoutineRequestFilter(logging.Filter):
    """Moves uvicorn's access lines for routine requests (assets served, health probes) to debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and len(args) == 5):  # (client, method, path, http version, status)
            return True
        path, status = str(args[2]).partition("?")[0], args[4]
        routine = path in PROBE_PATHS or (path.startswith(ASSET_PREFIXES) and isinstance(status, int) and status < 400)
        if not routine:
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def logging_config(level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the server: every record to stderr in one format."""
    level = "DEBUG" if level.lower() == "trace" else level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": LOG_FORMAT, "datefmt": DATE_FORMAT}},
        "filters": {"routine": {"()": RoutineRequestFilter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "plain"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # uvicorn's loggers go through the root's handler instead of their own.
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"level": level, "filters": ["routine"]},
            # A line per upstream call and health check is noise below debug.
            "httpx": {"level": "DEBUG" if level == "DEBUG" else "WARNING"},
        },
    }


def configure_server_logging(level: str = "info") -> None:
    """Set up the server's logging; call before the model library is imported (see below)."""
    if not sys.stderr.isatty():
        # tqdm reads TQDM_* defaults when it is imported: its bars redraw with carriage returns,
        # which in a file or a journal become one endless line. The log says what loads instead.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.config.dictConfig(logging_config(level))
