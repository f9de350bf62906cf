"""Log records of a library a stage calls, routed through the stage.

Some libraries log context-free lines for ordinary bad input (trafilatura: ``ERROR parsed tree
length: 1, wrong data type or not valid HTML``, once per odd page, with no page named). While a
stage works, ``LibraryLogs`` takes the records of those loggers: each record at WARNING or above
is counted as ``<stage name>/library_log/<library>/<what>`` (``what`` is the message's leading
words, e.g. ``parsed_tree_length``), and every record is re-logged on the ``curate`` logger at
DEBUG level with the step and the document being processed. Nothing is lost; the log stays quiet.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("curate")

_SLUG = re.compile(r"[^a-z0-9]+")


class LibraryLogs(logging.Handler):
    """Context manager: route the records of ``loggers`` (and their children) through ``stage``
    while it is active. Set ``doc_id`` to name the document being processed."""

    def __init__(self, stage: Any, loggers: tuple[str, ...]):
        super().__init__(logging.NOTSET)
        self.stage = stage
        self.loggers = loggers
        self.doc_id: str | None = None
        self._saved: list[tuple[logging.Logger, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        library = record.name.split(".")[0]
        if record.levelno >= logging.WARNING:
            what = _SLUG.sub("_", str(record.msg).split("%")[0].split(":")[0].lower()).strip("_")[:48]
            self.stage.count(f"{self.stage.name}/library_log/{library}/{what or 'message'}")
        log.debug("%s: %s %s%s: %s", self.stage.step_name, record.name, record.levelname,
                  f" (doc {self.doc_id})" if self.doc_id else "", record.getMessage())

    def __enter__(self) -> "LibraryLogs":
        for name in self.loggers:
            lg = logging.getLogger(name)
            self._saved.append((lg, lg.propagate))
            lg.addHandler(self)
            lg.propagate = False
        return self

    def __exit__(self, *exc: Any) -> None:
        for lg, propagate in self._saved:
            lg.removeHandler(self)
            lg.propagate = propagate
        self._saved.clear()
        self.doc_id = None
