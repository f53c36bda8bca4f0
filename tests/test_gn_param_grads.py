"""kernels.group_norm_act.group_norm_param_grads, the GroupNorm parameters' gradients from the backward's per-(sample,
channel) sums A, B in one launch (it replaced up to 11 torch ops in the triton backend's backward): against a float64
transcription, for every combination of operands and gradients, strided A and B, batch and channel counts that are
not multiples of the blocks, and the parameters' dtypes. The op-level gradients (tests/test_ops_triton.py) go
through it too. Runs in the Triton interpreter on CPU, compiled on a GPU."""
import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from cmfast.kernels.group_norm_act import group_norm_param_grads  # noqa: E402
from cmfast.ops._triton import _gn_param_grads_torch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.triton_cpu


def _ref(A, B, weight, bias, scale):
    """float64: z = (xhat w + b)(1 + scale) + shift, so dw = sum_n B (1 + s), db = sum_n A (1 + s), dscale = B w + A b,
    dshift = A."""
    A, B = A.double(), B.double()
    s1 = 1 + scale.double() if scale is not None else torch.ones_like(A)
    dsc = B * (weight.double() if weight is not None else 1) + (A * bias.double() if bias is not None else 0)
    return (B * s1).sum(0), (A * s1).sum(0), dsc, A


def _inputs(N, C, scale_dtype=torch.bfloat16, param_dtype=torch.float32, strided=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ab = torch.randn(N, C, 2, generator=g)          # A and B as the backward makes them: views of one (N, C, 2)
    A, B = (ab[..., 0], ab[..., 1]) if strided else (ab[..., 0].contiguous(), ab[..., 1].contiguous())
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(param_dtype)
    b = (0.5 * torch.randn(C, generator=g)).to(param_dtype)
    sc = (0.3 * torch.randn(N, C, generator=g)).to(scale_dtype)
    sh = torch.zeros(N, C, dtype=scale_dtype)
    return [t.to(DEV) for t in (A, B, w, b, sc, sh)]


def _check(got, want, dtype, n_terms):
    # fp32 sums of n_terms products, then one rounding to dtype
    tol = torch.finfo(dtype).eps * 2 + 4e-7 * n_terms ** 0.5
    scale = want.abs().max().item() + 1e-6
    assert got.dtype == dtype
    assert (got.double().cpu() - want.cpu()).abs().max().item() <= tol * scale, (got, want)


@pytest.mark.parametrize("has_w, has_b, has_scale", list(itertools.product([True, False], repeat=3)))
def test_every_operand_combination(has_w, has_b, has_scale):
    N, C = 37, 70                 # neither a multiple of the blocks
    A, B, w, b, sc, sh = _inputs(N, C)
    w, b, sc = (w if has_w else None), (b if has_b else None), (sc if has_scale else None)
    want = _ref(A, B, w, b, sc)
    for need in itertools.product([True, False], repeat=4):
        need = (need[0] and has_w, need[1] and has_b, need[2] and has_scale, need[3] and has_scale)
        got = group_norm_param_grads(A, B, w, b, sc, sh if has_scale else None, *need)
        for g, k, ok, dt in zip(got, range(4), need, (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16)):
            if not ok:
                assert g is None
            else:
                _check(g, want[k], dt, N if k < 2 else 3)


@pytest.mark.parametrize("N, C", [(1, 3), (2, 128), (256, 64), (5, 300)])
@pytest.mark.parametrize("strided", [True, False])
def test_shapes_and_strides(N, C, strided):
    A, B, w, b, sc, sh = _inputs(N, C, strided=strided, seed=N + C)
    if strided:     # scale as the UNet gives it: a chunk of the embedding's (N, 2C) output, read in place
        sc = torch.cat([sc, torch.zeros_like(sc)], 1)[:, :C]
        assert not sc.is_contiguous() or N == 1
    want = _ref(A, B, w, b, sc)
    got = group_norm_param_grads(A, B, w, b, sc, sh, True, True, True, True)
    for k, dt in enumerate((torch.float32, torch.float32, torch.bfloat16, torch.bfloat16)):
        _check(got[k], want[k], dt, N if k < 2 else 3)


@pytest.mark.parametrize("scale_dtype, param_dtype", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16),
                                                      (torch.bfloat16, torch.float16)])
def test_dtypes_follow_the_parameters(scale_dtype, param_dtype):
    A, B, w, b, sc, sh = _inputs(9, 20, scale_dtype, param_dtype)
    want = _ref(A, B, w, b, sc)
    got = group_norm_param_grads(A, B, w, b, sc, sh, True, True, True, True)
    for k, dt in enumerate((param_dtype, param_dtype, scale_dtype, scale_dtype)):
        _check(got[k], want[k], dt, 9 if k < 2 else 3)


def test_the_torch_composition_agrees():
    # the path under torch.func transforms computes the same, to fp32 rounding
    A, B, w, b, sc, sh = _inputs(16, 40)
    k = group_norm_param_grads(A, B, w, b, sc, sh, True, True, True, True)
    t = _gn_param_grads_torch(A, B, w, b, sc, sh, True, True, True, True)
    for u, v in zip(k, t):
        assert u.dtype == v.dtype and u.shape == v.shape
        torch.testing.assert_close(u.float(), v.float(), atol=1e-5, rtol=1e-2 if u.dtype == torch.bfloat16 else 1e-5)
    assert _gn_param_grads_torch(A, B, w, b, sc, sh, False, False, False, False) == (None,) * 4
    assert group_norm_param_grads(A, B, w, b, sc, sh, False, False, False, False) == (None,) * 4


# ---- scale and shift read in place (kernels.group_norm_act._ptrs) ------------------------------------------------
def _run_gn(x, w, b, ss, chunked: bool, G: int):
    """y and the gradients of x, w, b and the (N, 2C) scale-shift leaf, scale and shift given as its two chunks
    (views with row stride 2C, as the UNet's embedding makes them) or as dense copies of them."""
    from cmfast import ops
    x, w, b, ss = (t.detach().clone().requires_grad_(True) for t in (x, w, b, ss))
    scale, shift = ss.chunk(2, dim=1)
    if not chunked:
        scale, shift = scale.contiguous(), shift.contiguous()
    with ops.use_backend("triton"):
        y = ops.group_norm_act(x, G, w, b, 1e-6, scale, shift, "silu")
    y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(y.dtype))
    return [y.detach()] + [t.grad for t in (x, w, b, ss)]


@pytest.mark.parametrize("shape, G, split", [((2, 12, 5, 7), 4, False), ((3, 16, 4, 4), 8, False),
                                             ((2, 12, 5, 7), 4, True)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_chunked_scale_and_shift_read_in_place(monkeypatch, shape, G, split, fmt):
    """The chunks are read where they lie: the same bits as from dense copies (forward and every gradient, the
    one-program-per-group kernels and the split ones), and no copy is made (the count of torch copies)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from cmfast.kernels import group_norm_act as k
    if split:
        monkeypatch.setattr(k, "num_sms", lambda device: 132)
        monkeypatch.setattr(k, "MIN_CHUNK", 8)
        monkeypatch.setattr(k, "TILE", 16)
    g = torch.Generator().manual_seed(1)
    N, C = shape[:2]
    x = torch.randn(*shape, generator=g).to(DEV, torch.bfloat16).contiguous(memory_format=fmt)
    w, b = (1 + 0.3 * torch.randn(C, generator=g)).to(DEV), (0.3 * torch.randn(C, generator=g)).to(DEV)
    ss = (0.3 * torch.randn(N, 2 * C, generator=g)).to(DEV, torch.bfloat16)

    class Copies(TorchDispatchMode):
        """Copies of (N, C) tensors: scale or shift made dense."""
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("clone", "copy_", "_to_copy", "contiguous") and \
                    isinstance(args[0], torch.Tensor) and tuple(args[0].shape) == (N, C):
                Copies.n += 1
            return func(*args, **(kwargs or {}))
    with Copies():
        chunked = _run_gn(x, w, b, ss, True, G)
    assert Copies.n == 0
    with Copies():
        dense = _run_gn(x, w, b, ss, False, G)
    assert Copies.n == 2                # the control: the dense run's own two .contiguous() copies
    for u, v, name in zip(chunked, dense, ("y", "dx", "dw", "db", "dss")):
        assert torch.equal(u, v), name
    assert chunked[4].abs().sum() > 0 and chunked[4][:, C:].abs().sum() > 0


def test_scale_and_shift_of_other_strides_are_copied():
    # unlike strides (or a channel stride != 1) cannot share the kernel's one row stride: dense copies, as before
    from cmfast.kernels.group_norm_act import _ptrs
    x = torch.zeros(2, 4, 3, 3)
    ss = torch.randn(2, 8)
    sc, sh = ss.chunk(2, 1)
    ptrs, s_sn = _ptrs(x, None, None, sc, sh)
    assert ptrs[2] is sc and ptrs[3] is sh and s_sn == 8
    ptrs, s_sn = _ptrs(x, None, None, sc, sh.contiguous())
    assert ptrs[2] is not sc and ptrs[2].is_contiguous() and torch.equal(ptrs[2], sc) and s_sn == 4
    ptrs, s_sn = _ptrs(x, None, None, ss.t().contiguous().t()[:, :4], None)
    assert ptrs[2].is_contiguous() and s_sn == 4
    ptrs, s_sn = _ptrs(x, None, None, None, None)
    assert ptrs[2] is x and ptrs[3] is x and s_sn == 0


def test_training_step_launch_count():
    """The kernels of an eager fmnist-small iCT step's loss and backward with the triton backend (batch 4, plans for
    a 132-SM GPU), counted on CPU by benchmarks/launches.py --train (the step is host-bound on a GPU: each launch is
    host time). 1981 for stop 34's code; the parameters' gradients in one kernel (47 GroupNorm backwards, up to 11
    torch ops each before), scale / shift read in place (126 copies before), no value checks and no multiply by 1.0
    of the gradients make it 1598 (benchmarks/results/launches_train-cpu.json). Dropout counted as CUDA runs it
    (one kernel, not CPU's three; the tool since stop 36): 1514 for stop 35's code; the residual join's backward in
    two kernels (four torch ops before, 25 calls) and no filter casts for the box resampling (16) make it 1448
    (benchmarks/results/launches_train-cpu-s36.json). Fails when launches come back."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import launches
    from cmfast import ConsistencyModel
    from cmfast.nets import UNet
    torch.manual_seed(0)
    counts = launches.count_train_launches(ConsistencyModel(UNet.from_preset("fmnist-small")), 4)
    gn_bwd = counts["triton group_norm_act_bwd_groups_kernel"] + counts["triton group_norm_act_bwd_dx_kernel"]
    assert gn_bwd == 47 and counts["triton group_norm_param_grads_kernel"] == gn_bwd, counts
    assert counts["clone"] <= 16, counts        # (the attention's dense q, k, v, and a few layout copies)
    assert counts["triton residual_bias_grad_kernel"] == 25 and counts["mul"] <= 16, counts
    assert "bernoulli_" not in counts and counts["native_dropout"] == 42, counts
    assert sum(counts.values()) <= 1460, counts


# ---- GPU: compiled ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("N, C", [(256, 256), (1, 64), (37, 70)])
def test_gpu_param_grads_and_in_place_scale_shift(monkeypatch, N, C):
    """The kernel compiled, at the sizes of a training step (batch 256, 256 channels) and odd ones; then the chunked
    scale / shift of a CIFAR-sized GroupNorm through the compiled forward and backward kernels."""
    monkeypatch.setenv("CMFAST_TRITON_AUTOTUNE", "0")
    test_every_operand_combination(True, True, True) if N == 37 else test_shapes_and_strides(N, C, True)
    test_chunked_scale_and_shift_read_in_place(monkeypatch, (8, 128, 16, 16), 32, False, torch.channels_last)


def test_the_multiprocessor_count_is_asked_once_per_device(monkeypatch):
    # every GroupNorm call's plan asks it; the device's properties are read once
    from cmfast.kernels import _autotune
    calls = []

    def props(index):
        calls.append(index)
        return type("P", (), {"multi_processor_count": 132 if index == 0 else 78})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    _autotune._cuda_sms.cache_clear()
    try:
        assert [_autotune.num_sms(torch.device("cuda", i)) for i in (0, 0, 1, 0, 1)] == [132, 132, 78, 132, 78]
        assert calls == [0, 1] and _autotune.num_sms(torch.device("cpu")) == 1
    finally:
        _autotune._cuda_sms.cache_clear()
