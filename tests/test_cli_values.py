"""cmfast-train's counting flags, end to end (tiny preset, CPU): which steps log a stats row, write a checkpoint and a
sample grid, what --keep keeps, and the kimg each row reports. Mutation tests found each of these unchecked (every
other test logs every step, or checks only the last checkpoint)."""
import json
import os

import pytest
import torch

from cmfast import data
from cmfast.cli.train import main as train_main
from train_fixtures import write_fmnist


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path, one_thread):
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "no-system-dir"))


def test_every_flags_count_steps_from_one_and_end_at_the_last(tmp_path, capsys):
    """--log-every / --ckpt-every / --sample-every 2 over 5 steps: rows, checkpoints and grids at steps 2, 4 and the
    last, 5; --keep 2 leaves 4 and 5; kimg = step x batch / 1000."""
    write_fmnist(tmp_path / "fm", n=8)
    out = tmp_path / "run"
    assert train_main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm"), "--method", "ict", "--preset",
                       "tiny", "--loss", "l2", "--batch-size", "4", "--steps", "5", "--log-every", "2", "--ckpt-every",
                       "2", "--sample-every", "2", "--sample-num", "1", "--keep", "2", "--ema", "0.9",
                       "--output-dir", str(out)]) == 0
    with open(out / "stats.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [2, 4, 5]
    assert [r["kimg"] for r in rows] == [0.008, 0.016, 0.02]
    assert sorted(p.name for p in out.glob("ckpt-*")) == [f"ckpt-0000000{s}.{e}" for s in (4, 5)
                                                          for e in ("safetensors", "state.pt")]
    assert sorted(os.listdir(out / "samples")) == [f"0000000{s}-{n}step.png" for s in (2, 4, 5) for n in (1, 2)]
    log = capsys.readouterr().out
    assert [line.split()[1] for line in log.splitlines() if line.startswith("step ")] == ["2", "4", "5"]


def _fm_run(tmp_path, out, *extra):
    if not (tmp_path / "fm").exists():
        write_fmnist(tmp_path / "fm", n=8)
    return train_main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm"), "--method", "ict", "--preset",
                       "tiny", "--loss", "l2", "--batch-size", "4", "--sample-num", "0", "--log-every", "1",
                       "--output-dir", str(tmp_path / out), *extra])


def test_grad_clip_bounds_the_first_adam_step(tmp_path):
    """--grad-clip 1e-12 scales the gradient far below Adam's eps (1e-8): the first step moves no weight by more than
    lr x 1e-4; without clipping (0) Adam's first step moves each weight with a gradient by about lr. The start is read
    back from the EMA: after step 0 it is 0.1 start + 0.9 online (warm-up rate 1/10 < 0.5), so online - start =
    10 (online - ema)."""
    from safetensors.torch import load_file
    moved = {}
    for clip in ("1e-12", "0"):
        assert _fm_run(tmp_path, f"c{clip}", "--steps", "1", "--optimizer", "adam", "--lr", "1e-3", "--ema", "0.5",
                       "--grad-clip", clip) == 0
        w = load_file(str(tmp_path / f"c{clip}" / "ckpt-00000001.safetensors"))
        moved[clip] = max(10 * (w[k] - w["ema@0.5/" + k.split("/", 1)[1]]).abs().max().item()
                          for k in w if k.startswith("model/net."))
    assert moved["1e-12"] < 2e-6 and 0.5e-3 < moved["0"] < 1.5e-3, moved


def _record_loss_calls(monkeypatch, method="ict"):
    """Wraps the method's loss: each call's (step, chunk size, generator seed, autocast dtype or None)."""
    from cmfast.training.methods import METHODS
    m, calls = METHODS[method], []
    real = m.loss

    def loss(models, x, step, cfg, generator, class_labels=None):
        calls.append((step, x.shape[0], generator.initial_seed(),
                      torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        return real(models, x, step, cfg, generator, class_labels)
    monkeypatch.setattr(m, "loss", loss)
    return calls


def test_precision_and_chunk_noise_seeds(tmp_path, monkeypatch):
    """--precision picks the autocast dtype of the loss (bf16: bfloat16, fp16: float16, fp32: none), and each chunk of
    --batch-gpu draws its noise from chunk_seed(seed, step, chunk): distinct for every step and chunk (the
    determinism of resume and of N ranks = 1 process x N rounds rests on it)."""
    from cmfast.training.loop import chunk_seed
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None)):
        calls = _record_loss_calls(monkeypatch)
        steps = "2" if precision == "fp32" else "1"
        assert _fm_run(tmp_path, precision, "--steps", steps, "--precision", precision, "--batch-gpu", "2",
                       "--seed", "7") == 0
        assert [c[3] for c in calls] == [dtype] * len(calls), precision
    assert [(c[0], c[1], c[2]) for c in calls] == [(s, 2, chunk_seed(7, s, r)) for s in (0, 1) for r in (0, 1)]


def test_command_defaults_are_the_documented_values():
    """The defaults the --help texts and README give (a changed default changes every unflagged run)."""
    from cmfast.cli import edit, sample
    from cmfast.cli import eval as eval_cli
    s = vars(sample.build_parser().parse_args(["--checkpoint", "c"]))
    assert {k: s[k] for k in ("num", "steps", "sigmas", "seed", "class_label", "batch_size", "engine", "dtype")} == \
        dict(num=64, steps=None, sigmas=None, seed=0, class_label=None, batch_size=256, engine="auto", dtype="fp32")
    e = vars(eval_cli.build_parser().parse_args(["--checkpoint", "c", "--metric", "fid"]))
    # --num: None here, 50000 for a model (main; test_sampling checks what evaluate gets), all the images for --samples
    assert {k: e[k] for k in ("steps", "search_iters", "num", "seed", "batch_size", "dataset", "is_splits",
                              "precision_recall", "ref_stats")} == \
        dict(steps=None, search_iters=6, num=None, seed=0, batch_size=256, dataset=None, is_splits=10,
             precision_recall=None, ref_stats=None)
    d = vars(edit.build_parser().parse_args(["denoise", "--checkpoint", "c", "--out", "o"]))
    assert {k: d[k] for k in ("steps", "sigma_start", "sigma", "pairs", "alphas", "seed", "batch_size",
                              "grid_scale")} == \
        dict(steps=None, sigma_start=2.0, sigma=0.5, pairs=4, alphas=9, seed=0, batch_size=64, grid_scale=1)


def test_rng_state_round_trips_every_generator():
    """checkpoint.rng_state / set_rng_state restore torch's, numpy's and Python's global generators (a method or
    data hook drawing from any of them resumes exactly); none was checked but torch's."""
    import random

    import numpy as np
    from cmfast.training import checkpoint as ckpt

    def draw():
        return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(),
                [random.random() for _ in range(3)])
    np.random.randn()       # numpy's cached second Gaussian is part of its state
    state = ckpt.rng_state()
    first = draw()
    assert draw() != first
    ckpt.set_rng_state(state)
    assert draw() == first


def test_ema_rates_are_below_one(capsys):
    """--ema takes rates in [0, 1): 1 would never move the EMA from the start weights (1.5 was the only case tested)."""
    for bad in ("1", "0.9,1.0"):
        with pytest.raises(SystemExit) as e:
            train_main(["--ema", bad, "--dry-run"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"expected EMA rates in [0, 1), got {bad}" in err, err
    assert train_main(["--dataset", "fashion-mnist", "--ema", "0,0.9999", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["ema"] == [0.0, 0.9999]


def test_sample_seed_picks_the_noise(tmp_path, capsys):
    """cmfast-sample --seed: the same seed gives the same images, another seed others (it was not checked that the
    flag reaches the sampler)."""
    import numpy as np
    from cmfast.cli.sample import main as sample_main
    assert _fm_run(tmp_path, "run", "--steps", "1") == 0
    got = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert sample_main(["--checkpoint", str(tmp_path / "run"), "--num", "2", "--seed", seed, "--device", "cpu",
                            "--npz", str(tmp_path / f"{name}.npz")]) == 0
        got[name] = np.load(tmp_path / f"{name}.npz")["arr_0"]
    assert np.array_equal(got["a"], got["b"]) and not np.array_equal(got["a"], got["c"])


def test_eval_passes_its_flags_to_evaluate(tmp_path, monkeypatch, capsys):
    """cmfast-eval's --seed, --num, --batch-size and --steps reach metrics.evaluate (the evaluation itself,
    recorded)."""
    assert _fm_run(tmp_path, "run", "--steps", "1") == 0
    from cmfast.cli.eval import main as eval_main
    seen = []
    monkeypatch.setattr("cmfast.metrics.evaluate", lambda model, metric, **k: seen.append((metric, k)) or
                        {"value": 1.0})
    assert eval_main(["--checkpoint", str(tmp_path / "run"), "--metric", "fd-fmnist", "--device", "cpu", "--seed",
                      "5", "--num", "7", "--batch-size", "3", "--steps", "2"]) == 0
    (metric, k), = seen
    assert (metric, k["seed"], k["num"], k["batch_size"], k["steps"], k["dataset"]) == \
        ("fd-fmnist", 5, 7, 3, 2, "fashion-mnist")


def test_steps_and_sigmas_must_agree_both_ways(capsys, tmp_path):
    """--steps N with --sigmas of another length is refused whether N is larger or smaller (fewer was not tested)."""
    from cmfast.cli.sample import main as sample_main
    for steps, sigmas in (("1", "80,0.821"), ("3", "80,0.821")):
        with pytest.raises(SystemExit) as e:
            sample_main(["--checkpoint", str(tmp_path), "--npz", str(tmp_path / "a.npz"), "--steps", steps,
                         "--sigmas", sigmas])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err == f"cmfast-sample: error: --steps {steps} but --sigmas has 2 values", err
