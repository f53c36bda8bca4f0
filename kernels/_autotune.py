"""Autotuning in one place.

On a GPU, `autotune` is `triton.autotune` over a small config list, pruned by the shapes that matter before
any config is timed, with the timings kept on disk in Triton's cache (triton >= 3.2: `cache_results`), so that only
the first process on a machine pays for them (`CMFAST_TRITON_AUTOTUNE_CACHE=0` times every process anew). Under TRITON_INTERPRET=1 (CPU tests) there is no driver to time configs with
(`triton.autotune` fails with "0 active drivers"), so the kernel runs with one fixed config instead.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (checked when a kernel module is imported, as
    triton.jit itself does)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host-side launch geometry. triton.cdiv and triton.next_power_of_2 are constexpr-function
    objects in recent triton, ~1.5 us a call through their wrapper on this CPU; a GroupNorm call's plan made 7 such
    calls, a third of its Python time without the launch."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as triton.next_power_of_2, without its wrapper."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device: how many programs it takes to fill it. 1 when not on CUDA:
    the interpreter runs programs one after another, so fewer, larger ones are faster (tests that exercise the
    split reductions patch this)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 1


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    """Asked once per device: get_device_properties is a few microseconds of Python on every GroupNorm call's plan."""
    return torch.cuda.get_device_properties(index).multi_processor_count


class _Fixed:
    """Stand-in for an autotuned kernel: launches `fn` with one config (grid lambdas get its meta-parameters)."""

    def __init__(self, fn, config: dict, fit=None):
        self.fn = fn
        self.config = config
        self.fit = fit      # fit(config, named_args) -> the config to run (a shape may rule the fixed one out)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            cfg = self.config if self.fit is None else \
                self.fit(self.config, {**dict(zip(self.fn.arg_names, args)), **kwargs})
            g = grid(cfg) if callable(grid) else grid
            return self.fn[g](*args, **kwargs, **cfg)
        return launch


class _Switch:
    """An autotuned kernel that, when CMFAST_TRITON_AUTOTUNE=0 (checked per launch), runs one config chosen by
    `default(named_args)` without timing: GPU tests then compile one variant per shape class, not one per config."""

    def __init__(self, fn, tuned, default):
        self.fn, self.tuned, self.default = fn, tuned, default

    def __getitem__(self, grid):
        if os.environ.get("CMFAST_TRITON_AUTOTUNE", "1") != "0":
            return self.tuned[grid]

        def launch(*args, **kwargs):
            cfg = self.default({**dict(zip(self.fn.arg_names, args)), **kwargs})
            g = grid(cfg.kwargs) if callable(grid) else grid
            return self.fn[g](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return launch


def disk_cache() -> dict:
    """triton.autotune's keyword that keeps the timings on disk, where this triton has it and it is not turned off.
    Triton keys the file on its version, the GPU target (architecture), the kernel's source, the tuning key and the
    config list, so a changed kernel or config list is timed again."""
    if os.environ.get("CMFAST_TRITON_AUTOTUNE_CACHE", "1") == "0":
        return {}
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


# The tuner's time per config and shape (ms): triton's default benchmark (25 ms of warm-up, 100 ms of repetitions)
# made ~0.13 s per candidate, and a cold GPU machine tunes every candidate of every shape a run meets (H200 session 4:
# the first 10 steps of a Fashion-MNIST iCT run took 33.6 s, 1.3 s before the GroupNorm kernels were tuned). 20 ms
# still repeats a 0.1 ms kernel ~200 times and a 2 ms one ~10.
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 20


def _tune_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


def bench_kwargs() -> dict:
    """triton.autotune's keyword for the shorter per-config benchmark, where this triton has it (>= 3.2)."""
    return {"do_bench": _tune_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}


def autotune(configs: list[triton.Config], key: list[str], interpret_config: dict, prune=None, default=None,
             interpret_prune: bool = False):
    """Decorator (under @triton.jit): autotune over `configs` keyed on `key` (the autotuner also keys on the
    argument dtypes); `prune(configs, named_args)` drops configs that cannot fit or would waste work for the
    shape; `interpret_config` (meta-parameters only) is used under TRITON_INTERPRET=1 (interpret_prune: unless
    `prune` rules it out for the shape, then the first config `prune` keeps); `default(named_args)` gives the
    config used without timing when CMFAST_TRITON_AUTOTUNE=0."""
    def deco(fn):
        if interpreting():
            def fit(cfg, named):
                return prune([triton.Config(cfg)] + configs, named)[0].kwargs
            return _Fixed(fn, interpret_config, fit if interpret_prune and prune else None)
        # The autotuner passes positional arguments as `named` and keyword arguments separately: merge them.
        kw = {"prune_configs_by": {"early_config_prune": lambda cs, named, **kws: prune(cs, {**named, **kws})}} \
            if prune else {}
        tuned = triton.autotune(configs=configs, key=key, **kw, **disk_cache(), **bench_kwargs())(fn)
        return _Switch(fn, tuned, default) if default else tuned
    return deco
