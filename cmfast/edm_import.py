"""EDM's network pickles (NVlabs/edm: edm-cifar10-32x32-{cond,uncond}-{vp,ve}.pkl and the snapshots its train.py
writes) as cmfast EDM denoisers: a published EDM network is a CD teacher (`cmfast-train --config cd-cifar10
--teacher edm-cifar10-32x32-uncond-ve.pkl`: that config's NCSN++ is the '-ve' network, so the student starts from
it), and cmfast-sample / cmfast-eval take one as --checkpoint.

Those pickles carry EDM's source code, and pickle.load runs it (EDM's torch_utils.persistence execs the module
source it stored). This reader runs none of it: an unpickler that calls only torch's tensor rebuild functions
(storages through torch.load(weights_only=True)) and the container types, and keeps every other object as inert
data, its class name and state. From EDMPrecond's recorded constructor arguments it builds the matching
cmfast.UNet (EDM's SongUNet: DDPM++ 'vp' and NCSN++ 've' networks; DhariwalUNet: the ADM ImageNet 64x64 network,
arch='adm') and loads the weights by name: SongUNet's `model.dec.<res>_aux_norm` / `_aux_conv` are cmfast's
`out_norm` / `out_conv`, the augmentation embedding
(`map_augment`, used only with augmentation labels in training) and the resampling filter buffers (derived from
resample_filter) are left out, and every other tensor must match one cmfast parameter by name and shape.

    python -m cmfast.edm_import edm-cifar10-32x32-uncond-ve.pkl teacher.safetensors   # optional: a cmfast checkpoint
"""
from __future__ import annotations

import collections
import io
import pickle
import sys
import types

import torch

# EDM's SongUNet constructor defaults (training/networks.py), for arguments a pickle did not record.
SONGUNET_DEFAULTS = dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
                         num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0,
                         embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                         decoder_type="standard", resample_filter=[1, 1])
# ... and DhariwalUNet's (ADM: EDM's ImageNet 64x64 network).
DHARIWAL_DEFAULTS = dict(label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4,
                         num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0)
# cmfast.UNet arguments taken from EDM's (the same names and meaning).
_NET_KEYS = {"SongUNet": ("label_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
                          "attn_resolutions", "dropout", "embedding_type", "channel_mult_noise", "encoder_type",
                          "resample_filter"),
             "DhariwalUNet": ("label_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
                              "attn_resolutions", "dropout")}


class EDMPickleError(ValueError):
    """An EDM pickle that cannot be read or mapped onto a cmfast UNet (one line, naming the file and why)."""


class _Inert:
    """Any object of the pickle other than tensors and containers: its class (module.name), the arguments it was
    rebuilt with, and its state. Nothing of it is called or imported."""
    _key = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __reduce__(self):
        raise pickle.PicklingError("an inert stand-in of an EDM pickle is not picklable")


class _Persistent(_Inert):
    """An object EDM's torch_utils.persistence pickled with its source: the class name and its state (for a
    network, its __dict__: _parameters, _buffers, _modules and the recorded _init_kwargs)."""
    _key = "torch_utils.persistence"

    def __init__(self, meta):
        meta = meta if isinstance(meta, dict) else {}
        self.class_name, self.state = meta.get("class_name"), meta.get("state")


class _EasyDict(dict):
    """dnnlib.EasyDict, as plain dict data."""


def _load_storage(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _reconstructor(cls, base, state):          # copyreg._reconstructor, for the plain torch modules (ModuleDict)
    return cls.__new__(cls) if isinstance(cls, type) and issubclass(cls, _Inert) else _Inert()


_SAFE = {
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": getattr(torch._utils, "_rebuild_parameter_with_state", None),
    "torch.storage._load_from_bytes": _load_storage,
    "torch.Size": torch.Size,
    "collections.OrderedDict": collections.OrderedDict,
    "_codecs.encode": __import__("codecs").encode,
    "copyreg._reconstructor": _reconstructor,
    "torch_utils.persistence._reconstruct_persistent_obj": _Persistent,
    "dnnlib.util.EasyDict": _EasyDict,
}


def _np_scalar(dtype, data=None):
    """numpy.core.multiarray.scalar, for a hyperparameter saved as a numpy number: the value from its bytes."""
    import numpy as np
    return np.frombuffer(data, dtype=dtype)[0] if data is not None else np.zeros((), dtype=dtype)[()]


def _fresh(obj):
    """A stand-in of an allowed Python function or class, new for each lookup: BUILD with slot state calls setattr on
    what find_class returned, so a pickle could rewrite the real one's attributes (torch._utils._rebuild_tensor_v2's
    __defaults__, say) for the whole process."""
    if isinstance(obj, type) and obj.__module__ == __name__:       # _Persistent, _EasyDict
        return type(obj.__name__, (obj,), {})
    if isinstance(obj, types.FunctionType):
        return lambda *args, **kwargs: obj(*args, **kwargs)
    return obj      # builtins and C types (torch.Size, OrderedDict, codecs.encode): their attributes are read-only


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        key = f"{module}.{name}"
        if _SAFE.get(key) is not None:
            return _fresh(_SAFE[key])
        if key in ("numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"):
            import numpy as np
            return np.dtype if name == "dtype" else _fresh(_np_scalar)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (_Inert,), {"_key": key})     # anything else: inert data, never the real thing


def read_pickle(path: str):
    """The unpickled top level of an EDM pickle (a dict with 'ema', ...), tensors real, everything else inert."""
    try:
        with open(path, "rb") as f:
            return _Unpickler(f).load()
    except FileNotFoundError:
        raise EDMPickleError(f"{path}: not found") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError, KeyError,
            RuntimeError, OSError) as e:
        raise EDMPickleError(f"{path}: unreadable EDM pickle ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else '-'})") from None


def _plain(v):
    """A recorded hyperparameter as JSON-able Python data (numpy numbers and tuples included)."""
    if isinstance(v, (list, tuple)):
        return [_plain(u) for u in v]
    if hasattr(v, "item") and not isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, _Inert):
        raise EDMPickleError(f"a recorded network argument is not plain data ({v._key})")
    return v


def _module_state(obj):
    state = getattr(obj, "state", None)
    return state if isinstance(state, dict) and "_modules" in state else None


def _tensors(obj, prefix: str = "") -> dict:
    """name -> tensor of a pickled module tree (parameters and buffers, as a state dict would name them)."""
    state = _module_state(obj)
    if state is None:
        return {}
    out = {}
    for group in ("_parameters", "_buffers"):
        for k, v in (state.get(group) or {}).items():
            if isinstance(v, torch.Tensor):
                out[prefix + k] = v.detach()
    for k, child in (state.get("_modules") or {}).items():
        out.update(_tensors(child, f"{prefix}{k}."))
    return out


def _edm_filter(taps) -> torch.Tensor:
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


def load_edm_pickle(path: str, map_location="cpu"):
    """(EDMDenoiser in eval mode, cmfast training config for it) from an EDM pickle's 'ema' network."""
    from .nets import UNet
    from .precond import EDMDenoiser
    data = read_pickle(path)
    ema = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(ema, _Persistent) or not isinstance(ema.state, dict):
        raise EDMPickleError(f"{path}: not an EDM network pickle (expected a dict with an 'ema' network, as EDM's "
                             f"train.py writes)")
    if ema.class_name != "EDMPrecond":
        raise EDMPickleError(f"{path}: {ema.class_name} networks are not supported: cmfast's teacher uses EDM's own "
                             f"preconditioning (EDMPrecond; EDM's edm-*.pkl checkpoints)")
    st = ema.state
    kw = dict(st.get("_init_kwargs") or {})
    for name, value in zip(("img_resolution", "img_channels", "label_dim", "use_fp16"), st.get("_init_args") or ()):
        kw.setdefault(name, value)                      # EDMPrecond's positional arguments, where given so
    model_type = kw.get("model_type", "DhariwalUNet")        # EDMPrecond's default
    if model_type not in _NET_KEYS:
        raise EDMPickleError(f"{path}: model_type {model_type!r} is not supported: cmfast's UNet is EDM's SongUNet "
                             f"(DDPM++ / NCSN++) or DhariwalUNet (ADM)")
    defaults = SONGUNET_DEFAULTS if model_type == "SongUNet" else DHARIWAL_DEFAULTS
    net_kw = {**defaults, **{k: v for k, v in kw.items() if k in defaults}}
    if model_type == "SongUNet" and (net_kw["decoder_type"] != "standard"
                                     or net_kw["encoder_type"] not in ("standard", "residual")):
        raise EDMPickleError(f"{path}: encoder {net_kw['encoder_type']!r} / decoder {net_kw['decoder_type']!r} is not "
                             f"supported (cmfast: encoder 'standard' or 'residual', decoder 'standard')")
    try:
        res, chans = int(_plain(kw["img_resolution"])), int(_plain(kw["img_channels"]))
    except (KeyError, TypeError, ValueError):
        raise EDMPickleError(f"{path}: the network's img_resolution / img_channels are not recorded") from None
    try:
        net_cfg = {"img_resolution": res, "in_channels": chans,
                   **{k: _plain(net_kw[k]) for k in _NET_KEYS[model_type]},
                   **({"arch": "adm"} if model_type == "DhariwalUNet" else {})}
        sigma_data = float(_plain(st.get("sigma_data", 0.5)))
    except EDMPickleError as e:
        raise EDMPickleError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:        # sigma_data "x": float()'s error without the file, a traceback in main
        raise EDMPickleError(f"{path}: a recorded network argument is not a number ({e})") from None
    cfg = {"method": "edm", "dataset": None, "net": net_cfg, "sigma_data": sigma_data,
           "sigma_min": 0.002, "sigma_max": 80.0, "imported_from": str(path)}

    tensors = _tensors(ema)
    # The decoder's last level (full resolution) ends with EDM's aux_norm / aux_conv: cmfast's out_norm / out_conv.
    rename = {f"model.dec.{res}x{res}_aux_norm.": "out_norm.", f"model.dec.{res}x{res}_aux_conv.": "out_conv."}
    weights, filters = {}, {}
    for name, t in tensors.items():
        if not name.startswith("model."):
            continue
        for old, new in rename.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        else:
            name = name[len("model."):]
        if name.startswith("map_augment."):
            continue                    # augmentation labels' embedding: training with EDM's augment pipe only
        if name.endswith(".resample_filter"):
            filters[name] = t
            continue
        weights[name] = t
    want = _edm_filter(net_kw.get("resample_filter", [1, 1]))
    for name, f in filters.items():
        if f.shape != want.shape or not torch.allclose(f.float(), want):
            raise EDMPickleError(f"{path}: {name} is not the filter of resample_filter="
                                 f"{net_kw.get('resample_filter', [1, 1])}")
    try:
        net = UNet(**net_cfg)
    except (TypeError, ValueError, RuntimeError) as e:      # RuntimeError: a negative channel count
        raise EDMPickleError(f"{path}: the recorded network arguments do not make a cmfast UNet ({e})") from None
    own = net.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise EDMPickleError(f"{path}: the weights do not match EDM's {model_type} with the recorded arguments "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
    bad = [k for k in own if own[k].shape != weights[k].shape]
    if bad:
        raise EDMPickleError(f"{path}: {bad[0]} has shape {tuple(weights[bad[0]].shape)}, expected "
                             f"{tuple(own[bad[0]].shape)}")
    from .training.checkpoint import bad_weight
    why = bad_weight({k: weights[k] for k in own})  # integer / bool ones were cast by .float(), NaN / inf written
    if why:
        raise EDMPickleError(f"{path}: {why}")
    net.load_state_dict({k: v.float() for k, v in weights.items()})
    model = EDMDenoiser(net, sigma_data=cfg["sigma_data"], sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"])
    return model.requires_grad_(False).eval().to(map_location), cfg


def main(argv=None) -> int:
    """python -m cmfast.edm_import EDM.pkl OUT.safetensors: the 'ema' network as a cmfast checkpoint file."""
    import argparse
    import os
    from .training.checkpoint import FORMAT, atomic_write
    ap = argparse.ArgumentParser(prog="python -m cmfast.edm_import", description=main.__doc__)
    ap.add_argument("pkl")
    ap.add_argument("out")
    a = ap.parse_args(argv)
    try:
        model, cfg = load_edm_pickle(a.pkl)
    except EDMPickleError as e:
        print(f"cmfast.edm_import: error: {e}", file=sys.stderr)
        return 2
    import json
    from safetensors.torch import save
    tensors = {f"ema/{k}": v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(a.out, save(tensors, metadata={"format": FORMAT, "step": "0", "config": json.dumps(cfg)}))
    print(f"{a.pkl} -> {os.path.abspath(a.out)} ({sum(v.numel() for v in tensors.values()) / 1e6:.1f}M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
