"""Gradient methods: ``get_method(name, **options)`` returns a callable K×P gradients → P update.

    >>> import torch
    >>> from cogradctl.methods import get_method
    >>> m = get_method("ew")
    >>> m(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0.5, 0.7]))
    tensor([1., 2.])

Methods register through the ``cogradctl.methods`` entry-point group (built-ins included), so a
third-party package adds one without touching cogradctl.
"""

from __future__ import annotations

from cogradctl import registry
from cogradctl.errors import UsageError
from cogradctl.methods.base import Method


def list_methods(plugin_paths: list[str] | None = None) -> dict[str, registry.Entry]:
    """Every registered method, name → registry entry (with its factory or load error)."""
    return registry.discover("methods", plugin_paths)


def get_method(name: str, plugin_paths: list[str] | None = None, **options) -> Method:
    """Build the method registered as ``name`` with ``options``; bad options raise UsageError."""
    factory = registry.lookup("methods", name, plugin_paths)
    known = getattr(factory, "options", None)
    if known is not None:
        unknown = sorted(set(options) - set(known))
        if unknown:
            listed = ", ".join(sorted(known)) or "none"
            raise UsageError(f"method '{name}' has no option {', '.join(unknown)}; its options: {listed}")
    try:
        return factory(**options)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UsageError(f"method '{name}': {exc}") from exc


__all__ = ["Method", "get_method", "list_methods"]
