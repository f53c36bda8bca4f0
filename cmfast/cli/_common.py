"""What the cmfast-* command lines share: one-line errors with exit status 2 (DESIGN.md 2), the options that pick
a model (checkpoint or shipped model, which weights, device) and the --sigmas parser."""
from __future__ import annotations

import argparse
import math
import sys


# Under torchrun every rank finds a user error (the same arguments; cmfast-train's ranks agree on their start-up
# errors, training/loop.py): rank 0 prints it; another rank first waits this long for torchrun to end it (rank 0
# failed too) and prints only if it is still running then. Each rank printing made one error N lines.
OTHER_RANK_WAIT_S = 5.0


def other_rank() -> bool:
    """True in a torchrun rank other than rank 0."""
    import os
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0


def fail(prog: str, message: str, code: int = 2):
    """`PROG: error: message` and exit `code`; called while handling a failed write to a stdout whose reader has
    gone, the quiet exit of closed_stdout instead (no line: `cmfast-train --dry-run | head -1`)."""
    if stdout_gone(sys.exc_info()[1]):
        sys.exit(closed_stdout())
    if other_rank():
        import signal
        import time
        try:
            for s in (signal.SIGTERM, signal.SIGINT):   # torchrun's SIGTERM after rank 0's exit ends it, silently
                signal.signal(s, signal.SIG_DFL)
        except ValueError:          # not the main thread
            pass
        time.sleep(OTHER_RANK_WAIT_S)
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def user_errors() -> tuple:
    """The exceptions a command reports as one error line (exit 2): bad values, unreadable files, missing optional
    packages, and a backend asked for by name (CMFAST_BACKEND) that cannot run here (BackendUnavailable, a
    RuntimeError: it was a traceback). Read while an exception is matched, so it imports nothing: BackendUnavailable
    can only come from a cmfast.ops already imported, and importing it here after a Ctrl-C inside torch's import
    re-entered a half-imported torch (an AttributeError traceback, or a crash)."""
    backend = getattr(sys.modules.get("cmfast.ops"), "BackendUnavailable", None)
    return (ValueError, TypeError, OSError, KeyError, ImportError) + ((backend,) if backend is not None else ())


def first_line(e: Exception) -> str:
    """An exception as one error line: its message's first line, else its type's name."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line `PROG: error: ...` and exit 2, not the usage text; flags are taken
    whole (no abbreviations: cmfast-edit took sample's --grid as its --grid-scale)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        fail(self.prog, message)

    def _print_message(self, message, file=None):
        # argparse drops an OSError here: --help into a closed pipe exited 0, its text cut short (interruptible ends
        # it: CLOSED_STDOUT). Line by line: unbuffered (PYTHONUNBUFFERED), a write of more than a pipe's atomic
        # 4096 bytes cut short by the reader's exit loses the rest silently instead of raising
        file = file or sys.stderr
        if message and file is not None:    # None: no stderr either (fd 2 closed at start): nowhere to write
            file.writelines(message.splitlines(keepends=True))


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, where it has one (no "(default: None)")."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def ranged(kind, lo=None, hi=None, lo_open=False):
    """An argparse type: `kind` (int or float; floats finite) within [lo, hi] (lo_open: (lo, hi])."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {s!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {s}")
        if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
            rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"expected a value in {rng}, got {s}")
        return v
    return parse


def sigmas_type(example: str):
    """A --sigmas type: comma-separated numbers as a tuple of floats; `example` shows the format in the error."""
    def parse(s):
        try:
            return tuple(float(v) for v in s.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers like {example}, got {s!r}") from None
    return parse


def add_model_options(group, pretrained: bool = True, samples: bool = False) -> None:
    """--checkpoint (or, with `pretrained`, exactly one of --checkpoint / --pretrained, and with `samples` of
    --samples too) and --which."""
    ckpt = dict(metavar="PATH", help="checkpoint file written by cmfast-train, or its run directory (the newest)")
    if pretrained:
        src = group.add_mutually_exclusive_group(required=True)
        src.add_argument("--checkpoint", **ckpt)
        src.add_argument("--pretrained", metavar="NAME", help="a shipped model, e.g. fmnist (cmfast.load_pretrained)")
        if samples:
            src.add_argument("--samples", metavar="PATH", help="score images made elsewhere instead: an .npz with "
                             "uint8 (N, H, W, C) as arr_0 (cmfast-sample --npz; openai's sample files), or an image "
                             "folder or zip")
    else:
        group.add_argument("--checkpoint", required=True, **ckpt)
    group.add_argument("--which", default=None, help="weights to load: ema, ema@RATE, model or target (default: ema; a "
                                                     "shipped model has only its EMA weights)")


def add_device(group) -> None:
    group.add_argument("--device", default=None, help="default: cuda if available, else cpu")


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}   # --dtype's names of torch dtypes


def torch_dtype(name: str):
    import torch
    return getattr(torch, DTYPES[name])


def add_engine(group) -> None:
    """--engine and --dtype of cmfast-sample and cmfast-eval (cmfast.sampling.generate_batches)."""
    group.add_argument("--engine", choices=("auto", "graphed", "eager"), default="auto",
                       help="graphed: the CUDA-graph sampler (GPU; noise drawn on the GPU, so images depend on "
                            "--batch-size); eager: one network call at a time, any device (default auto: graphed "
                            "for a consistency model on CUDA, else eager)")
    group.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                       help="network precision of the graphed engine (default fp32; bf16 is fastest)")


def add_clip_denoised(group) -> None:
    """--clip-denoised of cmfast-sample and cmfast-eval (cmfast.sample's clip_denoised)."""
    group.add_argument("--clip-denoised", action="store_true",
                       help="consistency models: clamp each step's output to [-1, 1] before it is noised again, as "
                            "openai/consistency_models' samplers do (their default; the paper's Algorithm 1 does "
                            "not, nor does cmfast by default)")


def check_which(prog: str, args) -> None:
    """--which (default ema); with --pretrained only ema: a shipped model has no other weights (it was ignored)."""
    if getattr(args, "pretrained", None) and args.which not in (None, "ema"):
        fail(prog, f"--which {args.which}: a shipped model (--pretrained) has only its EMA weights")
    args.which = args.which or "ema"


def check_steps_sigmas(prog: str, steps, sigmas) -> None:
    if steps and sigmas and steps != len(sigmas):
        fail(prog, f"--steps {steps} but --sigmas has {len(sigmas)} values")


def pick_device(name: str | None) -> str:
    """--device as given (checked: check_device), else cuda where a CUDA device is present, else cpu."""
    import torch
    return check_device(name) if name else ("cuda" if torch.cuda.is_available() else "cpu")


def check_device(name: str) -> str:
    """A --device that this machine has: cpu, cuda, cuda:N (N below the device count) or mps; ValueError in one
    line otherwise (cmfast._device.checked_device, the library's check too)."""
    from .._device import checked_device
    checked_device(name, "--device")
    return name


def _check_writable(folder: str, flag: str, path: str) -> None:
    """`folder`, or the nearest folder above it that exists, is a folder where a file can be made (write_output makes
    the rest); the messages name `path`, the user's argument."""
    import os
    import tempfile
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):          # the nearest folder that exists must let us make the rest
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: folder {parent} is not writable")
    try:        # root passes os.access in /proc (and other pseudo file systems): only making a file tells
        fd, probe = tempfile.mkstemp(prefix=".cmfast-probe-", dir=parent)
    except OSError as e:
        raise ValueError(f"{flag} {path}: folder {parent} is not writable ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def check_output(path: str, flag: str, exts: tuple[str, ...] | None = None) -> None:
    """An output file, checked before any work is done (a typo must not cost a long run its result): a known
    extension, not a directory, and a writable folder (or one that can be made: write_output makes it)."""
    import os
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    if exts and os.path.splitext(path)[1].lower() not in exts:
        raise ValueError(f"{flag} {path}: expected a file name ending in {' or '.join(exts)}")
    _check_writable(os.path.dirname(os.path.abspath(path)), flag, path)


def check_output_dir(path: str, flag: str) -> None:
    """An output folder, checked before any work: not a file, and it exists writable or can be made."""
    import os
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a file; give a folder")
    if not os.path.exists(path) and os.path.splitext(path)[1].lower() in (".png", ".jpg", ".jpeg", ".npz", ".json"):
        raise ValueError(f"{flag} {path}: names a file; this command writes a folder of PNGs (give a folder)")
    _check_writable(path, flag, path)


def write_output(path: str, data: bytes) -> None:
    """Write an output file atomically, making its folder; an OS error names the file, not the temporary one."""
    import os
    from ..training.checkpoint import atomic_write
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, data)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None


# A command whose stdout's reader has gone (`cmfast-train --dry-run | head -1`) ends as a Unix tool does: silently,
# with the status a shell reports for a command that SIGPIPE ended, 128 + 13, as Ctrl-C's 130 is 128 + SIGINT. Not 0
# (its output was not all read), not 1 (cmfast-train's training error) or 2 (a user error: there is none to report).
CLOSED_STDOUT = 141


class _WatchedStdout:
    """sys.stdout while a command runs: writes pass through unchanged (a BrokenPipeError is raised as before), and a
    broken pipe is recorded, so that the error is known to be stdout's, not an output file's (a FIFO, a socket)."""

    def __init__(self, stream):
        self._stream, self.broken = stream, False

    def _call(self, name, *args):
        try:
            return getattr(self._stream, name)(*args)
        except BrokenPipeError:
            self.broken = True
            raise

    def write(self, text):
        return self._call("write", text)

    def writelines(self, lines):
        return self._call("writelines", lines)

    def flush(self):
        return self._call("flush")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def stdout_gone(e: BaseException | None) -> bool:
    """Whether `e` is the failed write of a stdout whose reader has gone: EPIPE (as a BrokenPipeError, or as the
    OSError with its errno that the training log raises) after a write to sys.stdout broke. Another file's EPIPE is an
    error like any other."""
    import errno
    return (isinstance(e, OSError) and e.errno == errno.EPIPE and isinstance(sys.stdout, _WatchedStdout)
            and sys.stdout.broken)


def closed_stdout() -> int:
    """After stdout's reader has gone: stdout pointed at os.devnull, so that the interpreter's last flush of what is
    still buffered has nowhere to fail (Python's signal docs, 'Note on SIGPIPE'); -> CLOSED_STDOUT."""
    import os
    try:
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except (AttributeError, OSError, ValueError):      # no file descriptor (a test's capture): nothing to flush there
        pass
    return CLOSED_STDOUT


def flushed(stdout) -> bool:
    """stdout flushed before the interpreter's exit (where its error is an 'Exception ignored' line, status 120);
    False when its reader has gone (closed_stdout: pointed at os.devnull)."""
    try:
        if stdout is not None:
            stdout.flush()
        return True
    except BrokenPipeError:
        closed_stdout()
        return False


def interruptible(prog: str, note: str = ""):
    """Decorator for a command's main: Ctrl-C (or SIGTERM) where the command has no handler of its own, as during
    start-up, ends it with one line and exit status 130 instead of a traceback; a stdout whose reader has gone ends it
    with no line and status CLOSED_STDOUT (its output flushed before the interpreter's exit, where the error would be
    a traceback-like 'Exception ignored' line)."""
    import functools
    import signal

    class _Terminated(Exception):
        pass

    def deco(main):
        @functools.wraps(main)
        def run(argv=None):
            def on_term(signum, frame):
                raise _Terminated()
            try:
                old = signal.signal(signal.SIGTERM, on_term)
            except ValueError:          # not the main thread: leave SIGTERM alone
                old = None
            stdout = sys.stdout
            if stdout is not None:      # None: no stdout at all (fd 1 closed at start), whose prints Python drops
                sys.stdout = _WatchedStdout(stdout)
            watched = sys.stdout
            try:
                code = main(argv)
                return code if flushed(watched) else CLOSED_STDOUT
            except SystemExit as e:     # --help's exit 0, or an error line's 2: its output flushed now
                if not flushed(watched) and e.code in (None, 0):
                    e.code = CLOSED_STDOUT
                raise
            except (KeyboardInterrupt, _Terminated):
                # torchrun: rank 0's line alone (Ctrl-C reaches every rank; one rank's failure ends the others
                # with SIGTERM, and their 'interrupted' followed its error line)
                if not other_rank():
                    print(f"{prog}: interrupted{note}", file=sys.stderr)
                flushed(watched)
                return 130
            except OSError as e:
                if stdout_gone(e):
                    return closed_stdout()
                raise
            finally:
                if sys.stdout is watched:
                    sys.stdout = stdout
                if old is not None:
                    signal.signal(signal.SIGTERM, old)
        return run
    return deco


def recorded_sigmas(meta: dict | None, steps: int | None) -> tuple | None:
    """The checkpoint's own noise levels for `steps` evaluations (its config's sampling_sigmas: e.g. the CM paper's
    two-step levels that cmfast.cm_import records for a released model), or None."""
    cfg = (meta or {}).get("config") or {}
    levels = (cfg.get("sampling_sigmas") or {}).get(str(steps or 1)) if isinstance(cfg, dict) else None
    return tuple(float(s) for s in levels) if levels else None
