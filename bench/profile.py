"""Profile the fan-out: `python -m bench.profile` (`make profile`) writes a flame graph.

py-spy samples this project's server while 1 sender and 100 receivers exchange messages (the
fan-out workload at N=100), then writes docs/fanout-flamegraph.svg. py-spy attaches to
another process, which needs root or ptrace permission.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

from bench.load import fan_out_in_new_room
from bench.servers import ROOT, chat_server

OUTPUT = ROOT / "docs" / "fanout-flamegraph.svg"
SECONDS = 20


def main() -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("py-spy is not installed: pip install py-spy")
    server = chat_server().start()
    assert server.process is not None
    try:
        # --gil: only the thread running Python, so the idle history threads do not show.
        options = ["--gil", "--rate", "250", "--duration", str(SECONDS), "--output", str(OUTPUT)]
        recorder = subprocess.Popen([py_spy, "record", *options, "--pid", str(server.process.pid)])

        async def keep_busy() -> None:
            # A fresh room each time: the same client_msg_ids again would be (rightly) deduplicated.
            while recorder.poll() is None:
                await fan_out_in_new_room(server, 101, 4000, 20, server.cpu_seconds)

        asyncio.run(keep_busy())
    finally:
        server.stop()
    print(f"wrote {OUTPUT.relative_to(ROOT)}" if recorder.returncode == 0 else "py-spy failed")


if __name__ == "__main__":
    main()
