"""cmfast with the usual PyTorch machinery: dtype conversion of whole models, torch.compile, ..."""
import copy

import pytest
import torch

import cmfast
from cmfast.trigflow import TrigFlowModel


def _random_tiny(seed: int = 0) -> torch.nn.Module:
    """A smaller tiny UNet (16 x 16, every block type) with O(1) random weights everywhere (the initialization's 1e-5
    output layer would leave F ~ 0, and every dtype would agree by accident)."""
    torch.manual_seed(seed)
    net = cmfast.UNet.from_preset("tiny", img_resolution=16, model_channels=8)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.dim() >= 2 else 0.1))
    return net.eval()


@pytest.mark.parametrize("wrap", [cmfast.ConsistencyModel, cmfast.EDMDenoiser, TrigFlowModel])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.float16, 0.03), (torch.bfloat16, 0.15)])
def test_model_converted_with_to_dtype_runs_its_backbone_in_that_dtype(wrap, dtype, tol):
    # model.half() / .bfloat16() / .double() raised "mat1 and mat2 must have the same dtype" (the fp32 noise
    # embedding met the converted Linear layers). Now the backbone runs in the model's dtype, the preconditioning
    # in fp32 (DESIGN 2), and the output is fp32.
    model = wrap(_random_tiny())
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.7, 3.0])
    want = model(x, sigma)
    assert (want - model(x, 0.002 if wrap is cmfast.ConsistencyModel else 1e-3)).abs().max() > 0.3   # F matters
    low = copy.deepcopy(model).to(dtype)
    for xin in (x, x.to(dtype)):
        got = low(xin, sigma)
        assert got.dtype == torch.float32
        err = (got - want).abs().max().item()
        assert 0 <= err < tol, (dtype, xin.dtype, err)
    s = sigma if wrap is not TrigFlowModel else torch.atan(sigma / 0.5)
    assert low.backbone(x, s).dtype == dtype
    if wrap is cmfast.ConsistencyModel:
        assert torch.equal(low(x, 0.002), x)        # the boundary condition stays exact (fp32 skip connection)
