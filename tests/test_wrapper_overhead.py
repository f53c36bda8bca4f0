"""benchmarks/wrapper_overhead.py: the cuda and triton GroupNorm wrappers timed on CPU with their kernels as no-ops,
and every patched name restored afterwards."""
import json
from pathlib import Path

import pytest

from _repo import load_script
from cmfast import _build

ROOT = Path(__file__).resolve().parents[1]
if _build.unavailable_reason():      # the cuda wrappers' module refuses to import without a CUDA toolchain
    pytest.skip(_build.unavailable_reason(), allow_module_level=True)


def _load():
    return load_script(ROOT / "benchmarks" / "wrapper_overhead.py", "wrapper_overhead")


def test_rows_per_backend_and_the_kernels_restored(tmp_path):
    import cmfast.kernels.group_norm_act as kgn
    from cmfast.ops import _cuda
    wo = _load()
    before = {n: getattr(kgn, n) for n in dir(kgn)} | {f"_cuda.{n}": getattr(_cuda, n) for n in dir(_cuda)}
    calls = []
    real_ext = wo._NoOpExt.__getattr__

    def counting(self, name):          # every launch the wrappers make reaches the no-op extension
        calls.append(name)
        return real_ext(self, name)
    wo._NoOpExt.__getattr__ = counting
    launches, real_getitem = [], wo._NoOpKernel.__getitem__

    def counting_launch(self, grid):     # and every Triton launch the no-op kernel (none runs in the interpreter)
        launches.append(grid)
        return real_getitem(self, grid)
    wo._NoOpKernel.__getitem__ = counting_launch
    rows = wo.measure(calls=6, repeats=1, shapes=(((2, 8, 4, 4), 4, True),))
    assert [(r["backend"], r["layout"], r["shape"]) for r in rows] == [("cuda", "nhwc", [2, 8, 4, 4]),
                                                                       ("triton", "nhwc", [2, 8, 4, 4])]
    assert all(r["forward_us"] > 0 and r["forward_backward_us"] > r["forward_us"] for r in rows)
    assert "group_norm_act_fwd" in calls and any(c.startswith("group_norm_act_bwd") for c in calls)
    assert len(launches) >= 2 * 6        # a forward and a backward launch at least, per timed call
    after = {n: getattr(kgn, n) for n in dir(kgn)} | {f"_cuda.{n}": getattr(_cuda, n) for n in dir(_cuda)}
    assert all(after[k] is v for k, v in before.items() if not k.startswith("__"))
    assert wo.main(["--out", str(tmp_path / "w.json"), "--calls", "6"]) == 0
    doc = json.loads((tmp_path / "w.json").read_text())
    assert doc["benchmark"] == "wrapper_overhead" and len(doc["rows"]) == 2 * len(wo.SHAPES)
