"""SIGTERM and SIGINT stop fetching, drain in-flight handlers and lose nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_in_flight_handlers_and_loses_nothing(sig: signal.Signals) -> None:
    n = 400
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshlink",
        "run",
        "apps.draining:mesh",
        "--log-level",
        "WARNING",
        cwd=HERE,
        env={**os.environ, "DRAIN_N": str(n)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(60):
        while True:
            line = (await proc.stdout.readline()).decode().strip()
            assert line, "the service exited before handling anything"
            lines.append(line)
            if line == "done 10":  # progress-based fault point: signal mid-stream
                proc.send_signal(sig)
                break
        rest, err = await proc.communicate()
    text = "\n".join(lines) + "\n" + rest.decode()
    assert proc.returncode == 0, err.decode()
    started = {ln.split()[1] for ln in text.splitlines() if ln.startswith("started ")}
    done = {ln.split()[1] for ln in text.splitlines() if ln.startswith("done ")}
    left_line = next(ln for ln in text.splitlines() if ln.startswith("left "))
    _, ready, unsettled = left_line.split()
    assert started == done, "a handler that started was not allowed to finish"
    assert int(unsettled) == 0
    assert len(done) < n, "the signal came too late to test draining"
    assert len(done) + int(ready) == n, "messages were lost or duplicated"
