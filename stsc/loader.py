"""Load a user's model file: a Python file defining ``build_model()`` and ``example_inputs()``, and
optionally ``batches()`` (training batches for ``stsc profile``; a generator or a function returning a list).

Loading *executes* the file, as ``python model.py`` would: only load files you trust.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from pathlib import Path

import torch
from torch import nn

from .capture import first_line, forward_kwargs
from .errors import ModelFileError

__all__ = ["ModelFileError", "load_model_and_batches", "load_model_file"]


def load_model_file(path: str | Path) -> tuple[nn.Module, dict]:
    """Import ``path`` and return ``(build_model(), example_inputs(...))``, checked.

    ``example_inputs`` is called with the model when it takes an argument, else with none.
    """
    model, inputs, _ = _load(Path(path))
    return model, inputs


def load_model_and_batches(path: str | Path) -> tuple[nn.Module, dict, list[dict]]:
    """:func:`load_model_file` plus training batches: what the file's optional ``batches()`` yields
    (called with the model when it takes an argument, like ``example_inputs``), each checked as the
    example inputs are; ``[example_inputs]`` when the file defines no ``batches()``."""
    path = Path(path)
    model, inputs, module = _load(path)
    if not hasattr(module, "batches"):
        return model, inputs, [inputs]
    if not callable(module.batches):
        raise ModelFileError(f"{path}: batches is {type(module.batches).__name__}, expected a function "
                             f"yielding dicts of forward keyword arguments")
    batches = _call(path, lambda *args: list(module.batches(*args)), *_model_argument(module.batches, model),
                    name="batches")
    if not batches:
        raise ModelFileError(f"{path}: batches() yielded no batch")
    for index, batch in enumerate(batches):
        _check_inputs(path, batch, f"batches()[{index}]")
        _check_runs(path, model, batch, f"batches()[{index}]")
    return model, inputs, batches


def _load(path: Path):
    """``(model, example inputs, module)`` of a model file, checked."""
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    module = _import(path)
    for name in ("build_model", "example_inputs"):
        if not callable(getattr(module, name, None)):
            raise ModelFileError(f"{path}: no {name}() function; a model file must define "
                                 f"build_model() and example_inputs()")
    model = _call(path, module.build_model)
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"{path}: build_model() returned {type(model).__name__}, expected a torch.nn.Module")
    inputs = _call(path, module.example_inputs, *_model_argument(module.example_inputs, model))
    _check_inputs(path, inputs, "example_inputs()")
    _check_runs(path, model, inputs, "example_inputs()")
    return model, inputs, module


def _model_argument(fn, model: nn.Module) -> tuple:
    """``(model,)`` when ``fn`` takes a positional argument, else ``()``."""
    takes_model = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                      for p in inspect.signature(fn).parameters.values())
    return (model,) if takes_model else ()


def _check_inputs(path: Path, inputs, what: str) -> None:
    if not isinstance(inputs, dict) or not all(isinstance(k, str) for k in inputs):
        what = f"{what} returned" if what.endswith("()") else f"{what} is"
        raise ModelFileError(f"{path}: {what} {type(inputs).__name__}, expected a dict of forward keyword arguments")


def _check_runs(path: Path, model: nn.Module, inputs: dict, what: str) -> None:
    """Run the model once on ``inputs`` (not for models on the meta device: nothing to run)."""
    if any(p.is_meta for p in model.parameters()):
        return
    try:
        with torch.no_grad():
            model(**forward_kwargs(model, inputs)[0])
    except Exception as exc:  # noqa: BLE001
        frames = traceback.extract_tb(exc.__traceback__)
        torch_dir = str(Path(torch.__file__).parent)
        frame = next((f for f in reversed(frames) if not f.filename.startswith(torch_dir)), frames[-1])
        raise ModelFileError(f"{path}: the model does not run on {what}: {type(exc).__name__}: "
                             f"{first_line(exc)} (at {frame.filename}:{frame.lineno})") from exc


def _import(path: Path):
    name = f"stsc_model_file_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ModelFileError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from exc
    except Exception as exc:  # noqa: BLE001 - report any import failure with its place in the file
        raise ModelFileError(f"{_where(path, exc)}: failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def _call(path: Path, fn, *args, name: str | None = None):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{_where(path, exc)}: {name or fn.__name__}() failed: {type(exc).__name__}: {exc}") from exc


def _where(path: Path, exc: BaseException) -> str:
    """``file:line`` of the deepest traceback frame inside the model file, else the file."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f"{path}:{lines[-1]}" if lines else str(path)
