"""The soak's CI version (issue 12): 60 s of tests/soak.py's workload, a
worker SIGKILLed every 10 s and a SIGHUP reload every 20 s, with the same
assertions on counts as bench/soak_bench.py's 30 minutes."""

from __future__ import annotations

from pathlib import Path

import pytest
import soak


@pytest.mark.slow
async def test_soak_loses_nothing_unannounced(tmp_path: Path) -> None:
    r = await soak.run(tmp_path, seconds=60, rate=20_000, kill_every=10, reload_every=20)
    print(soak.report(r))
    assert soak.check(r) == []
    assert r.kills >= 5 and r.reloads >= 2
    fds, _ = soak.fd_and_rss_drift(r)
    assert fds <= 8, soak.report(r)  # a few reconnecting clients in flight, no leak
