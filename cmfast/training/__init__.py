"""Training: the loop (loop.py), the method registry (methods.py), configs (config.py), checkpoints."""
from . import methods
from . import methods_scm  # noqa: F401  (registers --method sct, scd)
from .checkpoint import load_model
from .methods import METHODS, Method, get_method, register

__all__ = ["METHODS", "Method", "get_method", "load_model", "methods", "register"]
