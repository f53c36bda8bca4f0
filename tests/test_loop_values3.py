"""cmfast.training.loop, third part: a resume on 2 gloo ranks trims stats.jsonl on rank 0 alone (mutation gaps: the
test failed with the mutations named in its docstring)."""
import json
import os

import pytest
import torch

from cmfast.training import checkpoint as ckpt
from cmfast.training import loop as L
from test_loop_values2 import _free_port, _spawn


@pytest.fixture(autouse=True)
def env(monkeypatch, one_thread):
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _cfg(root, **more):
    return {"dataset": "fashion-mnist", "data_dir": os.path.join(root, "fm"), "method": "ict", "preset": "tiny",
            "loss": "l2", "batch_size": 4, "total_steps": 2, "lr": 0.02, "sample_num": 0, "log_every": 1,
            "ckpt_every": 1, "keep": 0, "device": "cpu", "output_dir": os.path.join(root, "run"), **more}


def _resume_rank(rank, port, root):
    """One rank of a 2-rank run resumed from step 1; records every open / atomic write of stats.jsonl it makes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", CMFAST_OFFLINE="1")
    torch.set_num_threads(1)
    touched, real_open, real_write = [], open, ckpt.atomic_write

    def spy_open(path, *a, **k):
        if str(path).endswith("stats.jsonl"):
            touched.append(["open", (a[0] if a else k.get("mode", "r"))])
        return real_open(path, *a, **k)

    def spy_write(path, data):
        if str(path).endswith("stats.jsonl"):
            touched.append(["atomic_write", data.decode()])
        return real_write(path, data)
    L.open = spy_open               # loop.py's open() (a module global shadows the builtin)
    ckpt.atomic_write = spy_write
    L.train(_cfg(root, resume=ckpt.paths(os.path.join(root, "run"), 1)[0]))
    with real_open(os.path.join(root, f"touched{rank}.json"), "w") as f:
        json.dump(touched, f)
    os._exit(0)


@pytest.mark.slow
def test_a_resume_on_two_ranks_trims_stats_jsonl_on_rank_0_alone(tmp_path):
    """A 1-process run logs steps 1 and 2 with a checkpoint at each; a kill left a row of step 3 and half a row after
    them. Resumed on 2 gloo ranks from step 1, rank 0 cuts the file back to step 1's row (written once, whole: one
    atomic write of exactly that line) and logs step 2 anew: rows 1, 2 (the log says 3 rows went). Rank 1 neither reads nor writes stats.jsonl
    (the file is rank 0's; on a filesystem shared between nodes two ranks rewrote it at once). (mutants: rank 1 trims
    too; rank 0 does not trim.)"""
    from train_fixtures import write_fmnist
    write_fmnist(tmp_path / "fm", n=8)
    assert L.train(_cfg(str(tmp_path)))["step"] == 2
    stats = tmp_path / "run" / "stats.jsonl"
    first, second = stats.read_text().splitlines()
    assert [json.loads(first)["step"], json.loads(second)["step"]] == [1, 2]
    stats.write_text(first + "\n" + second + "\n" + json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    _spawn(_resume_rank, _free_port(), str(tmp_path))
    t0, t1 = (json.loads((tmp_path / f"touched{r}.json").read_text()) for r in (0, 1))
    assert t1 == []
    assert t0[:2] == [["open", "r"], ["atomic_write", first + "\n"]]      # the trim: read, then step 1's row alone
    assert t0[2:] == [["open", "a"]]                                        # step 2's row appended
    rows = stats.read_text().splitlines()
    assert rows[0] == first and [json.loads(x)["step"] for x in rows] == [1, 2]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "stats.jsonl: 3 row(s) after step 1 removed (this run logs those steps anew)" in log
