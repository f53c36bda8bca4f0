import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. Set once, before anything imports triton, so every test
# module sees the same environment whatever the collection order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
