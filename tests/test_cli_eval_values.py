"""cmfast-eval's result and the values it takes, end to end: where the JSON goes when stdout's reader has gone or the
--out file cannot be written, and flags a mutation study of the CLI found unchecked (each test was seen failing with
the mutation it names)."""
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_sampling import shipped  # noqa: F401  (--pretrained x: a stub consistency model, sigma_max 40)

ROOT = Path(__file__).resolve().parents[1]
F_SETPIPE_SZ = 1031         # Linux fcntl: a pipe's capacity

# A result of more than 4096 bytes (the pipe's capacity below): the evaluation and the model are stubs
_BIG = {"metric": "fd-fmnist", "value": 1.5, "trials": [[i, "x" * 40] for i in range(120)]}
_STUBBED_EVAL = f"""
import sys
import cmfast.metrics as M
import cmfast.pretrained as P
M.evaluate = lambda model, metric, **k: {_BIG!r}
P.load_pretrained = lambda name, map_location=None: object()
P.model_card = lambda name: {{"dataset": "fashion-mnist"}}
from cmfast.cli.eval import main
sys.exit(main())
"""


def test_result_reaches_out_when_stdouts_reader_has_gone(tmp_path):
    """`cmfast-eval --out r.json | head -1`, unbuffered, a result longer than the pipe holds: the reader's exit cuts
    the JSON's write short, which is no silent loss (the newline written after it fails: 141, no line), and r.json
    holds the whole result (it was written after the print, which never returned: an evaluation's result lost)."""
    want = dict(_BIG, pretrained="x")
    assert len(json.dumps(want, indent=2)) > 4096
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    environ = dict(os.environ, PYTHONPATH=str(ROOT), CMFAST_OFFLINE="1", PYTHONUNBUFFERED="1")
    out = tmp_path / "r.json"
    p = subprocess.Popen([sys.executable, "-c", _STUBBED_EVAL, "--pretrained", "x", "--metric", "fd-fmnist",
                          "--device", "cpu", "--out", str(out)], stdout=w, stderr=subprocess.PIPE, env=environ,
                         cwd=ROOT)
    os.close(w)
    line = b""
    while not line.endswith(b"\n") and (c := os.read(r, 1)):
        line += c
    os.close(r)
    err = p.communicate(timeout=120)[1].decode()
    assert (line, p.returncode, err) == (b"{\n", 141, "")
    assert out.read_text() == json.dumps(want, indent=2) + "\n"


def test_an_out_file_that_cannot_be_written_is_one_line_after_the_result(shipped, monkeypatch, capsys):  # noqa: F811
    """--out whose write fails after the evaluation: the result is printed all the same, then the error in one line,
    exit 2."""
    from cmfast.cli import _common
    from cmfast.cli.eval import main
    monkeypatch.setattr("cmfast.metrics.evaluate", lambda model, metric, **k: {"metric": metric, "value": 2.5})

    def full(path, data):
        raise OSError(28, f"cannot write {path}: No space left on device")
    monkeypatch.setattr(_common, "write_output", full)
    with pytest.raises(SystemExit) as e:
        main(["--pretrained", "x", "--metric", "fd-fmnist", "--out", "r.json"])
    captured = capsys.readouterr()
    assert e.value.code == 2
    assert json.loads(captured.out) == {"metric": "fd-fmnist", "value": 2.5, "pretrained": "x"}
    assert captured.err == "cmfast-eval: error: [Errno 28] cannot write r.json: No space left on device\n"


def test_checkpoint_and_shipped_model_load_the_asked_weights_where_they_are_scored(shipped, tmp_path,  # noqa: F811
                                                                                   monkeypatch, capsys):
    """--checkpoint with --which model loads those weights onto --device (load_model's which / map_location), and the
    result names it by its absolute path; a shipped model loads onto the device evaluate samples on: cuda where CUDA is
    there and no --device is given (faked)."""
    import torch
    loads, scored = [], []
    monkeypatch.setattr("cmfast.training.checkpoint.load_model", lambda path, **k: loads.append((path, k)) or
                        (shipped["model"], {"config": {"method": "ict"}}))
    monkeypatch.setattr("cmfast.pretrained.load_pretrained", lambda name, **k: loads.append((name, k)) or
                        shipped["model"])
    monkeypatch.setattr("cmfast.metrics.evaluate", lambda model, metric, **k: scored.append((model, k["device"])) or
                        {"value": 1.0})
    from cmfast.cli.eval import main
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["--checkpoint", ".", "--which", "model", "--device", "cpu", "--metric", "fd-fmnist"]) == 0
    assert loads.pop() == (".", dict(which="model", map_location="cpu"))
    assert json.loads(capsys.readouterr().out)["checkpoint"] == os.getcwd()     # ".", absolute
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["--pretrained", "x", "--metric", "fd-fmnist"]) == 0
    assert loads.pop() == ("x", dict(map_location="cuda"))
    assert scored == [(shipped["model"], "cpu"), (shipped["model"], "cuda")]


@pytest.mark.parametrize("argv, msg", [
    (["--pretrained", "x", "--seed", "-1"], "argument --seed: expected a value in [0, inf], got -1"),
    (["--pretrained", "x", "--search-sigmas", "--steps", "1"], "--search-sigmas needs --steps 2 or more (one step "
                                                               "samples at sigma_max only)"),
    (["--pretrained", "x", "--dataset", "folder"], "--dataset folder needs --data-dir: the folder or zip of reference "
                                                   "images"),
    (["--pretrained", "x", "--steps", "1", "--sigmas", "80,0.821"], "--steps 1 but --sigmas has 2 values")],
    ids=["seed", "search-1-step", "folder", "steps-sigmas"])
def test_refusals_before_the_evaluation_are_one_line(shipped, monkeypatch, capsys, argv, msg):  # noqa: F811
    """--seed -1, --search-sigmas for one step, --dataset folder without --data-dir and --steps that --sigmas
    contradicts: each one line, exit 2, nothing evaluated (each was taken: an evaluation, or another error later)."""
    from cmfast.cli.eval import main
    monkeypatch.setattr("cmfast.metrics.evaluate", lambda *a, **k: {"value": 1.0})
    with pytest.raises(SystemExit) as e:
        main(argv + ["--metric", "fd-fmnist", "--device", "cpu"])
    assert e.value.code == 2 and capsys.readouterr().err == f"cmfast-eval: error: {msg}\n"


def test_reference_dataset_from_the_checkpoint_or_as_given(shipped, tmp_path, monkeypatch):  # noqa: F811
    """A checkpoint trained on CIFAR-10 is scored against CIFAR-10 whatever the metric (fd-fmnist too: it was the
    metric's default, Fashion-MNIST), one recorded as fmnist against Fashion-MNIST; --dataset folder --data-dir goes to
    evaluate as given, also a folder that is not there (evaluate's error: not 'trained on the image folder None')."""
    from cmfast.cli.eval import main
    seen = []
    meta = {"config": {"method": "ict", "dataset": "cifar10"}}
    monkeypatch.setattr("cmfast.training.checkpoint.load_model", lambda path, **k: (shipped["model"], meta))
    monkeypatch.setattr("cmfast.metrics.evaluate", lambda model, metric, **k: seen.append((metric, k["dataset"],
                                                                                          k["data_dir"])) or {})
    assert main(["--checkpoint", str(tmp_path), "--metric", "fd-fmnist", "--device", "cpu"]) == 0
    meta["config"]["dataset"] = "fmnist"        # the short name: Fashion-MNIST
    assert main(["--checkpoint", str(tmp_path), "--metric", "fid", "--device", "cpu"]) == 0
    assert main(["--pretrained", "x", "--metric", "fid", "--dataset", "folder", "--data-dir", str(tmp_path / "none"),
                 "--device", "cpu"]) == 0
    assert seen == [("fd-fmnist", "cifar10", None), ("fid", "fashion-mnist", None),
                    ("fid", "folder", str(tmp_path / "none"))]


def test_search_over_three_steps_and_from_the_checkpoints_levels(shipped, tmp_path, monkeypatch, capsys):  # noqa: F811
    """--search-sigmas --steps 3 searches three levels from the model's defaults (two alone were tested); from a
    checkpoint's recorded levels it starts there and says so in the search's report, not of the final levels."""
    import json

    import cmfast.metrics as M
    from cmfast.cli.eval import main
    searched = []

    def search(score, steps, smin, smax, iters, start=None, log=None):
        searched.append((steps, start))
        return {"sigmas": list(start), "score": score(start), "trials": []}
    monkeypatch.setattr(M, "search_sigmas", search)
    monkeypatch.setattr(M, "evaluate", lambda model, metric, **k: {"value": 1.0})
    meta = {"config": {"method": "ict", "sampling_sigmas": {"2": [40.0, 0.5]}}}
    monkeypatch.setattr("cmfast.training.checkpoint.load_model", lambda path, **k: (shipped["model"], meta))
    assert main(["--pretrained", "x", "--metric", "fd-fmnist", "--search-sigmas", "--steps", "3"]) == 0
    assert searched.pop() == (3, M.model_sigmas(shipped["model"], 3))
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path), "--metric", "fd-fmnist", "--search-sigmas", "--steps", "2"]) == 0
    assert searched.pop() == (2, (40.0, 0.5))
    r = json.loads(capsys.readouterr().out)
    assert r["search"]["sigmas_from"] == "checkpoint (sampling_sigmas)" and "sigmas_from" not in r


def test_a_bad_device_and_an_edm_teachers_search_are_one_line(shipped, monkeypatch, capsys):  # noqa: F811
    """--device that is no device here, and --search-sigmas for an EDM teacher (it samples with its Heun schedule):
    one line each, exit 2, nothing evaluated (the device was not checked: evaluate ran on the CPU)."""
    from cmfast.cli.eval import main
    from cmfast.precond import EDMDenoiser
    from test_sampling import _CliNet
    monkeypatch.setattr("cmfast.metrics.evaluate", lambda *a, **k: {"value": 1.0})
    with pytest.raises(SystemExit) as e:
        main(["--pretrained", "x", "--metric", "fd-fmnist", "--device", "bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("cmfast-eval: error: --device 'bogus'") and err.count("\n") == 1, err
    shipped["model"] = EDMDenoiser(_CliNet()).eval()
    with pytest.raises(SystemExit) as e:
        main(["--pretrained", "x", "--metric", "fd-fmnist", "--steps", "2", "--search-sigmas", "--device", "cpu"])
    want = "--search-sigmas: an EDM teacher samples with its Heun schedule; give a consistency model"
    assert e.value.code == 2 and capsys.readouterr().err == f"cmfast-eval: error: {want}\n"
