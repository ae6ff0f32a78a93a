"""A real `python server.py` process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fennec_chat.settings import Settings
from tests.chat_client import ChatClient

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


# Every limit that a test's (or a benchmark's) bursts from 127.0.0.1 would run into.
LIMITS_OFF = [
    *("--rate-messages", "0"),
    *("--rate-messages-per-address", "0"),
    *("--rate-frames", "0"),
    *("--rate-typing", "0"),
    *("--rate-renames", "0"),
    *("--room-creation-rate", "0"),
    *("--max-rooms", "0"),
    *("--max-connections-per-ip", "0"),
]


def worker_pids(parent: int) -> list[int]:
    """uvicorn's worker processes under `parent` (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(child) for child in children if b"resource_tracker" not in process_cmdline(int(child))]


def process_cmdline(pid: int) -> bytes:
    """The command line of `pid`, or b"" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python server.py` in a child process, with its output kept in a log file."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        port: int | None = None,
        limits: bool = False,
        plain_uvicorn: bool = False,
    ) -> None:
        """Listens on `port` (a free one if None), passed as --port unless PORT is in `env`.

        Rate limits and the per-address cap are off unless `limits`: most tests send bursts,
        and all of them come from 127.0.0.1. With `plain_uvicorn` the app runs under
        `uvicorn server:app` and its stock WebSocket protocol, with `args` as environment.
        """
        self.port = port or free_port()
        self.log_path = log_path
        self.args = args if "PORT" in env else ["--port", str(self.port), *args]
        if not limits:
            self.args += LIMITS_OFF
        if "--db" not in args and "CHAT_DB" not in env:
            self.db_path = log_path.with_suffix(".db")
            for stale in log_path.parent.glob(log_path.stem + ".db*"):
                stale.unlink()
            self.args += ["--db", str(self.db_path)]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        self.program = [sys.executable, str(ROOT / "server.py")]
        if plain_uvicorn:
            settings = Settings.from_environ(self.env)
            settings.apply_flags(self.args)
            settings.export_to(self.env)
            # uvicorn's stock protocol, without the compression it would accept by default
            # (server.py declines it: compressed, a test's repetitive text never fills a buffer).
            self.program = [sys.executable, "-m", "uvicorn", "server:app", "--ws", "websockets-sansio"]
            self.program += ["--ws-per-message-deflate", "false"]
            self.args = ["--port", str(self.port)]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def secure(self) -> bool:
        return "--ssl-certfile" in self.args

    @property
    def http_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.secure else 'ws'}://127.0.0.1:{self.port}"

    def _get(self, path: str, timeout: float):
        # A test's self-signed certificate is checked by the test itself, not here.
        context = ssl._create_unverified_context() if self.secure else None
        return urllib.request.urlopen(self.http_url + path, timeout=timeout, context=context)

    def start(self, timeout: float = 15) -> ServerProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.program, *self.args],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with self._get("/health", timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, wait, and return the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def health(self) -> dict:
        with self._get("/health", timeout=5) as response:
            return json.load(response)

    async def connect(self, path: str, **kwargs) -> ChatClient:
        return await ChatClient.connect(self.ws_url + path, **kwargs)

    def assert_no_errors(self) -> None:
        """The server logged no traceback and no error."""
        self.assert_no_errors_but()

    def assert_no_errors_but(self, *expected: str) -> None:
        """No traceback, and no error but those that mention one of `expected`."""
        log = self.log()
        assert "Traceback" not in log, log
        unexpected = [
            line
            for line in log.splitlines()
            if "ERROR" in line and not any(text in line for text in expected)
        ]
        assert unexpected == [], log


def log_path(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:120]
    path = ARTIFACTS / f"server-{safe}.log"
    path.unlink(missing_ok=True)
    return path
