"""The meshlink command."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from meshlink import ConfigurationError, __version__
from meshlink.cli import app, load_mesh

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"meshlink {__version__}"


def test_run_reports_a_bad_target_naming_the_setting() -> None:
    result = runner.invoke(app, ["run", "no_such_module_xyz:mesh"])
    assert result.exit_code == 2
    assert "app: cannot import 'no_such_module_xyz'" in result.output


def test_load_mesh_refuses_what_is_not_a_mesh() -> None:
    with pytest.raises(ConfigurationError, match=r"not a meshlink\.Mesh"):
        load_mesh("os:sep")
    with pytest.raises(ConfigurationError, match="module:attribute"):
        load_mesh("just_a_module")


def test_dlq_show_prints_every_envelope_field_even_those_left_off_the_wire() -> None:
    """A first delivery's attempt (1) and idempotency key (= id) are not sent as headers;
    ``meshlink dlq show`` still prints them."""
    from meshlink import Message
    from meshlink.cli import _details

    m = Message(body=b'{"x": 1}', type="T", source="svc", headers={"x-meshlink-error-type": "ValueError"})
    out = _details(m).splitlines()
    assert "attempt: 1" in out
    assert f"idempotency-key: {m.id}" in out
    assert f"ce_id: {m.id}" in out
    assert "x-meshlink-error-type: ValueError" in out
    assert out[-1] == '{"x": 1}'
