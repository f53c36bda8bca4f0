"""cmfast.training.loop's loop body, second part: the lr warm-up as the optimizer sees it, which model the sample grids
come from and when, the evaluation EMAs' warm-up from the first step, and the DDP helpers on 2 gloo processes (mutation
gaps: each test failed with the mutation named in its docstring)."""
import json
import os
import socket

import numpy as np
import pytest
import torch

from cmfast.training import checkpoint as ckpt
from cmfast.training import loop as L
from test_loop_values import _fm_run


@pytest.fixture(autouse=True)
def env(monkeypatch, one_thread):
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _rows(tmp_path):
    with open(tmp_path / "run" / "stats.jsonl") as f:
        return [json.loads(x) for x in f]


def _optimizer_lrs(monkeypatch):
    """The lr of each param group at each optimizer step the loop takes."""
    seen, real = [], L.make_optimizer

    def make(params, cfg):
        opt = real(params, cfg)
        step = opt.step

        def recording(*a, **k):
            seen.append([g["lr"] for g in opt.param_groups])
            return step(*a, **k)
        opt.step = recording
        return opt
    monkeypatch.setattr(L, "make_optimizer", make)
    return seen


def test_lr_warm_up_reaches_the_optimizer_and_caps_at_lr(tmp_path, monkeypatch):
    """--lr-rampup-kimg 0.006 (6 images) at batch 4: the optimizer steps at lr x 4/6, then lr (8/6 capped at 1), lr;
    the stats rows show the same lr; without warm-up (0) every step runs at lr, and --sample-num 0 writes no grid
    (mutants: the param groups' lr not set; (step + 2); no cap; 'ramp 0' taken as lr 0; kimg as 1024 images)."""
    seen = _optimizer_lrs(monkeypatch)
    assert _fm_run(tmp_path, "--steps", "3", "--lr", "1e-3", "--lr-rampup-kimg", "0.006", "--log-every", "1") == 0
    want = [1e-3 * 4 / 6, 1e-3, 1e-3]
    assert [lrs[0] for lrs in seen] == pytest.approx(want, rel=1e-12) and all(len(set(x)) == 1 for x in seen)
    assert [r["lr"] for r in _rows(tmp_path)] == pytest.approx(want, rel=1e-12)
    seen.clear()
    assert _fm_run(tmp_path / "flat", "--steps", "2", "--lr", "2e-3", "--log-every", "1") == 0
    assert [lrs[0] for lrs in seen] == [2e-3, 2e-3] and [r["lr"] for r in _rows(tmp_path / "flat")] == [2e-3, 2e-3]
    assert not (tmp_path / "flat" / "run" / "samples").exists()


def test_lr_warm_up_counts_the_global_step_after_a_resume(tmp_path, monkeypatch):
    """A run resumed at step 1 of a 40-image warm-up at batch 4 goes on at (k + 1) x 4 / 40 of lr: 0.2, 0.3 (mutant:
    the ramp restarted from the resumed run's first step, 0.1, 0.2)."""
    seen = _optimizer_lrs(monkeypatch)
    assert _fm_run(tmp_path, "--steps", "3", "--stop-at", "1", "--lr-rampup-kimg", "0.04", "--ckpt-every", "1") == 0
    assert _fm_run(tmp_path, "--steps", "3", "--lr-rampup-kimg", "0.04", "--resume", "latest") == 0
    assert [lrs[0] for lrs in seen] == pytest.approx([1e-3 * 0.1, 1e-3 * 0.2, 1e-3 * 0.3], rel=1e-12)


def _png(path):
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im)


def _one_step_grid(model, cfg, n):
    """The 1-step grid transcribed: n latents (Fashion-MNIST padded to 32 x 32) from seed + 12345, CM Alg. 1 at
    sigma_max with noise from seed, 2 columns for 3 images (ceil(sqrt 3)), the 4th cell black."""
    from cmfast.sampling import sample
    z = torch.randn((n, 1, 32, 32), generator=torch.Generator().manual_seed(cfg["seed"] + 12345))
    with torch.no_grad():
        x = sample(model, z, (cfg["sigma_max"],), torch.Generator().manual_seed(cfg["seed"]), None)
    img = (x.double() * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy()[:, 0]     # (n, 32, 32)
    out = np.zeros((64, 64), np.uint8)
    for i in range(n):
        r, c = divmod(i, 2)
        out[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = img[i]
    return out


def test_sample_grids_come_from_the_first_ema_every_n_steps_and_at_the_last(tmp_path):
    """--sample-every 2 --sample-num 3 over 3 steps: grids at step 2 and the last, 3 (not 1); each 1-step grid is
    sampling the first EMA rate's weights of that step's checkpoint from the fixed seed, pixel for pixel, 3 images in a
    2 x 2 grid; the online model's and the second EMA's grids differ (mutants: the raw model sampled; the last EMA;
    '!= 0'; the last step's grid dropped; sample_num + 1)."""
    assert _fm_run(tmp_path, "--steps", "3", "--sample-every", "2", "--sample-num", "3", "--ema", "0.9,0.01", "--lr", "0.02",
                   "--ckpt-every", "1", "--keep", "0") == 0
    run = tmp_path / "run"
    assert sorted(os.listdir(run / "samples")) == [f"0000000{s}-{n}step.png" for s in (2, 3) for n in (1, 2)]
    with open(run / "config.json") as f:
        cfg = json.load(f)
    for s in (2, 3):
        got = _png(run / "samples" / f"0000000{s}-1step.png")
        assert got.shape == (64, 64) and not got[32:, 32:].any()
        assert _png(run / "samples" / f"0000000{s}-2step.png").shape == (64, 64)
        grids = {w: _one_step_grid(ckpt.load_model(ckpt.paths(str(run), s)[0], which=w)[0], cfg, 3)
                 for w in ("ema@0.9", "ema@0.01", "model")}
        assert np.array_equal(got, grids["ema@0.9"])
        assert not np.array_equal(got, grids["ema@0.01"]) and not np.array_equal(got, grids["model"])


def test_sample_grids_without_an_ema_come_from_the_online_model(tmp_path):
    """No EMA rate (train(ema=())): the grid is the online model's (mutant: nothing written without an EMA)."""
    from train_fixtures import write_fmnist
    write_fmnist(tmp_path / "fm", n=8)
    run = tmp_path / "run"
    L.train({"dataset": "fashion-mnist", "data_dir": str(tmp_path / "fm"), "method": "ict", "preset": "tiny",
             "loss": "l2", "batch_size": 4, "total_steps": 1, "sample_every": 5, "sample_num": 3, "ema": (),
             "ckpt_every": 1, "device": "cpu", "output_dir": str(run)})
    with open(run / "config.json") as f:
        cfg = json.load(f)
    assert cfg["ema"] == []
    model = ckpt.load_model(ckpt.paths(str(run), 1)[0], which="model")[0]
    assert np.array_equal(_png(run / "samples" / "00000001-1step.png"), _one_step_grid(model, cfg, 3))


def _build_init(cfg):
    """The online model at initialization, as the run builds it: the net from the seed, then the method's wrapper."""
    from cmfast.nets import UNet
    from cmfast.training.methods import get_method
    torch.manual_seed(cfg["seed"])
    net = UNet(**cfg["net"])
    torch.manual_seed(cfg["seed"])
    return get_method(cfg["method"]).build(net, cfg, None)["model"].state_dict()


def test_evaluation_emas_warm_up_from_the_first_step(tmp_path):
    """EMA after step k (0-based): mu theta_ema + (1 - mu) theta, mu = min(rate, (1 + k) / (10 + k)), in float64 from
    the initial weights (k = 0: 1/10 for both rates) through k = 3: rate 0.95 gives 2/11, 3/12, 4/13; rate 0.2 gives
    2/11 then 0.2 (3/12 capped). (mutants: the rate from k + 1; max for min; '9 + k'; the update from the 2nd step.)"""
    assert _fm_run(tmp_path, "--steps", "4", "--ema", "0.95,0.2", "--ckpt-every", "1", "--keep", "0") == 0
    run = str(tmp_path / "run")
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    from safetensors.torch import load_file
    w = {s: load_file(ckpt.paths(run, s)[0]) for s in (1, 2, 3, 4)}
    init = _build_init(cfg)
    names = [k.split("/", 1)[1] for k in w[1] if k.startswith("model/") and w[1][k].is_floating_point()]
    assert names and set(names) <= set(init)
    mus = {0.95: [1 / 10, 2 / 11, 3 / 12, 4 / 13], 0.2: [1 / 10, 2 / 11, 0.2, 0.2]}
    for rate, mu in mus.items():
        for n in names:
            ema = init[n].double()
            for k in range(4):
                ema = mu[k] * ema + (1 - mu[k]) * w[k + 1][f"model/{n}"].double()
                torch.testing.assert_close(w[k + 1][f"ema@{rate}/{n}"].double(), ema, rtol=1e-5, atol=1e-7,
                                           msg=f"{rate} {k} {n}")


def test_a_skipped_step_leaves_the_emas_as_they_were(tmp_path, monkeypatch):
    """A step whose loss is NaN is skipped: the online weights and every EMA stay as the previous step left them
    (mutant: the EMAs updated on a skipped step too, towards the same online weights)."""
    from cmfast.training import methods
    real = methods.ICT.loss

    def loss(self, models, x, step, *a, **k):
        value, info = real(self, models, x, step, *a, **k)
        return (value * float("nan") if step == 1 else value), info
    monkeypatch.setattr(methods.ICT, "loss", loss)
    assert _fm_run(tmp_path, "--steps", "2", "--ema", "0.9", "--ckpt-every", "1", "--keep", "0") == 0
    from safetensors.torch import load_file
    w1, w2 = (load_file(ckpt.paths(str(tmp_path / "run"), s)[0]) for s in (1, 2))
    assert not torch.equal(w1["model/net.out_conv.weight"], w1["ema@0.9/net.out_conv.weight"])
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


# ---- DDP helpers on 2 gloo processes (no torchrun) -------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_helpers(rank, port, out):
    """One rank: setup_distributed, _agree_on_startup, _rank0_wrote and _plan_length's agreement; writes what it saw."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    seen = {}

    def outcome(fn):
        try:
            fn()
            return None
        except Exception as e:          # noqa: BLE001 - recorded, compared by the test
            return [type(e).__name__, str(e)]
    seen["before"] = L.created_process_group()
    seen["setup"] = [*L.setup_distributed("cpu")[:2], str(L.setup_distributed("cpu")[2])]   # the 2nd: no new group
    seen["created"], seen["count"], seen["backend"] = L.created_process_group(), L._GROUP["count"], dist.get_backend()
    st = {"world": 2, "agreed": False}
    seen["agree_none"] = outcome(lambda: L._agree_on_startup(st)), st["agreed"]
    err = ValueError("cannot read the data\nsecond line") if rank == 1 else None
    seen["agree_rank1"] = outcome(lambda: L._agree_on_startup({"world": 2, "agreed": False}, err))
    err = OSError() if rank == 1 else None
    seen["agree_empty"] = outcome(lambda: L._agree_on_startup({"world": 2, "agreed": False}, err))
    err = ValueError(f"error of rank {rank}")
    seen["agree_both"] = outcome(lambda: L._agree_on_startup({"world": 2, "agreed": False}, err))
    log = L.Log(None, defer=True)
    seen["wrote_none"] = outcome(lambda: L._rank0_wrote(None, 2, log))
    seen["wrote_rank0"] = outcome(lambda: L._rank0_wrote(OSError(28, "disk full") if rank == 0 else None, 2, log))
    seen["wrote_rank1"] = outcome(lambda: L._rank0_wrote(OSError("rank 1's") if rank == 1 else None, 2, log))
    if rank == 0:
        log.fail(OSError("a line of log.txt"))
    seen["wrote_log"] = outcome(lambda: L._rank0_wrote(None, 2, log))
    cfg = {"time_budget": 2.0, "batch_size": 4}
    L._plan_length(cfg, 10, [0.25, 0.5][rank], [12.0, 10.0][rank], 2, torch.device("cpu"), lambda m: None)
    seen["plan"] = cfg["planned"]
    dist.destroy_process_group()
    L.setup_distributed("cpu")          # a second group: its keys under a prefix of its own
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    seen["again"] = [L._GROUP["count"], t.item()]
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


def _spawn(fn, *args, timeout=240, nprocs=2):
    """fn(rank, *args) in `nprocs` spawned processes. `timeout` only catches a hang: a run took 6-10 s on the loaded
    2-core machine (each rank imports torch and this module), and 60 s was only 6x that."""
    import torch.multiprocessing as mp
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    import time
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise AssertionError(f"the {nprocs} ranks did not end in {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.mark.slow
def test_ddp_helpers_agree_across_two_gloo_ranks(tmp_path):
    """Two gloo ranks: setup_distributed makes one group (gloo, rank, world 2) and none while one exists; the
    start-up agreement raises another rank's first line on a rank that passed ('rank 1: ...'; a message-less error
    by its type; the lowest failing rank) and nothing on a failing rank (train re-raises its own); rank 0's failed
    write or deferred log line is raised on both ranks, rank 1's on rank 1 alone; the time-budget plan is the slowest
    rank's; a second group after destroy works under the next prefix. (mutants: each broadcast / gather / all-reduce
    dropped; src=1; the error raised on its own rank; created never set; the prefix count not advanced.)"""
    _spawn(_ddp_helpers, _free_port(), str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for rank, seen in ((0, r0), (1, r1)):
        assert seen["before"] is False and seen["setup"] == [rank, 2, "cpu"]
        assert (seen["created"], seen["count"], seen["backend"]) == (True, 1, "gloo")
        assert seen["agree_none"] == [None, True] and seen["agree_both"] is None
        assert seen["wrote_none"] is None
        assert seen["wrote_rank0"] == ["OSError", "[Errno 28] disk full"]
        assert seen["wrote_log"] == ["OSError", "a line of log.txt"]
        assert seen["plan"] == {"total_steps": 10 + int(0.95 * (120 - 12.0) / 0.5), "at_step": 10,
                                "ms_per_step": 500.0, "elapsed_s": 12.0, "time_budget_min": 2.0}
        assert seen["again"] == [2, 3.0]
    assert r0["agree_rank1"] == ["ValueError", "rank 1: cannot read the data"] and r1["agree_rank1"] is None
    assert r0["agree_empty"] == ["ValueError", "rank 1: OSError"] and r1["agree_empty"] is None
    assert r0["wrote_rank1"] is None and r1["wrote_rank1"] == ["OSError", "rank 1's"]
    assert r0["plan"]["total_steps"] == 215


def test_no_grid_is_written_after_the_steps_stats_row_failed(tmp_path, monkeypatch):
    """A stats row that cannot be written (a full disk) ends the run with its error before that step's grid: no grid
    after a failed write (mutant: rank 0 writing the grid whatever failed before it)."""
    from train_fixtures import write_fmnist
    write_fmnist(tmp_path / "fm", n=8)
    real_open = open

    def full(path, *a, **k):
        if str(path).endswith("stats.jsonl"):
            raise OSError(28, "No space left on device")
        return real_open(path, *a, **k)
    monkeypatch.setattr(L, "open", full, raising=False)
    with pytest.raises(OSError, match=r"No space left on device"):
        L.train({"dataset": "fashion-mnist", "data_dir": str(tmp_path / "fm"), "method": "ict", "preset": "tiny",
                 "loss": "l2", "batch_size": 4, "total_steps": 2, "log_every": 1, "sample_every": 1, "sample_num": 1,
                 "ema": (0.9,), "ckpt_every": 1, "device": "cpu", "output_dir": str(tmp_path / "run")})
    assert not (tmp_path / "run" / "samples").exists() and (tmp_path / "run" / "config.json").exists()


def _agree3(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="3", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="3")
    torch.set_num_threads(1)
    L.setup_distributed("cpu")
    try:
        L._agree_on_startup({"world": 3, "agreed": False}, ValueError(f"bad on rank {rank}") if rank else None)
        seen = None
    except ValueError as e:
        seen = str(e)
    torch.distributed.destroy_process_group()
    with open(os.path.join(out, f"agree{rank}.json"), "w") as f:
        json.dump(seen, f)


@pytest.mark.slow
def test_the_start_up_agreement_names_the_lowest_failing_rank(tmp_path):
    """3 gloo ranks, ranks 1 and 2 failing: rank 0 raises rank 1's line, the failing ranks raise nothing here (train
    re-raises their own) (mutant: the last failing rank named)."""
    _spawn(_agree3, _free_port(), str(tmp_path), nprocs=3)
    assert [json.loads((tmp_path / f"agree{r}.json").read_text()) for r in range(3)] == \
        ["rank 1: bad on rank 1", None, None]


def _ddp_train(rank, port, root):
    """One rank of a 2-rank run of train() (gloo); ends without the interpreter's shutdown (loop._GROUP)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", CMFAST_OFFLINE="1")
    torch.set_num_threads(1)
    L.train({"dataset": "fashion-mnist", "data_dir": os.path.join(root, "fm"), "method": "ict", "preset": "tiny",
             "loss": "l2", "batch_size": 4, "total_steps": 2, "lr": 0.02, "lr_rampup_kimg": 0.006, "dropout": 0.1,
             "sample_every": 2, "sample_num": 3, "ema": (0.9, 0.01), "log_every": 1, "ckpt_every": 1, "keep": 0,
             "device": "cpu", "output_dir": os.path.join(root, "run")})
    open(os.path.join(root, f"done{rank}"), "w").close()
    os._exit(0)


@pytest.mark.slow
def test_two_gloo_ranks_ramp_the_global_batch_sample_the_first_ema_and_draw_their_own_dropout(tmp_path):
    """train() on 2 gloo ranks, 4 images a step (2 a rank), warm-up over 6 images: lr x 4/6 then lr (the global
    batch, not a rank's 2: 2/6, 4/6); one stats row a step, written by rank 0 alone; the grid of the last step is the
    first EMA's of its checkpoint; the checkpoint holds both ranks' RNG states, and the ranks' dropout streams differ
    (mutants: the ramp over a rank's images; every rank writing rows; the ranks' dropout seeded alike)."""
    from train_fixtures import write_fmnist
    write_fmnist(tmp_path / "fm", n=8)
    _spawn(_ddp_train, _free_port(), str(tmp_path))
    run = tmp_path / "run"
    assert (tmp_path / "done0").exists() and (tmp_path / "done1").exists()
    rows = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["lr"] for r in rows] == pytest.approx([0.02 * 4 / 6, 0.02], rel=1e-12)
    assert "2 rank(s) on cpu" in (run / "log.txt").read_text()
    with open(run / "config.json") as f:
        cfg = json.load(f)
    model = ckpt.load_model(ckpt.paths(str(run), 2)[0], which="ema@0.9")[0]
    assert np.array_equal(_png(run / "samples" / "00000002-1step.png"), _one_step_grid(model, cfg, 3))
    rngs = ckpt.load_state(ckpt.paths(str(run), 2)[1])["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
