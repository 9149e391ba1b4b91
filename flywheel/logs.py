"""Logs without secrets: API keys and the passwords of service URLs are masked in every
record a flywheel process writes (the API's access log included: a client that puts its
key in a query string does not get it logged).

``flywheel serve`` runs uvicorn with :func:`uvicorn_log_config`; ``flywheel worker``
filters Celery's handlers through :func:`redact_celery_logs`.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

_API_KEY = re.compile(r"(fwk_[0-9a-f]{12}_)[A-Za-z0-9_-]{43}")
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)[^@/?#\s]+@")


def redact(text: str) -> str:
    """``text`` with API key secrets and URL passwords replaced by ``***`` (a key keeps its
    prefix, which identifies it in ``flywheel keys list``)."""
    return _URL_PASSWORD.sub(r"\1***@", _API_KEY.sub(r"\1***", text))


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    text = str(value)
    cleaned = redact(text)
    return value if cleaned == text else cleaned


class RedactSecrets(logging.Filter):
    """Masks secrets in a record's message, arguments and traceback; keeps every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {name: _redacted(arg) for name, arg in record.args.items()}
        if record.exc_info and record.exc_text is None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging, every handler filtered, and flywheel's own loggers (the root)
    on its default handler at INFO."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"secrets": {"()": RedactSecrets}}
    for handler in config["handlers"].values():
        handler["filters"] = ["secrets"]
    config["root"] = {"handlers": ["default"], "level": "INFO"}
    return config


def redact_celery_logs() -> None:
    """Filter the handlers Celery sets up in a worker (call before the worker starts)."""
    from celery.signals import after_setup_logger, after_setup_task_logger

    def install(logger: logging.Logger, **_: Any) -> None:
        for handler in logger.handlers:
            handler.addFilter(RedactSecrets())

    after_setup_logger.connect(install, weak=False)
    after_setup_task_logger.connect(install, weak=False)
