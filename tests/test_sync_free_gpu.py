"""cmfast-train's eager step on a CUDA device makes one host sync, the loop's own read of the loss, the gradient norm
and the stop request (the CPU side of it: tests/test_sync_free_step.py). torch.cuda.set_sync_debug_mode tells: 'error'
fails a synchronizing call, 'warn' warns at the Python line that made it."""
import contextlib
import copy
import math
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from cmfast import data, precond
from cmfast.cli.train import main as train_main
from cmfast.ema import ema_update_
from cmfast.training.cuda_graph import grad_norm
from test_cuda_graph_gpu import _setup
from train_fixtures import write_png_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LOOP = Path(__file__).resolve().parents[1] / "cmfast" / "training" / "loop.py"
SYNC_LINE = "torch.stack([red[0], red[1], gnorm_t.float()]).tolist()"     # the loop's one sync a step


@contextlib.contextmanager
def sync_debug(mode):
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
@pytest.mark.parametrize("method", ["edm", "cd", "ct", "ict", "sct", "scd"])
def test_eager_step_makes_no_host_sync(method, precision):
    m, models, cfg, params, _, _ = _setup(method, batch=8, cuda_graph=False)
    opt = torch.optim.RAdam(params, lr=1e-4)                  # cmfast-train's default optimizer
    ema = copy.deepcopy(models["model"]).requires_grad_(False)
    ds = data.ImageDataset(torch.randint(0, 256, (32, 1, 32, 32), dtype=torch.uint8), torch.arange(32) % 10, "t",
                           xflip=True)
    gen = torch.Generator("cuda")

    def body(k):
        x, _ = ds.batch(torch.arange(8) + 8 * (k % 4), torch.arange(8) % 2 == 0, "cuda")
        opt.zero_grad(set_to_none=True)
        gen.manual_seed(k)
        with torch.autocast("cuda", precision or torch.float32, enabled=precision is not None), \
                precond.skip_value_checks():
            loss = m.loss(models, x, 5, cfg, gen)[0].float().mean()
        loss.backward()
        gnorm = grad_norm(params)                              # the loop's (clipping off)
        return torch.stack([loss.detach(), torch.full((), 0.0, device="cuda"), gnorm.float()])

    def after():
        opt.step()
        m.after_step(models, 5, cfg)
        ema_update_(ema, models["model"], 0.99)

    body(0).tolist()            # warm-up: kernel choices, the level grid's one copy, the optimizer's state
    after()
    with sync_debug("error"):
        red = body(1)
    loss, _, gnorm = red.tolist()
    assert math.isfinite(loss) and math.isfinite(gnorm) and gnorm > 0
    with sync_debug("error"):
        after()
    torch.cuda.synchronize()


def _sync_lines(tmp_path, method, steps, name):
    """(file, line) -> count of the synchronizing calls of a cmfast-train run of `steps` steps."""
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--method", method, "--preset", "tiny",
            "--batch-size", "8", "--steps", str(steps), "--device", "cuda", "--precision", "bf16",
            "--sample-every", "1000", "--ckpt-every", "1000", "--log-every", "1000", "--sample-num", "4",
            "--output-dir", str(tmp_path / name)] + (["--loss", "l2"] if method == "ct" else [])
    with sync_debug("warn"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert train_main(argv) == 0
    return Counter((Path(w.filename).name, w.lineno) for w in seen if "synchroniz" in str(w.message))


@pytest.mark.parametrize("method", ["edm", "ct", "ict", "sct"])
def test_training_run_syncs_once_per_step(tmp_path, monkeypatch, method):
    # runs of 4 and 8 steps after a warm-up run: what the 4 more steps add is one sync a step, at the loop's read
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    write_png_folder(tmp_path / "imgs", n=16, size=32)
    _sync_lines(tmp_path, method, 4, "warm")
    short, long = _sync_lines(tmp_path, method, 4, "a"), _sync_lines(tmp_path, method, 8, "b")
    line = next(i for i, s in enumerate(LOOP.read_text().splitlines(), 1) if SYNC_LINE in s)
    more = {k: long[k] - short.get(k, 0) for k in long if long[k] > short.get(k, 0)}
    # (a read may warn more than once: its copy and its wait)
    assert set(more) == {("loop.py", line)} and more[("loop.py", line)] in (4, 8), (more, short, long)
