import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. Set once, before anything imports triton, so every test
# module sees the same environment whatever the collection order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_rounds_bf16_to_nearest() -> None:
    """Triton's interpreter (3.8) truncates fp32 -> bf16 casts (it converts the bits without a rounding mode); a GPU
    rounds them to nearest even. Truncation biases every bf16 output of a kernel under test by up to an ulp, which
    the tests' ulp floor then has to absorb (the audit saw bf16 attention gradients fail the rule, and mixed-precision
    skip_output pass by luck). The cast rounds to nearest even here (as torch's), for the tests only."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast = getattr(builder, "cast_impl", None)
    if cast is None or getattr(cast, "rounds_to_nearest", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            # Round to nearest even on the bits, in numpy (no torch op: tests count the ops a kernel call makes)
            f = np.array(src.data, dtype=np.float32)
            bits = f.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return interpreter.TensorHandle(np.where(np.isnan(f), np.uint16(0x7FC0), rounded), dst_type.scalar)
        return cast(self, src, dst_type)
    cast_impl.rounds_to_nearest = True
    builder.cast_impl = cast_impl


_interpreter_rounds_bf16_to_nearest()


def pytest_collection_modifyitems(config, items):
    """GPU tests skip, with the reason, where no CUDA device is present (run them with -m gpu on the GPU machine)."""
    if torch.cuda.is_available():
        return
    from cmfast.ops import interpreter_problem
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on the GPU machine)")
    problem = interpreter_problem()
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
        elif problem and "triton_cpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test, the old count after it: the tests' shapes are small, and on the CI machine's two
    shared, busy cores two threads wait on each other (small convs ran ~50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
