"""The kernel backends under torch.func (cmfast/ops/_batching.py): vmap of each op equals a loop of it over the
vmapped dimension, torch.func.grad / vjp / jacrev equal torch.autograd's, and per-sample gradients (vmap of grad,
the parameters shared) equal one gradient per sample; all against the float64 references
of tests/reference.py.

Before, their autograd.Functions had the old forward(ctx, ...) style, which functorch refuses: 'auto' ran the torch
composition under any transform and a kernel backend named explicitly raised. Forward mode (jvp, jacfwd) still has no
rule: 'auto' is the torch composition there, a named kernel backend one clear error.

Without a GPU the Triton kernels run in the interpreter (tiny shapes) and the CUDA wrappers (cmfast/ops/_cuda.py)
drive the emulated extension on CPU tensors (tests/test_csrc_emulated.py builds it).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is imported (as tests/test_ops_triton.py)
pytest.importorskip("triton")

import reference as ref  # noqa: E402

import cmfast  # noqa: E402
from cmfast import ops  # noqa: E402
from cmfast.ops import _torch  # noqa: E402
from cmfast.ops import _torch_trig_tangent_loss as _torch_trig  # noqa: E402

pytestmark = pytest.mark.triton_cpu
BACKENDS = ("triton", "cuda")
# fp32 kernels against the float64 torch composition; the tiny shapes' sums stay far below these
TOL64 = dict(rtol=1e-4, atol=2e-5)
# the same kernels folded (one call on V * N samples) against a loop of calls on N: only the launch geometry
# (split counts) may differ, so the sums may round in another order
TOL_LOOP = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    import test_csrc_emulated    # skips the module's tests where g++ / the CUDA headers are missing
    return test_csrc_emulated.load_emulated(tmp_path_factory.mktemp("csrc_emu"))


@pytest.fixture
def backend(request, monkeypatch):
    """The op functions of the backend under test: triton through cmfast.ops' dispatch (the backend named), cuda as
    its wrappers on CPU tensors over the emulated extension (the dispatch refuses CPU tensors for it)."""
    name = request.param
    if name == "triton":
        if ops.interpreter_problem():
            pytest.skip(ops.interpreter_problem())
        with ops.use_backend("triton"):
            yield ops
        return
    import test_csrc_emulated
    from cmfast.ops import _cuda
    test_csrc_emulated.wrappers_on_cpu(request.getfixturevalue("emulated"), monkeypatch)
    yield _cuda


def _r(*shape, scale=1.0):
    return torch.randn(*shape) * scale


# Each case: (op, fn(m, *tensors) with m the backend's functions, the tensors of one call (dim 0 the op's batch for
# the per-sample ones), the indices of the parameters shared by the batch, the indices with a gradient)
def _cases():
    N, C = 2, 4
    return {
        "skip_output": (lambda m, x, F, s: m.skip_output(x, F, s, 0.5, 0.002),
                        (_r(N, C, 3, 3), _r(N, C, 3, 3), torch.tensor([0.3, 4.0])), (), (0, 1)),
        "group_norm_act": (lambda m, x, sc, sh, w, b: m.group_norm_act(x, 2, w, b, 1e-6, sc, sh, "silu"),
                           (_r(N, C, 3, 3), _r(N, C, scale=0.2), _r(N, C, scale=0.2), 1 + _r(C, scale=0.3),
                            _r(C, scale=0.3)), (3, 4), (0, 1, 2, 3, 4)),
        "attention": (lambda m, q, k, v: m.attention(q, k, v, 0.5), (_r(N, 2, 5, 4), _r(N, 2, 6, 4), _r(N, 2, 6, 4)),
                      (), (0, 1, 2)),
        "residual": (lambda m, x, skip, b: m.residual(x, skip, b, 0.7), (_r(N, C, 3, 3), _r(N, C, 3, 3), _r(C)),
                     (2,), (0, 1, 2)),
        "consistency_loss": (lambda m, p, t, w: m.consistency_loss(p, t, "pseudo_huber", 0.3, w),
                             (_r(N, C, 3, 3), _r(N, C, 3, 3), 1 + torch.rand(N)), (), (0, 2)),
        # differentiable in F and logvar (sCM Alg. 1: the rest is stop-gradient); with dF/dt given (the finite-
        # difference pair's step check is a value-dependent branch, which vmap refuses)
        "trig_tangent_loss": (_trig, (_r(N, C, 3, 3), _r(N, C, 3, 3), _r(N, C, 3, 3), torch.tensor([0.4, 1.2]),
                                      _r(N, C, 3, 3), _r(N, scale=0.5), 1 + torch.rand(N)), (), (0, 5)),
    }


def _trig(m, F, x_t, dxdt, t, dFdt, logvar, weight):
    if m in (ref, _torch):      # the torch composition keeps float64 (tests/reference.py has none of its own)
        return _torch_trig.trig_tangent_loss(F, x_t, dxdt, t, None, None, None, dFdt, logvar, weight, 1.0, 0.5, 0.1)
    return m.trig_tangent_loss(F, x_t, dxdt, t, dFdt=dFdt, logvar=logvar, weight=weight, r=1.0, sigma_data=0.5,
                               c=0.1)


# the cuda backend has kernels for three of the ops
CASES = [pytest.param(b, op, id=f"{b}-{op}") for b in BACKENDS for op in _cases()
         if b == "triton" or op in ("skip_output", "group_norm_act", "consistency_loss")]


def _f64(ts):
    return [t.double() for t in ts]


def _ref(fn):
    """fn on the float64 references of tests/reference.py (the torch composition written out in float64)."""
    return lambda *ts: fn(ref, *ts)


@pytest.mark.parametrize("backend,op", CASES, indirect=["backend"])
def test_vmap_equals_a_loop_of_the_op(backend, op):
    """vmap over V calls (the vmapped dimension at dim 1 for the first tensor, 0 for the others): one folded call,
    equal to V calls of the op, and to the float64 torch composition."""
    fn, one, shared, _ = _cases()[op]
    V = 3
    ts = [t if i in shared else torch.stack([t * (1 + 0.5 * j) + 0.1 * j for j in range(V)])
          for i, t in enumerate(one)]
    in_dims = tuple(None if i in shared else 0 for i in range(len(ts)))
    ts[0], in_dims = ts[0].movedim(0, 1), (1, *in_dims[1:])
    got = vmap(lambda *a: fn(backend, *a), in_dims=in_dims)(*ts)
    slices = [[t if d is None else t.select(d, j) for t, d in zip(ts, in_dims)] for j in range(V)]
    loop = torch.stack([fn(backend, *s) for s in slices])
    torch.testing.assert_close(got, loop, **TOL_LOOP)
    want = torch.stack([_ref(fn)(*_f64(s)) for s in slices])
    torch.testing.assert_close(got.double(), want, **TOL64)


@pytest.mark.parametrize("backend,op", [c for c in CASES if c.values[1] in ("group_norm_act", "residual")],
                         indirect=["backend"])
def test_a_vmapped_parameter_loops_over_its_slices(backend, op):
    """A parameter vmapped per call (each slice its own affine / bias) cannot fold into the batch: the rule loops."""
    fn, one, shared, _ = _cases()[op]
    V = 2
    ts = [torch.stack([t + 0.3 * j for j in range(V)]) for t in one]    # everything vmapped, parameters too
    got = vmap(lambda *a: fn(backend, *a))(*ts)
    want = torch.stack([_ref(fn)(*_f64([t[j] for t in ts])) for j in range(V)])
    torch.testing.assert_close(got.double(), want, **TOL64)
    assert not torch.allclose(want[0], want[1])


def _loss_of(fn, m, cot):
    return lambda *ts: (fn(m, *ts) * cot).sum()


@pytest.mark.parametrize("backend,op", CASES, indirect=["backend"])
def test_grad_and_vjp_equal_autograd(backend, op):
    """torch.func.grad and vjp through the kernels equal torch.autograd.grad of the same call (and the float64 torch
    composition's gradients)."""
    fn, ts, _, diff = _cases()[op]
    cot = torch.randn_like(fn(_torch, *ts))
    got = grad(_loss_of(fn, backend, cot), argnums=diff)(*ts)
    leaves = [t.clone().requires_grad_(i in diff) for i, t in enumerate(ts)]
    want = torch.autograd.grad(_loss_of(fn, backend, cot)(*leaves), [leaves[i] for i in diff])
    leaves64 = [t.double().requires_grad_(i in diff) for i, t in enumerate(ts)]
    want64 = torch.autograd.grad(_loss_of(fn, ref, cot.double())(*leaves64), [leaves64[i] for i in diff])

    def with_diff(*d):
        a = list(ts)
        for i, t in zip(diff, d):
            a[i] = t
        return fn(backend, *a)
    out, pullback = vjp(with_diff, *(ts[i] for i in diff))
    torch.testing.assert_close(out, fn(backend, *ts), rtol=0, atol=0)
    for g, v, w, w64 in zip(got, pullback(cot), want, want64):
        torch.testing.assert_close(g, w, rtol=0, atol=0)     # the same kernels, the same backward
        torch.testing.assert_close(v, w, rtol=0, atol=0)
        torch.testing.assert_close(g.double(), w64, **TOL64)
        assert float(w64.abs().max()) > 1e-3


@pytest.mark.parametrize("backend,op", CASES, indirect=["backend"])
def test_per_sample_gradients_equal_one_gradient_per_sample(backend, op):
    """vmap(grad(f)) over the samples, the shared parameters not vmapped (the usual per-sample gradients): the
    backward kernels run batched (their own fold rules) and each parameter's gradient is per sample, not summed over
    the vmapped samples. Equal to one grad per sample and to the float64 torch composition."""
    fn, ts, shared, diff = _cases()[op]
    cot = torch.randn_like(fn(_torch, *ts))

    def sample_loss(m, c):
        def f(*a):
            a = [t if i in shared else t[None] for i, t in enumerate(a)]
            return (fn(m, *a)[0] * c).sum()
        return f
    in_dims = tuple(None if i in shared else 0 for i in range(len(ts)))
    got = vmap(lambda c, *a: grad(sample_loss(backend, c), argnums=diff)(*a), in_dims=(0, *in_dims))(cot, *ts)
    for j in range(ts[0].shape[0]):
        one = [t if i in shared else t[j] for i, t in enumerate(ts)]
        loop = grad(sample_loss(backend, cot[j]), argnums=diff)(*one)
        want = grad(sample_loss(ref, cot[j].double()), argnums=diff)(*_f64(one))
        for g, w, w64 in zip(got, loop, want):
            torch.testing.assert_close(g[j], w, **TOL_LOOP)
            torch.testing.assert_close(g[j].double(), w64, **TOL64)
    for i, g in zip(diff, got):
        if i in shared:     # a parameter's per-sample gradients differ between the samples (not one sum, twice)
            assert not torch.allclose(g[0], g[1])
    data = tuple(i for i in diff if i not in shared)
    if len(data) < len(diff):   # without the parameters' gradients the backward folds too (no sum over the batch)
        only = vmap(lambda c, *a: grad(sample_loss(backend, c), argnums=data)(*a), in_dims=(0, *in_dims))(cot, *ts)
        for g, w in zip(only, (g for i, g in zip(diff, got) if i in data)):
            torch.testing.assert_close(g, w, **TOL_LOOP)


@pytest.mark.parametrize("backend,op", CASES, indirect=["backend"])
def test_jacrev_equals_the_float64_jacobian(backend, op):
    """jacrev: the backward runs vmapped over the basis cotangents, with the saved tensors not vmapped (the fold
    broadcasts them)."""
    fn, ts, _, diff = _cases()[op]
    ts = [t[:1] if t.dim() and t.shape[0] == 2 else t for t in ts]     # one sample: a small Jacobian

    def f(m, cast):
        def g(d):
            a = [cast(t) for t in ts]
            a[diff[0]] = d
            return fn(m, *a)
        return g
    got = jacrev(f(backend, lambda t: t))(ts[diff[0]])
    want = jacrev(f(ref, torch.Tensor.double))(ts[diff[0]].double())
    torch.testing.assert_close(got.double(), want, **TOL64)
    assert float(want.abs().max()) > 1e-2


def test_skip_output_infer_and_the_pre_add_under_vmap():
    """The no-autograd paths that launch kernels directly (the sampler's epilogue, GroupNorm's fused pre-add) go
    through their Functions under vmap: equal to a loop."""
    if ops.interpreter_problem():
        pytest.skip(ops.interpreter_problem())
    x, F, s = _r(2, 2, 3, 4, 4), _r(2, 2, 3, 4, 4), torch.tensor([[0.3, 2.0], [1.0, 9.0]])
    pre, w = _r(2, 1, 4, scale=0.5), _r(4)
    with ops.use_backend("triton"), torch.no_grad():
        got = vmap(lambda a, b, c: ops.skip_output_infer(a, b, c))(x, F, s)
        loop = torch.stack([ops.skip_output_infer(x[j], F[j], s[j]) for j in range(2)])
        gn = vmap(lambda a, p: ops.group_norm_act(a[:, :4].reshape(2, 4, 3, 4), 2, w, None, pre_bias=p))(x, pre)
    torch.testing.assert_close(got, loop, rtol=0, atol=0)
    want = torch.stack([ref.group_norm_act(x[j, :, :4].reshape(2, 4, 3, 4).double() + pre[j, :, :, None, None],
                                              2, w.double(), None, 1e-6, None, None, "silu") for j in range(2)])
    torch.testing.assert_close(gn.double(), want, **TOL64)


# ---- the dispatch ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", ["jvp", "jacfwd"])
def test_a_kernel_backend_named_under_forward_mode_is_one_clear_error(backend, transform):
    w, x = torch.ones(4), torch.randn(1, 4, 4, 4)
    f = lambda a: ops.group_norm_act(a, 2, w, None)     # noqa: E731
    run = (lambda: jvp(f, (x,), (x,))) if transform == "jvp" else (lambda: torch.func.jacfwd(f)(x))
    with ops.use_backend(backend), pytest.raises(ops.BackendUnavailable,
                                                 match=rf"^backend '{backend}' cannot run under torch.func's jvp "
                                                       rf"transform \(forward mode: jvp, jacfwd, hessian\): [^\n]*$"):
        run()


def test_auto_takes_the_table_under_vmap_and_grad_and_torch_under_forward_mode(monkeypatch):
    """'auto' on CUDA picks kernels from the measured table: now under vmap and grad too (their rules exist), still the
    torch composition under jvp / jacfwd. Here the table is made to pick triton (the interpreter on CPU)."""
    monkeypatch.setattr(ops, "_auto_choice", lambda *a, **k: "triton")
    cpu = torch.device("cpu")
    picked = []

    def probe(x):
        picked.append(ops.implementation("group_norm_act", cpu))
        return x.sum()
    x = torch.randn(3)
    with ops.use_backend("auto"):
        vmap(probe)(torch.randn(2, 3))
        grad(probe)(x)
        vmap(grad(probe))(torch.randn(2, 3))
        jvp(probe, (x,), (x,))
        torch.func.jacfwd(probe)(x)                                          # vmap over jvp
    triton, torch_ = ops._module("triton").group_norm_act, ops._module("torch").group_norm_act
    assert picked == [triton, triton, triton, torch_, torch_]


def unet_per_sample_gradients_match(device="cpu", res=8, x=None, s=None, rtol_torch=1e-3):
    """Per-sample gradients of a consistency model (tiny UNet: GroupNorm, attention, residual joins and the skip
    output all through the Triton kernels) by vmap(grad): equal to one grad per sample, and to the torch backend's.
    Also run on a GPU by tests/test_functorch_gpu.py."""
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", img_resolution=res)
    with torch.no_grad():           # away from the zero-initialized output layer: the network term counts
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m = cmfast.ConsistencyModel(net).to(device).eval()
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(2, 3, res, res, device=device) if x is None else x
    s = torch.tensor([2.0, 0.3], device=device) if s is None else s
    B = x.shape[0]

    def loss(p, xi, si):
        return functional_call(m, p, (xi[None], si[None])).pow(2).mean()
    with ops.use_backend("triton"):
        got = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, s)
        one = [grad(loss)(params, x[j], s[j]) for j in range(B)]
    with ops.use_backend("torch"):
        want = [grad(loss)(params, x[j], s[j]) for j in range(B)]
    assert sum(float(g.abs().sum()) for g in want[0].values()) > 0
    for k in got:
        for j in range(B):
            torch.testing.assert_close(got[k][j], one[j][k], rtol=1e-4, atol=1e-6, msg=lambda m_: f"{k}: {m_}")
            torch.testing.assert_close(got[k][j], want[j][k], rtol=rtol_torch, atol=1e-5, msg=lambda m_: f"{k}: {m_}")


# torch's own note that SDPA has no vmap batching rule on CPU (it loops): not ours to act on
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_tiny_unet_per_sample_gradients_with_the_triton_kernels():
    if ops.interpreter_problem():
        pytest.skip(ops.interpreter_problem())
    unet_per_sample_gradients_match()
