"""scripts/gpu_check.sh (run on a lent GPU only): its stage argument is checked before anything runs; its stages'
commands, run here with a stand-in `python`, name files and flags that exist, and its time budget holds."""
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_unknown_stage_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "bogus"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "gpu_check: unknown stage 'bogus' (core, ops, sct, reference)"
    assert not (tmp_path / "out").exists()          # nothing ran, nothing was written



def test_joined_stages_are_each_checked(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "ops,bogus"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "gpu_check: unknown stage 'bogus' (core, ops, sct, reference)"
    assert not (tmp_path / "out").exists()


# ---- the stages' commands, run with a stand-in `python` that records its arguments -------------------------------
CORE_SELECT = ("tests/test_ops_triton.py tests/test_graphed.py tests/test_ops_cuda.py tests/test_trig_tangent_loss.py "
               "tests/test_editing.py tests/test_metrics.py tests/test_trigflow.py")


def _run_stage(tmp_path, stage, env, python_body=""):
    """gpu_check.sh STAGE with `python` and `nvidia-smi` replaced by scripts that record each call's arguments (and
    run python_body); -> (completed process, [argv of each python call])."""
    import os
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls"
    (fake / "python").write_text(f"#!/bin/bash\nprintf '%s\\x1f' \"$@\" >> '{calls}'\necho >> '{calls}'\n"
                                 f"{python_body}\nexit 0\n")
    (fake / "nvidia-smi").write_text("#!/bin/bash\necho 'GPU 0: stand-in'\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), stage], capture_output=True, text=True,
                       env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", **env}, timeout=300)
    return r, [line.split("\x1f")[:-1] for line in calls.read_text().splitlines()]


def _check_flags(argv):
    """Each --flag of a `python SCRIPT [SUBCOMMAND] ...` call is one that SCRIPT's --help lists (flags renamed in a
    script but not here failed only on the GPU machine)."""
    import sys
    head = argv[:2] if len(argv) > 1 and not argv[1].startswith("-") and not argv[1].startswith("$") \
        and not (ROOT / argv[1]).exists() else argv[:1]
    assert (ROOT / argv[0]).is_file(), argv[0]
    r = subprocess.run([sys.executable, *head, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for a in argv[len(head):]:
        if a.startswith("--"):
            assert a.split("=")[0] in r.stdout, f"{argv[0]}: {a} not in its --help"


def test_core_stage_commands_match_the_scripts(tmp_path):
    """The core stage as the next GPU session runs it: the selected test files exist, the latency, regress and
    throughput commands name flags their scripts have, and throughput gets a --deadline-s inside its step's limit."""
    r, calls = _run_stage(tmp_path, "core", {"GPU_CHECK_BUDGET_S": "380", "GPU_CHECK_THROUGHPUT_COMPILE_S": "150",
                                             "GPU_CHECK_PYTEST_SELECT": CORE_SELECT})
    assert r.returncode == 0, r.stderr
    pytests = [c for c in calls if c[:2] == ["-m", "pytest"]]
    assert len(pytests) == 2
    gpu, latency = pytests
    assert gpu[-7:] == CORE_SELECT.split() and all((ROOT / f).is_file() for f in gpu[-7:])
    assert "-m" in gpu and gpu[gpu.index("-m", 2) + 1] == "gpu"
    assert (ROOT / latency[2]).is_file() and latency[2] == "benchmarks/test_latency.py"
    scripts = {c[0]: c for c in calls if c and c[0].endswith(".py")}
    assert sorted(scripts) == ["benchmarks/bench_cuda.py", "benchmarks/regress.py", "benchmarks/throughput.py"]
    for argv in scripts.values():
        _check_flags(argv)
    gn = scripts["benchmarks/bench_cuda.py"]      # the group_norm_act timings of issue 5, into the ops stage's file
    assert _arg(gn, "--ops") == "group_norm_act" and "--no-compile" in gn and "--quick" in gn
    assert _arg(gn, "--out").endswith("/cuda-ops.json")
    tp = scripts["benchmarks/throughput.py"]
    limit = int(r.stdout.split("==== throughput (limit ")[1].split("s)")[0])
    assert limit == 290                                    # 150 + 140, inside the 380 s budget
    assert float(tp[tp.index("--deadline-s") + 1]) == limit - 15
    assert "rc=0" in r.stdout.split("==== summary")[1].split("throughput")[1].splitlines()[0]


def test_throughput_deadline_follows_what_is_left_of_the_budget(tmp_path):
    r, calls = _run_stage(tmp_path, "core", {"GPU_CHECK_BUDGET_S": "100"})
    tp = next(c for c in calls if c and c[0] == "benchmarks/throughput.py")
    limit = int(r.stdout.split("==== throughput (limit ")[1].split("s)")[0])
    assert 90 <= limit <= 95                               # 100 - 5 - the seconds the stand-ins took
    assert float(tp[tp.index("--deadline-s") + 1]) == limit - 15


def test_reference_stage_commands_match_the_scripts(tmp_path):
    r, calls = _run_stage(tmp_path, "reference", {"GPU_CHECK_BUDGET_S": "430"})
    assert r.returncode == 0, r.stderr
    ref = [c for c in calls if c and c[0] == "scripts/reference_runs.py"]
    assert len(ref) == 1
    _check_flags(ref[0])
    assert ref[0][ref[0].index("--profile") + 1] == "gpu" and "--parallel" in ref[0]
    limit = int(r.stdout.split("==== reference-runs (limit ")[1].split("s)")[0])
    assert 420 <= limit <= 425                             # 430 - 5 - the seconds the stand-ins took
    assert float(ref[0][ref[0].index("--deadline-s") + 1]) == limit - 10


@pytest.mark.slow
def test_a_step_past_the_budget_is_cut_and_the_rest_skipped(tmp_path):
    """GPU_CHECK_BUDGET_S holds for the whole run: a step that would overrun is stopped at what is left of the budget
    (less 5 s), the steps after it are reported as skipped, and the summary still comes."""
    import time
    t0 = time.monotonic()
    r, calls = _run_stage(tmp_path, "core", {"GPU_CHECK_BUDGET_S": "18"},
                          python_body='[ "$1 $2" = "-m pytest" ] && sleep 60')
    took = time.monotonic() - t0
    assert took < 18 + 12, took                            # the budget, plus the kill-after grace at the most
    summary = r.stdout.split("==== summary")[1]
    assert "pytest-gpu" in summary and "rc=124" in summary.split("pytest-gpu")[1].splitlines()[0]
    for step in ("latency-gate", "regress", "throughput"):
        assert f"{step:<22} skipped (time budget spent)" in summary
    assert not any(c and c[0] == "benchmarks/throughput.py" for c in calls)


def test_ops_and_sct_stage_commands_match_the_scripts(tmp_path):
    r, calls = _run_stage(tmp_path, "ops,sct", {"GPU_CHECK_BUDGET_S": "465"})
    assert r.returncode == 0, r.stderr
    scripts = {c[0]: c for c in calls if c and c[0].endswith(".py")}
    assert sorted(scripts) == ["benchmarks/bench_cuda.py", "benchmarks/bench_ops.py", "benchmarks/bench_sct.py",
                               "benchmarks/fd_jvp_accuracy.py"]
    for argv in scripts.values():
        _check_flags(argv)


# ---- defaults, limits and result files (no --help runs: these stay fast) -------------------------------------------
_ENV_RECORD = 'echo "$1 $2 $3|${CMFAST_TRITON_AUTOTUNE:-}|${CMFAST_BUILD_CUDA:-}" >> "$(dirname "$0")/../env"'
STEPS = ["env", "install", "build-csrc", "pytest-gpu", "latency-gate", "regress", "throughput", "bench-triton-ops",
         "bench-cuda-ops", "fd-jvp-accuracy", "bench-sct", "reference-runs"]


def _limits(stdout):
    """{step: its time limit} from the '==== NAME (limit Ns)' lines, in order."""
    return {line.split(" (limit ")[0][5:]: int(line.split(" (limit ")[1].split("s)")[0])
            for line in stdout.splitlines() if line.startswith("==== ") and " (limit " in line}


def _arg(argv, flag):
    return argv[argv.index(flag) + 1]


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("GPU_CHECK_BUDGET_S", "GPU_CHECK_THROUGHPUT_COMPILE_S", "GPU_CHECK_OPS_COMPILE_S",
                "GPU_CHECK_SCT_BUDGET_MS", "GPU_CHECK_PYTEST_SELECT", "GPU_CHECK_REFERENCE_PARALLEL",
                "GPU_CHECK_REFERENCE_PROFILE", "CMFAST_TRITON_AUTOTUNE", "CMFAST_BUILD_CUDA"):
        monkeypatch.delenv(var, raising=False)


def test_every_step_with_its_default_limits_and_result_files(tmp_path, clean_env):
    """All four stages under a budget that cuts nothing: each step's own limit and the defaults of the compile
    budgets (throughput 240 s, per-op 170 s, sCT rows 2000 ms); the results land in OUT under their names (with the
    log, the 8 files the header promises), the latency gate's JSON is the one regress reads; the GPU tests run
    without autotuning, in 6 xdist workers, without the latency gate's file; the install builds no CUDA."""
    r, calls = _run_stage(tmp_path, "core,ops,sct,reference", {"GPU_CHECK_BUDGET_S": "5000"}, _ENV_RECORD)
    assert r.returncode == 0, r.stderr
    # latency-gate: 60 s (40 s cut the H200's fifth-session gate in its last, eager, row: 37.8 s of tests)
    assert _limits(r.stdout) == dict(zip(STEPS, [15, 40, 60, 180, 60, 10, 380, 210, 230, 150, 280, 440]))
    out = str((tmp_path / "out").resolve())
    by = {c[0]: c for c in calls if c and c[0].endswith(".py")}
    tp = by["benchmarks/throughput.py"]
    assert _arg(tp, "--budget-s") == "240" and _arg(tp, "--deadline-s") == "365" and "--quick" in tp
    assert _arg(by["benchmarks/bench_ops.py"], "--budget-s") == "170" == _arg(by["benchmarks/bench_cuda.py"],
                                                                              "--budget-s")
    assert _arg(by["benchmarks/bench_sct.py"], "--budget-ms") == "2000"
    ref = by["scripts/reference_runs.py"]
    assert _arg(ref, "--deadline-s") == "430" and _arg(ref, "--export-dir") == out and "--parallel" in ref
    files = {"throughput-quick.json": _arg(tp, "--out"),
             "triton-ops.json": _arg(by["benchmarks/bench_ops.py"], "--out"),
             "cuda-ops.json": _arg(by["benchmarks/bench_cuda.py"], "--out"),
             "fd_jvp_accuracy.json": _arg(by["benchmarks/fd_jvp_accuracy.py"], "--out"),
             "bench_sct.json": _arg(by["benchmarks/bench_sct.py"], "--out"),
             "reference_runs.json": _arg(ref, "--results")}
    gpu, latency = [c for c in calls if c[:2] == ["-m", "pytest"]]
    gate = next(a for a in latency if a.startswith("--benchmark-json="))
    files["latency.json"] = gate.split("=", 1)[1]
    assert all(path == f"{out}/{name}" for name, path in files.items()), files
    assert len(files) + 1 == 8
    assert by["benchmarks/regress.py"][1:3] == ["compare", files["latency.json"]]
    assert _arg(by["benchmarks/regress.py"], "--write-baseline") == out
    assert "--ignore=benchmarks/test_latency.py" in gpu and _arg(gpu, "-n") == "6"
    assert gpu[gpu.index("-m", 2) + 1] == "gpu"
    env = dict(line.split("|", 1) for line in (tmp_path / "env").read_text().splitlines())
    assert env["-m pytest -m"] == "0|" and env["-m pip install"] == "|0"
    assert env["-m pytest benchmarks/test_latency.py"] == env["benchmarks/throughput.py --quick --budget-s"] == "|"


def test_default_stage_is_core_and_default_budget_465(tmp_path, clean_env):
    r, calls = _run_stage(tmp_path, "", {"GPU_CHECK_THROUGHPUT_COMPILE_S": "1000"})
    scripts = [c[0] for c in calls if c and c[0].endswith(".py")]
    assert scripts == ["benchmarks/regress.py", "benchmarks/bench_cuda.py", "benchmarks/throughput.py"]
    assert 450 <= _limits(r.stdout)["throughput"] <= 460                # 465 - 5 - the seconds the stand-ins took


def test_stage_settings_from_the_environment(tmp_path, clean_env):
    r, calls = _run_stage(tmp_path, "ops,sct,reference",
                          {"GPU_CHECK_BUDGET_S": "5000", "GPU_CHECK_OPS_COMPILE_S": "0",
                           "GPU_CHECK_SCT_BUDGET_MS": "500", "GPU_CHECK_REFERENCE_PARALLEL": "0",
                           "GPU_CHECK_REFERENCE_PROFILE": "smoke"})
    by = {c[0]: c for c in calls if c and c[0].endswith(".py")}
    assert _arg(by["benchmarks/bench_ops.py"], "--budget-s") == "0" and _arg(by["benchmarks/bench_sct.py"],
                                                                            "--budget-ms") == "500"
    assert _limits(r.stdout)["bench-triton-ops"] == 40 and _limits(r.stdout)["bench-cuda-ops"] == 60
    ref = by["scripts/reference_runs.py"]
    assert "--parallel" not in ref and _arg(ref, "--profile") == "smoke"


def test_a_step_needs_10_s_of_the_budget_less_5(tmp_path, clean_env):
    """A step starts only with 10 s or more left of the budget less a 5 s margin, and gets at most that."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    r, calls = _run_stage(tmp_path / "a", "core", {"GPU_CHECK_BUDGET_S": "14"})
    assert [c for c in calls if c[:1] != ["-c"]] == []                 # only the xdist probe, no step
    assert "env                    skipped (time budget spent)" in r.stdout and _limits(r.stdout) == {}
    r, _ = _run_stage(tmp_path / "b", "core", {"GPU_CHECK_BUDGET_S": "17"})
    assert _limits(r.stdout)["env"] in (10, 11, 12)                    # 17 - 5 - the seconds gone, under env's 15
