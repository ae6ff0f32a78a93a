"""Logging: uvicorn's format, this app's logger, and no tokens in any line."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any
from urllib.parse import unquote_plus

import uvicorn

# A query parameter in a logged URL: its name and its value.
QUERY_PARAMETER = re.compile(r"(?<=[?&;])([^=&;\s\"'#]+)=([^&;\s\"'#]*)")
SECRET_PARAMETERS = {"token", "session"}


class RedactTokens(logging.Filter):
    """uvicorn logs every WebSocket and HTTP request with its query string, even with the
    access log off: replace the value of every `token` (and tab `session`) parameter with
    [redacted]. By its decoded name, as the server reads it: ?tok%65n= is a token too."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Redact the arguments in place: uvicorn's access formatter reads them one by one.
        if isinstance(record.args, tuple):
            record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def redact(text: str) -> str:
    if "=" not in text:
        return text
    return QUERY_PARAMETER.sub(_redact_parameter, text)


def _redact_parameter(match: re.Match[str]) -> str:
    name = match.group(1)
    if unquote_plus(name) in SECRET_PARAMETERS:
        return f"{name}=[redacted]"
    return match.group(0)


class QuietStart(logging.Filter):
    """uvicorn's lines about starting up: the banner (cli.print_addresses) says the server is up
    once it listens, and a start that fails is the one line that says why."""

    LINES = frozenset(
        {
            "Started server process [%d]",
            "Waiting for application startup.",
            "Application startup complete.",
            "Application startup failed. Exiting.",
        }
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "uvicorn.error" and record.msg in self.LINES)


def log_config() -> dict[str, Any]:
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["filters"] = {"redact_tokens": {"()": RedactTokens}, "quiet_start": {"()": QuietStart}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact_tokens", "quiet_start"]
    config["loggers"]["fennec_chat"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config
