"""Attention softmax(q k^T * scale) v over (B, H, L, D), flash-style (Dao et al. 2022; FlashAttention-2).

Forward: online softmax over key blocks, fp32 accumulation, exp2 with log2(e) folded into the scale; it saves
the per-row log-sum-exp (log2 units) instead of the L x L probabilities. Backward recomputes the probabilities
from it: a dK/dV kernel over key blocks and a dQ kernel over query blocks (no atomics: deterministic).
Any L (the tail block is masked) and any head dim up to 256 (padded to a power of two >= 16, masked);
D = 256 at L = 256 is the DDPM++ CIFAR-10 attention, so the configs include small tiles that fit its shared
memory. fp32 inputs use IEEE fp32 dots (no TF32), fp16/bf16 use tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import autotune, cdiv, interpreting, next_power_of_2

LOG2E = 1.4426950408889634
SMEM_LIMIT = 200 * 1024      # under an H100's 227 KiB per block; configs above it are never timed


def _configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


FWD_CONFIGS = _configs([(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 1),
                        (64, 32, 4, 1), (32, 32, 4, 1), (16, 32, 4, 1)])
BWD_CONFIGS = _configs([(64, 64, 8, 1), (32, 64, 4, 1), (64, 32, 4, 1), (32, 32, 4, 1), (32, 32, 8, 1),
                        (16, 32, 4, 1), (16, 16, 4, 1)])
INTERPRET = {"BLOCK_M": 64, "BLOCK_N": 64}     # CPU tests set 16 x 16 to cover several blocks and tails


def _prune(configs, named):
    """Drop tiles longer than the sequence (pure waste) and tiles whose q/k/v stages overflow shared memory."""
    D, lq, lk = named["BLOCK_D"], named["Lq"], named["Lk"]
    size = named["q_ptr"].element_size()
    keep = []
    for c in configs:
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        smem = (m * D + 2 * max(c.num_stages, 1) * n * D) * size + m * n * 4
        if m <= max(16, next_power_of_2(lq)) and n <= max(16, next_power_of_2(lk)) \
                and smem <= SMEM_LIMIT:
            keep.append(c)
    return keep or configs[-1:]


def _default_fwd(named):
    """Untimed choice (CMFAST_TRITON_AUTOTUNE=0): small key tiles for large head dims (shared memory)."""
    return _configs([(64, 32, 4, 2) if named["BLOCK_D"] >= 128 else (64, 64, 4, 2)])[0]


def _default_bwd(named):
    return _configs([(32, 32, 4, 1) if named["BLOCK_D"] >= 128 else (32, 64, 4, 1)])[0]


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:   # interpreter only: its bf16 dot multiplies the raw bit patterns (triton 3.8), so multiply in
        a = a.to(tl.float32)    # fp32 (with PREC "ieee"): bf16 products are exact in fp32 anyway
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _load_tile(base, offs_l, L, stride_l, offs_d, D):
    ptrs = base + offs_l.to(tl.int64)[:, None] * stride_l + offs_d[None, :]
    return tl.load(ptrs, mask=(offs_l < L)[:, None] & (offs_d < D)[None, :], other=0.0)


@autotune(FWD_CONFIGS, key=["Lq", "Lk", "BLOCK_D"], interpret_config=INTERPRET, prune=_prune, default=_default_fwd)
@triton.jit
def _attention_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l,
                          sv_b, sv_h, sv_l, so_b, so_h, so_l, H, Lq, Lk, D, qk_scale,
                          PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * sq_b + h * sq_h, offs_m, Lq, sq_l, offs_d, D)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, Lk, sk_l, offs_d, D)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        s = tl.where((offs_n < Lk)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))     # every block has a valid key: m_new is finite
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(v_base, offs_n, Lk, sv_l, offs_d, D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptrs = o_ptr + b * so_b + h * so_h + offs_m.to(tl.int64)[:, None] * so_l + offs_d[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=(offs_m < Lq)[:, None] & (offs_d < D)[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + offs_m, m_i + tl.log2(l_i), mask=offs_m < Lq)


@triton.jit
def _attention_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, so_b, so_h, so_l, sd_b, sd_h, sd_l, H, Lq, D,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d O_id dO_id = sum_j P_ij dP_ij, the softmax-backward row term."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(o_ptr + b * so_b + h * so_h, offs_m, Lq, so_l, offs_d, D).to(tl.float32)
    do = _load_tile(do_ptr + b * sd_b + h * sd_h, offs_m, Lq, sd_l, offs_d, D).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < Lq)


@autotune(BWD_CONFIGS, key=["Lq", "Lk", "BLOCK_D"], interpret_config=INTERPRET, prune=_prune, default=_default_bwd)
@triton.jit
def _attention_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                               sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sd_b, sd_h, sd_l,
                               H, Lq, Lk, D, scale, qk_scale,
                               PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(k_ptr + b * sk_b + h * sk_h, offs_n, Lk, sk_l, offs_d, D)
    v = _load_tile(v_ptr + b * sv_b + h * sv_h, offs_n, Lk, sv_l, offs_d, D)
    q_base = q_ptr + b * sq_b + h * sq_h
    do_base = do_ptr + b * sd_b + h * sd_h
    row = bh.to(tl.int64) * Lq
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for m0 in range(0, Lq, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, offs_m, Lq, sq_l, offs_d, D)
        do = _load_tile(do_base, offs_m, Lq, sd_l, offs_d, D)
        lse = tl.load(lse_ptr + row + offs_m, mask=offs_m < Lq, other=0.0)
        delta = tl.load(delta_ptr + row + offs_m, mask=offs_m < Lq, other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where((offs_m < Lq)[:, None] & (offs_n < Lk)[None, :], p, 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, PREC, UPCAST)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PREC, UPCAST)
    mask = (offs_n < Lk)[:, None] & (offs_d < D)[None, :]
    out = b * sk_b + h * sk_h + offs_n.to(tl.int64)[:, None] * sk_l + offs_d[None, :]   # dk, dv laid out like k
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@autotune(BWD_CONFIGS, key=["Lq", "Lk", "BLOCK_D"], interpret_config=INTERPRET, prune=_prune, default=_default_bwd)
@triton.jit
def _attention_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                             sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sd_b, sd_h, sd_l,
                             H, Lq, Lk, D, scale, qk_scale,
                             PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * sq_b + h * sq_h, offs_m, Lq, sq_l, offs_d, D)
    do = _load_tile(do_ptr + b * sd_b + h * sd_h, offs_m, Lq, sd_l, offs_d, D)
    row = bh.to(tl.int64) * Lq
    lse = tl.load(lse_ptr + row + offs_m, mask=offs_m < Lq, other=0.0)
    delta = tl.load(delta_ptr + row + offs_m, mask=offs_m < Lq, other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, Lk, sk_l, offs_d, D)
        v = _load_tile(v_base, offs_n, Lk, sv_l, offs_d, D)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where((offs_n < Lk)[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    out = b * sq_b + h * sq_h + offs_m.to(tl.int64)[:, None] * sq_l + offs_d[None, :]    # dq laid out like q
    tl.store(dq_ptr + out, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)


def _bhl(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _prep(q, k, v):
    """Dense head dims, shapes and meta-parameters. A head dim with stride != 1 is copied first: the H200 ran the
    forward on such views (the channels-last qkv output's, head-dim stride 3) 12x slower than on dense copies
    (1129 against 93 us at batch 256). The UNet hands over dense q, k, v, made in one copy."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, Lq, D = q.shape
    if D > 256:
        raise ValueError(f"attention (triton): expected head dim <= 256, got {D}")
    upcast = interpreting() and q.dtype == torch.bfloat16
    meta = dict(PREC="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
                BLOCK_D=max(16, next_power_of_2(D)))
    return q, k, v, B, H, Lq, k.shape[2], D, meta


def attention_fwd(q, k, v, scale):
    """(o, lse): o contiguous (B, H, Lq, D) in q's dtype, lse (B, H, Lq) fp32 in log2 units."""
    q, k, v, B, H, Lq, Lk, D, meta = _prep(q, k, v)
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    grid = lambda META: (cdiv(Lq, META["BLOCK_M"]), B * H)  # noqa: E731
    _attention_fwd_kernel[grid](q, k, v, o, lse, *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(o), H, Lq, Lk, D,
                                scale * LOG2E, **meta)
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale):
    """(dq, dk, dv), each contiguous in its input's dtype."""
    q, k, v, B, H, Lq, Lk, D, meta = _prep(q, k, v)
    do = do.contiguous()
    delta = torch.empty_like(lse)
    block_d = meta["BLOCK_D"]
    _attention_bwd_delta_kernel[(cdiv(Lq, 32), B * H)](o, do, delta, *_bhl(o), *_bhl(do), H, Lq, D,
                                                               BLOCK_M=32, BLOCK_D=block_d)
    k, v = k.contiguous(), v.contiguous()       # dk and dv reuse k's strides
    q = q.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = (*_bhl(q), *_bhl(k), *_bhl(v), *_bhl(do), H, Lq, Lk, D, scale, scale * LOG2E)
    _attention_bwd_dkdv_kernel[lambda META: (cdiv(Lk, META["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, *args, **meta)
    _attention_bwd_dq_kernel[lambda META: (cdiv(Lq, META["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, *args, **meta)
    return dq, dk, dv
