"""Library-safe structured logging.

curvprune never configures :mod:`logging` or :mod:`structlog`: its loggers wrap stdlib loggers
under ``curvprune`` (with a :class:`logging.NullHandler`), so nothing is printed until the
application configures logging, and then events come out through the application's handlers with
their key/values as ``LogRecord`` extras. Event names are constant, snake_case, past tense.
"""

from __future__ import annotations

import logging

import structlog

logging.getLogger("curvprune").addHandler(logging.NullHandler())

_PROCESSORS = [structlog.stdlib.filter_by_level, structlog.stdlib.render_to_log_kwargs]


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger that writes through the stdlib logger ``name``."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
    )
