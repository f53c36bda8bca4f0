"""Compile every Triton kernel of kernels/ for a GPU target without a GPU (ptxas ships with triton) and print
each kernel's shared memory: catches what the CPU interpreter accepts but the compiler rejects.

    python scripts/triton_compile_check.py                 # sm_90 (H100 / H200), all dtypes and attention configs
    python scripts/triton_compile_check.py --arch 80 --quick

Exit status 1 when a kernel fails to compile or a config the autotuner may pick needs more shared memory than
the target has (the autotuner would skip such a config at run time; every shape must keep at least one).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)       # compile for real: the kernels must be imported as JIT functions

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from cmfast.kernels import attention as A  # noqa: E402
from cmfast.kernels import consistency_loss as CL  # noqa: E402
from cmfast.kernels import group_norm_act as GN  # noqa: E402
from cmfast.kernels import residual as RS  # noqa: E402
from cmfast.kernels import skip_output as SK  # noqa: E402
from cmfast.kernels import trig_tangent_loss as TT  # noqa: E402

SMEM = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
TY = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def jit_fn(k):
    from triton.runtime.jit import JITFunction
    while not isinstance(k, JITFunction):    # an Autotuner wraps the JITFunction
        k = k.fn
    return k


def signature(fn, ptr_ty: dict, constexprs: dict, floats=()):
    """Types by argument name: *<ty> for pointers (ptr_ty maps names, default fp32), fp32 for `floats`, i32 else."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptr_ty.get(name, ptr_ty.get("*", "fp32"))
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def build(kernel, ptr_ty, constexprs, floats, arch, num_warps=4, num_stages=2):
    fn = jit_fn(kernel)
    src = ASTSource(fn, signature(fn, ptr_ty, constexprs, floats), constexprs=constexprs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                           "num_stages": num_stages})
    return ck.metadata.shared


def cases(quick: bool, attention: bool = True):
    dts = ["bfloat16"] if quick else ["float32", "bfloat16", "float16"]
    for dt in dts:
        t = TY[dt]
        yield "skip_output_fwd", SK._skip_output_fwd_kernel, {"*": t, "sigma_ptr": "fp32", "y_ptr": t}, \
            dict(CLAMP=False, UINT8=False, BLOCK=SK.BLOCK), ("sigma_data", "sigma_min"), {}
        yield "skip_output_infer_u8", SK._skip_output_fwd_kernel, {"*": t, "sigma_ptr": "fp32", "y_ptr": "u8"}, \
            dict(CLAMP=True, UINT8=True, BLOCK=SK.BLOCK), ("sigma_data", "sigma_min"), {}
        yield "skip_output_bwd", SK._skip_output_bwd_kernel, {"*": t, "sigma_ptr": "fp32"}, dict(BLOCK=SK.BLOCK), \
            ("sigma_data", "sigma_min"), {}
        for nhwc in (False, True):     # the bias a parameter (fp32) or stored in the activations' dtype
            for bias_ty in ("fp32", t):
                yield f"residual[nhwc={nhwc},bias={bias_ty}]", RS._residual_fwd_kernel, {"*": t, "b_ptr": bias_ty}, \
                    dict(HAS_BIAS=True, NHWC=nhwc, BLOCK=RS.BLOCK), ("scale",), {}
        # the backward: the input gradient and the bias gradient's fp32 partials, then the bias gradient (in the
        # bias's dtype: a parameter's fp32 or the activations')
        yield "residual_bwd_nchw", RS._residual_bwd_nchw_kernel, {"*": t, "part_ptr": "fp32"}, \
            dict(BLOCK=RS.RED_BLOCK), ("scale",), {}
        yield "residual_bwd_nhwc", RS._residual_bwd_nhwc_kernel, {"*": t, "part_ptr": "fp32"}, \
            dict(TILE_ROWS=RS.TILE_ROWS, TILE_C=RS.TILE_C, ROW_TILES=RS.ROW_TILES), ("scale",), {}
        for bias_ty in ("fp32", t):
            yield f"residual_bias_grad[{bias_ty}]", RS._residual_bias_grad_kernel, {"*": "fp32", "db_ptr": bias_ty}, \
                dict(BLOCK_P=RS.BIAS_P, BLOCK_C=RS.BIAS_C), ("scale",), {}
        for kind in (0, 1, 2):
            yield f"loss_partial[{kind}]", CL._consistency_loss_partial_kernel, \
                {"*": t, "g_ptr": "fp32", "part_ptr": "fp32"}, dict(KIND=kind, BLOCK=CL.BLOCK), (), {}
            yield f"loss_finish[{kind}]", CL._consistency_loss_finish_kernel, {"*": "fp32"}, \
                dict(KIND=kind, HAS_WEIGHT=True, BLOCK_S=16), ("c",), {}
        yield "loss_bwd", CL._consistency_loss_bwd_kernel, {"*": "fp32", "dp_ptr": t}, dict(BLOCK=CL.BLOCK), (), {}
        for fd in (True, False):
            yield f"trig_tangent_partial[fd={fd}]", TT._trig_tangent_partial_kernel, \
                {"*": t, "t_ptr": "fp32", "h_ptr": "fp32", "g_ptr": "fp32", "part_ptr": "fp32"}, \
                dict(FD=fd, BLOCK=TT.BLOCK), ("r", "sd"), {}
        yield "trig_tangent_finish", TT._trig_tangent_finish_kernel, {"*": "fp32"}, dict(BLOCK_S=16), ("c",), {}
        flags = dict(HAS_W=True, HAS_B=True, HAS_SCALE=True, HAS_SHIFT=True, SILU=True)
        for bhw, bc, nw in ((256, 8, 8), (64, 4, 4), (2, 1024, 8)):
            meta = dict(BLOCK_HW=bhw, BLOCK_C=bc)
            gp = {"*": t, "part_ptr": "fp32", "stats_ptr": "fp32", "ab_ptr": "fp32"}
            for pre in (False, True):      # the pre-bias (the sampler's per-channel add) in the activations' dtype
                yield f"gn_stats[{bhw}x{bc},pre={pre}]", GN._group_norm_stats_kernel, gp, dict(meta, HAS_PRE=pre), \
                    (), dict(num_warps=nw)
            for one, pre in ((False, False), (True, False), (False, True), (True, True)):
                yield f"gn_fwd[{bhw}x{bc},one_pass={one},pre={pre}]", GN._group_norm_act_fwd_kernel, gp, \
                    dict(meta, **flags, ONE_PASS=one, HAS_PRE=pre, BLOCK_S=16), ("eps",), dict(num_warps=nw)
                if not pre:
                    yield f"gn_bwd_dx[{bhw}x{bc},one_pass={one}]", GN._group_norm_act_bwd_dx_kernel, gp, \
                        dict(meta, **flags, ONE_PASS=one), (), dict(num_warps=nw)
            yield f"gn_bwd_partial[{bhw}x{bc}]", GN._group_norm_act_bwd_partial_kernel, gp, dict(meta, **flags), \
                (), dict(num_warps=nw)
        # the parameters' gradients from A, B (fp32), scale and dscale / dshift in the activations' dtype
        for has, bn, bc in ((True, 32, 128), (False, 2, 2)):
            yield f"gn_param_grads[all={has},{bn}x{bc}]", GN._group_norm_param_grads_kernel, \
                {"*": "fp32", "sc_ptr": t, "dsc_ptr": t, "dsh_ptr": t}, \
                dict(HAS_SCALE=has, HAS_W=has, HAS_B=has, NEED_W=True, NEED_B=True, NEED_SCALE=has, NEED_SHIFT=has,
                     BLOCK_N=bn, BLOCK_C=bc), (), {}
        # several groups a program; HW 1024 (DDPM++ 32x32): GPB x Cg = 8 in registers unless streamed, wider streamed
        for cg, gpb, hw, st in ((8, 1, 1024, 0), (8, 1, 1024, 1), (8, 4, 1024, 0), (8, 8, 64, 0), (4, 8, 256, 0),
                                (2, 2, 4096, 0)):
            for pre in (False, True):
                yield f"gn_fwd_groups[cg={cg},gpb={gpb},hw={hw},stream={st},pre={pre}]", \
                    GN._group_norm_act_fwd_groups_kernel, {"*": t, "stats_ptr": "fp32"}, \
                    dict(flags, HAS_PRE=pre, CG=cg, HW_P2=hw, TILE_ELEMS=GN.TILE, RESIDENT_ELEMS=GN.RESIDENT, GPB=gpb,
                         STREAM=st), ("eps",), dict(num_warps=8)
            yield f"gn_bwd_groups[cg={cg},gpb={gpb},hw={hw},stream={st}]", GN._group_norm_act_bwd_groups_kernel, \
                {"*": t, "stats_ptr": "fp32", "ab_ptr": "fp32"}, \
                dict(flags, CG=cg, HW_P2=hw, TILE_ELEMS=GN.TILE, RESIDENT_ELEMS=GN.RESIDENT, GPB=gpb, STREAM=st), \
                (), dict(num_warps=16 if not st and gpb * cg * hw <= GN.RESIDENT else 8)
        prec = "ieee" if dt == "float32" else "tf32"
        for D in ((256,) if quick else (16, 64, 256)) if attention else ():
            base = dict(PREC=prec, UPCAST=False, BLOCK_D=D)
            ap = {"*": t, "lse_ptr": "fp32", "delta_ptr": "fp32"}
            for name, k, configs, floats in (("attn_fwd", A._attention_fwd_kernel, A.FWD_CONFIGS, ("qk_scale",)),
                                             ("attn_dkdv", A._attention_bwd_dkdv_kernel, A.BWD_CONFIGS,
                                              ("scale", "qk_scale")),
                                             ("attn_dq", A._attention_bwd_dq_kernel, A.BWD_CONFIGS,
                                              ("scale", "qk_scale"))):
                named = {"BLOCK_D": D, "Lq": 256, "Lk": 256, "q_ptr": _Elem(dt)}
                for c in A._prune(configs, named):
                    yield f"{name}[D={D},{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']},w{c.num_warps},s{c.num_stages}]", \
                        k, ap, dict(base, **c.kwargs), floats, dict(num_warps=c.num_warps, num_stages=c.num_stages)
            yield f"attn_delta[D={D}]", A._attention_bwd_delta_kernel, {"*": t, "delta_ptr": "fp32"}, \
                dict(BLOCK_M=32, BLOCK_D=D), (), {}


class _Elem:
    def __init__(self, dt):
        self.size = {"float32": 4, "bfloat16": 2, "float16": 2}[dt]

    def element_size(self):
        return self.size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="triton_compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    p.add_argument("--quick", action="store_true", help="bf16 and D = 256 only")
    p.add_argument("--no-attention", action="store_true", help="skip the attention kernels (the slow part)")
    p.add_argument("--only", default="", help="name prefixes separated by ';': compile only those kernels")
    a = p.parse_args(argv)
    limit, bad, t0 = SMEM.get(a.arch, 99 * 1024), 0, time.time()
    seen_dtype = None
    only = tuple(x for x in a.only.split(";") if x)
    for name, k, ptr_ty, constexprs, floats, opts in cases(a.quick, not a.no_attention):
        if only and not name.startswith(only):
            continue
        dt = ptr_ty.get("*")
        if dt != seen_dtype:
            print(f"-- {dt}")
            seen_dtype = dt
        try:
            shared = build(k, ptr_ty, constexprs, floats, a.arch, **opts)
            flag = "  OVER SHARED-MEMORY LIMIT" if shared > limit else ""
            bad += bool(flag)
            print(f"{name:52s} shared {shared / 1024:6.1f} KiB{flag}")
        except Exception as e:
            shared, flag = None, f"  FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"{name:52s}{flag}")
            bad += 1
    print(f"compiled for sm_{a.arch} in {time.time() - t0:.0f} s; {bad} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
