"""Logging that shows: the project's loggers (``datasets``, ``trainables``, ``orchestrator``) print INFO and up.

The CLIs call :func:`configure_logging` first thing, and :func:`trainables.runtime.fit` calls it in every process
that runs a training loop (a stage task, a Tune trial, a Ray Train worker), so messages such as "resuming re-ID
training after epoch N" or "loaded N backbone tensors from ..." reach the console (Ray forwards a worker's stderr
to the driver). Other libraries' loggers keep their own configuration; idempotent.
"""

from __future__ import annotations

import logging
import sys

PROJECT_LOGGERS = ("datasets", "trainables", "orchestrator", "bench")
FORMAT = "[%(name)s] %(levelname)s %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Send the project's log records at ``level`` and up to stderr, once per process."""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, "_mprl", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(FORMAT))
            handler._mprl = True  # type: ignore[attr-defined]
            logger.addHandler(handler)  # records still propagate (to pytest's capture, for one)
