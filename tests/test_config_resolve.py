"""cmfast.training.config.resolve: explicit value > --config preset > built-in default, for the top-level options and
for each method hyperparameter, and the derived fields (loss, length, per-rank batch, net), checked on values
written out here from the presets' documented numbers."""
from __future__ import annotations

import math

import pytest

from cmfast.training import config as C


def test_explicit_beats_preset_beats_default_for_options_and_method_args():
    cfg = C.resolve({"config": "ct-cifar10", "loss": "l2", "lr": 3e-5, "seed": 0, "grad_clip": 0.0,
                     "method_args": {"mu0": 0.5}})
    assert cfg["loss"] == "l2"                         # explicit over the preset's lpips
    assert cfg["lr"] == 3e-5 and cfg["batch_size"] == 512                                       # explicit / preset
    assert cfg["lr_rampup_kimg"] == 0.0        # default: the reference's RAdam ran at a constant rate, no warm-up
    assert cfg["log_every"] == 50 and cfg["keep"] == 3                                          # defaults
    # method_args: explicit mu0, the preset's s0 / s1, the method's defaults for the rest
    assert cfg["method_args"]["mu0"] == 0.5 and cfg["method_args"]["s0"] == 2 and cfg["method_args"]["s1"] == 150
    assert cfg["method_args"]["weighting"] == "uniform"
    ict = C.resolve({"config": "ict-cifar10", "method_args": {"s1": 640}})
    assert ict["method_args"]["s1"] == 640 and ict["method_args"]["s0"] == 10 and ict["method_args"]["p_std"] == 2.0
    assert ict["loss"] == "pseudo_huber" and ict["ema"] == [0.99993] and ict["dropout"] == 0.3
    assert ict["net"]["dropout"] == 0.3 and ict["net"]["img_resolution"] == 32 and ict["net"]["in_channels"] == 3
    assert ict["net"]["fourier_scale"] == 0.02 and "fourier_scale" not in cfg["net"]     # iCT's net_args only
    # falsy explicit values still count as given (0 is not "not given")
    z = C.resolve({"config": "cd-cifar10", "teacher": "t.pkl", "lr_rampup_kimg": 0.0, "dropout": 0.0})
    assert z["lr_rampup_kimg"] == 0.0 and z["method_args"]["num_scales"] == 18


def test_loss_falls_back_to_the_methods_own():
    assert C.resolve({"method": "ct", "dataset": "fashion-mnist"})["loss"] == "lpips"
    assert C.resolve({"method": "ict", "dataset": "fashion-mnist"})["loss"] == "pseudo_huber"
    assert C.resolve({"method": "ict", "dataset": "fashion-mnist", "loss": "l1"})["loss"] == "l1"


@pytest.mark.parametrize("kimg,batch", [(1.0, 48), (0.5, 64), (2.0, 30)])
def test_kimg_rounds_up_to_whole_steps_and_kimg_follows_the_steps(kimg, batch):
    cfg = C.resolve({"dataset": "fashion-mnist", "kimg": kimg, "batch_size": batch})
    assert cfg["total_steps"] == math.ceil(kimg * 1000 / batch)
    assert cfg["kimg"] == cfg["total_steps"] * batch / 1000
    # an explicit --kimg beats a preset's step count; explicit --steps beats it too
    assert C.resolve({"config": "ict-cifar10", "kimg": kimg})["total_steps"] == math.ceil(kimg * 1000 / 1024)
    assert C.resolve({"config": "ict-cifar10", "total_steps": 7})["total_steps"] == 7


def test_per_rank_batch_and_dataset_derived_fields():
    cfg = C.resolve({"dataset": "fashion-mnist", "batch_size": 64, "batch_gpu": 8}, world_size=4)
    assert cfg["batch_gpu"] == 8 and cfg["world_size"] == 4
    assert C.resolve({"dataset": "fashion-mnist", "batch_size": 64}, world_size=4)["batch_gpu"] == 16
    fm = C.resolve({"dataset": "fashion-mnist", "cond": True})
    assert fm["xflip"] is False and fm["net"]["in_channels"] == 1 and fm["net"]["img_resolution"] == 32
    assert fm["net"]["label_dim"] == 10
    # a built-in dataset has its 10 classes even where the loaded images show fewer (a small or partial copy)
    assert C.resolve({"dataset": "fashion-mnist", "cond": True}, num_classes=3)["net"]["label_dim"] == 10
    assert C.resolve({"dataset": "cifar10"})["xflip"] is True
    assert C.resolve({"dataset": "cifar10", "xflip": False})["xflip"] is False
    folder = C.resolve({"dataset": "folder", "data_dir": "x", "cond": True}, image_shape=(3, 16, 16), num_classes=5)
    assert folder["net"]["label_dim"] == 5 and folder["net"]["img_resolution"] == 16


def test_time_budget_excludes_the_other_lengths():
    for other in ({"total_steps": 3}, {"kimg": 1.0}):
        with pytest.raises(ValueError, match="--time-budget sets the length"):
            C.resolve({"dataset": "fashion-mnist", "time_budget": 5.0, **other})
    cfg = C.resolve({"config": "ict-cifar10", "time_budget": 5.0})
    assert cfg["total_steps"] == 1000 and cfg["kimg"] == 1000 * 1024 / 1000   # the stand-in K until the loop plans


def test_compile_mode_is_checked():
    assert C.resolve({"dataset": "fashion-mnist", "compile": "max-autotune"})["compile"] == "max-autotune"
    with pytest.raises(ValueError, match="--compile: expected one of none, default"):
        C.resolve({"dataset": "fashion-mnist", "compile": "fast"})


def test_the_config_name_and_cifar10_classes_are_recorded():
    cfg = C.resolve({"config": "ict-cifar10", "cond": True})
    assert cfg["config"] == "ict-cifar10" and cfg["net"]["label_dim"] == 10
    assert C.resolve({"dataset": "cifar10"})["config"] is None


def test_ict_cifar10_builds_ncsnpp_with_fourier_scale_002():
    """iCT Sec. 3.1: NCSN++'s Fourier noise embedding with frequencies of std 0.02 instead of 16 (less sensitive to
    the noise level). The resolved config builds that net: its frequencies' spread is 0.02's, NCSN++'s default 16's;
    a non-positive scale is refused, and ADM (no Fourier embedding) refuses another scale."""
    import torch
    from cmfast.nets import UNet
    from cmfast.nets.presets import preset_config
    torch.manual_seed(0)
    ict = C.resolve({"config": "ict-cifar10"})["net"]
    net = UNet(**dict(ict, model_channels=64))               # 64 frequencies (half the noise channels), smaller
    std = net.map_noise.freqs.std().item()
    assert net.map_noise.freqs.numel() == 64 and 0.014 < std < 0.027, std
    ct = C.resolve({"config": "ct-cifar10", "teacher": "t"})["net"]
    assert 11 < UNet(**dict(ct, model_channels=64)).map_noise.freqs.std().item() < 21
    for bad in (0, -1.0, float("inf"), "0.02", True):
        with pytest.raises(ValueError, match="fourier_scale: expected a positive number"):
            UNet(**dict(ict, model_channels=16, fourier_scale=bad))
    with pytest.raises(ValueError, match="fourier_scale: SongUNet's option"):
        UNet(**preset_config("adm-imagenet64", model_channels=16, fourier_scale=0.02))
