"""The console scripts' --help says what the code does (the docs audit: flags whose help had fallen behind)."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _help(module: str) -> str:
    return " ".join(importlib.import_module(module).build_parser().format_help().split())


def test_train_teacher_help_names_every_method_that_needs_one():
    text = _help("cmfast.cli.train")        # builds the parser, which registers every method
    from cmfast.training.methods import METHODS
    need = sorted(name for name, m in METHODS.items() if m.needs_teacher)
    assert f"(--method {', '.join(need)})" in text and len(need) == 2
    assert "images per grid, 0 = no grids" in text     # the loop writes none for --sample-num 0


@pytest.mark.parametrize("module", ["cmfast.cli.sample", "cmfast.cli.eval"])
def test_sampling_level_help_mentions_recorded_levels_and_karras_grid(module):
    text = _help(module)
    assert "checkpoint records" in text and "Karras grid" in text


def test_make_tables_help_names_all_marker_pairs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_tables.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "four marker pairs (summary, results, reference, sct)" in " ".join(out.split())
