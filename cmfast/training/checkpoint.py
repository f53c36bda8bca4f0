"""Checkpoints (DESIGN.md 5): weights in safetensors, training state in a torch.load(weights_only=True) file.

A checkpoint of step k in a run directory is the pair
    ckpt-<k:08d>.safetensors   tensors '<module>/<parameter or buffer name>' for module in model (online),
                               target (CD/CT), ema@<rate> (one per --ema rate; 'ema' means the first);
                               metadata: format, step, config (the resolved training config, JSON)
    ckpt-<k:08d>.state.pt      {format, step, config, optimizer, scaler, sampler, rng: {torch, cuda, numpy,
                               python}, counters} of plain tensors, numbers and strings
Both are written atomically (temp file, fsync, os.replace, fsync of the folder), the state file last: a step
whose state file is missing is incomplete and ignored.
"""
from __future__ import annotations

import io
import json
import os
import random
import re

import numpy as np
import torch

from .._device import checked_device

FORMAT = "cmfast-checkpoint-1"
_NAME = re.compile(r"^ckpt-(\d{8})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or unreadable; the message is one line."""


# ---- Atomic files -----------------------------------------------------------------------------------------------
def _write_chunks(f, data: bytes, chunk: int = 1 << 24) -> None:
    for i in range(0, len(data), chunk):
        f.write(data[i:i + chunk])


def atomic_write(path: str, data: bytes) -> None:
    """Write data to path so that a reader sees the old file or the whole new one, never a part."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _write_chunks(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TEMP = re.compile(r"^\..+\.tmp(\d+)$")


def remove_stale_temps(folder: str) -> list[str]:
    """Delete the temporary files of atomic_write (.NAME.tmpPID) whose writer is no longer running here: left by a
    SIGKILL or a node failure mid-write, each as large as a checkpoint. -> the names removed."""
    gone = []
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        m = _TEMP.match(f)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue                                    # its writer still runs (on this machine)
        except PermissionError:                         # alive, under another user
            continue
        except (ProcessLookupError, OverflowError):     # no such process; a number too large to be one
            pass
        try:
            os.remove(os.path.join(folder, f))
            gone.append(f)
        except OSError:
            pass
    return gone


# ---- RNG states as plain tensors (torch.load(weights_only=True) accepts no numpy objects) -----------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": {"version": py_state[0], "state": list(py_state[1]),
                       "gauss": py_state[2]}}


def set_rng_state(s: dict, spare: bool = False) -> None:
    """The global RNGs set from rng_state()'s dict; spare: new generators of each kind set instead (CUDA's left), which
    refuse a bad state with the same errors and change nothing (--dry-run)."""
    set_torch = torch.Generator().set_state if spare else torch.set_rng_state
    set_numpy = np.random.RandomState().set_state if spare else np.random.set_state
    set_python = random.Random().setstate if spare else random.setstate
    set_torch(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and not spare:
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    set_numpy(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    set_python((p["version"], tuple(p["state"]), p["gauss"]))


# ---- Saving and finding ----------------------------------------------------------------------------------------
def paths(run_dir: str, step: int) -> tuple[str, str]:
    base = os.path.join(run_dir, f"ckpt-{step:08d}")
    return base + ".safetensors", base + ".state.pt"


def save_checkpoint(run_dir: str, step: int, modules: dict, cfg: dict, state: dict, keep: int = 3) -> str:
    """Write the pair for `step` (weights first, state last) and delete all but the newest `keep` checkpoints up to
    `step`. Later ones (a run resumed from before them: the newest was corrupt, or --resume named an older one) are
    another line of the run: never pruned here, so the one just written is never the one deleted; this run
    overwrites them as it reaches their steps."""
    from safetensors.torch import save
    tensors = {f"{name}/{k}": v.detach().to("cpu", copy=True).contiguous()
               for name, sd in modules.items() for k, v in sd.items()}
    meta = {"format": FORMAT, "step": str(step), "config": json.dumps(cfg)}
    wpath, spath = paths(run_dir, step)
    if os.path.exists(spath):   # another line's pair of this step: incomplete until its new state is written, never
        os.remove(spath)        # the new weights beside the old state (a crash between the two writes)
    atomic_write(wpath, save(tensors, metadata=meta))
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "step": step, "config": json.dumps(cfg), **state}, buf)
    atomic_write(spath, buf.getvalue())
    if keep > 0:
        for s, w, st in [c for c in list_checkpoints(run_dir, complete=False) if c[0] <= step][:-keep]:
            for p in (w, st):
                if os.path.exists(p):
                    os.remove(p)
    return wpath


def list_checkpoints(run_dir: str, complete: bool = True) -> list[tuple[int, str, str]]:
    """(step, weights path, state path), oldest first; complete=True keeps those whose state file exists."""
    if not os.path.isdir(run_dir):
        return []
    out = []
    for f in os.listdir(run_dir):
        m = _NAME.match(f)
        if m:
            w, s = paths(run_dir, int(m.group(1)))
            if os.path.exists(s) or not complete:
                out.append((int(m.group(1)), w, s))
    return sorted(out)


def load_weights(path: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """{module: state dict} and the metadata (config parsed) of a .safetensors checkpoint; tensors in the order of
    their names, as read_header and check_tensors read them (safetensors' load gives them in an order that changes
    from one process to the next: a checkpoint with several bad tensors named another one each time)."""
    from safetensors import SafetensorError
    from safetensors.torch import load, safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        with open(path, "rb") as f:
            flat = load(f.read())
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    return _by_module({k: flat[k] for k in sorted(flat)}), _parse_meta(path, meta)


def _by_module(flat: dict) -> dict[str, dict]:
    """{'ema@0.9/net.w': v} -> {'ema@0.9': {'net.w': v}}: the file's flat keys grouped by module."""
    modules: dict[str, dict] = {}
    for k, v in flat.items():
        name, _, key = k.partition("/")
        modules.setdefault(name, {})[key] = v
    return modules


def _unreadable(path: str, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0] if str(e) else e})")


def read_header(path: str) -> tuple[dict[str, dict[str, tuple]], dict]:
    """load_weights from the file's header alone (no tensor read): {module: {name: shape}} and the metadata, with
    load_weights' errors for a file that is no cmfast checkpoint. --dry-run reads checkpoints this way."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            flat = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    return _by_module(flat), _parse_meta(path, meta)


def _parse_meta(path: str, meta: dict) -> dict:
    """A checkpoint's metadata strings -> {'step', 'config'}, or one CheckpointError."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cmfast checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        step, cfg = int(meta["step"]), json.loads(meta["config"])
        if not isinstance(cfg, dict):
            raise TypeError(f"config is a {type(cfg).__name__}, not a dict")
    except (KeyError, ValueError, TypeError, RecursionError) as e:      # RecursionError: JSON nested too deep
        raise CheckpointError(f"{path}: damaged checkpoint metadata (step and config expected; "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return {"step": step, "config": cfg}


def load_state(path: str) -> dict:
    try:
        s = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises several types for truncated / foreign files
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__})") from None
    if not isinstance(s, dict) or s.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cmfast training state")
    return s


def resolve(path: str) -> str:
    """A run directory (its newest complete checkpoint), a .safetensors file, or a .state.pt file -> weights path."""
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"no checkpoint (ckpt-*.safetensors with its .state.pt) in {path}")
        return found[-1][1]
    if path.endswith(".state.pt"):
        path = path[:-len(".state.pt")] + ".safetensors"
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.endswith(".safetensors"):       # config.json, a log: named as what it is, not as a corrupt checkpoint
        raise CheckpointError(f"{path}: not a checkpoint; give a ckpt-*.safetensors file (or its .state.pt) or a run "
                              "folder")
    return path


# ---- Models from checkpoints (used by cmfast-sample, cmfast-eval, cmfast-edit) ---------------------------------
def bad_weight(sd: dict) -> str | None:
    """Why `sd` is no model weights, or None: its first value that is no floating-point tensor (integer or bool ones
    were cast silently) or holds NaN / inf (every sample NaN, written as a black image). Checkpoints and both importers
    ask it."""
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            return f"{k} is {v.dtype if isinstance(v, torch.Tensor) else type(v).__name__}, not floating point"
        bad = int(v.numel() - torch.isfinite(v).sum())
        if bad:
            return f"{k} holds {bad} NaN / inf value(s)"
    return None


def check_weights(path: str, which: str, sd: dict) -> None:
    """CheckpointError naming the tensor unless bad_weight finds nothing."""
    why = bad_weight(sd)
    if why:
        raise CheckpointError(f"{path}: bad {which} weights: {why} (the run diverged or the file is damaged)")


def _details(e: Exception, limit: int = 200) -> str:
    """load_state_dict's error as one line: its first line names only the model, the keys are on the lines after."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    why = " ".join(lines[1:] or lines) or type(e).__name__
    return why if len(why) <= limit else why[:limit - 3] + "..."


def build_model(cfg: dict) -> torch.nn.Module:
    """The preconditioned model (untrained) described by a training config."""
    from ..nets import UNet
    from .methods import get_method
    return get_method(cfg["method"]).wrap(UNet(**cfg["net"]), cfg)


def load_model(path: str, which: str = "ema", map_location="cpu"):
    """(model, meta) from a run directory (newest checkpoint) or a checkpoint file: the preconditioned model
    (ConsistencyModel; TrigFlowModel for --method sct / scd; EDMDenoiser for --method edm) in eval mode with the
    `which` weights: 'ema' (the first --ema rate), 'ema@<rate>', 'model' (online) or 'target' (CD / CT only); with
    no EMA, 'ema' is an error naming what there is. meta: {'step', 'config', 'path', 'which'}.
    An EDM network pickle (*.pkl, NVlabs/edm) loads as its 'ema' EDM denoiser (cmfast.edm_import, no code run)."""
    device = _device(map_location)
    if str(path).endswith(".pkl"):
        from ..edm_import import EDMPickleError, load_edm_pickle
        if which != "ema":
            raise CheckpointError(f"{path}: an EDM pickle holds 'ema' weights only, got which={which!r}")
        try:
            model, cfg = load_edm_pickle(path, map_location)
        except EDMPickleError as e:
            raise CheckpointError(str(e)) from None
        check_weights(str(path), "ema", model.state_dict())
        return model, {"step": 0, "config": cfg, "path": str(path), "which": "ema"}
    if str(path).endswith(".pt") and not str(path).endswith(".state.pt"):
        raise CheckpointError(f"{path}: a .pt file is not a cmfast checkpoint (the CM paper's released models "
                              f"convert with python -m cmfast.cm_import)")
    wpath = resolve(path)
    modules, meta = load_weights(wpath)
    which = _which(wpath, which, modules, meta)
    check_weights(wpath, which, modules[which])
    # The config is built on the meta device first (no memory) and its weight shapes compared with the file's: a
    # hand-edited config asking for a huge net was allocated and initialized in full before the mismatch was found.
    mismatch = _shape_mismatch(wpath, build_model, meta["config"], modules[which])
    if mismatch:
        raise CheckpointError(f"{wpath}: weights do not match the stored config ({mismatch})")
    model = build_model(meta["config"])
    try:
        model.load_state_dict(modules[which])
    except RuntimeError as e:
        raise CheckpointError(f"{wpath}: weights do not match the stored config ({_details(e)})") from None
    model.requires_grad_(False).eval().to(device)
    return model, {**meta, "path": wpath, "which": which}


def _which(wpath: str, which: str, modules: dict, meta: dict) -> str:
    """load_model's `which` as the module name it reads ('ema' -> 'ema@<first rate>'), or why the file has none."""
    if which == "ema" and "ema" not in modules and meta["config"].get("ema"):
        try:
            which = f"ema@{float(meta['config']['ema'][0])}"
        except (TypeError, ValueError, KeyError, IndexError):     # float('a'): a ValueError without the file name
            raise CheckpointError(f"{wpath}: damaged checkpoint metadata (config 'ema' is "
                                  f"{meta['config']['ema']!r}, not a list of EMA rates)") from None
    if which not in modules:
        raise CheckpointError(f"{wpath}: has no {which!r} weights; it has {', '.join(sorted(modules))}")
    return which


class _Shaped:
    """A tensor's shape alone (read_header's), for _shape_mismatch."""
    def __init__(self, shape):
        self.shape = shape


def check_model(path: str, which: str = "ema") -> dict:
    """load_model's checks and errors without building the model (--dry-run's teacher): the header, the `which`
    tensors read one at a time for bad_weight (NaN / inf, not floating point), their shapes against the stored
    config built on the meta device. -> load_model's meta. An EDM pickle, which has no such reader, is loaded on the
    CPU."""
    if str(path).endswith(".pkl") or (str(path).endswith(".pt") and not str(path).endswith(".state.pt")):
        return load_model(path, which, "cpu")[1]
    wpath = resolve(path)
    modules, meta = read_header(wpath)
    which = _which(wpath, which, modules, meta)
    check_tensors(wpath, [which])
    mismatch = _shape_mismatch(wpath, build_model, meta["config"],
                               {k: _Shaped(v) for k, v in modules[which].items()})
    if mismatch:
        raise CheckpointError(f"{wpath}: weights do not match the stored config ({mismatch})")
    return {**meta, "path": wpath, "which": which}


def check_tensors(wpath: str, names) -> None:
    """check_weights of the modules `names` of a .safetensors checkpoint, in that order, each module's tensors in the
    order of their names (load_weights'), read one at a time: the file is never in memory whole."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(wpath, "pt") as f:
            keys = sorted(f.keys())
            for name in names:
                for k in (k for k in keys if k.partition("/")[0] == name):
                    check_weights(wpath, name, {k.partition("/")[2]: f.get_tensor(k)})
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise _unreadable(wpath, e) from None


def _shape_mismatch(path: str, build, cfg: dict, sd: dict, limit: int = 200) -> str | None:
    """What differs between the state dict of build(cfg), made on the meta device, and `sd` (missing and unexpected
    keys, shapes), as one line, or None. A config this version cannot build is a CheckpointError."""
    blocks = _residual_blocks(cfg)
    if blocks is not None and 10 * blocks > len(sd):    # the meta build itself took ~3 ms and 0.1 MB a block
        return f"the config asks for {blocks} residual blocks (10 or more tensors each), the file holds {len(sd)}"
    try:    # a config this version cannot build (another cmfast version's method or net argument): one line
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in build(cfg).state_dict().items()}
    except (KeyError, TypeError, ValueError, RuntimeError) as e:    # RuntimeError: a negative size, say
        raise CheckpointError(f"{path}: its config does not describe a model this cmfast builds "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k}: {tuple(sd[k].shape)} in the file, {want[k]} for the config" for k in want
              if k in sd and tuple(sd[k].shape) != want[k]]
    why = "; ".join(f"{what} {', '.join(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                                     ("size mismatch", shapes)) if keys)
    return None if not why else why if len(why) <= limit else why[:limit - 3] + "..."


def _residual_blocks(cfg: dict) -> int | None:
    """How many UNetBlocks the config's net has (encoder, middle, decoder), or None when its net section does not say
    in plain integers (the build then says what is wrong). Each holds 10 tensors or more (two norms, two
    convolutions, the embedding layer), so a file with fewer cannot match: a num_blocks of a million is refused
    without building a million modules."""
    from ..nets.unet import architecture
    try:
        a = architecture(cfg["net"])
        levels, n = len(a["channel_mult"]), a["num_blocks"]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or not levels:
        return None
    return levels * n + 2 * (levels - 1) + 2 + levels * (n + 1)


def _device(map_location) -> torch.device:
    """map_location as a torch.device this machine has, or one CheckpointError (a ValueError) saying why: torch's own
    'Found no NVIDIA driver' came from inside .to() after the whole load."""
    try:
        return checked_device(map_location, "map_location")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
