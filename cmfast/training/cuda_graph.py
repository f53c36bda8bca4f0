"""cmfast-train --cuda-graph: the step's loss, backward and gradient clipping captured in one CUDA graph, replayed
every step.

A small network's eager step is bound by the host, not the GPU: fmnist-small's iCT step at batch 256 took 112 ms on
an H200 (benchmarks/results/nvidia-h200-2026-11-28-s31-quick.json) for about 15 ms of kernels, the Python and launch
cost of forward, target forward and backward. The captured step launches them as one graph. What stays eager is
small and keeps the loop's behaviour: the optimizer step and the EMA updates (a few multi-tensor launches) run after
the loop's one host sync has read the loss and the gradient norm, so a non-finite step is still skipped, and the
curricula (N(k), mu(k), sCT's warm-up r) still come from the host, copied into the graph's input buffers before
each replay (Method.graph_inputs).

What the graph changes:
- random numbers come from the default generator (a replay advances it; the generator is seeded by --seed), not
  from the eager step's generator seeded per step, so a run draws other noise than without --cuda-graph;
- the target pass shares the online pass's dropout masks by recording them (objectives.consistency_pair_loss
  replay='masks'), where the eager step replays the RNG state, which a graph cannot read while capturing;
- one process, no gradient accumulation, no fp16 loss scaling, no --compile, no sCM jvp=exact (check_cuda_graph
  says so in one line).
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from .. import precond
from ..data import to_device

# Testing hook: CMFAST_CUDA_GRAPH=eager runs GraphedStep without capturing (the CPU tests of the loop's graph path:
# static buffers, input updates, checkpoints and resume). Not for users: a CPU run gains nothing from it.
HOOK_ENV = "CMFAST_CUDA_GRAPH"
WARMUP_STEPS = 3        # eager runs of the step on a side stream before capture (cuDNN / Triton choices, allocator)


def grad_norm(params: list, max_norm: float = 0.0) -> torch.Tensor:
    """The gradients' total 2-norm (a device tensor: no host sync), the step's gradient statistic; with max_norm > 0 the
    gradients are clipped to it (clip_grad_norm_). Without clipping (cmfast-train's default) the norm alone:
    clip_grad_norm_(params, inf) also multiplied every gradient by 1.0, a pass over all of them each step."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)      # torch >= 2.6
    if max_norm > 0 or get_total_norm is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return get_total_norm([p.grad for p in params if p.grad is not None])


def _hook_eager() -> bool:
    return os.environ.get(HOOK_ENV) == "eager"


def check_cuda_graph(cfg: dict, method, world: int) -> None:
    """One-line ValueErrors, when the config is resolved (so --dry-run tells them too), for what --cuda-graph cannot
    capture. The device is checked by the run (check_cuda_graph_device)."""
    if not cfg.get("cuda_graph"):
        return
    from .methods import METHODS
    if not method.graph_safe:
        able = ", ".join(sorted(n for n, m in METHODS.items() if m.graph_safe))
        raise ValueError(f"--cuda-graph: --method {method.name} has no CUDA-graph step (methods with one: {able})")
    why = method.graph_refusal(cfg)
    if why:
        raise ValueError(f"--cuda-graph with --method {method.name}: {why}")
    if world > 1:
        raise ValueError(f"--cuda-graph: one process only (the gradients' all-reduce of {world} ranks is not "
                         "captured); run without torchrun or without --cuda-graph")
    if cfg["batch_gpu"] != cfg["batch_size"]:
        raise ValueError(f"--cuda-graph: gradient accumulation (--batch-gpu {cfg['batch_gpu']} of a batch of "
                         f"{cfg['batch_size']}) is not captured; drop --batch-gpu or --cuda-graph")
    if cfg["precision"] == "fp16":
        raise ValueError("--cuda-graph: fp16's loss scaling decides on the host each step; use --precision bf16 "
                         "or fp32")
    if cfg["compile"] != "none":
        raise ValueError(f"--cuda-graph with --compile {cfg['compile']}: the two capture the step differently; "
                         "choose one")


def check_cuda_graph_device(cfg: dict, device: torch.device) -> None:
    if cfg.get("cuda_graph") and device.type != "cuda" and not _hook_eager():
        raise ValueError(f"--cuda-graph: CUDA graphs need a CUDA device, got {device}; run without --cuda-graph")


class GraphedStep:
    """The step's forward, loss, backward and gradient clipping as one CUDA graph (see the module's text).

    step(x, y, k) -> (loss sum over the batch (), gradient norm (), info): copies the batch into the static input,
    the method's step inputs into theirs (only those that changed), and replays. The first call warms up on a side
    stream and captures. Gradients stay in the graph's buffers (p.grad): the optimizer step reads them; the loop
    must not set them to None. The returned tensors are the graph's outputs, rewritten by the next replay."""

    def __init__(self, method, models: dict, cfg: dict, params: list, autocast_dtype=None, capture: bool = True):
        self.method, self.models, self.cfg, self.params = method, models, cfg, params
        self.autocast_dtype, self.capture = autocast_dtype, capture and not _hook_eager()
        self.x = self.y = self.inputs = self.host = None
        self.graph = self.out = None

    def _set_inputs(self, step: int, device: torch.device) -> dict:
        host, info = self.method.graph_inputs(step, self.cfg)
        if self.inputs is None:     # a copy even on the host's device: the tables are shared (_level_table's cache)
            self.inputs = {k: v.to(device, copy=True) for k, v in host.items()}
        else:
            if host.keys() != self.inputs.keys():
                raise RuntimeError(f"{self.method.name}.graph_inputs changed its keys: {sorted(host)}")
            for k, v in host.items():
                if v.shape != self.inputs[k].shape:     # a shape baked into the graph
                    raise RuntimeError(f"{self.method.name}.graph_inputs: {k} changed shape "
                                       f"{tuple(self.inputs[k].shape)} -> {tuple(v.shape)}")
                if not torch.equal(v, self.host[k]):   # (sCT's r: every step of its warm-up)
                    self.inputs[k].copy_(to_device(v, device))
        self.host = host
        return info

    def _set_batch(self, x: torch.Tensor, y) -> None:
        if self.x is None:
            self.x, self.y = x.clone(), None if y is None else y.clone()
            return
        if x.shape != self.x.shape:
            raise RuntimeError(f"--cuda-graph: batch of shape {tuple(x.shape)}, the graph's is {tuple(self.x.shape)}")
        self.x.copy_(x)
        if y is not None:
            self.y.copy_(y)

    def _body(self):
        dev = self.x.device.type
        amp = torch.autocast(dev, self.autocast_dtype, cache_enabled=False) if self.autocast_dtype else nullcontext()
        with amp, precond.skip_value_checks():     # as the eager step (the capture leaves them out anyway)
            loss_vec = self.method.graph_loss(self.models, self.x, self.inputs, self.cfg, self.y)
            loss = loss_vec.float().mean()
        loss.backward()
        gnorm = grad_norm(self.params, self.cfg["grad_clip"] or 0.0)
        return loss.detach() * loss_vec.shape[0], gnorm.float()

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._clear_grads()
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self._clear_grads()          # the capture's backward allocates the gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self._body()
        except Exception as e:      # noqa: BLE001  (one line first; the cause stays chained)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise RuntimeError(f"--cuda-graph: capturing the {self.method.name} step failed ({type(e).__name__}: "
                               f"{first}); run without --cuda-graph") from e
        self.graph, self.out = graph, out

    def __call__(self, x: torch.Tensor, y, step: int):
        info = self._set_inputs(step, x.device)
        self._set_batch(x, y)
        if not self.capture:
            self._clear_grads()
            return (*self._body(), info)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return (*self.out, info)
