"""Count the kernels one graphed sample would launch, on any machine: the sampler's captured computation run
eagerly on CPU, every aten op that does work counted as one launch and every cmfast fused op as one.

    python benchmarks/launches.py [--preset ddpmpp-cifar10] [--batch 1] [--dtype bf16] [--json out.json]
    python benchmarks/launches.py --train triton --preset fmnist-small --batch 256    # an eager training step

At batch 1 a graph replay is launch-bound (the H200 profile: 711 kernels, 2.05 ms of kernel time, 90% busy), so
the count is what the CPU can say about batch-1 latency. It is a model of the GPU launches, not a measurement:
views and allocations launch nothing; a convolution with a bias is two (cuDNN adds the bias in a kernel of its own);
a Triton GroupNorm whose statistics split into a kernel of their own on a GPU with --sms multiprocessors is two; a
layout kernel cuDNN may add is not counted, nor is a copy inside a fused op. For the code the H200 profiled it
counts 681 where the profile counted 711 kernels (with the same 48 GroupNorm statistics kernels).

--train counts the loss and backward of an eager iCT training step (cmfast-train's, before its one host sync), where a
small net is host-bound: each launch costs host time. With the triton backend every Triton kernel launch counts one
(the kernels replaced by counting no-ops), beside the torch ops of the wrappers around them. Dropout counts as
on CUDA: one fused kernel forward (native_dropout) and one backward, where CPU's own composition is three ops.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
import cmfast  # noqa: E402
import cmfast.graphed  # noqa: E402

# Ops that launch no kernel: views, metadata, allocation.
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_local_scalar_dense",
         "is_same_size", "set", "resize", "result_type", "item", "sym_size", "sym_stride", "sym_numel",
         "promote_types"}


class _Counter(TorchDispatchMode):
    def __init__(self, sms: int = 0):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.sms = sms            # > 0: count the Triton GroupNorm's statistics kernel where it splits
        self.depth = 0            # > 0 inside a fused op: its aten ops are its own business

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        ret = func._schema.returns[0].alias_info if func._schema.returns else None
        view = ret is not None and not ret.is_write          # returns a view of an input: no kernel
        if self.depth == 0 and not view and name.rstrip("_") not in _FREE:
            self.counts[name] += 1
            if name == "convolution" and args[2] is not None:
                self.counts["convolution bias add"] += 1      # cuDNN adds the bias in a second kernel
        return out


def _gn_splits(x: torch.Tensor, groups: int, sms: int) -> bool:
    """Whether the Triton GroupNorm forward splits this call's statistics into a kernel of their own on a GPU with
    `sms` multiprocessors (batch x groups too few to fill it)."""
    from cmfast.kernels.group_norm_act import Plan
    return Plan(x, groups, sms).S > 1


@contextlib.contextmanager
def _fused_ops_count_once(counter: _Counter):
    """Each public cmfast.ops call counts as one launch, whatever its torch-backend composition runs."""
    saved = {name: getattr(cmfast.ops, name) for name in cmfast.ops.OPS}

    def wrap(name, fn):
        @functools.wraps(fn)
        def run(*a, **k):
            if counter.depth == 0:
                counter.counts[f"cmfast.{name}"] += 1
                if name == "group_norm_act" and counter.sms and _gn_splits(a[0], a[1], counter.sms):
                    counter.counts["cmfast.group_norm_act statistics"] += 1
            counter.depth += 1
            try:
                return fn(*a, **k)
            finally:
                counter.depth -= 1
        return run
    for name, fn in saved.items():
        setattr(cmfast.ops, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(cmfast.ops, name, fn)


def count_sample_launches(model: cmfast.ConsistencyModel, batch: int, dtype=torch.bfloat16, sigmas=(80.0,),
                          channels_last: bool = True, sms: int = 132) -> collections.Counter:
    """Launch counts of one GraphedSampler replay (its computation, run eagerly on the model's CPU device), the
    Triton GroupNorm's statistics kernels counted as on a GPU with `sms` multiprocessors (132: H100, H200)."""
    real = cmfast.graphed._cuda_device
    cmfast.graphed._cuda_device = lambda net: next(net.parameters()).device
    try:
        shape = (model.net.in_channels, model.net.img_resolution, model.net.img_resolution)
        sampler = cmfast.GraphedSampler(model, batch, shape, dtype=dtype, sigmas=sigmas, seed=0,
                                        channels_last=channels_last)
        _, g = sampler._buffers(None, False)
        sampler._prepare(g)
        counter = _Counter(sms)
        with torch.no_grad(), cmfast.ops.use_backend("torch"), _fused_ops_count_once(counter), counter:
            sampler._run(g, g.sig, False)
        return counter.counts
    finally:
        cmfast.graphed._cuda_device = real


@contextlib.contextmanager
def _dropout_as_on_cuda():
    """F.dropout in training as CUDA runs it: aten's dropout takes the fused native_dropout for a CUDA tensor with
    0 < p < 1 (one kernel, native_dropout_backward one more), where on CPU it composes bernoulli_, div_ and mul."""
    real = torch.nn.functional.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and input.numel() and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return real(input, p, training, inplace)
    torch.nn.functional.dropout = dropout
    try:
        yield
    finally:
        torch.nn.functional.dropout = real


@contextlib.contextmanager
def _environ(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _counted_triton_kernels(counter: _Counter, sms: int):
    """Every Triton kernel of cmfast.kernels replaced by one that counts its launch and computes nothing (its outputs
    stay as allocated): the wrappers' own torch ops still run and count, as they launch on a GPU. GroupNorm plans for
    a GPU with `sms` multiprocessors."""
    class Counted:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                counter.counts[f"triton {self.name.lstrip('_')}"] += 1
            return launch
    return H.replaced_triton_kernels(Counted, sms)


def count_train_launches(model: cmfast.ConsistencyModel, batch: int, dtype=torch.bfloat16, backend: str = "triton",
                         sms: int = 132, num_scales: int = 80) -> collections.Counter:
    """Launch counts of the loss and backward of one eager iCT training step (cmfast-train's step before its one
    host sync, the optimizer and the EMA; the gradient norm included), run on the model's CPU device. Backend
    'triton': each Triton kernel launch is one (the kernels replaced by counting no-ops), with the torch ops of the
    wrappers and the autograd Functions around them; 'torch': the aten ops."""
    from cmfast import precond
    from cmfast.objectives import ict_loss
    from cmfast.training.cuda_graph import grad_norm
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend: expected 'triton' or 'torch', got {backend!r}")
    res, C = model.net.img_resolution, model.net.in_channels
    x = torch.rand(batch, C, res, res) * 2 - 1
    params = [p for p in model.parameters() if p.requires_grad]
    counter = _Counter(sms)
    kernels = _counted_triton_kernels(counter, sms) if backend == "triton" else contextlib.nullcontext()
    # the triton backend takes CPU tensors only as the interpreter's (its kernels here are the counting no-ops)
    env = {"TRITON_INTERPRET": "1"} if backend == "triton" else {}
    with _environ(env), cmfast.ops.use_backend(backend), kernels, _dropout_as_on_cuda(), counter:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), precond.skip_value_checks():
            loss = ict_loss(model, x, num_scales).mean()
        loss.backward()
        grad_norm(params)
    return counter.counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="ddpmpp-cifar10")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--steps", type=int, default=1, help="Algorithm 1 steps (sigmas 80, then 0.821)")
    p.add_argument("--sms", type=int, default=132, help="multiprocessors of the GPU modelled (H100 / H200: 132)")
    p.add_argument("--train", choices=("triton", "torch"), default=None,
                   help="count an eager iCT training step's loss and backward with this backend instead of a sample")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = cmfast.ConsistencyModel(cmfast.UNet.from_preset(a.preset)).eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    sigmas = (80.0, 0.821)[:a.steps] if a.steps <= 2 else tuple(80.0 * 0.5 ** k for k in range(a.steps))
    if a.train:
        counts = count_train_launches(model.train(), a.batch, dtype, a.train, sms=a.sms)
        what = f"eager iCT training step ({a.train}), loss and backward"
    else:
        counts = count_sample_launches(model, a.batch, dtype, sigmas, sms=a.sms)
        what = f"{a.steps} step(s), a graph replay"
    total = sum(counts.values())
    print(f"{a.preset} batch {a.batch} {a.dtype} {what}: {total} launches (CPU model)")
    for name, n in counts.most_common():
        print(f"  {n:5d}  {name}")
    if a.json:
        a.json.write_text(json.dumps({"preset": a.preset, "batch": a.batch, "dtype": a.dtype, "steps": a.steps,
                                      "train": a.train, "total": total, "counts": dict(counts.most_common())},
                                     indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
