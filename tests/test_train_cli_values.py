"""cmfast-train's command line in values: the config --dry-run prints for given flags against numbers written out here
(the built-in defaults, the papers' runs), each option's accepted range at its edges, --method-arg's KEY=VALUE, and the
exit status and line of each kind of failure. In-process (main / the parser): no data, no network, no training."""
from __future__ import annotations

import json
import os

import pytest

from cmfast.cli import train as T
from cmfast.training import config as C


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)         # the default --output-dir runs/cmfast is made (or checked) here
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    for k in ("WORLD_SIZE", "RANK", "CMFAST_BACKEND", "CMFAST_DEBUG"):
        monkeypatch.delenv(k, raising=False)


def dry(capsys, *argv) -> dict:
    capsys.readouterr()
    assert T.main(["--dry-run", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def fails(capsys, argv, code=2) -> str:
    """The one stderr line of a refused command (exit `code`)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.rstrip("\n")


def test_no_process_group_means_no_os_exit():
    # training.loop imported and no group made: main returns its status as a plain function (no os._exit)
    import cmfast.training.loop  # noqa: F401
    assert T._created_group() is False


# ---- defaults --------------------------------------------------------------------------------------------------------

def test_defaults_of_a_bare_command(capsys):
    cfg = dry(capsys, "--dataset", "fashion-mnist")
    net = cfg.pop("net")
    assert cfg == {
        "dataset": "fashion-mnist", "data_dir": None, "xflip": False,          # flips: on for cifar10 only
        "cond": False, "method": "ict", "preset": "tiny", "dropout": None, "teacher": None, "init_from_teacher": True,
        "loss": "pseudo_huber",                                                  # iCT's own distance
        "method_args": {"s0": 10, "s1": 1280, "p_mean": -1.1, "p_std": 2.0,     # iCT paper Sec. 3.3 / 3.5
                        "c": None, "schedule_steps": None, "schedule_mult": 1.0},
        "batch_size": 32, "batch_gpu": 32,                                       # one rank: the whole batch
        "lr": 1e-3, "lr_rampup_kimg": 0.0, "optimizer": "radam", "betas": [0.9, 0.999],
        "total_steps": 1000, "kimg": 32.0,                                       # 1000 steps x 32 images
        "time_budget": None, "ema": [0.9999], "precision": "fp32", "grad_clip": 0.0, "seed": 0, "nan_limit": 20,
        "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0,                # EDM / CM paper
        "output_dir": "runs/cmfast", "resume": None, "stop_at": None, "time_limit": None,
        "sample_every": 1000, "sample_num": 64, "ckpt_every": 1000, "keep": 3, "log_every": 50,
        "backend": "auto", "device": None, "compile": "none", "cuda_graph": False, "config": None,
        "world_size": 1,
    }
    assert (net["in_channels"], net["img_resolution"]) == (1, 32) and "label_dim" not in net
    assert not os.path.exists("runs")           # checked, not made


def test_help_states_the_defaults_the_config_has():
    text = " ".join(T.build_parser().format_help().split())
    for phrase in ("global batch (default: 32)", "(default: 0.001)", "evaluation EMA rates, comma-separated; "
                   "each step's rate is min(rate, (1 + k) / (10 + k)), a warm-up for short runs (the CM reference code "
                   "keeps the rate fixed) (default: 0.9999)", "max grad norm, 0 = off (default: 0.0)", "(default: radam)",
                   "steps per stats.jsonl row (default: 50)", "checkpoints kept, 0 = all (default: 3)",
                   "images per grid, 0 = no grids (default: 64)", "(default: runs/cmfast)", "(default: 20)"):
        assert phrase in text, phrase


def test_xflip_defaults_to_off_for_an_image_folder():
    assert C.resolve({"dataset": "folder", "data_dir": "x"}, image_shape=(3, 8, 8))["xflip"] is False
    assert C.resolve({"dataset": "folder", "data_dir": "x", "xflip": True}, image_shape=(3, 8, 8))["xflip"] is True


def test_sampling_levels_only_for_the_methods_that_have_them(capsys):
    assert "sampling_sigmas" not in dry(capsys, "--dataset", "fashion-mnist", "--method", "ct", "--loss", "l2")
    sct = dry(capsys, "--dataset", "fashion-mnist", "--method", "sct")
    # sCM paper: two steps, the middle one at t = 1.1, sigma = sigma_data * tan(t) = 0.5 * tan(1.1)
    assert sct["sampling_sigmas"] == {"2": [80.0, pytest.approx(0.5 * 1.9647596572486523, rel=1e-12)]}


# ---- the papers' runs ------------------------------------------------------------------------------------------------

EDM_EMA = 0.5 ** (512 / 500_000)        # EDM Table 7, CIFAR-10: EMA half-life 0.5 Mimg at batch 512
PAPER = {   # name: (batch, lr, warm-up kimg, optimizer, steps, ema, precision, method_args it sets)
    "cd-cifar10": (512, 4e-4, 0.0, "radam", 800_000, [0.9999], "fp32", dict(num_scales=18, mu=0.0, solver="heun")),
    "ct-cifar10": (512, 2e-4, 0.0, "radam", 800_000, [0.9999], "fp32", dict(s0=2, s1=150, mu0=0.9)),
    "ict-cifar10": (1024, 1e-4, 0.0, "radam", 400_000, [0.99993], "fp32", dict(s0=10, s1=1280, p_mean=-1.1,
                                                                                p_std=2.0)),
    "cd-imagenet64": (2048, 8e-6, 0.0, "radam", 600_000, [0.999, 0.9999, 0.9999432189950708], "fp16",
                      dict(num_scales=40, mu=0.95, solver="heun")),
    "ct-imagenet64": (2048, 1e-4, 0.0, "radam", 800_000, [0.999, 0.9999, 0.9999432189950708], "fp16",
                      dict(s0=2, s1=200, mu0=0.95)),
    "cd-lsun256": (256, 1e-5, 0.0, "radam", 600_000, [0.9999, 0.99994, 0.9999432189950708], "fp16",
                   dict(num_scales=40, mu=0.95, solver="heun")),
    "ct-lsun256": (256, 5e-5, 0.0, "radam", 1_000_000, [0.9999, 0.99994, 0.9999432189950708], "fp16",
                   dict(s0=2, s1=150, mu0=0.95)),
    "edm-cifar10": (512, 1e-3, 10_000, "adam", 390_625, [0.99929], "fp32", dict(p_mean=-1.2, p_std=1.2)),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs(name):
    batch, lr, rampup, opt, steps, ema, precision, margs = PAPER[name]
    cfg = C.resolve({"config": name, "teacher": "t"})
    assert (cfg["batch_size"], cfg["lr"], cfg["lr_rampup_kimg"], cfg["optimizer"], cfg["total_steps"], cfg["ema"],
            cfg["precision"]) == (batch, lr, rampup, opt, steps, ema, precision)
    assert {k: cfg["method_args"][k] for k in margs} == margs
    assert cfg["kimg"] == steps * batch / 1000
    # random horizontal flips: the CIFAR-10 reference runs', and openai's load_data default (random_flip=True) for
    # ImageNet 64 and LSUN
    assert cfg["xflip"] is True
    if name == "edm-cifar10":       # 200 Mimg at batch 512: 390,625 steps exactly
        assert cfg["kimg"] == 200_000 and abs(cfg["ema"][0] - EDM_EMA) < 1e-6
    assert sorted(C.CONFIGS) == sorted(PAPER)


def test_time_budget_drops_a_presets_kimg_too():
    # edm-cifar10 gives its length in kimg (200,000): --time-budget replaces it with the stand-in K = 1000
    cfg = C.resolve({"config": "edm-cifar10", "time_budget": 5.0})
    assert (cfg["total_steps"], cfg["kimg"], cfg["time_budget"]) == (1000, 512.0, 5.0)
    assert C.resolve({"config": "edm-cifar10", "total_steps": 10})["kimg"] == 5.12


@pytest.mark.parametrize("kimg,batch,steps", [("16.12", 8, 2015), ("2.007", 1, 2007), ("16.121", 8, 2016),
                                              ("0.1", 6, 17), ("10", 32, 313), ("1e-3", 2, 1)])
def test_kimg_of_a_whole_number_of_steps_is_that_many_steps(capsys, kimg, batch, steps):
    # --kimg K: ceil(1000 K / batch) steps, in the decimals written: 16,120 images are 2015 steps of 8 (in floats
    # 16.12 * 1000 = 16120.000000000002, rounded up to 2016 steps, one too many)
    cfg = dry(capsys, "--dataset", "fashion-mnist", "--kimg", kimg, "--batch-size", str(batch))
    assert (cfg["total_steps"], cfg["kimg"]) == (steps, steps * batch / 1000)


# ---- flags into the config -------------------------------------------------------------------------------------------

def test_each_flag_reaches_the_config(capsys, tmp_path):
    cfg = dry(capsys, "--dataset", "cifar10", "--method", "ct", "--preset", "tiny", "--cond", "--no-xflip",
              "--loss", "l1", "--batch-size", "8", "--lr", "5e-4", "--lr-rampup-kimg", "2", "--optimizer", "adam",
              "--steps", "7", "--ema", "0.9999,0.999", "--dropout", "0.2", "--s0", "3", "--s1", "40", "--mu0", "0.5",
              "--method-arg", "weighting=\"uniform\"", "--grad-clip", "1.5", "--seed", "3", "--precision", "bf16",
              "--batch-gpu", "4", "--backend", "torch", "--compile", "--nan-limit", "5",
              "--output-dir", str(tmp_path / "o"), "--stop-at", "4", "--time-limit", "2.5", "--sample-every", "3",
              "--sample-num", "0", "--ckpt-every", "2", "--keep", "0", "--log-every", "1")
    want = dict(dataset="cifar10", method="ct", preset="tiny", cond=True, xflip=False, loss="l1", batch_size=8, lr=5e-4,
                lr_rampup_kimg=2.0, optimizer="adam", total_steps=7, kimg=0.056, dropout=0.2,
                ema=[0.9999, 0.999],        # in the order given: 'ema' (sampling, evaluation) is the first rate
                grad_clip=1.5, seed=3, precision="bf16", batch_gpu=4, backend="torch", compile="default", nan_limit=5,
                output_dir=str(tmp_path / "o"), stop_at=4, time_limit=2.5, sample_every=3, sample_num=0, ckpt_every=2,
                keep=0, log_every=1)
    assert {k: cfg[k] for k in want} == want
    assert cfg["method_args"] == {"s0": 3, "s1": 40, "mu0": 0.5, "weighting": "uniform",
                                  "match_reference_code": False, "schedule_steps": None, "schedule_mult": 1.0}
    assert (cfg["net"]["label_dim"], cfg["net"]["dropout"], cfg["net"]["in_channels"]) == (10, 0.2, 3)
    cd = dry(capsys, "--dataset", "fashion-mnist", "--method", "edm", "--kimg", "0.1", "--batch-size", "6")
    assert (cd["total_steps"], cd["kimg"]) == (17, 0.102)      # ceil(100 / 6) = 17 steps of 6


def test_named_hyperparameter_flags_and_method_arg(capsys):
    base = ["--config", "cd-imagenet64", "--teacher", "t.pkl"]      # the preset: N = 40, mu = 0.95
    a = dry(capsys, *base, "--num-scales", "12", "--mu", "0")["method_args"]
    assert (a["num_scales"], a["mu"]) == (12, 0.0)                 # an explicit 0 is a value, not "not given"
    # a named flag beats --method-arg of the same key; --method-arg values are JSON, else strings
    a = dry(capsys, *base, "--method-arg", "mu=0.5", "--mu", "0.25", "--method-arg", "solver=euler")["method_args"]
    assert (a["mu"], a["solver"]) == (0.25, "euler")
    a = dry(capsys, "--dataset", "fashion-mnist", "--method", "ict", "--method-arg", "c=0.03", "--method-arg",
            "schedule_steps=null", "--method-arg", "s1=640")["method_args"]
    assert (a["c"], a["schedule_steps"], a["s1"]) == (0.03, None, 640) and isinstance(a["s1"], int)
    assert dry(capsys, "--dataset", "fashion-mnist", "--method", "ct", "--loss", "l2", "--method-arg",
               "match_reference_code=true")["method_args"]["match_reference_code"] is True
    a = dry(capsys, "--dataset", "fashion-mnist", "--method", "sct", "--method-arg", "jvp=exact", "--method-arg",
            "time_input=edm")["method_args"]
    assert (a["jvp"], a["time_input"]) == ("exact", "edm")


def test_key_value_parsing():
    assert T._key_value("s1=40") == ("s1", 40)
    assert T._key_value("c=null") == ("c", None)
    assert T._key_value("jvp=exact") == ("jvp", "exact")
    assert T._key_value("a=b=c") == ("a", "b=c")            # the first '=' splits
    assert T._key_value("k=") == ("k", "")
    import argparse
    for bad in ("=5", "s1", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
            T._key_value(bad)


def test_ema_rates():
    assert T._rates("0,0.5") == (0.0, 0.5)
    assert T._rates("0.9999,0.999") == (0.9999, 0.999)
    import argparse
    for bad in ("1", "0.9,1", "1,0.9", "-0.1", "0.99,-0.5"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected EMA rates in \[0, 1\), got "):
            T._rates(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="expected comma-separated rates"):
        T._rates("0.9;0.99")


# each ranged option: (flag, lowest accepted, highest refused below it, range in the error), and upper bounds
RANGES = [
    ("--batch-size", "1", "0", "[1, inf]"), ("--lr", "1e-9", "0", "(0, inf]"),
    ("--lr-rampup-kimg", "0", "-1", "[0, inf]"), ("--steps", "1", "0", "[1, inf]"),
    ("--kimg", "0.001", "0", "(0, inf]"), ("--time-budget", "0.5", "0", "(0.0, inf]"),
    ("--dropout", "0", "-0.1", "[0, 1]"), ("--num-scales", "2", "1", "[2, inf]"), ("--mu", "0", "-0.5", "[0, 1]"),
    ("--s0", "1", "0", "[1, inf]"), ("--s1", "1", "0", "[1, inf]"), ("--mu0", "0", "-0.5", "[0, 1]"),
    ("--grad-clip", "0", "-1", "[0, inf]"), ("--seed", "0", "-1", "[0, inf]"), ("--batch-gpu", "1", "0", "[1, inf]"),
    ("--nan-limit", "1", "0", "[1, inf]"), ("--stop-at", "1", "0", "[1, inf]"),
    ("--time-limit", "0.5", "0", "(0.0, inf]"), ("--sample-every", "1", "0", "[1, inf]"),
    ("--sample-num", "0", "-1", "[0, inf]"), ("--ckpt-every", "1", "0", "[1, inf]"), ("--keep", "0", "-1", "[0, inf]"),
    ("--log-every", "1", "0", "[1, inf]"),
]
UPPER = [("--dropout", "1", "1.5", "[0, 1]"), ("--mu", "1", "1.5", "[0, 1]"), ("--mu0", "1", "1.5", "[0, 1]")]


@pytest.mark.parametrize("flag,ok,bad,rng", RANGES + UPPER)
def test_option_ranges_at_their_edges(capsys, flag, ok, bad, rng):
    p = T.build_parser()
    dest = {"--steps": "total_steps"}.get(flag, flag[2:].replace("-", "_"))
    assert getattr(p.parse_args([flag, ok]), dest) == (int(ok) if ok.isdigit() else float(ok))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        p.parse_args([f"{flag}={bad}"])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"cmfast-train: error: argument {flag}: expected a value in {rng}, got {bad}\n"


def test_flags_left_out_are_not_given():
    # None = not given, so that a --config preset's value stands (e.g. cd-imagenet64's cond, a preset's steps)
    args = vars(T.build_parser().parse_args([]))
    assert {k for k, v in args.items() if v is not None} == {"dry_run"} and args["dry_run"] is False
    assert vars(T.build_parser().parse_args(["--steps", "5"]))["total_steps"] == 5


# ---- --dry-run under torchrun ----------------------------------------------------------------------------------------

def test_dry_run_takes_the_world_size_from_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = dry(capsys, "--dataset", "fashion-mnist", "--batch-size", "8")
    assert (cfg["world_size"], cfg["batch_gpu"]) == (2, 4)
    assert fails(capsys, ["--dataset", "fashion-mnist", "--batch-size", "3", "--dry-run"]) == \
        "cmfast-train: error: --batch-size 3 is not divisible by the 2 ranks"
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert fails(capsys, ["--dataset", "fashion-mnist", "--batch-size", "8", "--batch-gpu", "4", "--dry-run"]) == \
        "cmfast-train: error: --batch-gpu 4 does not divide the per-rank batch 2"


# ---- failures: status and line ---------------------------------------------------------------------------------------

def test_a_user_mistake_is_found_before_the_run_starts(capsys, monkeypatch):
    # resolve's checks run before train(), which starts the process group under torchrun
    from cmfast.training import loop
    called = []
    monkeypatch.setattr(loop, "setup_distributed", lambda *a: called.append(a) or pytest.fail("run started"))
    assert fails(capsys, ["--dataset", "fashion-mnist", "--method", "cd"]) == \
        "cmfast-train: error: --method cd needs --teacher PATH (a checkpoint trained with --method edm)"
    assert fails(capsys, ["--dataset", "fashion-mnist", "--method", "cd", "--teacher", ""]).endswith(
        "--method cd needs --teacher PATH (a checkpoint trained with --method edm)")
    assert called == []


@pytest.mark.parametrize("exc,code,line", [
    ("TrainingError", 1, "cmfast-train: error: 20 non-finite losses in a row"),
    ("ValueError", 2, "cmfast-train: error: first line"),
    ("OSError", 2, "cmfast-train: error: first line"),
    ("ImportError", 2, "cmfast-train: error: first line"),
    ("DataError", 2, "cmfast-train: error: first line"),
    ("CheckpointError", 2, "cmfast-train: error: first line"),
])
def test_errors_from_the_run_are_one_line(capsys, monkeypatch, exc, code, line):
    from cmfast import data
    from cmfast.training import checkpoint, loop
    kind = {"TrainingError": loop.TrainingError, "DataError": data.DataError, "ValueError": ValueError,
            "CheckpointError": checkpoint.CheckpointError, "OSError": OSError, "ImportError": ImportError}[exc]
    text = "20 non-finite losses in a row" if exc == "TrainingError" else "first line\nsecond line"

    def train(args):
        raise kind(text)
    monkeypatch.setattr(loop, "train", train)
    assert fails(capsys, ["--dataset", "fashion-mnist"], code=code) == line
    if exc != "TrainingError":          # CMFAST_DEBUG=1: the traceback instead
        monkeypatch.setenv("CMFAST_DEBUG", "1")
        with pytest.raises(kind):
            T.main(["--dataset", "fashion-mnist"])


def test_a_rank_that_made_a_process_group_ends_with_os_exit(monkeypatch, capsys):
    # its status: main's return value, a fail()'s code, 1 for a SystemExit with a message
    ended = []

    class Ended(Exception):
        pass

    def _exit(code):
        ended.append(code)
        raise Ended
    monkeypatch.setattr(T.os, "_exit", _exit)
    monkeypatch.setattr(T, "_created_group", lambda: True)
    for how, want in ((lambda argv: 0, 0), (lambda argv: T.fail("x", code=3), 3),
                      (lambda argv: T.sys.exit("a message"), 1), (lambda argv: T.fail("y"), 2)):
        monkeypatch.setattr(T, "_main", how)
        with pytest.raises(Ended):
            T.main([])
        assert ended[-1] == want
    monkeypatch.setattr(T, "_created_group", lambda: False)      # no group: SystemExit as it is, a return as it is
    monkeypatch.setattr(T, "_main", lambda argv: T.fail("z", code=3))
    with pytest.raises(SystemExit) as e:
        T.main([])
    assert e.value.code == 3
    monkeypatch.setattr(T, "_main", lambda argv: 5)
    assert T.main([]) == 5 and ended == [0, 3, 1, 2]


def test_dry_run_prints_the_config_json_the_run_writes_byte_for_byte(capsys, tmp_path, monkeypatch, one_thread):
    from cmfast import data
    from train_fixtures import write_fmnist
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "no-system-dir"))
    write_fmnist(tmp_path / "fm", n=4)
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm"), "--preset", "tiny", "--batch-size", "2",
            "--steps", "1", "--sample-num", "0", "--loss", "l2", "--output-dir", str(tmp_path / "run")]
    capsys.readouterr()
    assert T.main(argv + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert T.main(argv) == 0
    assert printed == (tmp_path / "run" / "config.json").read_text() + "\n"


def test_net_arg_sets_network_arguments_over_the_preset_and_the_config(capsys):
    """--net-arg KEY=VALUE: a cmfast.UNet argument over the preset's and a --config's (values as JSON: numbers,
    lists), checked where the net is built; the data's own (channels, resolution, classes) and unknown names are
    refused in one line."""
    cfg = dry(capsys, "--dataset", "fashion-mnist", "--preset", "ncsnpp-cifar10", "--net-arg", "fourier_scale=0.5",
              "--net-arg", "channel_mult=[1,2]")
    assert (cfg["net"]["fourier_scale"], cfg["net"]["channel_mult"], cfg["net"]["in_channels"]) == (0.5, [1, 2], 1)
    assert "net_args" not in cfg                          # the network's config holds them
    ict = dry(capsys, "--config", "ict-cifar10", "--net-arg", "fourier_scale=1.5", "--net-arg", "dropout=0.2")
    assert (ict["net"]["fourier_scale"], ict["net"]["dropout"]) == (1.5, 0.2)      # over iCT's 0.02 and 0.3
    base = ["--dataset", "fashion-mnist", "--dry-run", "--net-arg"]
    assert fails(capsys, base + ["foo=1"]).startswith("cmfast-train: error: --net-arg foo: not an argument of "
                                                      "cmfast.UNet; it has adaptive_scale, arch,")
    assert fails(capsys, base + ["img_resolution=64"]) == \
        "cmfast-train: error: --net-arg img_resolution: set by the data (its channels, resolution and, with --cond, " \
        "classes)"
    assert fails(capsys, ["--preset", "ncsnpp-cifar10"] + base + ["fourier_scale=-1"]) == \
        "cmfast-train: error: fourier_scale: expected a positive number, got -1"
