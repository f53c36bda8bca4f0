"""The CUDA kernels of csrc/ run on CPU under tests/csrc_emu/emu.h (each CUDA thread a std::thread, real barriers
for __syncthreads and warp shuffles), compiled by g++ from the same sources, launch code included, and driven
through the real autograd wrappers of cmfast/ops/_cuda.py with CPU tensors. Forward and every gradient against
the float64 references of tests/reference.py, with the GPU tests' rule: at most 2x the error of PyTorch itself in
the same dtype plus four ulps at the output's scale; outputs and workspaces poisoned with NaN.

This checks indexing, reductions, split counts, vector/scalar paths and the wrappers without a GPU; it cannot check
timing, occupancy or the GPU memory model (tests/test_ops_cuda.py does, with -m gpu).
"""
import concurrent.futures
import contextlib
import functools
import importlib.util
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import _checks
import reference as ref
from _checks import DTYPES, poisoned, rand
from cmfast import _build

if _build.unavailable_reason():
    pytest.skip(_build.unavailable_reason(), allow_module_level=True)
from cmfast.ops import _cuda  # noqa: E402
from cmfast.ops import _torch  # noqa: E402

EMU = Path(__file__).resolve().parent / "csrc_emu" / "emu.h"
LAUNCH = re.compile(r"^(\s*)(.*?)<<<(.*?)>>>\(", re.M)  # kernel<<<grid, block, smem, stream>>>(args
CL, NCHW = torch.channels_last, torch.contiguous_format


def build_emulated(out: Path) -> Path:
    """csrc/ with every launch rewritten to emu::launch(grid, block)(kernel, args...), compiled by g++."""
    pybind11 = pytest.importorskip("pybind11")
    if shutil.which("g++") is None or _build.cuda_home() is None:
        pytest.skip("needs g++ and the CUDA headers (a CUDA toolkit) to compile the emulated kernels")
    for p in _build.CSRC.glob("*"):
        text = p.read_text()
        if p.name == "bindings.cpp":  # its own module name: it must not meet a real cmfast._C in sys.modules' way
            text = "#define CMFAST_MODULE _C_emu\n" + text
        if p.suffix == ".cu":
            text = LAUNCH.sub(lambda m: f"{m[1]}emu::launch({m[3]})({m[2]}, ", text)
        (out / p.name).write_text(text)
    inc = [f"-I{out}", f"-I{_build.cuda_home()}/include"]
    cmds = [["g++", "-x", "c++", "-std=c++20", "-O1", "-fPIC", "-pthread", "-w", *inc, "-include", str(EMU),
             "-c", str(p), "-o", str(p.with_suffix(".o"))] for p in sorted(out.glob("*.cu"))]
    cmds.insert(0, ["g++", "-std=c++17", "-O1", "-fPIC", "-w", *inc, f"-I{pybind11.get_include()}",
                    f"-I{sysconfig.get_paths()['include']}", "-c", str(out / "bindings.cpp"),
                    "-o", str(out / "bindings.o")])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for r in pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), cmds):
            assert r.returncode == 0, r.stderr[:4000]
    so = out / ("_C_emu" + sysconfig.get_config_var("EXT_SUFFIX"))
    r = subprocess.run(["g++", "-shared", "-pthread", *map(str, sorted(out.glob("*.o"))), "-o", str(so)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[:4000]
    return so


def load_emulated(out: Path):
    """The emulated extension module, built into `out`."""
    spec = importlib.util.spec_from_file_location("_C_emu", build_emulated(out))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return load_emulated(tmp_path_factory.mktemp("csrc_emu"))


def wrappers_on_cpu(ext, monkeypatch) -> None:
    """The wrappers as they are, with the device-only pieces swapped: `ext` as the extension, CPU tensors accepted,
    stream 0, 132 SMs."""
    monkeypatch.setattr(_cuda, "_check", _checks.cuda_check_on_cpu)
    monkeypatch.setattr(_cuda, "_ext", lambda device: ext)
    monkeypatch.setattr(_cuda, "_stream", lambda device: 0)
    monkeypatch.setattr(_cuda, "_sm_count", lambda index: 132)
    monkeypatch.setattr(_cuda, "_on_device", contextlib.nullcontext)


@pytest.fixture(autouse=True)
def on_cpu(emulated, monkeypatch):
    wrappers_on_cpu(emulated, monkeypatch)


def check(op: str, reffn, inputs: dict, grad=(), dtype=torch.float32, offset_cond=0.0):
    """The emulated kernel (through _cuda.<op>) vs float64 truth, within 2x _torch.<op>'s error + four ulps."""
    ours = functools.partial(_checks.run, getattr(_cuda, op), poison=True)
    return _checks.check(ours, functools.partial(_checks.run, getattr(_torch, op)), reffn, inputs, grad, dtype,
                         offset_cond=offset_cond)


# ---- group_norm_act ---------------------------------------------------------------------------------------------
def _gn_inputs(shape, dtype, fmt, affine=True, mod=True, misaligned=False, G=4, act="silu"):
    return dict(_checks.gn_inputs(shape, dtype, fmt, affine, mod, misaligned), num_groups=G, eps=1e-6, act=act)


def _grads(inputs):
    return tuple(k for k in _checks.GN_GRADS if inputs[k] is not None)


SPLITS = {"auto": None, "one": lambda N, C, HW, nhwc, sms: 1, "max": lambda N, C, HW, nhwc, sms: HW}


def _force_split(monkeypatch, split="auto"):
    """The forward's split path (as for groups over GN_FUSED_MAX_GROUP elements) with the given split count."""
    monkeypatch.setattr(_cuda, "_fused_max_group", lambda ext: 0)
    if SPLITS[split]:
        monkeypatch.setattr(_cuda, "_num_splits", SPLITS[split])


# Every dtype with the forward in one launch per group (these groups are small) and the automatic split count of
# the backward; the split forward in fp32 with automatic and forced counts (each emulated block costs its threads).
GN_CASES = [(d, "fused") for d in DTYPES] + [(torch.float32, s) for s in ("auto", "one", "max")]


@pytest.mark.parametrize("dtype,split", GN_CASES, ids=[f"{str(d)[6:]}-{s}" for d, s in GN_CASES])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,G", [((1, 12, 5, 7), 4), ((2, 40, 4, 4), 8)])
def test_group_norm_act(dtype, fmt, shape, G, split, monkeypatch):
    if split != "fused":
        _force_split(monkeypatch, split)
    inputs = _gn_inputs(shape, dtype, fmt, G=G)
    out = check("group_norm_act", ref.group_norm_act, inputs, grad=_grads(inputs), dtype=dtype)
    assert out[0].is_contiguous(memory_format=fmt) and out[1].is_contiguous(memory_format=fmt)


def test_group_norm_act_many_splits(monkeypatch):
    """1024 HW splits of one (n, c), NHWC, added up in the finalize: a plain sequential fp32 sum of the partials put
    the dscale error at 7x PyTorch's on an H200 (1, 128, 32, 32); the compensated sum keeps it within the rule."""
    monkeypatch.setattr(_cuda, "_num_splits", SPLITS["max"])      # the backward's splits (the forward is fused)
    inputs = _gn_inputs((1, 32, 32, 32), torch.float32, CL, G=8)
    check("group_norm_act", ref.group_norm_act, inputs, grad=_grads(inputs))


@pytest.mark.parametrize("affine,mod,act", [(False, False, "none"), (True, False, "silu"), (False, True, "none")])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
def test_group_norm_act_optional_parts(affine, mod, act, fmt):
    inputs = _gn_inputs((2, 6, 4, 5), torch.float32, fmt, affine, mod, G=3, act=act)
    check("group_norm_act", ref.group_norm_act, inputs, grad=_grads(inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
def test_group_norm_act_misaligned_and_one_spatial_dim(dtype, fmt):
    inputs = _gn_inputs((2, 16, 4, 8), dtype, fmt, misaligned=True)
    check("group_norm_act", ref.group_norm_act, inputs, grad=_grads(inputs), dtype=dtype)
    inputs = _gn_inputs((2, 12, 9), dtype, NCHW)
    if fmt == CL:  # (N, L, C) storage seen as (N, C, L): the channels-last path with one spatial dimension
        inputs["x"] = inputs["x"].transpose(1, 2).contiguous().transpose(1, 2)
    check("group_norm_act", ref.group_norm_act, inputs, grad=_grads(inputs), dtype=dtype)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_group_norm_act_large_mean_is_stable(path, monkeypatch):
    if path == "split":
        _force_split(monkeypatch)
    inputs = _gn_inputs((1, 4, 9, 9), torch.float32, NCHW, affine=False, mod=False, G=2, act="none")
    inputs["x"] = inputs["x"] + 1e4
    # E[x^2] - E[x]^2 in fp32 errs by 1 to 1e4 here; offset_cond allows ~1.4e-3 (25 seeds: the kernel <= 3.1e-4)
    check("group_norm_act", ref.group_norm_act, inputs, grad=("x",), offset_cond=1e4 / inputs["x"].std().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,G", [((2, 32, 4, 6), 8), ((1, 64, 4, 4), 8), ((2, 16, 3, 3), 8)],
                         ids=["cg4", "cg8", "cg2"])
def test_group_norm_act_fused_forward_vector_widths(dtype, fmt, shape, G):
    """The one-launch forward's vector paths: NHWC rows of Cg = 2, 4, 8 adjacent channels loaded as one vector
    (per-channel coefficients inside it), NCHW runs of HW = 24, 16, 9 (9: scalar)."""
    inputs = _gn_inputs(shape, dtype, fmt, G=G)
    check("group_norm_act", ref.group_norm_act, inputs, grad=_grads(inputs), dtype=dtype)


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
def test_group_norm_act_fused_forward_at_its_size_limit(fmt):
    """A group of exactly GN_FUSED_MAX_GROUP elements (16 x 32 x 32) still runs as one block, vectorized in NCHW
    bf16; the extension refuses S = 0 for a larger one."""
    ext = _cuda._ext(torch.device("cpu"))
    assert ext.GN_FUSED_MAX_GROUP == 16 * 32 * 32
    inputs = _gn_inputs((1, 32, 32, 32), torch.bfloat16, fmt, G=2)
    check("group_norm_act", ref.group_norm_act, inputs, grad=(), dtype=torch.bfloat16)
    x = torch.zeros(1, 34, 32, 16)
    with pytest.raises(RuntimeError, match="group_norm_act_fwd"):
        ext.group_norm_act_fwd(x.data_ptr(), 0, 1, 34, 512, 1, 0, False, True, 1e-6, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                               x.data_ptr(), 0, x.data_ptr(), x.data_ptr(), x.data_ptr(), 0)


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("affine,mod", [("bf16", "bf16"), ("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "fp32"),
                                        ("mixed", "bf16")])
def test_group_norm_act_fused_forward_reads_parameters_as_they_are(affine, mod, fmt, fwd_spy):
    """bf16 x; weight and bias, and scale and shift, each pair in bf16 or fp32 (fp32 affine with bf16 modulation is
    the bf16 sampler's case): the one-launch forward gets the tensors themselves, no fp32 copies (up to four launches
    saved); a pair of mixed dtypes is converted to fp32 first. All against float64, gradients included (the backward
    converts what it was given)."""
    inputs = _gn_inputs((2, 32, 4, 6), torch.bfloat16, fmt, G=8)
    want = {"weight": affine, "bias": "fp32" if affine == "mixed" else affine, "scale": mod, "shift": mod}
    for k, how in want.items():
        inputs[k] = inputs[k].float() if how == "fp32" else inputs[k]
    seen = fwd_spy.seen
    check("group_norm_act", ref.group_norm_act, inputs, grad=_grads(inputs), dtype=torch.bfloat16)
    ptr = {k: inputs[k].data_ptr() for k in want}
    code = {"bf16": _cuda._DTYPES[torch.bfloat16], "fp32": _cuda._DTYPES[torch.float32]}
    assert seen
    for a in seen:
        assert a[6] == 0                                                    # the one-launch path
        passed = dict(zip(("weight", "bias", "scale", "shift"), a[10:14]))
        assert a[15] == 0                                                   # no pre-norm add
        assert a[18] == code[mod] and [passed[k] == ptr[k] for k in ("scale", "shift")] == [True, True]
        if affine == "mixed":     # converted: the bf16 weight is a new fp32 tensor (the fp32 bias may be itself)
            assert a[17] == code["fp32"] and passed["weight"] != ptr["weight"]
        else:
            assert a[17] == code[affine] and passed["weight"] == ptr["weight"] and passed["bias"] == ptr["bias"]


class _FwdSpy:
    """The emulated extension, recording the arguments of each group_norm_act_fwd (seen) and _bwd (seen_bwd)."""

    def __init__(self, real):
        self.real, self.seen, self.seen_bwd = real, [], []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def group_norm_act_fwd(self, *a):
        self.seen.append(a)
        return self.real.group_norm_act_fwd(*a)

    def group_norm_act_bwd(self, *a):
        self.seen_bwd.append(a)
        return self.real.group_norm_act_bwd(*a)


@pytest.fixture
def fwd_spy(monkeypatch):
    spy = _FwdSpy(_cuda._ext(torch.device("cpu")))
    monkeypatch.setattr(_cuda, "_ext", lambda device: spy)
    return spy



def _embedding_chunks(inputs, extra=1):
    """scale and shift as the UNet makes them: chunks of one (N, (2 + extra) C) embedding output (the first `extra`
    chunks another block's), so each is a view with row stride (2 + extra) C. Same values as given."""
    sc, sh = inputs["scale"], inputs["shift"]
    emb = torch.cat([torch.full_like(sc, float("nan"))] * extra + [sc, sh], dim=1)
    C = sc.shape[1]
    return dict(inputs, scale=emb[:, extra * C:(extra + 1) * C], shift=emb[:, (extra + 1) * C:])


@pytest.mark.parametrize("dtype,path", [(torch.float32, "fused"), (torch.bfloat16, "fused"), (torch.float32, "split")],
                         ids=["float32-fused", "bfloat16-fused", "float32-split"])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
def test_group_norm_act_reads_embedding_chunks_in_place(dtype, path, fmt, fwd_spy, monkeypatch):
    """scale and shift as chunks of one embedding output (row stride 3C, the other chunk NaN): the forward and the
    backward get the chunks themselves with their row stride (no dense copies: two launches a call in the forward, one
    in the backward), and forward and every gradient match float64."""
    if path == "split":
        _force_split(monkeypatch)
    inputs = _embedding_chunks(_gn_inputs((2, 12, 3, 5), dtype, fmt, G=4))
    C = 12
    check("group_norm_act", ref.group_norm_act, inputs, grad=_grads(inputs), dtype=dtype)
    sc, sh = inputs["scale"], inputs["shift"]
    fwd = fwd_spy.seen
    assert fwd and all(a[12:15] == (sc.data_ptr(), sh.data_ptr(), 3 * C) for a in fwd)
    assert all((a[6] == 0) == (path == "fused") for a in fwd_spy.seen)
    # the backward reads fp32: the bf16 chunk is converted (one launch, a dense copy), the fp32 one read in place
    want = (sc.data_ptr(), 3 * C) if dtype == torch.float32 else (C,)
    got = [a[12:14] if dtype == torch.float32 else a[13:14] for a in fwd_spy.seen_bwd]
    assert got and all(g == want for g in got), got


@pytest.mark.parametrize("how", ["strided-columns", "different-strides", "bf16-split"])
def test_group_norm_act_copies_what_it_cannot_read_in_place(how, fwd_spy, monkeypatch):
    """Rows that are not contiguous, scale and shift of different row strides, or a bf16 chunk on the split path
    (which reads fp32): dense copies, stride C, still right against float64."""
    dtype = torch.bfloat16 if how == "bf16-split" else torch.float32
    inputs = _gn_inputs((2, 12, 3, 5), dtype, NCHW, G=4)
    if how == "strided-columns":
        wide = torch.stack([inputs["scale"], torch.full_like(inputs["scale"], float("nan"))], dim=-1)
        inputs["scale"] = wide[..., 0]                 # stride (24, 2)
    elif how == "different-strides":
        inputs = _embedding_chunks(inputs)
        inputs["shift"] = inputs["shift"].contiguous()
    else:
        _force_split(monkeypatch)
        inputs = _embedding_chunks(inputs)
    check("group_norm_act", ref.group_norm_act, inputs, grad=_grads(inputs), dtype=dtype)
    assert fwd_spy.seen and all(a[14] == 12 and a[12] != inputs["scale"].data_ptr() for a in fwd_spy.seen)


def test_group_norm_act_refuses_a_row_stride_under_C():
    """The extension refuses scale / shift rows closer than C apart (they would overlap) when the batch has more than
    one sample; with one sample the stride is never used."""
    ext = _cuda._ext(torch.device("cpu"))
    x, y = torch.randn(2, 8, 4, 4), torch.empty(2, 8, 4, 4)
    sc = torch.zeros(2, 16)
    for N, ms, ok in ((2, 7, False), (2, 8, True), (2, 16, True), (1, 0, True)):
        args = (x.data_ptr(), 0, N, 8, 16, 2, 0, False, True, 1e-6, 0, 0, sc.data_ptr(), sc.data_ptr(), ms, 0, 0, 0,
                0, y.data_ptr(), 0, 0, 0, 0, 0)
        if ok:
            ext.group_norm_act_fwd(*args)
        else:
            with pytest.raises(RuntimeError, match="group_norm_act_fwd"):
                ext.group_norm_act_fwd(*args)


# (shape, G, dtype): the one-launch forward's block sizes at their edges. Vectors per group (V = 4 fp32, 8 bf16,
# 1 where HW is odd) -> threads: 2 -> 32 (one warp), 64 -> 32 (two vectors each), 65 -> 64, 1024 -> 512, 2304 ->
# 512 (4.5 vectors each: the fifth register slot partly used), 16383 scalars -> 512 (32 each, the last thread 31).
FUSED_BLOCKS = [((1, 2, 1, 4), 1, torch.float32), ((1, 4, 8, 8), 1, torch.float32), ((2, 5, 4, 13), 1, torch.float32),
                ((1, 16, 8, 32), 1, torch.bfloat16), ((1, 8, 32, 36), 1, torch.float32),
                ((1, 43, 381), 1, torch.float32)]


@pytest.mark.parametrize("shape,G,dtype", FUSED_BLOCKS, ids=["v2", "v64", "v65", "v1024", "v2304", "s16383"])
def test_group_norm_act_fused_forward_block_sizes(shape, G, dtype, fwd_spy):
    """Each size of block the one-launch forward picks (about two vectors a thread, at most 512 threads, up to 32
    registers of the group each) covers its group exactly: forward and gradients against float64."""
    inputs = _gn_inputs(shape, dtype, NCHW, G=G)
    check("group_norm_act", ref.group_norm_act, inputs, grad=_grads(inputs), dtype=dtype)
    assert fwd_spy.seen and all(a[6] == 0 for a in fwd_spy.seen)                  # S = 0: the one-launch path


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
def test_group_norm_act_forward_without_backward_saves_nothing(fmt, fwd_spy):
    """Without a gradient (the sampler) the one-launch forward gets null stats, A and B and writes none; with one, the
    backward's statistics are written, and both outputs are the same bits."""
    inputs = _gn_inputs((2, 32, 4, 6), torch.bfloat16, fmt, G=8)
    with torch.no_grad():
        y0 = _cuda.group_norm_act(**inputs)
    assert fwd_spy.seen[-1][21:24] == (0, 0, 0)
    leaves = {k: (v.detach().requires_grad_() if k == "x" else v) for k, v in inputs.items()}
    y1 = _cuda.group_norm_act(**leaves)
    assert all(p != 0 for p in fwd_spy.seen[-1][21:24]) and y1.requires_grad
    assert torch.equal(y0, y1.detach())
    check("group_norm_act", ref.group_norm_act, inputs, grad=(), dtype=torch.bfloat16)
    assert fwd_spy.seen[-1][21:24] == (0, 0, 0)


def test_group_norm_act_wide_groups_take_the_split_path(fwd_spy):
    """A group of more than GN_FUSED_MAX_CHANNELS channels (their coefficients would not fit shared memory) runs
    split even though it is small; the extension refuses it one-launch."""
    ext = fwd_spy.real
    assert ext.GN_FUSED_MAX_CHANNELS == 512
    inputs = _gn_inputs((1, 1024, 2, 2), torch.float32, NCHW, G=1)
    check("group_norm_act", ref.group_norm_act, inputs, grad=_grads(inputs))
    assert fwd_spy.seen and all(a[6] > 0 for a in fwd_spy.seen)
    for fmt in (NCHW, CL):        # 512 channels: still one launch (NHWC: rows of 512 channels, 64 vectors each)
        inputs = _gn_inputs((1, 512, 2, 2), torch.float32, fmt, G=1)
        check("group_norm_act", ref.group_norm_act, inputs, grad=())
        assert fwd_spy.seen[-1][6] == 0
    x = torch.zeros(1, 1024, 4)
    p = x.data_ptr()
    with pytest.raises(RuntimeError, match="group_norm_act_fwd"):
        ext.group_norm_act_fwd(p, 0, 1, 1024, 4, 1, 0, False, True, 1e-6, 0, 0, 0, 0, 0, 0, 0, 0, 0, p, 0, p, p, p,
                               0)
    with pytest.raises(RuntimeError, match="group_norm_act_fwd"):     # the split path needs its statistics buffers
        ext.group_norm_act_fwd(p, 0, 1, 1024, 4, 1, 1, False, True, 1e-6, 0, 0, 0, 0, 0, 0, 0, 0, 0, p, p, 0, 0, 0,
                               0)


def test_group_norm_act_refuses_parameter_dtypes_it_cannot_read():
    """Each parameter dtype must be fp32 or x's dtype, and x's only on the one-launch path (S = 0)."""
    ext = _cuda._ext(torch.device("cpu"))
    x = torch.zeros(1, 8, 4, 4)
    p = x.data_ptr()
    for dtype, adt, mdt, S in ((0, 2, 0, 0), (0, 0, 2, 0), (2, 1, 2, 0), (2, 2, 0, 1), (2, 0, 2, 1)):
        with pytest.raises(RuntimeError, match="group_norm_act_fwd"):
            ext.group_norm_act_fwd(p, dtype, 1, 8, 16, 2, S, False, True, 1e-6, p, p, p, p, 8, 0, 0, adt, mdt, p, p, p,
                                   p, p, 0)



def _gn_pre_fns():
    """(cuda with pre_bias, torch adding it first in x's dtype, float64 truth of GN(x + pre_bias))."""
    def ours(x, num_groups, weight, bias, eps, scale, shift, act, pre_bias):
        return _cuda.group_norm_act(x, num_groups, weight, bias, eps, scale, shift, act, pre_bias=pre_bias)

    def theirs(x, pre_bias, **kw):
        return _torch.group_norm_act(x + pre_bias.to(x.dtype).reshape(*pre_bias.shape, 1, 1), **kw)

    def reffn(x, pre_bias, **kw):
        return ref.group_norm_act(x + pre_bias.reshape(*pre_bias.shape, 1, 1), **kw)
    return ours, theirs, reffn


PRE_CASES = [(d, "fused") for d in DTYPES] + [(torch.float32, "split"), (torch.bfloat16, "split")]


@pytest.mark.parametrize("dtype,path", PRE_CASES, ids=[f"{str(d)[6:]}-{p}" for d, p in PRE_CASES])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("rows", [2, 1], ids=["per-sample", "broadcast"])
def test_group_norm_act_pre_bias_in_the_kernel(dtype, path, fmt, rows, monkeypatch):
    """DDPM++'s add before norm1 inside the forward: GN(x + pre_bias) against float64, within twice the error of
    adding first in x's dtype (the computation it replaces); one extension call, given the tensor itself in the
    one-launch path (its row stride C, or 0 for one row shared by the batch), an fp32 copy in the split path."""
    if path == "split":
        _force_split(monkeypatch)
    spy = _FwdSpy(_cuda._ext(torch.device("cpu")))
    monkeypatch.setattr(_cuda, "_ext", lambda device: spy)
    ours, theirs, reffn = _gn_pre_fns()
    inputs = _gn_inputs((2, 12, 3, 5), dtype, fmt, mod=False, G=4)
    inputs["pre_bias"] = 4 * rand(rows, 12, dtype=dtype) - 1      # per-channel offsets as large as x's spread
    out = _checks.check(functools.partial(_checks.run, ours, poison=True), functools.partial(_checks.run, theirs),
                        reffn, inputs, dtype=dtype, backward=False)
    assert out[0].is_contiguous(memory_format=fmt)
    (a,) = spy.seen
    assert (a[6] == 0) == (path == "fused")                              # S = 0: the one-launch path
    assert a[16] == (12 if rows == 2 else 0)
    if path == "fused":
        assert a[15] == inputs["pre_bias"].data_ptr() and a[18] == _cuda._DTYPES[dtype]
    else:                 # fp32 for the split path: a converted copy, unless it was fp32 already
        assert (a[15] == inputs["pre_bias"].data_ptr()) == (dtype == torch.float32)
        assert a[18] == _cuda._DTYPES[torch.float32]


@pytest.mark.parametrize("path", ["fused", "split"])
def test_group_norm_act_pre_bias_with_modulation_and_large_offsets(path, monkeypatch):
    """pre_bias beside scale and shift (a bf16 pre_bias with fp32 modulation: all three read as fp32 copies), and
    offsets of 1e4, far above x's spread: each chunk's mean is shifted by the offset, M2 is not."""
    if path == "split":
        _force_split(monkeypatch)
    ours, theirs, reffn = _gn_pre_fns()
    inputs = _gn_inputs((2, 8, 4, 4), torch.bfloat16, CL, G=2)
    inputs["scale"], inputs["shift"] = inputs["scale"].float(), inputs["shift"].float()
    inputs["pre_bias"] = (4 * rand(2, 8) - 1).bfloat16()
    _checks.check(functools.partial(_checks.run, ours, poison=True), functools.partial(_checks.run, theirs), reffn,
                  inputs, dtype=torch.bfloat16, backward=False)
    inputs = _gn_inputs((1, 4, 9, 9), torch.float32, NCHW, affine=False, mod=False, G=2, act="none")
    inputs["pre_bias"] = 1e4 + rand(1, 4)
    _checks.check(functools.partial(_checks.run, ours, poison=True), functools.partial(_checks.run, theirs), reffn,
                  inputs, backward=False, offset_cond=1e4 / inputs["x"].std().item())


def test_group_norm_act_pre_bias_is_forward_only():
    """The wrapper refuses a call that would need a gradient (cmfast.ops adds first then), and the extension a row
    stride other than C or 0."""
    x = torch.randn(2, 8, 4, 4)
    pre = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(ValueError, match="pre_bias: the fused add is forward only"):
        _cuda.group_norm_act(x, 2, None, None, 1e-6, None, None, "silu", pre_bias=pre)
    with pytest.raises(ValueError, match=r"pre_bias: expected shape \(2, 8\) or \(1, 8\)"):
        _cuda.group_norm_act(x, 2, None, None, 1e-6, None, None, "silu", pre_bias=torch.randn(8))
    ext = _cuda._ext(torch.device("cpu"))
    p, y = x.data_ptr(), torch.empty_like(x)
    saved = torch.empty(2 * 2 * 2 + 2 * 2 * 8)
    for stride in (0, 8, 4):
        args = (p, 0, 2, 8, 16, 2, 0, False, True, 1e-6, 0, 0, 0, 0, 0, pre.data_ptr(), stride, 0, 0, y.data_ptr(), 0,
                saved.data_ptr(), saved.data_ptr() + 32, saved.data_ptr() + 96, 0)
        if stride == 4:
            with pytest.raises(RuntimeError, match="group_norm_act_fwd"):
                ext.group_norm_act_fwd(*args)
        else:
            ext.group_norm_act_fwd(*args)

# ---- skip_output ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 4, 4, 4)])
@pytest.mark.parametrize("fmt,misaligned", [(NCHW, False), (CL, False), (CL, True)], ids=["nchw", "nhwc", "scalar"])
def test_skip_output(dtype, shape, fmt, misaligned):
    sigma = torch.tensor([0.002, 0.5, 80.0])[: shape[0]]
    inputs = dict(x=rand(*shape, dtype=dtype, fmt=fmt, misaligned=misaligned), F=rand(*shape, dtype=dtype),
                  sigma=sigma, sigma_data=0.5, sigma_min=0.002)
    out = check("skip_output", ref.skip_output, inputs, grad=("x", "F"), dtype=dtype)
    assert out[0].is_contiguous(memory_format=fmt)


def test_skip_output_mixed_dtypes_and_boundary():
    x, F = rand(2, 3, 4, 4, dtype=torch.bfloat16, fmt=CL), rand(2, 3, 4, 4)
    inputs = dict(x=x, F=F, sigma=torch.tensor([0.1, 3.0]), sigma_data=0.5, sigma_min=0.002)
    out = check("skip_output", ref.skip_output, inputs, grad=("x", "F"), dtype=torch.bfloat16)
    assert out[0].dtype == torch.bfloat16 and out[2].dtype == torch.float32
    assert torch.equal(_cuda.skip_output(x, F, torch.full((2,), 0.002), 0.5, 0.002), x)  # f(x, sigma_min) = x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", [False, True], ids=["vec", "scalar"])
def test_skip_output_infer(dtype, misaligned):
    x, F = 2 * rand(2, 3, 4, 8, dtype=dtype, misaligned=misaligned), rand(2, 3, 4, 8, dtype=dtype)
    sigma = torch.tensor([0.3, 2.0])
    inputs = dict(x=x, F=F, sigma=sigma, sigma_data=0.5, sigma_min=0.002, uint8=False)
    check("skip_output_infer", ref.skip_output_infer, inputs, dtype=dtype)
    with poisoned():
        u = _cuda.skip_output_infer(x, F, sigma, 0.5, 0.002, True)
    assert u.dtype == torch.uint8
    assert (u.double() - ref.skip_output_infer(x.double(), F.double(), sigma, uint8=True)).abs().max() <= 1
    assert (u == _torch.skip_output_infer(x, F, sigma, 0.5, 0.002, True)).float().mean() > 0.99


def test_skip_output_infer_rounds_half_to_even():
    x = _checks.half_way_inputs()
    s = torch.full((1,), 0.002)
    u = _cuda.skip_output_infer(x, torch.zeros_like(x), s, 0.5, 0.002, True)
    assert torch.equal(u, _torch.skip_output_infer(x, torch.zeros_like(x), s, 0.5, 0.002, True))


# ---- consistency_loss -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pseudo_huber", "l2", "l1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 2, 8, 8)])
def test_consistency_loss(kind, dtype, shape):
    weight = torch.rand(shape[0]) + 0.5 if shape[0] > 1 else None
    inputs = dict(pred=rand(*shape, dtype=dtype), target=rand(*shape, dtype=dtype), kind=kind,
                  c=0.00054 * (shape[1] * shape[2] * shape[3]) ** 0.5, weight=weight)
    check("consistency_loss", ref.consistency_loss, inputs, grad=("pred",), dtype=dtype)


def test_consistency_loss_layouts_mixed_dtypes_and_all_grads():
    pred, target = rand(3, 3, 7, 9, fmt=CL, misaligned=True), rand(3, 3, 7, 9, dtype=torch.bfloat16)
    inputs = dict(pred=pred, target=target, kind="pseudo_huber", c=0.03, weight=torch.rand(3) + 0.5)
    out = check("consistency_loss", ref.consistency_loss, inputs, grad=("pred", "target", "weight"))
    assert out[1].is_contiguous(memory_format=CL)


def test_consistency_loss_underflowing_c_at_zero_difference():
    """pred == target with a pseudo-Huber c whose square underflows fp32: loss 0 and gradient 0 (it was 0 * inf)."""
    p = torch.randn(2, 3, 4, 4)
    q = p.clone().requires_grad_()
    loss = _cuda.consistency_loss(q, p, "pseudo_huber", 1e-30, None)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(2)) and torch.equal(q.grad, torch.zeros_like(p))
