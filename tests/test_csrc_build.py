"""csrc/ compiles with the local nvcc (CPU CI: no GPU needed) into a module that imports and exposes the kernels;
cmfast/_build.py finds the toolkit (also behind a wrapper script), parses arches and serves the JIT cache."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmfast import _build

EXPECTED = {"group_norm_act_fwd", "group_norm_act_bwd", "skip_output_fwd", "skip_output_bwd",
            "consistency_loss_fwd", "consistency_loss_bwd"}

needs_nvcc = pytest.mark.skipif(_build.cuda_home() is None, reason="no CUDA toolkit (nvcc) on this machine")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("pybind11", reason="pybind11 is needed to build csrc/")
    # Named like the JIT build (_C_<hash>): one process cannot load two different extension modules of one name.
    out = tmp_path_factory.mktemp("csrc") / _build.ext_filename(f"_C_{_build.source_hash('90')}")
    _build.compile(out, arch="90")  # raises with nvcc's message on a compile error
    return out


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(path.name.split(".")[0], path)  # PyInit_<file name>
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_nvcc
def test_compiles_and_exposes_kernels(built):
    assert built.is_file() and built.stat().st_size > 100_000
    try:
        mod = _import(built)
    except ImportError as e:
        # Only a loader that wants the CUDA driver (none here) falls back to the exported symbol table; any other
        # import error (an undefined symbol of ours) is a failed build.
        if not re.search(r"libcuda|driver", str(e), re.I):
            raise
        syms = subprocess.run(["nm", "-D", "--defined-only", str(built)], capture_output=True, text=True).stdout
        assert f"PyInit_{built.name.split('.')[0]}" in syms, f"module does not import ({e}) and exports no PyInit"
        return
    assert EXPECTED <= set(dir(mod))
    assert mod.SOURCE_HASH == _build.source_hash("90")  # load() relies on it to spot stale builds
    assert tuple(mod.DTYPES) == ("float32", "float16", "bfloat16")


@needs_nvcc
def test_load_uses_matching_cached_build(built, tmp_path, monkeypatch):
    monkeypatch.setenv("CMFAST_CACHE", str(tmp_path))
    want = _build.source_hash("90")
    cached = _build.cache_dir() / want / built.name
    cached.parent.mkdir(parents=True)
    shutil.copy(built, cached)
    monkeypatch.setitem(sys.modules, "cmfast._C", None)   # no installed module: the cache entry is the one to use

    def rebuild(*a, **k):
        raise AssertionError("load() recompiled although the cache holds a build of these sources")
    monkeypatch.setattr(_build, "compile", rebuild)
    imported, real = [], _build._import_path
    monkeypatch.setattr(_build, "_import_path", lambda path: imported.append(Path(path)) or real(path))
    mod = _build.load("90")
    assert imported == [cached] and mod.SOURCE_HASH == want
    assert EXPECTED <= set(dir(mod))


def test_source_hash_follows_sources_and_arch(tmp_path, monkeypatch):
    h90 = _build.source_hash("90")
    assert h90 == _build.source_hash("sm_90") == _build.source_hash("9.0")
    assert _build.source_hash("80") != h90
    copy = tmp_path / "csrc"
    shutil.copytree(_build.CSRC, copy)
    monkeypatch.setattr(_build, "CSRC", copy)
    assert _build.source_hash("90") == h90
    (copy / "skip_output.cu").write_text((copy / "skip_output.cu").read_text() + "\n// edit\n")
    assert _build.source_hash("90") != h90


def test_cuda_arches(monkeypatch):
    monkeypatch.delenv("CMFAST_CUDA_ARCH", raising=False)
    assert _build.cuda_arches() == ["90"]
    monkeypatch.setenv("CMFAST_CUDA_ARCH", "sm_80;9.0, 100a")
    assert _build.cuda_arches() == ["80", "90", "100a"]
    with pytest.raises(ValueError, match="CMFAST_CUDA_ARCH"):
        _build.cuda_arches("hopper")


@needs_nvcc
def test_cuda_home_through_wrapper_script(tmp_path, monkeypatch):
    real = _build.cuda_home()
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}/usr/bin:/bin")
    monkeypatch.setattr(_build, "_default_roots", lambda: [])  # only the wrapper can lead to the toolkit
    assert _build.cuda_home() == real
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))  # an invalid CUDA_HOME is skipped, not trusted
    assert _build.cuda_home() == real


def test_missing_toolchain_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(_build, "cuda_home", lambda: None)
    with pytest.raises(_build.ToolchainMissing, match="no CUDA toolkit found") as e:
        _build.compile(tmp_path / _build.ext_filename())
    assert "\n" not in str(e.value)


def test_build_command_skips_an_existing_cache_entry(tmp_path, monkeypatch, capsys):
    """`python -m cmfast._build` (gpu_check's build step) compiles once per source hash: a second call on the same
    machine finds the entry and returns at once (it recompiled, 12-23 s of device time); --force rebuilds."""
    monkeypatch.setenv("CMFAST_CACHE", str(tmp_path))
    built = []
    monkeypatch.setattr(_build, "compile", lambda out, arch: (built.append(out), out.parent.mkdir(parents=True),
                                                              out.write_bytes(b"so")))
    assert _build.main([]) == 0 and len(built) == 1
    assert _build.main([]) == 0 and len(built) == 1
    assert "up to date" in capsys.readouterr().out
    monkeypatch.setattr(_build, "compile", lambda out, arch: built.append(out))
    assert _build.main(["--force"]) == 0 and len(built) == 2 and built[1] == built[0]
