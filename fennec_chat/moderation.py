"""Moderation: a word filter for messages and names (kicking lives in the room manager)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from .fennec_fixes import StartupError
from .protocol import Command, Rejection, SendMessage, SetUsername
from .settings import Settings


class WordFilter:
    """Masks blocked words with `*`: whole words, any case. Empty until `start`ed or `load`ed."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._pattern: re.Pattern[str] | None = None
        self._settings = settings  # its --blocklist is read at start, after the flags are applied

    async def start(self) -> None:
        if self._settings is not None and (path := self._settings.blocklist):
            try:
                self.load(path)
            except (OSError, UnicodeDecodeError) as error:
                reason = (error.strerror or str(error)) if isinstance(error, OSError) else "not UTF-8 text"
                raise StartupError(f"cannot read the blocklist {path} (--blocklist): {reason}") from error

    def load(self, path: str) -> None:
        """One word a line; blank lines and lines starting with # are skipped."""
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        self.use([line.strip() for line in lines if line.strip() and not line.strip().startswith("#")])

    def use(self, words: list[str]) -> None:
        if not words:
            self._pattern = None
            return
        # Longest first, so "badword" wins over "bad"; \b keeps "class" safe from "ass".
        alternatives = "|".join(re.escape(word) for word in sorted(set(words), key=len, reverse=True))
        self._pattern = re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)

    def mask(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda match: "*" * len(match.group()), text)

    def apply(self, command: Command | Rejection) -> Command | Rejection:
        """The command with blocked words masked in its message or new name."""
        if isinstance(command, SendMessage):
            return dataclasses.replace(command, text=self.mask(command.text))
        if isinstance(command, SetUsername):
            return dataclasses.replace(command, username=self.mask(command.username))
        return command
