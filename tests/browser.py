"""Real Chromium for the page tests, driven by Playwright.

Playwright's own browser download does not work everywhere (it does not here), so we launch
an installed Chromium: $CHAT_CHROMIUM, or the first of the usual names on PATH.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def optional_part_missing(reason: str) -> None:
    """Skip on a laptop without the part; fail in CI, where a skip would hide a gap."""
    if os.environ.get("CHAT_CI"):
        pytest.fail(f"{reason} (CHAT_CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def chromium_path() -> str | None:
    configured = os.environ.get("CHAT_CHROMIUM")
    if configured:
        return configured if os.path.exists(configured) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageProblems:
    """JavaScript errors and dialogs seen on a page; a healthy page has none."""

    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def watch(self, page) -> None:
        page.on("pageerror", lambda error: self.errors.append(str(error)))

        async def dismiss(dialog) -> None:
            self.dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("dialog", dismiss)
