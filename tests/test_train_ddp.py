"""DDP on CPU (gloo, launched by torchrun): 2 ranks x 2 images == 1 process x 2 rounds of 2 images; also with
--compile (traced by dynamo, CMFAST_COMPILE_BACKEND=eager: the compiled backbone inside DDP)."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from train_fixtures import write_png_folder


def _train(tmp_path, out, nproc, extra=(), method=("--method", "ct", "--loss", "l2"), env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMFAST_OFFLINE": "1", "CMFAST_COMPILE_BACKEND": "eager",
           **(env or {})}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc > 1 else [sys.executable])
    args = ["-m", "cmfast.cli.train", "--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), *method,
            "--preset", "tiny", "--batch-size", "4", "--steps", "3", "--sample-num", "0",
            "--lr", "1e-3", "--ema", "0.9", "--device", "cpu", "--output-dir", str(tmp_path / out)]
    args += list(extra)
    if nproc == 1:
        args += ["--batch-gpu", "2"]
    r = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return load_file(str(sorted((tmp_path / out).glob("ckpt-*.safetensors"))[-1])), r.stdout    # the newest


@pytest.mark.slow
@pytest.mark.parametrize("compile_", [False, True])
def test_two_ranks_match_one_process(tmp_path, compile_):
    write_png_folder(tmp_path / "imgs", n=8, size=16)
    extra = ["--compile"] if compile_ else []
    one, _ = _train(tmp_path, "one", 1, extra)
    two, log = _train(tmp_path, "two", 2, extra)
    assert "2 rank(s) on cpu" in log
    assert ("torch.compile mode default (eager backend" in log) == compile_
    assert set(one) == set(two)
    # Same data, same noise per image; only the gradient reduction differs: (g1 + g2) / 2 (DDP all-reduce) vs.
    # g1 / 2 + g2 / 2 (two accumulated rounds). With 2 ranks both are exact in fp32 (measured difference 0.0);
    # with more ranks the sum order can change the last bit, hence a tolerance (one Adam step moves ~1e-3).
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-5, worst
    with open(tmp_path / "one" / "stats.jsonl") as f1, open(tmp_path / "two" / "stats.jsonl") as f2:
        l1 = [json.loads(x)["loss"] for x in f1]
        l2 = [json.loads(x)["loss"] for x in f2]
    assert l1 == pytest.approx(l2, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("jvp", ["fd", "exact", "fd fd_precision=fp64"])
def test_two_ranks_match_one_process_sct(tmp_path, jvp):
    # sCT's model has trained parameters outside the DDP-wrapped backbone (the adaptive-weighting logvar head, with
    # random Fourier frequencies): they were drawn from each rank's own seed and their gradients never reduced, so
    # the ranks' heads drifted apart and rank 0's checkpoint differed from one process's by ~1e-3 after 3 steps.
    # jvp=exact: DDP's buffer broadcast at each forward raised inside torch.func.jvp. fd_precision=fp64: the finite
    # difference's forwards through an fp64 copy of the parameters (fp64_call), outside DDP's forward.
    write_png_folder(tmp_path / "imgs", n=8, size=16)
    jvp, *more = jvp.split()
    method = ("--method", "sct", "--method-arg", f"jvp={jvp}", *(a for m in more for a in ("--method-arg", m)))
    one, _ = _train(tmp_path, "one", 1, method=method)
    two, _ = _train(tmp_path, "two", 2, method=method)
    assert any(k.startswith("model/logvar.") for k in one) and set(one) == set(two)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_resume_on_more_ranks_gives_each_rank_its_own_dropout_stream(tmp_path):
    # A 1-process checkpoint holds one RNG state; resumed on 2 ranks, both ranks were given it (rank % 1), so they
    # drew the same dropout masks for the rest of the run (and saved equal states, so every later resume did too).
    import torch
    write_png_folder(tmp_path / "imgs", n=8, size=16)
    extra = ["--dropout", "0.1", "--ckpt-every", "2"]
    _train(tmp_path, "run", 1, extra + ["--stop-at", "2"], method=("--method", "ict"))
    _train(tmp_path, "run", 2, extra + ["--resume", "latest"], method=("--method", "ict"))
    rngs = torch.load(tmp_path / "run" / "ckpt-00000003.state.pt", weights_only=True)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])


@pytest.mark.slow
def test_two_ranks_agree_on_a_time_budget_plan(tmp_path):
    # Each rank times its own probe; they must plan the same K (the slowest rank's numbers), or the per-step
    # collective would hang the rank that still has steps to run.
    write_png_folder(tmp_path / "imgs", n=8, size=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMFAST_OFFLINE": "1"}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "cmfast.cli.train", "--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--method", "ct",
            "--loss", "l2", "--preset", "tiny", "--batch-size", "4", "--time-budget", "0.05", "--sample-num", "0",
            "--log-every", "1", "--ema", "0.9", "--device", "cpu", "--output-dir", str(tmp_path / "run")]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with open(tmp_path / "run" / "config.json") as f:
        plan = json.load(f)["planned"]
    with open(tmp_path / "run" / "stats.jsonl") as f:
        assert json.loads(f.readlines()[-1])["step"] == plan["total_steps"] >= 10


def _atexit_marker(tmp_path):
    """A sitecustomize that records each process reaching the interpreter's shutdown (atexit) in tmp_path/exited,
    as a file named after its torchrun RANK ('-' for a process without one: one process, or torchrun itself)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, os\n"
        f"atexit.register(lambda: open(os.path.join({str(tmp_path / 'exited')!r}, os.environ.get('RANK', '-')), 'w')"
        ".close())\n")
    (tmp_path / "exited").mkdir()
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_a_rank_ends_without_the_interpreter_shutdown(tmp_path):
    # DDP keeps gloo's process group and its worker threads alive past destroy_process_group; a worker thread that
    # dropped a tensor while the interpreter shut down aborted the rank (SIGABRT, "terminate called without an active
    # exception"): CI runs of these tests, and 4 in 25 runs of a 2-rank DDP script. cmfast-train's ranks now end with
    # os._exit (status and output kept), so no rank reaches the shutdown; one process (no group) still does.
    write_png_folder(tmp_path / "imgs", n=8, size=16)
    env = _atexit_marker(tmp_path)
    _, log = _train(tmp_path, "one", 1, env=env)
    assert os.listdir(tmp_path / "exited") == ["-"]           # the marker works: a normal exit runs atexit
    _, log = _train(tmp_path, "two", 2, env=env)
    assert os.listdir(tmp_path / "exited") == ["-"]           # torchrun's own; ranks 0 and 1 skipped it
    assert "checkpoint " in log.splitlines()[-1]              # rank 0's output is flushed before it ends
    # An error after the group started keeps its one line and exit status 2 (fail()).
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "cmfast.cli.train", "--dataset", "folder", "--data-dir", str(tmp_path / "none"),
                        "--preset", "tiny", "--batch-size", "4", "--steps", "1", "--device", "cpu",
                        "--output-dir", str(tmp_path / "bad")],
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CMFAST_OFFLINE": "1", **env},
                       capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and "exitcode  : 2 " in r.stderr, r.stderr[-2000:]
    assert "cmfast-train: error:" in r.stderr and "Traceback" not in r.stderr.split("cmfast-train: error:")[0]
    assert os.listdir(tmp_path / "exited") == ["-"]


def test_one_gpu_index_for_every_rank_is_refused(monkeypatch):
    """--device cuda:0 under torchrun with 2 ranks on a machine put both on one GPU, which NCCL refuses only at the
    first collective with a cryptic error: refused in one line before the process group starts. One rank a machine
    (multi-node, LOCAL_WORLD_SIZE 1) may name its GPU."""
    from cmfast.training import loop
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--device cuda:0: under torchrun each rank of a machine takes its own GPU"):
        loop.setup_distributed("cuda:0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")      # one rank a machine: the named GPU is allowed (no CUDA here)
    monkeypatch.setattr(loop, "_init_group", lambda backend: None)
    monkeypatch.setattr(loop.torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setitem(loop._GROUP, "created", False)  # restored after: this process's later main() calls return
    assert loop.setup_distributed("cuda:0") == (1, 2, loop.torch.device("cuda", 0))
    assert loop.created_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["every rank", "rank 0", "rank 1"])
def test_a_user_error_is_one_line_whatever_rank_finds_it(tmp_path, where):
    # Every rank printed an error that all ranks find (N lines of one mistake), and a rank ended by torchrun after
    # another rank's error added 'interrupted (checkpoints written so far are kept ...)'. Now rank 0 alone prints it;
    # an error on one rank (rank 0's output-folder check; a rank that cannot read the data) is agreed on by all ranks.
    write_png_folder(tmp_path / "imgs", n=8, size=16)
    (tmp_path / "afile").write_text("")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1' and os.environ.get('FAIL_RANK_1'):\n"
        "    import cmfast.data as d\n"
        "    def bad(*a, **k):\n"
        "        raise d.DataError('cannot read the data on this rank')\n"
        "    d.load_dataset = bad\n")
    data, out = tmp_path / "imgs", tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMFAST_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    if where == "every rank":
        data = tmp_path / "none"
    elif where == "rank 0":
        out = tmp_path / "afile" / "out"
    else:
        env["FAIL_RANK_1"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "cmfast.cli.train", "--dataset", "folder", "--data-dir", str(data), "--preset", "tiny",
                        "--batch-size", "4", "--steps", "1", "--device", "cpu", "--output-dir", str(out)],
                       env=env, capture_output=True, text=True, timeout=120)
    expected = {"every rank": "image folder or zip not found", "rank 0": "is not writable",
                "rank 1": "rank 1: cannot read the data on this rank"}[where]
    # counted in the text: the ranks' lines, written at once, could share one line of stderr
    assert r.stderr.count("cmfast-train:") == 1 and expected in r.stderr, r.stderr[-3000:]
    assert "exitcode  : 2 " in r.stderr and "Traceback" not in r.stderr.split("cmfast-train: error:")[0]


@pytest.mark.slow
@pytest.mark.parametrize("what", ["checkpoint", "samples"])
def test_a_file_rank_0_cannot_write_ends_every_rank_with_its_line(tmp_path, what):
    # Rank 0 alone writes checkpoints, sample grids and stats; when it could not (a full disk), the other rank went on
    # into the next step's gradient all-reduce, and died there with gloo's 'Connection closed by peer' traceback.
    write_png_folder(tmp_path / "imgs", n=8, size=16)
    site = tmp_path / "site"
    site.mkdir()
    module, name, at = {"checkpoint": ("cmfast.training.checkpoint", "save_checkpoint", 1),     # at: the step's arg
                        "samples": ("cmfast.training.loop", "write_samples", 3)}[what]
    (site / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '0':\n"
        "    import errno\n"
        f"    import {module} as m\n"
        f"    write = m.{name}\n"
        "    def full(*a, **k):\n"
        f"        if a[{at}] >= 2:\n"
        "            raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "        return write(*a, **k)\n"
        f"    m.{name} = full\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMFAST_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "cmfast.cli.train", "--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--method",
                        "ct", "--loss", "l2", "--preset", "tiny", "--batch-size", "4", "--steps", "4", "--ckpt-every",
                        "1", "--sample-every", "1", "--sample-num", "2" if what == "samples" else "0", "--device",
                        "cpu", "--output-dir", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.stderr.count("cmfast-train:") == 1, r.stderr[-3000:]
    assert ("cannot write the checkpoint of step 2" if what == "checkpoint" else "No space left") in r.stderr
    assert "exitcode  : 2 " in r.stderr and "Traceback" not in r.stderr.split("cmfast-train: error:")[0]
    assert "[rank1]" not in r.stderr, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("ckpt-*")) == ["ckpt-00000001.safetensors",
                                                                        "ckpt-00000001.state.pt"]


# rank 0's writes outside the stats row, grids and checkpoints: (sitecustomize's failing write, the steps and flags of
# the run, the error line, the checkpoints left). Each ended rank 0 alone, and rank 1 in its next collective with
# gloo's traceback.
_RANK0_WRITES = {
    # config.json at start-up: the process group has started, DDP has wrapped the nets, nothing is trained
    "config.json": ("config.json", ["--steps", "2"], "config.json (No space left on device)", []),
    # config.json again after --time-budget's probe planned the run's length (told with that step's stats row)
    "config.json, planned": ("config.json again", ["--time-budget", "0.05", "--log-every", "1"],
                             "config.json (No space left on device); the checkpoints written before it are kept", []),
    # a line of log.txt mid-run: 'checkpoint .../ckpt-00000002.safetensors', after that checkpoint was written
    "log.txt": ("ckpt-00000002.safetensors", ["--steps", "4"], "log.txt (No space left on device); the checkpoints "
                "written before it are kept", [1, 2]),
    # the run's last line of log.txt, after its last checkpoint and broadcast
    "log.txt, last line": ("stopping at step 2", ["--steps", "4", "--stop-at", "2"], "log.txt (No space left", [1, 2]),
}


@pytest.mark.slow
@pytest.mark.parametrize("what", list(_RANK0_WRITES))
def test_config_or_log_line_rank_0_cannot_write_ends_every_rank_with_its_line(tmp_path, what):
    import torch
    marker, extra, expected, kept = _RANK0_WRITES[what]
    write_png_folder(tmp_path / "imgs", n=8, size=16)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import builtins, errno, os\n"
        "if os.environ.get('RANK') == '0':\n"
        f"    marker = {marker!r}\n"
        "    import cmfast.training.checkpoint as m\n"
        "    atomic_write, real_open = m.atomic_write, builtins.open\n"
        "    def full(*a):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    def write(path, data):\n"
        "        if path.endswith('config.json') and (marker == 'config.json' or os.path.exists(path)):\n"
        "            full()\n"
        "        return atomic_write(path, data)\n"
        "    class Log:\n"
        "        def __init__(self, f):\n"
        "            self.f = f\n"
        "        def __enter__(self):\n"
        "            return self\n"
        "        def __exit__(self, *a):\n"
        "            return self.f.__exit__(*a)\n"
        "        def write(self, s):\n"
        "            return full() if marker in s else self.f.write(s)\n"
        "    def opener(file, *a, **k):\n"
        "        f = real_open(file, *a, **k)\n"
        "        return Log(f) if str(file).endswith('log.txt') else f\n"
        "    m.atomic_write, builtins.open = write, opener\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMFAST_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "cmfast.cli.train", "--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--method",
                        "ct", "--loss", "l2", "--preset", "tiny", "--batch-size", "4", "--ckpt-every", "1",
                        "--log-every", "100", "--sample-num", "0", "--ema", "0.9", "--device", "cpu",
                        "--output-dir", str(tmp_path / "out"), *extra], env=env, capture_output=True, text=True,
                       timeout=180)
    assert "[rank1]" not in r.stderr, r.stderr[-3000:]          # rank 1's traceback (gloo: 'Connection closed by peer')
    assert r.stderr.count("cmfast-train:") == 1, r.stderr[-3000:]
    assert f"cmfast-train: error: cannot write {tmp_path / 'out'}/{expected}" in r.stderr, r.stderr[-3000:]
    assert "exitcode  : 2 " in r.stderr and "Traceback" not in r.stderr.split("cmfast-train: error:")[0]
    ckpts = sorted((tmp_path / "out").glob("ckpt-*.safetensors"))
    if what == "config.json, planned":      # the plan (at step 10) came after checkpoints 1..9; --keep 3 left 7..9
        kept = list(range(7, 10))
    assert [int(p.name[5:13]) for p in ckpts] == kept
    for p in ckpts:         # whole: each pair loads, its state names its step
        assert load_file(str(p)) and torch.load(str(p)[:-len(".safetensors")] + ".state.pt",
                                                weights_only=True)["step"] == int(p.name[5:13])


@pytest.mark.slow
def test_dry_run_prints_the_config_once(tmp_path):
    # Each rank printed it: two JSON documents in one stdout, which no JSON reader takes.
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "cmfast.cli.train", "--dataset", "fashion-mnist", "--preset", "tiny", "--batch-size", "4",
                        "--device", "cpu", "--output-dir", str(tmp_path / "out"), "--dry-run"],
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CMFAST_OFFLINE": "1"}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["batch_size"] == 4


_LIBRARY_SCRIPT = """
import os, sys
import torch.distributed as dist
from cmfast.training.loop import train
root = sys.argv[1]
def args(out, data="imgs"):
    return {"dataset": "folder", "data_dir": os.path.join(root, data), "method": "ct", "loss": "l2", "preset": "tiny",
            "batch_size": 4, "total_steps": 1, "sample_num": 0, "ema": (0.9,), "device": "cpu",
            "output_dir": os.path.join(root, out)}
seen = []
train(args("a"))
seen.append(dist.is_initialized())          # the group train() made: gone
train(args("b"))                            # so a second call makes its own
seen.append(dist.is_initialized())
try:
    train(args("c", data="none"))           # an error: the group goes too
except ValueError:
    seen.append(dist.is_initialized())
dist.init_process_group("gloo")             # the caller's own group: train() uses it and leaves it
world = dist.group.WORLD
train(args("d"))
seen.append(dist.is_initialized() and dist.group.WORLD is world and dist.get_world_size() == 2)
dist.destroy_process_group()
with open(os.path.join(root, "seen-" + os.environ["RANK"]), "w") as f:    # a file per rank: prints interleave
    f.write(repr(seen))
os._exit(0)                                 # DDP keeps gloo's threads past destroy_process_group (loop._GROUP)
"""


@pytest.mark.slow
def test_library_train_destroys_only_the_group_it_created(tmp_path):
    # train() under torchrun left the process group it had made alive when it returned or raised: a second call used
    # it, a library caller could not init its own. It now destroys that group (after a normal end, once every rank
    # is there), and leaves a group the caller made.
    write_png_folder(tmp_path / "imgs", n=8, size=16)
    (tmp_path / "script.py").write_text(_LIBRARY_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "script.py"), str(tmp_path)],
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CMFAST_OFFLINE": "1"}, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for rank in (0, 1):
        seen = (tmp_path / f"seen-{rank}").read_text()
        assert seen == "[False, False, False, True]", r.stdout[-2000:] + r.stderr[-3000:]
    assert [p.name for p in sorted((tmp_path / "d").glob("ckpt-*.safetensors"))] == ["ckpt-00000001.safetensors"]
