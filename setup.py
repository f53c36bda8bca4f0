"""Build hook: maps kernels/ to cmfast.kernels; csrc/ is built into cmfast._C by cmfast/_build.py when a CUDA
toolchain is found (CMFAST_BUILD_CUDA=0/1 overrides), otherwise compiled on first use (JIT)."""
import importlib.util
import os
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _build_module():
    """cmfast/_build.py loaded by path: it needs only the standard library (no torch in a build environment)."""
    spec = importlib.util.spec_from_file_location("_cmfast_build", HERE / "cmfast" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildCuda(build_ext):
    """Compiles csrc/ with nvcc. Unless CMFAST_BUILD_CUDA=1 asked for it, a failed build only warns: the install
    goes on and cmfast compiles the kernels on first use instead."""

    def build_extension(self, ext):
        if ext.name != "cmfast._C":
            return super().build_extension(ext)
        try:
            _build_module().compile(self.get_ext_fullpath(ext.name), verbose=True)
        except Exception as e:  # no pybind11 in an isolated build, compiler errors, ...
            if os.environ.get("CMFAST_BUILD_CUDA") == "1":
                raise
            line = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.warn(f"cmfast: CUDA kernels not built at install ({line}); they are compiled on first use instead")


def _ext_modules():
    flag = os.environ.get("CMFAST_BUILD_CUDA", "")
    if flag == "0":
        return []
    if flag != "1":
        try:
            if _build_module().cuda_home() is None:
                return []
        except Exception:
            return []
    return [Extension("cmfast._C", sources=[], optional=True)]


# kernels/ is the package cmfast.kernels. csrc/ travels inside it as cmfast/_csrc (data, never imported; its files are
# listed in pyproject.toml's package-data), so that a wheel installed without a prebuilt cmfast._C can still compile
# the kernels on first use. cmfast/assets holds data only; it is listed so that setuptools does not warn about it.
packages = find_packages(include=["cmfast", "cmfast.*"]) + ["cmfast.kernels", "cmfast._csrc", "cmfast.assets"]
setup(packages=packages, package_dir={"cmfast.kernels": "kernels", "cmfast._csrc": "csrc"},
      ext_modules=_ext_modules(), cmdclass={"build_ext": BuildCuda})
