"""benchmarks/regress.py reading its inputs: a baseline or benchmark JSON of the wrong layout is exit 2 with one line
(exit 1 means a slowdown)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import regress  # noqa: E402

BENCH = {"benchmarks": [{"name": "a", "stats": {"median": 0.001}, "extra_info": {"device_slug": "dev"}}]}


@pytest.mark.parametrize("bench, base", [
    (BENCH, {"medians": {"a": "0.001"}}),                       # a median that is a string
    (BENCH, {"medians": [0.001]}),                               # medians as a list
    (BENCH, {"medians": {"a": 0.001}, "threshold": "0.1"}),
    ({"benchmarks": [{"name": "a", "extra_info": {"device_slug": "dev"}}]}, {"medians": {"a": 0.001}}),  # no stats
    ({"benchmarks": ["a"]}, {"medians": {"a": 0.001}}),
])
def test_compare_with_values_of_the_wrong_type_is_exit_2(tmp_path, capsys, bench, base):
    """These were TypeError / AttributeError / KeyError tracebacks, exit 1: read as a slowdown by CI."""
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "base.json").write_text(json.dumps(base))
    assert regress.main(["compare", str(tmp_path / "bench.json"), "--baseline", str(tmp_path / "base.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("regress.py: error: ") and err.count("\n") == 1 and "bench.json" in err


def test_cpu_baseline_ratio_not_a_number_is_exit_2_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(regress, "measure_cpu", lambda **kw: pytest.fail("measured with a damaged baseline"))
    for base in ({"ratio": "1.3"}, {"ratio": 1.3, "threshold": None}):
        (tmp_path / "base.json").write_text(json.dumps(base))
        assert regress.main(["cpu", "--baseline", str(tmp_path / "base.json")]) == 2
        assert "must be numbers" in capsys.readouterr().err
