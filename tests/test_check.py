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


def test_check_finds_an_idempotency_lease_shorter_than_a_round_of_tries() -> None:
    from meshlink import Mesh, Retry
    from meshlink.check import check_mesh
    from meshlink.resilience.idempotency import Idempotency, MemoryIdempotencyStore

    mesh = Mesh("memory://", service="svc")
    store = MemoryIdempotencyStore()

    @mesh.handler(
        "a", timeout="60s", retry=Retry(attempts=3), idempotency=Idempotency(store=store, lease="2m")
    )
    async def short_lease(body: bytes) -> None: ...

    @mesh.handler(
        "b", timeout="10s", retry=Retry(attempts=3), idempotency=Idempotency(store=store, lease="5m")
    )
    async def long_enough(body: bytes) -> None: ...

    @mesh.handler("c", timeout=None, idempotency=Idempotency(store=store))
    async def unbounded(body: bytes) -> None: ...

    reports = {r.spec.name: r for r in check_mesh(mesh)}
    assert any("idempotency.lease=120s" in p for p in reports["short_lease"].problems)
    assert not any("lease" in p for p in reports["long_enough"].problems)
    assert any("idempotency.lease=300s" in w for w in reports["unbounded"].warnings)
