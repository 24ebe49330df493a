"""``meshlink db init`` and ``meshlink outbox list [--failed]`` / ``stats`` on a SQLite store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from typer.testing import CliRunner

from meshlink.outbox import RowFailure
from meshlink.outbox.cli import db_app, outbox_app
from meshlink.outbox.contract import entry
from meshlink_sqlalchemy import SqlStores

cli = typer.Typer()
cli.add_typer(outbox_app, name="outbox")
cli.add_typer(db_app, name="db")


def test_db_init_then_list_failed_rows_with_their_reason(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    result = runner.invoke(cli, ["db", "init", "--store", url])
    assert result.exit_code == 0, result.output

    async def prepare() -> None:
        stores = SqlStores(url)
        async with stores.engine.begin() as conn:
            await stores.outbox.add(conn, [entry(1, "x"), entry(2, "y")])
        [row, _] = await stores.outbox.claim("r", limit=10, lease=30, now=0)
        failure = RowFailure(id=row.id, reason="UnroutableError: no queue", retry_at=0, permanent=True)
        await stores.outbox.record_failure("r", [failure], now=0, max_attempts=3)
        await stores.close()

    asyncio.run(prepare())
    failed = runner.invoke(cli, ["outbox", "list", "--store", url, "--failed"])
    assert failed.exit_code == 0, failed.output
    assert "UnroutableError: no queue" in failed.output
    assert "1 failed row(s)" in failed.output
    pending = runner.invoke(cli, ["outbox", "list", "--store", url])
    assert "1 pending row(s)" in pending.output
    stats = runner.invoke(cli, ["outbox", "stats", "--store", url])
    assert "pending=1" in stats.output
    assert "failed=1" in stats.output
