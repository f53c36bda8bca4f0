"""The console scripts into a pipe whose reader has gone (`cmfast-train --dry-run | head -1`), run as the console
scripts run (pyproject's [project.scripts] entry, `sys.exit(main())`): as a Unix tool, no line and no traceback on
stderr, exit status 141 (128 + SIGPIPE: cli/_common.CLOSED_STDOUT), buffered and unbuffered (PYTHONUNBUFFERED).
A broken pipe that is not stdout's stays an error."""
import errno
import fcntl
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cmfast.cli import _common
from test_train_cli import env  # noqa: F401  (autouse: offline, no system Fashion-MNIST, one thread)
from test_train_cli import fails
from train_fixtures import write_fmnist

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
F_SETPIPE_SZ = 1031         # Linux fcntl: a pipe's capacity


def run_into_closed_pipe(command, args, unbuffered, after_first_line=False):
    """(exit status, stderr, first line read) of the console script `command` with stdout a pipe whose reader is
    closed before it starts, or (after_first_line) once the first line is read from a pipe of 4096 bytes, which
    an output longer than that cannot have filled by then."""
    module, func = SCRIPTS[command].split(":")
    r, w = os.pipe()
    if after_first_line:
        fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    else:
        os.close(r)
    environ = dict(os.environ, PYTHONPATH=str(ROOT), CMFAST_OFFLINE="1")
    environ.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        environ["PYTHONUNBUFFERED"] = "1"
    p = subprocess.Popen([sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())",
                          *args], stdout=w, stderr=subprocess.PIPE, env=environ, cwd=ROOT)
    os.close(w)
    line = b""
    if after_first_line:
        while not line.endswith(b"\n") and (c := os.read(r, 1)):
            line += c
        os.close(r)
    err = p.communicate(timeout=120)[1].decode()
    return p.returncode, err, line.decode()


def help_bytes(module):
    import importlib
    return importlib.import_module(module).build_parser().format_help().encode()


def test_no_stdout_at_all_is_no_error(tmp_path):
    # fd 1 closed before the start (`cmfast-train ... >&-`): Python's sys.stdout is None and drops what is printed;
    # the watch on stdout must not turn that into an AttributeError traceback
    write_fmnist(tmp_path / "fm", n=8)
    environ = dict(os.environ, PYTHONPATH=str(ROOT), CMFAST_OFFLINE="1")
    for command, args in (("cmfast-train", ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm"),
                                            "--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--dry-run"]),
                          ("cmfast-sample", ["--help"])):
        module, func = SCRIPTS[command].split(":")
        p = subprocess.run([sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())",
                            *args], stderr=subprocess.PIPE, env=environ, cwd=ROOT, timeout=120,
                           preexec_fn=lambda: os.close(1))
        assert p.returncode == 0 and b"Traceback" not in p.stderr, (command, p.stderr[-2000:])


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_help_into_a_closed_pipe_is_quiet(command):
    # buffered: the text is written at the end (interruptible's flush); unbuffered, as it is written, as the next test
    code, err, _ = run_into_closed_pipe(command, ["--help"], unbuffered=False)
    assert (code, err) == (141, "")


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_help_cut_after_its_first_line_is_quiet(unbuffered):
    # cmfast-train's --help is longer than the pipe: the reader's exit cuts its write short (argparse dropped that
    # OSError: status 0, the text lost; unbuffered, the rest of one long write was lost without an error)
    assert len(help_bytes("cmfast.cli.train")) > 4096
    code, err, line = run_into_closed_pipe("cmfast-train", ["--help"], unbuffered, after_first_line=True)
    assert line.startswith("usage: cmfast-train ")
    assert (code, err) == (141, "")


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_dry_run_into_a_closed_pipe_is_quiet(tmp_path, unbuffered):
    # buffered, the interpreter's last flush printed 'Exception ignored ... BrokenPipeError' (status 120); unbuffered,
    # 'cmfast-train: error: [Errno 32] Broken pipe' (status 2)
    write_fmnist(tmp_path / "fm", n=8)
    code, err, _ = run_into_closed_pipe("cmfast-train", ["--dataset", "fashion-mnist", "--data-dir",
                                                         str(tmp_path / "fm"), "--preset", "tiny", "--output-dir",
                                                         str(tmp_path / "run"), "--dry-run"], unbuffered)
    assert (code, err) == (141, "")
    assert not (tmp_path / "run").exists()


def test_a_broken_pipe_that_is_not_stdout_is_an_error(capsys, tmp_path, monkeypatch):
    # an output file's EPIPE (a FIFO, a socket) is one error line, status 2, also with stdout's reader gone (nothing
    # was written to stdout before it)
    import numpy as np
    import cmfast.cli.sample as S
    monkeypatch.setattr(S, "generate", lambda *a, **k: np.zeros((2, 32, 32, 1), np.uint8))

    def broken(path, data):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    monkeypatch.setattr(_common, "write_output", broken)
    argv = ["--pretrained", "fmnist", "--num", "2", "--out", str(tmp_path / "g.png")]
    fails(capsys, argv, "cmfast-sample: error: [Errno 32] Broken pipe", main=S.main, prog="cmfast-sample")
    r, w = os.pipe()
    os.close(r)
    with os.fdopen(w, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        fails(capsys, argv, "cmfast-sample: error: [Errno 32] Broken pipe", main=S.main, prog="cmfast-sample")
        assert sys.stdout is closed         # the command's watch on stdout is undone


def test_a_training_run_into_a_closed_pipe_ends_quietly(capsys, tmp_path, monkeypatch):
    # its log's first line fails (the log raises it as 'cannot write to stdout (Broken pipe)...', errno kept): it was
    # that error line, status 2
    from cmfast.cli.train import main as train_main
    write_fmnist(tmp_path / "fm", n=8)
    r, w = os.pipe()
    os.close(r)
    capsys.readouterr()
    with os.fdopen(w, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        with pytest.raises(SystemExit) as e:
            train_main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm"), "--preset", "tiny",
                        "--batch-size", "4", "--sample-num", "0", "--steps", "1", "--loss", "l2", "--output-dir",
                        str(tmp_path / "run")])
    assert (e.value.code, capsys.readouterr().err) == (141, "")


def test_an_interrupt_after_output_into_a_closed_pipe_leaves_nothing_to_fail(capsys, monkeypatch):
    # Ctrl-C once output is buffered: 'interrupted' and 130, as always; the buffered output, whose reader has gone, no
    # longer fails at the interpreter's exit ('Exception ignored ... BrokenPipeError', status 120)
    def main(argv=None):
        print("a line, buffered")
        raise KeyboardInterrupt
    r, w = os.pipe()
    os.close(r)
    closed = os.fdopen(w, "w")      # buffered, as a pipe's stdout is
    monkeypatch.setattr(sys, "stdout", closed)
    capsys.readouterr()
    assert _common.interruptible("cmfast-x")(main)() == 130
    assert capsys.readouterr().err == "cmfast-x: interrupted\n"
    closed.close()                  # the interpreter's last flush: pointed at os.devnull, it has nowhere to fail
