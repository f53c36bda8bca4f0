"""The console scripts and their docs say what the code does (--help texts, docstrings, `python -m` entry points)."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _help(module: str) -> str:
    """The help text without whitespace: argparse re-wraps it, also after hyphens."""
    return "".join(importlib.import_module(module).build_parser().format_help().split())


def _has(text: str, phrase: str) -> bool:
    return "".join(phrase.split()) in text


def test_train_help_teacher_sample_num_and_compile_match_the_code():
    from cmfast.training.methods import METHODS     # imported first: the parser takes its names from it
    text = _help("cmfast.cli.train")
    need = sorted(name for name, m in METHODS.items() if m.needs_teacher)
    assert _has(text, f"(--method {', '.join(need)})") and len(need) == 2
    assert _has(text, "images per grid, 0 = no grids")      # the loop writes none for --sample-num 0
    assert _has(text, "CUDA-graph modes refuse CD / CT / iCT with dropout")     # training/loop.py check_compile


@pytest.mark.parametrize("module", ["cmfast.cli.sample", "cmfast.cli.eval"])
def test_sampling_level_help_mentions_recorded_levels_and_karras_grid(module):
    text = _help(module)
    assert _has(text, "checkpoint records") and _has(text, "Karras grid")


def test_make_tables_help_names_all_marker_pairs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_tables.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "".join("four marker pairs (summary, results, reference, sct)".split()) in "".join(out.split())


def test_load_model_docstring_names_the_class_each_method_rebuilds():
    """cmfast.training.load_model (README: 'works wherever a checkpoint does') names what it returns per method."""
    from cmfast.training import METHODS, load_model
    from cmfast.training.config import resolve
    from cmfast.nets import UNet
    doc = "".join(load_model.__doc__.split())
    for name, method in METHODS.items():
        cfg = resolve(dict(method=name, preset="tiny", dataset="fashion-mnist", teacher="t" if method.needs_teacher
                           else None))
        kind = type(method.wrap(UNet.from_preset("tiny"), cfg)).__name__
        assert kind in doc, (name, kind)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")     # runpy on a module already imported
@pytest.mark.parametrize("module", ["cmfast.cli.train", "cmfast.cli.sample", "cmfast.cli.edit", "cmfast.cli.eval"])
def test_python_m_exits_with_mains_status(module, monkeypatch):
    """`python -m cmfast.cli.X` (README: torchrun -m cmfast.cli.train) exits with main's status, as the console script
    does: edit and eval dropped it, so an interrupted run (main returns 130) exited 0."""
    import runpy
    from cmfast.cli import _common
    monkeypatch.setattr(_common, "interruptible", lambda prog, note="": (lambda main: (lambda argv=None: 130)))
    monkeypatch.setattr(sys, "argv", [module])
    with pytest.raises(SystemExit) as e:
        runpy.run_module(module, run_name="__main__")
    assert e.value.code == 130


@pytest.mark.parametrize("module", ["cmfast.cli.train", "cmfast.cli.sample", "cmfast.cli.edit"])
def test_help_shows_the_module_docstring_examples(module):
    # cmfast-edit's examples sat in its docstring only; its --help had none, unlike train's and sample's
    doc = importlib.import_module(module).__doc__
    examples = [line.strip() for line in doc.splitlines() if line.strip().startswith("cmfast-")]
    text = importlib.import_module(module).build_parser().format_help()
    assert examples and all(e in text for e in examples)
