"""The examples run as written (on memory://) and say what happened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(name: str) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout


def test_quickstart_handles_and_replies() -> None:
    out = run("01_quickstart.py")
    assert "charging 42.00 for order o-1" in out
    assert "shipping order o-1" in out


def test_demo_shows_handled_and_dead_lettered_messages() -> None:
    out = run("02_demo.py")
    assert "FAILED     OrderPlaced      in charge: card declined" in out
    assert "amount: Input should be greater than 0" in out
    assert out.count("parked     OrderPlaced      in orders.placed.billing.dlq") == 2
    assert "done: 4 handled, 2 failed, 2 dead-lettered" in out


def test_readme_quickstart_runs_as_written() -> None:
    import re

    readme = (EXAMPLES.parent / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "charging 42.00 for order o-1\nshipping order o-1" in out.stdout


def test_checkout_saga_completes_good_orders_and_compensates_the_declined_one() -> None:
    out = run("03_checkout_saga.py")
    assert "payment    declined A-2" in out
    assert "inventory  released stock for A-2 (compensation)" in out
    assert "A-2: compensated" in out
    assert "A-1: completed" in out
    assert "2 completed, 1 compensated" in out
