"""Find a store family by URL scheme through the ``meshlink.stores`` entry-point group.

A distribution registers a factory per scheme, called as ``factory(url, **options)``
and returning a :class:`~meshlink.outbox.store.Stores`::

    [project.entry-points."meshlink.stores"]
    "postgresql+asyncpg" = "meshlink_sqlalchemy:SqlStores"

``memory://`` (the in-process store) is always available.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any
from urllib.parse import urlsplit

from meshlink.errors import ConfigurationError
from meshlink.outbox.memory import MemoryStores
from meshlink.outbox.store import Stores

__all__ = ["STORES_ENTRY_POINT_GROUP", "available_store_schemes", "stores_from_url"]

STORES_ENTRY_POINT_GROUP = "meshlink.stores"
_HINTS = {
    "sqlite+aiosqlite": "meshlink-sqlalchemy",
    "postgresql+asyncpg": "meshlink-sqlalchemy",
    "postgresql": "meshlink-sqlalchemy (and use postgresql+asyncpg://)",
    "sqlite": "meshlink-sqlalchemy (and use sqlite+aiosqlite://)",
}


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=STORES_ENTRY_POINT_GROUP)}


def available_store_schemes() -> list[str]:
    """The URL schemes of every installed store family, sorted."""
    return sorted({*_entry_points(), "memory"})


def stores_from_url(url: str, **options: Any) -> Stores:
    """Build (not connect) the store family registered for ``url``'s scheme.

    Raises:
        ConfigurationError: ``url`` has no scheme, or no installed store serves it.
    """
    scheme = urlsplit(url).scheme
    if not scheme:
        raise ConfigurationError("store", "a store URL needs a scheme, e.g. postgresql+asyncpg://")
    ep = _entry_points().get(scheme)
    if ep is None:
        if scheme == "memory":  # built in, so that core works before any distribution is installed
            return MemoryStores(url, **options)
        hint = f"; install {_HINTS[scheme]}" if scheme in _HINTS else ""
        raise ConfigurationError(
            "store",
            f"no store for scheme {scheme!r}{hint} (installed: {', '.join(available_store_schemes())})",
        )
    factory: Callable[..., Stores] = ep.load()
    return factory(url, **options)
