"""The cuda backend's wrappers (cmfast/ops/_cuda.py) on CPU: argument errors are one clear line, layouts are
recognised, the split heuristic stays in range, and a missing toolchain surfaces as BackendUnavailable."""
import pytest
import torch

import cmfast.ops as ops
from cmfast import _build

if _build.unavailable_reason():
    pytest.skip(_build.unavailable_reason(), allow_module_level=True)
from cmfast.ops import _cuda  # noqa: E402

x = torch.randn(2, 6, 5, 7)


@pytest.mark.parametrize("call, name", [
    (lambda: _cuda.group_norm_act(x, 3, None, None, 1e-6, None, None, "silu"), "x"),
    (lambda: _cuda.skip_output(x, x, torch.ones(2), 0.5, 0.002), "x"),
    (lambda: _cuda.skip_output_infer(x, x, torch.ones(2), 0.5, 0.002, True), "x"),
    (lambda: _cuda.consistency_loss(x, x, "l2", 0.1, None), "pred"),
])
def test_cpu_tensor_is_rejected_in_one_line(call, name):
    with pytest.raises(ValueError) as e:
        call()
    msg = str(e.value)
    assert msg == f"{name}: the cuda backend needs CUDA tensors, got a tensor on cpu"


def test_non_tensor_and_shape_errors():
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        _cuda.group_norm_act([1.0], 1, None, None, 1e-6, None, None, "silu")
    with pytest.raises(TypeError, match="pred: expected a torch.Tensor"):
        _cuda.consistency_loss(None, x, "l2", 0.1, None)


def test_unavailable_reason_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(_build, "cuda_home", lambda: None)
    monkeypatch.setattr(_build.importlib.util, "find_spec", lambda name: None)
    _build.unavailable_reason.cache_clear()
    try:
        assert _build.unavailable_reason().startswith("cmfast._C is not built and no CUDA toolkit was found")
    finally:
        _build.unavailable_reason.cache_clear()


def test_named_backend_on_cpu_says_why():
    with ops.use_backend("cuda"), pytest.raises(ops.BackendUnavailable, match="needs a CUDA tensor"):
        ops.group_norm_act(x, 3, None, None)


def test_layout_detection_and_dense_copies():
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not _cuda._is_nhwc(x) and _cuda._is_nhwc(cl)
    assert not _cuda._is_nhwc(torch.randn(2, 1, 4, 4).contiguous(memory_format=torch.channels_last))  # both: NCHW
    d = _cuda._dense(x.contiguous(), True)
    assert d.stride() == cl.stride() and torch.equal(d, x)
    assert _cuda._dense(cl, True).data_ptr() == cl.data_ptr()  # already dense: no copy
    t = x.transpose(2, 3)  # neither layout: becomes NCHW-dense
    assert _cuda._dense(t, _cuda._is_nhwc(t)).is_contiguous()


@pytest.mark.parametrize("N, C, HW", [(1, 128, 1024), (8, 256, 64), (1, 3, 35), (64, 512, 16), (1, 32, 1)])
@pytest.mark.parametrize("nhwc", [False, True])
def test_num_splits_in_range(N, C, HW, nhwc):
    S = _cuda._num_splits(N, C, HW, nhwc, 132)
    assert 1 <= S <= HW
    if N * C >= 32 * 132 and not nhwc:
        assert S == 1  # enough (n, c) rows to fill the GPU: no split
    if N == 1 and HW >= 1024:
        assert S > 1  # batch 1 at 32x32: the reduction must be split across blocks (DESIGN.md, Kernels)


def test_missing_toolchain_becomes_backend_unavailable(monkeypatch):
    monkeypatch.setenv("CMFAST_CUDA_ARCH", "90")

    def no_toolchain(arch=None):
        raise _build.ToolchainMissing("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")

    monkeypatch.setattr(_build, "load", no_toolchain)
    with pytest.raises(ops.BackendUnavailable, match="backend 'cuda' is unavailable: no CUDA toolkit found") as e:
        _cuda._ext(torch.device("cuda", 0))
    assert "\n" not in str(e.value)
