"""The CUDA-graph sampler: all of Algorithm 1 (CM paper) -- noise, network, skip output, clamp, uint8 -- in one graph.

One replay launches every kernel of a sample with a single host call, so batch-1 latency is the GPU's, not
Python's. The noise is drawn inside the graph from a private CUDA generator registered with each graph
(graph-safe Philox: every replay advances the generator's offset, so each call gives new samples; `seed=`
re-seeds it, and replay k after manual_seed(s) draws what eager call k would).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from . import ops
from .nets.unet import check_class_indices
from .precond import noise_conditioning, scalings
from .sampling import _check_flag, check_sigmas, eval_mode
from .schedules import as_integer

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cast_copy(net: nn.Module, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """An eval-mode copy whose matrices/kernels, and the biases and FIR filters of its convolutions and linear layers,
    are stored in `dtype`: autocast would cast each of them on every call (it casts them to `dtype` anyway: the same
    numbers), one copy kernel apiece, 145 of a batch-1 forward's 711 kernels on the H200 profile. The GroupNorm affine
    and the embedding's frequencies stay fp32 (their math is fp32)."""
    from .nets.layers import Conv2d
    twin = copy.deepcopy(net).eval().requires_grad_(False)
    if channels_last:
        twin = twin.to(memory_format=torch.channels_last)
    for p in twin.parameters():
        if p.dim() >= 2 and p.is_floating_point():
            p.data = p.data.to(dtype)
    if dtype != torch.float32:
        for m in twin.modules():
            if isinstance(m, (nn.Linear, Conv2d)) and m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
            if isinstance(m, Conv2d) and m.resample_filter is not None:
                m.resample_filter = m.resample_filter.to(dtype)
    return twin


def _cuda_device(net: nn.Module) -> torch.device:
    """The CUDA device the network lives on, or one clear error."""
    if not torch.cuda.is_available():
        raise RuntimeError("GraphedSampler needs a CUDA device (CUDA graphs); none is available here")
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        raise RuntimeError(f"GraphedSampler needs torch >= 2.5 (graph-safe generators), got {torch.__version__}")
    p = next(net.parameters(), None)
    if p is None or p.device.type != "cuda":
        raise ValueError(f"GraphedSampler needs the model on a CUDA device, got parameters on "
                         f"{p.device if p is not None else 'no device'}: move it with model.cuda()")
    return p.device


def _check_seed(seed) -> int | None:
    """None or an integer of any kind (numpy's too), as an int: a string or a float failed inside
    torch.Generator.manual_seed, after the model's weights were copied (at construction) or the graph captured."""
    if seed is None:
        return None
    k = as_integer(seed)
    if k is None:
        raise TypeError(f"seed: expected an integer or None, got {seed!r}")
    return k


def _flat(tree) -> list[torch.Tensor]:
    """The tensors of a nest of lists / tuples, in order (None skipped)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _flat(item)]
    return []


def _is_compiled(net: nn.Module) -> bool:
    return hasattr(net, "_orig_mod")     # torch._dynamo's OptimizedModule


class _Graph:
    """Static buffers and the captured graph for one (batch size, output dtype, ops backend)."""

    def __init__(self, batch_size: int, shape, n_steps: int, labels: bool, device):
        B = batch_size
        self.z = torch.zeros((B, *shape), device=device)                               # N(0, I), drawn in graph
        self.noise = [torch.zeros_like(self.z) for _ in range(n_steps - 1)]            # Alg. 1 line 5 noise
        self.labels = torch.zeros(B, dtype=torch.long, device=device) if labels else None
        self.sig: list[torch.Tensor] = []                                              # (B,) fp32 per step
        self.consts: list | None = None          # per step: the blocks' constants at that step's sigma, or None
        self.c_in: list[torch.Tensor] = []       # per step: c_in(sigma), (B, 1, 1, 1) fp32
        self.out = None
        self.graph = None


def is_skip_parameterized(model: nn.Module) -> bool:
    """Whether `model` computes c_skip x + c_out F(c_in x, ln(sigma) / 4): a ConsistencyModel or an EDMDenoiser."""
    from .precond import _Preconditioned
    return isinstance(model, _Preconditioned)


def is_graphable(model: nn.Module) -> bool:
    """Whether GraphedSampler computes `model`: a skip-parameterized one, or a TrigFlow model (sCT / sCD), which in
    the VE convention is one too (below)."""
    from .trigflow import TrigFlowModel
    return is_skip_parameterized(model) or isinstance(model, TrigFlowModel)


class _TrigFlowAsSkip:
    """A TrigFlow model (cmfast.trigflow) as the skip parameterization the graph computes. At x_sigma, with
    t = atan(sigma / sd), its f is cos(t) x_t - sin(t) sd B(x_t / sd, c_noise(t)), x_t = cos(t) x_sigma, B its
    backbone's output: cos^2 t = sd^2 / (sigma^2 + sd^2) is EDM's c_skip, sd sin t = sigma sd / sqrt(sigma^2 + sd^2)
    its c_out, and cos(t) / sd = 1 / sqrt(sigma^2 + sd^2) its c_in, all with sigma_min = 0 in them. So f = c_skip x +
    c_out (-B)(c_in x, c_noise(atan(sigma / sd))): the skip output of the negated backbone (the network's own output
    for time_input 'edm', whose backbone negates it)."""

    def __init__(self, model):
        self.model, self.negate = model, model.time_input != "edm"

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.model.c_noise(torch.atan(sigma / self.model.sigma_data))


class GraphedSampler:
    """cmfast.GraphedSampler(model, batch_size, shape, dtype=torch.bfloat16, sigmas=(80.0,)); CUDA only. The model:
    a ConsistencyModel, or a TrigFlow model (sCT / sCD; computed as _TrigFlowAsSkip says).

    sampler(seed=None, class_labels=None, batch_size=None, uint8=False) -> fresh images (B, *shape): float32 in
    [-1, 1], or uint8 bytes. Each (batch size, output dtype, ops backend) is captured once, on first use, after
    a warm-up on a side stream (which also runs Triton autotuning and torch.compile outside the capture).
    The backbone runs in `dtype` from a weight copy made here; call reload() after changing the model's weights.
    A torch.compile'd backbone (a mode without CUDA graphs) is used live under autocast instead.
    The noise levels are fixed, so for an unconditional UNet each graph computes what depends on sigma alone (the
    mapping network and every block's embedding terms, UNet.constants) once, outside the replay.
    """

    def __init__(self,
                 model: nn.Module,               # A ConsistencyModel, or a TrigFlow model (sCT / sCD).
                 batch_size: int,                # Default batch size (others are captured on demand).
                 shape,                          # One sample's (C, H, W).
                 dtype: torch.dtype = torch.bfloat16,  # Backbone precision; the skip output is always fp32.
                 sigmas=(80.0,),                 # Algorithm 1 noise levels, strictly decreasing.
                 seed: int | None = None,        # Generator seed (None: a non-deterministic one).
                 channels_last: bool = True,     # Run the convolutions NHWC (faster tensor-core convs).
                 warmup: int = 3,                # Eager runs on a side stream before each capture.
                 clip_denoised: bool = False):   # Clamp each step's output to [-1, 1] (as cmfast.sample's).
        if not is_graphable(model):
            raise TypeError(f"model: expected a cmfast.ConsistencyModel or a TrigFlow model (sCT / sCD), got "
                            f"{type(model).__name__}; sample other models with cmfast.sample (engine 'eager')")
        self.batch_size = self._check_batch(batch_size)
        shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else shape
        if not (isinstance(shape, tuple) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape)):
            raise ValueError(f"shape: expected one sample's (C, H, W) as three positive ints, got {shape!r}")
        net = model.net
        want = (getattr(net, "in_channels", shape[0]), getattr(net, "img_resolution", shape[1]),
                getattr(net, "img_resolution", shape[2]))
        if shape != want:
            raise ValueError(f"shape: expected {want} for this network, got {shape}")
        if dtype not in _DTYPES:
            raise TypeError(f"dtype: expected torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
        self.sigmas = check_sigmas(sigmas, model.sigma_min, model.sigma_max)
        seed = _check_seed(seed)
        self.model, self.shape, self.dtype, self.device = model, shape, dtype, _cuda_device(net)
        self.sigma_data, self.sigma_min = float(model.sigma_data), float(model.sigma_min)
        # A TrigFlow model is computed as a skip-parameterized one (_TrigFlowAsSkip): sigma_min 0 in its scalings, its
        # own time input, its backbone's output negated
        self._trig = None if is_skip_parameterized(model) else _TrigFlowAsSkip(model)
        self._boundary = 0.0 if self._trig else float(getattr(model, "_boundary", model.sigma_min))  # in c_skip, c_out
        self.channels_last, self.warmup = channels_last, int(warmup)
        self.clip_denoised = _check_flag(clip_denoised, "clip_denoised")
        self.label_dim = int(getattr(getattr(net, "_orig_mod", net), "label_dim", 0) or 0)
        if _is_compiled(net):
            self.net = net              # live weights, cast by autocast inside the graph; eval mode while captured
        else:
            self.net = _cast_copy(net, dtype, channels_last)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed) if seed is not None else self.generator.seed()
        self._graphs: dict[tuple, _Graph] = {}

    @staticmethod
    def _check_batch(batch_size) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        return batch_size

    @torch.no_grad()
    def reload(self) -> None:
        """Copy the model's current weights into the sampler's cast copy (in place: the graphs stay valid)."""
        if self.net is self.model.net:
            return
        for mine, theirs in zip(self.net.parameters(), self.model.net.parameters()):
            mine.copy_(theirs)
        for g in self._graphs.values():
            if g.consts is not None:
                for dst, src in zip(_flat(g.consts), _flat(self._constants(g))):
                    dst.copy_(src)

    # ---- Constants: what the network computes from sigma alone ------------------------------------------------
    def _folds(self) -> bool:
        """Whether the blocks' constants are computed once per graph: the noise levels are fixed, so for an
        unconditional UNet the mapping network and every block's embedding layer (35 GEMMs and about 65 small
        kernels of a DDPM++ batch-1 sample) give the same numbers on every replay."""
        return self.label_dim == 0 and not _is_compiled(self.net) and hasattr(self.net, "constants")

    def _constants(self, g: _Graph) -> list:
        cast = self.dtype != torch.float32
        out = []
        for s in g.sig:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=cast, cache_enabled=False):
                out.append(self.net.constants(self._c_noise(s), None, self.dtype))
        return out

    def _c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        """The backbone's time input at sigma: ln(sigma) / 4 (EDM), or the TrigFlow model's c_noise(t)."""
        return self._trig.c_noise(sigma) if self._trig else noise_conditioning(sigma)

    def _prepare(self, g: _Graph) -> None:
        """Fill the graph's constants (before its warm-up and capture)."""
        if g.consts is None and self._folds():
            g.consts = self._constants(g)

    # ---- The captured computation: Algorithm 1 with the sampler epilogue fused in the last step -----------------
    def _backbone(self, x: torch.Tensor, sigma: torch.Tensor, c_in: torch.Tensor, labels, consts=None):
        """F(c_in x, c_noise) in self.dtype (EDM Table 1 scalings, fp32); c_in: sigma's input scaling (B, 1, 1, 1),
        computed once per graph; consts: the blocks' constants at sigma (None: the network computes them). A TrigFlow
        model's output negated (_TrigFlowAsSkip)."""
        if self.channels_last:      # the scaling writes the NHWC copy the convolutions want: one kernel, not two
            x_in = torch.mul(x, c_in, out=torch.empty_like(x, memory_format=torch.channels_last))
        else:
            x_in = c_in * x
        cast = self.dtype != torch.float32       # no autocast cache: a cached cast would outlive the capture
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=cast, cache_enabled=False):
            if consts is not None:
                F = self.net(x_in, None, None, constants=consts)
            else:
                F = self.net(x_in, self._c_noise(sigma), labels)
        return -F if self._trig and self._trig.negate else F

    def _run(self, g: _Graph, sig: list[torch.Tensor], uint8: bool) -> torch.Tensor:
        g.z.normal_(generator=self.generator)
        x = self.sigmas[0] * g.z                                       # x_T = T z
        for k, s in enumerate(self.sigmas):
            if k:   # Alg. 1: x_tau = x + sqrt(tau^2 - eps^2) z
                g.noise[k - 1].normal_(generator=self.generator)
                x = x + math.sqrt(s * s - self.sigma_min ** 2) * g.noise[k - 1]
            F = self._backbone(x, sig[k], g.c_in[k], g.labels, None if g.consts is None else g.consts[k])
            if k == len(self.sigmas) - 1:
                return ops.skip_output_infer(x, F, sig[k], self.sigma_data, self._boundary, uint8)
            x = ops.skip_output(x, F, sig[k], self.sigma_data, self._boundary)
            if self.clip_denoised:      # (the last step's output is clamped by skip_output_infer)
                x = x.clamp_(-1, 1)

    def _buffers(self, batch_size, uint8: bool):
        B = self.batch_size if batch_size is None else self._check_batch(batch_size)
        key = (B, bool(uint8), ops.get_backend())
        g = self._graphs.get(key)
        if g is None:
            g = _Graph(B, self.shape, len(self.sigmas), self.label_dim > 0, self.device)
            g.sig = [torch.full((B,), s, dtype=torch.float32, device=self.device) for s in self.sigmas]
            g.c_in = [scalings(s, self.sigma_data, self._boundary)[2].reshape(-1, 1, 1, 1) for s in g.sig]
        return key, g

    @torch.no_grad()
    def capture(self, batch_size: int | None = None, uint8: bool = False) -> _Graph:
        """Warm up and capture the graph for this batch size (done by the first call that needs it)."""
        key, g = self._buffers(batch_size, uint8)
        if g.graph is not None:
            return g
        self._prepare(g)
        state = self.generator.get_state()
        # On the network's device (a model on cuda:1 is captured on cuda:1's streams), in eval mode (a compiled
        # network is the caller's own module: its mode is restored after), and the warm-up draws do not count, even
        # when the capture fails.
        with torch.cuda.device(self.device), eval_mode(self.net):
            try:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):      # warm-up: autotuning, compilation, cuDNN plans, allocator pools
                    for _ in range(max(self.warmup, 1)):
                        self._run(g, g.sig, uint8)
                torch.cuda.current_stream(self.device).wait_stream(side)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                graph.register_generator_state(self.generator)
                with torch.cuda.graph(graph):
                    g.out = self._run(g, g.sig, uint8)
            finally:
                self.generator.set_state(state)
        g.graph = graph
        self._graphs[key] = g
        return g

    def _set_labels(self, g: _Graph, class_labels) -> None:
        B = g.z.shape[0]
        if g.labels is None:
            if class_labels is not None:
                raise ValueError("class_labels: this network is unconditional, got labels")
            return
        if class_labels is None:
            raise ValueError(f"class_labels: this network is conditional on {self.label_dim} classes; "
                             f"expected ({B},) integer labels")
        labels = torch.as_tensor(class_labels)
        if labels.shape != (B,):
            raise ValueError(f"class_labels: expected ({B},) integer labels, got {labels.dtype} {tuple(labels.shape)}")
        # Values checked here, on the host (one sync for CUDA labels), where the UNet checks CPU labels only:
        # inside the replay, one_hot's device-side assert would end the process's CUDA context.
        check_class_indices(labels, self.label_dim)
        g.labels.copy_(labels)

    @torch.no_grad()
    def __call__(self, seed: int | None = None, class_labels=None, batch_size: int | None = None,
                 uint8: bool = False) -> torch.Tensor:
        seed = _check_seed(seed)
        g = self.capture(batch_size, uint8)
        self._set_labels(g, class_labels)
        if seed is not None:
            self.generator.manual_seed(seed)
        g.graph.replay()
        return g.out.clone()      # fresh: the next replay overwrites g.out

    @torch.no_grad()
    def _run_uncaptured(self, seed=None, class_labels=None, batch_size=None, uint8=False) -> torch.Tensor:
        """The same computation without a graph (tests check the algorithm with it on CPU)."""
        seed = _check_seed(seed)
        _, g = self._buffers(batch_size, uint8)
        self._prepare(g)
        self._set_labels(g, class_labels)
        if seed is not None:
            self.generator.manual_seed(seed)
        with eval_mode(self.net):
            return self._run(g, g.sig, uint8)
