"""The kernel backends under torch.func on a GPU (tests/test_ops_functorch.py checks the same rules on CPU: Triton in
its interpreter, the CUDA extension emulated): vmap of the compiled kernels equals a loop of plain calls, and per-sample
gradients of a tiny UNet through the Triton kernels equal one gradient per sample and the torch backend's."""
import pytest
import torch
from torch.func import functional_call, grad, vmap

import cmfast
from cmfast import ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_vmap_of_group_norm_act_equals_the_loop(backend):
    # (no channels-last case: torch.func cannot query a layout inside vmap; the rules fold to contiguous tensors)
    g = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(3, 2, 64, 16, 16, device="cuda", generator=g)      # 3 vmapped calls of a (2, 64, 16, 16) batch
    w, b = torch.randn(64, device="cuda", generator=g), torch.randn(64, device="cuda", generator=g)
    sc, sh = torch.randn(3, 2, 64, device="cuda", generator=g), torch.randn(3, 2, 64, device="cuda", generator=g)

    def f(x, scale, shift):
        return ops.group_norm_act(x, 32, w, b, scale=scale, shift=shift, act="silu")
    with ops.use_backend(backend):
        got = vmap(f)(X, sc, sh)
        loop = torch.stack([f(X[i], sc[i], sh[i]) for i in range(3)])
    with ops.use_backend("torch"):
        want = torch.stack([f(X[i].double(), sc[i].double(), sh[i].double()) for i in range(3)])
    torch.testing.assert_close(got, loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_tiny_unet_per_sample_gradients_with_the_triton_kernels_on_cuda():
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", img_resolution=16)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m = cmfast.ConsistencyModel(net).cuda().eval()
    params = {k: v.detach() for k, v in m.named_parameters()}
    x, s = torch.randn(4, 3, 16, 16, device="cuda"), torch.tensor([2.0, 0.3, 10.0, 0.05], device="cuda")

    def loss(p, xi, si):
        return functional_call(m, p, (xi[None], si[None])).pow(2).mean()
    with ops.use_backend("triton"):
        got = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, s)
        one = [grad(loss)(params, x[j], s[j]) for j in range(4)]
    with ops.use_backend("torch"):
        want = [grad(loss)(params, x[j], s[j]) for j in range(4)]
    for k in got:
        for j in range(4):
            torch.testing.assert_close(got[k][j], one[j][k], rtol=1e-4, atol=1e-6, msg=lambda m_: f"{k}: {m_}")
            torch.testing.assert_close(got[k][j], want[j][k], rtol=2e-3, atol=1e-5, msg=lambda m_: f"{k}: {m_}")
