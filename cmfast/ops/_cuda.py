"""The cuda backend: autograd wrappers around the CUDA C++ kernels of csrc/ (the extension module cmfast._C).

The module takes device addresses, sizes, dtype codes and a stream as integers, so these wrappers check every
tensor first (CUDA device, dtype, shape), make it dense in one layout (NCHW or channels-last: the batch stays
outermost in both), allocate outputs and fp32 workspaces with torch, and launch on torch's current stream; nothing
synchronizes the host. Signatures are those of the torch backend (cmfast/ops/_torch.py).
The extension is loaded (built once if needed, cmfast/_build.py) on the first call, not at import.
"""
from __future__ import annotations

import functools
import math
import os

import torch
from torch.autograd.function import once_differentiable

from .. import _build
from . import _batching as _b
from . import check_pre_bias_forward_only
from . import is_nhwc as _is_nhwc

# The dispatcher reports this as BackendUnavailable; 'auto' then takes the next-fastest backend.
if _build.unavailable_reason():
    raise ImportError(_build.unavailable_reason())

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_LOSS_KINDS = {"pseudo_huber": 0, "l2": 1, "l1": 2}


# ---- argument checks (one line each) ----------------------------------------------------------------------------
def _check(name: str, t, device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name}: the cuda backend needs CUDA tensors, got a tensor on {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name}: the cuda backend supports float32, float16 and bfloat16, got {t.dtype}")
    return t


def _check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _param(name: str, t, shape: tuple, device: torch.device) -> torch.Tensor | None:
    """An optional per-channel / per-sample parameter as a dense fp32 tensor (None stays None)."""
    if t is None:
        return None
    _check(name, t, device)
    _check_shape(name, t, shape)
    return t.float().contiguous()


def _params_one_dtype(names: tuple, ts: tuple, shapes: tuple, x: torch.Tensor, as_is: bool) -> tuple:
    """Optional parameters read in one dtype (weight and bias; scale, shift and the pre-norm add), each of the shape
    given for it, and the dtype code the kernel reads them in: their own dtype when `as_is` and all (those given) are
    fp32 or all x's dtype, else fp32 copies. Strides as given (no copy where the dtype stays)."""
    given = [t for t in ts if t is not None]
    for name, t, shape in zip(names, ts, shapes):
        if t is not None:
            _check(name, t, x.device)
            _check_shape(name, t, shape)
    dt = given[0].dtype if given else torch.float32
    if not (as_is and dt in (x.dtype, torch.float32) and all(t.dtype == dt for t in given)):
        dt = torch.float32
    return (*(None if t is None else t.to(dt) for t in ts), _DTYPES[dt])


def _rows(ts: tuple, C: int) -> tuple:
    """(N, C) tensors (or None) as the kernel reads them, row n at n * stride, and that stride: as they are where they
    share one row stride >= C and their rows are contiguous (the UNet's scale and shift, two chunks of one embedding
    output, read in place: a copy of each was two launches a call), else dense copies (stride C)."""
    given = [t for t in ts if t is not None]
    if not given:
        return ts, C
    s0 = given[0].stride(0)
    if given[0].shape[0] <= 1:
        s0 = C            # one row: its stride is never used
    if all((t.stride(1) == 1 or C <= 1) and (t.shape[0] <= 1 or t.stride(0) == s0) for t in given) and s0 >= C:
        return ts, s0
    return tuple(None if t is None else t.contiguous() for t in ts), C


def _sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(sigma, torch.Tensor) or sigma.device != x.device or sigma.dtype != torch.float32:
        raise TypeError(f"sigma: expected a float32 tensor on {x.device}, got "
                        f"{getattr(sigma, 'dtype', type(sigma).__name__)} on {getattr(sigma, 'device', '-')}")
    _check_shape("sigma", sigma, (x.shape[0],))
    return sigma.contiguous()


# ---- layout, streams, the extension -----------------------------------------------------------------------------
def _dense(t: torch.Tensor, nhwc: bool) -> torch.Tensor:
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if nhwc else t.contiguous()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_loaded: dict = {}


def _ext(device: torch.device):
    """cmfast._C, built for this device's compute capability (or $CMFAST_CUDA_ARCH) when not installed.
    Looked up once per device: checking the build hashes csrc/, too slow for every call."""
    mod = _loaded.get(device.index)
    if mod is not None:
        return mod
    from . import BackendUnavailable
    arch = os.environ.get("CMFAST_CUDA_ARCH") or "".join(map(str, torch.cuda.get_device_capability(device)))
    try:
        mod = _loaded[device.index] = _build.load(arch)
    except (_build.ToolchainMissing, RuntimeError, ImportError, ValueError) as e:
        raise BackendUnavailable(f"backend 'cuda' is unavailable: {str(e).splitlines()[0]}") from None
    return mod


class _on_device:
    """Make `device` current only when it is not already (kernels launch on the current device)."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.index != torch.cuda.current_device() else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# ---- skip output (CM paper eq. 7) -------------------------------------------------------------------------------
def _skip_prepare(x, F, sigma):
    _check("x", x)
    _check("F", F, x.device)
    _check_shape("F", F, x.shape)
    sigma = _sigma(sigma, x)
    nhwc = _is_nhwc(x)
    return _dense(x, nhwc), _dense(F, nhwc), sigma, nhwc


def _skip_bwd(g, sigma, sigma_data, sigma_min, nhwc, F_dtype, need_dx, need_dF):
    """(dx, dF) = (c_skip g, c_out g), each only where needed."""
    g, sigma = _dense(g, nhwc), sigma.contiguous()
    dx = torch.empty_like(g) if need_dx else None
    dF = torch.empty_like(g, dtype=F_dtype) if need_dF else None
    B = g.shape[0]
    with _on_device(g.device):
        _ext(g.device).skip_output_bwd(g.data_ptr(), _DTYPES[g.dtype], sigma.data_ptr(), sigma_data, sigma_min,
                                       B, g.numel() // max(B, 1), _ptr(dx), _ptr(dF), _DTYPES[F_dtype],
                                       _stream(g.device))
    return dx, dF


# The Functions take the torch.func style (forward without ctx, setup_context, vmap): see cmfast/ops/_batching.py.
_SkipBwd = _b.kernel_call(_skip_bwd, "ss------")


@_b.eager_twin
class _SkipOutput(torch.autograd.Function):
    """Outputs (y, nhwc): the layout the forward chose goes to the backward through setup_context."""

    @staticmethod
    def forward(x, F, sigma, sigma_data, sigma_min):
        x, F, sigma, nhwc = _skip_prepare(x, F, sigma)
        y = torch.empty_like(x)
        B = x.shape[0]
        with _on_device(x.device):
            _ext(x.device).skip_output_fwd(x.data_ptr(), _DTYPES[x.dtype], F.data_ptr(), _DTYPES[F.dtype],
                                           sigma.data_ptr(), sigma_data, sigma_min, B, x.numel() // max(B, 1), 0,
                                           y.data_ptr(), _stream(x.device))
        return y, nhwc

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, F, sigma, sigma_data, sigma_min = inputs
        ctx.save_for_backward(sigma)
        ctx.meta = (sigma_data, sigma_min, output[1], F.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g, *_):
        (sigma,) = ctx.saved_tensors
        sigma_data, sigma_min, nhwc, F_dtype = ctx.meta
        need = ctx.needs_input_grad
        bwd = _SkipBwd.apply if _b.transformed(sigma) else _skip_bwd    # batched g under vmap(grad) / jacrev: folded
        dx, dF = bwd(g, sigma, sigma_data, sigma_min, nhwc, F_dtype, need[0], need[1])
        return dx, dF, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return _b.rule(_SkipOutput.apply, "sss--", info, in_dims, args)


def skip_output(x, F, sigma, sigma_data, sigma_min):
    """c_skip(sigma) x + c_out(sigma) F in x's dtype; differentiable in x and F (not sigma)."""
    if isinstance(sigma, torch.Tensor) and sigma.requires_grad and torch.is_grad_enabled():
        raise ValueError("skip_output (cuda): expected sigma without requires_grad (no gradient w.r.t. sigma); "
                         "use backend 'torch' to differentiate through the scalings")
    return _b.apply(_SkipOutput, x, F, sigma, float(sigma_data), float(sigma_min))


def skip_output_infer(x, F, sigma, sigma_data, sigma_min, uint8):
    """Sampler epilogue: clamp(c_skip x + c_out F, -1, 1), or its uint8 bytes round((y + 1) * 127.5). No autograd."""
    if _b.transformed():    # batched tensors under vmap: folded (no gradient either way)
        return _SkipInfer.apply(x.detach(), F.detach(), sigma, float(sigma_data), float(sigma_min), uint8)
    return _skip_infer(x, F, sigma, sigma_data, sigma_min, uint8)


def _skip_infer(x, F, sigma, sigma_data, sigma_min, uint8):
    x, F, sigma, _ = _skip_prepare(x, F, sigma)
    y = torch.empty_like(x, dtype=torch.uint8 if uint8 else x.dtype)
    B = x.shape[0]
    with _on_device(x.device):
        _ext(x.device).skip_output_fwd(x.data_ptr(), _DTYPES[x.dtype], F.data_ptr(), _DTYPES[F.dtype],
                                       sigma.data_ptr(), float(sigma_data), float(sigma_min), B,
                                       x.numel() // max(B, 1), 2 if uint8 else 1, y.data_ptr(), _stream(x.device))
    return y


_SkipInfer = _b.kernel_call(_skip_infer, "sss---")


# ---- group_norm_act ---------------------------------------------------------------------------------------------
def _num_splits(N: int, C: int, HW: int, nhwc: bool, sms: int) -> int:
    """Chunks per (n, c) of the reduction over HW, so that small N x C still gives every SM work: about 32 warps
    per SM (NCHW: a warp per chunk, >= 256 elements each) or 2 blocks per SM (NHWC: 32 channels x >= 32 rows)."""
    if nhwc:
        return max(1, min(math.ceil(2 * sms / (N * math.ceil(C / 32))), math.ceil(HW / 32)))
    return max(1, min(math.ceil(32 * sms / (N * C)), math.ceil(HW / 256)))


def _fused_max_group(ext) -> int:
    """The largest group (C / G * HW elements) whose forward runs as one block per group (csrc/cmfast.h); a function
    so that tests can force the split path."""
    return ext.GN_FUSED_MAX_GROUP


def _fused_fits(ext, C: int, G: int, HW: int) -> bool:
    """Whether the forward runs in one launch, one block per group: groups of at most GN_FUSED_MAX_GROUP elements
    and GN_FUSED_MAX_CHANNELS channels (their coefficients are kept in shared memory)."""
    return (C // G) * HW <= _fused_max_group(ext) and C // G <= ext.GN_FUSED_MAX_CHANNELS


def _carve(ws: torch.Tensor, *sizes: int) -> list[int]:
    """Addresses of consecutive fp32 arrays of the given lengths inside one workspace allocation (one torch.empty
    instead of several: at batch 1 the host-side cost of each allocation is comparable to the kernels)."""
    out, at = [], ws.data_ptr()
    for n in sizes:
        out.append(at)
        at += 4 * n
    return out


def _gn_forward(x, num_groups, weight, bias, eps, scale, shift, silu, pre=None, save=True):
    """The forward launch: (y, what the backward needs). With pre, (N, C) or (1, C), the output is that of x + pre
    (the add inside the kernel) and the saved statistics are those of x + pre: no backward then. save=False (no
    backward will run): the one-launch path writes no statistics, and nothing is allocated for them."""
    nhwc = _is_nhwc(x)
    x = _dense(x, nhwc)
    N, C = x.shape[:2]
    HW = x.numel() // max(N * C, 1)
    dev = x.device
    ext = _ext(dev)
    S = _num_splits(N, C, HW, nhwc, _sm_count(dev.index))     # the backward's split count
    # The forward in one launch (one block per group) where the group is small enough, else split like the
    # backward: at batch 1 and 8 the split path's three launches cost 3-6x the Triton kernel's one (H100 graph
    # replay times, benchmarks/results/nvidia-h100-80gb-hbm3-cuda-ops.json).
    S_fwd = 0 if _fused_fits(ext, C, num_groups, HW) else S
    # The one-launch path reads the parameters in their own dtype where it is fp32 or x's, one dtype for weight and
    # bias and one for scale, shift and pre (the bf16 sampler: fp32 affine, bf16 modulation or pre-add): converting
    # them to fp32 cost up to four launches, more than the kernel itself at batch 1 and 8 (H200 graph replays).
    w, b, adt = _params_one_dtype(("weight", "bias"), (weight, bias), ((C,),) * 2, x, S_fwd == 0)
    w, b = (None if t is None else t.contiguous() for t in (w, b))
    pre_shape = (N, C) if pre is None or pre.shape[0] == N else (1, C)
    sc, sh, pre, mdt = _params_one_dtype(("scale", "shift", "pre_bias"), (scale, shift, pre),
                                         ((N, C), (N, C), pre_shape), x, S_fwd == 0)
    (sc, sh), ms = _rows((sc, sh), C)
    pre = None if pre is None else pre.contiguous()
    y = torch.empty_like(x)
    # saved: stats (N*G*2: mean, rstd), A, B (N*C each); scratch: the split partials (N*S*C*2). The split path
    # needs them as its own workspace, saved or not.
    saved = part = None
    stats = A = B = 0
    if save or S_fwd:
        saved = torch.empty(N * num_groups * 2 + 2 * N * C, device=dev, dtype=torch.float32)
        stats, A, B = _carve(saved, N * num_groups * 2, N * C, N * C)
    if S_fwd:
        part = torch.empty(N * S_fwd * C * 2, device=dev, dtype=torch.float32)
    with _on_device(dev):
        ext.group_norm_act_fwd(x.data_ptr(), _DTYPES[x.dtype], N, C, HW, num_groups, S_fwd, nhwc, silu, eps,
                               _ptr(w), _ptr(b), _ptr(sc), _ptr(sh), ms, _ptr(pre),
                               C if N > 1 and pre_shape[0] == N else 0, adt, mdt, y.data_ptr(), _ptr(part), stats,
                               A, B, _stream(dev))
    return y, (x, w, b, sc, saved, S, nhwc)


def _gn_bwd(dy, x, stats, A, B, w, b, sc, G, S, nhwc, silu, dtypes, need):
    """(dx, dweight, dbias, dscale, dshift), each only where `need` says. The statistics (N * G * 2) and A, B (N * C):
    addresses in the forward's workspace, or (under vmap) flat fp32 tensors, sample after sample. S and nhwc None (a
    folded or looped call under vmap, whose batch and layout are not the forward's): taken from this x, made dense."""
    w, b = (None if t is None else t.float().contiguous() for t in (w, b))   # fp32 here (no-op if so)
    if nhwc is None:
        nhwc = _is_nhwc(x)
        x = _dense(x, nhwc)
        stats, A, B = stats.data_ptr(), A.data_ptr(), B.data_ptr()
    dy = _dense(dy.to(x.dtype), nhwc)
    N, C = x.shape[:2]
    (sc,), ms = _rows((None if sc is None else sc.float(),), C)    # the forward's chunk of the embedding, in place
    HW = x.numel() // max(N * C, 1)
    dev = x.device
    S = _num_splits(N, C, HW, nhwc, _sm_count(dev.index)) if S is None else S
    f32 = dict(device=dev, dtype=torch.float32)
    dx = torch.empty_like(x) if need[0] else None
    dw = torch.empty(C, **f32) if need[2] else None
    db = torch.empty(C, **f32) if need[3] else None
    dscale = torch.empty(N, C, **f32) if need[5] else None
    dshift = torch.empty(N, C, **f32) if need[6] else None
    ws = torch.empty(N * S * C * 2 + N * C * 2 + N * C + N * G * 2, **f32)
    part, csum, P, m12 = _carve(ws, N * S * C * 2, N * C * 2, N * C, N * G * 2)
    with _on_device(dev):
        _ext(dev).group_norm_act_bwd(x.data_ptr(), dy.data_ptr(), _DTYPES[x.dtype], N, C, HW, G, S, nhwc, silu,
                                     _ptr(w), _ptr(b), _ptr(sc), ms, stats, A, B, part, csum, P, m12, _ptr(dx),
                                     _ptr(dw), _ptr(db), _ptr(dscale), _ptr(dshift), _stream(dev))
    return (dx, *(None if g is None else g.to(dt) for g, dt in zip((dw, db, dscale, dshift), dtypes)))


# The weight and bias gradients sum over the batch: a folded call would sum over the vmapped calls too, so those
# loop (one call per vmapped slice); the rest folds.
_GNBwd = _b.kernel_call(_gn_bwd, "ssssspps------", loops=lambda a: a[13][2] or a[13][3])


@_b.eager_twin
class _GroupNormAct(torch.autograd.Function):
    """Outputs (y, x's dense copy or None where x was dense, the workspace, (S, nhwc)): the forward's statistics
    (N * G * 2) and per-channel coefficients A, B (N * C each), in that order in one fp32 workspace, with the split
    count and layout, go to the backward through setup_context; group_norm_act returns y."""

    @staticmethod
    def forward(x, num_groups, weight, bias, eps, scale, shift, silu):
        y, (xd, w, b, sc, saved, S, nhwc) = _gn_forward(x, num_groups, weight, bias, eps, scale, shift, silu)
        return y, None if xd is x else xd, saved, (S, nhwc)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, num_groups, weight, bias, eps, scale, shift, silu = inputs
        y, xd, saved, (S, nhwc) = output
        ctx.mark_non_differentiable(saved, *(() if xd is None else (xd,)))
        ctx.set_materialize_grads(False)
        # weight, bias, scale as given: the backward reads them in fp32 (no-ops for the UNet's fp32 parameters)
        ctx.save_for_backward(x if xd is None else xd, saved, weight, bias, scale)
        ctx.meta = (num_groups, S, nhwc, silu, [None if t is None else t.dtype for t in (weight, bias, scale, shift)])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *_):
        x, saved, w, b, sc = ctx.saved_tensors
        G, S, nhwc, silu, dtypes = ctx.meta
        N, C = x.shape[:2]
        need = ctx.needs_input_grad
        if _b.transformed(x):   # batched tensors under vmap(grad) / jacrev: each call's workspace in its three parts
            stats, A, B = saved.split((N * G * 2, N * C, N * C))
            grads = _GNBwd.apply(dy, x, stats, A, B, w, b, sc, G, None, None, silu, dtypes, need)
        else:
            stats, A, B = _carve(saved, N * G * 2, N * C, N * C)
            grads = _gn_bwd(dy, x, stats, A, B, w, b, sc, G, S, nhwc, silu, dtypes, need)
        dx, dw, db, dscale, dshift = grads
        return dx, None, dw, db, None, dscale, dshift, None

    @staticmethod
    def vmap(info, in_dims, *args):
        # weight and bias shared ('p'): folded; vmapped per call (a different affine per slice): a loop. A folded
        # call's workspace holds all V * N samples' statistics, then all A, then all B: regrouped per vmapped call.
        out, dims = _b.rule(_GroupNormAct.apply, "s-pp-ss-", info, in_dims, args, regroup=_gn_regroup)
        return out, dims


def _gn_regroup(out, V: int, args):
    """A folded forward's outputs with its workspace [stats, A, B] over V * N samples as V workspaces [stats_v, A_v,
    B_v], one after the other (each what a call on the N samples of one vmapped slice writes)."""
    y, xd, saved, meta = out
    VN, C = y.shape[:2]
    stats, A, B = saved.split((VN * args[1] * 2, VN * C, VN * C))
    return y, xd, torch.cat((stats.view(V, -1), A.view(V, -1), B.view(V, -1)), 1).reshape(-1), meta


def group_norm_act(x, num_groups, weight, bias, eps, scale, shift, act, pre_bias=None):
    """act(GroupNorm(x) * (1 + scale) + shift) with fp32 statistics; differentiable in x, weight, bias, scale,
    shift. Output in x's dtype and layout (NCHW or channels-last). pre_bias, (N, C) or (1, C): the output is that of
    x + pre_bias, added inside the kernel, forward only (cmfast.ops passes it only without a gradient)."""
    _check("x", x)
    if x.dim() < 3:
        raise ValueError(f"x: expected (N, C, ...) with at least one spatial dimension, got shape {tuple(x.shape)}")
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"num_groups: expected a positive divisor of the {C} channels, got {num_groups!r}")
    if act not in ("silu", "none"):
        raise ValueError(f"act: expected 'silu' or 'none', got {act!r}")
    for name, t, shape in (("weight", weight, (C,)), ("bias", bias, (C,)),
                           ("scale", scale, tuple(x.shape[:2])), ("shift", shift, tuple(x.shape[:2]))):
        if t is not None:
            _check(name, t, x.device)
            _check_shape(name, t, shape)
    if pre_bias is not None:
        _check("pre_bias", pre_bias, x.device)
        if pre_bias.shape not in (tuple(x.shape[:2]), (1, C)):
            raise ValueError(f"pre_bias: expected shape {tuple(x.shape[:2])} or (1, {C}), got {tuple(pre_bias.shape)}")
        check_pre_bias_forward_only(x, weight, bias, scale, shift, pre_bias)
    if _b.transformed():
        # Under vmap / grad the kernels run through the Function and its rules (cmfast/ops/_batching.py); the pre-add
        # is then an add in x's dtype first, as where a gradient is needed
        if pre_bias is not None:
            x = x + pre_bias.to(x.dtype).reshape(pre_bias.shape + (1,) * (x.dim() - 2))
        return _b.apply(_GroupNormAct, x, num_groups, weight, bias, float(eps), scale, shift, act == "silu")
    if pre_bias is not None or not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, scale, shift))):
        # no backward: the launch alone (no autograd node, nothing for one to record), and nothing saved for one
        return _gn_forward(x, num_groups, weight, bias, float(eps), scale, shift, act == "silu", pre_bias,
                           save=False)[0]
    return _b.apply(_GroupNormAct, x, num_groups, weight, bias, float(eps), scale, shift, act == "silu")


group_norm_act.fuses_pre_bias = True


# ---- consistency loss (CM paper eq. 10's distance d; iCT pseudo-Huber) -----------------------------------------
def _loss_bwd(grad, gout, shape, nhwc, dtype):
    """d loss / d pred = gout_b times the forward's gradient (B, d), in pred's dtype and (dense) layout."""
    gout = gout.float().contiguous()
    B, d = grad.shape
    # in the element order of pred as the forward read it (NCHW or channels-last, dense)
    order = (B, *shape[2:], shape[1]) if nhwc else (B, *shape[1:])
    dpred = torch.empty(order, dtype=dtype, device=grad.device)
    dpred = dpred.movedim(-1, 1) if nhwc else dpred
    with _on_device(grad.device):
        _ext(grad.device).consistency_loss_bwd(grad.contiguous().data_ptr(), gout.data_ptr(), B, d, dpred.data_ptr(),
                                               _DTYPES[dtype], _stream(grad.device))
    return dpred


_LossBwd = _b.kernel_call(_loss_bwd, "ss---")


@_b.eager_twin
class _ConsistencyLoss(torch.autograd.Function):
    """Outputs (loss, grad, unweighted, meta): the gradient (B, d) fp32 computed with the loss, the unweighted loss
    (B,) (for the weight's gradient) and pred's layout go to the backward through setup_context; need_pred and
    need_weight say which the forward computes (the torch.func style has no ctx.needs_input_grad there)."""

    @staticmethod
    def forward(pred, target, kind, c, weight, need_pred, need_weight):
        nhwc = _is_nhwc(pred)  # the loss sums each sample: only pred and target must share a layout
        pred, target = _dense(pred, nhwc), _dense(target, nhwc)
        B = pred.shape[0]
        d = pred.numel() // max(B, 1)
        dev = pred.device
        w = _param("weight", weight, (B,), dev)
        loss = torch.empty(B, device=dev, dtype=torch.float32)
        grad = torch.empty(B, d, device=dev, dtype=torch.float32) if need_pred else None
        ext = _ext(dev)
        args = (pred.data_ptr(), _DTYPES[pred.dtype], target.data_ptr(), _DTYPES[target.dtype])
        with _on_device(dev):
            ext.consistency_loss_fwd(*args, _ptr(w), _LOSS_KINDS[kind], c, B, d, loss.data_ptr(), _ptr(grad),
                                     _stream(dev))
            unweighted = None
            if need_weight:  # d loss_b / d weight_b = the unweighted distance
                unweighted = torch.empty(B, device=dev, dtype=torch.float32)
                ext.consistency_loss_fwd(*args, 0, _LOSS_KINDS[kind], c, B, d, unweighted.data_ptr(), 0, _stream(dev))
        return loss, grad, unweighted, nhwc

    @staticmethod
    def setup_context(ctx, inputs, output):
        pred, target, kind, c, weight, need_pred, need_weight = inputs
        loss, grad, unweighted, nhwc = output
        ctx.mark_non_differentiable(*(t for t in (grad, unweighted) if t is not None))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad, unweighted)
        ctx.meta = (tuple(pred.shape), nhwc, pred.dtype, target.dtype, weight.dtype if weight is not None else None)

    @staticmethod
    @once_differentiable
    def backward(ctx, gout, *_):
        grad, unweighted = ctx.saved_tensors
        shape, nhwc, pred_dtype, target_dtype, weight_dtype = ctx.meta
        dpred = dtarget = dweight = None
        if ctx.needs_input_grad[0]:
            bwd = _LossBwd.apply if _b.transformed(grad) else _loss_bwd     # batched under vmap(grad) / jacrev: folded
            dpred = bwd(grad, gout, shape, nhwc, pred_dtype)
        if ctx.needs_input_grad[1]:  # rare (targets are usually stop-gradient): plain torch is enough
            dtarget = -(grad * gout.float()[:, None]).to(target_dtype)
            dtarget = dtarget.reshape(dtarget.shape[0], *shape[1:]) if not nhwc else \
                dtarget.reshape(dtarget.shape[0], *shape[2:], shape[1]).movedim(-1, 1)
        if ctx.needs_input_grad[4]:
            dweight = (unweighted * gout.float()).to(weight_dtype)
        return dpred, dtarget, None, None, dweight, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return _b.rule(_ConsistencyLoss.apply, "ss--s--", info, in_dims, args)


def consistency_loss(pred, target, kind, c, weight):
    """Per-sample distance (B,) in fp32 with its gradient computed in the forward kernel."""
    _check("pred", pred)
    _check("target", target, pred.device)
    if pred.dim() < 1 or target.shape != pred.shape:
        raise ValueError(f"target: expected the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    if kind not in _LOSS_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(_LOSS_KINDS)}, got {kind!r}")
    if weight is not None:
        _check("weight", weight, pred.device)
        _check_shape("weight", weight, (pred.shape[0],))
    grad = torch.is_grad_enabled()
    return _b.apply(_ConsistencyLoss, pred, target, kind, float(c), weight, grad and (pred.requires_grad or
                                  target.requires_grad), grad and weight is not None and weight.requires_grad)
