"""Triton kernels (kernels/, backend 'triton') against float64 references: forward and every gradient.

Tolerance and poisoning: tests/_checks.py (at most twice the error of PyTorch itself in the same dtype plus four ulps
of the dtype at the output's scale; outputs NaN-filled, so an element a kernel forgets to write fails the test).
Without CUDA the kernels run in Triton's CPU interpreter on small shapes; with CUDA the same tests run compiled,
and the @pytest.mark.gpu tests add CIFAR-10-sized shapes.
"""
import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before triton is first imported: triton.jit (its standard library included) reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

import _checks  # noqa: E402
import reference as ref  # noqa: E402
from _checks import DTYPES  # noqa: E402

import cmfast  # noqa: E402
from cmfast import ops  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = pytest.mark.triton_cpu


@pytest.fixture(autouse=True)
def _untimed_configs(monkeypatch):
    """On a GPU, one config per shape class instead of autotuning every case (compile time); the CIFAR-shape
    attention test turns autotuning back on."""
    monkeypatch.setenv("CMFAST_TRITON_AUTOTUNE", "0")


def run(backend, fn, inputs: dict, grad: tuple, dy=None):
    """Output and the gradients of the `grad` inputs of fn(**inputs) under `backend` (poisoned for triton)."""
    with ops.use_backend(backend):
        return _checks.run(fn, inputs, grad, dy, poison=backend == "triton", clone=True)


def check(fn, reffn, inputs: dict, grad=(), dtype=torch.float32, backward=True, term_scale=False, dy_fmt=None):
    """Triton vs float64 truth, within 2x torch's own error (same dtype) plus four ulps of `dtype` at the output's
    scale (term_scale: at the scale of the terms a gradient sums, see _checks.check). dy_fmt: the output gradient
    in that memory format (a channels-last net's backward gets channels-last gradients), else NCHW."""
    def runner(backend):
        def go(inputs, grad, dy=None):
            dy = dy.contiguous(memory_format=dy_fmt) if dy is not None and dy_fmt is not None else dy
            return run(backend, fn, inputs, grad, dy)
        return go
    return _checks.check(runner("triton"), runner("torch"), reffn, inputs, grad, dtype, backward, label="triton",
                         ulp_of_output=False, term_scale=term_scale)


rand = functools.partial(_checks.rand, device=DEV)


# ---- skip_output ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block", [((1, 3, 5, 7), None), ((3, 3, 5, 7), 64), ((2, 1, 32, 32), 256)])
def test_skip_output(dtype, shape, block, monkeypatch):
    from cmfast.kernels import skip_output as k
    if block:
        monkeypatch.setattr(k, "BLOCK", block)    # several programs per sample, masked tail
    sigma = torch.tensor([0.002, 0.5, 80.0], device=DEV)[: shape[0]]
    check(ops.skip_output, ref.skip_output, dict(x=rand(*shape, dtype=dtype), F=rand(*shape, dtype=dtype),
                                                   sigma=sigma), grad=("x", "F"), dtype=dtype)


def test_skip_output_boundary_and_channels_last():
    x, F = rand(2, 4, 6, 5, fmt=torch.channels_last), rand(2, 4, 6, 5, fmt=torch.channels_last)
    with ops.use_backend("triton"):
        y = ops.skip_output(x, F, 0.002)
    assert torch.equal(y, x)        # f(x, sigma_min) = x exactly (CM paper eq. 7 boundary condition)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
def test_skip_output_infer(dtype):
    x, F = 2 * rand(2, 3, 5, 7, dtype=dtype), rand(2, 3, 5, 7, dtype=dtype)
    _checks.check_skip_output_infer("triton", check, x, F, torch.tensor([0.3, 2.0], device=DEV))


def test_skip_output_infer_rounds_half_to_even():
    _checks.check_rounds_half_to_even("triton", DEV)


def test_bf16_stores_round_to_nearest():
    """A kernel's fp32 -> bf16 store rounds to nearest, as on a GPU (on CPU the test conftest makes the interpreter do
    so; it truncated): 1 + 2^-8 + 2^-10 is 1.0078125 in bf16, not 1.0."""
    x = torch.ones(1, 8, 2, 2, device=DEV, dtype=torch.bfloat16)
    skip = torch.full_like(x, 2 ** -8 + 2 ** -10)
    with ops.use_backend("triton"):
        y = ops.residual(x, skip)
    assert y.dtype == torch.bfloat16 and (y.float() == 1.0078125).all()
    assert torch.equal(y, (x.float() + skip.float()).to(torch.bfloat16))


# ---- residual ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bias,block", [(True, None), (True, 64), (False, 64)], ids=["bias", "bias-blocks", "nobias"])
def test_residual(dtype, fmt, bias, block, monkeypatch):
    """(x + skip + bias[c]) * scale: every gradient, both layouts (the channel index differs), several programs with
    a masked tail; C != H != W so a wrong channel index reads another channel's bias."""
    from cmfast.kernels import residual as k
    if block:
        monkeypatch.setattr(k, "BLOCK", block)
    inputs = dict(x=rand(2, 6, 5, 7, dtype=dtype, fmt=fmt), skip=rand(2, 6, 5, 7, dtype=dtype, fmt=fmt),
                  bias=rand(6, dtype=dtype) if bias else None, scale=0.5 ** 0.5)
    out = check(ops.residual, ref.residual, inputs, grad=("x", "skip", "bias") if bias else ("x", "skip"),
                dtype=dtype, dy_fmt=fmt)
    assert out[0].is_contiguous(memory_format=fmt)


def test_residual_mixed_layouts_and_dtypes():
    # skip in the other layout and another dtype: promoted (torch's rule) and laid out like x.
    x, skip = rand(2, 4, 3, 5, fmt=torch.channels_last, dtype=torch.bfloat16), rand(2, 4, 3, 5)
    bias = rand(4)
    with ops.use_backend("triton"):
        y = ops.residual(x, skip, bias, 2.0)
    want = ref.residual(x.double(), skip.double(), bias.double(), 2.0)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="bias: expected shape"):
        ops.residual(x, x, rand(3), 1.0)
    with pytest.raises(ValueError, match="skip: expected the shape"):
        ops.residual(x, x[:1], None, 1.0)


@pytest.mark.parametrize("dtype,bias_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)],
                         ids=["fp32", "bf16-fp32bias", "bf16", "fp16"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_residual_backward_kernels_in_steps(dtype, bias_dtype, fmt, monkeypatch):
    """The backward kernels with small tiles, so every loop runs several steps with a masked tail: NCHW planes of 35
    in steps of 8; NHWC 105 positions in partial rows of 8 (14 rows) and 6 channels in blocks of 4; the bias
    gradient over those rows 4 at a time. Every gradient against float64, the bias's in its own dtype."""
    from cmfast.kernels import residual as k
    for name, v in dict(RED_BLOCK=8, TILE_ROWS=4, TILE_C=4, ROW_TILES=2, BIAS_P=4, BIAS_C=4).items():
        monkeypatch.setattr(k, name, v)
    inputs = dict(x=rand(3, 6, 5, 7, dtype=dtype, fmt=fmt), skip=rand(3, 6, 5, 7, dtype=dtype, fmt=fmt),
                  bias=rand(6, dtype=bias_dtype), scale=0.5 ** 0.5)
    out = check(ops.residual, ref.residual, inputs, grad=("x", "skip", "bias"), dtype=dtype, dy_fmt=fmt)
    assert out[3].dtype == bias_dtype and out[1].is_contiguous(memory_format=fmt)


def _residual_bwd_traced(fn):
    """(torch ops run outside the Triton kernels, the residual backward kernels launched, fn's result)."""
    from cmfast.kernels import residual as k
    launches, rec = [], _checks.AtenOps()
    real = {n: getattr(k, n) for n in ("_residual_bwd_nchw_kernel", "_residual_bwd_nhwc_kernel",
                                       "_residual_bias_grad_kernel")}

    class Spy:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*a, **kw):
                launches.append(self.name)
                rec.paused += 1
                try:
                    return real[self.name][grid](*a, **kw)
                finally:
                    rec.paused -= 1
            return launch
    with pytest.MonkeyPatch.context() as mp:
        for n in real:
            mp.setattr(k, n, Spy(n))
        with rec:
            out = fn()
    return rec.names, launches, out


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_residual_backward_is_two_kernels(fmt):
    """With a bias gradient the backward is the two kernels and nothing else (eager PyTorch: a multiply, a sum, its
    scale and a cast, reading dy twice); the input gradient is dy * scale to the bit, one tensor for x and skip;
    an expanded dy (the gradient of a sum, stride 0) gives scale everywhere and scale * N * H * W for the bias."""
    x = rand(2, 6, 5, 7, dtype=torch.bfloat16, fmt=fmt).requires_grad_()
    skip = rand(2, 6, 5, 7, dtype=torch.bfloat16, fmt=fmt).requires_grad_()
    bias = rand(6, dtype=torch.bfloat16).requires_grad_()
    with ops.use_backend("triton"):
        y = ops.residual(x, skip, bias, 0.7)
    dy = rand(*y.shape, dtype=y.dtype, fmt=fmt)
    ops_seen, launches, (gx, gs, gb) = _residual_bwd_traced(lambda: torch.autograd.grad(y, (x, skip, bias), dy))
    layout = "nhwc" if fmt == torch.channels_last else "nchw"
    assert launches == [f"_residual_bwd_{layout}_kernel", "_residual_bias_grad_kernel"]
    assert set(ops_seen) <= {"empty", "empty_like", "empty_strided"}, ops_seen
    assert gx is gs and torch.equal(gx, dy * 0.7) and gx.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(gb.double(), dy.double().sum((0, 2, 3)) * 0.7, rtol=1e-2, atol=1e-2)
    gx, gb = torch.autograd.grad(y.sum(), (x, bias))
    assert torch.equal(gx, torch.full_like(gx, 0.7))
    assert torch.equal(gb.float(), torch.full((6,), 0.7 * 70).to(torch.bfloat16).float())


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("H,W", [(5, 7), (1, 7), (5, 1)])
def test_residual_backward_reads_channel_slices_in_place(fmt, H, W):
    """The gradient of a concatenation reaches the join as a channel slice of a wider tensor (the UNet's decoder):
    the backward reads it in place, NCHW planes or channels-last rows, with no copy, and gives what a dense copy
    gives, to the bit; g comes out dense in dy's layout. H or W of 1 (strides that do not matter)."""
    from cmfast.kernels import residual as k
    wide = rand(3, 10, H, W, dtype=torch.bfloat16, fmt=fmt)
    dy = wide[:, 2:8]                                        # 6 of 10 channels
    assert not dy.is_contiguous() and not dy.is_contiguous(memory_format=torch.channels_last)
    seen, launches, (g, db) = _residual_bwd_traced(lambda: k.residual_bwd(dy, 0.7, torch.float32))
    assert set(seen) <= {"empty", "empty_like", "empty_strided"} and len(launches) == 2, seen
    g0, db0 = k.residual_bwd(dy.contiguous(memory_format=fmt), 0.7, torch.float32)
    assert torch.equal(g, g0) and torch.equal(db, db0)
    assert torch.equal(g, dy * 0.7) and g.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(db.double(), dy.double().sum((0, 2, 3)) * 0.7, rtol=1e-5, atol=1e-5)


# ---- group_norm_act ---------------------------------------------------------------------------------------------
def _gn_inputs(N, C, H, W, dtype, fmt, affine=True, mod=True):
    return _checks.gn_inputs((N, C, H, W), dtype, fmt, affine, mod, device=DEV)


_gn = _checks.gn_pair


def _force_split(monkeypatch, min_chunk=8, tile=16):
    """Several programs per group (a GPU with 132 SMs, tiny chunks) and several tiles per program."""
    from cmfast.kernels import group_norm_act as k
    monkeypatch.setattr(k, "num_sms", lambda device: 132)
    monkeypatch.setattr(k, "MIN_CHUNK", min_chunk)
    monkeypatch.setattr(k, "TILE", tile)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,G", [((1, 12, 5, 7), 4), ((2, 48, 3, 3), 8)])
def test_group_norm_act(dtype, fmt, shape, G):
    fn, reffn = _gn(G)
    out = check(fn, reffn, _gn_inputs(*shape, dtype, fmt), grad=("x", "weight", "bias", "scale", "shift"),
                dtype=dtype)
    assert out[0].is_contiguous(memory_format=fmt) and out[1].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype,fmt,shape,G", [(torch.float32, torch.contiguous_format, (1, 12, 5, 7), 4),
                                               (torch.bfloat16, torch.channels_last, (2, 12, 3, 4), 2)])
def test_group_norm_act_split_reduction(dtype, fmt, shape, G, monkeypatch):
    _force_split(monkeypatch)
    fn, reffn = _gn(G)
    check(fn, reffn, _gn_inputs(*shape, dtype, fmt), grad=("x", "weight", "bias", "scale", "shift"), dtype=dtype)


def test_mixed_precision_as_under_autocast():
    # ConsistencyModel: x fp32, F from a bf16 backbone; UNet: bf16 activations with fp32 GroupNorm parameters.
    x, F = rand(2, 3, 5, 7), rand(2, 3, 5, 7, dtype=torch.bfloat16)
    check(ops.skip_output, ref.skip_output, dict(x=x, F=F, sigma=torch.tensor([0.1, 9.0], device=DEV)),
          grad=("x", "F"))
    fn, reffn = _gn(4)
    inputs = _gn_inputs(2, 12, 3, 5, torch.bfloat16, torch.contiguous_format)
    inputs.update(weight=inputs["weight"].float(), bias=inputs["bias"].float())
    check(fn, reffn, inputs, grad=("x", "weight", "bias", "scale", "shift"), dtype=torch.bfloat16)


@pytest.mark.parametrize("affine,mod,act", [(False, False, "none"), (True, False, "silu"), (False, True, "none")])
def test_group_norm_act_optional_parts(affine, mod, act):
    fn, reffn = _gn(3, act=act)
    inputs = _gn_inputs(2, 6, 4, 5, torch.float32, torch.contiguous_format, affine, mod)
    grad = ("x",) + (("weight", "bias") if affine else ()) + (("scale", "shift") if mod else ())
    check(fn, reffn, inputs, grad=grad)


def _gn_pre(G):
    """group_norm_act of x + pre_bias (a DDPM++ block's embedding add before norm1) and its float64 truth."""
    def fn(x, weight, bias, scale, shift, pre_bias):
        return ops.group_norm_act(x, G, weight, bias, 1e-6, scale, shift, "silu", pre_bias=pre_bias)

    def reffn(x, weight, bias, scale, shift, pre_bias):
        return ref.group_norm_act(x + pre_bias.reshape(*pre_bias.shape, 1, 1), G, weight, bias, 1e-6, scale, shift)
    return fn, reffn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("rows", [2, 1], ids=["per-sample", "broadcast"])
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split"])
def test_group_norm_act_pre_bias_is_fused(dtype, fmt, rows, split, monkeypatch):
    """Without a gradient the kernel normalises x + pre_bias itself (its loads add the column's value, the sum in
    fp32): the float64 truth of GN(x + pre_bias) within the usual bound, and no separate add was run."""
    if split:
        _force_split(monkeypatch)
    from cmfast.kernels import group_norm_act as k
    seen = []
    real = k.group_norm_act_fwd
    monkeypatch.setattr(k, "group_norm_act_fwd", lambda *a: seen.append(a[-1]) or real(*a))
    fn, reffn = _gn_pre(4)
    inputs = _gn_inputs(2, 12, 3, 5, dtype, fmt)
    inputs["pre_bias"] = 4 * rand(rows, 12, dtype=dtype) - 1      # per-channel offsets as large as x's spread
    out = check(fn, reffn, inputs, dtype=dtype, backward=False)
    assert len(seen) == 1 and seen[0] is not None and seen[0].shape == (rows, 12)
    assert out[0].is_contiguous(memory_format=fmt)


def test_group_norm_act_pre_bias_gradient():
    """With a gradient the op adds pre_bias first (in x's dtype) and the fused backward does the rest: every
    gradient, pre_bias's included, against float64."""
    fn, reffn = _gn_pre(3)
    inputs = _gn_inputs(2, 6, 4, 5, torch.float32, torch.channels_last)
    inputs["pre_bias"] = rand(2, 6)
    check(fn, reffn, inputs, grad=("x", "weight", "scale", "pre_bias"))
    from cmfast.ops import _triton       # the kernel's own add is forward only: a direct call needing grad is refused
    with pytest.raises(ValueError, match="pre_bias: the fused add is forward only"):
        _triton.group_norm_act(inputs["x"], 3, None, None, 1e-6, None, None, "silu",
                               pre_bias=inputs["pre_bias"].requires_grad_())


class _Launches:
    """Stands in for a kernel object of kernels/ (autotuned or fixed): counts launches, forces a config."""

    def __init__(self, kernel, config: dict):
        self.kernel, self.config, self.n = kernel, config, 0

    def __getitem__(self, grid):
        self.n += 1
        cfg = triton.Config(self.config, num_warps=4)
        if hasattr(self.kernel, "fit"):                  # the interpreter's fixed config
            self.kernel.config, self.kernel.fit = self.config, None
        elif hasattr(self.kernel, "default"):            # GPU tests: untimed default (CMFAST_TRITON_AUTOTUNE=0)
            self.kernel.default = lambda named: cfg
        return self.kernel[grid]


NHWC, NCHW = torch.channels_last, torch.contiguous_format
GROUP_CASES = ([(2, fmt, dt, True) for fmt in (NCHW, NHWC) for dt in DTYPES]                 # every dtype, layout
               + [(g, NHWC, torch.bfloat16, r) for g in (1, 4, 8) for r in (True, False)]   # every GPB, both paths
               + [(2, NCHW, torch.float32, False)])


@pytest.mark.parametrize("gpb,fmt,dtype,resident", GROUP_CASES)
def test_group_norm_act_several_groups_per_program(gpb, fmt, dtype, resident, monkeypatch):
    """The one-pass forward and backward with GPB groups a program (8 groups of 4 channels), the tiles held in
    registers or streamed in 16-element tiles: every gradient against float64 (the backward reads the statistics
    the forward stored per group), and the pre-bias path."""
    from cmfast.kernels import group_norm_act as k
    if not resident:
        monkeypatch.setattr(k, "TILE", 16)           # several tiles a program
    for name in ("_group_norm_act_fwd_groups_kernel", "_group_norm_act_bwd_groups_kernel"):
        kern = getattr(k, name)
        monkeypatch.setattr(k, name, _Launches(kern, {"GPB": gpb, "STREAM": 0 if resident else 1}))
        for attr in ("fit", "config", "default"):
            if hasattr(kern, attr):
                monkeypatch.setattr(kern, attr, getattr(kern, attr))     # restored after the test
    fn, reffn = _gn(8)
    check(fn, reffn, _gn_inputs(2, 32, 5, 7, dtype, fmt), grad=("x", "weight", "bias", "scale", "shift"), dtype=dtype)
    fn, reffn = _gn_pre(8)
    inputs = _gn_inputs(2, 32, 5, 7, dtype, fmt)
    inputs["pre_bias"] = 4 * rand(2, 32, dtype=dtype) - 1
    check(fn, reffn, inputs, dtype=dtype, backward=False)
    assert k._group_norm_act_bwd_groups_kernel.n == 1      # the backward of the first check
    assert k._group_norm_act_fwd_groups_kernel.n == 2      # one forward per check ran this kernel

def test_host_geometry_helpers_equal_triton_s():
    """The kernels' launch geometry uses plain-int cdiv / next_power_of_2 (triton's are constexpr-function objects,
    ~1.5 us a call through their wrapper); they must give triton's numbers."""
    from cmfast.kernels._autotune import cdiv, next_power_of_2
    for n in range(1, 3000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 1024):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
    assert cdiv(0, 16) == 0


@pytest.mark.parametrize("env", ["", "0"], ids=["cached", "off"])
def test_autotune_keeps_timings_on_disk(env, monkeypatch):
    """On a GPU the tuned kernels are triton.autotune with cache_results (the timings of a shape kept in Triton's
    cache, so a second process skips them) unless CMFAST_TRITON_AUTOTUNE_CACHE=0."""
    import inspect
    from cmfast.kernels import _autotune
    from cmfast.kernels import residual as r
    real = triton.autotune
    if "cache_results" not in inspect.signature(real).parameters:
        pytest.skip(f"triton {triton.__version__} has no cache_results (added in 3.2)")
    seen = []

    @functools.wraps(real)
    def spy(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)
    monkeypatch.setattr(triton, "autotune", spy)
    if env:
        monkeypatch.setenv("CMFAST_TRITON_AUTOTUNE_CACHE", env)
    monkeypatch.setattr(_autotune, "interpreting", lambda: False)
    _autotune.autotune([triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 128})], key=["n"],
                       interpret_config={"BLOCK": 64})(r._residual_fwd_kernel)
    assert len(seen) == 1 and seen[0].get("cache_results", False) is (env != "0")
    # and the shorter per-config benchmark (5 ms warm-up, 20 ms of repetitions instead of triton's 25 / 100)
    timed = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: timed.append(kw) or [1.0, 0.9, 1.1])
    assert seen[0]["do_bench"](lambda: None, quantiles=(0.5, 0.2, 0.8)) == [1.0, 0.9, 1.1]
    assert timed == [dict(warmup=5, rep=20, quantiles=(0.5, 0.2, 0.8))]


def test_group_norm_tuner_candidates():
    """What the GPU tuner may pick: always the old one-group streamed program; GPB dividing the groups; 16 warps
    only for a resident tile; no two configs doing the same work."""
    from cmfast.kernels import group_norm_act as k

    def cands(configs, G, cg, hw):
        return {(c.kwargs["GPB"], c.kwargs["STREAM"], c.num_warps)
                for c in k._groups_prune(configs, dict(G=G, CG=cg, HW_P2=hw))}
    assert cands(k.GROUPS_CONFIGS, 32, 8, 1024) == {(1, 0, 8), (1, 1, 8), (4, 0, 8), (8, 0, 8)}
    assert cands(k.BWD_GROUPS_CONFIGS, 32, 16, 1024) == {(1, 1, 8), (4, 0, 8), (8, 0, 8)}   # 16 x 1024 > RESIDENT
    assert cands(k.BWD_GROUPS_CONFIGS, 6, 4, 256) == {(1, 0, 8), (1, 0, 16), (1, 1, 8)}
    for G, cg, hw in ((32, 8, 64), (6, 4, 1024), (3, 2, 64), (32, 64, 1024)):
        assert (1, 1, 8) in cands(k.GROUPS_CONFIGS, G, cg, hw) and (1, 1, 8) in cands(k.BWD_GROUPS_CONFIGS, G, cg, hw)


class _Count:
    """Forwards kernel[grid](...) and counts the launches."""

    def __init__(self, kernel):
        self.kernel, self.n = kernel, 0

    def __getitem__(self, grid):
        self.n += 1
        return self.kernel[grid]


@pytest.mark.parametrize("choice", ["split", "resident"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_group_norm_act_small_batch_resident_or_split(choice, fmt, monkeypatch):
    """Where the plan splits the statistics (small batch on a large GPU), the forward runs either the split
    (statistics kernel + apply) or one resident program per group; the GPU measures which, CMFAST_GN_SMALL names
    one. Either way: the float64 truth, and the split backward reads the statistics the forward stored."""
    from cmfast.kernels import group_norm_act as k
    _force_split(monkeypatch)
    monkeypatch.setenv("CMFAST_GN_SMALL", choice)
    stats_kernel = _Count(k._group_norm_stats_kernel)
    monkeypatch.setattr(k, "_group_norm_stats_kernel", stats_kernel)
    resident = []
    real = k._unwrapped
    monkeypatch.setattr(k, "_unwrapped", lambda kern: resident.append(kern) or real(kern))
    fn, reffn = _gn(4)
    inputs = _gn_inputs(1, 16, 3, 4, torch.float32, fmt)
    assert k.Plan(inputs["x"], 4).S > 1
    check(fn, reffn, inputs, grad=("x", "weight", "bias", "scale", "shift"))
    assert (len(resident), stats_kernel.n) == ((1, 0) if choice == "resident" else (0, 1))
    monkeypatch.delenv("CMFAST_GN_SMALL")
    assert not k._resident_wins(inputs["x"], k.Plan(inputs["x"], 4), None, None)    # off CUDA: no timing, split


def test_group_norm_act_large_mean_is_stable():
    # Mean 1e4, std 1: E[x^2] - E[x]^2 in fp32 would lose every digit; the merged two-pass statistics must not.
    fn, reffn = _gn(2, act="none")
    inputs = _gn_inputs(1, 4, 9, 9, torch.float32, torch.contiguous_format, affine=False, mod=False)
    inputs["x"] = inputs["x"] + 1e4
    check(fn, reffn, inputs, grad=("x",))


def test_group_norm_act_fuzz(monkeypatch):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from cmfast.kernels import group_norm_act as k
    _force_split(monkeypatch)
    plain = (lambda device: 1, 1 << 30, 2048)                  # no split, one tile per program (interpreter)

    @hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
    @hypothesis.given(N=st.integers(1, 3), G=st.integers(1, 3), Cg=st.integers(1, 5), H=st.integers(1, 6),
                      W=st.integers(1, 6), cl=st.booleans(), affine=st.booleans(), mod=st.booleans(),
                      silu=st.booleans(), split=st.booleans())
    def prop(N, G, Cg, H, W, cl, affine, mod, silu, split):
        saved = k.num_sms, k.MIN_CHUNK, k.TILE
        if not split:
            k.num_sms, k.MIN_CHUNK, k.TILE = plain
        try:
            fn, reffn = _gn(G, act="silu" if silu else "none")
            fmt = torch.channels_last if cl else torch.contiguous_format
            inputs = _gn_inputs(N, G * Cg, H, W, torch.float32, fmt, affine, mod)
            # A group of one element has zero variance: its gradients are all rounding noise. A group of two
            # normalizes to +-1 whatever x is: its dx is rounding noise (failed at 1 of 60 one-channel seeds,
            # either floor).
            grad = (("x",) if H * W * Cg > 2 else ()) + (("weight", "bias") if affine else ()) + \
                (("scale", "shift") if mod else ())
            if H * W * Cg > 1:     # term_scale: one-channel dweights that cancel (old rule: 19 of 432 seeds failed)
                check(fn, reffn, inputs, grad=grad, term_scale=True)
        finally:
            k.num_sms, k.MIN_CHUNK, k.TILE = saved
    prop()


# ---- attention --------------------------------------------------------------------------------------------------
@pytest.fixture
def small_blocks(monkeypatch):
    """16 x 16 tiles in the interpreter, so short sequences still span several blocks with a masked tail."""
    from cmfast.kernels import attention as k
    monkeypatch.setitem(k.INTERPRET, "BLOCK_M", 16)
    monkeypatch.setitem(k.INTERPRET, "BLOCK_N", 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Lq,Lk,D", [(1, 2, 9, 9, 16), (2, 1, 17, 17, 32), (1, 2, 9, 17, 24), (1, 1, 33, 5, 16)])
def test_attention(dtype, B, H, Lq, Lk, D, small_blocks):
    q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
    check(lambda q, k, v: ops.attention(q, k, v), ref.attention, dict(q=q, k=k, v=v), grad=("q", "k", "v"),
          dtype=dtype)


def test_attention_strided_inputs_and_scale(small_blocks):
    # The UNet hands over transposed views of one qkv tensor.
    qkv = rand(2, 2, 16, 3, 13)                                  # (N, heads, D, 3, L)
    q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(3))
    check(lambda q, k, v: ops.attention(q, k, v, scale=0.3), lambda q, k, v: ref.attention(q, k, v, 0.3),
          dict(q=q, k=k, v=v), grad=("q", "k", "v"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_copies_a_strided_head_dim_once(dtype, small_blocks):
    """A channels-last qkv convolution output split into views: q, k, v have head-dim stride 3. The forward copies
    each once into a dense head dim (the H200 ran the kernel on such views 12x slower than on dense copies) and
    copies nothing that is dense already (the UNet's q, k, v, made in one copy); forward and gradients against
    float64."""
    from torch.utils._python_dispatch import TorchDispatchMode
    N, heads, D, H, W = 2, 2, 16, 3, 5
    qkv = rand(N, heads * D * 3, H, W, dtype=dtype, fmt=torch.channels_last).reshape(N, heads, D, 3, H * W)
    q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(3))
    assert q.stride(-1) == 3

    class Copies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Copies.n += func.overloadpacket.__name__ in ("clone", "_to_copy")     # .contiguous() is a clone
            return func(*args, **(kwargs or {}))
    dense = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)                 # as the UNet passes them
    for inputs, copies in (((q, k, v), 3), (dense, 0)):
        Copies.n = 0
        with ops.use_backend("triton"), torch.no_grad(), Copies():
            ops.attention(*inputs)
        assert Copies.n == copies
    check(lambda q, k, v: ops.attention(q, k, v), ref.attention, dict(q=q, k=k, v=v), grad=("q", "k", "v"),
          dtype=dtype)


# ---- consistency_loss -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["pseudo_huber", "l2", "l1"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("block", [None, 16])   # 16: each sample split over several programs (two-phase)
def test_consistency_loss(dtype, kind, weighted, block, monkeypatch):
    from cmfast.kernels import consistency_loss as k
    if block:
        monkeypatch.setattr(k, "BLOCK", block)
    B = 1 if block else 3
    inputs = dict(pred=rand(B, 3, 8, 9, dtype=dtype), target=rand(B, 3, 8, 9, dtype=dtype),
                  weight=torch.rand(B, device=DEV) + 0.5 if weighted else None)
    c = 0.03 if kind == "pseudo_huber" else None
    check(lambda pred, target, weight: ops.consistency_loss(pred, target, kind, c, weight),
          lambda pred, target, weight: ref.consistency_loss(pred, target, kind, c, weight),
          inputs, grad=("pred", "weight") if weighted else ("pred",), dtype=dtype)


def test_consistency_loss_underflowing_c_at_zero_difference():
    """pred == target with a pseudo-Huber c whose square underflows fp32: the gradient is 0 (it was 0 * inf = nan)."""
    p = rand(2, 3, 4, 4)
    q = p.clone().requires_grad_()
    with ops.use_backend("triton"):
        loss = ops.consistency_loss(q, p, "pseudo_huber", 1e-30)
    loss.sum().backward()
    assert loss.abs().max() <= 1e-30 and torch.equal(q.grad, torch.zeros_like(p))


def test_consistency_loss_target_is_stop_gradient():
    pred, target = rand(2, 3, 4, 4).requires_grad_(), rand(2, 3, 4, 4).requires_grad_()
    with ops.use_backend("triton"):
        ops.consistency_loss(pred, target, "l2").sum().backward()
    assert target.grad is None and pred.grad is not None


# ---- errors -----------------------------------------------------------------------------------------------------
def test_triton_refuses_float64_and_sigma_grad():
    x = torch.randn(2, 4, 3, 3, device=DEV, dtype=torch.float64)
    with ops.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        ops.group_norm_act(x, 2)
    x = x.float()
    with ops.use_backend("triton"), pytest.raises(ValueError, match="sigma"):
        ops.skip_output(x, x, torch.ones(2, device=DEV, requires_grad=True))


# ---- backend agreement ------------------------------------------------------------------------------------------
class _Block(torch.nn.Module):
    """GroupNorm+SiLU -> conv -> attention over positions -> skip output: the UNet's op mix in miniature."""

    def __init__(self, C=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(C, 3 * C, 1)
        self.out = torch.nn.Conv2d(C, 3, 1)
        self.w, self.b = torch.nn.Parameter(1 + 0.1 * torch.randn(C)), torch.nn.Parameter(0.1 * torch.randn(C))

    def forward(self, x, sigma):
        h = self.conv(ops.group_norm_act(x, 2, self.w, self.b, 1e-6, None, None, "silu"))
        N, C3, H, W = h.shape
        q, k, v = h.reshape(N, 1, 3, C3 // 3, H * W).transpose(-1, -2).unbind(2)
        a = ops.attention(q.contiguous(), k.contiguous(), v.contiguous()).transpose(-1, -2).reshape(N, -1, H, W)
        return ops.skip_output(x[:, :3], self.out(a + x), sigma)


def _fwd_bwd(net, backend, *inputs):
    net.zero_grad()
    with ops.use_backend(backend):
        y = net(*inputs)
        y.square().mean().backward()
    return [y.detach()] + [p.grad.clone() for p in net.parameters() if p.grad is not None]


def test_backend_agreement_small_block():
    torch.manual_seed(0)
    net = _Block().to(DEV)
    x, sigma = rand(2, 8, 5, 6), torch.tensor([0.5, 3.0], device=DEV)
    for a, b in zip(_fwd_bwd(net, "torch", x, sigma), _fwd_bwd(net, "triton", x, sigma)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_backend_agreement_tiny_unet():
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny").to(DEV)
    x, noise = rand(1, 3, 32, 32), torch.tensor([0.3], device=DEV)
    ours, theirs = _fwd_bwd(net, "triton", x, noise), _fwd_bwd(net, "torch", x, noise)
    assert len(ours) == len(theirs) > 10
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * max(a.abs().max().item(), 1e-3))


# ---- benchmark script -------------------------------------------------------------------------------------------
def test_bench_ops_cpu_smoke(tmp_path):
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_ops
    out = tmp_path / "ops.json"
    assert bench_ops.main(["--cpu-smoke", "--ops", "skip_output", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {(r["op"], r["backend"]): r for r in res["rows"]}
    assert set(rows) == {(op, b) for op in ("skip_output", "skip_output_infer") for b in ("triton", "torch")}
    assert all(r["median_ms"] > 0 and r["bytes"] == 2 * 3 * 32 * 32 * (6 * 2 if r["op"] == "skip_output" else 5)
               for r in rows.values())
    assert res["ceilings"]["copy_gb_per_s"] > 0 and res["torch"] == torch.__version__


# ---- compiled for a GPU, without one ---------------------------------------------------------------------------
@pytest.mark.slow
def test_kernels_compile_for_h100():
    """The interpreter accepts what the compiler may reject: compile a sample of the kernels for sm_90 (ptxas
    ships with triton; no GPU needed), D = 256 attention in one of the tiles the autotuner would try."""
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("triton.backends.nvidia")
    script = Path(__file__).resolve().parent.parent / "scripts" / "triton_compile_check.py"
    only = "skip_output_infer_u8;loss_partial[2];gn_fwd[256x8,one_pass=True,pre=False];" \
           "gn_fwd[64x4,one_pass=False,pre=True];gn_stats[64x4,pre=True];gn_bwd_dx[64x4,one_pass=False];" \
           "gn_fwd_groups[cg=8,gpb=1,hw=1024,stream=0,pre=True];gn_fwd_groups[cg=8,gpb=4,hw=1024,stream=0,pre=False];" \
           "gn_bwd_groups[cg=8,gpb=1,hw=1024,stream=0];gn_bwd_groups[cg=8,gpb=4,hw=1024,stream=0];" \
           "gn_param_grads[all=True,32x128];attn_fwd[D=256,64x32,w4,s2];attn_dq[D=256,32x32,w4,s1]"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(script), "--quick", "--only", only], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("shared") == 13, r.stdout


# ---- GPU: compiled kernels at CIFAR-10 shapes -------------------------------------------------------------------
GN_GPU = [(torch.bfloat16, 1, 256, 32), (torch.bfloat16, 4, 128, 16), (torch.bfloat16, 256, 256, 8),
          (torch.bfloat16, 2, 96, 7), (torch.float32, 1, 256, 32), (torch.float32, 8, 256, 8),
          (torch.float16, 4, 128, 16)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,N,C,R", GN_GPU)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_gpu_group_norm_act(dtype, N, C, R, fmt):
    fn, reffn = _gn(32)
    check(fn, reffn, _gn_inputs(N, C, R, R, dtype, fmt), grad=("x", "weight", "bias", "scale", "shift"), dtype=dtype)


@pytest.mark.gpu
@gpu
def test_gpu_group_norm_act_backward_is_deterministic():
    fn, _ = _gn(32)
    inputs = _gn_inputs(1, 256, 32, 32, torch.bfloat16, torch.contiguous_format)
    dy = torch.randn(1, 256, 32, 32, device=DEV, dtype=torch.bfloat16)
    grad = ("x", "weight", "bias", "scale", "shift")
    a, b = run("triton", fn, inputs, grad, dy), run("triton", fn, inputs, grad, dy)
    assert all(torch.equal(u, w) for u, w in zip(a, b))


ATTN_GPU = [(torch.bfloat16, 2, 1, 256, 256), (torch.bfloat16, 1, 2, 97, 64), (torch.bfloat16, 1, 1, 257, 128),
            (torch.bfloat16, 2, 4, 64, 32), (torch.float16, 2, 1, 256, 256), (torch.float16, 1, 2, 97, 64),
            (torch.float32, 2, 1, 256, 256), (torch.float32, 1, 1, 257, 128)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,B,H,L,D", ATTN_GPU)
def test_gpu_attention(dtype, B, H, L, D):
    q, k, v = (rand(B, H, L, D, dtype=dtype) for _ in range(3))
    check(lambda q, k, v: ops.attention(q, k, v), ref.attention, dict(q=q, k=k, v=v), grad=("q", "k", "v"),
          dtype=dtype)


@pytest.mark.gpu
@gpu
def test_gpu_attention_autotuned_cifar_shape(monkeypatch):
    # Every config the autotuner keeps for DDPM++'s attention (L = 256, D = 256) runs; the winner must be right.
    monkeypatch.setenv("CMFAST_TRITON_AUTOTUNE", "1")
    q, k, v = (rand(4, 1, 256, 256, dtype=torch.bfloat16) for _ in range(3))
    check(lambda q, k, v: ops.attention(q, k, v), ref.attention, dict(q=q, k=k, v=v), grad=("q", "k", "v"),
          dtype=torch.bfloat16)


def _attention_kept_configs():
    """(kernel names, config) for every config the pruner keeps at DDPM++'s attention (L = 256, D = 256, bf16): any
    of them may win the timing on some GPU, so each must be right, not only the one the autotuner picked here."""
    from types import SimpleNamespace

    from cmfast.kernels import attention as A
    named = dict(BLOCK_D=256, Lq=256, Lk=256, q_ptr=SimpleNamespace(element_size=lambda: 2))
    return ([(("_attention_fwd_kernel",), c) for c in A._prune(A.FWD_CONFIGS, named)]
            + [(("_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"), c) for c in A._prune(A.BWD_CONFIGS, named)])


def _force_config(monkeypatch, kernels, cfg):
    """Run the kernels of cmfast.kernels.attention named in `kernels` with `cfg`, untimed: on a GPU through the
    CMFAST_TRITON_AUTOTUNE=0 choice (_Switch.default), under the interpreter through its fixed config."""
    from cmfast.kernels import attention as A
    monkeypatch.setenv("CMFAST_TRITON_AUTOTUNE", "0")
    for name in kernels:
        k = getattr(A, name)
        if hasattr(k, "default"):
            monkeypatch.setattr(k, "default", lambda named, c=cfg: c)
        else:
            monkeypatch.setattr(k, "config", dict(cfg.kwargs))


def _config_id(kc):
    names, c = kc
    kind = "fwd" if len(names) == 1 else "bwd"
    return f"{kind}-{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}-w{c.num_warps}s{c.num_stages}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kc", _attention_kept_configs(), ids=_config_id)
def test_gpu_attention_every_kept_config_cifar_shape(monkeypatch, kc):
    kernels, cfg = kc
    _force_config(monkeypatch, kernels, cfg)
    q, k, v = (rand(2, 1, 256, 256, dtype=torch.bfloat16) for _ in range(3))
    check(lambda q, k, v: ops.attention(q, k, v), ref.attention, dict(q=q, k=k, v=v), grad=("q", "k", "v"),
          dtype=torch.bfloat16)


@pytest.mark.slow
@pytest.mark.triton_cpu
def test_attention_forced_configs_run_under_the_interpreter(monkeypatch):
    """The mechanics of the test above on CPU: the kept list has forward and backward tiles, a forced tile is the one
    launched (seen in the forward's grid), and a forward and a backward tile give the right attention with tails."""
    from cmfast.kernels import attention as A
    kept = _attention_kept_configs()
    assert {len(n) for n, _ in kept} == {1, 2} and len(kept) >= 10
    fwd = next(c for n, c in kept if len(n) == 1 and c.kwargs["BLOCK_M"] == 32)   # not the CPU tests' 16 or 64
    bwd = next(c for n, c in kept if len(n) == 2 and c.kwargs["BLOCK_M"] == 32)
    _force_config(monkeypatch, ("_attention_fwd_kernel",), fwd)
    _force_config(monkeypatch, ("_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"), bwd)
    grids, jit = [], A._attention_fwd_kernel.fn

    class Spy:
        arg_names = jit.arg_names

        def __getitem__(self, grid):
            grids.append(grid)
            return jit[grid]
    monkeypatch.setattr(A._attention_fwd_kernel, "fn", Spy())
    q, k, v = (rand(1, 1, 40, 32) for _ in range(3))
    check(lambda q, k, v: ops.attention(q, k, v), ref.attention, dict(q=q, k=k, v=v), grad=("q", "k", "v"))
    assert grids and grids[0] == (2, 1)          # 40 rows in BLOCK_M = 32 tiles


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["pseudo_huber", "l2", "l1"])
@pytest.mark.parametrize("B", [1, 256])
def test_gpu_skip_output_and_loss(dtype, kind, B):
    x, F = rand(B, 3, 32, 32, dtype=dtype), rand(B, 3, 32, 32, dtype=dtype)
    sigma = torch.rand(B, device=DEV) * 80 + 0.002
    check(ops.skip_output, ref.skip_output, dict(x=x, F=F, sigma=sigma), grad=("x", "F"), dtype=dtype)
    check(lambda pred, target, weight: ops.consistency_loss(pred, target, kind, None, weight),
          lambda pred, target, weight: ref.consistency_loss(pred, target, kind, None, weight),
          dict(pred=x, target=F, weight=torch.rand(B, device=DEV)), grad=("pred", "weight"), dtype=dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("B,C,R", [(1, 128, 32), (256, 256, 16)])
def test_gpu_residual(dtype, fmt, B, C, R):
    # The residual join at DDPM++ CIFAR-10 sizes, compiled; the bias a parameter (fp32) as in the network.
    inputs = dict(x=rand(B, C, R, R, dtype=dtype, fmt=fmt), skip=rand(B, C, R, R, dtype=dtype, fmt=fmt),
                  bias=rand(C), scale=0.5 ** 0.5)
    out = check(ops.residual, ref.residual, inputs, grad=("x", "skip", "bias"), dtype=dtype, dy_fmt=fmt)
    assert out[0].is_contiguous(memory_format=fmt)


@pytest.mark.gpu
@gpu
def test_gpu_backend_agreement_ddpmpp_bf16():
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("ddpmpp-cifar10", dropout=0.0).to(DEV)
    x, noise = rand(4, 3, 32, 32), torch.rand(4, device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        theirs, ours = _fwd_bwd(net, "torch", x, noise), _fwd_bwd(net, "triton", x, noise)
    # bf16 end to end: the two backends round differently at every layer; compare relative to each tensor's scale.
    for a, b in zip(theirs, ours):
        scale = a.float().abs().max().item() + 1e-6
        assert (a.float() - b.float()).abs().max().item() <= 0.1 * scale
