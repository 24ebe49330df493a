"""Pluggable parts found by URL scheme through entry points (transports, stores).

A distribution registers a factory per scheme in an entry-point group; the
factory is called as ``factory(url, **options)``. One lookup serves every group,
so third parties plug in transports and stores the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar
from urllib.parse import urlsplit

from meshlink.errors import ConfigurationError

__all__ = ["from_url", "schemes"]

T = TypeVar("T")


def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def schemes(group: str, *, builtin: Mapping[str, object] | None = None) -> list[str]:
    """The URL schemes registered in ``group`` (plus the built-in ones), sorted."""
    return sorted({*_entry_points(group), *(builtin or {})})


def from_url(
    group: str,
    url: str,
    *,
    setting: str,
    hints: Mapping[str, str],
    builtin: Mapping[str, Callable[..., T]] | None = None,
    **options: Any,
) -> T:
    """Build what ``group`` registers for ``url``'s scheme.

    Raises:
        ConfigurationError: naming ``setting``, when the URL has no scheme or nothing serves it
            (with the distribution to install, from ``hints``).
    """
    scheme = urlsplit(url).scheme
    if not scheme:
        raise ConfigurationError(setting, f"{url!r} needs a scheme, e.g. memory://")
    ep = _entry_points(group).get(scheme)
    if ep is not None:
        factory: Callable[..., T] = ep.load()
        return factory(url, **options)
    if builtin and scheme in builtin:
        return builtin[scheme](url, **options)
    hint = f"; install {hints[scheme]}" if scheme in hints else ""
    raise ConfigurationError(
        setting,
        f"nothing serves scheme {scheme!r}{hint} (installed: {', '.join(schemes(group, builtin=builtin))})",
    )
