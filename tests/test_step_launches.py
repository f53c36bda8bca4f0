"""Launches of the eager training step that the CPU can count (the step is host-bound on a GPU: each launch is host
time): the resampling layers' filter casts, and how benchmarks/launches.py models dropout."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _checks import AtenOps
from cmfast.nets.layers import Conv2d

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def _cast_shapes(ops: AtenOps) -> list:
    """The shapes of the tensors each recorded _to_copy converted."""
    return [tuple(args[0].shape) for name, args in ops.calls if name == "_to_copy"]


@pytest.mark.parametrize("kw", [dict(up=True), dict(down=True), dict(down=True, kernel=0)],
                         ids=["up", "down", "resample-only"])
@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)], ids=["box", "fir"])
def test_resampling_casts_its_filter_only_where_it_uses_it(kw, taps):
    """DDPM++'s [1, 1] box filter resamples by pooling / a nearest copy and needs no filter tensor: a bf16 call casts
    the weight and bias, not the filter (a launch per call, 16 an fmnist-small iCT step). The FIR filter of NCSN++
    is cast (it convolves). Outputs against the same layer in float64."""
    kernel = kw.pop("kernel", 3)
    torch.manual_seed(0)
    conv = Conv2d(4, 6 if kernel else 4, kernel, resample_filter=taps, **kw)
    x = torch.randn(2, 4, 8, 8)
    with AtenOps() as ops:
        y = conv(x.bfloat16())
    filt = tuple(conv.resample_filter.shape)
    assert (filt in _cast_shapes(ops)) == (taps != (1, 1)), _cast_shapes(ops)
    want = conv.double()(x.double())
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)


def test_fused_down_sampling_still_casts_its_filter():
    # fused_resample with down (EDM's order: convolution, then the filter as a strided depthwise convolution)
    conv = Conv2d(4, 6, 3, down=True, fused_resample=True)
    with AtenOps() as ops:
        conv(torch.randn(2, 4, 8, 8).bfloat16())
    assert tuple(conv.resample_filter.shape) in _cast_shapes(ops)


def test_launch_model_counts_dropout_as_cuda_runs_it():
    """benchmarks/launches.py counts F.dropout in training as CUDA's one fused kernel (native_dropout) and its one
    backward, where CPU composes three ops (bernoulli_, div_, mul): the same numbers (the same mask for a seed is not
    promised, the scaling is), and eval mode or p = 0 left alone."""
    import launches
    x = torch.randn(64, 8, requires_grad=True)
    real = F.dropout
    with launches._dropout_as_on_cuda():
        counter = launches._Counter()
        with counter:
            y = F.dropout(x, 0.25, True)
            y.sum().backward()
        assert F.dropout(x, 0.25, False) is x and torch.equal(F.dropout(x, 0.0, True), x)
    assert counter.counts["native_dropout"] == 1 and counter.counts["native_dropout_backward"] == 1
    assert not {"bernoulli_", "div_"} & set(counter.counts), counter.counts
    kept = y != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(y[kept], x.detach()[kept] / 0.75)
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    assert F.dropout is real and "bernoulli_" in _composition()        # restored


def _composition():
    """The aten ops of a plain F.dropout call on CPU (after the counter restored it)."""
    with AtenOps() as ops:
        F.dropout(torch.randn(8), 0.5, True)
    return ops.names
