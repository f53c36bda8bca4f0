"""cmfast.training.loop's helpers called directly (resume, start-up checks, logging, stats rows), against hand-written
expectations (mutation gaps: each test failed with the mutation named in its docstring)."""
import json
import os
import types

import pytest
import torch

from cmfast.data import Sampler
from cmfast.training import checkpoint as ckpt
from cmfast.training import loop as L


def test_cannot_write_is_one_line_with_the_errno_and_what_is_kept():
    """(mutants: kept False by default; errno dropped)"""
    e = L._cannot_write("log.txt", OSError(28, "No space left on device"))
    assert str(e) == ("cannot write log.txt (No space left on device); the checkpoints written before it are kept: "
                      "--resume latest continues from them") and e.errno == 28
    e = L._cannot_write("config.json", OSError(13, "Permission denied"), kept=False)
    assert str(e) == "cannot write config.json (Permission denied)" and e.errno == 13


def test_log_keeps_its_first_failure_and_stops_writing_log_txt(tmp_path, capsys):
    """Under torchrun (defer) a failed line of log.txt is kept, not raised; the first failure is the one told; later
    lines go to the console only, even once the file could be written (mutants: the last failure kept; log.txt written
    again). One process: raised at once. Not rank 0 (path None): silent."""
    path = tmp_path / "gone" / "log.txt"
    log = L.Log(str(path), defer=True)
    log("first")
    first = log.failed
    assert isinstance(first, OSError) and str(first).startswith(f"cannot write {path} (No such file or directory)")
    log.fail(OSError("second"))
    assert log.failed is first
    (tmp_path / "gone").mkdir()
    log("second line")
    assert not path.exists() and capsys.readouterr().out == "first\nsecond line\n"
    with pytest.raises(OSError, match=r"^cannot write .*log\.txt \(No such file"):
        L.Log(str(tmp_path / "no" / "log.txt"))("x")
    L.Log(None)("quiet")
    ok = L.Log(str(tmp_path / "log.txt"))
    ok("a"), ok("b")
    assert (tmp_path / "log.txt").read_text() == "a\nb\n" and capsys.readouterr().out == "x\na\nb\n"  # not 'quiet'


def test_startup_checks_refuse_a_folder_and_resume_that_disagree(tmp_path):
    """A folder with one checkpoint and no --resume; --resume latest on an empty folder; --resume naming no
    checkpoint: each refused in one line; --resume auto on an empty folder starts afresh (mutants: one checkpoint
    allowed; latest on nothing allowed; the named path not checked)."""
    out = str(tmp_path / "run")
    cfg = {"method": "ct", "output_dir": out, "resume": None, "init_from_teacher": True}
    assert L.startup_checks(dict(cfg), (1, 8, 8)) == (None, None, [])
    assert L.startup_checks(dict(cfg, resume="auto"), (1, 8, 8)) == (None, None, [])
    with pytest.raises(ValueError, match=r"^--resume latest: no checkpoint \(ckpt-\*\.safetensors with its "
                                         rf"\.state\.pt\) in {out}$"):
        L.startup_checks(dict(cfg, resume="latest"), (1, 8, 8))
    with pytest.raises(ckpt.CheckpointError, match=r"^checkpoint not found: .*nothing\.safetensors$"):
        L.startup_checks(dict(cfg, resume=str(tmp_path / "nothing.safetensors")), (1, 8, 8))
    os.makedirs(out)
    ckpt.save_checkpoint(out, 3, {"model": {"w": torch.ones(1)}}, {}, {})
    with pytest.raises(ValueError, match=rf"^{out} already holds checkpoints: pass --resume latest"):
        L.startup_checks(dict(cfg), (1, 8, 8))
    assert L.startup_checks(dict(cfg, resume="latest"), (1, 8, 8))[2] == [(3, *ckpt.paths(out, 3))]


def test_dry_runs_sampler_is_refused_past_the_known_image_count():
    """--dry-run's sampler of a folder of 5 images refuses a position at image 6 as the run's would; with no count it
    takes any position (mutant: the count ignored)."""
    real = Sampler(10, 0)
    real.next(6)
    sd = real.state_dict()
    with pytest.raises(ValueError, match=r"^the sampler stopped at image 6 of an epoch, but the dataset has 5 "):
        L._SamplerOfItsState(0, 5).load_state_dict(sd)
    s = L._SamplerOfItsState(0)
    s.load_state_dict(sd)
    assert s.pos == 6


def test_make_optimizer_takes_the_configs_kind_lr_betas_and_eps_1e_8():
    """(mutant: eps 1e-6)"""
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = L.make_optimizer(p, {"optimizer": "radam", "lr": 0.01, "betas": [0.8, 0.99]})
    assert type(opt) is torch.optim.RAdam
    assert {k: opt.defaults[k] for k in ("lr", "betas", "eps")} == {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-8}
    assert type(L.make_optimizer(p, {"optimizer": "adam", "lr": 1, "betas": [0.9, 0.999]})) is torch.optim.Adam


def test_changed_settings_name_each_change_of_a_resumed_run():
    """A list and a tuple of the same numbers are no change; a setting the checkpoint's config lacks is not named; each
    hyperparameter in method_args is named, on either side alone too (mutants: tuple vs list; a setting absent
    there named; keys only in the new method_args missed)."""
    was = {"lr": 1e-3, "betas": [0.9, 0.999], "batch_size": 4, "method_args": {"a": 1, "c": 3}, "net": {"x": 1}}
    now = {"lr": 2e-3, "betas": (0.9, 0.999), "batch_size": 4, "method_args": {"a": 1, "b": 2}, "seed": 7,
           "net": {"x": 2}}
    assert L._changed_settings(was, now) == ["lr 0.001 -> 0.002", "b None -> 2", "c 3 -> None"]


def test_identity_mismatch_names_the_net_keys_that_differ():
    """(mutant: a net change named as two whole dicts)"""
    cfg = {"dataset": "folder", "method": "ct", "net": {"label_dim": 10, "dropout": 0.1}, "sigma_data": 0.5,
           "sigma_min": 0.002, "sigma_max": 80.0}
    L._check_identity("w", dict(cfg), cfg)
    with pytest.raises(ValueError, match=r"^--resume w: the checkpoint differs from this command in net \(label_dim "
                                         r"0 there, 10 here\)$"):
        L._check_identity("w", dict(cfg, net={"label_dim": 0, "dropout": 0.1}), cfg)
    with pytest.raises(ValueError, match=r"^--resume w: the checkpoint differs from this command in method, sigma_max "
                                         r"\(method 'ict' there, 'ct' here; sigma_max 40\.0 there, 80\.0 here\)$"):
        L._check_identity("w", dict(cfg, method="ict", sigma_max=40.0), cfg)


def test_a_resumed_time_budget_keeps_its_plan():
    """--time-budget resumed: the plan's total steps and kimg at this batch size; without --time-budget a planned
    checkpoint's length is not taken (mutants: taken without --time-budget; kimg left as it was)."""
    planned = {"total_steps": 420, "at_step": 10}
    cfg = {"time_budget": 2.0, "total_steps": 10 ** 9, "kimg": 1.0, "batch_size": 8}
    L._keep_plan({"planned": planned}, cfg)
    assert cfg == {"time_budget": 2.0, "total_steps": 420, "kimg": 420 * 8 / 1000, "batch_size": 8, "planned": planned}
    cfg = {"time_budget": None, "total_steps": 50, "kimg": 0.2, "batch_size": 4}
    L._keep_plan({"planned": planned}, cfg)
    assert cfg == {"time_budget": None, "total_steps": 50, "kimg": 0.2, "batch_size": 4}


def test_first_readable_says_whether_a_previous_checkpoint_follows():
    """(mutants: 'the previous one' promised after the last; the output folder named for a --resume path)"""
    said = []

    def read(w):
        if w != "c":
            raise ckpt.CheckpointError(f"{w} bad")
        return 42
    cfg = {"output_dir": "out", "resume": "latest"}
    assert L._first_readable(["a", "b", "c"], cfg, read, lambda e, more: said.append((str(e), more))) == ("c", 42)
    assert said == [("a bad", True), ("b bad", True)]
    said.clear()
    with pytest.raises(ValueError, match=r"^--resume: no readable checkpoint in out$"):
        L._first_readable(["a", "b"], cfg, read, lambda e, more: said.append((str(e), more)))
    assert said == [("a bad", True), ("b bad", False)]
    with pytest.raises(ValueError, match=r"^--resume: no readable checkpoint in x/ckpt\.safetensors$"):
        L._first_readable(["a"], {"output_dir": "out", "resume": "x/ckpt.safetensors"}, read, lambda e, m: None)


def test_check_parts_names_what_a_pair_lacks_and_checks_each_ema():
    """(mutants: a missing target or counters passed; the EMA modules not checked)"""
    models = {"model": 1, "target": 2}
    state = {k: 0 for k in ("step", "optimizer", "sampler", "rng", "counters")}
    asked = []
    weights = {"ema@0.5": {}, "model": {}, "target": {}, "ema@0.9": {}}
    L._check_parts("w", weights, state, models, {0.9: None, 0.5: None, 0.1: None}, asked.append)
    assert asked == [["model", "target", "ema@0.9", "ema@0.5"]]
    with pytest.raises(ckpt.CheckpointError, match=r"^w: not a whole checkpoint of this run \(no 'target', "
                                                   r"'counters'\)$"):
        L._check_parts("w", {"model": {}}, {k: v for k, v in state.items() if k != "counters"}, models, {},
                       asked.append)


def _tiny_run_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    return model, opt


def test_load_into_restores_every_part_for_its_rank(tmp_path):
    """The online weights, a new EMA rate from the online weights (not another EMA's), the optimizer, the fp16 scaler's
    scale, the sampler and rank 1's own RNG state; step and counters returned (mutants: the scaler skipped; only rank 0
    setting its RNG; the new EMA from the first module of the file)."""
    model, opt = _tiny_run_state()
    sampler = Sampler(10, 3)
    sampler.next(4)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    torch.manual_seed(11)
    rng0 = ckpt.rng_state()
    torch.manual_seed(12)
    rng1 = ckpt.rng_state()
    want = torch.rand(4)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ema9 = {k: torch.full_like(v, 0.9) for k, v in sd.items()}
    weights = {"ema@0.9": ema9, "model": sd}              # load_weights' order: module names sorted
    state = {"step": 17, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "sampler": sampler.state_dict(),
             "rng": [rng0, rng1], "counters": {"skipped": 2, "overflow": 1, "nonfinite_streak": 1}}
    new_model, new_opt = torch.nn.Linear(2, 2), torch.optim.Adam(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    emas = {0.9: torch.nn.Linear(2, 2), 0.5: torch.nn.Linear(2, 2)}
    new_scaler, new_sampler, said = torch.amp.GradScaler("cpu"), Sampler(10, 0), []
    step, counters = L._load_into("w", weights, state, {"model": new_model}, emas, new_opt, new_scaler, new_sampler,
                                  1, said.append)
    assert step == 17 and counters == {"skipped": 2, "overflow": 1, "nonfinite_streak": 1}
    assert torch.equal(torch.rand(4), want)                                    # rank 1's state, not rank 0's
    assert said == ["EMA rate 0.5 is new: it starts from the online weights"]
    assert all(torch.equal(emas[0.5].state_dict()[k], sd[k]) for k in sd)
    assert all(torch.equal(emas[0.9].state_dict()[k], ema9[k]) for k in sd)
    assert all(torch.equal(new_model.state_dict()[k], sd[k]) for k in sd)
    assert new_scaler.get_scale() == 256.0
    assert new_sampler.state_dict()["pos"] == 4
    assert new_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"] == 1
    torch.manual_seed(5)
    before = torch.get_rng_state()
    L._load_into("w", weights, state, {"model": new_model}, emas, new_opt, None, Sampler(10, 0), 2, said.append)
    assert torch.equal(torch.get_rng_state(), before)                          # a rank the run did not have
    with pytest.raises(ckpt.CheckpointError, match=r"^w: does not fit this run \(RuntimeError: .*size mismatch"):
        L._load_into("w", weights, state, {"model": torch.nn.Linear(3, 2)}, {}, new_opt, None, Sampler(10, 0), 0,
                     said.append)


def test_trim_stats_drops_the_rows_after_the_step_resumed_from(tmp_path):
    """Rows of steps after the checkpoint's (and a cut-off line) go, the step's own row stays; one row past it is
    trimmed too (mutants: '<' step; a single extra row left)."""
    path = tmp_path / "stats.jsonl"
    rows = [json.dumps({"step": s, "loss": s / 10}) for s in (1, 2, 3)]
    path.write_text("\n".join(rows) + "\n")
    said = []
    L._trim_stats(str(tmp_path), 2, said.append)
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"
    assert said == ["stats.jsonl: 1 row(s) after step 2 removed (this run logs those steps anew)"]
    path.write_text("\n".join(rows) + '\n{"step": 4, "lo')
    L._trim_stats(str(tmp_path), 1, said.append)
    assert path.read_text() == rows[0] + "\n" and said[-1].startswith("stats.jsonl: 3 row(s) after step 1 removed")
    L._trim_stats(str(tmp_path / "none"), 1, said.append)
    assert len(said) == 2


def test_stats_row_means_over_the_intervals_finite_steps(monkeypatch):
    """loss and grad norm are the interval's sums over its finite steps, null with none; kimg is step x batch / 1000;
    img/s counts the interval's steps only (mutants: 0 for no finite step; 1024; steps since 0). The loop's clock
    stands at 2 s after the interval's start (a real clock's delay under load moved img/s)."""
    monkeypatch.setattr(L, "time", types.SimpleNamespace(time=lambda: 1002.0, monotonic=lambda: 1002.0))
    tick = {"loss": 3.0, "gnorm": 6.0, "n": 2, "t0": 1000.0, "step0": 4, "warmup": False}
    counters = {"skipped": 1, "overflow": 0}
    row = L._stats_row(6, {"batch_size": 8}, tick, {"N": 5, "extra": 1.5}, 1e-3, counters, torch.device("cpu"))
    assert (row["step"], row["kimg"], row["loss"], row["grad_norm"], row["N"], row["mu"], row["extra"], row["lr"]) == \
        (6, 0.048, 1.5, 3.0, 5, None, 1.5, 1e-3)
    assert row["img_per_s"] == 16 / 2.0 and row["time"] == 1002.0
    assert row["skipped"] == 1 and "compile_warmup" not in row
    row = L._stats_row(6, {"batch_size": 8}, dict(tick, n=0, warmup=True), {}, 1e-3, counters, torch.device("cpu"))
    assert row["loss"] is None and row["grad_norm"] is None and row["compile_warmup"] is True


@pytest.fixture
def clock(monkeypatch, one_thread):
    """The loop's clock (time.time and time.monotonic) made to stand still but for 1 s at each step's loss: each step
    then takes 1 s exactly."""

    from cmfast.training import methods
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    t = [1000.0]
    monkeypatch.setattr(L, "time", types.SimpleNamespace(time=lambda: t[0], monotonic=lambda: t[0]))
    real = methods.ICT.loss

    def loss(self, *a, **k):
        t[0] += 1.0
        return real(self, *a, **k)
    monkeypatch.setattr(methods.ICT, "loss", loss)
    return t


def _fm_run(tmp_path, *extra):
    from cmfast.cli.train import main
    from train_fixtures import write_fmnist
    if not (tmp_path / "fm").exists():
        write_fmnist(tmp_path / "fm", n=8)
    return main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm"), "--method", "ict", "--preset",
                 "tiny", "--loss", "l2", "--batch-size", "4", "--sample-num", "0", "--ckpt-every", "100",
                 "--output-dir", str(tmp_path / "run"), *extra])


def _log_steps(tmp_path):
    lines = (tmp_path / "run" / "log.txt").read_text().splitlines()
    return [dict(zip(ln.split()[::2], ln.split()[1::2])) for ln in lines if ln.startswith("step ")]


def test_eta_and_img_per_s_count_this_runs_steps_to_its_end(tmp_path, clock):
    """At 1 s a step: img/s is batch / 1 s = 4 in every row; elapsed is this run's seconds; the ETA is the steps left
    to this run's end (--stop-at, else --steps) at this run's speed: 2, 1, 0 to --stop-at 3, and after a resume from
    3 to --stop-at 6 again 2, 1, 0 (mutants: the ETA to --steps 8; steps counted from 0 not from the resume; img/s of
    every step since 0). The state file's RNG is one process's dict, its counters all 0 (mutant: a list). A later
    step's incomplete checkpoint is noted as later too (mutant: complete ones only)."""
    assert _fm_run(tmp_path, "--steps", "8", "--stop-at", "3", "--log-every", "1") == 0
    w3, w7 = ckpt.paths(str(tmp_path / "run"), 3)[0], ckpt.paths(str(tmp_path / "run"), 7)[0]
    with open(w3, "rb") as a, open(w7, "wb") as b:       # a later step's weights without their state: incomplete
        b.write(a.read())
    assert _fm_run(tmp_path, "--steps", "8", "--stop-at", "6", "--log-every", "1", "--resume", "latest") == 0
    assert "note: checkpoints of later steps (7) stay in" in (tmp_path / "run" / "log.txt").read_text()
    with open(tmp_path / "run" / "stats.jsonl") as f:
        rows = [json.loads(x) for x in f]
    assert [(r["step"], r["elapsed_s"], r["img_per_s"]) for r in rows] == \
        [(1, 1.0, 4.0), (2, 2.0, 4.0), (3, 3.0, 4.0), (4, 1.0, 4.0), (5, 2.0, 4.0), (6, 3.0, 4.0)]
    assert [(x["step"], x["eta_s"]) for x in _log_steps(tmp_path)] == \
        [("1", "2"), ("2", "1"), ("3", "0"), ("4", "2"), ("5", "1"), ("6", "0")]
    state = ckpt.load_state(ckpt.paths(str(tmp_path / "run"), 6)[1])
    assert sorted(state["rng"]) == ["cuda", "numpy", "python", "torch"]
    assert state["counters"] == {"skipped": 0, "overflow": 0, "nonfinite_streak": 0}


def test_time_limit_is_minutes_and_stops_after_the_step_that_passes_it(tmp_path, clock):
    """--time-limit 0.05 (3 s) at 1 s a step: 3 s is not past it, 4 s is: the run stops after step 4 with its
    checkpoint (mutants: read as seconds, stopping after step 1; '>=' stopping after step 3)."""
    assert _fm_run(tmp_path, "--steps", "50", "--log-every", "100", "--time-limit", "0.05") == 0
    assert [s for s, _, _ in ckpt.list_checkpoints(str(tmp_path / "run"))] == [4]
    assert "stopping at step 4 (--time-limit)" in (tmp_path / "run" / "log.txt").read_text()


def test_a_nan_loss_under_fp16_is_a_skipped_step_not_a_scaler_overflow(tmp_path, monkeypatch, one_thread):
    """fp16 loss scaling: a step whose loss itself is NaN is skipped (and counts towards --nan-limit), not counted as
    the scaler's overflow, which is a finite loss with inf gradients (mutant: every non-finite fp16 step an
    overflow)."""
    from cmfast.training import methods
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    real = methods.ICT.loss

    def loss(self, models, x, step, *a, **k):
        value, info = real(self, models, x, step, *a, **k)
        return (value * float("nan") if step == 1 else value), info
    monkeypatch.setattr(methods.ICT, "loss", loss)
    assert _fm_run(tmp_path, "--steps", "2", "--log-every", "1", "--precision", "fp16") == 0
    with open(tmp_path / "run" / "stats.jsonl") as f:
        rows = [json.loads(x) for x in f]
    assert [(r["step"], r["skipped"], r["overflow"], r["loss"] is None) for r in rows] == \
        [(1, 0, 0, False), (2, 1, 0, True)]
    assert "step 1: non-finite loss nan or grad norm" in (tmp_path / "run" / "log.txt").read_text()


def test_time_budget_times_the_8_steps_after_the_first_2(tmp_path, clock):
    """--time-budget 1 (60 s) at 1 s a step: steps 3 to 10 timed, 1 s each, 10 s spent at step 10, so
    K = 10 + floor(0.95 x 50 / 1) = 57, written to config.json's plan (mutant: the timing started a step late, 7 steps
    over 8: 0.875 s a step, K 64)."""
    assert _fm_run(tmp_path, "--time-budget", "1", "--stop-at", "10", "--log-every", "100") == 0
    with open(tmp_path / "run" / "config.json") as f:
        cfg = json.load(f)
    assert cfg["planned"] == {"total_steps": 57, "at_step": 10, "ms_per_step": 1000.0, "elapsed_s": 10.0,
                              "time_budget_min": 1.0}
    assert cfg["total_steps"] == 57
    assert "--time-budget 1 min: 1000.0 ms a step over steps 2-10, 10.0 s spent -> 57 steps in all" in \
        (tmp_path / "run" / "log.txt").read_text()


def test_a_config_json_that_cannot_be_written_says_whether_checkpoints_are_kept(tmp_path, monkeypatch, capsys,
                                                                                  one_thread):
    """config.json is written at the start: a resumed run's failure says its checkpoints are kept, a new run's (with
    none) does not (mutant: 'kept' said for a new run too)."""
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    assert _fm_run(tmp_path, "--steps", "2", "--stop-at", "1") == 0
    real = ckpt.atomic_write

    def full(path, data):
        if path.endswith("config.json"):
            raise OSError(28, "No space left on device")
        return real(path, data)
    monkeypatch.setattr(ckpt, "atomic_write", full)
    capsys.readouterr()
    for base, kept in ((tmp_path, True), (tmp_path / "new", False)):
        with pytest.raises(SystemExit) as e:
            _fm_run(base, "--steps", "2", *(["--resume", "latest"] if kept else []))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1
        assert err.rstrip("\n").endswith(f"cannot write {base / 'run' / 'config.json'} (No space left on device)"
                                         + (L.KEPT if kept else ""))
