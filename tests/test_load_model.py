"""cmfast.training.load_model (and load_pretrained) as a library user calls it: what a checkpoint's config may ask
for before anything is allocated, and map_location."""
import json
import time

import pytest
import torch

import cmfast
from cmfast.training import checkpoint as ckpt


def _write(path, sd, cfg):
    from safetensors.torch import save
    path.write_bytes(save({f"ema/{k}": v.contiguous() for k, v in sd.items()},
                          metadata={"format": ckpt.FORMAT, "step": "1", "config": json.dumps(cfg)}))
    return str(path)


def test_a_config_asking_for_a_huge_net_is_compared_on_the_meta_device_before_any_allocation(tmp_path, monkeypatch):
    """A hand-edited config (model_channels 2^20: a first weight of 8 TB) was built in full before its weights were
    compared; the build ran out of memory (here: 'can't allocate', reported as a config this cmfast cannot build).
    Now the config is built on the meta device, the shapes compared, and only a matching net is allocated."""
    from cmfast.nets import preset_config
    cfg = dict(method="ict", net=preset_config("tiny"), sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    sd = cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny")).state_dict()
    path = _write(tmp_path / "huge.safetensors", sd, dict(cfg, net=dict(cfg["net"], model_channels=1 << 20)))
    devices = []
    real = ckpt.build_model

    def build(c):
        devices.append(torch.empty(()).device.type)       # the default device the net is built on
        return real(c)
    monkeypatch.setattr(ckpt, "build_model", build)
    t0 = time.perf_counter()
    with pytest.raises(ckpt.CheckpointError, match=rf"^{path}: weights do not match the stored config \(size "
                                                   r"mismatch net\.map_layer0\.weight: \(32, 16\) in the file, "
                                                   r"\(2097152, 1048576\) for the config"):
        ckpt.load_model(path)
    assert devices == ["meta"] and time.perf_counter() - t0 < 30
    devices.clear()
    model, _ = ckpt.load_model(_write(tmp_path / "ok.safetensors", sd, cfg))     # a matching config: built for real
    assert devices == ["meta", "cpu"]
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "cpu" and not model.training


def test_a_config_asking_for_a_million_blocks_is_refused_before_building_them(tmp_path, monkeypatch):
    """The meta device holds no weights, but a million residual blocks are a million modules: about 3 ms and 0.1 MB
    each to build even there (45 minutes, 100 GB). A file with fewer tensors than such a net's blocks hold (10 or
    more a block) cannot match it: refused without a build."""
    from cmfast.nets import preset_config
    cfg = dict(method="ict", net=dict(preset_config("tiny"), num_blocks=10 ** 6), sigma_data=0.5, sigma_min=0.002,
               sigma_max=80.0)
    sd = cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny")).state_dict()
    path = _write(tmp_path / "deep.safetensors", sd, cfg)
    monkeypatch.setattr(ckpt, "build_model", lambda c: pytest.fail("built"))
    with pytest.raises(ckpt.CheckpointError, match=rf"^{path}: weights do not match the stored config \(the config "
                                                   rf"asks for 4000006 residual blocks \(10 or more tensors each\), "
                                                   rf"the file holds {len(sd)}\)$"):
        ckpt.load_model(path)


def test_missing_and_unexpected_weights_are_named(tmp_path):
    from cmfast.nets import preset_config
    cfg = dict(method="ict", net=preset_config("tiny"), sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    sd = dict(cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny")).state_dict())
    sd["net.extra"] = sd.pop("net.out_conv.bias")
    path = _write(tmp_path / "keys.safetensors", sd, cfg)
    with pytest.raises(ckpt.CheckpointError, match=r"weights do not match the stored config \(missing "
                                                   r"net\.out_conv\.bias; unexpected net\.extra\)$"):
        ckpt.load_model(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_map_location_cuda_without_a_gpu_is_one_line():
    """load_pretrained('fmnist', map_location='cuda') on a machine without CUDA ended in torch's 'Found no NVIDIA
    driver' RuntimeError from inside .to(), after the whole load; a misspelt device in torch's device-string error."""
    for call in (lambda: cmfast.load_pretrained("fmnist", map_location="cuda"),
                 lambda: torch.hub.load(str(__import__("pathlib").Path(__file__).parents[1]), "fmnist",
                                        pretrained=False, map_location="cuda", source="local")):
        with pytest.raises(ckpt.CheckpointError, match=r"^map_location 'cuda': asks for CUDA, which is not "
                                                       r"available here"):
            call()
    with pytest.raises(ValueError, match=r"^map_location 'gpu': expected cpu, cuda, cuda:N or mps$"):
        cmfast.load_pretrained("fmnist", map_location="gpu")


@pytest.mark.parametrize("name", ["fmnist", "fmnist-sct"])
def test_loading_the_shipped_model_does_not_import_dynamo(name):
    """The meta-device build ran torch.outer for the resampling filters through torch's Python references, which
    import torch._dynamo: 1.1 s more for every cmfast-sample --pretrained fmnist (about 2 s in all). The filters are
    made from Python numbers, so a load costs the meta build alone (about 40 ms here, as much as the real build).
    fmnist-sct (an sCT model): its adaptive-weight head's random Fourier frequencies were drawn on the meta device,
    the same detour; they are drawn on real devices only."""
    import subprocess
    import sys
    code = (f"import sys, cmfast; cmfast.load_pretrained('{name}'); "
            "print(sorted(m for m in ('torch._dynamo', 'torch.distributed.tensor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_ema_means_the_first_rate_of_the_run(tmp_path):
    """which='ema' on a run with --ema 0.9,0.5 loads ema@0.9 (the config's first rate), not another rate's weights."""
    from cmfast.training.config import resolve
    cfg = resolve({"dataset": "fashion-mnist", "method": "ict", "preset": "tiny", "ema": (0.9, 0.5)})
    sd = ckpt.build_model(cfg).state_dict()
    modules = {"model": sd, **{f"ema@{r}": {k: torch.full_like(v, r) for k, v in sd.items()} for r in (0.9, 0.5)}}
    (tmp_path / "run").mkdir()
    ckpt.save_checkpoint(str(tmp_path / "run"), 1, modules, cfg, {"step": 1})
    model, meta = ckpt.load_model(str(tmp_path / "run"), which="ema")
    assert meta["which"] == "ema@0.9"
    assert all(torch.all(v == 0.9) for v in model.state_dict().values() if v.is_floating_point())
    assert ckpt.check_model(str(tmp_path / "run"))["which"] == "ema@0.9"      # --dry-run's teacher check agrees
