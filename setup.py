"""Build hook: maps kernels/ to cmfast.kernels; csrc/ is built into cmfast._C by cmfast/_build.py when a CUDA
toolchain is found (CMFAST_BUILD_CUDA=0/1 overrides), otherwise compiled on first use (JIT)."""
from setuptools import find_packages, setup

packages = find_packages(include=["cmfast", "cmfast.*"]) + ["cmfast.kernels"]
setup(packages=packages, package_dir={"cmfast.kernels": "kernels"})
