"""The installed package, not the source tree: a wheel built from this checkout holds everything cmfast needs at run
time (the Triton kernels as cmfast.kernels, the CUDA sources for a first-use build, the shipped model, the auto
table), and runs from its own files."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from _repo import copy_checkout
from cmfast import _build


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    """A wheel of this checkout (no CUDA build: the pure-Python wheel a machine without nvcc makes), unpacked."""
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    src = copy_checkout(out / "src")          # setuptools builds in the source tree: not in this checkout
    env = {**os.environ, "CMFAST_BUILD_CUDA": "0"}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-cache-dir", str(src), "-w", str(out)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("cmfast-*.whl")
    unpacked = out / "site"
    with zipfile.ZipFile(whl) as z:
        z.extractall(unpacked)
    return unpacked


def test_wheel_ships_the_cuda_sources_for_a_first_use_build(wheel_dir):
    shipped = wheel_dir / "cmfast" / "_csrc"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(p.name for p in _build.sources())
    for p in _build.sources():
        assert (shipped / p.name).read_bytes() == p.read_bytes(), p.name
    # The wheel's own _build finds them (not a csrc/ beside it) and keys a build on the same hash as the checkout.
    spec = importlib.util.spec_from_file_location("wheel_build", wheel_dir / "cmfast" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.CSRC == shipped
    assert mod.source_hash("90") == _build.source_hash("90")


def test_wheel_holds_kernels_model_and_table(wheel_dir):
    pkg = wheel_dir / "cmfast"
    for rel in ("kernels/group_norm_act.py", "kernels/attention.py", "ops/auto_table.json", "assets/fmnist.json",
                "assets/fmnist.safetensors", "assets/fmnist_classifier.safetensors", "cli/sample.py"):
        assert (pkg / rel).is_file(), rel
    assert not (wheel_dir / "csrc").exists() and not (wheel_dir / "kernels").exists()   # nothing top-level but cmfast


@pytest.mark.slow
def test_wheel_runs_from_its_own_files(wheel_dir, tmp_path):
    """cmfast imported from the unpacked wheel (first on the path, ahead of this checkout's editable install) loads
    the shipped model and samples one step."""
    code = ("import cmfast, torch; m = cmfast.load_pretrained('fmnist'); "
            "z = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)); "
            "x = cmfast.sample(m, z); "
            "print(cmfast.__file__); print(tuple(x.shape), float(x.std()))")
    env = {**os.environ, "PYTHONPATH": str(wheel_dir), "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    where, shape_max = r.stdout.strip().splitlines()[-2:]
    assert Path(where).resolve().is_relative_to(wheel_dir.resolve())
    shape, std = shape_max.rsplit(" ", 1)
    assert shape == "(2, 1, 32, 32)" and 0.2 < float(std) < 1.5     # images in [-1, 1], not noise at sigma 80
