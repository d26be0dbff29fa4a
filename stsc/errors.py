"""stsc's own errors, and the one place where an internal failure becomes one of them.

A caller of :func:`stsc.inspect`, :func:`stsc.sparsify`, :func:`stsc.transform` or :func:`stsc.profile` sees
four error types: :class:`CaptureError` (the model could not be traced), :class:`UnsupportedModelError` (it was
traced, but what a step looked for is not there or does not work), :class:`PolicyError` (a bad policy) and
:class:`ModelFileError` (a bad model file). Bad arguments keep Python's own types (``ValueError``,
``TypeError``), raised before any analysis starts.

Whatever else fails while stsc analyses or rewrites a model (an ``IndexError`` deep in the matcher, a
``KeyError`` in a pass binding itself to a model it did not expect) means a model stsc cannot handle:
:func:`looking_for` marks each step of capture, match and pass application with what it looks for, and turns
such a failure into one of stsc's errors saying so, the original exception chained as its ``__cause__``.
"""

from __future__ import annotations

import contextlib

__all__ = ["STSC_ERRORS", "CaptureError", "ModelFileError", "PolicyError", "UnsupportedModelError", "first_line",
           "looking_for"]


class CaptureError(RuntimeError):
    """Neither torch.export nor dynamo could trace the model with the given inputs."""


class UnsupportedModelError(ValueError):
    """A pass of the policy needs structure the matcher did not find in the model, or a step of the analysis
    failed on it."""


class PolicyError(ValueError):
    """A policy that cannot be used; the message starts with ``file:line:`` (``file:`` when no line is at
    fault: a missing file, or a stage name asked for that the policy does not have)."""


class ModelFileError(Exception):
    """The model file is missing, fails to import, or does not provide what stsc needs."""


STSC_ERRORS = (CaptureError, UnsupportedModelError, PolicyError, ModelFileError)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


@contextlib.contextmanager
def looking_for(what: str, error: type[Exception] = UnsupportedModelError, as_is: tuple[type[Exception], ...] = ()):
    """Run one step of stsc's work on a model; any exception but stsc's own errors becomes ``error`` reading
    ``"<what>: <exception type>: <its first line>"`` (``"<what>: <message>"`` for the types in ``as_is``, whose
    messages already explain themselves), raised from the original. Steps nest: the innermost names the failure."""
    try:
        yield
    except STSC_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - the point: no internal exception reaches the caller
        detail = str(exc) if isinstance(exc, as_is) else f"{type(exc).__name__}: {first_line(exc)}"
        raise error(f"{what}: {detail}") from exc
