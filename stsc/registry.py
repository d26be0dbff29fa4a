"""The pass registry: a pass is a config dataclass plus an ``apply`` function, registered by name.

A new pass is one new module in ``passes/`` that decorates its ``apply`` with
``@register_pass("name", ConfigClass)``; :func:`get_pass` imports ``stsc.passes.<name>`` on demand.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["PassInfo", "PassSpec", "available_passes", "get_pass", "register_pass"]


@dataclass
class PassInfo:
    """What a pass did, for the report: its name, how many places it matched, and details."""

    name: str
    matched: int
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_cls: type
    apply: Callable
    estimate: Callable | None = None  # (structure, config) -> stsc.savings.Savings
    check: Callable | None = None  # (structure) -> None, or why the pass cannot work on that structure


_PASSES: dict[str, PassSpec] = {}


def register_pass(name: str, config_cls: type, estimate: Callable | None = None, check: Callable | None = None):
    """Decorator registering ``apply(model, structure, config, example_inputs)`` as pass ``name``.

    ``estimate(structure, config)``, if given, returns the :class:`stsc.savings.Savings` the pass is
    expected to bring (for reports, before anything runs). ``check(structure)``, if given, returns why
    the pass cannot work on a matched structure (None when it can), for reports before any pass runs.
    """

    def decorate(apply: Callable) -> Callable:
        if name in _PASSES and _PASSES[name].apply is not apply:
            raise ValueError(f"a pass named {name!r} is registered already")
        _PASSES[name] = PassSpec(name, config_cls, apply, estimate, check)
        return apply

    return decorate


def get_pass(name: str) -> PassSpec:
    if name not in _PASSES:
        try:
            importlib.import_module(f"stsc.passes.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"stsc.passes.{name}":
                raise
    if name not in _PASSES:
        raise KeyError(f"unknown pass {name!r}")
    return _PASSES[name]


def available_passes() -> list[str]:
    """Names of every pass module in ``stsc.passes`` (registered or not yet imported)."""
    import stsc.passes

    return sorted(info.name for info in pkgutil.iter_modules(stsc.passes.__path__) if not info.name.startswith("_"))
