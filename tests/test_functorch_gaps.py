"""Gaps the mutation round of a1a2a9d (the kernel backends under torch.func, cmfast/ops/_batching.py) found in
tests/test_ops_functorch.py, whose cases and helpers these tests reuse: vmapped dimensions other than 0 and 1,
per-sample tensors not vmapped beside vmapped ones (the fold broadcasts them), a vjp's cotangent not vmapped, a
vmapped parameter at dim 1, per-sample gradients of one GroupNorm parameter alone, and a per-call weight in the
GroupNorm backward. Each compares the kernels under the transform with a loop of plain calls and with the float64
torch composition of tests/reference.py.
"""
from __future__ import annotations

import pytest
import reference as ref
import torch
from torch.func import grad, vjp, vmap

from test_ops_functorch import CASES, TOL64, TOL_LOOP, _cases, _f64, _ref, backend, emulated  # noqa: F401

pytestmark = pytest.mark.triton_cpu


def _vmapped(one, shared, V, at):
    """V variants of a case's tensors (not affine in each other: GroupNorm would undo that) stacked at dim at(i, t)
    (None: the tensor as it is, not vmapped)."""
    ts, dims = [], []
    for i, t in enumerate(one):
        d = None if i in shared else at(i, t)
        ts.append(t if d is None else torch.stack([t * (1 + 0.5 * j) + 0.1 * j * t * t for j in range(V)], d))
        dims.append(d)
    return ts, tuple(dims)


def _check_against_loop(fn, backend, ts, in_dims, V):
    got = vmap(lambda *a: fn(backend, *a), in_dims=in_dims)(*ts)
    slices = [[t if d is None else t.select(d, j) for t, d in zip(ts, in_dims)] for j in range(V)]
    torch.testing.assert_close(got, torch.stack([fn(backend, *s) for s in slices]), **TOL_LOOP)
    want = torch.stack([_ref(fn)(*_f64(s)) for s in slices])
    torch.testing.assert_close(got.double(), want, **TOL64)
    assert not torch.allclose(want[0], want[1])


@pytest.mark.parametrize("backend,op", CASES, indirect=["backend"])
def test_vmap_with_the_vmapped_dim_last(backend, op):
    """Every per-sample tensor vmapped at its last dim (dim 4 of an image, dim 1 of a per-sample vector): the fold
    moves it to the front (movedim(d, 0), not movedim(0, d), which agree only for d = 1), and a per-sample argument
    the rule did not fold (sigma, the loss weight) would be read in the (N, V) order."""
    fn, one, shared, _ = _cases()[op]
    ts, in_dims = _vmapped(one, shared, 3, lambda i, t: t.dim())
    _check_against_loop(fn, backend, ts, in_dims, 3)


@pytest.mark.parametrize("backend,op", CASES, indirect=["backend"])
def test_vmap_of_the_first_tensor_alone(backend, op):
    """Only the first tensor vmapped; the other per-sample tensors (sigma, scale/shift, k/v, the skip, the target
    and weight) the same in every call: the fold broadcasts them to V copies of the batch."""
    fn, one, shared, _ = _cases()[op]
    ts, in_dims = _vmapped(one, set(range(1, len(one))), 3, lambda i, t: 0)
    _check_against_loop(fn, backend, ts, in_dims, 3)


@pytest.mark.parametrize("backend,op", [c for c in CASES if c.values[1] in ("group_norm_act", "residual")],
                         indirect=["backend"])
def test_a_parameter_vmapped_at_dim_1_loops_over_that_dim(backend, op):
    """A parameter vmapped per call at dim 1 (weight (C, V)) and the data at dim 1: the loop selects each slice
    along the vmapped dim of each argument."""
    fn, one, _, _ = _cases()[op]
    ts, in_dims = _vmapped(one, (), 2, lambda i, t: 1)
    _check_against_loop(fn, backend, ts, in_dims, 2)


@pytest.mark.parametrize("backend,op", CASES, indirect=["backend"])
def test_vmap_of_vjp_with_one_cotangent_for_every_call(backend, op):
    """vmap over the inputs of a vjp whose cotangent is not vmapped: the backward kernels get batched saved tensors
    and an unbatched incoming gradient, which the fold broadcasts."""
    fn, one, shared, diff = _cases()[op]
    cot = torch.randn_like(fn(backend, *one))
    ts, in_dims = _vmapped(one, shared, 2, lambda i, t: 0)

    def pull(m, cast):
        def f(*a):
            def with_diff(*d):
                b = list(a)
                for i, t in zip(diff, d):
                    b[i] = t
                return fn(m, *b)
            return vjp(with_diff, *(a[i] for i in diff))[1](cast(cot))
        return f
    got = vmap(pull(backend, lambda c: c), in_dims=in_dims)(*ts)
    for j in range(2):
        s = [t if d is None else t.select(d, j) for t, d in zip(ts, in_dims)]
        loop = pull(backend, lambda c: c)(*s)
        want = pull(ref, torch.Tensor.double)(*_f64(s))
        for g, w, w64 in zip(got, loop, want):
            torch.testing.assert_close(g[j], w, **TOL_LOOP)
            torch.testing.assert_close(g[j].double(), w64, **TOL64)


def _gn(m, x, sc, sh, w, b):
    return m.group_norm_act(x, 2, w, b, 1e-6, sc, sh, "silu")


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
@pytest.mark.parametrize("argnum", [3, 4], ids=["weight", "bias"])
def test_per_sample_gradient_of_one_group_norm_parameter(backend, argnum):
    """vmap(grad) of the GroupNorm weight's or bias's gradient alone: each sums over the batch, so the CUDA backward
    loops where either one is asked for (not only the weight), and the per-sample gradients are not one sum."""
    _, ts, shared, _ = _cases()["group_norm_act"]
    cot = torch.randn(ts[0].shape)

    def sample_loss(m, c):
        return lambda x, sc, sh, w, b: (_gn(m, x[None], sc[None], sh[None], w, b)[0] * c).sum()
    in_dims = (0, 0, 0, 0, None, None)
    got = vmap(lambda c, *a: grad(sample_loss(backend, c), argnums=argnum)(*a), in_dims=in_dims)(cot, *ts)
    for j in range(2):
        one = [t if i in shared else t[j] for i, t in enumerate(ts)]
        torch.testing.assert_close(got[j], grad(sample_loss(backend, cot[j]), argnums=argnum)(*one), **TOL_LOOP)
        want = grad(sample_loss(ref, cot[j].double()), argnums=argnum)(*_f64(one))
        torch.testing.assert_close(got[j].double(), want, **TOL64)
    assert not torch.allclose(got[0], got[1])


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
@pytest.mark.parametrize("argnums", [(0,), (0, 1)], ids=["x", "x-weight"])
def test_per_sample_gradients_with_a_weight_per_call(backend, argnums):
    """vmap over (x, weight, bias) of the gradient w.r.t. x (and the weight): the backward kernels see a vmapped
    parameter (a different affine per call) and loop over it, also where no parameter gradient makes them loop."""
    _, (x, sc, sh, w, b), _, _ = _cases()["group_norm_act"]
    V = 2
    ws, bs = torch.stack([w, w * 0.5 - 0.2]), torch.stack([b, b + 0.3])
    xs, cot = torch.stack([x, x * 1.5 + 0.1]), torch.randn(V, *x.shape)

    def loss(m, c):
        return lambda x_, w_, b_: (_gn(m, x_, sc, sh, w_, b_) * c).sum()
    got = vmap(lambda c, *a: grad(loss(backend, c), argnums=argnums)(*a))(cot, xs, ws, bs)
    for j in range(V):
        loop = grad(loss(backend, cot[j]), argnums=argnums)(xs[j], ws[j], bs[j])
        want = grad(loss(ref, cot[j].double()), argnums=argnums)(*_f64((xs[j], ws[j], bs[j])))
        for g, u, w64 in zip(got, loop, want):
            torch.testing.assert_close(g[j], u, **TOL_LOOP)
            torch.testing.assert_close(g[j].double(), w64, **TOL64)


@pytest.mark.parametrize("backend,op", [c for c in CASES if c.values[0] == "triton" and c.values[1] in
                                        ("group_norm_act", "residual", "skip_output")], indirect=["backend"])
def test_vmap_with_shared_parameters_is_one_folded_launch(backend, op, monkeypatch):
    """The rule's point: V calls of an op whose parameters are shared (not vmapped) are one kernel launch on V * N
    samples, not V launches (the loop is for a vmapped parameter only). Counted at the forward launcher; the values
    equal a loop of the op."""
    from cmfast.ops import _triton
    mod, name = {"group_norm_act": (_triton._gn, "group_norm_act_fwd"), "residual": (_triton._res, "residual_fwd"),
                 "skip_output": (_triton._skip, "skip_output_fwd")}[op]
    calls = []
    launch = getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a, **k: calls.append(a[0].shape[0]) or launch(*a, **k))
    fn, one, shared, _ = _cases()[op]
    ts, in_dims = _vmapped(one, shared, 3, lambda i, t: 0)
    got = vmap(lambda *a: fn(backend, *a), in_dims=in_dims)(*ts)
    assert calls == [3 * one[0].shape[0]]
    loop = torch.stack([fn(backend, *[t if d is None else t[j] for t, d in zip(ts, in_dims)]) for j in range(3)])
    torch.testing.assert_close(got, loop, **TOL_LOOP)


@pytest.mark.parametrize("backend,op", [c for c in CASES if c.values[1] in ("skip_output", "group_norm_act",
                                                                              "consistency_loss")],
                         indirect=["backend"])
def test_plain_gradients_keep_a_channels_last_layout(backend, op):
    """Outside a transform (the eager twin) the gradients of channels-last images stay channels-last, as before the
    torch.func style (only under a transform do they come NCHW-contiguous), with the float64 values."""
    fn, ts, _, diff = _cases()[op]
    cl = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in ts]
    leaves = [t.clone(memory_format=torch.preserve_format).requires_grad_(i in diff) for i, t in enumerate(cl)]
    cot = torch.randn_like(fn(backend, *ts))
    got = torch.autograd.grad((fn(backend, *leaves) * cot).sum(), [leaves[i] for i in diff])
    leaves64 = [t.double().requires_grad_(i in diff) for i, t in enumerate(ts)]
    want = torch.autograd.grad((fn(ref, *leaves64) * cot.double()).sum(), [leaves64[i] for i in diff])
    for i, g, w in zip(diff, got, want):
        if ts[i].dim() == 4:
            assert g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous(), (i, g.stride())
        torch.testing.assert_close(g.double(), w, **TOL64)


@pytest.mark.parametrize("backend,op", CASES, indirect=["backend"])
def test_a_plain_call_takes_the_old_style_twin(backend, op):
    """Outside a transform the op runs its Function's eager twin (cmfast/ops/_batching.py eager_twin: PyTorch's apply
    of a setup_context Function binds the arguments on every call, tripling a small call's host time): the node is
    the twin's, and its output the op's alone, equal to the transform path's."""
    fn, ts, _, diff = _cases()[op]
    leaves = [t.clone().requires_grad_(i in diff) for i, t in enumerate(ts)]
    y = fn(backend, *leaves)
    assert "Eager" in type(y.grad_fn).__name__, type(y.grad_fn).__name__
    out, _ = vjp(lambda d: fn(backend, d, *ts[1:]), ts[0])     # the same op through cls.apply and its rules
    torch.testing.assert_close(y, out, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
@pytest.mark.parametrize("uint8", [False, True])
@pytest.mark.parametrize("sigma_dim", [None, 1], ids=["sigma-shared", "sigma-at-1"])
def test_skip_output_infer_under_vmap_with_sigma_shared_or_at_dim_1(backend, uint8, sigma_dim):
    """The sampler epilogue under vmap (x at dim 2, F at 0): sigma the same for every call (broadcast by the fold) or
    vmapped at dim 1; equal to a loop of the plain calls, and the float values to float64 clamp(c_skip x + c_out F)."""
    g = torch.Generator().manual_seed(3)
    V, N = 3, 2
    x, F = torch.randn(N, 3, V, 4, 4, generator=g), torch.randn(V, N, 3, 4, 4, generator=g)
    s = torch.tensor([0.3, 2.0]) if sigma_dim is None else torch.tensor([[0.3, 1.0, 4.0], [2.0, 9.0, 0.05]])
    f = lambda a, b, c: backend.skip_output_infer(a, b, c, 0.5, 0.002, uint8)     # noqa: E731
    with torch.no_grad():
        got = vmap(f, in_dims=(2, 0, sigma_dim))(x, F, s)
        sl = [(x[:, :, j], F[j], s if sigma_dim is None else s[:, j]) for j in range(V)]
        torch.testing.assert_close(got, torch.stack([f(*a) for a in sl]), rtol=0, atol=0)
    if not uint8:
        for j, (a, b, c) in enumerate(sl):
            want = ref.skip_output(a.double(), b.double(), c.double(), 0.5, 0.002).clamp(-1, 1)
            torch.testing.assert_close(got[j].double(), want, **TOL64)


@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("diff", [(1,), (0, 1, 2)], ids=["target", "all"])
def test_plain_consistency_loss_gradient_of_the_target(backend, fmt, diff):
    """CUDA (triton's target is stop-gradient): a target with a gradient (rare), alone or with pred and the weight:
    the forward computes the gradient where only the target needs it, and d loss / d target comes in the target's
    layout with the float64 values (the CUDA backward rebuilds it from the (B, d) gradient in the forward's order)."""
    fn, ts, _, _ = _cases()["consistency_loss"]
    ts = [t.contiguous(memory_format=fmt) if t.dim() == 4 else t for t in ts]
    leaves = [t.clone(memory_format=torch.preserve_format).requires_grad_(i in diff) for i, t in enumerate(ts)]
    cot = torch.randn(ts[0].shape[0])
    got = torch.autograd.grad((fn(backend, *leaves) * cot).sum(), [leaves[i] for i in diff])
    leaves64 = [t.double().requires_grad_(i in diff) for i, t in enumerate(ts)]
    want = torch.autograd.grad((fn(ref, *leaves64) * cot.double()).sum(), [leaves64[i] for i in diff])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **TOL64)
    assert got[diff.index(1)].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_forward_mode_outside_a_vmap_is_refused_too(backend_name):
    """jvp of vmap(f): the forward-mode level is below the vmap level in torch.func's stack, and the refusal looks at
    every level (not only the innermost): one BackendUnavailable line, as for jvp and jacfwd."""
    from cmfast import ops
    w, x = torch.ones(4), torch.randn(2, 1, 4, 4, 4)
    f = vmap(lambda a: ops.group_norm_act(a, 2, w, None))
    with ops.use_backend(backend_name), pytest.raises(ops.BackendUnavailable,
                                                      match=rf"^backend '{backend_name}' cannot run under torch.func's "
                                                            rf"jvp transform \(forward mode: jvp, jacfwd, hessian\)"):
        torch.func.jvp(f, (x,), (x,))


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
def test_group_norm_pre_add_under_vmap(backend):
    """GroupNorm's fused pre-add (forward only) under vmap, the pre-bias vmapped per call: the add in x's dtype, then
    the Function and its fold rule; equal to the float64 GN of x + pre_bias for each call."""
    g = torch.Generator().manual_seed(4)
    x, pre, w = torch.randn(2, 2, 4, 3, 4, generator=g), torch.randn(2, 2, 4, generator=g) * 0.5, torch.randn(4)
    with torch.no_grad():
        got = vmap(lambda a, p: backend.group_norm_act(a, 2, w, None, 1e-6, None, None, "silu", pre_bias=p))(x, pre)
    want = torch.stack([ref.group_norm_act(x[j].double() + pre[j, :, :, None, None].double(), 2, w.double(), None,
                                           1e-6, None, None, "silu") for j in range(2)])
    torch.testing.assert_close(got.double(), want, **TOL64)
