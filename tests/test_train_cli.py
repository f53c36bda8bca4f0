"""cmfast-train's user mistakes: each is one line `cmfast-train: error: ...`, exit 2, nothing written or lost.
And --dry-run with the paper configs."""
import json
import os

import pytest
import torch

from cmfast import data
from cmfast.cli.sample import main as sample_main
from cmfast.cli.train import main as train_main
from train_fixtures import teacher_run as _teacher, write_cifar_folder, write_fmnist

TINY = ["--preset", "tiny", "--batch-size", "4", "--sample-num", "0", "--steps", "1", "--loss", "l2"]


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path, one_thread):
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "no-system-dir"))
    monkeypatch.setattr(data, "_fetch", lambda *a, **k: pytest.fail("a test tried to download"))


def fails(capsys, argv, match, main=train_main, prog="cmfast-train"):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert err.startswith(f"{prog}: error: ") and "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    return err


def tree(path):
    return sorted((os.path.relpath(os.path.join(r, f), path), os.path.getsize(os.path.join(r, f)))
                  for r, _, fs in os.walk(path) for f in fs) if os.path.exists(path) else None


@pytest.fixture
def fm(tmp_path):
    write_fmnist(tmp_path / "fm", n=8)
    return str(tmp_path / "fm")


def test_argument_errors(capsys, tmp_path, fm):
    out = str(tmp_path / "out")
    fails(capsys, ["--dataset", "imagenet"], "invalid choice: 'imagenet'")
    fails(capsys, ["--method", "gan"], "invalid choice: 'gan'")
    fails(capsys, ["--batch-size", "0"], "expected a value in [1, inf], got 0")
    fails(capsys, ["--lr", "-1"], "expected a value in (0, inf]")
    fails(capsys, ["--ema", "1.5"], "expected EMA rates in [0, 1)")
    fails(capsys, ["--steps", "3", "--kimg", "1"], "not allowed with argument")
    fails(capsys, ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "ict", "--method-arg", "nope=1",
                   "--output-dir", out], "has no hyperparameter nope")
    fails(capsys, ["--dataset", "cifar10", "--method", "cd", "--output-dir", out], "needs --teacher PATH")
    if not torch.cuda.is_available():
        fails(capsys, ["--dataset", "fashion-mnist", "--data-dir", fm, "--backend", "cuda", "--output-dir", out],
              "backend cuda (--backend, else CMFAST_BACKEND): backend 'cuda' cannot run on cpu")
    assert tree(out) is None


def test_backend_from_the_environment(capsys, monkeypatch, tmp_path, fm):
    # Without --backend, CMFAST_BACKEND chooses, as in the other commands and the library (DESIGN 2); the config's
    # default 'auto' overrode it, so CMFAST_BACKEND=triton trained on torch without a word.
    monkeypatch.setenv("CMFAST_BACKEND", "torch")
    assert train_main(["--dataset", "fashion-mnist", "--data-dir", fm, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "torch"
    assert train_main(["--dataset", "fashion-mnist", "--data-dir", fm, "--backend", "auto", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "auto"           # the flag beats the environment
    out = str(tmp_path / "out")
    monkeypatch.setenv("CMFAST_BACKEND", "nope")
    fails(capsys, ["--dataset", "fashion-mnist", "--data-dir", fm, "--output-dir", out],
          "CMFAST_BACKEND: unknown backend 'nope'")
    if not torch.cuda.is_available():
        monkeypatch.setenv("CMFAST_BACKEND", "cuda")
        fails(capsys, ["--dataset", "fashion-mnist", "--data-dir", fm, "--output-dir", out],
              "backend cuda (--backend, else CMFAST_BACKEND): backend 'cuda' cannot run on cpu")
    assert tree(out) is None


def test_xflip_flag(capsys, monkeypatch, tmp_path, fm):
    # --xflip / --no-xflip: flips were on for CIFAR-10 only, and a folder or Fashion-MNIST run could not turn them on.
    assert train_main(["--dataset", "cifar10", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["xflip"] is True
    assert train_main(["--dataset", "cifar10", "--no-xflip", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["xflip"] is False
    from cmfast.training import loop
    seen = []

    def load(*a):
        ds = data.load_dataset(*a)
        seen.append(ds.xflip)
        return ds
    monkeypatch.setattr(loop, "load_dataset", load)
    for i, flag in enumerate(([], ["--xflip"])):
        assert train_main(["--dataset", "fashion-mnist", "--data-dir", fm, "--output-dir", str(tmp_path / f"o{i}"),
                           *TINY, *flag]) == 0
    assert seen == [False, True]        # the dataset the run trains on mirrors its images


def test_batch_not_divisible_by_ranks(capsys, monkeypatch, tmp_path, fm):
    monkeypatch.setenv("WORLD_SIZE", "2")       # as torchrun sets it; checked before any process group starts
    out = str(tmp_path / "out")
    fails(capsys, ["--dataset", "fashion-mnist", "--data-dir", fm, "--batch-size", "3", "--output-dir", out],
          "--batch-size 3 is not divisible by the 2 ranks")
    fails(capsys, ["--dataset", "fashion-mnist", "--data-dir", fm, "--batch-size", "8", "--batch-gpu", "3",
                   "--output-dir", out], "--batch-gpu 3 does not divide the per-rank batch 4")
    assert tree(out) is None


def test_dataset_errors(capsys, tmp_path):
    out = str(tmp_path / "out")
    fails(capsys, ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "empty"), "--output-dir", out, *TINY],
          "Fashion-MNIST train not found: install the Debian package dataset-fashion-mnist or put")
    fails(capsys, ["--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"), "--output-dir", out, *TINY],
          "CIFAR-10 not found: put cifar-10-python.tar.gz")
    write_cifar_folder(tmp_path / "c", n_per_batch=2)
    os.remove(tmp_path / "c" / "cifar-10-batches-py" / "data_batch_5")
    fails(capsys, ["--dataset", "cifar10", "--data-dir", str(tmp_path / "c"), "--output-dir", out, *TINY],
          "data_batch_5 is missing")
    write_fmnist(tmp_path / "bad", n=4)
    (tmp_path / "bad" / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    fails(capsys, ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "bad"), "--output-dir", out, *TINY],
          "train-labels-idx1-ubyte.gz: unreadable")
    fails(capsys, ["--dataset", "folder", "--data-dir", str(tmp_path / "nothing"), "--output-dir", out, *TINY],
          "image folder or zip not found")
    assert tree(out) is None


def test_checkpoint_errors(capsys, tmp_path, fm):
    base = ["--dataset", "fashion-mnist", "--data-dir", fm, *TINY]
    out = str(tmp_path / "run")
    fails(capsys, [*base, "--method", "ict", "--output-dir", out, "--resume", "latest"],
          f"--resume latest: no checkpoint (ckpt-*.safetensors with its .state.pt) in {out}")
    fails(capsys, [*base, "--method", "ict", "--output-dir", out, "--resume", str(tmp_path / "x.safetensors")],
          "checkpoint not found")
    assert tree(out) is None
    assert train_main([*base, "--method", "ict", "--output-dir", out]) == 0
    before = tree(out)
    fails(capsys, [*base, "--method", "ict", "--output-dir", out], "already holds checkpoints: pass --resume latest")
    # A consistency model is not a teacher; nor is an EDM model of other images (1 vs 3 channels).
    fails(capsys, [*base, "--method", "cd", "--teacher", out, "--output-dir", str(tmp_path / "cd")],
          "expected an EDM denoiser (--method edm) for (1, 32, 32) images, got --method ict")
    edm = str(tmp_path / "edm")
    assert train_main([*base, "--method", "edm", "--output-dir", edm]) == 0
    write_cifar_folder(tmp_path / "c", n_per_batch=2)
    fails(capsys, ["--dataset", "cifar10", "--data-dir", str(tmp_path / "c"), *TINY, "--method", "cd",
                   "--teacher", edm, "--output-dir", str(tmp_path / "cd")],
          "for (3, 32, 32) images, got --method edm for (1, 32, 32) images")
    fails(capsys, [*base, "--method", "cd", "--teacher", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "cd")],
          "--teacher: checkpoint not found")
    # Resuming with another architecture is refused.
    fails(capsys, [*base, "--method", "ict", "--output-dir", out, "--resume", "latest", "--dropout", "0.5"],
          "differs from this command in net")
    assert tree(out) == before and tree(str(tmp_path / "cd")) is None
    fails(capsys, ["--checkpoint", str(tmp_path / "empty"), "--grid", "x.png"], "checkpoint not found",
          main=sample_main, prog="cmfast-sample")
    fails(capsys, ["--pretrained", "nope", "--grid", "x.png"], "no shipped model 'nope'; available:",
          main=sample_main, prog="cmfast-sample")
    # Sampling engines: the graphed one needs CUDA, reduced precision the graphed one; an EDM teacher has no sigmas.
    grid = str(tmp_path / "g.png")
    for argv, msg in ((["--checkpoint", out, "--engine", "graphed"], "engine 'graphed' needs the model on a CUDA"),
                      (["--checkpoint", out, "--dtype", "bf16"], "dtype bfloat16: the eager engine samples in float32"),
                      (["--checkpoint", edm, "--sigmas", "80,0.821"],
                       "--sigmas: an EDM teacher samples with its Heun")):
        fails(capsys, [*argv, "--grid", grid, "--device", "cpu"], msg, main=sample_main, prog="cmfast-sample")
    assert not os.path.exists(grid)


def test_unwritable_output_dir(capsys, tmp_path, fm):
    base = ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "ict", *TINY]
    (tmp_path / "file").write_text("x")
    fails(capsys, [*base, "--output-dir", str(tmp_path / "file" / "run")], "is not writable")
    if os.geteuid() != 0:               # root ignores permission bits; /proc refuses new folders even for root
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        fails(capsys, [*base, "--output-dir", str(ro)], "is not writable")
    fails(capsys, [*base, "--output-dir", "/proc/cmfast-test-run"], "is not writable")


def test_a_log_line_that_cannot_be_written_is_one_line(capsys, tmp_path, fm, monkeypatch):
    # One process: a line of log.txt rank 0 cannot write (a full disk) ends the run at once, in one line naming the
    # file (it was '[Errno 28] No space left on device: ...'); the checkpoint written before it stays whole.
    import errno
    from cmfast.training import checkpoint, loop
    out = tmp_path / "run"

    def opener(file, *a, **k):
        if str(file).endswith("log.txt") and (out / "ckpt-00000001.state.pt").exists():
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return open(file, *a, **k)
    monkeypatch.setattr(loop, "open", opener, raising=False)
    fails(capsys, ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "ict", *TINY, "--steps", "3",
                   "--ckpt-every", "1", "--log-every", "100", "--output-dir", str(out)],
          f"cannot write {out / 'log.txt'} (No space left on device); the checkpoints written before it are kept: "
          "--resume latest continues from them")
    assert [c[0] for c in checkpoint.list_checkpoints(str(out))] == [1]
    checkpoint.load_weights(str(out / "ckpt-00000001.safetensors"))


def test_dry_run_paper_configs(capsys, tmp_path):
    assert train_main(["--config", "ct-cifar10", "--dry-run"]) == 0
    ct = json.loads(capsys.readouterr().out)
    assert (ct["method"], ct["loss"], ct["batch_size"], ct["lr"], ct["optimizer"], ct["total_steps"]) == \
        ("ct", "lpips", 512, 2e-4, "radam", 800_000)
    assert ct["method_args"]["s0"] == 2 and ct["method_args"]["s1"] == 150 and ct["method_args"]["mu0"] == 0.9
    assert ct["net"]["embedding_type"] == "fourier" and ct["net"]["in_channels"] == 3
    assert ct["net"]["dropout"] == 0.0 and ct["lr_rampup_kimg"] == 0.0     # reference runs: no dropout, no warm-up
    fails(capsys, ["--config", "cd-cifar10", "--teacher", "t", "--dry-run"], "--teacher: checkpoint not found: t")
    teacher = _teacher(tmp_path / "t", (3, 32, 32))
    assert train_main(["--config", "cd-cifar10", "--teacher", teacher, "--dry-run", "--batch-size", "256"]) == 0
    cd = json.loads(capsys.readouterr().out)
    a = cd["method_args"]
    assert (a["num_scales"], a["mu"], cd["batch_size"], cd["lr"], cd["optimizer"]) == (18, 0.0, 256, 4e-4, "radam")
    assert train_main(["--config", "ict-cifar10", "--dry-run"]) == 0
    ict = json.loads(capsys.readouterr().out)
    assert (ict["loss"], ict["net"]["dropout"], ict["method_args"]["s1"], ict["ema"]) == ("pseudo_huber", 0.3, 1280,
                                                                                           [0.99993])
    assert ict["net"]["fourier_scale"] == 0.02          # iCT Sec. 3.1
    assert train_main(["--config", "cd-imagenet64", "--teacher", "edm-imagenet-64x64-cond-adm.pkl", "--dry-run"]) == 0
    cd = json.loads(capsys.readouterr().out)
    assert (cd["dataset"], cd["cond"], cd["preset"], cd["loss"], cd["batch_size"], cd["lr"], cd["total_steps"],
            cd["precision"], cd["method_args"]["num_scales"], cd["method_args"]["mu"]) == \
        ("folder", True, "adm-imagenet64", "lpips", 2048, 8e-6, 600_000, "fp16", 40, 0.95)
    assert train_main(["--config", "ct-imagenet64", "--dry-run"]) == 0
    ct = json.loads(capsys.readouterr().out)
    assert (ct["method_args"]["s1"], ct["method_args"]["mu0"], ct["lr"], ct["ema"][2]) == (200, 0.95, 1e-4,
                                                                                          0.9999432189950708)
    assert train_main(["--config", "ct-lsun256", "--dry-run"]) == 0
    ct = json.loads(capsys.readouterr().out)
    assert (ct["preset"], ct["cond"], ct["batch_size"], ct["lr"], ct["total_steps"], ct["method_args"]["s1"]) == \
        ("adm-lsun256", False, 256, 5e-5, 1_000_000, 150)
    assert train_main(["--dataset", "fashion-mnist", "--kimg", "10", "--batch-size", "32", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["total_steps"] == 313            # ceil(10000 / 32)
    # An explicit --kimg beats a preset's step count (it was ignored: 400,000 steps, 409,600 kimg).
    assert train_main(["--config", "ict-cifar10", "--kimg", "100", "--dry-run"]) == 0
    ict = json.loads(capsys.readouterr().out)
    assert (ict["total_steps"], ict["kimg"]) == (98, 100.352)                  # ceil(100000 / 1024)


def test_dry_run_refuses_the_teacher_the_run_refuses(capsys, tmp_path, fm):
    # --dry-run did not look at --teacher: a missing, damaged or mismatched teacher passed it, and the run refused it.
    # Now the same line, from the teacher's header and weights (nothing built, the output folder not made).
    ok = _teacher(tmp_path / "ok", (1, 32, 32))
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes((tmp_path / "ok" / "ckpt-00000001.safetensors").read_bytes()[:-100])
    (tmp_path / "garbage.pkl").write_bytes(b"not a pickle")
    (tmp_path / "notes.txt").write_text("x")
    bad = {
        "missing": (str(tmp_path / "none"), [], "--teacher: checkpoint not found"),
        "not a checkpoint": (str(tmp_path / "notes.txt"), [], "notes.txt: not a checkpoint"),
        "cut short": (str(torn), [], "torn.safetensors: unreadable checkpoint"),
        "NaN weights": (_teacher(tmp_path / "nan", (1, 32, 32), nan=True), [], "bad ema@0.9 weights: "),
        "an EDM pickle that is none": (str(tmp_path / "garbage.pkl"), [], "garbage.pkl"),
        "not EDM": (_teacher(tmp_path / "ct", (1, 32, 32), method="ct"), [],
                    "expected an EDM denoiser (--method edm) for (1, 32, 32) images, got --method ct for (1, 32, 32)"),
        "resolution": (_teacher(tmp_path / "r16", (1, 16, 16)), [], "got --method edm for (1, 16, 16) images"),
        "channels": (_teacher(tmp_path / "rgb", (3, 32, 32)), [], "got --method edm for (3, 32, 32) images"),
        "conditioning": (ok, ["--cond"], "class conditioning differs from the student's (--cond)"),
        "class count": (_teacher(tmp_path / "c3", (1, 32, 32), label_dim=3), ["--cond"],
                        "conditional on 3 classes, the student's data has 10"),
    }
    for what, (teacher, extra, match) in bad.items():
        out = tmp_path / "out"
        argv = ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "cd", "--teacher", teacher, *TINY,
                *extra, "--output-dir", str(out)]
        dry = fails(capsys, argv + ["--dry-run"], match)
        assert not out.exists(), what
        assert fails(capsys, argv, match) == dry, what          # the same line as the run's
    argv = ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "cd", "--teacher", ok, *TINY,
            "--output-dir", str(tmp_path / "run")]
    assert train_main(argv + ["--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "run").exists()
    assert train_main(argv) == 0
    with open(tmp_path / "run" / "config.json") as f:
        assert dry == json.load(f)


def test_dry_run_refuses_the_output_folder_the_run_refuses(capsys, tmp_path, fm):
    # --dry-run did not look at --output-dir: a folder it cannot write, or one whose checkpoints the run would not
    # overwrite or resume, passed it. Now the run's line, nothing made or changed.
    (tmp_path / "afile").write_text("")
    ro = tmp_path / "ro"
    ro.mkdir()
    base = ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "ict", *TINY, "--ckpt-every", "1"]
    run = tmp_path / "run"
    assert train_main(base + ["--output-dir", str(run)]) == 0
    capsys.readouterr()
    before = tree(run)
    bad = {
        "a file": (str(tmp_path / "afile"), [], "is not writable (File exists)"),
        "under a file": (str(tmp_path / "afile" / "out"), [], "is not writable (Not a directory)"),
        "checkpoints, no --resume": (str(run), [], "already holds checkpoints: pass --resume latest"),
        "--resume latest, none": (str(tmp_path / "new"), ["--resume", "latest"], "--resume latest: no checkpoint"),
        "--resume PATH, none": (str(tmp_path / "new"), ["--resume", str(tmp_path / "nope.safetensors")],
                                "checkpoint not found"),
        "--resume, other data": (str(run), ["--resume", "latest", "--preset", "fmnist-small"],
                                 "the checkpoint differs from this command in net ("),
        "--resume, other method": (str(run), ["--resume", "latest", "--method", "ct"], "the checkpoint differs from "
                                   "this command in method (method 'ict' there, 'ct' here)"),
    }
    if os.geteuid() != 0:       # root writes anywhere
        os.chmod(ro, 0o500)
        bad["read-only"] = (str(ro / "out"), [], "is not writable (Permission denied)")
    try:
        for what, (out, extra, match) in bad.items():
            argv = base + ["--output-dir", out, *extra]
            dry = fails(capsys, argv + ["--dry-run"], match)
            assert fails(capsys, argv, match) == dry, what
        assert tree(run) == before and not (tmp_path / "new").exists()
    finally:
        os.chmod(ro, 0o700)
    # what the run takes, the dry run takes: --resume latest of that run, --resume auto of a new folder
    assert train_main(base + ["--output-dir", str(run), "--resume", "latest", "--steps", "2", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["total_steps"] == 2
    assert train_main(base + ["--output-dir", str(tmp_path / "new"), "--resume", "auto", "--dry-run"]) == 0
    assert tree(run) == before and not (tmp_path / "new").exists()


def test_dry_run_refuses_the_resume_checkpoint_the_run_refuses(capsys, tmp_path, fm):
    # --dry-run read the resume checkpoint's header only: NaN weights, a tensor cut short, a training state missing,
    # damaged or lacking a part passed it, and the run refused them. Now the run's line, nothing changed.
    import shutil
    from safetensors import safe_open
    from safetensors.torch import load_file, save
    base = ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "ct", *TINY, "--steps", "3", "--ckpt-every",
            "1"]
    good = tmp_path / "good"
    assert train_main(base + ["--output-dir", str(good), "--stop-at", "2"]) == 0
    capsys.readouterr()
    w2, s2 = "ckpt-00000002.safetensors", "ckpt-00000002.state.pt"
    with safe_open(str(good / w2), "pt") as f:
        meta = f.metadata()
        model_keys = sorted(k for k in f.keys() if k.startswith("model/"))

    def weights(fn):
        def edit(run):
            (run / w2).write_bytes(save(fn(load_file(str(run / w2))), meta))
        return edit

    def state(fn):
        def edit(run):
            torch.save(fn(torch.load(run / s2, weights_only=True)), run / s2)
        return edit

    def torn(*names):
        def edit(run):
            for name in names:
                (run / name).write_bytes((run / name).read_bytes()[:-100])
        return edit

    def nan_everywhere(t):      # every model tensor: the first by name is the one named, by the run as by the dry run
        return {k: v * float("nan") if k.startswith("model/") else v for k, v in t.items()}
    cut = "model/net.enc.32x32_block0.conv0.weight"
    bad = {
        "NaN weights": (weights(nan_everywhere), "latest",
                        f"{w2}: bad model weights: {model_keys[0][len('model/'):]} holds "),
        "a tensor cut short": (weights(lambda t: {**t, cut: t[cut][:-1]}), "latest",
                               f"{w2}: does not fit this run (RuntimeError: size mismatch for "
                               f"{cut[len('model/'):]}: copying a param with shape torch.Size([15, 16, 3, 3])"),
        "no optimizer state": (state(lambda s: {k: v for k, v in s.items() if k != "optimizer"}), "latest",
                               "not a whole checkpoint of this run (no 'optimizer')"),
        "a sampler state that is none": (state(lambda s: {**s, "sampler": {"epoch_state": 0, "pos": 0,
                                                                           "gen_state": 0}}),
                                         "latest", f"{w2}: does not fit this run (TypeError: "),
        "an RNG state that is none": (state(lambda s: {**s, "rng": {**s["rng"], "torch": torch.zeros(3)}}), "latest",
                                      f"{w2}: does not fit this run (TypeError: RNG state must be a torch.ByteTensor)"),
    }
    for what, (edit, resume, match) in bad.items():
        run = tmp_path / what.replace(" ", "-")
        shutil.copytree(good, run)
        edit(run)
        before = tree(run)
        argv = base + ["--output-dir", str(run), "--resume", resume if resume == "latest" else str(run / resume)]
        dry = fails(capsys, argv + ["--dry-run"], match)
        assert fails(capsys, argv, match) == dry, what          # the same line as the run's
        assert tree(run) == before, what
    # unreadable training states: the run's warning (on stdout and in log.txt) a note of the dry run's, then its line
    note = "cmfast-train: note: {}: unreadable training state ({}){}"
    more = "; the run would try the previous checkpoint"
    bad = {"its state file missing": (lambda run: (run / s2).unlink(), w2, [(s2, "FileNotFoundError", "")]),
           "every state file torn": (torn("ckpt-00000001.state.pt", s2), "latest",
                                     [(s2, "RuntimeError", more), ("ckpt-00000001.state.pt", "RuntimeError", "")])}
    for what, (edit, resume, notes) in bad.items():
        run = tmp_path / what.replace(" ", "-")
        shutil.copytree(good, run)
        edit(run)
        given = resume if resume == "latest" else str(run / resume)
        argv = base + ["--output-dir", str(run), "--resume", given]
        line = f"cmfast-train: error: --resume: no readable checkpoint in {run if resume == 'latest' else given}"
        assert fails(capsys, argv, "no readable checkpoint") == line, what
        before = tree(run)      # the run's warnings appended to log.txt; the dry run changes nothing
        with pytest.raises(SystemExit) as e:
            train_main(argv + ["--dry-run"])
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines() == [note.format(run / n, t, m) for n, t, m in notes] + [line]
        assert tree(run) == before, what
    # a torn newest state: the run resumes from the checkpoint before it, and the dry run says so and takes it
    run = tmp_path / "torn-newest"
    shutil.copytree(good, run)
    torn(s2)(run)
    assert train_main(base + ["--output-dir", str(run), "--resume", "latest", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert err == note.format(run / s2, "RuntimeError", more) + "\n", err
    assert train_main(base + ["--output-dir", str(run), "--resume", "latest"]) == 0
    assert f"warning: {run / s2}: unreadable training state (RuntimeError); trying the previous" in \
        capsys.readouterr().out


@pytest.mark.skipif(not os.path.exists("/proc/self/mountinfo"), reason="Linux's /proc and /sys")
def test_dry_run_refuses_an_output_folder_in_proc_or_sys(capsys, fm):
    # /proc and /sys take no file or folder, but os.access lets root write there: --output-dir /proc/cmfast_out passed
    # the dry run and the run refused it (mkdir: ENOENT in proc; EPERM in sysfs, and EACCES for a file in a folder)
    from cmfast.training.loop import _fs_type
    assert _fs_type("/proc") == "proc" and _fs_type("/") != "proc"
    lines = {"/proc/cmfast_out": "No such file or directory", "/proc/cmfast_out/a": "No such file or directory"}
    if _fs_type("/sys") == "sysfs" and os.path.isdir("/sys/kernel"):
        lines.update({"/sys/cmfast_out": "Operation not permitted", "/sys/kernel": "Permission denied"})
    for out, why in lines.items():
        argv = ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "ict", *TINY, "--output-dir", out]
        if os.geteuid() != 0:       # the folder's mode refuses first
            why = "Permission denied"
        dry = fails(capsys, argv + ["--dry-run"], f"output dir {out} is not writable ({why})")
        assert fails(capsys, argv, "is not writable") == dry, out       # the same line as the run's


def _folder(root, sizes, channels=3, mode=None):
    """PNGs img0000.png ... in root, one (height, width) of `sizes` each; mode: a PIL mode to save them in instead."""
    import numpy as np
    from PIL import Image
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        c = channels[i] if isinstance(channels, (list, tuple)) else channels
        a = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        im = Image.fromarray(a[:, :, 0] if c == 1 else a)
        (im.convert(mode) if mode else im).save(os.path.join(root, f"img{i:04d}.png"))
    return str(root)


def test_dry_run_of_an_image_folder_prints_the_config_the_run_writes(capsys, tmp_path):
    # --dry-run did not read the folder: net was null, and classes missing. It now peeks (labels, a few headers) and
    # prints what the run writes into config.json.
    import shutil
    flat = _folder(tmp_path / "flat", [(16, 16)] * 5)
    _folder(tmp_path / "sub" / "dogs", [(16, 16)] * 3, channels=1)
    _folder(tmp_path / "sub" / "cats", [(16, 16)] * 2, channels=1)
    zipped = shutil.make_archive(str(tmp_path / "subzip"), "zip", tmp_path, "sub")     # sub/cats/img0000.png ...
    labelled = _folder(tmp_path / "labelled", [(8, 8)] * 4)
    (tmp_path / "labelled" / "dataset.json").write_text(json.dumps({"labels": [[f"img{i:04d}.png", 2 * (i % 2)]
                                                                               for i in range(4)]}))
    cases = [(flat, []), (flat, ["--preset", "fmnist-small"]), (str(tmp_path / "sub"), ["--cond"]),
             (str(tmp_path / "sub"), []), (zipped, ["--cond"]),
             (labelled, ["--cond", "--method", "edm"])]        # classes 0 and 2 in dataset.json: 3 (1 has no images)
    for i, (folder, extra) in enumerate(cases):
        argv = ["--dataset", "folder", "--data-dir", folder, *TINY, *extra, "--output-dir", str(tmp_path / f"r{i}")]
        assert train_main(argv + ["--dry-run"]) == 0
        dry = json.loads(capsys.readouterr().out)
        assert not (tmp_path / f"r{i}").exists()
        assert train_main(argv) == 0
        capsys.readouterr()
        with open(tmp_path / f"r{i}" / "config.json") as f:
            assert dry == json.load(f), (folder, extra)
        assert dry["net"]["img_resolution"] == (8 if folder == labelled else 16)
        assert dry["net"]["in_channels"] == (1 if "sub" in folder else 3)
        if "--cond" in extra:
            assert dry["net"]["label_dim"] == {"sub": 2, "subzip.zip": 2, "labelled": 3}[os.path.basename(folder)]
        else:
            assert "label_dim" not in dry["net"]
        assert dry.get("classes") == (["cats", "dogs"] if "sub" in folder and "--cond" in extra else None)


def test_dry_run_of_an_image_folder_refuses_what_the_run_refuses(capsys, tmp_path):
    from PIL import Image
    bad = {
        "not square": (_folder(tmp_path / "a", [(16, 12)] * 3), [], "expected square images, got 16x12"),
        "odd size": (_folder(tmp_path / "b", [(15, 15)] * 3), [], "img_resolution: expected a multiple of 2"),
        "mixed sizes": (_folder(tmp_path / "c", [(16, 16), (16, 16), (32, 32)]), [],
                        "c/img0002.png: expected all images 16x16 RGB as img0000.png, got 32x32 RGB"),
        "gray and RGB": (_folder(tmp_path / "d", [(16, 16)] * 3, channels=[3, 1, 3]), [],
                         "d/img0001.png: expected all images 16x16 RGB as img0000.png, got 16x16 gray"),
        "unlabelled, --cond": (_folder(tmp_path / "e", [(16, 16)] * 3), ["--cond"],
                               "--cond: this dataset has no labels: an image folder needs one subfolder a class"),
        "16-bit": (_folder(tmp_path / "f", [(16, 16)] * 2, channels=1, mode="I;16"), [],
                   "f/img0000.png: I;16 pixels (16-bit or float) are not read"),
        "label missing": (_folder(tmp_path / "g", [(16, 16)] * 3), ["--cond"],
                          "g/dataset.json: no label for img0002.png"),
        "not an image": (_folder(tmp_path / "h", [(16, 16)] * 2), [], "h/img0002.png: unreadable image"),
        "no images": (str(tmp_path / "i"), [], "i: no PNG or JPEG images found"),
        "missing": (str(tmp_path / "nope"), [], "image folder or zip not found"),
        # the last image is always among the headers read: a folder's odd one out is often its last
        "last of 100 differs": (_folder(tmp_path / "j", [(8, 8)] * 99 + [(16, 16)]), [],
                                "j/img0099.png: expected all images 8x8 RGB as img0000.png, got 16x16 RGB"),
    }
    (tmp_path / "g" / "dataset.json").write_text(json.dumps({"labels": [["img0000.png", 0], ["img0001.png", 1]]}))
    (tmp_path / "h" / "img0002.png").write_bytes(b"no PNG at all")
    (tmp_path / "i").mkdir()
    (tmp_path / "i" / "notes.txt").write_text("x")
    assert Image.open(os.path.join(tmp_path, "f", "img0000.png")).mode.startswith("I")
    for what, (folder, extra, match) in bad.items():
        argv = ["--dataset", "folder", "--data-dir", folder, *TINY, *extra, "--output-dir", str(tmp_path / "out")]
        dry = fails(capsys, argv + ["--dry-run"], match)
        assert fails(capsys, argv, match) == dry, what          # the same line as the run's
    assert not (tmp_path / "out").exists()
    # a paper's folder config without --data-dir still shows its config (net: the folder decides), with a note
    assert train_main(["--config", "ct-lsun256", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["net"] is None and "note: no --data-dir" in err


def test_lpips_default_without_weights_is_one_line(capsys, tmp_path, fm, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    fails(capsys, ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "ct", "--preset", "tiny",
                   "--steps", "1", "--output-dir", str(tmp_path / "o")], "LPIPS needs the torchvision vgg weights")
    fails(capsys, ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "ct", "--preset", "tiny",
                   "--steps", "1", "--output-dir", str(tmp_path / "o")],
          "or train with another distance, e.g. --loss l2")
    assert tree(str(tmp_path / "o")) is None


def test_resume_auto_reruns_the_same_command(tmp_path, fm):
    argv = ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "ict", "--preset", "tiny", "--batch-size",
            "4", "--sample-num", "0", "--steps", "2", "--loss", "l2", "--output-dir", str(tmp_path / "run"),
            "--resume", "auto"]
    assert train_main(argv + ["--stop-at", "1"]) == 0          # nothing to resume: starts fresh, stops at 1
    assert train_main(argv) == 0                                # the same command resumes
    with open(tmp_path / "run" / "stats.jsonl") as f:
        assert [json.loads(x)["step"] for x in f] == [1, 2]
    with open(tmp_path / "run" / "log.txt") as f:
        log = f.read()
    assert "at step 1" in log and "settings changed" not in log      # the same command changes nothing
    # A resume may change the batch size, the length and a hyperparameter; each change is logged (it was silent).
    changed = [{"4": "2", "2": "3"}.get(a, a) for a in argv] + ["--method-arg", "s1=40"]   # batch 4 -> 2, steps 2 -> 3
    assert train_main(changed) == 0
    with open(tmp_path / "run" / "log.txt") as f:
        assert "settings changed since the checkpoint: batch_size 4 -> 2; total_steps 2 -> 3; s1 1280 -> 40" in f.read()


def test_time_limit_stops_with_a_checkpoint_and_resumes(tmp_path, fm, capsys):
    argv = ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "ict", "--preset", "tiny", "--batch-size",
            "4", "--sample-num", "0", "--steps", "50", "--loss", "l2", "--output-dir", str(tmp_path / "run")]
    assert train_main(argv + ["--time-limit", "1e-6"]) == 0     # the limit is checked each step: stops at step 1
    ckpts = sorted(p.name for p in (tmp_path / "run").glob("ckpt-*.safetensors"))
    assert ckpts == ["ckpt-00000001.safetensors"]
    with open(tmp_path / "run" / "log.txt") as f:
        assert "stopping at step 1 (--time-limit)" in f.read()
    assert train_main(argv + ["--resume", "latest", "--stop-at", "3"]) == 0
    with open(tmp_path / "run" / "stats.jsonl") as f:
        assert [json.loads(x)["step"] for x in f] == [1, 3]
    capsys.readouterr()
    fails(capsys, argv + ["--time-limit", "0"], "--time-limit")


@pytest.mark.parametrize("method", ["ct", "sct"])
def test_fmnist_small_checkpoint_files_stay_under_16_mib(tmp_path, fm, method):
    # The GPU reference runs bring their checkpoints back as files of at most 16 MiB (CT holds model, target, EMA).
    argv = ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", method, "--preset", "fmnist-small",
            "--batch-size", "2", "--sample-num", "0", "--steps", "1", "--ema", "0.999",
            "--output-dir", str(tmp_path / "run")] + (["--loss", "l2"] if method == "ct" else [])
    assert train_main(argv) == 0
    files = sorted((tmp_path / "run").glob("ckpt-*"))
    assert len(files) == 2
    for f in files:
        assert 4 * 2 ** 20 < f.stat().st_size < 16 * 2 ** 20, (f.name, f.stat().st_size)


def test_conditional_run_and_pretrained_assets(tmp_path, fm, monkeypatch):
    import shutil
    import cmfast
    from cmfast import pretrained
    out = str(tmp_path / "cond")
    assert train_main(["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "ict", "--cond", *TINY,
                       "--output-dir", out]) == 0
    model, meta = cmfast.training.load_model(out)
    assert meta["config"]["net"]["label_dim"] == 10 and model.net.label_dim == 10
    assert sample_main(["--checkpoint", out, "--num", "3", "--class", "7", "--npz", str(tmp_path / "s.npz"),
                        "--device", "cpu"]) == 0
    # The .npz keeps each image's class beside it (arr_1; it held the images alone): cycled, or all --class.
    assert sample_main(["--checkpoint", out, "--num", "12", "--npz", str(tmp_path / "c.npz"), "--batch-size", "5",
                        "--device", "cpu"]) == 0
    import numpy as np
    assert np.load(tmp_path / "s.npz")["arr_1"].tolist() == [7, 7, 7]
    assert np.load(tmp_path / "c.npz")["arr_1"].tolist() == [*range(10), 0, 1]
    # A shipped model is a checkpoint file in cmfast/assets/ plus its JSON model card.
    monkeypatch.setattr(pretrained, "ASSETS", str(tmp_path / "assets"))
    os.makedirs(pretrained.ASSETS)
    shutil.copy(os.path.join(out, "ckpt-00000001.safetensors"), os.path.join(pretrained.ASSETS, "fm.safetensors"))
    with open(os.path.join(pretrained.ASSETS, "fm.json"), "w") as f:
        json.dump({"dataset": "fashion-mnist", "fd_fmnist": None}, f)
    m = cmfast.load_pretrained("fm")
    assert isinstance(m, cmfast.ConsistencyModel) and not m.training and m.card["dataset"] == "fashion-mnist"
    assert torch.equal(m.net.out_conv.weight, model.net.out_conv.weight)
    with pytest.raises(ValueError, match="no shipped model 'x'; available: fm"):
        cmfast.load_pretrained("x")


def test_compile_option_dry_run_and_errors(capsys, tmp_path):
    def dry(*argv):
        assert train_main(["--dataset", "fashion-mnist", "--dry-run", *argv]) == 0
        cfg = json.loads(capsys.readouterr().out)
        return cfg["compile"], cfg["backend"]
    assert dry() == ("none", "auto")
    # auto stays auto: cmfast.ops itself uses the torch ops inside a compiled network (tests/test_auto_backend.py)
    assert dry("--compile") == ("default", "auto")              # bare --compile
    assert dry("--compile", "--steps", "3") == ("default", "auto")
    assert dry("--compile", "reduce-overhead") == ("reduce-overhead", "auto")
    assert dry("--compile=max-autotune-no-cudagraphs") == ("max-autotune-no-cudagraphs", "auto")
    assert dry("--compile", "max-autotune", "--backend", "torch") == ("max-autotune", "torch")  # named: kept
    assert dry("--backend", "triton", "--compile") == ("default", "triton")
    assert dry("--compile", "none") == ("none", "auto")
    out = str(tmp_path / "out")
    fails(capsys, ["--compile", "fast", "--output-dir", out], "argument --compile: invalid choice: 'fast'")
    fails(capsys, ["--compile", "reduce_overhead", "--output-dir", out], "invalid choice: 'reduce_overhead'")
    assert tree(out) is None


@pytest.mark.parametrize("method", ["ict", "ct", "cd"])
def test_cuda_graph_compile_modes_refuse_dropout_in_pair_steps(method, monkeypatch):
    # CD / CT / iCT steps replay the online pass's dropout masks in the target pass; under CUDA-graph trees that
    # overwrote the online pass's saved activations on the H200 (tests/test_train_gpu.py). Refused in one line there,
    # and only there: other modes, no dropout, sCT / EDM, CPU and non-inductor backends run.
    from cmfast.training.loop import check_compile as check
    from cmfast.training.methods import get_method

    def check_compile(mode, name, net_cfg, device):
        return check(mode, get_method(name), net_cfg, device)
    assert [m for m in ("edm", "cd", "ct", "ict", "sct") if get_method(m).replays_dropout] == ["cd", "ct", "ict"]
    monkeypatch.delenv("CMFAST_COMPILE_BACKEND", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match=rf"^--compile {mode} with dropout 0.3: .*use --compile default"):
            check_compile(mode, method, {"dropout": 0.3}, cuda)
    with pytest.raises(ValueError, match="with dropout 0.1:"):           # the UNet's default where the config has none
        check_compile("reduce-overhead", method, {}, cuda)
    for args in (("default", method, {"dropout": 0.3}, cuda), ("max-autotune-no-cudagraphs", method, {"dropout": 0.3},
                 cuda), ("reduce-overhead", method, {"dropout": 0.0}, cuda), ("reduce-overhead", "sct",
                 {"dropout": 0.3}, cuda), ("reduce-overhead", "edm", {"dropout": 0.3}, cuda),
                 ("reduce-overhead", method, {"dropout": 0.3}, cpu)):
        check_compile(*args)
    monkeypatch.setenv("CMFAST_COMPILE_BACKEND", "eager")
    check_compile("reduce-overhead", method, {"dropout": 0.3}, cuda)


def _budget_argv(tmp_path, fm, minutes="0.04"):
    return ["--dataset", "fashion-mnist", "--data-dir", fm, "--method", "ict", "--preset", "tiny", "--batch-size",
            "4", "--sample-num", "0", "--loss", "l2", "--log-every", "1", "--ckpt-every", "1000",
            "--time-budget", minutes, "--output-dir", str(tmp_path / "run")]


def _lines(path, needle):
    with open(path) as f:
        return [x for x in f if needle in x]


def test_time_budget_plans_the_length_and_runs_it_out(tmp_path, fm):
    assert train_main(_budget_argv(tmp_path, fm)) == 0
    with open(tmp_path / "run" / "config.json") as f:
        cfg = json.load(f)
    plan = cfg["planned"]
    # planned at the end of the probe (2 untimed + 8 timed steps), then run to exactly that length
    assert plan["at_step"] == 10 and plan["ms_per_step"] > 0 and plan["time_budget_min"] == 0.04
    assert cfg["total_steps"] == plan["total_steps"] >= 10
    assert cfg["kimg"] == pytest.approx(plan["total_steps"] * 4 / 1000)
    with open(tmp_path / "run" / "stats.jsonl") as f:
        steps = [json.loads(x)["step"] for x in f]
    assert steps == list(range(1, plan["total_steps"] + 1))
    assert len(_lines(tmp_path / "run" / "log.txt", "steps in all")) == 1
    assert not _lines(tmp_path / "run" / "log.txt", "stopping at")          # it ended on its plan, not a limit
    ckpts = sorted(p.name for p in (tmp_path / "run").glob("ckpt-*.safetensors"))
    assert ckpts == [f"ckpt-{plan['total_steps']:08d}.safetensors"]


def test_time_budget_resume_keeps_the_plan(tmp_path, fm):
    argv = _budget_argv(tmp_path, fm, "0.05")
    assert train_main(argv + ["--stop-at", "11"]) == 0
    with open(tmp_path / "run" / "config.json") as f:
        plan = json.load(f)["planned"]
    assert train_main(argv + ["--resume", "latest"]) == 0       # no second probe: the checkpoint's plan stands
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["planned"] == plan
    with open(tmp_path / "run" / "stats.jsonl") as f:
        assert json.loads(f.readlines()[-1])["step"] == plan["total_steps"]
    assert len(_lines(tmp_path / "run" / "log.txt", "steps in all")) == 1


def test_time_budget_argument_errors(capsys, tmp_path, fm):
    argv = _budget_argv(tmp_path, fm)
    fails(capsys, argv + ["--steps", "5"], "--time-budget")
    fails(capsys, [a if a != "0.04" else "0" for a in argv], "--time-budget")
    assert not (tmp_path / "run").exists()


def test_cd_teacher_of_other_class_count_is_refused_up_front(capsys, tmp_path):
    """A teacher conditional on 2 classes distilled on a folder labelled 0..2 failed at the first step ('class_labels:
    expected 0 <= label < 2, got 2') after writing the run folder; now one line naming both counts, nothing written."""
    import json
    from train_fixtures import write_png_folder
    for name, k in (("two", 2), ("three", 3)):
        write_png_folder(tmp_path / name, n=6, size=16, channels=1)
        labels = [[f"img{i:04d}.png", i % k] for i in range(6)]
        (tmp_path / name / "dataset.json").write_text(json.dumps({"labels": labels}))
    edm = str(tmp_path / "edm")
    assert train_main(["--dataset", "folder", "--data-dir", str(tmp_path / "two"), "--cond", *TINY, "--method", "edm",
                       "--output-dir", edm]) == 0
    fails(capsys, ["--dataset", "folder", "--data-dir", str(tmp_path / "three"), "--cond", *TINY, "--method", "cd",
                   "--teacher", edm, "--output-dir", str(tmp_path / "cd")],
          f"--teacher {edm}: conditional on 2 classes, the student's data has 3")
    assert not (tmp_path / "cd").exists()


def test_cond_on_a_folder_without_labels_says_how_to_label_it(capsys, tmp_path):
    """--cond on a folder without labels gives both layouts that label one; a class-per-subfolder folder (torchvision's
    ImageFolder layout) trains class-conditional, its class names in config.json (it was refused: no dataset.json)."""
    from train_fixtures import write_png_folder
    write_png_folder(tmp_path / "flat", n=4, size=16)
    fails(capsys, ["--dataset", "folder", "--data-dir", str(tmp_path / "flat"), "--cond", *TINY, "--output-dir",
                   str(tmp_path / "run")], "an image folder needs one subfolder a class (cats/001.png, dogs/001.png) "
          'or dataset.json at its top, {"labels": [["cats/001.png", 0], ...]} (paths relative to the folder)')
    assert not (tmp_path / "run").exists()
    write_png_folder(tmp_path / "imgs" / "dogs", n=2, size=16, seed=1)
    write_png_folder(tmp_path / "imgs" / "cats", n=2, size=16)
    assert train_main(["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--cond", *TINY, "--output-dir",
                       str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "classes from the subfolders: 0 cats, 1 dogs" in out and "class-conditional: 2 classes, 2 to 2 images" in out
    # labels numbered from 1 leave class 0 without images: said, not silent
    (tmp_path / "flat" / "dataset.json").write_text('{"labels": [' + ", ".join(
        f'["img{i:04d}.png", {1 + i % 2}]' for i in range(4)) + "]}")
    assert train_main(["--dataset", "folder", "--data-dir", str(tmp_path / "flat"), "--cond", *TINY, "--output-dir",
                       str(tmp_path / "run1")]) == 0
    assert "3 classes, 0 to 2 images each; warning: no images of class 0" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["net"]["label_dim"] == 2 and cfg["classes"] == ["cats", "dogs"]
    # cmfast-sample --class takes a subfolder's name for such a run
    npz = str(tmp_path / "dogs.npz")
    assert sample_main(["--checkpoint", str(tmp_path / "run"), "--num", "3", "--class", "dogs", "--npz", npz]) == 0
    import numpy as np
    assert np.load(npz)["arr_1"].tolist() == [1, 1, 1]
    fails(capsys, ["--checkpoint", str(tmp_path / "run"), "--num", "3", "--class", "emus", "--npz", npz],
          "--class emus: not a class of this model (cats, dogs)", main=sample_main, prog="cmfast-sample")


def test_resume_mismatch_names_the_values(capsys, tmp_path, fm):
    """'the checkpoint differs from this command in net' left the user to guess that a dropped --cond (or a class added
    to the folder) was the cause; the error now says which net field differs and both values."""
    out = str(tmp_path / "run")
    base = ["--dataset", "fashion-mnist", "--data-dir", fm, *TINY, "--method", "ict", "--output-dir", out]
    assert train_main(base + ["--cond"]) == 0
    fails(capsys, base + ["--resume", "latest"], "differs from this command in net (label_dim 10 there, None here)")
    fails(capsys, base + ["--cond", "--resume", "latest", "--method", "ct"],
          "in method (method 'ict' there, 'ct' here)")


def test_dry_run_refuses_a_resume_past_the_folders_image_count(capsys, tmp_path):
    # A folder with fewer images than the resumed run's sampler had reached in its epoch: the run refuses it (after
    # loading the data); --dry-run took the state's position as the data's size and passed. It now counts the folder's
    # files (peek_folder) and gives the run's line; with the images back both resume.
    folder = _folder(tmp_path / "imgs", [(8, 8)] * 7)
    argv = ["--dataset", "folder", "--data-dir", folder, *TINY, "--steps", "3", "--output-dir", str(tmp_path / "r")]
    assert train_main(argv + ["--stop-at", "1"]) == 0      # batch 4: the sampler stopped at image 4 of 7
    capsys.readouterr()
    kept = tmp_path / "kept"
    os.makedirs(kept)
    for i in (3, 4, 5, 6):
        os.replace(os.path.join(folder, f"img{i:04d}.png"), kept / f"img{i:04d}.png")
    resume = argv + ["--resume", "latest"]
    line = (f"cmfast-train: error: {tmp_path / 'r' / 'ckpt-00000001.safetensors'}: does not fit this run (ValueError: "
            "the sampler stopped at image 4 of an epoch, but the dataset has 3 images (not the dataset the checkpoint "
            "was trained on))")
    assert fails(capsys, resume + ["--dry-run"], "the sampler stopped") == line
    assert fails(capsys, resume, "the sampler stopped") == line
    os.replace(kept / "img0003.png", os.path.join(folder, "img0003.png"))   # 4 images: position 4 ends the epoch
    assert train_main(resume + ["--dry-run"]) == 0
    assert train_main(resume) == 0
