"""cmfast-train / cmfast-sample end to end on generated data (tiny preset, CPU): every method, sample grids,
checkpoints, exact resume, atomic writes, non-finite steps and signals."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cmfast import data
from cmfast.cli.sample import main as sample_main
from cmfast.cli.train import main as train_main
from cmfast.training import checkpoint as ckpt
from train_fixtures import write_cifar_folder, write_fmnist, write_png_folder

FAST = ["--preset", "tiny", "--batch-size", "4", "--sample-num", "4", "--log-every", "1", "--lr", "1e-3"]


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path, one_thread):
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "no-system-dir"))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_folder(root, n_per_batch=4)
    return str(root)


def png_size(path):
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        return im.size, im.mode


def rows(out):
    with open(os.path.join(out, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_chunk_seeds_never_repeat():
    # Every (seed, step, chunk) draws its own noise. The old linear mix gave chunk 4099 of a step step + 1's chunk 0,
    # and step 1,000,003 of seed s step 0 of seed s + 1.
    from cmfast.training.loop import chunk_seed
    assert chunk_seed(0, 0, 4099) != chunk_seed(0, 1, 0)
    assert chunk_seed(0, 1_000_003, 0) != chunk_seed(1, 0, 0)
    keys = [(s, t, c) for s in range(3) for t in range(200) for c in range(20)]
    seeds = {chunk_seed(*k) for k in keys}
    assert len(seeds) == len(keys) and all(0 <= v < 2 ** 63 for v in seeds)
    assert chunk_seed(5, 7, 1) == chunk_seed(5, 7, 1)          # a function of its arguments: resumes redraw the same


def test_edm_then_cd_then_sample(tmp_path, cifar):
    edm = str(tmp_path / "edm")
    assert train_main(["--dataset", "cifar10", "--data-dir", cifar, "--method", "edm", "--steps", "3", "--seed", "1",
                       "--output-dir", edm, *FAST]) == 0
    assert png_size(os.path.join(edm, "samples", "00000003-heun18.png")) == ((64, 64), "RGB")   # 2x2 grid of 32
    cd = str(tmp_path / "cd")
    assert train_main(["--dataset", "cifar10", "--data-dir", cifar, "--method", "cd", "--teacher", edm,
                       "--loss", "l2", "--steps", "3", "--output-dir", cd, "--num-scales", "6", *FAST]) == 0
    r = rows(cd)
    assert [x["step"] for x in r] == [1, 2, 3] and all(x["N"] == 6 and x["mu"] == 0.0 for x in r)
    assert all(np.isfinite(x["loss"]) and x["loss"] > 0 for x in r)
    for tag in ("1step", "2step"):
        assert png_size(os.path.join(cd, "samples", f"00000003-{tag}.png")) == ((64, 64), "RGB")
    # The student starts from the teacher (same preset): 3 Adam steps of lr 1e-3 move a weight by ~3e-3 at most,
    # while two independent initialisations differ by O(0.1). (The teacher's --seed 1: from the student's seed, its
    # random start was the student's own, and a student that ignored the teacher passed.)
    model, meta = ckpt.load_model(cd, which="model")
    teacher, _ = ckpt.load_model(edm, which="ema")
    assert meta["step"] == 3 and meta["config"]["method"] == "cd" and not model.training
    gap = max((a - b).abs().max().item() for a, b in zip(model.parameters(), teacher.parameters()))
    assert 0 < gap < 1e-2
    # cmfast-sample: grid + npz, independent of --batch-size.
    g, z1, z2 = (str(tmp_path / n) for n in ("g.png", "a.npz", "b.npz"))
    assert sample_main(["--checkpoint", cd, "--num", "5", "--steps", "2", "--grid", g, "--npz", z1,
                        "--batch-size", "5", "--device", "cpu"]) == 0
    assert sample_main(["--checkpoint", cd, "--num", "5", "--steps", "2", "--npz", z2, "--batch-size", "2",
                        "--device", "cpu"]) == 0
    a, b = np.load(z1)["arr_0"], np.load(z2)["arr_0"]
    # batches of 2 (2 + 2 + 1) give the images of one batch of 5: each image draws its own noise
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert png_size(g) == ((96, 64), "RGB")


def test_ct_and_ict_fmnist(tmp_path):
    write_fmnist(tmp_path / "fm", n=16)
    for method in ("ct", "ict"):
        out = str(tmp_path / method)
        assert train_main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm"), "--method", method,
                           "--loss", "pseudo_huber", "--steps", "3", "--output-dir", out, *FAST]) == 0
        r = rows(out)
        assert len(r) == 3 and all(np.isfinite(x["loss"]) for x in r)
        assert png_size(os.path.join(out, "samples", "00000003-1step.png")) == ((64, 64), "L")
        w = load_file(os.path.join(out, "ckpt-00000003.safetensors"))
        assert ("target/net.out_conv.weight" in w) == (method == "ct")
        assert {k.split("/")[0] for k in w} == ({"model", "ema@0.9999"} | ({"target"} if method == "ct" else set()))
    # ct's target follows mu(k) = exp(s0 log mu0 / N(k)) (CM paper Appendix C).
    from cmfast import ct_schedule
    assert [x["mu"] for x in rows(str(tmp_path / "ct"))] == [ct_schedule(k, 3)[1] for k in range(3)]


def test_schedule_steps_sets_the_curriculum_length(tmp_path):
    """--method-arg schedule_steps=K (or schedule_mult=M: K = M x the run's steps): the CT / iCT curricula N(k) run
    over K steps instead of the run's own length, so a short run covers only the start of a longer curriculum; a bad
    value is one line before any work."""
    from cmfast import ct_schedule, ict_schedule
    write_fmnist(tmp_path / "fm", n=16)
    base = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm"), "--steps", "3", *FAST]
    for method, K, sched in (("ict", 40, ict_schedule), ("ct", 40, lambda k, K: ct_schedule(k, K)[0])):
        out = str(tmp_path / method)
        assert train_main([*base, "--method", method, "--loss", "l2", "--output-dir", out,
                           "--method-arg", f"schedule_steps={K}"]) == 0
        got = [x["N"] for x in rows(out)]
        assert got == [sched(k, K) for k in range(3)] != [sched(k, 3) for k in range(3)], (method, got)
    out = str(tmp_path / "mult")                                  # schedule_mult: K = 20 x the run's 3 steps
    assert train_main([*base, "--method", "ict", "--loss", "l2", "--output-dir", out,
                       "--method-arg", "schedule_mult=20"]) == 0
    assert [x["N"] for x in rows(out)] == [ict_schedule(k, 60) for k in range(3)]
    for bad in ("schedule_steps=0", "schedule_mult=0", "schedule_mult=-2"):
        with pytest.raises(SystemExit) as e:
            train_main([*base, "--method", "ict", "--output-dir", str(tmp_path / "bad"), "--method-arg", bad])
        assert e.value.code == 2, bad


def _run(out, folder, *extra):
    return train_main(["--dataset", "folder", "--data-dir", folder, "--method", "ct", "--loss", "l2",
                       "--steps", "4", "--dropout", "0.2", "--ema", "0.9,0.5", "--ckpt-every", "1", "--keep", "2",
                       "--sample-num", "0", "--output-dir", out, "--batch-size", "4", "--preset", "tiny",
                       "--lr", "1e-3", *extra])


def _assert_same_tree(a, b, path=""):
    """torch.equal on every tensor of two checkpoint state trees, == on everything else."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b, path


# Each method (cd / scd from a 2-step EDM teacher), sCT's exact JVP, mixed precision and gradient accumulation;
# _run's dropout 0.2 and two EMA rates throughout. fp16 (a GradScaler, whose state resumes) takes ~7 s on CPU.
RESUME_CASES = {
    "ct": [],
    "ct-bf16-accum": ["--precision", "bf16", "--batch-gpu", "2"],
    "edm": ["--method", "edm"],
    "cd": ["--method", "cd", "--num-scales", "6"],
    "ict": ["--method", "ict"],
    "sct-exact": ["--method", "sct", "--method-arg", "jvp=exact", "--method-arg", "warmup_steps=3"],
    "scd-fd": ["--method", "scd", "--method-arg", "warmup_steps=3"],
    "ict-fp16": pytest.param(["--method", "ict", "--precision", "fp16"], marks=pytest.mark.slow),
}


@pytest.mark.parametrize("extra", list(RESUME_CASES.values()), ids=list(RESUME_CASES))
def test_resume_is_exact(tmp_path, extra):
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    extra = list(extra)
    if extra[1:2] in (["cd"], ["scd"]):
        teacher = str(tmp_path / "teacher")
        assert _run(teacher, folder, "--method", "edm", "--steps", "2", "--dropout", "0") == 0
        extra += ["--teacher", teacher]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert _run(a, folder, "--log-every", "1", *extra) == 0
    assert _run(b, folder, "--log-every", "1", "--stop-at", "2", *extra) == 0
    assert [s for s, _, _ in ckpt.list_checkpoints(b)] == [1, 2]          # --keep 2
    assert _run(b, folder, "--log-every", "1", "--resume", "latest", *extra) == 0
    wa, wb = (load_file(os.path.join(d, "ckpt-00000004.safetensors")) for d in (a, b))
    assert {k.split("/")[0] for k in wa} >= {"model", "ema@0.9", "ema@0.5"}
    _assert_same_tree(wa, wb)
    sa, sb = (torch.load(os.path.join(d, "ckpt-00000004.state.pt"), weights_only=True) for d in (a, b))
    assert sa.pop("config") != sb.pop("config")        # output_dir, resume
    _assert_same_tree(sa, sb)       # optimizer, GradScaler, sampler, RNG (dropout), counters
    assert bool(sa["scaler"]) == ("fp16" in extra)
    assert [x["loss"] for x in rows(a)] == [x["loss"] for x in rows(b)]


def test_resume_drops_the_stats_rows_logged_after_the_checkpoint(tmp_path, capsys):
    """A run killed after logging steps past its last checkpoint (SIGKILL, a node failure) left their rows in
    stats.jsonl, and the resumed run appended the same steps again: [1, 2, 3, 3, 4], plus the cut-off line of the
    kill. Now the rows after the step resumed from are dropped: the file is an uninterrupted run's."""
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert _run(a, folder, "--log-every", "1") == 0
    assert _run(b, folder, "--log-every", "1", "--ckpt-every", "2", "--stop-at", "3") == 0
    for p in ckpt.paths(b, 3):               # killed after logging step 3, before its checkpoint
        os.remove(p)
    with open(os.path.join(b, "stats.jsonl"), "a") as f:
        f.write('{"step": 4, "kimg": 0.0')   # and while writing the next row
    capsys.readouterr()
    assert _run(b, folder, "--log-every", "1", "--ckpt-every", "2", "--resume", "latest") == 0
    assert [(x["step"], x["loss"]) for x in rows(b)] == [(x["step"], x["loss"]) for x in rows(a)]
    assert "stats.jsonl: 2 row(s) after step 2 removed" in capsys.readouterr().out


def test_atomic_save_and_fallback(tmp_path, monkeypatch, capsys):
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    out = str(tmp_path / "run")
    assert _run(out, folder, "--stop-at", "2") == 0
    before = load_file(os.path.join(out, "ckpt-00000002.safetensors"))

    def broken(f, data, chunk=1 << 24):     # the disk fills up half-way through the state file
        f.write(data[:len(data) // 2])
        raise OSError(28, "No space left on device")
    real = ckpt._write_chunks
    calls = []

    def fail_on_state(f, d, chunk=1 << 24):
        calls.append(len(d))
        return broken(f, d) if len(calls) == 2 else real(f, d)
    monkeypatch.setattr(ckpt, "_write_chunks", fail_on_state)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(out, 3, {"model": {"w": torch.ones(3)}}, {"method": "ct"}, {}, keep=0)
    monkeypatch.setattr(ckpt, "_write_chunks", real)
    assert not [f for f in os.listdir(out) if ".tmp" in f]                       # no temp file left behind
    assert [s for s, _, _ in ckpt.list_checkpoints(out)] == [1, 2]              # step 3 is incomplete: ignored
    model, meta = ckpt.load_model(out)
    assert meta["step"] == 2 and torch.equal(model.net.out_conv.weight, before["ema@0.9/net.out_conv.weight"])
    # A corrupt newest checkpoint: --resume latest says so and continues from the previous one.
    with open(os.path.join(out, "ckpt-00000002.safetensors"), "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    assert _run(out, folder, "--resume", "latest", "--steps", "3") == 0
    log = capsys.readouterr().out
    assert "unreadable checkpoint" in log and "trying the previous checkpoint" in log
    assert "resumed from" in log and "ckpt-00000001.safetensors at step 1" in log


def test_resume_removes_the_temporary_files_of_a_killed_write(tmp_path, capsys):
    # A SIGKILL mid-write left .ckpt-*.safetensors.tmpPID behind, each as large as a checkpoint, for good.
    import subprocess
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    out = str(tmp_path / "run")
    assert _run(out, folder, "--stop-at", "1") == 0
    dead = subprocess.Popen(["true"])
    dead.wait()                                          # a PID that no process holds now
    stale = [f".ckpt-00000002.safetensors.tmp{dead.pid}", f"samples/.00000002-1step.png.tmp{dead.pid}"]
    live = f".ckpt-00000002.state.pt.tmp{os.getppid()}"  # a writer that still runs: kept
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    for f in stale + [live]:
        with open(os.path.join(out, f), "wb") as fh:
            fh.write(b"\0" * 1000)
    capsys.readouterr()
    assert _run(out, folder, "--resume", "latest", "--steps", "2") == 0
    assert "removed 1 temporary file(s) of a killed run's writes" in capsys.readouterr().out
    assert [os.path.exists(os.path.join(out, f)) for f in stale + [live]] == [False, False, True]
    assert [s for s, _, _ in ckpt.list_checkpoints(out)] == [1, 2]


def test_checkpoint_with_damaged_metadata_or_a_foreign_config_is_one_line(tmp_path, capsys):
    """A cmfast-format file whose metadata lacks 'step' or whose config is not a JSON dict raised KeyError /
    JSONDecodeError / AttributeError (cmfast-sample: a traceback; --resume latest: not skipped as unreadable), and a
    config this version cannot build (another version's net argument or method) a TypeError without the file name.
    Now each is a CheckpointError naming the file."""
    from safetensors.torch import save
    from cmfast import ConsistencyModel, UNet
    from cmfast.nets import preset_config
    cm = ConsistencyModel(UNet.from_preset("tiny"))
    tensors = {f"ema/{k}": v.contiguous() for k, v in cm.state_dict().items()}
    cfg = dict(method="ict", net=preset_config("tiny"), sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    cases = {"no-step": ({"format": ckpt.FORMAT, "config": json.dumps(cfg)}, "damaged checkpoint metadata"),
             "bad-json": ({"format": ckpt.FORMAT, "step": "1", "config": "{"}, "damaged checkpoint metadata"),
             "list": ({"format": ckpt.FORMAT, "step": "1", "config": "[]"}, "damaged checkpoint metadata"),
             "new-arg": ({"format": ckpt.FORMAT, "step": "1",
                          "config": json.dumps(dict(cfg, net=dict(cfg["net"], future_arg=1)))},
                         "its config does not describe a model this cmfast builds")}
    for name, (meta, msg) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(save(tensors, metadata=meta))
        with pytest.raises(ckpt.CheckpointError, match=f"^{path}: {msg}"):
            ckpt.load_model(str(path))
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            sample_main(["--checkpoint", str(path), "--num", "1", "--out", str(tmp_path / "o.png")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"cmfast-sample: error: {path}: {msg}") and err.count("\n") == 1


def test_full_disk_during_training_is_one_line_and_resumable(tmp_path, monkeypatch, capsys):
    """The disk filling up at a checkpoint write was an OSError traceback from cmfast-train (only PermissionError and
    friends were caught). Now one line naming the step and folder, exit 2; the checkpoints before it are whole and
    --resume latest continues from them."""
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    out = str(tmp_path / "run")
    real = ckpt._write_chunks

    def fill_at_step_2(f, data, chunk=1 << 24):
        if "ckpt-00000002" in f.name:
            f.write(data[:len(data) // 2])
            raise OSError(28, "No space left on device")
        return real(f, data, chunk)
    monkeypatch.setattr(ckpt, "_write_chunks", fill_at_step_2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _run(out, folder, "--steps", "3", "--ckpt-every", "1", "--sample-num", "0")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("cmfast-train: error: ")
    assert f"cannot write the checkpoint of step 2 in {out} (No space left on device)" in err
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    assert [s for s, _, _ in ckpt.list_checkpoints(out)] == [1]
    monkeypatch.setattr(ckpt, "_write_chunks", real)
    assert _run(out, folder, "--steps", "3", "--ckpt-every", "1", "--sample-num", "0", "--resume", "latest") == 0
    assert "ckpt-00000001.safetensors at step 1" in capsys.readouterr().out
    assert [s for s, _, _ in ckpt.list_checkpoints(out)] == [2, 3]            # --keep 2


def test_rewriting_a_step_never_pairs_new_weights_with_the_old_state(tmp_path, monkeypatch):
    """A run resumed before its newest checkpoints (the newest was unreadable, or --resume named an older one)
    rewrites their steps. The weights were replaced first and the state second: a crash in between left the new
    weights beside the other line's state, a complete-looking pair that --resume latest would load. Now the old
    state goes first, so such a step is incomplete (ignored) until its new state is written."""
    out = str(tmp_path)
    ckpt.save_checkpoint(out, 3, {"model": {"w": torch.zeros(3)}}, {"method": "ct"}, {"line": "old"}, keep=0)
    real = ckpt.atomic_write

    def crash_at_state(path, data):
        if path.endswith(".state.pt"):
            raise KeyboardInterrupt     # killed between the two writes
        real(path, data)
    monkeypatch.setattr(ckpt, "atomic_write", crash_at_state)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(out, 3, {"model": {"w": torch.ones(3)}}, {"method": "ct"}, {"line": "new"}, keep=0)
    assert torch.equal(ckpt.load_weights(ckpt.paths(out, 3)[0])[0]["model"]["w"], torch.ones(3))   # new weights
    assert ckpt.list_checkpoints(out) == []         # not paired with the old line's state


def test_keep_never_prunes_the_checkpoint_just_written(tmp_path, capsys):
    """Resumed from before a corrupt newest checkpoint, --keep 1 kept the corrupt later one and deleted both the
    checkpoint resumed from and the one just written: everything was lost. Only checkpoints up to the step written
    are pruned now."""
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    out = str(tmp_path / "run")
    assert _run(out, folder, "--ckpt-every", "2", "--keep", "0") == 0
    assert [s for s, _, _ in ckpt.list_checkpoints(out)] == [2, 4]
    with open(os.path.join(out, "ckpt-00000004.safetensors"), "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    assert _run(out, folder, "--ckpt-every", "2", "--keep", "1", "--resume", "latest", "--stop-at", "3") == 0
    log = capsys.readouterr().out
    assert "ckpt-00000002.safetensors at step 2" in log and "later steps (4)" in log
    assert [s for s, _, _ in ckpt.list_checkpoints(out)] == [3, 4]          # 2 pruned (keep 1), 3 kept, 4 left
    assert _run(out, folder, "--ckpt-every", "2", "--keep", "1", "--resume", "latest") == 0
    log = capsys.readouterr().out
    assert "ckpt-00000003.safetensors at step 3" in log                     # 4 unreadable: back to 3
    assert [s for s, _, _ in ckpt.list_checkpoints(out)] == [4]             # the run overwrote 4 and went on


def test_stop_at_already_reached_trains_nothing(tmp_path, capsys):
    """A rerun of a job that stopped at --stop-at (a requeue) trained one more step and checkpointed it each time."""
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    out = str(tmp_path / "run")
    assert _run(out, folder, "--stop-at", "3") == 0
    before = [s for s, _, _ in ckpt.list_checkpoints(out)]
    capsys.readouterr()
    for stop in ("3", "2"):
        assert _run(out, folder, "--resume", "latest", "--stop-at", stop) == 0
        assert f"at step 3 already (--stop-at {stop}): nothing to train" in capsys.readouterr().out
        assert [s for s, _, _ in ckpt.list_checkpoints(out)] == before == [2, 3]


def _nan_ct_loss(monkeypatch, bad):
    """CT's loss times NaN at the steps where bad(step); returns the real loss."""
    from cmfast.training import methods
    real = methods.CT.loss

    def loss(self, models, x, step, cfg, generator, class_labels=None):
        value, info = real(self, models, x, step, cfg, generator, class_labels)
        return (value * float("nan") if bad(step) else value), info
    monkeypatch.setattr(methods.CT, "loss", loss)
    return real


def test_stats_row_of_only_skipped_steps_has_no_loss(tmp_path, monkeypatch):
    """A logging interval whose steps were all skipped (non-finite) reported loss 0 and grad norm 0: now null."""
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    _nan_ct_loss(monkeypatch, lambda step: step >= 2)
    out = str(tmp_path / "run")
    assert _run(out, folder, "--log-every", "1", "--nan-limit", "5") == 0
    r = rows(out)
    assert [x["loss"] is None for x in r] == [False, False, True, True]
    assert r[1]["loss"] > 0 and r[1]["grad_norm"] > 0 and r[3]["grad_norm"] is None and r[3]["skipped"] == 2


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch, capsys):
    from cmfast.training import methods
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    real = _nan_ct_loss(monkeypatch, lambda step: step == 1)
    out = str(tmp_path / "run")
    assert _run(out, folder, "--steps", "3") == 0
    r = rows(out)
    assert r[-1]["skipped"] == 1 and all(np.isfinite(x["loss"]) for x in r)
    monkeypatch.setattr(methods.CT, "loss", lambda self, models, x, step, cfg, g, c=None:
                        (real(self, models, x, step, cfg, g, c)[0] * float("inf"), {}))
    with pytest.raises(SystemExit) as e:
        _run(str(tmp_path / "bad"), folder, "--nan-limit", "2")
    assert e.value.code == 1
    assert "2 consecutive non-finite steps" in capsys.readouterr().err


def test_nonfinite_streak_survives_a_resume(tmp_path, monkeypatch, capsys):
    """The count of consecutive non-finite steps (--nan-limit) was not in the checkpoint: a run resumed inside a streak
    counted from 0 again and trained on where the uninterrupted run stopped (here: to step 4, exit 0)."""
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    _nan_ct_loss(monkeypatch, lambda step: step >= 1)
    out = str(tmp_path / "run")
    nan = ["--nan-limit", "3", "--log-every", "1"]
    assert _run(out, folder, *nan, "--stop-at", "2") == 0                        # steps 0 (finite) and 1 (not)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:                                          # steps 2, 3: the streak reaches 3
        _run(out, folder, *nan, "--resume", "latest")
    assert e.value.code == 1 and "3 consecutive non-finite steps" in capsys.readouterr().err
    assert [x["step"] for x in rows(out)] == [1, 2, 3]                            # as without the interruption


def test_sigterm_checkpoints_and_exits_0(tmp_path, monkeypatch):
    from cmfast.training import methods
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    real = methods.CT.loss

    def signal_at_step_1(self, models, x, step, cfg, generator, class_labels=None):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)     # arrives mid-step: the step finishes, then a checkpoint
        return real(self, models, x, step, cfg, generator, class_labels)
    monkeypatch.setattr(methods.CT, "loss", signal_at_step_1)
    out = str(tmp_path / "run")
    assert _run(out, folder, "--steps", "50", "--ckpt-every", "100") == 0
    assert [s for s, _, _ in ckpt.list_checkpoints(out)] == [2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, precision):
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    out = str(tmp_path / "run")
    assert _run(out, folder, "--steps", "2", "--precision", precision) == 0
    r = rows(out)
    assert all(np.isfinite(x["loss"]) for x in r) and r[-1]["skipped"] == 0
    st = torch.load(os.path.join(out, "ckpt-00000002.state.pt"), weights_only=True)
    assert bool(st["scaler"]) == (precision == "fp16")       # fp16 trains with loss scaling, its state is saved
    # The weights stay fp32 (only the backbone runs in low precision); load_model takes the state file too.
    model, meta = ckpt.load_model(os.path.join(out, "ckpt-00000002.state.pt"))
    assert meta["step"] == 2 and all(p.dtype == torch.float32 for p in model.parameters())
    # The same steps in fp32: the loss and the logged gradient norm agree to low-precision rounding. fp16's norm is
    # that of the unscaled gradients (a missing unscale_ before clipping and the norm would show 65536x; Adam,
    # invariant to the gradient's scale, would not show it in the weights).
    out32 = str(tmp_path / "run32")
    assert _run(out32, folder, "--steps", "2", "--precision", "fp32") == 0
    for a, b in zip(r, rows(out32)):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.05)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.1)


# ---- --compile ------------------------------------------------------------------------------------------------------
# Inductor compiles take minutes on 2 CPU cores, so these tests trace with dynamo only: CMFAST_COMPILE_BACKEND=eager
# (cmfast.training.loop.compile_nets) runs the traced graphs op by op, which is bit-identical to eager, so losses,
# weights and resumes can be compared exactly. test_compile_inductor_tiny_run compiles for real.
@pytest.fixture
def dynamo(monkeypatch):
    from torch._dynamo.utils import counters
    monkeypatch.setenv("CMFAST_COMPILE_BACKEND", "eager")
    torch._dynamo.reset()       # compiled code is cached per code object (UNet.forward): start each test clean
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_compile_matches_eager_with_the_same_checkpoint_keys(tmp_path, dynamo):
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    a, b = str(tmp_path / "eager"), str(tmp_path / "compiled")
    assert _run(a, folder, "--steps", "3", "--log-every", "1") == 0
    assert not dynamo["stats"]["unique_graphs"]
    assert _run(b, folder, "--steps", "3", "--log-every", "1", "--keep", "0", "--compile") == 0
    # ct runs the online net with grad and the target under no_grad: two graphs of the whole UNet, no graph break
    assert dynamo["stats"]["unique_graphs"] == 2 and not dynamo["graph_break"], dict(dynamo)
    ra, rb = rows(a), rows(b)
    assert [x["loss"] for x in ra] == pytest.approx([x["loss"] for x in rb], rel=1e-6, abs=1e-9)
    assert [x.get("compile_warmup") for x in rb] == [True, None, None]     # the interval that includes compiling
    assert "compile_warmup" not in ra[0]
    with open(os.path.join(b, "log.txt")) as f:
        log = f.read()
    assert "torch.compile mode default (eager backend, cmfast.ops backend auto) of model.net, target.net" in log
    wa, wb = (load_file(os.path.join(d, "ckpt-00000003.safetensors")) for d in (a, b))
    assert set(wa) == set(wb) and not any("_orig_mod" in k for k in wb)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7), k
    # Checkpoint readers see a plain model; the EMA followed the trained weights.
    model, meta = ckpt.load_model(b, which="ema@0.5")
    assert meta["config"]["compile"] == "default" and meta["config"]["backend"] == "auto"
    assert torch.equal(model.net.out_conv.weight, wb["ema@0.5/net.out_conv.weight"])
    assert not torch.equal(wb["ema@0.5/net.out_conv.weight"], load_file(
        os.path.join(b, "ckpt-00000001.safetensors"))["ema@0.5/net.out_conv.weight"])


@pytest.mark.parametrize("first, second", [(["--compile"], []), ([], ["--compile", "reduce-overhead"])])
def test_compile_resume_either_way_is_exact(tmp_path, dynamo, first, second):
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert _run(a, folder) == 0
    assert _run(b, folder, "--stop-at", "2", *first) == 0
    assert _run(b, folder, "--resume", "latest", *second) == 0
    wa, wb = (load_file(os.path.join(d, "ckpt-00000004.safetensors")) for d in (a, b))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [x["loss"] for x in rows(a)][2:] == [x["loss"] for x in rows(b)][2:]


@pytest.mark.parametrize("jvp", ["fd", "exact"])
def test_compile_sct_dropout_masks_and_jvp(tmp_path, dynamo, jvp):
    # sCT's online forward records its dropout masks (a torch function mode) and the finite-difference forward of
    # 2B replays them: both trace into the compiled UNet; torch.func.jvp (jvp=exact) runs that pass eagerly.
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    argv = ["--method", "sct", "--dropout", "0.2", "--method-arg", f"jvp={jvp}", "--method-arg", "warmup_steps=2",
            "--steps", "3", "--log-every", "1", "--sample-num", "0"]
    common = ["--dataset", "folder", "--data-dir", folder, "--preset", "tiny", "--batch-size", "4", "--lr", "1e-3"]
    assert train_main([*common, *argv, "--output-dir", str(tmp_path / "a")]) == 0
    assert train_main([*common, *argv, "--output-dir", str(tmp_path / "b"), "--compile"]) == 0
    assert dynamo["stats"]["unique_graphs"] == (1 if jvp == "exact" else 2) and not dynamo["graph_break"]
    la, lb = ([x["loss"] for x in rows(str(tmp_path / d))] for d in "ab")
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_compile_inductor_tiny_run(tmp_path, monkeypatch):
    # The real compiler: 2 edm steps (one graph, the online net with its backward). Measured on 2 shared CPU cores:
    # ~55 s with an empty inductor cache (C++ codegen and compile of every kernel), ~5 s with a warm one.
    import shutil
    if not torch.cuda.is_available() and not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("inductor on CPU needs a C++ compiler")
    monkeypatch.delenv("CMFAST_COMPILE_BACKEND", raising=False)
    torch._dynamo.reset()
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    argv = ["--dataset", "folder", "--data-dir", folder, "--method", "edm", "--preset", "tiny", "--batch-size", "4",
            "--steps", "2", "--log-every", "1", "--sample-num", "0", "--lr", "1e-3"]
    try:
        assert train_main([*argv, "--output-dir", str(tmp_path / "a")]) == 0
        assert train_main([*argv, "--output-dir", str(tmp_path / "b"), "--compile"]) == 0
    finally:
        torch._dynamo.reset()
    ra, rb = rows(str(tmp_path / "a")), rows(str(tmp_path / "b"))
    assert rb[0]["compile_warmup"] and "compile_warmup" not in rb[1]
    assert [x["loss"] for x in ra] == pytest.approx([x["loss"] for x in rb], rel=1e-3)   # fused kernels round anew
    wa, wb = (load_file(os.path.join(str(tmp_path / d), "ckpt-00000002.safetensors")) for d in "ab")
    assert set(wa) == set(wb)
    with open(os.path.join(str(tmp_path / "b"), "log.txt")) as f:
        assert "(inductor backend, cmfast.ops backend auto) of model.net" in f.read()


def test_log_lines_show_elapsed_and_eta(tmp_path):
    """stats.jsonl rows carry the run's elapsed seconds; the console / log.txt line shows them and an ETA instead of
    the raw Unix time (which stays in stats.jsonl)."""
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    out = str(tmp_path / "run")
    assert _run(out, folder, "--steps", "3", "--log-every", "1") == 0
    r = rows(out)
    assert [x["step"] for x in r] == [1, 2, 3] and all("time" in x for x in r)
    assert 0 <= r[0]["elapsed_s"] <= r[1]["elapsed_s"] <= r[2]["elapsed_s"]
    lines = open(os.path.join(out, "log.txt")).read().splitlines()
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert len(steps) == 3 and all(" elapsed_s " in ln and " eta_s " in ln and " time " not in ln for ln in steps)
    assert steps[-1].endswith("eta_s 0")


def test_time_budget_plan_is_the_steps_that_fit_in_the_minutes_left():
    """--time-budget M (minutes): after the probe at step k, K = k + floor(0.95 (60 M - elapsed s) / (s a step)),
    kimg = K * batch / 1000; a budget already spent plans no further step. (Reading M as seconds, or dropping the
    k steps already run, passed the end-to-end test, whose budget of 2.4 s is spent by the probe.)"""
    from cmfast.training.loop import PLAN_FILL, PROBE_TIMED, _plan_length
    assert PLAN_FILL == 0.95 and PROBE_TIMED == 8
    logged = []
    cfg = {"time_budget": 2.0, "batch_size": 4, "total_steps": 10 ** 9, "kimg": None}
    _plan_length(cfg, 10, 0.25, 12.0, 1, torch.device("cpu"), logged.append)
    total = 10 + int(0.95 * (2.0 * 60 - 12.0) / 0.25)                     # 10 + 410
    assert cfg["total_steps"] == total == 420 and cfg["kimg"] == pytest.approx(420 * 4 / 1000)
    assert cfg["planned"] == {"total_steps": 420, "at_step": 10, "ms_per_step": 250.0, "elapsed_s": 12.0,
                              "time_budget_min": 2.0}
    assert logged == ["--time-budget 2 min: 250.0 ms a step over steps 2-10, 12.0 s spent -> 420 steps in all"]
    cfg = {"time_budget": 0.5, "batch_size": 4, "total_steps": 10 ** 9, "kimg": None}
    _plan_length(cfg, 10, 0.25, 40.0, 1, torch.device("cpu"), logged.append)
    assert cfg["total_steps"] == 10


def test_evaluation_ema_follows_its_warm_up_rate(tmp_path):
    """Each evaluation EMA after step k (0-based) is theta_ema <- mu theta_ema + (1 - mu) theta with
    mu = min(rate, (1 + k) / (10 + k)): checked in float64 between the checkpoints of steps 2 and 3 (k = 2: mu 0.1 for
    rate 0.1, 0.25 for rate 0.9). Without the warm-up (mu = rate) or without an update every test passed."""
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    out = str(tmp_path / "run")
    assert _run(out, folder, "--steps", "3", "--keep", "0", "--ema", "0.1,0.9") == 0
    w2, w3 = (load_file(ckpt.paths(out, s)[0]) for s in (2, 3))
    names = [k.split("/", 1)[1] for k in w3 if k.startswith("model/") and w3[k].is_floating_point()]
    assert names
    for rate, mu in ((0.1, 0.1), (0.9, 0.25)):
        for n in names:
            want = mu * w2[f"ema@{rate}/{n}"].double() + (1 - mu) * w3[f"model/{n}"].double()
            torch.testing.assert_close(w3[f"ema@{rate}/{n}"].double(), want, rtol=1e-5, atol=1e-7, msg=n)


def test_nan_limit_counts_consecutive_steps_only(tmp_path, monkeypatch, capsys):
    """--nan-limit 3 stops at 3 non-finite steps in a row, not at 3 in all: a finite step resets the count. Steps 1, 2,
    4, 5 non-finite (never 3 in a row) run to the end with 4 skipped; 4, 5, 6 stop the run."""
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    _nan_ct_loss(monkeypatch, lambda step: step in (1, 2, 4, 5))
    out = str(tmp_path / "run")
    assert _run(out, folder, "--steps", "7", "--nan-limit", "3", "--log-every", "1", "--ckpt-every", "100") == 0
    r = rows(out)
    assert [x["step"] for x in r] == list(range(1, 8)) and r[-1]["skipped"] == 4
    _nan_ct_loss(monkeypatch, lambda step: step in (1, 2, 4, 5, 6))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _run(str(tmp_path / "bad"), folder, "--steps", "9", "--nan-limit", "3", "--ckpt-every", "100")
    assert e.value.code == 1 and "3 consecutive non-finite steps" in capsys.readouterr().err


def test_lr_warm_up_is_linear_in_images(tmp_path):
    """--lr-rampup-kimg R: lr at step k (0-based) is lr min(1, (k + 1) batch / (1000 R)), EDM's warm-up: batch 4 over
    10 images gives 0.4, 0.8, then 1 x --lr (a step late, the first step ran at lr 0 and passed)."""
    folder = str(tmp_path / "imgs")
    write_png_folder(folder, n=6, size=16)
    out = str(tmp_path / "run")
    assert _run(out, folder, "--steps", "3", "--lr-rampup-kimg", "0.01", "--log-every", "1", "--ckpt-every", "100") == 0
    assert [x["lr"] for x in rows(out)] == pytest.approx([1e-3 * 0.4, 1e-3 * 0.8, 1e-3])
