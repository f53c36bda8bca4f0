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


class _Toy(torch.nn.Module):
    """A backbone that uses its noise input (dynamo traces it in a fraction of a second)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x, c_noise, class_labels=None):
        return torch.sin(self.w * x + c_noise.reshape(-1, 1, 1, 1))


def test_sampling_loops_do_not_recompile_a_compiled_model_for_every_noise_level():
    # sample / edm_sample / the editing tasks passed each level as a Python float, which dynamo specializes: a
    # torch.compile'd model recompiled once per level (5 frames here, and eager after the recompile limit of 8).
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    model, cnt = cmfast.ConsistencyModel(_Toy()), CompileCounter()
    compiled = torch.compile(model, backend=cnt)
    z, sigmas = torch.randn(2, 1, 4, 4), (80.0, 20.0, 5.0, 1.0, 0.5)
    got = cmfast.sample(compiled, z, sigmas, generator=torch.Generator().manual_seed(0))
    want = cmfast.sample(model, z, sigmas, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)
    assert cnt.frame_count == 1
    mask = (torch.rand(2, 1, 4, 4) < 0.5).float()
    out = cmfast.edit.inpaint(compiled, want.clamp(-1, 1), mask, (40.0, 3.0, 0.3), torch.Generator().manual_seed(1))
    assert torch.equal(out * mask, want.clamp(-1, 1) * mask) and cnt.frame_count == 1
    torch._dynamo.reset()
    teacher, cnt = cmfast.EDMDenoiser(_Toy()), CompileCounter()
    got = cmfast.edm_sample(torch.compile(teacher, backend=cnt), z, num_steps=6)
    assert torch.equal(got, cmfast.edm_sample(teacher, z, num_steps=6))
    assert cnt.frame_count == 1      # 11 denoiser calls at 6 levels


def test_compiled_model_recompiles_once_for_a_new_batch_size_not_per_size_class():
    # The ops' auto-table size class (batch <= 8: 'small') was computed while compiling too: a guard 2 <= B <= 8,
    # so a dynamic batch recompiled again when it crossed 8, though compile never uses the class.
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    model, cnt = cmfast.ConsistencyModel(_Toy()), CompileCounter()
    compiled = torch.compile(model, backend=cnt)
    for b in (2, 3, 9, 30):
        x = torch.randn(b, 1, 4, 4)
        assert torch.equal(compiled(x, torch.tensor(1.0)), model(x, 1.0))
    assert cnt.frame_count == 2      # batch 2, then one dynamic-batch graph
