"""The public API is curated, and core never imports a broker client."""

from __future__ import annotations

import subprocess
import sys

import meshlink
import meshlink.resilience
import meshlink.testing
import meshlink.transport

BROKER_CLIENTS = (
    "aio_pika",
    "aiormq",
    "pamqp",
    "aiokafka",
    "kafka",
    "confluent_kafka",
    "asyncpg",
    "sqlalchemy",
)


def test_all_is_sorted_and_every_name_exists() -> None:
    for module in (meshlink, meshlink.transport, meshlink.testing, meshlink.resilience):
        assert list(module.__all__) == sorted(module.__all__), module.__name__
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_exported_names_are_stable() -> None:
    assert set(meshlink.__all__) >= {
        "Mesh",
        "Context",
        "Message",
        "Reject",
        "RetryLater",
        "MeshlinkError",
        "ConfigurationError",
        "Transport",
        "FakeClock",
        "__version__",
    }


def test_core_imports_no_broker_client() -> None:
    code = (
        "import sys, meshlink, meshlink.testing, meshlink.testing.conformance, meshlink.cli;"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {BROKER_CLIENTS!r}];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imported {out.stdout.strip()}"


def test_error_tree_has_one_root() -> None:
    from meshlink import errors

    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.MeshlinkError), name
