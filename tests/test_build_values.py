"""cmfast/_build.py (and setup.py's CMFAST_BUILD_CUDA switch) without compiling: toolkit detection on fake toolkits,
the arch and source hash inputs, the nvcc command lines compile() runs, the JIT cache layout load() and
`python -m cmfast._build` share, and the one-line reasons when nothing can be built. test_csrc_build.py compiles."""
import importlib.machinery
import importlib.util
import shutil
import sys
import types
from pathlib import Path

import pytest

from cmfast import _build

REPO = Path(__file__).resolve().parent.parent


def _toolkit(root: Path, header=True) -> Path:
    """A directory that looks like a CUDA toolkit: bin/nvcc (a shell script) and include/cuda_runtime.h."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\nexit 0\n")
    (root / "bin" / "nvcc").chmod(0o755)
    if header:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    return root


@pytest.fixture
def bare(monkeypatch, tmp_path):
    """No CUDA_HOME / CUDA_PATH, no nvcc on PATH, no /usr/local/cuda* roots."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(_build, "_default_roots", lambda: [])


def test_cuda_home_from_the_environment(bare, tmp_path, monkeypatch):
    """$CUDA_HOME, then $CUDA_PATH; a variable that names no toolkit (no nvcc, or no cuda_runtime.h) is skipped."""
    a, b = _toolkit(tmp_path / "a"), _toolkit(tmp_path / "b")
    half = _toolkit(tmp_path / "half", header=False)
    assert _build.cuda_home() is None
    monkeypatch.setenv("CUDA_PATH", str(b))
    assert _build.cuda_home() == b
    monkeypatch.setenv("CUDA_HOME", str(a))
    assert _build.cuda_home() == a
    monkeypatch.setenv("CUDA_HOME", str(half))
    assert _build.cuda_home() == b


def test_cuda_home_from_nvcc_on_path(bare, tmp_path, monkeypatch):
    """nvcc on PATH: the toolkit above its bin/ (through a symlink), or the toolkit a wrapper script execs (the first
    path in it that is a toolkit; names with dots and dashes such as cuda-13.0); an ELF nvcc is not read as a script;
    without any of these, the first /usr/local/cuda* root that is a toolkit."""
    real = _toolkit(tmp_path / "opt" / "cuda-13.0")
    link = tmp_path / "link"
    link.mkdir()
    (link / "nvcc").symlink_to(real / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(link))
    assert _build.cuda_home() == real
    monkeypatch.setenv("PATH", str(real / "bin"))
    assert _build.cuda_home() == real
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    (wrap / "nvcc").write_text(f'#!/bin/sh\n[ -x /nowhere/cuda-9.9/bin/nvcc ] && exec /nowhere/cuda-9.9/bin/nvcc "$@"\n'
                               f'exec {real}/bin/nvcc "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", str(wrap))
    assert _build.cuda_home() == real
    (wrap / "nvcc").write_bytes(b"\x7fELF\x02\x01" + f"{real}/bin/nvcc".encode())     # a binary naming a path
    assert _build.cuda_home() is None
    other = _toolkit(tmp_path / "usr-local-cuda-12.4")
    monkeypatch.setattr(_build, "_default_roots", lambda: [tmp_path / "nothing", other])
    assert _build.cuda_home() == other


def test_default_roots_newest_version_first(tmp_path, monkeypatch):
    """/usr/local/cuda, then /usr/local/cuda-X.Y from the newest version down: 12.4 before 9.2 (a plain string sort
    put cuda-9.2 first)."""
    for v in ("11.8", "9.2", "13.0", "12.4"):
        (tmp_path / f"cuda-{v}").mkdir()
    real_path = Path
    monkeypatch.setattr(_build, "Path", lambda p: real_path(str(p).replace("/usr/local", str(tmp_path))))
    assert _build._default_roots() == [tmp_path / n for n in ("cuda", "cuda-13.0", "cuda-12.4", "cuda-11.8",
                                                               "cuda-9.2")]


def test_cuda_arches_spellings_and_precedence(monkeypatch):
    """An explicit arch wins over $CMFAST_CUDA_ARCH; compute_XY, X.Y, sm_XY separated by commas, semicolons or
    spaces; the 'a' / 'f' feature suffixes."""
    monkeypatch.setenv("CMFAST_CUDA_ARCH", "80")
    assert _build.cuda_arches("90") == ["90"]
    assert _build.cuda_arches() == ["80"]
    assert _build.cuda_arches("compute_90 sm_100a,12.0f") == ["90", "100a", "120f"]
    for bad in ("9", "sm_9000", "90x"):
        with pytest.raises(ValueError, match="CMFAST_CUDA_ARCH"):
            _build.cuda_arches(bad)


def test_source_hash_inputs(tmp_path, monkeypatch):
    """Every source file (headers too) by name and content, and the extension ABI; other files are not inputs. A
    renamed file (a .cu that becomes a .cpp compiles otherwise) is another build."""
    copy = tmp_path / "csrc"
    shutil.copytree(_build.CSRC, copy)
    monkeypatch.setattr(_build, "CSRC", copy)
    h = _build.source_hash("90")
    (copy / "NOTES.txt").write_text("not a source")
    assert _build.source_hash("90") == h
    header = next(p for p in copy.iterdir() if p.suffix in (".cuh", ".h"))
    header.write_text(header.read_text() + "\n// edit\n")
    h2 = _build.source_hash("90")
    assert h2 != h
    last = _build.sources()[-1]                 # renamed, it stays last: the same bytes in the same order
    last.rename(last.with_name("zzzz_" + last.name))
    assert _build.sources()[-1].name == "zzzz_" + last.name and _build.source_hash("90") != h2
    real = _build.sysconfig.get_config_var
    monkeypatch.setattr(_build.sysconfig, "get_config_var",
                        lambda k: ".cpython-399-other.so" if k == "EXT_SUFFIX" else real(k))
    h3 = _build.source_hash("90")
    monkeypatch.setattr(_build.sysconfig, "get_config_var", real)
    assert h3 != _build.source_hash("90")


def test_ext_filename_is_an_importable_extension_name():
    assert _build.ext_filename("_C_ab") == "_C_ab" + importlib.machinery.EXTENSION_SUFFIXES[0]


def test_a_failed_command_reports_its_first_error_line(tmp_path):
    script = ('echo "compiling"; echo "foo.cu(3): error: bad thing" >&2; echo "1 error detected in foo.cu" >&2; '
              'exit 1')    # nvcc writes both lines to stderr
    with pytest.raises(RuntimeError) as e:
        _build._run(["sh", "-c", script])
    first, cmd = str(e.value).splitlines()[:2]
    assert first == "compiling csrc/ failed: foo.cu(3): error: bad thing" and cmd.startswith("sh -c")
    with pytest.raises(RuntimeError, match="^compiling csrc/ failed: exit status 3\n"):
        _build._run(["sh", "-c", "echo quiet; exit 3"])
    _build._run(["sh", "-c", "exit 0"])


def test_compile_command_lines(tmp_path, monkeypatch):
    """The nvcc runs compile() makes: each .cu for every arch as SASS plus PTX, the pybind11 .cpp with the Python and
    pybind11 headers, the module name (the file's) and the hash of these sources for these arches, linked with the
    static CUDA runtime; the result lands in a folder that did not exist."""
    pybind11 = pytest.importorskip("pybind11")
    home = _toolkit(tmp_path / "cuda")
    monkeypatch.setattr(_build, "cuda_home", lambda: home)
    runs = []

    def fake_run(cmd):
        runs.append(cmd)
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"object of " + cmd[-3].encode())
    monkeypatch.setattr(_build, "_run", fake_run)
    out = tmp_path / "new" / "deeper" / _build.ext_filename("_C_test")
    assert _build.compile(out, arch="80;90") == out
    nvcc = str(home / "bin" / "nvcc")
    assert all(cmd[0] == nvcc for cmd in runs)
    gencode = ["-gencode=arch=compute_80,code=[sm_80,compute_80]", "-gencode=arch=compute_90,code=[sm_90,compute_90]"]
    *objects, link = runs
    sources = sorted(_build.CSRC.glob("*.cu")) + sorted(_build.CSRC.glob("*.cpp"))
    assert sorted(c[c.index("-c") + 1] for c in objects) == sorted(map(str, sources))
    for cmd in objects:
        src = Path(cmd[cmd.index("-c") + 1])
        assert "-O3" in cmd and f"-I{_build.CSRC}" in cmd
        if src.suffix == ".cu":
            assert [a for a in cmd if a.startswith("-gencode")] == gencode and not any(a.startswith("-D") for a in cmd)
        else:
            assert not any(a.startswith("-gencode") for a in cmd)
            assert f"-I{pybind11.get_include()}" in cmd and f"-I{_build.sysconfig.get_paths()['include']}" in cmd
            assert f'-DCMFAST_SOURCE_HASH="{_build.source_hash("80;90")}"' in cmd
            assert "-DCMFAST_MODULE=_C_test" in cmd
    assert link[:2] == [nvcc, "-shared"] and "--cudart=static" in link
    assert [a for a in link if a.startswith("-gencode")] == gencode
    objs = [c[c.index("-o") + 1] for c in objects]
    assert [a for a in link if a.endswith(".o")] == objs
    assert out.read_bytes() == b"object of " + link[-3].encode()
    assert [p.name for p in out.parent.iterdir()] == [out.name]          # no staging file left beside it


def test_compile_without_pybind11_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(_build, "cuda_home", lambda: _toolkit(tmp_path / "cuda"))
    monkeypatch.setitem(sys.modules, "pybind11", None)
    with pytest.raises(_build.ToolchainMissing, match=r"^pybind11 is not installed \(pip install pybind11\)$"):
        _build.compile(tmp_path / _build.ext_filename())


def test_unavailable_reason(tmp_path, monkeypatch):
    """None when cmfast._C is installed, or when sources, a toolkit and pybind11 are there; otherwise the first thing
    missing, in one line."""
    found = {"cmfast._C": None, "pybind11": object()}
    monkeypatch.setattr(_build.importlib.util, "find_spec", lambda name: found.get(name))
    home = [tmp_path]
    monkeypatch.setattr(_build, "cuda_home", lambda: home[0])

    def reason():
        _build.unavailable_reason.cache_clear()
        return _build.unavailable_reason()
    try:
        assert reason() is None
        home[0] = None
        assert reason() == "cmfast._C is not built and no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)"
        home[0], found["pybind11"] = tmp_path, None
        assert reason() == "cmfast._C is not built and pybind11 is missing to build it (pip install pybind11)"
        monkeypatch.setattr(_build, "CSRC", tmp_path / "gone")
        assert reason().startswith("cmfast._C is not built and its sources are not installed")
        found["cmfast._C"] = object()
        assert reason() is None
    finally:
        _build.unavailable_reason.cache_clear()


def test_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CMFAST_CACHE", str(tmp_path / "c"))
    assert _build.cache_dir() == tmp_path / "c" / "ext"
    monkeypatch.delenv("CMFAST_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _build.cache_dir() == tmp_path / "home" / ".cache" / "cmfast" / "ext"


def test_load_picks_installed_cached_or_new_build(tmp_path, monkeypatch):
    """load(): an installed cmfast._C built from these sources for this arch; else the cache entry
    <cache>/ext/<hash>/_C_<hash><suffix>, compiled there once when missing."""
    monkeypatch.setenv("CMFAST_CACHE", str(tmp_path))
    want = _build.source_hash("90")
    entry = tmp_path / "ext" / want / (f"_C_{want}" + importlib.machinery.EXTENSION_SUFFIXES[0])
    compiled, imported = [], []

    def fake_compile(out, arch=None):
        compiled.append((Path(out), arch))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"so")
    monkeypatch.setattr(_build, "compile", fake_compile)
    monkeypatch.setattr(_build, "_import_path", lambda path: imported.append(Path(path)) or "jit module")
    installed = types.ModuleType("cmfast._C")
    installed.SOURCE_HASH = want
    monkeypatch.setitem(sys.modules, "cmfast._C", installed)
    assert _build.load("90") is installed and not compiled and not imported
    installed.SOURCE_HASH = "0" * 16                          # built from other sources: not used
    assert _build.load("90") == "jit module"
    assert compiled == [(entry, "90")] and imported == [entry]
    monkeypatch.setitem(sys.modules, "cmfast._C", None)       # none installed, the entry is there: no compile
    assert _build.load("90") == "jit module" and len(compiled) == 1 and imported == [entry, entry]


def test_build_command_paths_and_errors(tmp_path, monkeypatch, capsys):
    """`python -m cmfast._build` writes load()'s cache entry; a bad --arch or a missing toolkit is one line, exit 2."""
    monkeypatch.setenv("CMFAST_CACHE", str(tmp_path))
    built = []
    monkeypatch.setattr(_build, "compile", lambda out, arch: built.append((Path(out), arch)))
    assert _build.main(["--arch", "80"]) == 0
    h = _build.source_hash("80")
    assert built == [(tmp_path / "ext" / h / f"_C_{h}{importlib.machinery.EXTENSION_SUFFIXES[0]}", "80")]
    capsys.readouterr()
    assert _build.main(["--arch", "hopper"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmfast-build: error: CMFAST_CUDA_ARCH: expected") and err.count("\n") == 1

    def missing(out, arch):
        raise _build.ToolchainMissing("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    monkeypatch.setattr(_build, "compile", missing)
    assert _build.main(["--force"]) == 2
    assert capsys.readouterr().err == "cmfast-build: error: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)\n"


def test_sources_of_an_installed_wheel(tmp_path):
    """In a wheel, csrc/ ships as cmfast/_csrc (with bindings.cpp); a checkout has csrc/ beside the package."""
    def load_from(pkg):
        spec = importlib.util.spec_from_file_location("_build_copy", pkg / "_build.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    pkg = tmp_path / "cmfast"
    pkg.mkdir()
    (pkg / "_build.py").write_text((REPO / "cmfast" / "_build.py").read_text())
    assert load_from(pkg).CSRC == tmp_path / "csrc"
    (pkg / "_csrc").mkdir()
    (pkg / "_csrc" / "bindings.cpp").write_text("")
    assert load_from(pkg).CSRC == pkg / "_csrc"


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py as a module, its setup() call a no-op."""
    import setuptools
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    spec = importlib.util.spec_from_file_location("_cmfast_setup", REPO / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_setup_builds_the_extension_as_cmfast_build_cuda_says(setup_py, monkeypatch):
    """CMFAST_BUILD_CUDA=0: no extension; 1: the extension whatever the toolkit; unset: only where a toolkit is
    found. A failed build stops the install only under CMFAST_BUILD_CUDA=1; otherwise one warning line."""
    home = [None]
    fake = types.SimpleNamespace(cuda_home=lambda: home[0])
    monkeypatch.setattr(setup_py, "_build_module", lambda: fake)
    for flag, toolkit, want in (("0", "/cuda", []), ("1", None, ["cmfast._C"]), ("", None, []),
                                ("", "/cuda", ["cmfast._C"])):
        monkeypatch.setenv("CMFAST_BUILD_CUDA", flag)
        home[0] = toolkit
        assert [e.name for e in setup_py._ext_modules()] == want, (flag, toolkit)

    def failing(path, verbose=False):
        raise RuntimeError("compiling csrc/ failed: x.cu(1): error: boom\nnvcc ...\nfull log")
    fake.compile = failing
    from setuptools import Distribution
    from setuptools import Extension
    cmd = setup_py.BuildCuda(Distribution())
    warned = []
    cmd.get_ext_fullpath = lambda name: "/nowhere/_C.so"
    cmd.warn = warned.append
    monkeypatch.setenv("CMFAST_BUILD_CUDA", "")
    cmd.build_extension(Extension("cmfast._C", sources=[]))
    assert warned == ["cmfast: CUDA kernels not built at install (compiling csrc/ failed: x.cu(1): error: boom); "
                      "they are compiled on first use instead"]
    monkeypatch.setenv("CMFAST_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="x.cu"):
        cmd.build_extension(Extension("cmfast._C", sources=[]))
