"""GroupNorm + per-(sample, channel) modulation + SiLU, fused: act(GN(x) * (1 + scale) + shift).

GN(x) = (x - mean) * rstd * weight + bias (Wu & He 2018) with fp32 statistics; the scale/shift modulation is
the adaptive GroupNorm of the DDPM++ / EDM UNet (Dhariwal & Nichol 2021, "AdaGN"). NCHW and channels_last:
a group is a (HW rows) x (Cg columns) tile of element strides (s_hw, s_c) = (1, HW) or (C, 1).

Statistics are numerically stable: they are taken of x - K (K the group's first element); every tile's mean
and centred sum of squares are exact two-pass values in registers, merged per column and then across programs
with Chan et al.'s parallel formula (no E[x^2] - E[x]^2). Each group's rows are split over S programs when
batch x groups alone would not fill the GPU (batch 1): phase 1 writes per-program partials, phase 2 merges
them in a fixed order (deterministic, no atomics). When one program owns a group (S = 1, large batches) the
phases fuse into one kernel whose second read hits L2.

Backward recomputes xhat and the activation from the saved (mean, rstd). With dz = dL/d(pre-activation) and
u_c = weight_c (1 + scale_nc): A_nc = sum_hw dz, B_nc = sum_hw dz xhat give
  dx = rstd (dz u - mean_group(u A) - xhat mean_group(u B)), dshift = A, dscale = B weight + A bias,
  dweight = sum_n (1 + scale) B, dbias = sum_n (1 + scale) A.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._autotune import autotune, cdiv, next_power_of_2, num_sms

TILE = 2048          # elements of x a program holds per loop step
MIN_CHUNK = 1024     # elements per program below which splitting a group no longer pays


@triton.jit
def _pivot(x_ptr, n, g, C, HW, Cg, s_c):
    """The group's first element: statistics are accumulated on x - pivot, so a large common offset (mean >> std)
    cancels exactly instead of swamping the fp32 sums (the "shifted data" algorithm)."""
    return tl.load(x_ptr + n.to(tl.int64) * C * HW + (g * Cg).to(tl.int64) * s_c).to(tl.float32)


@triton.jit
def _columns(n, g, C, HW, Cg, s_c, BLOCK_C: tl.constexpr):
    """int64 offsets of row 0 of the group's channels, and the channel mask."""
    ci = tl.arange(0, BLOCK_C)
    base = n.to(tl.int64) * C * HW + (g * Cg).to(tl.int64) * s_c
    return base + ci.to(tl.int64) * s_c, ci < Cg


@triton.jit
def _less_pre(K, pre_ptr, n, g, Cg, s_pn, HAS_PRE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per column, the value subtracted from x before the statistics: the group's pivot K, less the column's
    pre-bias (x + pre - K = x - (K - pre)), so a pre-bias costs one vector per program and nothing per element."""
    Kc = tl.zeros([BLOCK_C], tl.float32) + K
    if HAS_PRE:
        ci = tl.arange(0, BLOCK_C)
        Kc -= tl.load(pre_ptr + n * s_pn + g * Cg + ci, mask=ci < Cg, other=0.0).to(tl.float32)
    return Kc


@triton.jit
def _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, g, s_sn, Cg, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr):
    """weight, bias, 1 + scale, shift of the group's channels as fp32 vectors; scale and shift (N, C) with row stride
    s_sn and unit channel stride (the UNet's are two chunks of one embedding output, read in place)."""
    ci = tl.arange(0, BLOCK_C)
    cmask = ci < Cg
    c = g * Cg + ci
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    b = tl.zeros([BLOCK_C], tl.float32)
    s1 = tl.full([BLOCK_C], 1.0, tl.float32)
    sh = tl.zeros([BLOCK_C], tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s1 = 1.0 + tl.load(scale_ptr + n * s_sn + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        sh = tl.load(shift_ptr + n * s_sn + c, mask=cmask, other=0.0).to(tl.float32)
    return w, b, s1, sh


@triton.jit
def _chunk_stats(x_ptr, col, cmask, K, hw_start, hw_end, s_hw, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """(count, mean, M2) of x - K over rows [hw_start, hw_end) of the group's columns (K: one value per column)."""
    cnt = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    rows = tl.arange(0, BLOCK_HW)
    for h0 in range(hw_start, hw_end, BLOCK_HW):
        hw = h0 + rows         # (the tile is inlined: a nested call per step costs ~ms in the interpreter)
        offs = col[None, :] + hw.to(tl.int64)[:, None] * s_hw
        mask = (hw < hw_end)[:, None] & cmask[None, :]
        x = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - K[None, :], 0.0)
        nb = tl.minimum(hw_end - h0, BLOCK_HW).to(tl.float32)
        bmean = tl.sum(x, axis=0) / nb
        d = tl.where(mask, x - bmean[None, :], 0.0)
        bm2 = tl.sum(d * d, axis=0)
        tot = cnt + nb                                   # Chan et al. (1979) pairwise update, per column
        delta = bmean - mean
        mean += delta * (nb / tot)
        m2 += bm2 + delta * delta * (cnt * nb / tot)
        cnt = tot
    cnt = tl.where(cmask, cnt, 0.0)
    total = tl.sum(cnt, axis=0)
    gmean = tl.sum(cnt * mean, axis=0) / total
    dm = mean - gmean
    return total, gmean, tl.sum(tl.where(cmask, m2 + cnt * dm * dm, 0.0), axis=0)


@triton.jit
def _group_norm_stats_kernel(x_ptr, pre_ptr, part_ptr, C, HW, G, Cg, s_c, s_hw, chunk, S, s_pn,
                             HAS_PRE: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng % G
    hw_start = s * chunk
    col, cmask = _columns(n, g, C, HW, Cg, s_c, BLOCK_C)
    K = _less_pre(_pivot(x_ptr, n, g, C, HW, Cg, s_c), pre_ptr, n, g, Cg, s_pn, HAS_PRE, BLOCK_C)
    total, gmean, gm2 = _chunk_stats(x_ptr, col, cmask, K, hw_start, tl.minimum(hw_start + chunk, HW), s_hw,
                                     BLOCK_HW, BLOCK_C)
    p = part_ptr + (ng * S + s) * 3
    tl.store(p, total)
    tl.store(p + 1, gmean)
    tl.store(p + 2, gm2)


@triton.jit
def _merge_stats(part_ptr, ng, S, eps, BLOCK_S: tl.constexpr):
    """(mean, rstd) of a group from its S partials (count, mean, M2): Chan's formula, fixed order."""
    i = tl.arange(0, BLOCK_S)
    m = i < S
    p = part_ptr + (ng * S + i) * 3
    cnt = tl.load(p, mask=m, other=0.0)
    mu = tl.load(p + 1, mask=m, other=0.0)
    m2 = tl.load(p + 2, mask=m, other=0.0)
    total = tl.sum(cnt, axis=0)
    mean = tl.sum(cnt * mu, axis=0) / total
    d = mu - mean
    var = tl.sum(m2 + cnt * d * d, axis=0) / total
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _group_norm_act_fwd_kernel(x_ptr, y_ptr, part_ptr, stats_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, pre_ptr,
                               C, HW, G, Cg, s_c, s_hw, chunk, S, eps, s_pn, s_sn,
                               HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                               HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, ONE_PASS: tl.constexpr,
                               HAS_PRE: tl.constexpr,
                               BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng % G
    K0 = _pivot(x_ptr, n, g, C, HW, Cg, s_c)
    K = _less_pre(K0, pre_ptr, n, g, Cg, s_pn, HAS_PRE, BLOCK_C)               # K0 - pre, per column
    col, cmask = _columns(n, g, C, HW, Cg, s_c, BLOCK_C)
    if ONE_PASS:    # S == 1: this program owns the whole group; its second read below comes from L2
        total, mean, m2 = _chunk_stats(x_ptr, col, cmask, K, 0, HW, s_hw, BLOCK_HW, BLOCK_C)
        rstd = 1.0 / tl.sqrt(m2 / total + eps)
    else:
        mean, rstd = _merge_stats(part_ptr, ng, S, eps, BLOCK_S)     # mean of x - K
    if s == 0:
        tl.store(stats_ptr + ng * 3, K0)
        tl.store(stats_ptr + ng * 3 + 1, mean)
        tl.store(stats_ptr + ng * 3 + 2, rstd)
    w, b, s1, sh = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, g, s_sn, Cg,
                                   HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C)
    a = rstd * w * s1                    # z = (x - mean) a + c: one FMA per element
    c = b * s1 + sh
    hw_start = s * chunk
    hw_end = tl.minimum(hw_start + chunk, HW)
    rows = tl.arange(0, BLOCK_HW)
    for h0 in range(hw_start, hw_end, BLOCK_HW):
        hw = h0 + rows
        offs = col[None, :] + hw.to(tl.int64)[:, None] * s_hw
        mask = (hw < hw_end)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = ((x - K[None, :]) - mean) * a[None, :] + c[None, :]
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


# ---- One-pass forward, several groups per program -------------------------------------------------------------
# Where one program owns its groups whole (batch x groups fills the GPU), this kernel normalises GPB adjacent groups
# per program, each group's statistics kept apart. Two things it changes from the one-group kernel:
# - Resident tiles. When the program's GPB groups fit in registers (HW x GPB x Cg <= RESIDENT elements: one group
#   of DDPM++'s 32x32 level, 8 channels x 1024), x is read once and normalised from registers. The streaming kernel
#   reads it twice; on the H200 the batch-256 NHWC forward moved 134 MB in and 134 MB out in 123 us (2.2 TB/s, half
#   the measured copy rate), about the time of three full passes at the copy rate: the second read went to DRAM.
# - Wider rows. Channels-last with 8 channels a group reads 16 bytes of each 512-byte row per group; GPB groups
#   read GPB x 16 bytes (GPB = 8: 128 bytes, a cache line).
# GPB (1, 2, 4, 8) and resident-or-streamed are autotuned on the GPU; Cg must be a power of two. Neither change is
# timed on a GPU yet.
RESIDENT = 8192      # fp32 elements a program keeps in registers (32 a thread at 8 warps)
# STREAM=0: in registers when the tile fits (else streamed); STREAM=1 streams even a tile that would fit. GPB = 1
# streamed is the one-group kernel's work, so the tuner always has the old program to fall back on. Few configs:
# every one is compiled per shape variant on first use (about 0.2 s each), on a fresh GPU machine every session.
GROUPS_CONFIGS = [triton.Config({"GPB": gpb, "STREAM": st}, num_warps=8)
                  for gpb, st in ((1, 0), (1, 1), (4, 0), (8, 0))]
GROUPS_INTERPRET = {"GPB": 2, "STREAM": 0}   # CPU tests: two groups a program (tests set others)


def _groups_prune(configs, named):
    """GPB must divide the groups; more than 256 columns a program leave too few rows per tile; a config that would
    do a listed streamed config's work (its tile does not fit) goes, as do 16 warps for a streamed tile."""
    G, cg, hw = named["G"], named["CG"], named["HW_P2"]
    keep = []
    for c in configs:
        gpb, stream = c.kwargs["GPB"], c.kwargs["STREAM"]
        resident = not stream and gpb * cg * hw <= RESIDENT
        if G % gpb or gpb * cg > 256 or (c.num_warps > 8 and not resident):
            continue
        if not stream and not resident and any(d.kwargs["GPB"] == gpb and d.kwargs["STREAM"] for d in configs):
            continue
        keep.append(c)
    return keep or configs[1:2]


def _groups_default(named):
    """Untimed choice (CMFAST_TRITON_AUTOTUNE=0): the largest GPB whose groups stay resident (else 1)."""
    gpb = 1
    while gpb < 8 and named["G"] % (2 * gpb) == 0 and 2 * gpb * named["CG"] * named["HW_P2"] <= RESIDENT:
        gpb *= 2
    return triton.Config({"GPB": gpb, "STREAM": 0}, num_warps=8)


@triton.jit
def _groups_columns(pid, C, HW, G, s_c, GPB: tl.constexpr, CG: tl.constexpr):
    """Program pid's sample n, first group g0, channels c (GPB whole groups) and their row-0 offsets."""
    n = pid // (G // GPB)
    g0 = (pid % (G // GPB)) * GPB
    c = g0 * CG + tl.arange(0, GPB * CG)
    return n, g0, c, n.to(tl.int64) * C * HW + c.to(tl.int64) * s_c


@triton.jit
def _spread(v, GPB: tl.constexpr, CG: tl.constexpr):
    """A value per group (GPB,) as a value per column (GPB * CG,)."""
    return tl.reshape(tl.broadcast_to(v[:, None], (GPB, CG)), (GPB * CG,))


@autotune(GROUPS_CONFIGS, key=["N", "C", "HW", "G", "s_c"], interpret_config=GROUPS_INTERPRET, prune=_groups_prune,
          default=_groups_default, interpret_prune=True)
@triton.jit
def _group_norm_act_fwd_groups_kernel(x_ptr, y_ptr, stats_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, pre_ptr,
                                      N, C, HW, G, s_c, s_hw, eps, s_pn, s_sn,
                                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                                      HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, HAS_PRE: tl.constexpr,
                                      CG: tl.constexpr, HW_P2: tl.constexpr, TILE_ELEMS: tl.constexpr,
                                      RESIDENT_ELEMS: tl.constexpr, GPB: tl.constexpr, STREAM: tl.constexpr):
    BLOCK_C: tl.constexpr = GPB * CG
    IN_REGS: tl.constexpr = (HW_P2 * BLOCK_C <= RESIDENT_ELEMS) and not STREAM
    BLOCK_HW: tl.constexpr = HW_P2 if IN_REGS else max(2, TILE_ELEMS // BLOCK_C)
    pid = tl.program_id(0)
    n, g0, c, col = _groups_columns(pid, C, HW, G, s_c, GPB, CG)
    base = n.to(tl.int64) * C * HW
    Kg = tl.load(x_ptr + base + ((c // CG) * CG).to(tl.int64) * s_c).to(tl.float32)   # each group's pivot
    K = Kg
    if HAS_PRE:                                             # x + pre - K = x - (K - pre)
        K = Kg - tl.load(pre_ptr + n * s_pn + c).to(tl.float32)
    rows = tl.arange(0, BLOCK_HW)
    total = tl.full([GPB], CG, tl.float32) * HW
    if IN_REGS:     # the whole tile in registers: exact two-pass statistics, x read once
        offs = col[None, :] + rows.to(tl.int64)[:, None] * s_hw
        mask = (rows < HW)[:, None]
        xs = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - K[None, :], 0.0)
        gmean = tl.sum(tl.reshape(tl.sum(xs, axis=0), (GPB, CG)), axis=1) / total
        mean_c = _spread(gmean, GPB, CG)
        d = tl.where(mask, xs - mean_c[None, :], 0.0)
        gm2 = tl.sum(tl.reshape(tl.sum(d * d, axis=0), (GPB, CG)), axis=1)
    else:           # streamed: per-column two-pass tiles merged (Chan et al.), then per group
        cnt = tl.zeros([BLOCK_C], tl.float32)
        mean = tl.zeros([BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_C], tl.float32)
        for h0 in range(0, HW, BLOCK_HW):
            hw = h0 + rows
            offs = col[None, :] + hw.to(tl.int64)[:, None] * s_hw
            mask = (hw < HW)[:, None]
            x = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - K[None, :], 0.0)
            nb = tl.minimum(HW - h0, BLOCK_HW).to(tl.float32)
            bmean = tl.sum(x, axis=0) / nb
            dd = tl.where(mask, x - bmean[None, :], 0.0)
            bm2 = tl.sum(dd * dd, axis=0)
            tot = cnt + nb
            delta = bmean - mean
            mean += delta * (nb / tot)
            m2 += bm2 + delta * delta * (cnt * nb / tot)
            cnt = tot
        cnt2 = tl.reshape(cnt, (GPB, CG))                   # columns -> (group, channel): merge per group
        mean2 = tl.reshape(mean, (GPB, CG))
        gmean = tl.sum(cnt2 * mean2, axis=1) / total
        dm = mean2 - gmean[:, None]
        gm2 = tl.sum(tl.reshape(m2, (GPB, CG)) + cnt2 * dm * dm, axis=1)
        mean_c = _spread(gmean, GPB, CG)
    grstd = 1.0 / tl.sqrt(gm2 / total + eps)
    gi = tl.arange(0, GPB)
    st = stats_ptr + (n * G + g0 + gi) * 3                  # per group: pivot, mean of x - pivot, rstd
    tl.store(st, tl.max(tl.reshape(Kg, (GPB, CG)), axis=1))
    tl.store(st + 1, gmean)
    tl.store(st + 2, grstd)
    rstd_c = _spread(grstd, GPB, CG)
    w, b, s1, sh = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, pid % (G // GPB), s_sn, BLOCK_C,
                                   HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C)       # GPB groups = one block
    a = rstd_c * w * s1
    cc = b * s1 + sh
    if IN_REGS:
        z = (xs - mean_c[None, :]) * a[None, :] + cc[None, :]
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        for h0 in range(0, HW, BLOCK_HW):                   # the second read
            hw = h0 + rows
            offs = col[None, :] + hw.to(tl.int64)[:, None] * s_hw
            mask = (hw < HW)[:, None]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z = ((x - K[None, :]) - mean_c[None, :]) * a[None, :] + cc[None, :]
            if SILU:
                z = z * tl.sigmoid(z)
            tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


# The backward's counterpart: A = sum dz, B = sum dz xhat per channel, then dx, for GPB whole groups a program.
# Resident, x and dy are read once (the streaming dx kernel reads both twice: five tensor passes become three).
# Two fp32 tiles live in registers here, so the resident configs also try 16 warps.
BWD_GROUPS_CONFIGS = GROUPS_CONFIGS[:1] + [triton.Config({"GPB": 1, "STREAM": 0}, num_warps=16)] + GROUPS_CONFIGS[1:]


@triton.jit
def _xhat_dz(x_ptr, dy_ptr, offs, mask, K, mean, rstd, w, b, s1, sh, SILU: tl.constexpr):
    """A tile's xhat and dz = dL / d(pre-activation) (the per-column vectors broadcast over its rows)."""
    xhat = ((tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - K[None, :]) - mean[None, :]) * rstd[None, :]
    dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        z = (xhat * w[None, :] + b[None, :]) * s1[None, :] + sh[None, :]
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))        # silu'(z)
    return xhat, dz


@autotune(BWD_GROUPS_CONFIGS, key=["N", "C", "HW", "G", "s_c"], interpret_config=GROUPS_INTERPRET,
          prune=_groups_prune, default=_groups_default, interpret_prune=True)
@triton.jit
def _group_norm_act_bwd_groups_kernel(x_ptr, dy_ptr, dx_ptr, stats_ptr, ab_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                      N, C, HW, G, s_c, s_hw, s_sn,
                                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                                      HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, CG: tl.constexpr,
                                      HW_P2: tl.constexpr, TILE_ELEMS: tl.constexpr, RESIDENT_ELEMS: tl.constexpr,
                                      GPB: tl.constexpr, STREAM: tl.constexpr):
    BLOCK_C: tl.constexpr = GPB * CG
    IN_REGS: tl.constexpr = (HW_P2 * BLOCK_C <= RESIDENT_ELEMS) and not STREAM
    BLOCK_HW: tl.constexpr = HW_P2 if IN_REGS else max(2, TILE_ELEMS // BLOCK_C)
    pid = tl.program_id(0)
    n, g0, c, col = _groups_columns(pid, C, HW, G, s_c, GPB, CG)
    st = stats_ptr + (n * G + g0 + tl.arange(0, GPB)) * 3
    K = _spread(tl.load(st), GPB, CG)
    mean = _spread(tl.load(st + 1), GPB, CG)
    rstd = _spread(tl.load(st + 2), GPB, CG)
    w, b, s1, sh = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, pid % (G // GPB), s_sn, BLOCK_C,
                                   HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C)       # GPB groups = one block
    rows = tl.arange(0, BLOCK_HW)
    if IN_REGS:
        offs = col[None, :] + rows.to(tl.int64)[:, None] * s_hw
        mask = (rows < HW)[:, None]
        xhat, dz = _xhat_dz(x_ptr, dy_ptr, offs, mask, K, mean, rstd, w, b, s1, sh, SILU)
        A = tl.sum(dz, axis=0)
        B = tl.sum(tl.where(mask, dz * xhat, 0.0), axis=0)
    else:
        A = tl.zeros([BLOCK_C], tl.float32)
        B = tl.zeros([BLOCK_C], tl.float32)
        for h0 in range(0, HW, BLOCK_HW):
            hw = h0 + rows
            offs = col[None, :] + hw.to(tl.int64)[:, None] * s_hw
            mask = (hw < HW)[:, None]
            xh, d = _xhat_dz(x_ptr, dy_ptr, offs, mask, K, mean, rstd, w, b, s1, sh, SILU)
            A += tl.sum(d, axis=0)
            B += tl.sum(tl.where(mask, d * xh, 0.0), axis=0)
    q = ab_ptr + (n * C + c) * 2
    tl.store(q, A)
    tl.store(q + 1, B)
    u = w * s1
    m = CG * HW * 1.0
    c1 = _spread(tl.sum(tl.reshape(u * A, (GPB, CG)), axis=1) / m, GPB, CG)
    c2 = _spread(tl.sum(tl.reshape(u * B, (GPB, CG)), axis=1) / m, GPB, CG)
    if IN_REGS:
        dx = rstd[None, :] * (dz * u[None, :] - c1[None, :] - xhat * c2[None, :])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        for h0 in range(0, HW, BLOCK_HW):
            hw = h0 + rows
            offs = col[None, :] + hw.to(tl.int64)[:, None] * s_hw
            mask = (hw < HW)[:, None]
            xh, d = _xhat_dz(x_ptr, dy_ptr, offs, mask, K, mean, rstd, w, b, s1, sh, SILU)
            dx = rstd[None, :] * (d * u[None, :] - c1[None, :] - xh * c2[None, :])
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_ab(x_ptr, dy_ptr, col, cmask, K, mean, rstd, w, b, s1, sh, hw_start, hw_end, s_hw, SILU: tl.constexpr,
              BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per column over rows [hw_start, hw_end): A = sum dz, B = sum dz xhat (dz = dL / d pre-activation)."""
    acc_a = tl.zeros([BLOCK_C], tl.float32)
    acc_b = tl.zeros([BLOCK_C], tl.float32)
    rows = tl.arange(0, BLOCK_HW)
    for h0 in range(hw_start, hw_end, BLOCK_HW):
        hw = h0 + rows
        offs = col[None, :] + hw.to(tl.int64)[:, None] * s_hw
        mask = (hw < hw_end)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = ((x - K) - mean) * rstd
        if SILU:
            z = (xhat * w[None, :] + b[None, :]) * s1[None, :] + sh[None, :]
            sig = tl.sigmoid(z)
            dz = dz * sig * (1.0 + z * (1.0 - sig))        # silu'(z)
        acc_a += tl.sum(dz, axis=0)
        acc_b += tl.sum(tl.where(mask, dz * xhat, 0.0), axis=0)
    return acc_a, acc_b


@triton.jit
def _group_norm_act_bwd_partial_kernel(x_ptr, dy_ptr, stats_ptr, part_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                       C, HW, G, Cg, s_c, s_hw, chunk, S, s_sn,
                                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                                       HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                                       BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng % G
    K = tl.load(stats_ptr + ng * 3)
    mean = tl.load(stats_ptr + ng * 3 + 1)
    rstd = tl.load(stats_ptr + ng * 3 + 2)
    w, b, s1, sh = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, g, s_sn, Cg,
                                   HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C)
    col, cmask = _columns(n, g, C, HW, Cg, s_c, BLOCK_C)
    hw_start = s * chunk
    acc_a, acc_b = _chunk_ab(x_ptr, dy_ptr, col, cmask, K, mean, rstd, w, b, s1, sh, hw_start,
                             tl.minimum(hw_start + chunk, HW), s_hw, SILU, BLOCK_HW, BLOCK_C)
    ci = tl.arange(0, BLOCK_C)
    p = part_ptr + (ng * S + s) * 2 * Cg + ci
    tl.store(p, acc_a, mask=cmask)
    tl.store(p + Cg, acc_b, mask=cmask)


@triton.jit
def _group_norm_act_bwd_dx_kernel(x_ptr, dy_ptr, dx_ptr, stats_ptr, part_ptr, ab_ptr, w_ptr, b_ptr, scale_ptr,
                                  shift_ptr, C, HW, G, Cg, s_c, s_hw, chunk, S, s_sn,
                                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                                  HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, ONE_PASS: tl.constexpr,
                                  BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng % G
    K = tl.load(stats_ptr + ng * 3)
    mean = tl.load(stats_ptr + ng * 3 + 1)
    rstd = tl.load(stats_ptr + ng * 3 + 2)
    w, b, s1, sh = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, g, s_sn, Cg,
                                   HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, BLOCK_C)
    ci = tl.arange(0, BLOCK_C)
    col, cmask = _columns(n, g, C, HW, Cg, s_c, BLOCK_C)
    if ONE_PASS:    # S == 1: the whole group here; the second read below comes from L2
        A, B = _chunk_ab(x_ptr, dy_ptr, col, cmask, K, mean, rstd, w, b, s1, sh, 0, HW, s_hw, SILU,
                         BLOCK_HW, BLOCK_C)
    else:
        A = tl.zeros([BLOCK_C], tl.float32)
        B = tl.zeros([BLOCK_C], tl.float32)
        for t in range(0, S):                    # fixed order: deterministic
            p = part_ptr + (ng * S + t) * 2 * Cg + ci
            A += tl.load(p, mask=cmask, other=0.0)
            B += tl.load(p + Cg, mask=cmask, other=0.0)
    if s == 0:
        q = ab_ptr + (n * C + g * Cg + ci) * 2
        tl.store(q, A, mask=cmask)
        tl.store(q + 1, B, mask=cmask)
    u = w * s1
    m = Cg * HW * 1.0                     # (not .to(): Triton specializes an int argument equal to 1 to a constant)
    c1 = tl.sum(u * A, axis=0) / m
    c2 = tl.sum(u * B, axis=0) / m
    hw_start = s * chunk
    hw_end = tl.minimum(hw_start + chunk, HW)
    rows = tl.arange(0, BLOCK_HW)
    for h0 in range(hw_start, hw_end, BLOCK_HW):
        hw = h0 + rows         # (the tile is inlined: a nested call per step costs ~ms in the interpreter)
        offs = col[None, :] + hw.to(tl.int64)[:, None] * s_hw
        mask = (hw < hw_end)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = ((x - K) - mean) * rstd
        if SILU:
            z = (xhat * w[None, :] + b[None, :]) * s1[None, :] + sh[None, :]
            sig = tl.sigmoid(z)
            dz = dz * sig * (1.0 + z * (1.0 - sig))        # silu'(z)
        dx = rstd * (dz * u[None, :] - c1 - xhat * c2)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class Plan:
    """Launch geometry of one (shape, layout): S programs per group, each over `chunk` rows."""

    def __init__(self, x: torch.Tensor, num_groups: int, sms: int | None = None):
        """sms: the multiprocessors to fill (default: x's device's; benchmarks/launches.py models a GPU's plan)."""
        from .skip_output import memory_format
        N, C = x.shape[:2]
        self.fmt = memory_format(x)
        self.N, self.C, self.G, self.Cg, self.HW = N, C, num_groups, C // num_groups, x[0, 0].numel()
        self.s_c, self.s_hw = (1, C) if self.fmt == torch.channels_last else (self.HW, 1)
        self.BLOCK_C = max(2, next_power_of_2(self.Cg))
        if self.BLOCK_C > TILE // 2:
            raise ValueError(f"group_norm_act (triton): expected at most {TILE // 2} channels per group, "
                             f"got {self.Cg}")
        sms = sms or num_sms(x.device)
        want = max(1, min(cdiv(self.Cg * self.HW, MIN_CHUNK), cdiv(2 * sms, N * self.G), 256))
        self.chunk = cdiv(self.HW, want)
        self.S = cdiv(self.HW, self.chunk)
        self.BLOCK_HW = max(2, min(next_power_of_2(self.chunk), TILE // self.BLOCK_C))
        self.num_warps = 8 if self.BLOCK_HW * self.BLOCK_C >= 2048 else 4
        self.grid = (N * self.G, self.S)

    def geometry(self):
        return self.C, self.HW, self.G, self.Cg, self.s_c, self.s_hw, self.chunk, self.S

    def meta(self):
        return dict(BLOCK_HW=self.BLOCK_HW, BLOCK_C=self.BLOCK_C, num_warps=self.num_warps)


def _flags(weight, bias, scale, shift, act):
    return dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
                HAS_SHIFT=shift is not None, SILU=act == "silu")


def _ptrs(x, weight, bias, scale, shift):
    """The operands' pointers and the row stride of scale and shift (N, C). An absent operand gets a dummy pointer;
    the kernel never reads it (its HAS_ flag is off). scale and shift are read in place where their channels are
    adjacent and their rows share one stride (the UNet's: two chunks of the embedding's (N, 2C) output, which a
    .contiguous() copied, two copy kernels a call in the forward and again in the backward); else copied dense."""
    ss = [t for t in (scale, shift) if t is not None]
    if not (all(t.dim() == 2 and t.stride(1) == 1 for t in ss) and len({t.stride(0) for t in ss}) <= 1):
        scale, shift = (None if t is None else t.contiguous() for t in (scale, shift))
    s_sn = next((t.stride(0) for t in (scale, shift) if t is not None), 0)
    return [x if t is None else t.contiguous() for t in (weight, bias)] + \
        [x if t is None else t for t in (scale, shift)], s_sn


# At small batches the plan splits each group's statistics over several programs (phase 1, a kernel of its own) so
# that batch x groups fills the GPU; where a group fits in registers, one resident program per group (the multi-group
# kernel at GPB = 1) does it in one launch instead of two, with fewer programs. Which is faster is measured on the
# device the first time a shape is seen outside a CUDA-graph capture (do_bench, both paths), never guessed, and kept
# for the process; CMFAST_GN_SMALL=split or resident decides without measuring. (The H200 profile of the batch-1
# sample counted 48 statistics kernels, 0.11 ms of its 2.05 ms of kernels.)
_SMALL_CHOICE: dict[tuple, bool] = {}


def _unwrapped(kernel):
    """The JIT function under an autotuner or one of kernels/_autotune's wrappers (to launch one fixed config)."""
    from triton.runtime.autotuner import Autotuner

    from ._autotune import _Fixed, _Switch
    while isinstance(kernel, (Autotuner, _Fixed, _Switch)):
        kernel = kernel.fn
    return kernel


def _resident_wins(x, plan, split, resident) -> bool:
    """Whether to run `resident` instead of `split` (closures launching the two forwards) for this shape."""
    if plan.S == 1 or plan.Cg != plan.BLOCK_C or next_power_of_2(plan.HW) * plan.Cg > RESIDENT:
        return False
    forced = os.environ.get("CMFAST_GN_SMALL", "")
    if forced in ("split", "resident"):
        return forced == "resident"
    key = (x.device, x.dtype, plan.N, plan.C, plan.HW, plan.G, plan.fmt)
    if key not in _SMALL_CHOICE:
        if x.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return False                    # no timing here: the plan's split, until a call outside a capture
        from triton.testing import do_bench
        t_split = do_bench(split, warmup=5, rep=25)
        t_resident = do_bench(resident, warmup=5, rep=25)
        _SMALL_CHOICE[key] = t_resident < t_split
    return _SMALL_CHOICE[key]


def group_norm_act_fwd(x, num_groups, weight, bias, eps, scale, shift, act, pre_bias=None):
    """(y, stats (N*G, 3) fp32 [pivot K, mean of x - K, rstd], plan); y in x's dtype and memory format.
    pre_bias ((N, C) or (1, C)): normalise x + pre_bias[n, c] instead, the sum in fp32 (forward only: the stats
    are then not the backward's)."""
    plan = Plan(x, num_groups)
    pre = x if pre_bias is None else pre_bias.contiguous()
    s_pn = 0 if pre_bias is None or pre_bias.shape[0] == 1 else plan.C
    x = x.contiguous(memory_format=plan.fmt)
    y = torch.empty_like(x)
    stats = torch.empty(plan.N * plan.G, 3, device=x.device, dtype=torch.float32)
    one_pass = plan.S == 1
    N, G = plan.N, plan.G
    ptrs, s_sn = _ptrs(x, weight, bias, scale, shift)
    groups_args = (x, y, stats, *ptrs, pre, N, plan.C, plan.HW, G, plan.s_c, plan.s_hw, eps, s_pn, s_sn)
    groups_meta = dict(**_flags(weight, bias, scale, shift, act), HAS_PRE=pre_bias is not None, CG=plan.Cg,
                       HW_P2=next_power_of_2(plan.HW), TILE_ELEMS=TILE, RESIDENT_ELEMS=RESIDENT)
    if one_pass and plan.Cg == plan.BLOCK_C:      # Cg a power of two: whole groups, several a program
        _group_norm_act_fwd_groups_kernel[lambda meta: (N * G // meta["GPB"],)](*groups_args, **groups_meta)
        return y, stats, plan
    part = torch.empty(plan.N * plan.G, plan.S, 3, device=x.device, dtype=torch.float32)

    def split():
        if not one_pass:
            _group_norm_stats_kernel[plan.grid](x, pre, part, *plan.geometry(), s_pn,
                                                HAS_PRE=pre_bias is not None, **plan.meta())
        _group_norm_act_fwd_kernel[plan.grid](x, y, part, stats, *ptrs, pre,
                                              *plan.geometry(), eps, s_pn, s_sn,
                                              **_flags(weight, bias, scale, shift, act),
                                              ONE_PASS=one_pass, HAS_PRE=pre_bias is not None,
                                              BLOCK_S=max(2, next_power_of_2(plan.S)), **plan.meta())

    def resident():                               # one program per group, the group in registers
        _unwrapped(_group_norm_act_fwd_groups_kernel)[(N * G,)](*groups_args, **groups_meta, GPB=1, STREAM=0,
                                                                num_warps=8)
    (resident if _resident_wins(x, plan, split, resident) else split)()
    return y, stats, plan


def group_norm_act_bwd(dy, x, stats, plan, weight, bias, scale, shift, act):
    """dx (x's dtype and format) and (A, B) = (sum_hw dz, sum_hw dz xhat) per (sample, channel), fp32."""
    x = x.contiguous(memory_format=plan.fmt)
    dy = dy.contiguous(memory_format=plan.fmt)
    dx = torch.empty_like(x)
    ab = torch.empty(plan.N, plan.C, 2, device=x.device, dtype=torch.float32)
    ptrs, s_sn = _ptrs(x, weight, bias, scale, shift)
    flags = _flags(weight, bias, scale, shift, act)
    one_pass = plan.S == 1
    if one_pass and plan.Cg == plan.BLOCK_C:      # as the forward: whole groups, several a program
        N, G = plan.N, plan.G
        _group_norm_act_bwd_groups_kernel[lambda meta: (N * G // meta["GPB"],)](
            x, dy, dx, stats, ab, *ptrs, N, plan.C, plan.HW, G, plan.s_c, plan.s_hw, s_sn, **flags, CG=plan.Cg,
            HW_P2=next_power_of_2(plan.HW), TILE_ELEMS=TILE, RESIDENT_ELEMS=RESIDENT)
        return dx, ab[..., 0], ab[..., 1]
    part = torch.empty(plan.N * plan.G, plan.S, 2, plan.Cg, device=x.device, dtype=torch.float32)
    if not one_pass:
        _group_norm_act_bwd_partial_kernel[plan.grid](x, dy, stats, part, *ptrs, *plan.geometry(), s_sn, **flags,
                                                      **plan.meta())
    _group_norm_act_bwd_dx_kernel[plan.grid](x, dy, dx, stats, part, ab, *ptrs, *plan.geometry(), s_sn, **flags,
                                             ONE_PASS=one_pass, **plan.meta())
    return dx, ab[..., 0], ab[..., 1]


# ---- The parameters' gradients from (A, B), one launch --------------------------------------------------------
# With A = sum_hw dz and B = sum_hw dz xhat per (sample, channel) (the backward kernels' second output), z = (xhat w +
# b)(1 + scale) + shift gives dw = sum_n B (1 + scale), db = sum_n A (1 + scale), dscale = B w + A b, dshift = A. As
# torch ops these were up to 11 launches a call (casts, products, two batch sums, the casts back); the CUDA backend
# computes them in its extension. Sums over the batch in fp32, in a fixed order (no atomics: the same bits each run).
@triton.jit
def _group_norm_param_grads_kernel(a_ptr, b_ptr, s_an, s_ac, s_bn, s_bc, sc_ptr, s_sn, s_sc, w_ptr, bi_ptr,
                                   dw_ptr, db_ptr, dsc_ptr, dsh_ptr, N, C,
                                   HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                                   NEED_W: tl.constexpr, NEED_B: tl.constexpr, NEED_SCALE: tl.constexpr,
                                   NEED_SHIFT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if NEED_SCALE and HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if NEED_SCALE and HAS_B:
        bb = tl.load(bi_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        m = (rows < N)[:, None] & cmask[None, :]
        A = tl.load(a_ptr + rows[:, None] * s_an + cols[None, :] * s_ac, mask=m, other=0.0)
        B = tl.load(b_ptr + rows[:, None] * s_bn + cols[None, :] * s_bc, mask=m, other=0.0)
        nc = rows[:, None] * C + cols[None, :]          # dscale, dshift: dense (N, C)
        if NEED_W or NEED_B:
            if HAS_SCALE:
                s1 = 1.0 + tl.load(sc_ptr + rows[:, None] * s_sn + cols[None, :] * s_sc, mask=m, other=0.0).to(
                    tl.float32)
                acc_w += tl.sum(B * s1, axis=0)
                acc_b += tl.sum(A * s1, axis=0)
            else:
                acc_w += tl.sum(B, axis=0)
                acc_b += tl.sum(A, axis=0)
        if NEED_SCALE:
            ds = B
            if HAS_W:
                ds = B * w[None, :]
            if HAS_B:
                ds = ds + A * bb[None, :]
            tl.store(dsc_ptr + nc, ds.to(dsc_ptr.dtype.element_ty), mask=m)
        if NEED_SHIFT:
            tl.store(dsh_ptr + nc, A.to(dsh_ptr.dtype.element_ty), mask=m)
    if NEED_W:
        tl.store(dw_ptr + cols, acc_w.to(dw_ptr.dtype.element_ty), mask=cmask)
    if NEED_B:
        tl.store(db_ptr + cols, acc_b.to(db_ptr.dtype.element_ty), mask=cmask)


def group_norm_param_grads(A, B, weight, bias, scale, shift, need_w: bool, need_b: bool, need_scale: bool,
                           need_shift: bool):
    """(dweight, dbias, dscale, dshift) from A, B (N, C) fp32 and scale (N, C) (any strides: the embedding's chunks
    are views), each in its parameter's dtype, or None where not needed; one launch (none when nothing is needed)."""
    if not (need_w or need_b or need_scale or need_shift):
        return None, None, None, None
    N, C = A.shape
    dw = torch.empty(C, device=A.device, dtype=weight.dtype) if need_w else None
    db = torch.empty(C, device=A.device, dtype=bias.dtype) if need_b else None
    dsc = torch.empty(N, C, device=A.device, dtype=scale.dtype) if need_scale else None
    dsh = torch.empty(N, C, device=A.device, dtype=shift.dtype) if need_shift else None
    sc = scale if scale is not None else A      # an absent operand: any pointer (never read)
    BLOCK_C = max(2, min(128, next_power_of_2(C)))
    BLOCK_N = max(2, min(next_power_of_2(N), 4096 // BLOCK_C))
    _group_norm_param_grads_kernel[(cdiv(C, BLOCK_C),)](
        A, B, A.stride(0), A.stride(1), B.stride(0), B.stride(1), sc, sc.stride(0), sc.stride(1),
        weight if weight is not None else A,
        bias if bias is not None else A, dw if need_w else A, db if need_b else A, dsc if need_scale else A,
        dsh if need_shift else A, N, C, HAS_SCALE=scale is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, NEED_W=need_w, NEED_B=need_b, NEED_SCALE=need_scale, NEED_SHIFT=need_shift,
        BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C)
    return dw, db, dsc, dsh
