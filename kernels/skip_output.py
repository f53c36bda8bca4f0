"""Skip output f = c_skip(sigma) x + c_out(sigma) F (CM paper eq. 7, scalings of Appendix C), fused.

One read of x and F, one write of y; c_skip and c_out are computed in the kernel from each sample's sigma in
fp32. The grid is (blocks per sample, batch), so a program never divides to find its sample. Tensors are
dense (NCHW or channels_last): the batch dimension is outermost in both, so sample b owns the flat range
[b * n, (b + 1) * n) of the storage.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import cdiv

BLOCK = 1024


@triton.jit
def _scalings(sigma_ptr, b, sigma_data, sigma_min):
    s = tl.load(sigma_ptr + b).to(tl.float32)
    sd2 = sigma_data * sigma_data
    c_skip = sd2 / ((s - sigma_min) * (s - sigma_min) + sd2)
    c_out = sigma_data * (s - sigma_min) / tl.sqrt(s * s + sd2)
    return c_skip, c_out


@triton.jit
def _round_half_even(v):
    # torch.round rounds halves to even; floor(v + 0.5) would not (e.g. 0.5 -> 1 instead of 0).
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _skip_output_fwd_kernel(x_ptr, f_ptr, sigma_ptr, y_ptr, n, sigma_data, sigma_min,
                            CLAMP: tl.constexpr, UINT8: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    c_skip, c_out = _scalings(sigma_ptr, b, sigma_data, sigma_min)
    x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
    f = tl.load(f_ptr + base + offs, mask=mask).to(tl.float32)
    y = c_skip * x + c_out * f
    if CLAMP:
        y = tl.minimum(tl.maximum(y, -1.0), 1.0)
    if UINT8:
        y = _round_half_even((y + 1.0) * 127.5)
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _skip_output_bwd_kernel(dy_ptr, sigma_ptr, dx_ptr, df_ptr, n, sigma_data, sigma_min, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    c_skip, c_out = _scalings(sigma_ptr, b, sigma_data, sigma_min)
    dy = tl.load(dy_ptr + base + offs, mask=mask).to(tl.float32)
    tl.store(dx_ptr + base + offs, (c_skip * dy).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(df_ptr + base + offs, (c_out * dy).to(df_ptr.dtype.element_ty), mask=mask)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored that way (and not also NCHW-contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _grid(x: torch.Tensor):
    return (cdiv(x[0].numel(), BLOCK), x.shape[0])


def skip_output_fwd(x, F, sigma, sigma_data, sigma_min, clamp=False, uint8=False, out=None):
    """y = c_skip x + c_out F in x's dtype and memory format (uint8 image bytes when `uint8`)."""
    fmt = memory_format(x)
    x, F = x.contiguous(memory_format=fmt), F.contiguous(memory_format=fmt)
    sigma = sigma.contiguous()        # a broadcast number arrives as an expanded (stride 0) vector
    if out is None:
        out = torch.empty_like(x, dtype=torch.uint8 if uint8 else x.dtype)
    if x.numel():
        _skip_output_fwd_kernel[_grid(x)](x, F, sigma, out, x[0].numel(), sigma_data, sigma_min,
                                          CLAMP=clamp, UINT8=uint8, BLOCK=BLOCK)
    return out


def skip_output_bwd(dy, sigma, sigma_data, sigma_min, x_dtype, f_dtype, fmt):
    """(dx, dF) = (c_skip dy, c_out dy)."""
    dy, sigma = dy.contiguous(memory_format=fmt), sigma.contiguous()
    dx = torch.empty_like(dy, dtype=x_dtype)
    df = torch.empty_like(dy, dtype=f_dtype)
    if dy.numel():
        _skip_output_bwd_kernel[_grid(dy)](dy, sigma, dx, df, dy[0].numel(), sigma_data, sigma_min, BLOCK=BLOCK)
    return dx, df
