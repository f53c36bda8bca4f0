"""The kernel backends under torch.func on a GPU (tests/test_ops_functorch.py checks the same rules on CPU: Triton in
its interpreter, the CUDA extension emulated): vmap of the compiled kernels equals a loop of plain calls, and per-sample
gradients of a tiny UNet through the Triton kernels equal one gradient per sample and the torch backend's."""
import pytest
import torch
from torch.func import vmap

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
    from test_ops_functorch import unet_per_sample_gradients_match
    unet_per_sample_gradients_match("cuda", res=16, x=torch.randn(4, 3, 16, 16, device="cuda"),
                                    s=torch.tensor([2.0, 0.3, 10.0, 0.05], device="cuda"), rtol_torch=2e-3)
