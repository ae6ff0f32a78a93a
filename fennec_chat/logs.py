"""Logging: uvicorn's format, this app's logger, and no tokens in any line."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import uvicorn

TOKEN_IN_URL = re.compile(r"(token=)[^&\s\"']+")


class RedactTokens(logging.Filter):
    """uvicorn logs every WebSocket and HTTP request with its query string, even with the
    access log off: replace the value of any token= with [redacted]."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Redact the arguments in place: uvicorn's access formatter reads them one by one.
        if isinstance(record.args, tuple):
            record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def redact(text: str) -> str:
    return TOKEN_IN_URL.sub(r"\1[redacted]", text) if "token=" in text else text


def log_config() -> dict[str, Any]:
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["filters"] = {"redact_tokens": {"()": RedactTokens}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact_tokens"]
    config["loggers"]["fennec_chat"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config
