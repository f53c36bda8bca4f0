"""CUDA C++ kernels (csrc/, backend 'cuda') against the float64 references of tests/reference.py: forward and every
gradient, NCHW and channels-last, fp32/fp16/bf16, odd shapes (batch 1, C not a power of two, odd H*W), aligned
(16-byte vector) and misaligned (scalar) paths, forced split counts, streams, graphs, determinism.

Tolerance and poisoning: tests/_checks.py (2x PyTorch's own error + four ulps at the output's scale; every torch.empty*
the wrappers call returns NaN-filled memory). GPU only: the module is built (or JIT-compiled, ~30 s) by the first
test.
"""
import functools

import pytest
import torch

import _checks
import reference as ref
from _checks import DTYPES, ULP
from cmfast import ops
from cmfast.ops import _cuda

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
CL = torch.channels_last
NCHW = torch.contiguous_format


@pytest.fixture(scope="module", autouse=True)
def extension():
    return _cuda._ext(torch.device(DEV))  # a build failure shows here once, with nvcc's first line


def run(backend, fn, inputs: dict, grad: tuple, dy=None):
    """Output and the gradients of the `grad` inputs under `backend`, poisoned for cuda; inputs not re-aligned."""
    with ops.use_backend(backend):
        return _checks.run(fn, inputs, grad, dy, poison=backend == "cuda")


def check(fn, reffn, inputs: dict, grad=(), dtype=torch.float32, backward=True):
    return _checks.check(functools.partial(run, "cuda", fn), functools.partial(run, "torch", fn), reffn, inputs,
                         grad, dtype, backward, label="cuda")


rand = functools.partial(_checks.rand, device=DEV)


# ---- skip_output ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 4, 8, 8), (2, 3, 32, 32)])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("misaligned", [False, True], ids=["vec", "scalar"])
def test_skip_output(dtype, shape, fmt, misaligned):
    sigma = torch.tensor([0.002, 0.5, 80.0], device=DEV)[: shape[0]]
    out = check(ops.skip_output, ref.skip_output,
                dict(x=rand(*shape, dtype=dtype, fmt=fmt, misaligned=misaligned), F=rand(*shape, dtype=dtype),
                     sigma=sigma), grad=("x", "F"), dtype=dtype)
    assert out[0].is_contiguous(memory_format=fmt)


def test_skip_output_mixed_dtypes_and_boundary():
    x, F = rand(2, 3, 8, 8, dtype=torch.bfloat16, fmt=CL), rand(2, 3, 8, 8)
    out = check(ops.skip_output, ref.skip_output, dict(x=x, F=F, sigma=torch.tensor([0.1, 3.0], device=DEV)),
                grad=("x", "F"), dtype=torch.bfloat16)
    assert out[0].dtype == torch.bfloat16 and out[2].dtype == torch.float32
    with ops.use_backend("cuda"):
        assert torch.equal(ops.skip_output(x, F, 0.002), x)  # f(x, sigma_min) = x exactly (CM paper eq. 7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", [False, True], ids=["vec", "scalar"])
def test_skip_output_infer(dtype, misaligned):
    x, F = 2 * rand(2, 3, 5, 8, dtype=dtype, misaligned=misaligned), rand(2, 3, 5, 8, dtype=dtype)
    _checks.check_skip_output_infer("cuda", check, x, F, torch.tensor([0.3, 2.0], device=DEV))


def test_skip_output_infer_rounds_half_to_even():
    _checks.check_rounds_half_to_even("cuda", DEV)


# ---- group_norm_act ---------------------------------------------------------------------------------------------
_gn_inputs = functools.partial(_checks.gn_inputs, device=DEV)
_gn = _checks.gn_pair
ALL = _checks.GN_GRADS
SPLITS = {"auto": None, "one": lambda N, C, HW, nhwc, sms: 1, "max": lambda N, C, HW, nhwc, sms: HW}
# "auto": the forward in one launch per group (these groups are small) and the backward's own split count; "split":
# the forward's split path too (as for groups over GN_FUSED_MAX_GROUP), with the "one" and "max" counts forced.
SPLITS["split"] = None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,G", [((1, 12, 5, 7), 4), ((2, 48, 3, 3), 8), ((2, 20, 8, 8), 5),
                                     ((1, 128, 32, 32), 32), ((3, 96, 16, 16), 32)])
@pytest.mark.parametrize("split", list(SPLITS))
def test_group_norm_act(dtype, fmt, shape, G, split, monkeypatch):
    if split != "auto":
        monkeypatch.setattr(_cuda, "_fused_max_group", lambda ext: 0)
    if SPLITS[split]:
        monkeypatch.setattr(_cuda, "_num_splits", SPLITS[split])
    fn, reffn = _gn(G)
    out = check(fn, reffn, _gn_inputs(shape, dtype, fmt), grad=ALL, dtype=dtype)
    assert out[0].is_contiguous(memory_format=fmt) and out[1].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("affine,mod,act", [(False, False, "none"), (True, False, "silu"), (False, True, "none"),
                                            (True, True, "none")])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
def test_group_norm_act_optional_parts(affine, mod, act, fmt):
    fn, reffn = _gn(3, act=act)
    grad = ("x",) + (("weight", "bias") if affine else ()) + (("scale", "shift") if mod else ())
    check(fn, reffn, _gn_inputs((2, 6, 4, 5), torch.float32, fmt, affine, mod), grad=grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("affine,mod", [(torch.float32, None), (None, torch.float32), ("mixed", None)],
                         ids=["fp32-affine", "fp32-mod", "mixed-affine"])
def test_group_norm_act_parameter_dtypes(dtype, fmt, affine, mod):
    # The one-launch forward reads weight / bias and scale / shift each in fp32 or x's dtype (the bf16 sampler: fp32
    # affine, bf16 modulation); a pair of mixed dtypes is converted first.
    fn, reffn = _gn(32)
    inputs = _gn_inputs((2, 128, 16, 16), dtype, fmt)
    for k in ("weight", "bias", "scale", "shift"):
        want = affine if k in ("weight", "bias") else mod
        if want == torch.float32 or (want == "mixed" and k == "weight"):
            inputs[k] = inputs[k].float()
    check(fn, reffn, inputs, grad=ALL, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
def test_group_norm_act_misaligned_scalar_path(dtype, fmt):
    fn, reffn = _gn(8)
    check(fn, reffn, _gn_inputs((2, 32, 8, 8), dtype, fmt, misaligned=True), grad=ALL, dtype=dtype)


@pytest.mark.parametrize("layout", ["ncl", "nlc"])
def test_group_norm_act_one_spatial_dim(layout):
    fn, reffn = _gn(4)
    inputs = _gn_inputs((2, 12, 9), torch.float32, NCHW)
    if layout == "nlc":  # (N, L, C) storage seen as (N, C, L): the channels-last path with one spatial dim
        inputs["x"] = inputs["x"].transpose(1, 2).contiguous().transpose(1, 2)
    check(fn, reffn, inputs, grad=ALL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,G", [((2, 64, 32, 32), 4), ((1, 34, 32, 16), 1)], ids=["at-limit", "over-limit"])
def test_group_norm_act_around_the_fused_size_limit(dtype, fmt, shape, G):
    # 16 x 1024 = GN_FUSED_MAX_GROUP elements: one block per group; 34 x 512 is over it: the split forward
    assert _cuda._ext(torch.device(DEV)).GN_FUSED_MAX_GROUP == 16384
    fn, reffn = _gn(G)
    check(fn, reffn, _gn_inputs(shape, dtype, fmt), grad=ALL, dtype=dtype)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_group_norm_act_large_mean_is_stable(path, monkeypatch):
    if path == "split":
        monkeypatch.setattr(_cuda, "_fused_max_group", lambda ext: 0)
    fn, reffn = _gn(2, act="none")
    inputs = _gn_inputs((1, 4, 9, 9), torch.float32, NCHW, affine=False, mod=False)
    inputs["x"] = inputs["x"] + 1e4  # shifted sums keep the variance; E[x^2] - E[x]^2 in fp32 would not
    check(fn, reffn, inputs, grad=("x",))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("rows", [2, 1], ids=["per-sample", "broadcast"])
@pytest.mark.parametrize("shape,G,split", [((2, 128, 32, 32), 32, False), ((2, 128, 32, 32), 32, True),
                                           ((2, 256, 8, 8), 32, False)], ids=["fused", "split", "8x8"])
def test_group_norm_act_pre_bias_in_the_kernel(dtype, fmt, rows, shape, G, split, monkeypatch):
    """cmfast.ops without a gradient hands pre_bias to the kernel (DDPM++'s add before norm1): GN(x + pre_bias)
    against float64, and the add-first fallback was not run (no separate elementwise add)."""
    if split:
        monkeypatch.setattr(_cuda, "_fused_max_group", lambda ext: 0)
    N, C = shape[:2]

    def fn(x, weight, bias, scale, shift, pre_bias):
        return ops.group_norm_act(x, G, weight, bias, 1e-6, scale, shift, "silu", pre_bias=pre_bias)

    def reffn(x, weight, bias, scale, shift, pre_bias):
        return ref.group_norm_act(x + pre_bias.reshape(*pre_bias.shape, 1, 1), G, weight, bias, 1e-6, scale, shift)
    inputs = _gn_inputs(shape, dtype, fmt, mod=False)
    inputs["pre_bias"] = 4 * rand(rows if rows == 1 else N, C, dtype=dtype) - 1
    calls = []
    real = _cuda._gn_forward
    monkeypatch.setattr(_cuda, "_gn_forward", lambda *a: calls.append(a[-1]) or real(*a))
    out = check(fn, reffn, inputs, dtype=dtype, backward=False)
    assert out[0].is_contiguous(memory_format=fmt)
    assert len(calls) == 1 and calls[0].data_ptr() == inputs["pre_bias"].data_ptr()

def test_group_norm_act_random_shapes():
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        N, G, Cg, H, W = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in
                          ((1, 4), (1, 5), (1, 7), (1, 12), (1, 12)))
        fmt, act = (CL, "silu") if torch.rand(1, generator=g) < 0.5 else (NCHW, "none")
        fn, reffn = _gn(G, act=act)
        check(fn, reffn, _gn_inputs((N, G * Cg, H, W), torch.float32, fmt), grad=ALL)


def test_group_norm_act_backward_is_deterministic():
    inputs = _gn_inputs((1, 64, 16, 16), torch.bfloat16, CL)
    dy = torch.randn(1, 64, 16, 16, device=DEV, dtype=torch.bfloat16)
    fn, _ = _gn(32)
    a, b = run("cuda", fn, inputs, ALL, dy), run("cuda", fn, inputs, ALL, dy)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# ---- consistency_loss -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pseudo_huber", "l2", "l1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (4, 3, 32, 32), (3, 1, 28, 28)])
@pytest.mark.parametrize("weighted", [False, True])
def test_consistency_loss(kind, dtype, shape, weighted):
    B = shape[0]
    inputs = dict(pred=rand(*shape, dtype=dtype), target=rand(*shape, dtype=dtype), kind=kind,
                  c=0.00054 * (shape[1] * shape[2] * shape[3]) ** 0.5,
                  weight=torch.rand(B, device=DEV) + 0.5 if weighted else None)
    check(ops.consistency_loss, ref.consistency_loss, inputs, grad=("pred",), dtype=dtype)


def test_consistency_loss_layouts_mixed_dtypes_and_all_grads():
    pred, target = rand(3, 3, 7, 9, fmt=CL, misaligned=True), rand(3, 3, 7, 9, dtype=torch.bfloat16)
    inputs = dict(pred=pred, target=target, kind="pseudo_huber", c=0.03, weight=torch.rand(3, device=DEV) + 0.5)
    out = check(ops.consistency_loss, ref.consistency_loss, inputs, grad=("pred", "target", "weight"))
    assert out[1].is_contiguous(memory_format=CL)


# ---- streams, graphs, no host synchronization --------------------------------------------------------------------
def test_runs_on_the_current_stream_without_host_sync():
    x = _gn_inputs((2, 64, 16, 16), torch.bfloat16, CL)["x"]
    F = rand(2, 64, 16, 16, dtype=torch.bfloat16, fmt=CL)
    sigma = torch.tensor([0.5, 2.0], device=DEV)
    with ops.use_backend("torch"):
        want_gn = ops.group_norm_act(x, 32, None, None, 1e-6, None, None, "silu")
        want_skip = ops.skip_output_infer(x, F, sigma)
        want_loss = ops.consistency_loss(x, F, "l2")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side), ops.use_backend("cuda"):
            torch.cuda._sleep(50_000_000)  # the side stream is busy; kernels on another stream would run early
            x2, F2 = x * 1, F * 1
            gn = ops.group_norm_act(x2, 32, None, None, 1e-6, None, None, "silu")
            skip = ops.skip_output_infer(x2, F2, sigma)
            loss = ops.consistency_loss(x2, F2, "l2")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(gn, want_gn, atol=2 * ULP[torch.bfloat16], rtol=2 * ULP[torch.bfloat16])
    torch.testing.assert_close(skip, want_skip, atol=2 * ULP[torch.bfloat16], rtol=2 * ULP[torch.bfloat16])
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-5)


def test_cuda_graph_capture_and_replay():
    x = _gn_inputs((2, 32, 8, 8), torch.float16, CL)["x"]
    F = rand(2, 32, 8, 8, dtype=torch.float16, fmt=CL)
    sigma = torch.tensor([0.5, 2.0], device=DEV)

    def step():
        h = ops.group_norm_act(x, 8, None, None, 1e-6, None, None, "silu")
        return ops.skip_output_infer(x, h, sigma, uint8=True)

    with ops.use_backend("cuda"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up: module loaded, allocator primed
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, step(), atol=0, rtol=0)
