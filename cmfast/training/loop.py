"""The training loop: read top to bottom. One process per device; torchrun + DDP for several (rank 0 writes).

Determinism: the data sampler (indices, flips) is global and identical on every rank, each rank takes its slice;
the noise of each batch chunk comes from a generator seeded by (seed, step, chunk index), so 2 ranks x 4 images
draw what 1 process x 2 rounds of 4 draws, and a resumed run draws what an uninterrupted one did. Dropout uses
the global torch RNG (seeded per rank, saved in checkpoints).
"""
from __future__ import annotations

import inspect
import json
from contextlib import contextmanager, nullcontext
import os
import random
import resource
import signal
import sys
import time

import numpy as np
import torch

from .. import ops, precond
from ..data import Sampler, load_dataset
from ..ema import ema_update_
from . import checkpoint as ckpt
from .config import IDENTITY, resolve
from .cuda_graph import GraphedStep, check_cuda_graph_device, grad_norm
from .images import grid, png_bytes, to_uint8
from .methods import get_method


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite losses past the limit); one line."""


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """The seed of one chunk's noise: distinct for every (seed, step, chunk). The linear mix it replaces repeated itself
    (chunk 4099 of a step drew step + 1's chunk 0; step 1,000,003 of seed s drew step 0 of seed s + 1)."""
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF


KEPT = "; the checkpoints written before it are kept: --resume latest continues from them"


def _cannot_write(what: str, e: OSError, kept: bool = True) -> OSError:
    """A failed write of rank 0 (a full disk) as one line naming the file, and what is kept; errno kept (OSError(errno,
    message) printed as '[Errno 28] cannot write ...')."""
    error = OSError(f"cannot write {what} ({e.strerror or e})" + (KEPT if kept else ""))
    error.errno = e.errno
    return error


class Log:
    """Rank 0 prints and appends to log.txt; other ranks are silent.

    A line rank 0 cannot write (a full disk, a closed stdout): alone, the error is raised at once; under torchrun
    (defer) it is kept in `failed`, later lines are printed only, and rank 0 tells every rank at its next broadcast
    (_rank0_wrote: the next stats row, sample grid or checkpoint, at the latest the end of the run), so that all
    end with its line. Raised at once, rank 0 ended alone and the others went on into the next step's collective,
    to die there with gloo's 'Connection closed by peer' traceback."""

    def __init__(self, path: str | None, defer: bool = False):
        self.path, self.defer, self.failed = path, defer, None

    def __call__(self, msg: str) -> None:
        if self.path is None:
            return
        try:
            print(msg, flush=True)
        except OSError as e:
            return self.fail(_cannot_write("to stdout", e))
        if self.failed is not None:     # log.txt failed before: the console only, until rank 0 tells the others
            return
        try:
            with open(self.path, "a") as f:
                f.write(msg + "\n")
        except OSError as e:
            self.fail(_cannot_write(self.path, e))

    def fail(self, error: OSError) -> None:
        """A write of rank 0 failed: raised now (one process), or kept for its next broadcast (defer)."""
        self.failed = self.failed or error
        if not self.defer:
            raise error


# Whether this process created a process group (under torchrun). PyTorch's DDP keeps that group, and gloo's worker
# threads, alive after destroy_process_group (its C++ reducer is never freed); a worker thread that drops its last
# tensor while the interpreter shuts down takes the GIL and aborts the rank ("terminate called without an active
# exception", SIGABRT: 4 in 25 runs of a 2-rank script, and CI runs of the 2-rank tests). cmfast-train therefore ends
# such a process with os._exit once everything is written (cli/train.py); a script that calls train() under torchrun
# can do the same.
_GROUP = {"created": False, "count": 0}


def created_process_group() -> bool:
    """True once setup_distributed has started a process group in this process (cmfast-train then skips the
    interpreter's shutdown, see _GROUP)."""
    return _GROUP["created"]


def setup_distributed(device: str | None):
    """(rank, world size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        # all of this machine's ranks would share one GPU, which NCCL refuses cryptically at the first collective
        raise ValueError(f"--device {device}: under torchrun each rank of a machine takes its own GPU "
                         f"(cuda:LOCAL_RANK); pass --device cuda")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        _init_group("nccl" if dev.type == "cuda" else "gloo")
        _GROUP["created"] = True
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, dev


def _init_group(backend: str) -> None:
    """init_process_group from torchrun's environment (env://), its keys in the store under a prefix of their own for
    each group this process makes. train() destroys the group it made; torch then names the next one as it named the
    first (its group count restarts at 0), so a second train() in the process (or the caller's own env:// group after
    it) read the old group's keys in torchrun's store: a rank connected to its peer's old address (gloo: 'Connection
    refused', the rank ended) or waited there."""
    dist = torch.distributed
    store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group(backend, store=dist.PrefixStore(f"cmfast-train/{_GROUP['count']}", store), rank=rank,
                            world_size=world)
    _GROUP["count"] += 1


def _check_writable(out: str, dry: bool = False) -> None:
    """The output folder, made if missing, takes a file; dry (--dry-run): the same error, nothing made or written (the
    folder, else its nearest existing parent, must be a writable folder)."""
    try:
        if dry:
            _check_writable_dry(out)
            return
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"output dir {out} is not writable ({e.strerror or e})") from None


def _check_writable_dry(out: str) -> None:
    """The OSError that makedirs and a probe file would raise in `out`, by looking only."""
    import errno
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))          # makedirs(exist_ok=True) of a file
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not os.path.isdir(path):
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))        # a file on the way
    if hasattr(os, "statvfs") and os.statvfs(path).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    if not os.access(path, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))
    made_there = {"proc": (errno.ENOENT, errno.ENOENT), "sysfs": (errno.EPERM, errno.EACCES)}.get(_fs_type(path))
    if made_there:      # the kernel's own views, where os.access lets root through and nothing can be made
        code = made_there[path == os.path.abspath(out)]     # makedirs' mkdir (out missing), else the probe file's
        raise OSError(code, os.strerror(code))


def _fs_type(path: str) -> str | None:
    """The type of the filesystem holding `path` (proc, ext4, ...): the /proc/self/mountinfo line of its device, or
    None where there is none (not Linux; a device no line names, as a btrfs subvolume's)."""
    try:
        dev = os.stat(path).st_dev
        with open("/proc/self/mountinfo") as f:
            for line in f:      # ID PARENT MAJOR:MINOR ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - TYPE SOURCE ...
                fields = line.split()
                if fields[2] == f"{os.major(dev)}:{os.minor(dev)}":
                    return fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        pass
    return None


def _load_teacher(cfg: dict, shape, device, dry: bool = False):
    """(teacher, its config) after the checks against the student's data; dry (--dry-run): (None, its config), the
    teacher checked by ckpt.check_model (its header and weights, nothing built)."""
    try:
        if dry:
            teacher, meta = None, ckpt.check_model(cfg["teacher"], which="ema")
        else:
            teacher, meta = ckpt.load_model(cfg["teacher"], which="ema", map_location=device)
    except ckpt.CheckpointError as e:
        raise ValueError(f"--teacher: {e}") from None
    tcfg = meta["config"]
    tshape = (tcfg["net"]["in_channels"], tcfg["net"]["img_resolution"], tcfg["net"]["img_resolution"])
    if get_method(tcfg["method"]).kind != "edm" or tshape != tuple(shape):
        raise ValueError(f"--teacher {cfg['teacher']}: expected an EDM denoiser (--method edm) for {tuple(shape)} "
                         f"images, got --method {tcfg['method']} for {tshape} images")
    if bool(tcfg["net"].get("label_dim")) != bool(cfg["net"].get("label_dim")):
        raise ValueError(f"--teacher {cfg['teacher']}: class conditioning differs from the student's (--cond)")
    if (tcfg["net"].get("label_dim") or 0) != (cfg["net"].get("label_dim") or 0):    # else a label past the teacher's
        raise ValueError(f"--teacher {cfg['teacher']}: conditional on {tcfg['net']['label_dim']} classes, the "
                         f"student's data has {cfg['net']['label_dim']}")       # failed the first step
    return teacher, tcfg


def startup_checks(cfg: dict, shape, device=None, dry: bool = False, count: int | None = None):
    """A run's checks after its data, in its order: the teacher (CD / sCD; cfg['net'] takes its time scale), then the
    output folder's checkpoints against --resume. -> (teacher, its config, the folder's checkpoints). dry
    (--dry-run): the teacher checked, not loaded (teacher None), and the rest of what the run refuses before its
    first step: the output folder writable (nothing made), the checkpoint it would resume from (_resume_dry: its
    settings, parts, weights and training state, as _resume checks them; count: the dataset's size where the dry run
    knows it, an image folder's, for the sampler's position)."""
    method = get_method(cfg["method"])
    out = cfg["output_dir"]
    teacher, tcfg = _load_teacher(cfg, shape, device, dry) if method.needs_teacher else (None, None)
    if tcfg is not None and cfg["init_from_teacher"]:     # openai's teacher reads time 1000x: so must its student
        from ..nets import adopt_time_scale
        cfg["net"] = adopt_time_scale(cfg["net"], tcfg["net"])
    found = ckpt.list_checkpoints(out)
    if cfg["resume"] is None and found:
        raise ValueError(f"{out} already holds checkpoints: pass --resume latest to continue, or another --output-dir")
    if cfg["resume"] == "latest" and not found:
        raise ValueError(f"--resume latest: no checkpoint (ckpt-*.safetensors with its .state.pt) in {out}")
    if cfg["resume"] not in (None, "latest", "auto"):
        ckpt.resolve(cfg["resume"])                        # a one-line error when the path is not a checkpoint
    if dry:
        _check_writable(out, dry=True)
        if cfg["resume"] and (found or cfg["resume"] not in ("latest", "auto")):
            given = cfg["resume"] not in ("latest", "auto")
            _resume_dry([ckpt.resolve(cfg["resume"])] if given else [c[1] for c in reversed(found)], cfg, count)
    return teacher, tcfg, found


def _resume_dry(candidates, cfg, count=None) -> None:
    """--dry-run's _resume: its checks and error lines, on models built on the meta device (no memory). The first
    checkpoint whose header and training state read (an unreadable one: a note, and the previous one), the settings
    that must agree (its --time-budget plan kept), its parts, its weights for NaN / inf one tensor at a time
    (ckpt.check_tensors: the weights file is never loaded whole), their shapes and the training state loaded into the
    meta models, their optimizer, a sampler and spare RNGs (_load_into, the run's own code). The training state is
    loaded whole (torch.load reads no part of a file alone): the dry run's one extra read, as the run reads it once.
    The sampler's position is checked against `count` images, the run's dataset size, where the dry run knows it (an
    image folder's file count; a named dataset is not read: left to the run)."""
    def note(e, more):
        print(f"cmfast-train: note: {e}" + ("; the run would try the previous checkpoint" if more else ""),
              file=sys.stderr)

    wpath, (shapes, meta, state) = _first_readable(
        candidates, cfg, lambda w: (*ckpt.read_header(w), ckpt.load_state(_state_path(w))), note)
    _check_identity(wpath, meta["config"], cfg)
    _keep_plan(meta["config"], cfg)
    method = get_method(cfg["method"])
    from ..nets import UNet
    with torch.device("meta"):      # build() without the LPIPS net or the teacher, which checkpoints do not hold
        models = method.build(UNet(**cfg["net"]), dict(cfg, loss=None))
    models = {k: m for k, m in models.items() if k in ("model", "target")}
    emas = {r: ckpt_copy(models["model"]) for r in cfg["ema"]}
    _check_parts(wpath, shapes, state, models, emas, lambda names: ckpt.check_tensors(wpath, names))
    weights = {name: {k: torch.empty(shape, device="meta") for k, shape in sd.items()} for name, sd in shapes.items()}
    scaler = torch.amp.GradScaler("cpu") if cfg["precision"] == "fp16" else None
    _load_into(wpath, weights, state, models, emas, make_optimizer(models["model"].parameters(), cfg), scaler,
               _SamplerOfItsState(cfg["seed"], count), int(os.environ.get("RANK", "0")), lambda msg: None, spare=True)


class _SamplerOfItsState(Sampler):
    """--dry-run's Sampler: of `count` images (the run's refusal of a position past them), or where the dataset's size
    is unknown there, of the state's position (never refused)."""

    def __init__(self, seed: int, count: int | None = None):
        self.seed, self.count = seed, count

    def load_state_dict(self, sd: dict):
        n = self.count if self.count is not None else max(int(sd["pos"]), 0)   # int(): the run's error for a
        Sampler.__init__(self, n, self.seed)                                      # position that is no number
        super().load_state_dict(sd)


def make_optimizer(params, cfg):
    kinds = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}
    return kinds[cfg["optimizer"]](params, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=1e-8)


@torch.no_grad()
def write_samples(model, kind: str, cfg: dict, step: int, shape, device, out: str) -> list[str]:
    """Sample grids from a fixed seed: 1 and 2 steps (CM Alg. 1, middle level 0.821 as ECT, or the method's own:
    cfg['sampling_sigmas']) or EDM's 18-step Heun."""
    from ..sampling import edm_sample, sample
    n = cfg["sample_num"]
    z = torch.randn((n, *shape), generator=torch.Generator().manual_seed(cfg["seed"] + 12345)).to(device)
    labels = torch.arange(n, device=device) % cfg["net"]["label_dim"] if cfg["net"].get("label_dim") else None
    was_training = model.training
    model.eval()
    from ..metrics import default_sigmas
    two = tuple((cfg.get("sampling_sigmas") or {}).get("2") or (cfg["sigma_max"], *default_sigmas(2)[1:]))
    runs = ({"heun18": lambda: edm_sample(model, z, 18, class_labels=labels)} if kind == "edm" else
            {f"{len(s)}step": (lambda s=s: sample(model, z, s, torch.Generator(device).manual_seed(cfg["seed"]),
                                                  labels)) for s in ((cfg["sigma_max"],), two)})
    files = []
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    for tag, fn in runs.items():
        path = os.path.join(out, "samples", f"{step:08d}-{tag}.png")
        ckpt.atomic_write(path, png_bytes(grid(to_uint8(fn()))))
        files.append(path)
    model.train(was_training)
    return files


def train(args: dict) -> dict:
    """Run (or resume) training from CLI arguments (a dict, None = not given). Returns the final stats row.
    A process group this call creates (under torchrun) is destroyed when it returns or raises, so that a second call,
    or the caller's own init_process_group, makes a new one (_init_group); a group the caller made is used and left
    as it was. (DDP keeps gloo's threads alive even so: end such a process with os._exit, as cmfast-train does; see
    _GROUP.)"""
    dist = torch.distributed
    owns_group = dist.is_available() and not dist.is_initialized()
    finished, startup = False, {"world": 1, "agreed": False}
    try:
        row = _train(args, startup)
        finished = True
        return row
    except (ValueError, OSError, ImportError) as e:        # a user error: the other ranks must hear of it
        if startup["world"] > 1 and not startup["agreed"]:
            _agree_on_startup(startup, e)
        raise
    finally:
        if owns_group and dist.is_initialized():
            # After a normal end the ranks tear the group down together: rank 0 may still be writing the last
            # checkpoint, and a rank that destroyed its gloo group while its peer's connections were open once
            # aborted the same way (a CI run of the compiled 2-rank test, rank 1, after its last step). Not after
            # an error: the other rank may be gone, and a barrier would hang.
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def _agree_on_startup(startup: dict, error: Exception | None = None) -> None:
    """Under torchrun the start-up checks (data, teacher, resume, output folder: no collectives) end at one
    collective, reached by a rank that failed them from train()'s exception path: a user error found on any rank
    (the output folder's: rank 0 alone) is raised on every rank, so all end at once (cmfast-train: rank 0 prints
    it). Without it a rank that passed went on into DDP's first collective, to be ended by torchrun with a second,
    misleading line ('interrupted'), or left waiting there when the failing rank was not rank 0."""
    startup["agreed"] = True
    found = [None] * startup["world"]
    mine = None if error is None else (str(error).splitlines() or [type(error).__name__])[0]
    torch.distributed.all_gather_object(found, mine)
    bad = [i for i, m in enumerate(found) if m is not None]
    if bad and error is None:
        raise ValueError(f"rank {bad[0]}: {found[bad[0]]}")


def _train(args: dict, startup: dict) -> dict:
    rank, world, device = setup_distributed(args.get("device"))
    startup["world"] = world
    cfg = resolve(args, world)
    out = cfg["output_dir"]
    method = get_method(cfg["method"])
    torch.manual_seed(cfg["seed"] + rank)                  # dropout; the model init below is the same on all ranks
    np.random.seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)

    # ---- Data, teacher, output folder: every user mistake is found before anything is written --------------------
    data = load_dataset(cfg["dataset"], cfg["data_dir"], cfg["xflip"])
    cfg = resolve(args, world, data.shape, data.num_classes, getattr(data, "classes", None))
    teacher, tcfg, found = startup_checks(cfg, data.shape, device)

    with ops.use_backend(cfg["backend"]):                  # a backend asked for by name must run here
        for op in ("skip_output", "group_norm_act", "attention", "consistency_loss"):
            try:
                ops.implementation(op, device)
            except ops.BackendUnavailable as e:
                raise ValueError(f"backend {cfg['backend']} (--backend, else CMFAST_BACKEND): {e}") from None

    check_compile(cfg["compile"], method, cfg["net"], device)
    check_cuda_graph_device(cfg, device)

    # ---- Models: online (trained), target (CD/CT), EMAs for evaluation ----------------------------------------------
    torch.manual_seed(cfg["seed"])
    from ..nets import UNet, architecture
    net = UNet(**cfg["net"])
    # CM paper: the student starts from the teacher, where their networks differ in dropout at most.
    init_from_teacher = (teacher is not None and cfg["init_from_teacher"]
                         and architecture(tcfg["net"]) == architecture(cfg["net"]))
    if init_from_teacher:
        net.load_state_dict(teacher.net.state_dict())
    # build() draws random state outside the backbone that DDP does not broadcast (sCT's logvar head: its Fourier
    # frequencies): from the same seed on every rank, as one process draws it; then each rank's own dropout stream.
    torch.manual_seed(cfg["seed"])
    models = method.build(net, cfg, teacher)
    if rank:
        torch.manual_seed(cfg["seed"] + rank)
    for m in models.values():
        m.to(device)
    model = models["model"]
    if rank == 0:                                           # the last check before the first file is written
        _check_writable(out)
    log = Log(os.path.join(out, "log.txt") if rank == 0 else None, defer=world > 1)
    emas = {r: ckpt_copy(model) for r in cfg["ema"]}
    opt = make_optimizer(model.parameters(), cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg["precision"] == "fp16" else None
    sampler = Sampler(len(data), cfg["seed"])
    # nonfinite_streak: the consecutive non-finite steps so far (--nan-limit), saved with the others so that a resumed
    # run stops where an uninterrupted one would (it restarted the count from 0)
    step, counters = 0, {"skipped": 0, "overflow": 0, "nonfinite_streak": 0}

    # ---- Resume: the newest readable checkpoint (an unreadable one is reported and the previous one used) -------
    if cfg["resume"] and (found or cfg["resume"] not in ("latest", "auto")):
        given = cfg["resume"] not in ("latest", "auto")
        candidates = [ckpt.resolve(cfg["resume"])] if given else [c[1] for c in reversed(found)]
        step, counters = _resume(candidates, cfg, models, emas, opt, scaler, sampler, rank, log)

    if world > 1:
        _agree_on_startup(startup)
    compiled = compile_nets(models, cfg["compile"])   # in place, before DDP wraps model.net (PyTorch's advice)
    if world > 1:    # DDP wraps the backbone, so method code keeps model.sigma_min etc.; state dicts are unwrapped
        # Its buffers (resampling filters, Fourier frequencies) are constants, the same on every rank: no broadcast at
        # each forward, a collective that also failed inside torch.func.jvp (sCT / sCD's jvp=exact: 'mutate a captured
        # Tensor'). torch >= 2.13 names the flag forward_sync_buffers (broadcast_buffers is deprecated there).
        ddp = torch.nn.parallel.DistributedDataParallel
        no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                          else "broadcast_buffers": False}
        model.net = ddp(model.net, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)

    def state_dicts():
        sds = {"model": _bare(model)}
        if "target" in models:
            sds["target"] = models["target"].state_dict()
        for r, e in emas.items():
            sds[f"ema@{r}"] = e.state_dict()
        return sds

    def save(step):
        rngs = [ckpt.rng_state()]
        if world > 1:       # every rank's RNG (dropout), gathered to rank 0
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, ckpt.rng_state())
        failed = log.failed         # a line of log.txt rank 0 could not write: nothing more is written
        if rank == 0 and failed is None:
            state = {"optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                     "sampler": sampler.state_dict(), "rng": rngs if world > 1 else rngs[0], "counters": counters}
            try:
                path = ckpt.save_checkpoint(out, step, state_dicts(), cfg, state, cfg["keep"])
            except OSError as e:    # a full disk: one line saying what is kept (atomic writes: the older ones whole)
                failed = _cannot_write(f"the checkpoint of step {step} in {out}", e)
            else:
                log(f"checkpoint {path}")       # before the broadcast: a line it cannot write is told with it
        _rank0_wrote(failed, world, log)

    def write_config():     # at the start, and again when --time-budget has planned the length (whole or not at all)
        path = os.path.join(out, "config.json")
        try:
            ckpt.atomic_write(path, json.dumps(cfg, indent=2).encode())
        except OSError as e:
            raise _cannot_write(path, e, kept=step > 0) from None

    # ---- Rank 0's start-up writes (stale temporary files, config.json, log.txt), told to every rank ----------------
    failed, bar = None, None
    if rank == 0:
        try:
            for d in (out, os.path.join(out, "samples")):
                gone = ckpt.remove_stale_temps(d)
                if gone:
                    log(f"removed {len(gone)} temporary file(s) of a killed run's writes from {d}: {', '.join(gone)}")
            write_config()
            if cfg.get("classes"):
                log("classes from the subfolders: " + ", ".join(f"{i} {c}" for i, c in enumerate(cfg["classes"])))
            if cfg["cond"] and data.labels is not None:
                counts = torch.bincount(data.labels, minlength=cfg["net"]["label_dim"]).tolist()
                empty = [i for i, c in enumerate(counts) if c == 0]
                log(f"class-conditional: {len(counts)} classes, {min(counts)} to {max(counts)} images each"
                    + (f"; warning: no images of class {', '.join(map(str, empty[:10]))}"
                       f"{' ...' if len(empty) > 10 else ''} (the model still learns a label for it; labels numbered "
                       "from 1?)" if empty else ""))
            log(f"{method.name} on {cfg['dataset']} ({len(data)} images {data.shape}), {cfg['preset']} "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {world} rank(s) on {device}, "
                + (f"steps {step} -> {cfg['total_steps']}" if not cfg.get("time_budget") or cfg.get("planned") else
                   f"steps from {step}, as many as fit in --time-budget {cfg['time_budget']:g} min (planned after "
                   f"{PROBE_UNTIMED + PROBE_TIMED} steps)"))
            for note in method.warnings(cfg):
                log(f"warning: {note}")
            if teacher is not None and cfg["init_from_teacher"] and step == 0:
                log("the student starts from the teacher's weights" if init_from_teacher else
                    "the student starts from random weights: its network differs from the teacher's")
            if compiled:
                log(f"torch.compile mode {cfg['compile']} ({compiled['backend']} backend, cmfast.ops backend "
                    f"{cfg['backend']}) of {', '.join(compiled['nets'])}: the first steps compile, the first stats row "
                    f"(compile_warmup) includes that time")
            if sys.stdout.isatty():
                try:
                    from tqdm import tqdm       # the eval extra: without it, no progress bar (an ImportError on
                except ImportError:             # rank 0 alone ended it alone)
                    tqdm = None
                if tqdm is not None:
                    bar = tqdm(total=cfg["total_steps"], initial=step, unit="step", dynamic_ncols=True)
        except OSError as e:
            failed = e
    stop_at = cfg["stop_at"] if cfg["stop_at"] is not None else float("inf")
    if stop_at <= step < cfg["total_steps"]:
        # --stop-at is checked after each step, and in the loop's condition before the first: a rerun of a job that
        # stopped there (a requeue) must not train one more step and checkpoint it.
        log(f"at step {step} already (--stop-at {cfg['stop_at']}): nothing to train")
    try:
        _rank0_wrote(failed, world, log)      # the run's one broadcast before its first step
    except OSError:
        if bar:
            bar.close()
        raise

    # ---- Signals: finish the step, write a checkpoint, exit 0 -----------------------------------------------------
    stop = {"signal": 0}

    def on_signal(signum, frame):
        stop["signal"] = signum
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["precision"]]
    local, rounds = cfg["batch_size"] // world, cfg["batch_size"] // world // cfg["batch_gpu"]
    params = [p for p in model.parameters() if p.requires_grad]
    # Trained parameters outside the DDP-wrapped backbone (sCT / sCD's logvar head): DDP does not reduce their
    # gradients, so they join the step's one all-reduce below, averaged over the ranks as DDP averages the backbone's.
    unwrapped = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("net.")] \
        if world > 1 else []
    # --cuda-graph: loss, backward and clipping replayed as one graph, captured at the first step (after the resume)
    graphed = GraphedStep(method, models, cfg, params, autocast) if cfg.get("cuda_graph") else None
    tick = {"loss": 0.0, "gnorm": 0.0, "n": 0, "t0": time.time(), "step0": step,
            "warmup": bool(compiled or graphed)}
    row = {}
    limit_s = None if cfg.get("time_limit") is None else cfg["time_limit"] * 60.0
    t_start, run_step0 = time.monotonic(), step
    # --time-budget: K is planned from the speed of this run's first steps (none when a resumed plan stands).
    probe = {"from": step, "t": None} if cfg.get("time_budget") and not cfg.get("planned") else None

    # (total_steps is read every step: --time-budget plans it after its probe.)
    with ops.use_backend(cfg["backend"]), _restore_signals(old, bar):
        while step < cfg["total_steps"] and step < stop_at:
            if compiled:    # a new iteration for CUDA-graph trees (reduce-overhead, max-autotune); a no-op otherwise
                torch.compiler.cudagraph_mark_step_begin()
            # Data: the global batch is drawn on every rank, each rank keeps its slice.
            idx, flip = sampler.next(cfg["batch_size"])
            x, y = data.batch(idx[rank * local:(rank + 1) * local], flip[rank * local:(rank + 1) * local], device)
            y = y if cfg["net"].get("label_dim") else None
            ramp = cfg["lr_rampup_kimg"] * 1000                 # EDM's linear warm-up, in images
            lr = cfg["lr"] * (min(1.0, (step + 1) * cfg["batch_size"] / ramp) if ramp else 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            if graphed is not None:     # one process, one round (check_cuda_graph)
                loss_sum, gnorm_t, info = graphed(x, y, step)
            else:
                opt.zero_grad(set_to_none=True)
                loss_sum, info = torch.zeros((), device=device), {}
                for r in range(rounds):
                    sl = slice(r * cfg["batch_gpu"], (r + 1) * cfg["batch_gpu"])
                    gen = torch.Generator(device).manual_seed(chunk_seed(cfg["seed"], step, rank * rounds + r))
                    sync = world == 1 or r == rounds - 1
                    # skip_value_checks: the models' noise-level checks would each sync with the GPU mid-step
                    with (torch.autocast(device.type, autocast) if autocast else nullcontext()), \
                            (model.net.no_sync() if not sync else nullcontext()), precond.skip_value_checks():
                        loss_vec, info = method.loss(models, x[sl], step, cfg, gen, None if y is None else y[sl])
                        loss = loss_vec.float().mean() / rounds
                    (scaler.scale(loss) if scaler else loss).backward()
                    loss_sum += loss.detach() * rounds * loss_vec.shape[0]
            # One collective per step: the global loss sum and the stop request (every rank stops together).
            timed_out = limit_s is not None and time.monotonic() - t_start > limit_s
            # (torch.full: a fill kernel; torch.tensor(v, device=...) would be a blocking host-to-device copy)
            red = torch.stack([loss_sum, torch.full((), float(stop["signal"] > 0 or timed_out), device=device)])
            if unwrapped:
                red = torch.cat([red, *((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                                        for p in unwrapped)])
            if world > 1:
                torch.distributed.all_reduce(red)
            at = 2
            for p in unwrapped:
                p.grad = (red[at:at + p.numel()] / world).view_as(p).to(p.dtype)
                at += p.numel()
            if scaler:
                scaler.unscale_(opt)
            if graphed is None:
                gnorm_t = grad_norm(params, cfg["grad_clip"] or 0.0)
            # The step's one host sync: loss, grad norm and the stop request come back together.
            loss_sum_all, stop_req, gnorm = torch.stack([red[0], red[1], gnorm_t.float()]).tolist()
            loss_mean = loss_sum_all / cfg["batch_size"]
            finite = np.isfinite(loss_mean) and np.isfinite(gnorm)
            if finite:
                (scaler.step(opt) if scaler else opt.step())
            if scaler:
                scaler.update()
            if finite:
                method.after_step(models, step, cfg)
                for rate, e in emas.items():   # EMA with warm-up: min(rate, (1 + k) / (10 + k))
                    ema_update_(e, model, min(rate, (1 + step) / (10 + step)))
                counters["nonfinite_streak"] = 0
                tick["loss"], tick["gnorm"], tick["n"] = tick["loss"] + loss_mean, tick["gnorm"] + gnorm, tick["n"] + 1
            elif scaler and np.isfinite(loss_mean):
                counters["overflow"] += 1          # fp16 loss scaling: the scaler skipped the step and lowers scale
            else:
                counters["skipped"] += 1
                counters["nonfinite_streak"] = streak = counters["nonfinite_streak"] + 1
                log(f"step {step}: non-finite loss {loss_mean} or grad norm {gnorm}; step skipped")
                if streak >= cfg["nan_limit"]:
                    raise TrainingError(f"{streak} consecutive non-finite steps (last loss {loss_mean}, "
                                        f"grad norm {gnorm}); lower --lr, set --grad-clip or use --precision fp32")
            step += 1
            if bar:
                bar.update(1)
            if probe is not None and step - probe["from"] == PROBE_UNTIMED:
                probe["t"] = time.monotonic()
            elif probe is not None and step - probe["from"] == PROBE_UNTIMED + PROBE_TIMED:
                _plan_length(cfg, step, (time.monotonic() - probe["t"]) / PROBE_TIMED, time.monotonic() - t_start,
                             world, device, log)
                probe = None
                if rank == 0 and log.failed is None:
                    try:
                        write_config()
                    except OSError as e:
                        log.fail(e)     # told with the next stats row, grid or checkpoint (or raised: one process)
                if bar:
                    bar.total = cfg["total_steps"]
                    bar.refresh()
            stopping = stop_req > 0 or (cfg["stop_at"] is not None and step >= cfg["stop_at"])
            last = step >= cfg["total_steps"] or stopping
            # rank 0's stats row and sample grids, told to every rank (_rank0_wrote); none after a failed log line
            failed, wrote = log.failed, False
            if step % cfg["log_every"] == 0 or last:
                row = _stats_row(step, cfg, tick, info, lr, counters, device)
                row["elapsed_s"] = round(time.monotonic() - t_start, 1)       # this run's, since its start / resume
                if rank == 0 and failed is None:
                    try:
                        with open(os.path.join(out, "stats.jsonl"), "a") as f:
                            f.write(json.dumps(row) + "\n")
                        done, end = step - run_step0, min(cfg["total_steps"], stop_at)   # this run's steps, its end
                        eta = (end - step) * row["elapsed_s"] / done if done and not last else 0.0
                        shown = {k: v for k, v in row.items() if k != "time"}    # a Unix time: in stats.jsonl only
                        msg = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in
                                       {**shown, "eta_s": round(eta)}.items())
                        (bar.write if bar else print)(msg)
                        with open(os.path.join(out, "log.txt"), "a") as f:
                            f.write(msg + "\n")
                    except OSError as e:
                        failed = e
                tick.update(loss=0.0, gnorm=0.0, n=0, t0=time.time(), step0=step, warmup=False)
                wrote = True
            if (step % cfg["sample_every"] == 0 or last) and cfg["sample_num"] > 0:
                if rank == 0 and failed is None:
                    try:
                        src = next(iter(emas.values())) if emas else model
                        write_samples(src, method.kind, cfg, step, data.shape, device, out)
                    except OSError as e:
                        failed = e
                wrote = True
            if wrote:
                _rank0_wrote(failed, world, log)
            if step % cfg["ckpt_every"] == 0 or last:
                save(step)
            if stopping:
                why = (" on a signal" if stop["signal"] else " (--time-limit)" if timed_out
                       else " (another rank's stop request)" if stop_req > 0 else " (--stop-at)")
                log(f"stopping at step {step}{why}")
                break
    if world > 1:       # a line of log.txt after the last step's broadcast ('stopping at'): the run's last broadcast
        _rank0_wrote(None, world, log)
    return row


def _rank0_wrote(failed: OSError | None, world: int, log: Log) -> None:
    """After rank 0's writes (its start-up files; a step's stats row, sample grids, checkpoint): its error, a line of
    log.txt it could not write since the last call (log.failed), or None, told to every rank, so that a failure (a full
    disk) ends all of them with its one line. The others went on into the next step's gradient all-reduce and failed
    there, rank 0 gone, with gloo's 'Connection closed by peer' traceback."""
    failed = failed or log.failed
    if world > 1:
        told = [None if failed is None else str(failed)]
        torch.distributed.broadcast_object_list(told, src=0)
        failed = failed or (OSError(told[0]) if told[0] is not None else None)
    if failed is not None:
        raise failed


# --time-budget's probe: steps not timed (compilation, cuDNN's algorithm search, the allocator's first growth),
# then steps timed; K is planned at the end of the probe, for the fraction PLAN_FILL of the time left.
PROBE_UNTIMED, PROBE_TIMED, PLAN_FILL = 2, 8, 0.95


def _plan_length(cfg, step, s_per_step, elapsed_s, world, device, log) -> None:
    """Set cfg['total_steps'] (and kimg) to the steps that fit in --time-budget at the probed speed; record the plan
    in cfg['planned'] (saved with every checkpoint: a resumed run keeps it). Ranks agree on the slowest rank's
    numbers."""
    if world > 1:
        t = torch.tensor([s_per_step, elapsed_s], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        s_per_step, elapsed_s = t.tolist()
    left = cfg["time_budget"] * 60.0 - elapsed_s
    total = step + max(0, int(PLAN_FILL * left / max(s_per_step, 1e-9)))
    cfg["total_steps"], cfg["kimg"] = total, total * cfg["batch_size"] / 1000
    cfg["planned"] = {"total_steps": total, "at_step": step, "ms_per_step": round(s_per_step * 1e3, 3),
                      "elapsed_s": round(elapsed_s, 2), "time_budget_min": cfg["time_budget"]}
    log(f"--time-budget {cfg['time_budget']:g} min: {s_per_step * 1e3:.1f} ms a step over steps "
        f"{step - PROBE_TIMED}-{step}, {elapsed_s:.1f} s spent -> {total} steps in all")


# Settings a resumed run may change (IDENTITY's may not); each change is logged.
CHANGEABLE = ("batch_size", "lr", "lr_rampup_kimg", "optimizer", "betas", "total_steps", "loss", "ema", "precision",
              "grad_clip", "xflip", "seed", "method_args")


def _changed_settings(was: dict, now: dict) -> list[str]:
    """'key old -> new' for each CHANGEABLE setting (each hyperparameter of method_args) that differs."""
    out = []
    for k in CHANGEABLE:
        a, b = was.get(k), now.get(k)
        if k == "method_args" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"{n} {a.get(n)!r} -> {b.get(n)!r}" for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
        elif k in was and (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            out.append(f"{k} {a!r} -> {b!r}")
    return out


def _check_identity(wpath: str, was: dict, cfg: dict) -> None:
    """The one-line refusal of a checkpoint whose IDENTITY settings differ from this command's."""
    diff = [k for k in IDENTITY if was.get(k) != cfg[k]]
    if diff:    # with the values: 'in net' alone left a dropped --cond or a new class in the folder to be guessed
        now, keys = cfg, diff
        if diff == ["net"] and isinstance(was["net"], dict) and isinstance(now["net"], dict):
            was, now = was["net"], now["net"]
            keys = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        raise ValueError(f"--resume {wpath}: the checkpoint differs from this command in {', '.join(diff)} ("
                         + "; ".join(f"{k} {was.get(k)!r} there, {now.get(k)!r} here" for k in keys) + ")")


def _keep_plan(was: dict, cfg: dict) -> None:
    planned = was.get("planned")
    if cfg.get("time_budget") and planned:        # the run's length was planned before: keep it
        cfg["total_steps"], cfg["planned"] = planned["total_steps"], planned
        cfg["kimg"] = planned["total_steps"] * cfg["batch_size"] / 1000


def _resume(candidates, cfg, models, emas, opt, scaler, sampler, rank, log):
    """Load the first readable checkpoint of `candidates` into everything that has state; -> (step, counters)."""
    def warn(e, more):
        log(f"warning: {e}" + ("; trying the previous checkpoint" if more else ""))

    wpath, (weights, meta, state) = _first_readable(
        candidates, cfg, lambda w: (*ckpt.load_weights(w), ckpt.load_state(_state_path(w))), warn)
    _check_identity(wpath, meta["config"], cfg)
    _keep_plan(meta["config"], cfg)
    _check_parts(wpath, weights, state, models, emas,
                 lambda names: [ckpt.check_weights(wpath, name, weights[name]) for name in names])
    step, counters = _load_into(wpath, weights, state, models, emas, opt, scaler, sampler, rank, log)
    log(f"resumed from {wpath} at step {step}")
    changed = _changed_settings(meta["config"], cfg)
    if changed:     # allowed, but said: a new batch size counts kimg at the new size; a new length stretches schedules
        log("settings changed since the checkpoint: " + "; ".join(changed))
    if rank == 0:
        _trim_stats(cfg["output_dir"], step, log)
    later = [s for s, _, _ in ckpt.list_checkpoints(cfg["output_dir"], complete=False) if s > step]
    if later:
        log(f"note: checkpoints of later steps ({', '.join(map(str, later))}) stay in {cfg['output_dir']} until this "
            "run overwrites them; --keep does not prune them")
    return step, {"nonfinite_streak": 0, **counters}     # older checkpoints: no streak


def _state_path(wpath: str) -> str:
    return wpath[:-len(".safetensors")] + ".state.pt"


def _first_readable(candidates, cfg, read, say):
    """(weights path, read(it)) of the first of `candidates` that `read` reads; each unreadable one said (say(error,
    whether another follows)) and the previous one tried."""
    for i, wpath in enumerate(candidates):
        try:
            return wpath, read(wpath)
        except ckpt.CheckpointError as e:
            say(e, i + 1 < len(candidates))
    where = cfg["output_dir"] if cfg["resume"] in ("latest", "auto") else cfg["resume"]
    raise ValueError(f"--resume: no readable checkpoint in {where}")


def _check_parts(wpath, weights, state, models, emas, check_weights) -> None:
    """A pair that lacks a part (another run's, edited, damaged) was a KeyError traceback from deep in torch: now one
    line naming the file. Then check_weights(names) of its modules that load (NaN weights: every step skipped)."""
    missing = [n for n in ("model", "target") if n in models and n not in weights]
    missing += [k for k in ("step", "optimizer", "sampler", "rng", "counters") if k not in state]
    if missing:
        raise ckpt.CheckpointError(f"{wpath}: not a whole checkpoint of this run (no {', '.join(map(repr, missing))})")
    check_weights([n for n in ("model", "target", *(f"ema@{r}" for r in emas)) if n in weights])


def _load_into(wpath, weights, state, models, emas, opt, scaler, sampler, rank, log, spare=False):
    """The checkpoint's weights and training state loaded into the run's models, optimizer, scaler, sampler and RNGs
    (spare: RNGs of their own, --dry-run's); -> (step, counters). A pair that does not fit them (another run's, edited,
    damaged) was a RuntimeError / TypeError traceback from deep in torch: now one line naming the file."""
    try:
        models["model"].load_state_dict(weights["model"])
        if "target" in models:
            models["target"].load_state_dict(weights["target"])
        for r, e in emas.items():
            if f"ema@{r}" not in weights:
                log(f"EMA rate {r} is new: it starts from the online weights")
            e.load_state_dict(weights.get(f"ema@{r}", weights["model"]))
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if rank < len(rngs):    # each rank's own dropout RNG; a rank that the checkpoint's run did not have keeps its
            ckpt.set_rng_state(rngs[rank], spare)   # fresh seed + rank streams (another rank's: the same masks)
        return int(state["step"]), dict(state["counters"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise ckpt.CheckpointError(f"{wpath}: does not fit this run ({type(e).__name__}: {ckpt._details(e)})") from None


def _trim_stats(out: str, step: int, log) -> None:
    """stats.jsonl without the rows of steps after `step`, the step a run resumes from: rows the interrupted run logged
    after its last checkpoint (killed without one: SIGKILL, a node failure; or resumed from an older checkpoint). The
    resumed run logs those steps again; appended after them, the file had each of them twice, out of order, and
    differed from an uninterrupted run's. A line that is not a JSON row (cut short by the kill) goes too."""
    path = os.path.join(out, "stats.jsonl")
    if not os.path.exists(path):
        return
    with open(path, errors="replace") as f:     # a damaged row's bytes that are no UTF-8: that row goes, not the resume
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
            if int(row["step"]) <= step:
                keep.append(line)
        except (ValueError, TypeError, KeyError):
            pass
    if len(keep) < len(lines):
        ckpt.atomic_write(path, "".join(x + "\n" for x in keep).encode())
        log(f"stats.jsonl: {len(lines) - len(keep)} row(s) after step {step} removed (this run logs those steps anew)")


@contextmanager
def _restore_signals(old: dict, bar):
    try:
        yield
    finally:
        if bar:
            bar.close()
        for s, h in old.items():
            signal.signal(s, h)


def _stats_row(step, cfg, tick, info, lr, counters, device) -> dict:
    dt = max(time.time() - tick["t0"], 1e-9)
    n = tick["n"]       # finite steps in the interval; none (all skipped or fp16 overflows): loss and norm are null
    mem = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"step": step, "kimg": step * cfg["batch_size"] / 1000, "loss": tick["loss"] / n if n else None,
            "grad_norm": tick["gnorm"] / n if n else None, "N": info.get("N"), "mu": info.get("mu"),
            **{k: v for k, v in info.items() if k not in ("N", "mu")}, "lr": lr,
            "img_per_s": (step - tick["step0"]) * cfg["batch_size"] / dt, "mem_mb": round(mem, 1),
            "skipped": counters["skipped"], "overflow": counters["overflow"], "time": round(time.time(), 3),
            **({"compile_warmup": True} if tick.get("warmup") else {})}


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")   # the --compile modes that run inductor's CUDA-graph trees


def _compile_backend() -> str:
    """torch.compile's backend for --compile: inductor, or CMFAST_COMPILE_BACKEND (a testing hook, compile_nets)."""
    return os.environ.get("CMFAST_COMPILE_BACKEND") or "inductor"


def check_compile(mode: str, method, net_cfg: dict, device: torch.device) -> None:
    """One line, before anything is built: CUDA-graph compile modes refuse a step whose method replays dropout
    masks (Method.replays_dropout: CD, CT, iCT) with dropout. Those steps run the online pass (with grad), then the
    target pass (no grad) with the online pass's dropout masks (the RNG state replayed), then the backward; with
    dropout > 0 the target graph's replay overwrote activations the online graph had saved for the backward
    ('accessing tensor output of CUDAGraphs that has been overwritten', H200, torch 2.11: tests/test_train_gpu.py's
    masks test). Without dropout the same step runs (GPU test of iCT)."""
    if mode not in CUDA_GRAPH_MODES or device.type != "cuda" or not method.replays_dropout:
        return
    if _compile_backend() != "inductor":
        return
    from ..nets import UNet
    p = float((net_cfg or {}).get("dropout", inspect.signature(UNet).parameters["dropout"].default))
    if p > 0:
        raise ValueError(f"--compile {mode} with dropout {p:g}: CUDA-graph trees overwrite the online pass's saved "
                         f"activations when the {method.name} target pass replays its dropout masks; use --compile "
                         f"default or max-autotune-no-cudagraphs, or --dropout 0")


def compile_nets(models: dict, mode: str) -> dict | None:
    """--compile: torch.compile(mode=mode, dynamic=False) of the backbones that run every step, the student's
    (model.net) and the target's and teacher's where the method has them (no-grad passes); None for mode 'none'.

    nn.Module.compile() compiles each backbone in place, so parameters, state_dict keys (no '_orig_mod.' level),
    EMA updates, resume with or without --compile and checkpoint readers are all as without it; DDP then wraps
    the compiled module (PyTorch's order for DDP: compile the inner module, then wrap). The EMA copies (sampled
    every --sample-every steps) stay eager.

    CMFAST_COMPILE_BACKEND (testing hook): a torch.compile backend other than inductor, e.g. 'eager' (dynamo
    tracing only: the tests check tracing, checkpoints and resume on CPU without inductor's minutes-long compiles);
    the mode only applies to inductor."""
    if mode == "none":
        return None
    backend = _compile_backend()
    kw = dict(dynamic=False, backend=backend, **({"mode": mode} if backend == "inductor" else {}))
    names, seen = [], set()
    for name in ("model", "target", "teacher"):
        net = getattr(models.get(name), "net", None)
        if isinstance(net, torch.nn.Module) and id(net) not in seen:   # ict: the target is the model itself
            net.compile(**kw)
            seen.add(id(net))
            names.append(f"{name}.net")
    return {"backend": backend, "nets": names}


def ckpt_copy(model):
    import copy
    return copy.deepcopy(model).requires_grad_(False)


def _bare(model) -> dict:
    """The online model's state dict without DDP's 'module.' level."""
    return {k.replace("net.module.", "net.", 1): v for k, v in model.state_dict().items()}
