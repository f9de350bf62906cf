"""curate's log output: human lines (default) or one JSON object per line for log collectors.

    curate --log-format json --log-level info run pipeline.yaml
    CURATE_LOG_FORMAT=json CURATE_LOG_LEVEL=debug curate run pipeline.yaml   # the same, e.g. in a container

A JSON line has ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``event``, ``step`` (null when
the line is not about one step), ``counters`` (an object, empty when there are none) and
``message`` (the human text), plus ``exception`` when there is one. Events: ``log`` (any log
line), ``progress`` (a step's periodic progress: docs, rate, total, percent, eta_s, tasks, LLM
requests), ``step`` (a step's final counts: in, out, dropped, errors, status, seconds), ``run``
(the run's start and end), ``warning`` (a funnel warning), ``error`` (why a run failed).
In JSON mode no progress bar is drawn, also on a terminal; in text mode a terminal gets tqdm bars
and anything else a progress line every 10 s, as before.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
from typing import Any

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
NOISY = ("httpx", "urllib3", "trafilatura", "datasketch", "numba", "filelock", "datatrove")
_STEP_IN_MESSAGE = re.compile(r"^(?:WARNING )?(?:step ([\w.-]+)[: ]|\[([\w.-]+)\] )")


def log_format() -> str:
    """The format of this process: ``json`` or ``text`` (``$CURATE_LOG_FORMAT``, set by the CLI)."""
    fmt = os.environ.get("CURATE_LOG_FORMAT", "text").lower()
    return fmt if fmt in FORMATS else "text"


def is_json() -> bool:
    return log_format() == "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        step = getattr(record, "step", None)
        if step is None:
            m = _STEP_IN_MESSAGE.match(message)
            step = (m.group(1) or m.group(2)) if m else None
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "step": step,
            "counters": getattr(record, "counters", None) or {},
            "message": message,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup(level: str | int = "info", fmt: str | None = None, stream=None) -> None:
    """Configures the root logger of this process (the CLI and its worker processes) and exports
    the choice (``CURATE_LOG_FORMAT``, ``CURATE_LOG_LEVEL``) to the processes it starts."""
    fmt = (fmt or log_format()).lower()
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"log level {level!r}: one of {', '.join(LEVELS)}")
        level_no = getattr(logging, level.upper())
    else:
        level_no = level
    os.environ["CURATE_LOG_FORMAT"] = fmt
    os.environ["CURATE_LOG_LEVEL"] = logging.getLevelName(level_no).lower()
    root = logging.getLogger()
    if fmt == "text":
        logging.basicConfig(level=level_no, format=TEXT_FORMAT, stream=stream or sys.stderr)
        root.setLevel(level_no)
    else:
        # every line JSON: the text handlers of this process's stderr make way for one JSON handler
        for h in list(root.handlers):
            if getattr(h, "_curate", False) or (type(h) is logging.StreamHandler
                                                and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__)):
                root.removeHandler(h)
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._curate = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(level_no)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.DEBUG if level_no <= logging.DEBUG else logging.WARNING)


def setup_worker(level: int) -> None:
    """A worker process: the format its run exported, at ``level``."""
    setup(level, log_format())


def event(logger: logging.Logger, name: str, message: str, *, step: str | None = None,
          counters: dict[str, Any] | None = None, level: int = logging.INFO) -> None:
    """A log record with an event name, step and counters (fields of the JSON line; the text
    format shows ``message``)."""
    logger.log(level, "%s", message, extra={"event": name, "step": step, "counters": counters or {}})
