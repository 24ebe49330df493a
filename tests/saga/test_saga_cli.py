"""`meshlink saga list` and `meshlink saga show`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from typer.testing import CliRunner

from meshlink.cli import app

EXAMPLES = Path(__file__).parent.parent.parent / "examples"
runner = CliRunner()


def test_saga_list_and_show_read_the_coordinators_store() -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import importlib

        example = importlib.import_module("03_checkout_saga")
        asyncio.run(example.main())  # runs three checkouts into the coordinator's store
        listed = runner.invoke(app, ["saga", "list", "03_checkout_saga:coordinator"])
        assert listed.exit_code == 0, listed.output
        assert listed.output.count("checkout") == 3
        assert "3 saga(s)" in listed.output
        compensated = runner.invoke(
            app, ["saga", "list", "03_checkout_saga:coordinator", "--status", "compensated"]
        )
        assert "1 saga(s)" in compensated.output
        saga_id = compensated.output.split()[0]
        shown = runner.invoke(app, ["saga", "show", "03_checkout_saga:coordinator", saga_id])
        assert shown.exit_code == 0, shown.output
        assert '"order_id": "A-2"' in shown.output
        assert "charge-card          failed  (CardDeclined)" in shown.output
        assert "reserve-stock        compensated" in shown.output
        assert "flowchart LR" in shown.output
    finally:
        sys.path.remove(str(EXAMPLES))
