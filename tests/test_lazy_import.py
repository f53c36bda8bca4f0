"""cmfast's names load on first use (cmfast/__init__.py, PEP 562): `import cmfast` and the commands' --help and
argument errors run without importing torch (4 s of a 2-core machine's start-up), while every public name is the
object its module defines, `from cmfast import ...` and dir() included."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import cmfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = {        # DESIGN.md 3: the public API, written out here rather than read from cmfast
    "ConsistencyModel": "cmfast.precond", "EDMDenoiser": "cmfast.precond", "GraphedSampler": "cmfast.graphed",
    "UNet": "cmfast.nets.unet", "ct_schedule": "cmfast.schedules", "edm_sample": "cmfast.sampling",
    "fd_jvp": "cmfast.jvp", "ict_schedule": "cmfast.schedules", "karras_sigmas": "cmfast.schedules",
    "load_pretrained": "cmfast.pretrained", "paper_step_sigmas": "cmfast.schedules", "sample": "cmfast.sampling",
    "scalings": "cmfast.precond"}
MODULES = {"edit": "cmfast.editing", "metrics": "cmfast.metrics", "ops": "cmfast.ops"}


def _run(code: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


def test_every_public_name_is_its_modules_object():
    assert sorted(cmfast.__all__) == sorted({**EXPECTED, **MODULES})
    for name, module in EXPECTED.items():
        assert getattr(cmfast, name) is getattr(importlib.import_module(module), name), name
    for name, module in MODULES.items():
        assert getattr(cmfast, name) is importlib.import_module(module), name
    assert set(cmfast.__all__) <= set(dir(cmfast))
    with pytest.raises(AttributeError, match="module 'cmfast' has no attribute 'smaple'"):
        cmfast.smaple       # noqa: B018


def test_import_cmfast_does_not_import_torch_until_a_name_is_read():
    out = _run("import sys, cmfast; print('torch' in sys.modules, cmfast.__version__); "
               "from cmfast import sample; print('torch' in sys.modules, sample.__module__)")
    assert out == ["False", cmfast.__version__, "True", "cmfast.sampling"]


@pytest.mark.parametrize("prog, argv", [("sample", ["--help"]), ("edit", ["--help"]), ("eval", ["--help"]),
                                        ("train", ["--help"]), ("sample", ["--num", "0"]), ("eval", ["--num", "-3"]),
                                        ("train", ["--method", "ctt"]), ("train", ["--steps", "0"])])
def test_help_and_argument_errors_do_not_import_torch(prog, argv):
    """Exit 0 for --help, 2 for the argument error, and torch never imported on the way."""
    out = _run(f"import sys\nfrom cmfast.cli import {prog}\ntry:\n    code = {prog}.main({argv!r})\n"
               f"except SystemExit as e:\n    code = e.code\nprint(code, 'torch' in sys.modules)")
    assert out[-2:] == ["0" if argv == ["--help"] else "2", "False"]      # after the help text


def test_the_commands_error_classes_import_nothing():
    """user_errors() is read while an exception is matched (`except _common.user_errors()`): after a Ctrl-C inside
    torch's import it imported cmfast.ops, so torch again, half-imported (an AttributeError traceback, exit 1, where
    one 'interrupted' line and 130 belong). BackendUnavailable is in it once cmfast.ops is imported, the only place
    that raises it."""
    out = _run("import sys\nfrom cmfast.cli import _common\nnames = lambda: [c.__name__ for c in _common.user_errors()]\n"
               "print(','.join(names()), 'torch' in sys.modules)\nimport cmfast.ops\nprint(','.join(names()))")
    assert out == ["ValueError,TypeError,OSError,KeyError,ImportError", "False",
                   "ValueError,TypeError,OSError,KeyError,ImportError,BackendUnavailable"]


def test_train_parser_names_are_the_modules_names_and_a_registered_method_is_a_choice():
    """cmfast-train builds its parser without importing the modules that define --method, --preset, --dataset and
    --loss (they import torch): their built-in names are written in cli/train.py and must be the modules' own. Once the
    method registry is imported, a method registered there is a choice."""
    out = _run("import json, sys\nfrom cmfast.cli import train\nbefore = train.build_parser()\n"
               "assert 'torch' not in sys.modules\n"
               "import cmfast.data, cmfast.nets.presets, cmfast.objectives, cmfast.training.methods as m\n"
               "got = {f'{mod}:{a}': list(train._names(mod, a)) for mod, a in train.BUILTIN_NAMES}\n"
               "want = {'cmfast.training.methods:METHODS': sorted(m.METHODS), "
               "'cmfast.nets.presets:PRESETS': sorted(cmfast.nets.presets.PRESETS), "
               "'cmfast.data:DATASETS': list(cmfast.data.DATASETS), "
               "'cmfast.objectives:DISTANCES': list(cmfast.objectives.DISTANCES)}\n"
               "builtin = {f'{mod}:{a}': list(v) for (mod, a), v in train.BUILTIN_NAMES.items()}\n"
               "print(json.dumps(got == want == builtin))\n"
               "class Mine(m.Method):\n    name = 'mine'\n"
               "m.register(Mine())\n"
               "print(train.build_parser().parse_args(['--method', 'mine']).method)\n"
               "try:\n    before.parse_args(['--method', 'mine'])\nexcept SystemExit as e:\n    print(e.code)")
    assert out[-3:] == ["true", "mine", "2"]


def test_the_training_package_still_has_its_modules_after_import():
    """The eager package imported checkpoint, methods and methods_scm, so `cmfast.training.checkpoint` worked after
    `import cmfast.training`; the lazy one loads them on that first read."""
    out = _run("import cmfast.training as t\nprint(t.checkpoint.__name__, t.methods_scm.__name__, "
               "t.methods.__name__, sorted(t.__all__) == sorted(['METHODS', 'Method', 'get_method', 'load_model', "
               "'methods', 'register']), 'sct' in t.METHODS)")
    assert out == ["cmfast.training.checkpoint", "cmfast.training.methods_scm", "cmfast.training.methods", "True",
                   "True"]
