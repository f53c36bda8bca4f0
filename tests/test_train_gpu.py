"""cmfast-train on a CUDA device: a few steps in bf16 and fp16 (loss scaling), samples, checkpoint to CPU."""
import json
import os

import pytest
import torch

from cmfast.cli.train import main as train_main
from cmfast.training import checkpoint as ckpt
from train_fixtures import write_png_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision, method", [("bf16", "ict"), ("fp16", "ct"), ("fp32", "edm")])
def test_cuda_training_steps(tmp_path, monkeypatch, precision, method):
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    write_png_folder(tmp_path / "imgs", n=16, size=32)
    out = str(tmp_path / "run")
    assert train_main(["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--method", method,
                       "--loss", "pseudo_huber", "--preset", "tiny", "--batch-size", "8", "--steps", "4",
                       "--precision", precision, "--device", "cuda", "--sample-num", "4", "--log-every", "1",
                       "--output-dir", out]) == 0
    with open(os.path.join(out, "stats.jsonl")) as f:
        rows = [json.loads(x) for x in f]
    assert len(rows) == 4 and all(r["loss"] == r["loss"] and r["mem_mb"] > 0 for r in rows)
    assert rows[-1]["skipped"] == 0
    assert os.listdir(os.path.join(out, "samples"))
    model, meta = ckpt.load_model(out, map_location="cpu")
    assert meta["step"] == 4 and next(model.parameters()).device.type == "cpu"
