"""Training: the loop (loop.py), the method registry (methods.py), configs (config.py), checkpoints.

The names load on first use (PEP 562), as cmfast's own: cmfast-train's --help reads config.py (plain Python) without
torch's import.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> (module, attribute in it; None: the module itself)
_EXPORTS = {
    "METHODS": (".methods", "METHODS"),
    "Method": (".methods", "Method"),
    "checkpoint": (".checkpoint", None),      # modules the eager package imported: `cmfast.training.checkpoint` after
    "get_method": (".methods", "get_method"),     # `import cmfast.training`, as before
    "load_model": (".checkpoint", "load_model"),
    "methods": (".methods", None),
    "methods_scm": (".methods_scm", None),
    "register": (".methods", "register"),
}
__all__ = ["METHODS", "Method", "get_method", "load_model", "methods", "register"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cmfast.training' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = importlib.import_module(module, __name__)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from . import methods
    from .checkpoint import load_model
    from .methods import METHODS, Method, get_method, register
