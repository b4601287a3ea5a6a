"""Structured logging: one structlog configuration per process, events with stable keys.

Events are named in snake case (``became_leader``) and carry their facts as keys
(``term=3 node=n1``). Output goes to standard output: JSON lines when it is not a terminal
(log files, ``twistd --logfile``, containers), ``key=value`` console lines when it is.
Standard output is looked up at each write, so the redirection twistd installs after the
service is built is honoured.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Callable, TextIO

import structlog

__all__ = ["configure_logging", "get_logger"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


class _StreamLogger:
    """Writes each rendered event as one line; ``stream=None`` means the current stdout."""

    def __init__(self, stream: TextIO | None, lock: threading.Lock) -> None:
        self._stream = stream
        self._lock = lock

    def msg(self, message: str) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        with self._lock:  # the storage writer thread logs too: keep lines whole
            stream.write(message + "\n")
            stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _StreamLoggerFactory:
    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> _StreamLogger:
        return _StreamLogger(self._stream, self._lock)


class _AutoRenderer:
    """JSON when the output is not a terminal, console key=value when it is."""

    def __init__(self, fmt: str, stream: TextIO | None) -> None:
        self._fmt = fmt
        self._stream = stream
        self._json = structlog.processors.JSONRenderer(sort_keys=False)
        self._console = structlog.dev.ConsoleRenderer(colors=False)
        self._exc = structlog.processors.format_exc_info

    def __call__(self, logger: Any, name: str, event: dict[str, Any]) -> str:
        if self._use_json():
            return self._json(logger, name, self._exc(logger, name, event))
        return self._console(logger, name, event)

    def _use_json(self) -> bool:
        if self._fmt != "auto":
            return self._fmt == "json"
        stream = self._stream if self._stream is not None else sys.stdout
        try:
            return not stream.isatty()
        except (AttributeError, ValueError):  # closed or not a real file
            return True


def configure_logging(level: str = "info", fmt: str = "auto", *,
                      stream: TextIO | None = None) -> None:
    """Configure structlog for this process (the node calls it once, at start-up).

    Args:
        level: Lowest level written: debug, info, warning, error or critical.
        fmt: ``json``, ``console``, or ``auto`` (JSON unless the output is a terminal).
        stream: Where to write (default: whatever ``sys.stdout`` is at each write).

    Raises:
        ValueError: Unknown level or format.
    """
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r}")
    processors: list[Callable[..., Any]] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        _AutoRenderer(fmt, stream),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_StreamLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get_logger(node_id: str | None = None, **bindings: Any) -> Any:
    """A structlog logger bound to ``node=node_id`` (when given) and ``bindings``."""
    if node_id is not None:
        bindings = {"node": node_id, **bindings}
    return structlog.get_logger(**bindings)
