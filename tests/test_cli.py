"""`python server.py` as a newcomer meets it: --help, a wrong flag, every way start-up can fail
(one line on stderr, no traceback, exit 1), the banner, HEAD, where the history goes, and what
compression costs. Each runs the real program in a subprocess, from the repository's root."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from fennec_chat.settings import Settings
from tests.server_process import free_port

ROOT = Path(__file__).resolve().parent.parent
# What compression costs, as the Benchmarks section measured it: the same figure everywhere.
COMPRESSION_CPU = "1.25"  # times the CPU per delivery
COMPRESSION_MEMORY = "0.2 KiB"  # more per idle connection


def run_server(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "server.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 1, nothing on stdout (no banner), and one line on stderr that says `words`."""
    output = f"exit {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, output
    assert result.returncode == 1, output
    assert result.stdout == "", output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, output
    for word in words:
        assert word in lines[0], output


def help_entries(text: str) -> dict[str, str]:
    """--help's options: the first flag of each → its whole entry, on one line."""
    entries: dict[str, str] = {}
    for chunk in re.split(r"\n(?=  -)", text.split("options:", 1)[1]):
        if not chunk.strip():
            continue
        flag = chunk.split()[0].rstrip(",")
        entries[flag] = " ".join(chunk.split())
    return entries


# --- --help and wrong flags ---------------------------------------------------------------------


def test_help_shows_every_default_and_the_token_command():
    result = run_server("--help")
    assert result.returncode == 0, result.stderr
    entries = help_entries(result.stdout.split("\ncommands:")[0])
    for name, env in [(f.name, f.metadata["env"]) for f in Settings.__dataclass_fields__.values()]:
        entry = entries["--" + name.replace("_", "-")]
        assert "default: " in entry, entry
        assert f"env {env}" in entry, entry
    for flag, default in [
        ("--port", "8000"),
        ("--host", "127.0.0.1"),
        ("--max-frame-bytes", "65536"),
        ("--lobby-interval", "0.25"),
        ("--ping-interval", "20"),
        ("--history", "on"),
        ("--ws-compression", "off"),
        ("--db", str(ROOT / "chat.db")),
        ("--redis-url", "none"),
    ]:
        assert f"(default: {default};" in entries[flag], entries[flag]
    commands = " ".join(result.stdout.split("\ncommands:")[1].split())
    assert "token --username NAME" in commands
    assert "server.py token --help" in commands


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--prot", "9000"], "unrecognized arguments: --prot 9000 (did you mean --port?)"),
        (["--port", "eighty"], "argument --port: invalid whole number value: 'eighty'"),
        (["--no-such-thing"], "unrecognized arguments: --no-such-thing"),
    ],
    ids=["misspelt", "bad-value", "unknown"],
)
def test_a_wrong_flag_prints_one_usage_line_and_the_error(args, error):
    result = run_server(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    usage, message = result.stderr.splitlines()  # exactly two lines
    assert usage.startswith("usage: server.py ")
    assert "token" in usage
    assert message == f"server.py: error: {error}"


# --- Start-up failures: one line, exit 1 ----------------------------------------------------------


def test_a_history_file_in_use_is_one_line_and_exit_1(start_server):
    first = start_server()
    result = run_server("--port", "0", "--db", str(first.db_path))
    assert_one_line_failure(result, str(first.db_path), "in use by another chat server", "--db")
    assert first.health()["status"] == "ok"  # the first one is unharmed


def test_a_port_in_use_is_one_line_and_exit_1(server, tmp_path):
    result = run_server("--port", str(server.port), "--db", str(tmp_path / "chat.db"))
    assert_one_line_failure(result, f"127.0.0.1:{server.port}", "address already in use", "--port")


@pytest.mark.parametrize("problem", ["missing", "not-a-certificate"])
def test_a_missing_certificate_is_one_line_and_exit_1(tmp_path, problem):
    certificate, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    if problem == "not-a-certificate":
        certificate.write_text("hello\n")
        key.write_text("hello\n")
    result = run_server(
        "--port", "0", "--db", str(tmp_path / "chat.db"),
        "--ssl-certfile", str(certificate), "--ssl-keyfile", str(key),
    )  # fmt: skip
    assert_one_line_failure(result, "--ssl-certfile", str(certificate))


def test_unreachable_redis_is_one_line_and_exit_1(tmp_path):
    pytest.importorskip("redis")
    result = run_server(
        "--port", "0", "--db", str(tmp_path / "chat.db"), "--redis-url", "redis://127.0.0.1:1"
    )
    assert_one_line_failure(result, "cannot reach Redis at redis://127.0.0.1:1")


@pytest.mark.parametrize("blocklist", ["/nonexistent", "a directory"])
def test_unreadable_blocklist_is_one_line_and_exit_1(tmp_path, blocklist):
    path = str(tmp_path) if blocklist == "a directory" else blocklist
    result = run_server("--port", "0", "--db", str(tmp_path / "chat.db"), "--blocklist", path)
    assert_one_line_failure(result, "--blocklist", path)


# --- The banner -----------------------------------------------------------------------------------


def serve_until_the_banner(tmp_path: Path, *args: str) -> str:
    """Start `server.py --port P args`; as soon as the banner's first line is out, GET /health
    (which must answer at once), then stop it. Everything it printed on stdout."""
    port = free_port()
    with (tmp_path / "server.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "server.py", "--port", str(port), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        first_line: list[str] = []
        reader = threading.Thread(target=lambda: first_line.append(process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        assert first_line, "no banner in 30 s"
        assert f"open http://localhost:{port}/" in first_line[0]
        # Listening already: no ConnectionRefusedError, and an answer.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert response.status == 200
    finally:
        process.terminate()
        process.wait(15)
        rest = process.stdout.read()
        process.stdout.close()
    return first_line[0] + rest


def test_the_banner_appears_only_once_listening(server, tmp_path):
    # Not at all when the server cannot listen...
    taken = run_server("--port", str(server.port), "--db", str(tmp_path / "taken.db"))
    assert "open http" not in taken.stdout + taken.stderr
    # ...and when it appears, the server already answers.
    serve_until_the_banner(tmp_path, "--db", str(tmp_path / "chat.db"))


def test_with_workers_the_parent_prints_the_banner_once_they_all_serve(redis_server, tmp_path):
    printed = serve_until_the_banner(tmp_path, "--workers", "2", "--redis-url", redis_server.url)
    assert printed.count("open http") == 1, printed


def test_the_banner_says_where_the_history_goes(start_server, tmp_path):
    on_disk = start_server()
    assert f"history    {on_disk.db_path}" in on_disk.log()
    without = start_server("--no-history")
    assert "history    off" in without.log()


# --- HEAD -----------------------------------------------------------------------------------------


def raw_http(port: int, method: str, path: str) -> tuple[str, dict[str, str], bytes]:
    """Status line, headers and body, exactly as they came over the socket."""
    request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return status, headers, body


FRAMING = {"date", "transfer-encoding", "content-length"}  # how a body is sent, and when


@pytest.mark.parametrize("path", ["/", "/health"])
def test_head_answers_like_get_without_a_body(server, path):
    get_status, get_headers, get_body = raw_http(server.port, "GET", path)
    status, headers, body = raw_http(server.port, "HEAD", path)
    assert (get_status, status) == ("HTTP/1.1 200 OK", "HTTP/1.1 200 OK")
    assert get_body != b""
    assert body == b""

    def described(headers: dict[str, str]) -> dict[str, str]:  # what says the same, body or not
        return {name: value for name, value in headers.items() if name not in FRAMING}

    assert described(headers) == described(get_headers)
    assert headers["x-content-type-options"] == "nosniff"


def test_a_wrong_method_is_told_that_head_works_too(server):
    status, headers, _ = raw_http(server.port, "POST", "/health")
    assert status.startswith("HTTP/1.1 405")
    assert headers["allow"] == "GET, HEAD"


# --- History in memory ----------------------------------------------------------------------------


async def test_history_in_memory_is_announced_and_leaves_no_file(start_server, room):
    server = start_server("--db", ":memory:")
    assert "history    in memory only" in server.log()
    alice = await server.connect(f"/ws/chat/{room}")
    await alice.joined()
    await alice.send(type="message", message="kept in memory")
    await alice.expect("message", message="kept in memory")
    bob = await server.connect(f"/ws/chat/{room}")
    await bob.joined()
    assert [m["message"] for m in bob.history["messages"]] == ["kept in memory"]
    await alice.close()
    await bob.close()
    assert server.stop() == 0
    assert list(ROOT.glob(":memory:*")) == []  # SQLite took it for what it is, not a file name


# --- What the README and --help say ---------------------------------------------------------------


def test_compression_costs_one_figure_in_help_the_configuration_table_and_the_benchmarks():
    help_text = help_entries(run_server("--help").stdout.split("\ncommands:")[0])["--ws-compression"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table_row = next(line for line in readme.splitlines() if line.startswith("| `--ws-compression`"))
    benchmarks = readme.split("\n**Compression.**", 1)[1].split("\n\n", 1)[0]
    for where, text in [("--help", help_text), ("the table", table_row), ("Benchmarks", benchmarks)]:
        assert COMPRESSION_CPU in text, f"{where}: {text}"
        assert COMPRESSION_MEMORY in text, f"{where}: {text}"
        assert "tripl" not in text, f"{where}: {text}"


def test_the_license_is_declared_as_setuptools_now_expects():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    # A table ({text = ...}) makes setuptools print a deprecation warning on every install.
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert pyproject["build-system"]["requires"] == ["setuptools>=77"]  # the first to read these
