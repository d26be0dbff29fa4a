"""The pass registry: a pass is a config dataclass plus an ``apply`` function, registered by name.

A new pass is one new module in ``passes/`` that decorates its ``apply`` with
``@register_pass("name", ConfigClass)``; :func:`get_pass` imports ``stsc.passes.<name>`` on demand.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["PassInfo", "PassSpec", "get_pass", "register_pass"]


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


_PASSES: dict[str, PassSpec] = {}


def register_pass(name: str, config_cls: type):
    """Decorator registering ``apply(model, structure, config, example_inputs)`` as pass ``name``."""

    def decorate(apply: Callable) -> Callable:
        if name in _PASSES and _PASSES[name].apply is not apply:
            raise ValueError(f"a pass named {name!r} is registered already")
        _PASSES[name] = PassSpec(name, config_cls, apply)
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
