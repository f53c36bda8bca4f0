"""Build csrc/ into the extension module cmfast._C (nvcc + pybind11), at install time or on first use.

Standard library only: setup.py loads this file by path, before torch or cmfast can be imported.

  compile(out)   nvcc -O3 for CMFAST_CUDA_ARCH (default sm_90), one object per source in parallel, linked with the
                 static CUDA runtime, so the module needs no libcudart on the loader path (and imports without a GPU)
  load(arch)     cmfast._C if it was built from the current csrc/ for `arch` (the module carries a hash of both),
                 else the JIT copy _C_<hash> in ~/.cache/cmfast/ext/<hash>/ (CMFAST_CACHE overrides), compiling it
                 once. Its own module name lets it load beside a stale cmfast._C: two extension modules of one name
                 cannot both load in a process (the second import returns the first).
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def _csrc() -> Path:
    """The CUDA sources: cmfast/_csrc in an installed wheel (setup.py ships csrc/ there), else csrc/ beside the
    package (a source checkout, an editable install)."""
    here = Path(__file__).resolve().parent
    packaged = here / "_csrc"
    return packaged if (packaged / "bindings.cpp").is_file() else here.parent / "csrc"


CSRC = _csrc()
DEFAULT_ARCH = "90"


class ToolchainMissing(RuntimeError):
    """No nvcc (or no pybind11) to compile csrc/ with; the message says what to install or set."""


# ---- locating the toolkit ----------------------------------------------------------------------------------------
def _is_toolkit(root: Path) -> bool:
    return (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file()


def cuda_home() -> Path | None:
    """The CUDA toolkit: $CUDA_HOME / $CUDA_PATH, else the nvcc on PATH (following symlinks, and reading a shell
    wrapper such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"` for the real path), else /usr/local/cuda*."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and _is_toolkit(Path(os.environ[var])):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        if _is_toolkit(real.parent.parent):
            return real.parent.parent
        try:
            head = real.read_bytes()[:4096]
        except OSError:
            head = b""
        if not head.startswith(b"\x7fELF"):  # a script: look for the nvcc it runs
            for m in re.finditer(rb"(/[\w./+-]*)/bin/nvcc\b", head):
                root = Path(m.group(1).decode())
                if _is_toolkit(root):
                    return root
    return next((c for c in _default_roots() if _is_toolkit(c)), None)


def _default_roots() -> list[Path]:
    """/usr/local/cuda, then /usr/local/cuda-X.Y newest first (by version: cuda-12.4 before cuda-9.2)."""
    def version(p: Path) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", p.name)]
    return [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), key=version, reverse=True)


def cuda_arches(arch: str | None = None) -> list[str]:
    """Compute capabilities as digits ('90', '100a'): from `arch`, else $CMFAST_CUDA_ARCH ('sm_90', '9.0',
    '80;90' all work), else sm_90 (H100 / H200)."""
    spec = arch or os.environ.get("CMFAST_CUDA_ARCH") or DEFAULT_ARCH
    out = []
    for tok in re.split(r"[,; ]+", str(spec).strip()):
        tok = tok.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", tok):
            raise ValueError(f"CMFAST_CUDA_ARCH: expected compute capabilities like 'sm_90' or '9.0', got {spec!r}")
        out.append(tok)
    return out


# ---- what gets built ----------------------------------------------------------------------------------------
def sources() -> list[Path]:
    return sorted(p for p in CSRC.glob("*") if p.suffix in (".cu", ".cpp", ".cuh", ".h"))


def source_hash(arch: str | None = None) -> str:
    """Hash of csrc/, the target arches and the Python ABI: a build answers only to the exact same inputs."""
    h = hashlib.sha256()
    for p in sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(",".join(cuda_arches(arch)).encode())
    h.update(str(sysconfig.get_config_var("EXT_SUFFIX")).encode())
    return h.hexdigest()[:16]


# The sources of each op's kernels (with the shared device helpers): what a per-op measurement measured. The
# benchmarks record op_digest(op) beside their rows, and benchmarks/make_auto_table.py lets only measurements of the
# op's current sources pick a backend (a rewritten kernel's old timings are of a kernel that no longer exists).
OP_SOURCES = {"group_norm_act": ("group_norm_act.cu",), "skip_output": ("skip_output.cu",),
              "skip_output_infer": ("skip_output.cu",), "consistency_loss": ("consistency_loss.cu",)}
_SHARED_SOURCES = ("common.cuh",)


def op_digest(op: str) -> str | None:
    """Hash of the CUDA sources of `op` (OP_SOURCES plus the shared helpers), or None for an op without CUDA
    kernels or where the sources are not here."""
    names = OP_SOURCES.get(op)
    if not names:
        return None
    h = hashlib.sha256()
    for name in (*names, *_SHARED_SOURCES):
        path = CSRC / name
        if not path.is_file():
            return None
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def ext_filename(module: str = "_C") -> str:
    return module + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        log = r.stdout + r.stderr
        first = next((ln.strip() for ln in log.splitlines() if "error" in ln.lower()), f"exit status {r.returncode}")
        # First line: the first compiler error (what one-line reports show); then the command and the full log.
        raise RuntimeError(f"compiling csrc/ failed: {first}\n{' '.join(cmd)}\n{log}")


def compile(out: str | os.PathLike, arch: str | None = None, jobs: int | None = None, verbose: bool = False) -> Path:
    """Compile csrc/ into the shared object `out`, a file name `<module>.<extension suffix>`: the module is named
    after the file (PyInit_<module>)."""
    home = cuda_home()
    if home is None:
        raise ToolchainMissing("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    try:
        import pybind11
    except ImportError:
        raise ToolchainMissing("pybind11 is not installed (pip install pybind11)") from None
    nvcc = str(home / "bin" / "nvcc")
    arches = cuda_arches(arch)
    gencode = [f"-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]" for a in arches]  # + PTX for newer GPUs
    digest = source_hash(arch)
    common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", f"-I{CSRC}"]
    out = Path(out)
    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                f'-DCMFAST_SOURCE_HASH="{digest}"', f"-DCMFAST_MODULE={out.name.split('.')[0]}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cmfast-build-") as tmp:
        cmds = []
        for src in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp")):
            obj = Path(tmp) / (src.stem + ".o")
            extra = gencode if src.suffix == ".cu" else includes
            cmds.append(([nvcc, *common, *extra, "-c", str(src), "-o", str(obj)], obj))
        # The pybind11 file dominates (~10 s of host C++), so it goes first.
        cmds.sort(key=lambda c: not c[0][-3].endswith(".cpp"))
        jobs = jobs or min(len(cmds), os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda c: _run(c[0]), cmds))
        linked = Path(tmp) / out.name
        _run([nvcc, "-shared", *gencode, "--cudart=static", *[str(o) for _, o in cmds], "-o", str(linked)])
        staged = out.with_name(f".{out.name}.{os.getpid()}")  # same folder, so the final rename is atomic
        shutil.copyfile(linked, staged)
        os.replace(staged, out)
    if verbose:
        print(f"cmfast: built {out} for sm_{',sm_'.join(arches)} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


# ---- loading ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """None when the kernels can be had here (cmfast._C is installed, or nvcc and pybind11 can build it), else one
    line saying what is missing. Cheap: nothing is compiled."""
    if importlib.util.find_spec("cmfast._C") is not None:
        return None
    if not CSRC.is_dir():
        return f"cmfast._C is not built and its sources are not installed to compile it (looked in {CSRC})"
    if cuda_home() is None:
        return "cmfast._C is not built and no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)"
    if importlib.util.find_spec("pybind11") is None:
        return "cmfast._C is not built and pybind11 is missing to build it (pip install pybind11)"
    return None


def _import_path(path: Path):
    spec = importlib.util.spec_from_file_location(path.name.split(".")[0], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cache_dir() -> Path:
    root = os.environ.get("CMFAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cmfast")
    return Path(root) / "ext"


def load(arch: str | None = None):
    """The extension module built from the current csrc/ for `arch`: the installed cmfast._C when it matches,
    else the cached JIT build, compiled here (once, with a one-line note) when missing."""
    have_sources = CSRC.is_dir()
    want = source_hash(arch) if have_sources else None
    try:
        import cmfast._C as mod  # built by setup.py
    except ImportError:
        mod = None
    if mod is not None and (want is None or getattr(mod, "SOURCE_HASH", None) == want):
        return mod
    if not have_sources:
        raise ToolchainMissing(f"cmfast._C is not built and its sources are not installed to compile it "
                               f"(looked in {CSRC})")
    path = cache_dir() / want / ext_filename(f"_C_{want}")
    if not path.exists():
        print(f"cmfast: compiling the CUDA kernels (csrc/) for sm_{',sm_'.join(cuda_arches(arch))} into {path.parent}"
              " (once, ~30 s)", file=sys.stderr)
        compile(path, arch)
    return _import_path(path)


def main(argv=None) -> int:
    """python -m cmfast._build [--arch 90] [--out FILE] [--force]: compile now (default: into the JIT cache, unless
    the entry for these sources is there already) and time it."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m cmfast._build", description=main.__doc__)
    p.add_argument("--arch", default=None, help="compute capabilities, e.g. 90 or '80;90' (default $CMFAST_CUDA_ARCH or 90)")
    p.add_argument("--out", default=None, help="shared object to write (default: the JIT cache entry load() uses)")
    p.add_argument("--force", action="store_true", help="compile even when the cache entry exists")
    a = p.parse_args(argv)
    try:
        digest = source_hash(a.arch)
        out = a.out or cache_dir() / digest / ext_filename(f"_C_{digest}")
        if a.out is None and not a.force and out.exists():   # entries are written whole (a rename) and keyed by sources
            print(f"cmfast: up to date: {out}")
            return 0
        t0 = time.perf_counter()
        compile(out, a.arch)
    except (ToolchainMissing, RuntimeError, ValueError) as e:
        print(f"cmfast-build: error: {e}", file=sys.stderr)
        return 2
    print(f"cmfast: built {out} for sm_{',sm_'.join(cuda_arches(a.arch))} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
