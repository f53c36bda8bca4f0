"""scripts/reference_runs.py (the Fashion-MNIST reference runs and the shipped model's export) and the README tables
benchmarks/make_tables.py generates from the results JSON."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

from cmfast.data import FMNIST_SYSTEM_DIR

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_tables = _load(ROOT / "benchmarks" / "make_tables.py", "make_tables")


def _run(fd1, fd2, nfe=(1, 2), **extra):
    evals = [{"nfe": n, "value": v, "sample_img_per_s": 100.0} for n, v in zip(nfe, (fd1, fd2)) if v is not None]
    return {"steps": 10, "steps_planned": 10, "images_seen": 80, "train_wall_s": 1.0, "train_img_per_s": 80.0,
            "evals": evals, **extra}


def _doc(runs, slug="h100", date="2026-11-26"):
    return {"benchmark": "reference_runs", "profile": "gpu", "device": slug.upper(), "device_slug": slug,
            "date": date, "torch": "2.11", "preset": "fmnist-small", "batch_size": 256, "precision": "bf16",
            "eval_num": 10000, "runs": runs}


def test_goals_are_computed_from_the_numbers():
    good = _doc({"edm": _run(4.0, None, nfe=(35,)), "cd": _run(5.0, 4.5), "ct": _run(7.0, 5.5)})
    assert make_tables.reference_goals(good) == [
        "2 steps better than 1 for every method: met", "CD 1-step better than CT 1-step: met (5.00 vs 7.00)",
        "best 2-step (cd) within 1.5x of the teacher: met (1.12x)"]
    bad = _doc({"edm": _run(2.0, None, nfe=(35,)), "cd": _run(8.0, 9.0), "ct": _run(7.0, 5.5)})
    assert make_tables.reference_goals(bad) == [
        "2 steps better than 1 for every method: missed (cd)", "CD 1-step better than CT 1-step: missed (8.00 vs 7.00)",
        "best 2-step (ct) within 1.5x of the teacher: missed (2.75x)"]


def test_readme_tables_are_replaced_between_markers(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps(_doc({"ict": _run(9.0, 8.0)}, date="2026-11-01")))
    (tmp_path / "new.json").write_text(json.dumps(_doc({"ict": _run(6.0, 5.0), "sct": {"error": "boom"}})))
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "bench_ops"}))
    (tmp_path / "broken.json").write_text("{")
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{make_tables.BEGIN}\nx\n{make_tables.END}\nb\n{make_tables.REF_BEGIN}\ny\n"
                      f"{make_tables.REF_END}\nc\n")
    assert make_tables.main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("a\n") and text.endswith("c\n") and "\ny\n" not in text
    assert "| ict | 10 (10) | 80 | 1 | 80 | 6.00 | 5.00 | - | 100.0 |" in text and "9.00" not in text
    assert "| sct | boom |" in text and "2 steps better than 1 for every method: met" in text
    readme.write_text("no markers\n")
    assert make_tables.main(["--results", str(tmp_path), "--readme", str(readme)]) == 2


def test_train_commands_record_the_method_settings():
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    prof = ref.PROFILES["gpu"]
    cd = ref.train_argv("cd", prof, "out", "data", None, 0)
    assert cd[cd.index("--teacher") + 1] == os.path.join("out", "edm") and cd[cd.index("--loss") + 1] == "l2"
    ict = ref.train_argv("ict", prof, "out", None, "cuda", 0)
    assert "--loss" not in ict and ict[ict.index("--preset") + 1] == "fmnist-small"
    assert float(ict[ict.index("--time-limit") + 1]) == prof["runs"]["ict"][1]
    # The GPU profile fits one device call: the five runs' time caps leave room for the evaluations.
    assert sum(m for _, m in prof["runs"].values()) * 60 <= 360


@pytest.mark.skipif(not os.path.isdir(FMNIST_SYSTEM_DIR), reason="needs the Debian package dataset-fashion-mnist")
def test_smoke_profile_trains_scores_and_exports(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    results = tmp_path / "ref.json"
    # A partial rerun keeps the other methods' results of the same device and profile.
    results.write_text(json.dumps({"benchmark": "reference_runs", "profile": "smoke", "device_slug": "cpu",
                                   "runs": {"sct": {"method": "sct", "error": "kept"}, "ict": {"stale": 1}}}))
    rc = ref.main(["--profile", "smoke", "--out", str(tmp_path / "runs"), "--only", "ict", "--results",
                   str(results), "--export", "smoke-model", "--export-dir", str(tmp_path / "export")])
    assert rc == 0
    doc = json.loads(results.read_text())
    assert list(doc["runs"]) == ["ict", "sct"] and doc["runs"]["sct"]["error"] == "kept"
    r = doc["runs"]["ict"]
    assert "stale" not in r
    assert r["steps"] == r["steps_planned"] == 4 and r["images_seen"] == 32
    assert r["command"].startswith("cmfast-train --dataset fashion-mnist --method ict --preset tiny")
    assert [e["nfe"] for e in r["evals"]] == [1, 2]
    assert all(0 < e["value"] < 400 and e["num"] == 200 for e in r["evals"])   # FD of noise is ~150-200
    assert doc["export"] == {"name": "smoke-model", "method": "ict", "fd_1step": r["evals"][0]["value"], "rc": 0}
    card = json.loads((tmp_path / "export" / "smoke-model.json").read_text())
    assert card["steps"] == 4 and card["method"] == "ict" and card["training"]["command"] == r["command"]
    assert (tmp_path / "export" / "smoke-model.safetensors").stat().st_size < 1e6
