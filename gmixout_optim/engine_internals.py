"""Private names of DeepSpeed and torch that the integrations rely on, checked where used.

An engine release may rename a private attribute without notice. Silently skipping the work
that needs it (e.g. not copying the merged anchor into a ZeRO-3 model) would leave a wrong
model behind, so every use goes through :func:`require` / :func:`require_import`, which raise
:class:`EngineInternalsError` naming the missing name, the installed version and the version
tested. docs/DESIGN.md lists every name.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["TESTED", "EngineInternalsError", "require", "require_import"]

# The versions the integrations were tested with (see docs/DESIGN.md, "Engine internals").
TESTED = {"deepspeed": "0.19.8", "torch": "2.14.1"}


class EngineInternalsError(RuntimeError):
    """A private name of DeepSpeed or torch that GMixout relies on is missing."""


def _installed(engine: str) -> str:
    try:
        return getattr(importlib.import_module(engine), "__version__", "unknown")
    except ImportError:
        return "not installed"


def _error(engine: str, what: str, purpose: str) -> EngineInternalsError:
    return EngineInternalsError(
        f"{engine} {_installed(engine)} has no {what}, which GMixout relies on to {purpose}; "
        f"the integration was tested with {engine} {TESTED[engine]}: install that version or report it")


def require(obj: Any, name: str, *, engine: str, purpose: str) -> Any:
    """``getattr(obj, name)``, or :class:`EngineInternalsError` if the engine renamed it."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise _error(engine, f"{type(obj).__name__}.{name}", purpose) from None


def require_import(module: str, name: str, *, engine: str, purpose: str) -> Any:
    """``module.name`` imported, or :class:`EngineInternalsError` if it moved."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise _error(engine, f"{module}.{name}", purpose) from None
