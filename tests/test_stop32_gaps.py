"""Mutation-testing gaps of stop 32's changes (the one-launch GroupNorm forward and its wrapper, reference_runs'
--parallel schedule, make_auto_table's superseded rows, make_tables' schedule note): each test here failed on a
mutant of those lines that the other tests let through."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _repo import load_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import make_auto_table  # noqa: E402

make_tables = load_script(ROOT / "benchmarks" / "make_tables.py", "make_tables_stop32")
try:        # the emulated CUDA extension (g++ and the CUDA headers): skipped without them, the rest still runs
    import test_csrc_emulated as E
except pytest.skip.Exception:
    E = None
needs_emu = pytest.mark.skipif(E is None, reason="the emulated extension cannot be built here")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return E.load_emulated(tmp_path_factory.mktemp("csrc_emu_stop32"))


@pytest.fixture
def emu(emulated, monkeypatch):
    """The wrappers of cmfast/ops/_cuda.py on the emulated extension, CPU tensors, each forward's arguments recorded."""
    from cmfast.ops import _cuda
    spy = E._FwdSpy(emulated)
    E.wrappers_on_cpu(spy, monkeypatch)
    return _cuda, spy.seen


# ---- csrc/group_norm_act.cu: the one-launch forward's bounds ----------------------------------------------------
# The one-launch forward called through the extension itself, in a child process, with x and y each ending at the
# end of a readable page (the next page PROT_NONE): a read or write past either is a segfault there, not a silent
# read of the neighbouring memory (the emulator runs the kernels on the CPU, so the MMU checks what CUDA would not).
GUARDED = r"""
import ctypes, importlib.util, mmap, sys
import numpy as np
so, N, C, HW, G, nhwc = sys.argv[1], *map(int, sys.argv[2:7])
spec = importlib.util.spec_from_file_location("_C_emu", so)
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []

def at_page_end(n):          # n fp32 elements ending where a PROT_NONE page begins
    page = mmap.PAGESIZE
    pages = (4 * n + page - 1) // page
    buf = mmap.mmap(-1, (pages + 1) * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(base + pages * page, page, 0) == 0
    keep.append(buf)
    return np.frombuffer(buf, dtype=np.float32, count=n, offset=pages * page - 4 * n)

n = N * C * HW
x, y = at_page_end(n), at_page_end(n)
rng = np.random.default_rng(0)
x[:] = 3 * rng.standard_normal(n).astype(np.float32) + 1.5
y[:] = np.nan
ext.group_norm_act_fwd(x.ctypes.data, 0, N, C, HW, G, 0, bool(nhwc), False, 1e-6, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                       y.ctypes.data, 0, 0, 0, 0, 0)
xs = x.astype(np.float64).reshape(N, HW, C).transpose(0, 2, 1) if nhwc else x.astype(np.float64).reshape(N, C, HW)
g = xs.reshape(N, G, -1)
want = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)).reshape(N, C, HW)
got = y.astype(np.float64).reshape(N, HW, C).transpose(0, 2, 1) if nhwc else y.astype(np.float64).reshape(N, C, HW)
print("maxerr", float(np.abs(got - want).max()))
"""


@needs_emu
@pytest.mark.parametrize("shape,G,nhwc", [((2, 2, 16), 1, 0), ((1, 8, 9), 2, 0), ((2, 8, 16), 2, 1)],
                         ids=["nchw-v4", "nchw-scalar", "nhwc-v4"])
def test_fused_forward_touches_nothing_past_the_tensors(shape, G, nhwc, emulated):
    """Each thread's register slots past the group's last vector are neither loaded nor stored: with x and y ending at
    a guard page, the last group's forward (fp32, no affine, no statistics) runs and matches float64."""
    r = subprocess.run([sys.executable, "-c", GUARDED, emulated.__file__, *map(str, shape), str(G), str(nhwc)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"exit {r.returncode} (-11: a segfault at the guard page) {r.stderr[-2000:]}"
    err = float(r.stdout.split("maxerr")[-1])
    assert err < 1e-5


# ---- cmfast/ops/_cuda.py: which calls take the no-backward launch ---------------------------------------------
def _gn_args(requires):
    g = torch.Generator().manual_seed(0)
    t = dict(x=3 * torch.randn(2, 8, 4, 4, generator=g) + 1.5, weight=1 + 0.3 * torch.randn(8, generator=g),
             bias=0.3 * torch.randn(8, generator=g), scale=0.5 * torch.randn(2, 8, generator=g),
             shift=0.5 * torch.randn(2, 8, generator=g))
    return {k: v.requires_grad_(k in requires) for k, v in t.items()}


def _gn64(t):
    import reference as ref
    return ref.group_norm_act(t["x"].double(), 2, t["weight"].double(), t["bias"].double(), 1e-6,
                              t["scale"].double(), t["shift"].double(), "silu")


@needs_emu
def test_sampling_under_no_grad_with_trainable_parameters_saves_nothing(emu):
    """The sampler: a model's weight and bias require grad, but under torch.no_grad() no backward can run, so the
    one-launch forward gets null stats, A, B (nothing allocated, no autograd node)."""
    _cuda, seen = emu
    t = _gn_args(("weight", "bias"))
    with torch.no_grad():
        y = _cuda.group_norm_act(t["x"], 2, t["weight"], t["bias"], 1e-6, t["scale"], t["shift"], "silu")
    assert seen[-1][6] == 0 and seen[-1][21:24] == (0, 0, 0)
    assert y.grad_fn is None
    torch.testing.assert_close(y.double(), _gn64(t).detach(), rtol=1e-5, atol=1e-5)


@needs_emu
def test_a_gradient_for_the_modulation_alone_is_kept(emu):
    """Only scale and shift require grad (x and the affine fixed, e.g. training the embedding alone): the forward
    still saves its statistics and both gradients match float64 autograd."""
    _cuda, seen = emu
    t = _gn_args(("scale", "shift"))
    y = _cuda.group_norm_act(t["x"], 2, t["weight"], t["bias"], 1e-6, t["scale"], t["shift"], "silu")
    assert y.requires_grad and all(p != 0 for p in seen[-1][21:24])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(dy)
    t64 = {k: v.detach().double().requires_grad_(k in ("scale", "shift")) for k, v in t.items()}
    _gn64(t64).backward(dy.double())
    for k in ("scale", "shift"):
        torch.testing.assert_close(t[k].grad.double(), t64[k].grad, rtol=1e-4, atol=1e-5)


# ---- benchmarks/make_auto_table.py: superseded CUDA rows --------------------------------------------------------
def _rows(op, shape, times):
    return [dict(op=op, shape=list(shape), backend=b, median_ms=ms, **{"pass": "fwd"}) for b, ms in times.items()]


def _table(tmp_path, monkeypatch, current, *results):
    files = []
    for i, res in enumerate(results):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(dict({"device": "t", "device_slug": "t", "device_type": "cuda",
                                              "dtype": "bfloat16"}, **res)))
    monkeypatch.setattr(make_auto_table, "current_digests", lambda: current)
    out = tmp_path / "t.json"
    assert make_auto_table.main([*map(str, files), "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_superseded_leaves_the_other_backends_rows_of_the_file(tmp_path, monkeypatch):
    """A file measured with an older group_norm_act kernel: its CUDA rows are left out, its torch and Triton rows of
    the same op still vote (Triton 3x faster than torch here: triton, not a table without group_norm_act)."""
    gn = _rows("group_norm_act", (1, 128, 32, 32), {"torch": 3.0, "triton": 1.0, "cuda": 0.5})
    cl = _rows("consistency_loss", (8, 3, 32, 32), {"torch": 1.0, "triton": 2.0, "cuda": 4.0})
    t = _table(tmp_path, monkeypatch, {"group_norm_act": "b" * 16, "consistency_loss": "c" * 16},
               dict(rows=gn + cl, csrc_ops={"group_norm_act": "a" * 16}))
    assert t["group_norm_act"] == "triton" and t["consistency_loss"] == "torch"
    assert t["_meta"]["superseded_cuda_rows"] == ["r0.json: group_norm_act"]


def test_an_op_without_current_sources_keeps_its_recorded_rows(tmp_path, monkeypatch):
    """An op whose kernel file is not in this checkout (op_digest None; or not in OP_SOURCES at all) has no current
    sources to compare with: its CUDA rows vote whatever digest they recorded."""
    gn = _rows("group_norm_act", (1, 128, 32, 32), {"torch": 3.0, "triton": 2.0, "cuda": 1.0})
    res = dict(rows=gn, csrc_ops={"group_norm_act": "a" * 16})
    for current in ({"group_norm_act": None, "consistency_loss": "c" * 16}, {"consistency_loss": "c" * 16}):
        t = _table(tmp_path, monkeypatch, current, res)
        assert t["group_norm_act"] == "cuda" and "superseded_cuda_rows" not in t["_meta"]
    assert make_auto_table.superseded([res], {"consistency_loss": "c" * 16}) == set()


# ---- benchmarks/make_tables.py: the schedule note ---------------------------------------------------------------
@pytest.mark.parametrize("first,then,want", [
    ([], ["cd", "ct"], "device: cd, ct at once (caps"),
    (["edm"], [], "device: edm alone (caps"),
    (["edm"], ["cd"], "device: edm alone, then cd after edm (caps"),
    (["edm"], ["cd", "ct", "ict", "sct"], "device: edm alone, then cd, ct, ict, sct at once after edm (caps")],
    ids=["then-only", "first-only", "one-each", "edm-then-four"])
def test_parallel_note_names_each_group_once(first, then, want):
    """--parallel --only without the teacher records no first group: the runs started together are named once, not
    as a group 'after edm'; one run alone is 'alone'."""
    run = {"parallel": {"caps_min": {m: 0.6 for m in first + then}, "first": first, "then": then}}
    note = make_tables._parallel_note(run)
    assert want in note, note
    assert note.count(" at once") == (len(first) > 1) + (len(then) > 1)


# ---- scripts/reference_runs.py --parallel ----------------------------------------------------------------------
FAKE_CHILD = r"""
import json, os, sys, time
method, results = sys.argv[1], sys.argv[2]
t0 = time.time()
time.sleep(0.2)
json.dump({"runs": {method: {"method": method, "t0": t0, "t1": time.time(), "run_dir": "x",
                              "evals": [{"nfe": 1, "value": 5.0, "sample_img_per_s": 1.0}],
                              "omp": os.environ.get("OMP_NUM_THREADS")}}}, open(results, "w"))
"""


def test_parallel_without_the_teacher_starts_cd_with_the_others(tmp_path, monkeypatch):
    """--parallel --only cd,ct (the teacher not among the methods, e.g. its run kept from before): nothing waits
    and nothing is skipped; cd and ct start together, each with half the cores as OMP_NUM_THREADS (16 cores: 8)."""
    import sys
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    ref = load_script(ROOT / "scripts" / "reference_runs.py", "reference_runs_stop32")
    monkeypatch.setattr(ref.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(ref, "child_argv", lambda m, a, res, cap=None: [sys.executable, "-c", FAKE_CHILD, m, res])
    monkeypatch.setattr(ref, "remeasure_rates", lambda doc, prof, a, only: None)
    results = tmp_path / "ref.json"
    rc = ref.main(["--profile", "smoke", "--out", str(tmp_path / "runs"), "--results", str(results), "--parallel",
                   "--only", "cd,ct"])
    doc = json.loads(results.read_text())
    assert rc == 0 and sorted(doc["runs"]) == ["cd", "ct"]
    assert all("error" not in r for r in doc["runs"].values())
    assert [doc["runs"][m]["omp"] for m in ("cd", "ct")] == ["8", "8"]
    assert doc["parallel"]["first"] == [] and doc["parallel"]["then"] == ["cd", "ct"]
    assert doc["parallel"]["omp_threads"] == {"cd": "8", "ct": "8"}
    cd, ct = doc["runs"]["cd"], doc["runs"]["ct"]
    assert max(cd["t0"], ct["t0"]) < min(cd["t1"], ct["t1"])                       # side by side
