"""Backend 'auto' on CUDA: the committed table's per-op and per-shape-class winners, the fallback when a backend
cannot load, and the shape class each public op reports (no GPU needed: the choice is made from the device type)."""
import pytest
import torch

from cmfast import ops
from cmfast.ops import _api

CUDA = torch.device("cuda")
TABLE = {"group_norm_act": {"default": "cuda", "fwd/nhwc": "triton", "fwd+bwd/nhwc": "cuda"},
         "attention": "torch", "consistency_loss": "cuda",
         "_meta": {"ratios": {"group_norm_act": {"cuda": 1.1, "triton": 1.3, "torch": 2.0,
                                                 "classes": {"fwd/nhwc": {"triton": 1.0, "cuda": 1.5, "torch": 2.3},
                                                             "fwd+bwd/nhwc": {"cuda": 1.0, "triton": 1.6,
                                                                              "torch": 1.7}}},
                              "consistency_loss": {"cuda": 1.0, "torch": 1.7, "triton": 1.9}}}}


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(ops, "_auto_table", TABLE)
    monkeypatch.setattr(ops, "_auto_resolved", {})
    monkeypatch.setattr(ops, "_failed", dict(ops._failed))


def test_per_class_winner(table):
    assert ops._auto_choice("group_norm_act", CUDA, torch.bfloat16, "fwd/nhwc") == "triton"
    assert ops._auto_choice("attention", CUDA, torch.bfloat16, "fwd") == "torch"
    assert ops._auto_choice("group_norm_act", torch.device("cpu"), torch.bfloat16, "fwd/nhwc") == "torch"
    assert ops._auto_choice("group_norm_act", CUDA, torch.float64, "fwd/nhwc") == "torch"    # kernels take no fp64


def test_unavailable_backend_falls_to_the_next_measured(table, monkeypatch):
    ops._failed["cuda"] = "backend 'cuda' is unavailable: no CUDA toolchain"
    # fwd+bwd/nhwc ranks cuda 1.0, triton 1.6, torch 1.7: without cuda, triton
    assert ops._auto_choice("group_norm_act", CUDA, torch.bfloat16, "fwd+bwd/nhwc") == "triton"
    # consistency_loss ranks cuda 1.0, torch 1.7, triton 1.9: without cuda, torch (not the slower triton)
    assert ops._auto_choice("consistency_loss", CUDA, torch.bfloat16, "fwd+bwd") == "torch"
    # a class the table lacks takes the op's default and the op's ranking
    assert ops._auto_choice("group_norm_act", CUDA, torch.bfloat16, "fwd/nchw") == "triton"


def test_failed_cuda_build_falls_back_and_is_not_retried(table, monkeypatch):
    """The cuda module imports (a toolchain is there) but building cmfast._C fails: auto takes the next backend at
    dispatch time, instead of the error surfacing in the middle of a model, and does not try the build again."""
    from cmfast import _build
    if _build.unavailable_reason():
        pytest.skip(_build.unavailable_reason())
    from cmfast.ops import _cuda
    calls = []

    def broken(device):
        calls.append(device)
        raise ops.BackendUnavailable("backend 'cuda' is unavailable: nvcc failed")
    monkeypatch.setattr(_cuda, "_ext", broken)
    monkeypatch.setitem(ops._loaded, "cuda", _cuda)
    assert ops._auto_choice("group_norm_act", CUDA, torch.bfloat16, "fwd+bwd/nhwc") == "triton"
    assert ops._auto_choice("consistency_loss", CUDA, torch.bfloat16, "fwd+bwd") == "torch"
    assert len(calls) == 1 and "nvcc failed" in ops._failed["cuda"]
    # resolved once per (op, device, class): later calls are a dictionary lookup
    assert ops._auto_resolved[("group_norm_act", CUDA, "fwd+bwd/nhwc")] == "triton"
    assert ops._auto_choice("group_norm_act", CUDA, torch.bfloat16, "fwd+bwd/nhwc") == "triton" and len(calls) == 1


def test_shape_class():
    x = torch.zeros(2, 8, 4, 4)
    assert ops.shape_class(False, x) == "fwd/nchw/small"
    assert ops.shape_class(True, x.to(memory_format=torch.channels_last)) == "fwd+bwd/nhwc/small"
    assert ops.shape_class(False, torch.zeros(2, 8, 1, 1).to(memory_format=torch.channels_last)) == "fwd/nchw/small"
    assert ops.shape_class(False, torch.zeros(ops.SMALL_BATCH + 1, 8, 2, 2)) == "fwd/nchw/large"
    assert ops.shape_class(True, batch=ops.SMALL_BATCH) == "fwd+bwd/small"
    assert ops.shape_class(True) == "fwd+bwd"


def test_most_specific_class_first(table, monkeypatch):
    monkeypatch.setattr(ops, "_auto_table", {
        "attention": {"default": "torch", "fwd/small": "triton"},
        "group_norm_act": {"default": "triton", "fwd/nhwc": "torch", "fwd/nhwc/large": "triton"}})
    assert ops._auto_choice("attention", CUDA, torch.bfloat16, "fwd/small") == "triton"
    assert ops._auto_choice("attention", CUDA, torch.bfloat16, "fwd/large") == "torch"       # the op's default
    assert ops._auto_choice("attention", CUDA, torch.bfloat16, "fwd+bwd/small") == "torch"
    assert ops._auto_choice("group_norm_act", CUDA, torch.bfloat16, "fwd/nhwc/small") == "torch"   # the class's
    assert ops._auto_choice("group_norm_act", CUDA, torch.bfloat16, "fwd/nhwc/large") == "triton"
    assert ops._auto_choice("group_norm_act", CUDA, torch.bfloat16, "fwd/nchw/large") == "triton"  # the default


def test_public_ops_report_their_class(monkeypatch):
    seen = []

    def fake(op, device, dtype, case=None):
        seen.append((op, case))
        return lambda *a: a[0]
    monkeypatch.setattr(_api, "implementation", fake)
    x = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ops.group_norm_act(x, 4)
    ops.group_norm_act(x, 4, weight=torch.ones(8, requires_grad=True))
    ops.group_norm_act(x.contiguous(), 4)
    q = torch.randn(2, 1, 16, 8, requires_grad=True)
    ops.attention(q, q, q)
    with torch.no_grad():
        ops.attention(q, q, q)
    big = torch.randn(16, 3, 4, 4, requires_grad=True)
    ops.skip_output(big, big, 1.0)
    ops.skip_output_infer(big, big, 1.0)
    ops.consistency_loss(big, big.detach())
    with torch.no_grad():
        ops.consistency_loss(x, x)
    assert seen == [("group_norm_act", "fwd/nhwc/small"), ("group_norm_act", "fwd+bwd/nhwc/small"),
                    ("group_norm_act", "fwd/nchw/small"), ("attention", "fwd+bwd/small"), ("attention", "fwd/small"),
                    ("skip_output", "fwd+bwd/large"), ("skip_output_infer", "fwd/large"),
                    ("consistency_loss", "fwd+bwd/large"), ("consistency_loss", "fwd/small")]


def test_a_float64_companion_or_an_empty_batch_is_dispatched_to_torch(monkeypatch):
    """Backend 'auto' chooses by the dtype of every tensor of a call, not x's alone: an fp32 x with an fp64 weight
    goes where fp64 goes (torch; the kernels compute in fp32 and the cuda one refused it). An empty batch runs the
    torch composition whatever the backend (the kernels launch no empty grids)."""
    seen = []

    def fake(op, device, dtype, case=None):
        seen.append((op, dtype))
        return lambda *a, **k: a[0]
    monkeypatch.setattr(_api, "implementation", fake)
    x, w64 = torch.randn(2, 8, 4, 4), torch.ones(8, dtype=torch.float64)
    ops.group_norm_act(x, 4, weight=w64)
    ops.group_norm_act(x, 4, scale=torch.zeros(2, 8, dtype=torch.float64))
    ops.group_norm_act(x, 4, weight=torch.ones(8))
    ops.consistency_loss(x, x.double())
    ops.consistency_loss(x, x, weight=torch.ones(2, dtype=torch.float64))
    ops.skip_output(x, x.double(), 1.0)
    ops.skip_output_infer(x.half(), x, 1.0)
    assert seen == [("group_norm_act", torch.float64), ("group_norm_act", torch.float64),
                    ("group_norm_act", torch.float32), ("consistency_loss", torch.float64),
                    ("consistency_loss", torch.float64), ("skip_output", torch.float64),
                    ("skip_output_infer", torch.float16)]
    monkeypatch.undo()
    empty = torch.randn(0, 8, 4, 4, requires_grad=True)
    for backend in ("cuda", "triton"):      # neither could run here: the empty batch never reaches them
        with ops.use_backend(backend):
            y = ops.group_norm_act(empty, 4, torch.ones(8), torch.zeros(8))
            y.sum().backward()
            assert y.shape == empty.shape and empty.grad.shape == empty.shape
            assert ops.consistency_loss(empty, empty.detach()).shape == (0,)
            assert ops.skip_output(empty, empty, torch.ones(0)).shape == empty.shape


def test_empty_channels_or_pixels_are_refused_in_one_line():
    for shape in ((2, 8, 0, 4), (2, 0, 4, 4)):
        with pytest.raises(ValueError, match="channels and spatial dimensions of at least 1"):
            ops.group_norm_act(torch.randn(shape), 2)
    with pytest.raises(ValueError, match="at least one element per sample"):
        ops.consistency_loss(torch.randn(2, 0), torch.randn(2, 0))
    with pytest.raises(ValueError, match="num_groups"):
        ops.group_norm_act(torch.randn(2, 8, 4, 4), True)


def test_committed_table_is_well_formed():
    import json
    from pathlib import Path
    table = json.loads((Path(ops.__file__).with_name("auto_table.json")).read_text())
    for op in ("group_norm_act", "attention", "skip_output", "skip_output_infer", "consistency_loss"):
        entry = table[op]
        choices = entry.values() if isinstance(entry, dict) else [entry]
        assert set(choices) <= {"torch", "triton", "cuda"}, (op, entry)
    assert table["_meta"]["devices"] and table["_meta"]["sources"]


# ---- under torch.compile --------------------------------------------------------------------------------------------
def _gn_loss(x, w):
    return ops.group_norm_act(x, 4, w, None, 1e-6, None, None, "silu").square().sum()


def test_auto_is_the_torch_composition_under_compile(monkeypatch):
    # The H100 run: a UNet compiled with backend auto traced into the CUDA kernels' wrapper and failed on the stream
    # handle. Under compile auto never consults the table: inductor gets the torch composition, in one graph.
    monkeypatch.setattr(ops, "_auto_choice", lambda *a, **k: pytest.fail("auto consulted the table under compile"))
    x, w = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(8, requires_grad=True)
    with ops.use_backend("torch"):
        ref = _gn_loss(x, w)
    torch._dynamo.reset()
    with ops.use_backend("auto"):
        out = torch.compile(_gn_loss, backend="eager", fullgraph=True)(x, w)   # fullgraph: no graph break at all
    torch.testing.assert_close(out, ref)


def test_a_named_kernel_backend_runs_between_graphs_under_compile(monkeypatch):
    if ops.interpreter_problem():
        pytest.skip(ops.interpreter_problem())
    from cmfast.ops import _triton
    kernel, seen = _triton.group_norm_act, []

    def spy(*args):
        seen.append(torch.compiler.is_compiling())     # False: called eagerly, not traced into a graph
        return kernel(*args)

    monkeypatch.setattr(_triton, "group_norm_act", spy)
    monkeypatch.setattr(ops, "_EAGER", {})
    x, w = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(8, requires_grad=True)
    with ops.use_backend("torch"):
        ref = _gn_loss(x, w)
        gref = torch.autograd.grad(ref, (x, w))
    torch._dynamo.reset()
    with ops.use_backend("triton"):
        out = torch.compile(_gn_loss, backend="eager")(x, w)
        g = torch.autograd.grad(out, (x, w))
    assert seen == [False]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g, gref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_import_does_not_load_the_compiler():
    # The compile-aware dispatch must not cost every `import cmfast` (and each CLI start) torch._dynamo's ~1 s import.
    import subprocess
    import sys
    code = "import sys, cmfast; print('torch._dynamo' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_torch_attention_gives_sdpa_dense_inputs(monkeypatch):
    # The UNet's q, k, v are transposed views of the qkv convolution (stride(-1) = 3 L); SDPA's fused GPU kernels need
    # stride(-1) == 1 and it runs its math kernel otherwise. The torch backend hands it dense copies: same values, same
    # gradients, and already-dense tensors pass through uncopied.
    from cmfast.nets import UNet
    from cmfast.nets.presets import preset_config
    from cmfast.ops import _torch
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append([(t.stride(-1), t.data_ptr()) for t in (q, k, v)])
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(_torch.F_, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    net = UNet(**preset_config("tiny", in_channels=1, img_resolution=16))
    x, s = torch.randn(2, 1, 16, 16, requires_grad=True), torch.rand(2) + 0.1
    with ops.use_backend("torch"):
        net(x, s, None).square().sum().backward()
    assert seen and all(st == 1 for call in seen for st, _ in call)
    qkv = torch.randn(2, 1, 8, 3, 16, dtype=torch.float64, requires_grad=True)
    q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(3))          # the UNet's views: stride(-1) = 3 * 16
    assert q.stride(-1) == 48
    ref = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, -1) @ v
    (g_ref,) = torch.autograd.grad(ref.sum(), qkv)
    with ops.use_backend("torch"):
        out = ops.attention(q, k, v)
    (g,) = torch.autograd.grad(out.sum(), qkv)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
    dense = torch.randn(2, 1, 16, 8)
    seen.clear()
    with ops.use_backend("torch"):
        ops.attention(dense, dense, dense)
    assert [p for _, p in seen[0]] == [dense.data_ptr()] * 3
