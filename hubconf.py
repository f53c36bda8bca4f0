"""torch.hub entry points of cmfast: the shipped model and the networks, from a checkout or a hub download.

    model = torch.hub.load("path/to/cmfast", "fmnist", source="local")   # the shipped Fashion-MNIST model, offline
    sct = torch.hub.load("path/to/cmfast", "fmnist_sct", source="local") # the shipped sCT model (TrigFlow)
    images = cmfast.sample(model, torch.randn(16, 1, 32, 32))             # one network evaluation
    net = torch.hub.load("path/to/cmfast", "unet", preset="ddpmpp-cifar10", source="local")
    model = torch.hub.load("path/to/cmfast", "consistency_model", checkpoint="runs/fm", source="local")

A hub download is the repository as it is, not an install: kernels/ is not yet the package cmfast.kernels (setup.py
maps it at install), so this file maps it before cmfast loads a kernel.
"""
import importlib.util
import sys
from pathlib import Path

dependencies = ["torch", "numpy", "safetensors"]

_ROOT = Path(__file__).resolve().parent


def _cmfast():
    """cmfast, with cmfast.kernels mapped to this repository's kernels/ when cmfast is this repository's own copy
    and not an install (whose cmfast.kernels exists already)."""
    import cmfast
    here = Path(cmfast.__file__).resolve().parent
    if here == _ROOT / "cmfast" and not (here / "kernels").is_dir() and "cmfast.kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location("cmfast.kernels", _ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(_ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["cmfast.kernels"] = module
        spec.loader.exec_module(module)
        cmfast.kernels = module
    return cmfast


def _shipped(name: str, pretrained: bool, map_location):
    """A model shipped in cmfast/assets, or (pretrained=False) the same architecture untrained."""
    cmfast = _cmfast()
    if pretrained:
        return cmfast.load_pretrained(name, map_location=map_location)
    import os
    from cmfast.pretrained import ASSETS
    from cmfast.training.checkpoint import _device, build_model, load_weights
    device = _device(map_location)      # one line for 'cuda' without a GPU, not torch's driver error
    _, meta = load_weights(os.path.join(ASSETS, f"{name}.safetensors"))     # its config: the same architecture
    return build_model(meta["config"]).eval().to(device)


def fmnist(pretrained: bool = True, map_location="cpu"):
    """The Fashion-MNIST consistency model that ships with cmfast (fmnist-small UNet, 1 x 32 x 32 images in [-1, 1];
    its card is `model.card`). pretrained=False: the same architecture, untrained."""
    return _shipped("fmnist", pretrained, map_location)


def fmnist_sct(pretrained: bool = True, map_location="cpu"):
    """The shipped sCT model (cmfast.load_pretrained('fmnist-sct')): the same net trained with continuous-time
    consistency training, a TrigFlow model, the best one-step FD-FMNIST of the two (its card: `model.card`).
    pretrained=False: the same architecture, untrained."""
    return _shipped("fmnist-sct", pretrained, map_location)


def unet(preset: str = "ddpmpp-cifar10", **overrides):
    """An untrained backbone: cmfast.UNet.from_preset(preset, **overrides) (ddpmpp-cifar10, ncsnpp-cifar10,
    adm-imagenet64, adm-lsun256, ddpmpp-64, fmnist-small, tiny)."""
    return _cmfast().UNet.from_preset(preset, **overrides)


def consistency_model(checkpoint: str, which: str = "ema", map_location="cpu"):
    """A model trained with cmfast-train (a checkpoint file or its run folder; `which`: ema, ema@RATE, model or
    target), or one converted by python -m cmfast.cm_import / cmfast.edm_import."""
    _cmfast()
    from cmfast.training.checkpoint import load_model
    return load_model(checkpoint, which=which, map_location=map_location)[0]
