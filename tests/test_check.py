"""`meshlink check` explains each handler's policy and fails on contradictions."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshlink.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_tests_dir() -> Iterator[None]:
    here = os.getcwd()
    os.chdir(Path(__file__).parent)
    yield
    os.chdir(here)


def test_check_prints_the_effective_policy_and_broker_mapping() -> None:
    result = runner.invoke(app, ["check", "apps.checked:good"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "consumes   orders.placed as group billing (prefetch 16)" in out
    assert "settle -> decode -> Breaker(payments) -> Bulkhead(concurrency=16) -> Retry(" in out
    assert "-> Timeout(60s) -> charge" in out
    assert "budget 9 executions" in out
    assert "redelivers through orders.placed.billing.retry" in out
    assert "dead-letters to orders.placed.billing.dlq" in out


def test_check_fails_on_a_contradiction_and_explains_it() -> None:
    result = runner.invoke(app, ["check", "apps.checked:contradictory"])
    assert result.exit_code == 1
    assert "PROBLEM: redeliveries span 10800s but processed keys are kept only 1800s" in result.output


def test_check_knows_the_brokers_limits() -> None:
    result = runner.invoke(app, ["check", "apps.checked:rabbit"])
    assert result.exit_code == 1
    assert "quorum delivery-limit 5 is below the attempt budget of 12" in result.output
    assert "beyond the broker's consumer_timeout=1800s" in result.output


def test_check_knows_kafkas_poll_interval() -> None:
    result = runner.invoke(app, ["check", "apps.checked:kafka"])
    assert result.exit_code == 1
    assert "beyond the broker's max_poll_interval_ms=300s" in result.output
