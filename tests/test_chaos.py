"""Nothing lost, nothing twice, under a storm of faults (tests/chaos.py): chat processes killed
and restarted, Redis restarted, connections dropped, clients that stop reading. A short storm
with a fixed seed, and one with a seed drawn for this run (its id shows it; a failure prints it
with the command that replays it). `make chaos` runs a long one."""

from __future__ import annotations

import os
import random

import pytest

from tests.chaos import Config, run

FIXED_SEED = int(os.environ.get("CHAT_CHAOS_SEED", "20261128"))
DRAWN_SEED = random.SystemRandom().randrange(1_000_000)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [FIXED_SEED, DRAWN_SEED], ids=["fixed", f"drawn-{DRAWN_SEED}"])
async def test_nothing_lost_nothing_twice_under_faults(seed: int) -> None:
    report = await run(Config(seed, seconds=12, rooms=2, clients=3, settle_timeout=30))
    print(report.summary())
    assert report.ok, report.failure()
    # The storm did what it says: each kind of fault happened, and messages were refused and resent.
    for kind in ("kill_chat", "term_chat", "restart_redis", "drop_client", "pause_client"):
        assert report.inflicted[kind] > 0, report.summary()
    assert report.stats["resends"] > 0, report.summary()
