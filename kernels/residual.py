"""The residual join of a UNet block, y = (x + skip + bias[c]) * scale, fused: one read of x and skip, one write.

Eager PyTorch spends three full-tensor kernels on it (the convolution's bias add, the residual add, the skip-scale
multiply), each reading and writing the whole activation: at batch 256 the H200 profile of the sampler put 10.2 ms of
its 42.5 ms in such bf16 adds. The sum is taken in fp32 and rounded once. Tensors are dense, NCHW or channels_last;
the channel of flat offset i is (i // HW) % C in NCHW and i % C in channels_last.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import cdiv
from .skip_output import memory_format

BLOCK = 1024


@triton.jit
def _residual_fwd_kernel(x_ptr, s_ptr, b_ptr, y_ptr, n, C, HW, scale,
                         HAS_BIAS: tl.constexpr, NHWC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(x_ptr + offs, mask=mask).to(tl.float32) + tl.load(s_ptr + offs, mask=mask).to(tl.float32)
    if HAS_BIAS:
        c = offs % C if NHWC else (offs // HW) % C
        y += tl.load(b_ptr + c, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, (y * scale).to(y_ptr.dtype.element_ty), mask=mask)


def residual_fwd(x: torch.Tensor, skip: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """(x + skip + bias[c]) * scale in x's dtype and memory format; x and skip share a shape and dtype."""
    fmt = memory_format(x)
    x, skip = x.contiguous(memory_format=fmt), skip.contiguous(memory_format=fmt)
    y = torch.empty_like(x, memory_format=fmt)
    n = x.numel()
    if n == 0:
        return y
    C = x.shape[1] if x.dim() > 1 else 1
    HW = n // max(x.shape[0] * C, 1)
    b = bias.contiguous() if bias is not None else x    # any pointer when there is no bias (never read)
    _residual_fwd_kernel[(cdiv(n, BLOCK),)](x, skip, b, y, n, C, HW, float(scale), HAS_BIAS=bias is not None,
                                                    NHWC=fmt == torch.channels_last, BLOCK=BLOCK)
    return y
