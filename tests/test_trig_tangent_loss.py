"""cmfast.ops.trig_tangent_loss: the fused sCM loss kernel (Triton, CPU interpreter here) against the torch
reference and an fp64 re-derivation written out below; forward, dloss/dF, dloss/dlogvar; GPU variant."""
import os

import torch

if not torch.cuda.is_available():   # the Triton kernels run in the CPU interpreter here
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cmfast import ops  # noqa: E402


def _truth(F, x, v, t, Fp, Fm, h, dFdt, lv, w, r, sd, c, norm="l2"):
    """fp64, written independently of the backends: loss and its gradients by autograd through the formula.
    norm 'rms': the tangent divided by its root mean square (||g|| / sqrt(D)) plus c, FastGen's variant."""
    F = F.double().detach().requires_grad_(True)
    lv = lv.double().detach().requires_grad_(True)
    B = F.shape[0]
    dF = dFdt.double() if dFdt is not None else (Fp.double() - Fm.double()) / (2 * h.double().view(B, 1, 1, 1))
    tt = t.double().view(B, 1, 1, 1)
    g = -torch.cos(tt) ** 2 * (sd * F.detach() - v.double()) - r * torch.cos(tt) * torch.sin(tt) * (x.double() + sd * dF)
    size = g.flatten(1).norm(dim=1).view(B, 1, 1, 1)
    if norm == "rms":
        size = g.flatten(1).square().mean(1).sqrt().view(B, 1, 1, 1)
    res = F - F.detach() - g / (size + c)
    loss = res.flatten(1).square().sum(1) * w.double() / (lv.exp() * F[0].numel()) + lv
    dF_, dlv = torch.autograd.grad(loss, (F, lv), torch.arange(1.0, B + 1, dtype=torch.float64, device=F.device))
    return loss.detach(), dF_, dlv


def _inputs(B, C, H, W, dtype, fd=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda: torch.randn(B, C, H, W, generator=g)  # noqa: E731
    F, x, v = rn().to(dtype), rn(), rn() * 0.5
    t = torch.rand(B, generator=g) * 1.5 + 0.02
    h = 1e-3 * t
    dFdt = rn()
    Fp, Fm = (F.float() + h.view(B, 1, 1, 1) * dFdt), (F.float() - h.view(B, 1, 1, 1) * dFdt)
    lv = torch.randn(B, generator=g) * 0.3
    w = torch.rand(B, generator=g) + 0.5
    return dict(F=F, x_t=x, dxdt=v, t=t, F_plus=Fp if fd else None, F_minus=Fm if fd else None,
                h=h if fd else None, dFdt=None if fd else dFdt, logvar=lv, weight=w)


def _run(backend, kw, r, sd=0.5, c=0.1, norm="l2"):
    F = kw["F"].detach().clone().requires_grad_(True)
    lv = kw["logvar"].detach().clone().requires_grad_(True)
    with ops.use_backend(backend):
        loss = ops.trig_tangent_loss(F, kw["x_t"], kw["dxdt"], kw["t"], F_plus=kw["F_plus"], F_minus=kw["F_minus"],
                                     h=kw["h"], dFdt=kw["dFdt"], logvar=lv, weight=kw["weight"], r=r,
                                     sigma_data=sd, c=c, norm=norm)
    loss.backward(torch.arange(1.0, F.shape[0] + 1, device=F.device))
    return loss.detach(), F.grad, lv.grad


def _err(a, b):
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max().clamp_min(1e-30))


# Odd shapes: batch 1, 3 channels, H*W not a multiple of the block, a sample larger than one block and chunk split.
SHAPES = [(1, 3, 5, 7), (3, 3, 16, 16), (2, 5, 33, 31)]


@pytest.mark.triton_cpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fd", [True, False])
@pytest.mark.parametrize("r", [0.0, 0.7])
def test_kernel_matches_reference_fp32(shape, fd, r):
    pytest.importorskip("triton")
    kw = _inputs(*shape, torch.float32, fd)
    want = _truth(*(kw[k] for k in ("F", "x_t", "dxdt", "t", "F_plus", "F_minus", "h", "dFdt", "logvar", "weight")),
                  r, 0.5, 0.1)
    ref = _run("torch", kw, r)
    got = _run("triton", kw, r)
    for g, rf, w in zip(got, ref, want):
        # fp32 math throughout: the kernel may be at most 2x the reference's error against fp64 (+ a floor);
        # the finite difference divides an fp32 rounding of F +- h dF/dt by 2h, so both carry ~1e-4 of it.
        assert _err(g, w) <= 2 * _err(rf, w) + 1e-5
    assert torch.isfinite(got[0]).all() and got[1].shape == kw["F"].shape


@pytest.mark.triton_cpu
def test_kernel_bf16_online_output():
    # F from a bf16 forward: read in bf16, upcast, gradient written back in bf16
    pytest.importorskip("triton")
    kw = _inputs(2, 3, 9, 9, torch.bfloat16, fd=True)
    want = _truth(*(kw[k] for k in ("F", "x_t", "dxdt", "t", "F_plus", "F_minus", "h", "dFdt", "logvar", "weight")),
                  1.0, 0.5, 0.1)
    got = _run("triton", kw, 1.0)
    assert got[1].dtype == torch.bfloat16
    assert _err(got[0], want[0]) < 1e-4 and _err(got[2], want[2]) < 1e-4
    assert _err(got[1], want[1]) < 1e-2    # bf16 rounding of the stored gradient (2^-8)


_KEYS = ("F", "x_t", "dxdt", "t", "F_plus", "F_minus", "h", "dFdt", "logvar", "weight")


@pytest.mark.parametrize("fd", [True, False])
def test_rms_norm_reference_matches_fp64_truth(fd):
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v)
          for k, v in _inputs(2, 3, 8, 8, torch.float64, fd=fd, seed=3).items()}
    want = _truth(*(kw[k] for k in _KEYS), 0.6, 0.5, 0.1, norm="rms")
    got = _run("torch", kw, 0.6, norm="rms")
    for g, w in zip(got, want):
        assert _err(g, w) < 1e-12
    # and the two norms differ here: ||g|| is sqrt(D) = 13.9 times the RMS, so the L2 loss is far from it
    assert _err(_run("torch", kw, 0.6)[0] - kw["logvar"], want[0] - kw["logvar"]) > 0.5


def test_rms_norm_is_l2_with_c_times_sqrt_d():
    # g / (||g|| / sqrt(D) + c) = sqrt(D) g / (||g|| + c sqrt(D)): the RMS loss less logvar is D times the L2 loss less
    # logvar at c sqrt(D), an identity the two code paths do not share
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v)
          for k, v in _inputs(3, 2, 5, 5, torch.float64, fd=False, seed=4).items()}
    D = 2 * 5 * 5
    rms = _run("torch", kw, 1.0, c=0.1, norm="rms")[0] - kw["logvar"]
    l2 = _run("torch", kw, 1.0, c=0.1 * D ** 0.5)[0] - kw["logvar"]
    torch.testing.assert_close(rms, D * l2, rtol=1e-12, atol=0)


@pytest.mark.triton_cpu
@pytest.mark.parametrize("fd", [True, False])
def test_rms_norm_kernel_matches_reference(fd):
    pytest.importorskip("triton")
    kw = _inputs(2, 5, 33, 31, torch.float32, fd)
    want = _truth(*(kw[k] for k in _KEYS), 0.7, 0.5, 0.1, norm="rms")
    ref, got = _run("torch", kw, 0.7, norm="rms"), _run("triton", kw, 0.7, norm="rms")
    for g, rf, w in zip(got, ref, want):
        assert _err(g, w) <= 2 * _err(rf, w) + 1e-5


def test_norm_name_checked():
    kw = _inputs(2, 3, 4, 4, torch.float32, fd=False)
    with pytest.raises(ValueError, match=r"^norm: expected one of l2, rms, got 'L2'$"):
        ops.trig_tangent_loss(kw["F"], kw["x_t"], kw["dxdt"], kw["t"], dFdt=kw["dFdt"], norm="L2")


def test_reference_matches_fp64_truth():
    kw = _inputs(2, 3, 8, 8, torch.float64, fd=False)
    want = _truth(*(kw[k] for k in ("F", "x_t", "dxdt", "t", "F_plus", "F_minus", "h", "dFdt", "logvar", "weight")),
                  0.5, 0.5, 0.1)
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    got = _run("torch", kw, 0.5)
    for g, w in zip(got, want):
        assert _err(g, w) < 1e-12
    # the value is ||gn||^2 q + logvar and F - F- = 0, so the gradient is -2 q gn: its norm is at most 2 q
    # (times the upstream gradient 1, 2 that _run feeds the backward)
    q = kw["weight"] / (kw["logvar"].exp() * kw["F"][0].numel()) * torch.arange(1.0, 3.0, dtype=torch.float64)
    assert bool((got[1].flatten(1).norm(dim=1) <= 2 * q * (1 + 1e-12)).all())


def test_errors():
    kw = _inputs(2, 3, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="either dFdt"):
        ops.trig_tangent_loss(kw["F"], kw["x_t"], kw["dxdt"], kw["t"], F_plus=kw["F_plus"], h=kw["h"])
    with pytest.raises(ValueError, match="x_t"):
        ops.trig_tangent_loss(kw["F"], kw["x_t"][:1], kw["dxdt"], kw["t"], dFdt=kw["F"])
    with pytest.raises(ValueError, match="logvar"):
        ops.trig_tangent_loss(kw["F"], kw["x_t"], kw["dxdt"], kw["t"], dFdt=kw["F"], logvar=torch.zeros(3))
    with pytest.raises(ValueError, match="positive"):
        ops.trig_tangent_loss(kw["F"], kw["x_t"], kw["dxdt"], kw["t"], F_plus=kw["F"], F_minus=kw["F"],
                              h=torch.zeros(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (7, 3, 32, 32), (128, 3, 32, 32), (4, 3, 64, 64)])
def test_kernel_gpu(shape, dtype):
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _inputs(*shape, dtype).items()}
    want = _truth(*(kw[k] for k in ("F", "x_t", "dxdt", "t", "F_plus", "F_minus", "h", "dFdt", "logvar", "weight")),
                  0.8, 0.5, 0.1)
    ref, got = _run("torch", kw, 0.8), _run("triton", kw, 0.8)
    for g, rf, w in zip(got, ref, want):
        assert _err(g, w) <= 2 * _err(rf, w) + (1e-5 if dtype == torch.float32 else 1e-2)
    # r read by the compiled kernel from device memory (--cuda-graph's sCT step): the number's result
    # (0.75 is exact in fp32)
    num, dev = _run("triton", kw, 0.75), _run("triton", kw, torch.full((1,), 0.75, device="cuda"))
    for a, b in zip(dev, num):
        assert torch.equal(a, b)


def test_float64_call_keeps_t_h_and_weight_in_float64():
    # t, h and the weight were rounded to fp32 (sigma_vector's default) even for a float64 F: a t of 0.1 became
    # 0.100000001490116, which moved cos^2 t in the 9th digit; now a float64 call is float64 throughout
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v)
          for k, v in _inputs(2, 3, 4, 4, torch.float64, fd=True, seed=5).items()}
    kw["t"] = torch.tensor([0.1, 1.3], dtype=torch.float64)
    kw["h"] = 1e-3 * kw["t"] + 1e-12
    kw["weight"] = torch.tensor([0.7, 1.1], dtype=torch.float64)
    want = _truth(*(kw[k] for k in _KEYS), 0.6, 0.5, 0.1)
    got = _run("torch", kw, 0.6)
    for g, w in zip(got, want):
        assert _err(g, w) < 1e-12


def test_vmap_over_the_finite_difference_pair():
    # the h > 0 check branched on data, which vmap refuses ('data-dependent control flow'); under a transform it
    # is left out, as the models' sigma checks are. vmap over a stack of two problems equals the two calls.
    a = _inputs(2, 3, 4, 4, torch.float32, fd=True, seed=6)
    b = _inputs(2, 3, 4, 4, torch.float32, fd=True, seed=7)
    names = ("F", "x_t", "dxdt", "t", "F_plus", "F_minus", "h", "logvar", "weight")
    stacked = [torch.stack([a[k], b[k]]) for k in names]

    def one(F, x, v, t, Fp, Fm, h, lv, w):
        return ops.trig_tangent_loss(F, x, v, t, F_plus=Fp, F_minus=Fm, h=h, logvar=lv, weight=w, r=0.8)
    with ops.use_backend("torch"):
        got = torch.func.vmap(one)(*stacked)
        want = torch.stack([one(*(d[k] for k in names)) for d in (a, b)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ---- r as a one-element tensor (cmfast-train --cuda-graph: the captured step reads r from a buffer) ---------------
@pytest.mark.triton_cpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fd", [True, False])
def test_r_tensor_gives_the_number_result(backend, fd):
    if backend == "triton":
        pytest.importorskip("triton")
    kw = _inputs(3, 3, 16, 16, torch.float32, fd)
    want = _truth(*(kw[k] for k in _KEYS), 0.375, 0.5, 0.1)
    num = _run(backend, kw, 0.375)
    for r in (torch.tensor(0.375), torch.tensor([0.375]), torch.tensor([[0.375]], dtype=torch.float64)):
        got = _run(backend, kw, r)
        for g, n, w in zip(got, num, want):
            assert torch.equal(g, n)                       # 0.375 is exact in fp32: the same numbers
            assert _err(g, w) < 1e-4
    # and the tensor's value is what counts: r = 0 drops the second term
    zero = _run(backend, kw, torch.zeros(1))
    assert torch.equal(zero[0], _run(backend, kw, 0.0)[0]) and not torch.equal(zero[0], num[0])


def test_r_checked():
    kw = _inputs(2, 3, 4, 4, torch.float32)
    call = lambda r: ops.trig_tangent_loss(kw["F"], kw["x_t"], kw["dxdt"], kw["t"], dFdt=kw["F"], r=r)  # noqa: E731
    with pytest.raises(ValueError, match=r"r: expected a number or a one-element tensor, got shape \(2,\)"):
        call(torch.ones(2))
    with pytest.raises(TypeError, match="r"):
        call(torch.ones(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="r: expected a number >= 0"):
        call(-0.5)
    with pytest.raises(TypeError, match="r: expected a number >= 0"):
        call("1")
