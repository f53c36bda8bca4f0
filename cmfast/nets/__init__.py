"""Backbones. Every GroupNorm, attention and skip output goes through cmfast.ops."""
from .presets import PRESETS, preset_config
from .unet import UNet, UNetBlock, adopt_time_scale, architecture


def _from_preset(cls, name: str, **overrides) -> "UNet":
    """UNet.from_preset('ddpmpp-cifar10' | 'ncsnpp-cifar10' | 'ddpmpp-64' | 'adm-imagenet64' | 'adm-lsun256' |
    'fmnist-small' | 'tiny', **overrides)."""
    net = cls(**preset_config(name, **overrides))
    net.preset = name
    net.config = preset_config(name, **overrides)
    return net


UNet.from_preset = classmethod(_from_preset)

__all__ = ["PRESETS", "UNet", "UNetBlock", "adopt_time_scale", "architecture", "preset_config"]
