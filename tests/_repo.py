"""The checkout as plain files (tests of what a user gets without this working tree: a wheel built elsewhere, a
torch.hub download)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def copy_checkout(dst: Path) -> Path:
    """Copy the files git tracks or would track (untracked but not ignored) to `dst`: no .git, no build output, no
    virtual environment."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    return dst


def load_script(path: Path, name: str):
    """A script of the repository (scripts/, benchmarks/) loaded by path as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
