"""Servers under test, each in its own process so its CPU time can be read from /proc."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# The benchmark turns off what would distort it, as the tests do: rate limits and the cap on
# sockets per address (every load-generator client comes from 127.0.0.1).
from tests.server_process import LIMITS_OFF, free_port

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Server:
    """A chat server process on a free loopback port."""

    name: str
    command: list[str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    root: Path = ROOT  # the checkout it runs from (--baseline: another one)

    @property
    def log_path(self) -> Path:
        """Where the server's output goes: read it when a run fails."""
        safe = "".join(ch if ch.isalnum() else "-" for ch in self.name)
        return Path(tempfile.gettempdir()) / f"fennec-bench-{safe}-{self.port}.log"

    def start(self, timeout: float = 20) -> Server:
        command = [part.replace("{port}", str(self.port)) for part in self.command]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_bytes(self) -> int:
        assert self.process is not None
        resident_pages = int(Path(f"/proc/{self.process.pid}/statm").read_text().split()[1])
        return resident_pages * PAGE_SIZE


def chat_server(*flags: str, name: str = "fennec-chat", root: Path = ROOT) -> Server:
    """This project's server.py as configured by default (history in a fresh SQLite file),
    with the limits that would distort a benchmark turned off. `root`: another checkout's."""
    history = (
        []
        if "--no-history" in flags or "--db" in flags or any("redis" in flag for flag in flags)
        else ["--db", temporary_db()]
    )
    return Server(
        name,
        [
            sys.executable,
            "server.py",
            "--port",
            "{port}",
            "--log-level",
            "warning",
            *LIMITS_OFF,
            *history,
            *flags,
        ],
        root=root,
    )


def reference_server(compression: bool = False) -> Server:
    """The websockets library's own server speaking the same protocol (bench/reference_server.py)."""
    name = "websockets reference" + (" (deflate)" if compression else "")
    flags = ["--compression"] if compression else []
    return Server(name, [sys.executable, "bench/reference_server.py", "--port", "{port}", *flags])


def temporary_db() -> str:
    return str(Path(tempfile.mkdtemp(prefix="chat-bench-")) / "bench.db")


def redis_server() -> Server:
    """A throwaway redis-server (no persistence) for the Redis workloads."""
    return Server("redis-server", ["redis-server", "--port", "{port}", "--save", "", "--appendonly", "no"])
