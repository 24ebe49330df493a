"""Find a store family by URL scheme through the ``meshlink.stores`` entry-point group.

A distribution registers a factory per scheme, called as ``factory(url, **options)``
and returning a :class:`~meshlink.outbox.store.Stores`::

    [project.entry-points."meshlink.stores"]
    "postgresql+asyncpg" = "meshlink_sqlalchemy:SqlStores"

``memory://`` (the in-process store) is always available.
"""

from __future__ import annotations

from typing import Any

from meshlink import plugins
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
# built in, so that core works before any distribution is installed
_BUILTIN = {"memory": MemoryStores}


def available_store_schemes() -> list[str]:
    """The URL schemes of every installed store family, sorted."""
    return plugins.schemes(STORES_ENTRY_POINT_GROUP, builtin=_BUILTIN)


def stores_from_url(url: str, **options: Any) -> Stores:
    """Build (not connect) the store family registered for ``url``'s scheme.

    Raises:
        ConfigurationError: ``url`` has no scheme, or no installed store serves it.
    """
    stores: Stores = plugins.from_url(
        STORES_ENTRY_POINT_GROUP, url, setting="store", hints=_HINTS, builtin=_BUILTIN, **options
    )
    return stores
