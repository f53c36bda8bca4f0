"""cmfast: Consistency Models with fused kernels. The public API (DESIGN.md 3), re-exported; nothing else.

The names load on first use (PEP 562), so `import cmfast` and the commands' start-up (`cmfast-sample --help`, an
argument error, Ctrl-C) do not wait for torch's import: `cmfast.sample` imports what it needs when first read,
`from cmfast import sample` alike.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> (module, attribute in it; None: the module itself)
_EXPORTS = {
    "ConsistencyModel": (".precond", "ConsistencyModel"),
    "EDMDenoiser": (".precond", "EDMDenoiser"),
    "GraphedSampler": (".graphed", "GraphedSampler"),
    "UNet": (".nets", "UNet"),
    "ct_schedule": (".schedules", "ct_schedule"),
    "edit": (".editing", None),
    "edm_sample": (".sampling", "edm_sample"),
    "fd_jvp": (".jvp", "fd_jvp"),
    "ict_schedule": (".schedules", "ict_schedule"),
    "karras_sigmas": (".schedules", "karras_sigmas"),
    "load_pretrained": (".pretrained", "load_pretrained"),
    "metrics": (".metrics", None),
    "ops": (".ops", None),
    "paper_step_sigmas": (".schedules", "paper_step_sigmas"),
    "sample": (".sampling", "sample"),
    "scalings": (".precond", "scalings"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cmfast' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = importlib.import_module(module, __name__)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value         # later reads are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:       # the same names for type checkers and IDEs
    from . import editing as edit
    from . import metrics, ops
    from .graphed import GraphedSampler
    from .jvp import fd_jvp
    from .nets import UNet
    from .precond import ConsistencyModel, EDMDenoiser, scalings
    from .pretrained import load_pretrained
    from .sampling import edm_sample, sample
    from .schedules import ct_schedule, ict_schedule, karras_sigmas, paper_step_sigmas
