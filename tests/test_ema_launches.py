"""The EMA update of a UNet is two multi-tensor launches (parameters, buffers), whatever its size."""
import torch

from _checks import AtenOps
from cmfast import ConsistencyModel, UNet
from cmfast.ema import ema_update_


def test_ema_update_is_two_launches_and_exact():
    """fmnist-small: hundreds of parameters and 8 resampling-filter buffers; one lerp for all parameters, one copy
    for all buffers (a copy per buffer and a detach per parameter before), and the result is mu theta- + (1 - mu)
    theta per parameter to fp32 rounding, buffers copied."""
    torch.manual_seed(0)
    src, tgt = ConsistencyModel(UNet.from_preset("fmnist-small")), ConsistencyModel(UNet.from_preset("fmnist-small"))
    for b in src.buffers():
        b.add_(1.0)                                 # so the copy shows
    before = [p.detach().double().clone() for p in tgt.parameters()]
    with AtenOps() as ops:
        ema_update_(tgt, src, 0.9)
    assert ops.names == ["_foreach_lerp_", "_foreach_copy_"], ops.names
    assert len(list(src.buffers())) == 8
    for b, p, s in zip(before, tgt.parameters(), src.parameters()):
        torch.testing.assert_close(p.double(), 0.9 * b + 0.1 * s.detach().double(), rtol=1e-6, atol=1e-7)
        assert p.is_leaf and p.grad_fn is None
    assert all(torch.equal(a, b) for a, b in zip(tgt.buffers(), src.buffers()))
