"""cmfast: Consistency Models with fused kernels. The public API (DESIGN.md 3), re-exported; nothing else."""
from . import editing as edit
from . import metrics, ops
from .graphed import GraphedSampler
from .jvp import fd_jvp
from .nets import UNet
from .precond import ConsistencyModel, EDMDenoiser, scalings
from .pretrained import load_pretrained
from .sampling import edm_sample, sample
from .schedules import ct_schedule, ict_schedule, karras_sigmas, paper_step_sigmas

__version__ = "0.1.0"
__all__ = ["ConsistencyModel", "EDMDenoiser", "GraphedSampler", "UNet", "ct_schedule", "edit", "edm_sample",
           "fd_jvp", "ict_schedule", "karras_sigmas", "load_pretrained", "metrics", "ops", "paper_step_sigmas", "sample",
           "scalings"]
