"""One check of a device name, for the CLIs' --device and the library's device / map_location arguments."""
from __future__ import annotations

import torch


def checked_device(name, what: str = "device") -> torch.device:
    """`name` as a torch.device this machine has: cpu, cuda, cuda:N (N below the device count) or mps; otherwise one
    ValueError naming `what` (torch's own errors for a bad string or a missing driver came from deep in the first op,
    or from inside .to() after a whole load)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    said = f"{what} '{name}'"
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{said}: expected cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{said}: asks for CUDA, which is not available here (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{said}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{said}: asks for MPS, which is not available here")
    return dev
