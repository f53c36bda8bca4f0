"""hubconf.py: torch.hub.load of the shipped model and the networks, from this checkout and from a bare copy of the
repository (what a hub download is: no install, kernels/ not yet cmfast.kernels)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cmfast
from _repo import ROOT, copy_checkout


def test_hub_entry_points_from_the_checkout(tmp_path):
    model = torch.hub.load(str(ROOT), "fmnist", source="local")
    shipped = cmfast.load_pretrained("fmnist")
    assert isinstance(model, cmfast.ConsistencyModel) and model.card == shipped.card
    for a, b in zip(model.state_dict().values(), shipped.state_dict().values()):
        assert torch.equal(a, b)
    fresh = torch.hub.load(str(ROOT), "fmnist", source="local", pretrained=False)
    assert [t.shape for t in fresh.state_dict().values()] == [t.shape for t in shipped.state_dict().values()]
    assert not torch.equal(fresh.net.out_conv.weight, shipped.net.out_conv.weight)
    net = torch.hub.load(str(ROOT), "unet", source="local", preset="tiny", img_resolution=16)
    assert isinstance(net, cmfast.UNet) and net.img_resolution == 16
    with pytest.raises(ValueError, match="unknown preset"):
        torch.hub.load(str(ROOT), "unet", source="local", preset="nope")
    from cmfast.pretrained import ASSETS
    ckpt = tmp_path / "ckpt-00000001.safetensors"
    shutil.copy(os.path.join(ASSETS, "fmnist.safetensors"), ckpt)
    mine = torch.hub.load(str(ROOT), "consistency_model", source="local", checkpoint=str(ckpt))
    assert torch.equal(mine.net.out_conv.weight, shipped.net.out_conv.weight)
    # fmnist_sct: the shipped sCT model (a TrigFlow model), and its architecture untrained
    from cmfast.trigflow import TrigFlowModel
    sct, shipped_sct = torch.hub.load(str(ROOT), "fmnist_sct", source="local"), cmfast.load_pretrained("fmnist-sct")
    assert isinstance(sct, TrigFlowModel) and sct.card == shipped_sct.card and sct.card["method"] == "sct"
    assert all(torch.equal(a, b) for a, b in zip(sct.state_dict().values(), shipped_sct.state_dict().values()))
    fresh = torch.hub.load(str(ROOT), "fmnist_sct", source="local", pretrained=False)
    assert isinstance(fresh, TrigFlowModel) and not fresh.training
    assert [t.shape for t in fresh.state_dict().values()] == [t.shape for t in shipped_sct.state_dict().values()]
    assert not torch.equal(fresh.net.out_conv.weight, shipped_sct.net.out_conv.weight)


@pytest.mark.slow
def test_hub_from_a_bare_copy_maps_its_kernels(tmp_path):
    """A copy of the repository's files (no install) serves the model, and cmfast.kernels is the copy's kernels/."""
    bare = copy_checkout(tmp_path / "cmfast-main")
    # consistency_model maps kernels/ too; a second hub.load keeps the module it mapped (not a second copy of it);
    # the mapped kernels/ is a package: its modules import from the copy
    code = ("import torch, sys; c = torch.hub.load(sys.argv[1], 'consistency_model', source='local', "
            "checkpoint=sys.argv[2]); import cmfast, cmfast.kernels; k = cmfast.kernels; print(k.__file__); "
            "m = torch.hub.load(sys.argv[1], 'fmnist', source='local'); print(cmfast.__file__); "
            "print(cmfast.kernels.__file__); print(cmfast.kernels is k and sys.modules['cmfast.kernels'] is k); "
            "import cmfast.kernels.skip_output as so; print(so.__file__); "
            "x = cmfast.sample(m, torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))); "
            "print(float(x.std()))")
    r = subprocess.run([sys.executable, "-c", code, str(bare), str(bare / "cmfast" / "assets" / "fmnist.safetensors")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    first, pkg, kernels, same, module, std = r.stdout.strip().splitlines()[-6:]
    assert Path(pkg).resolve() == (bare / "cmfast" / "__init__.py").resolve()
    assert Path(first).resolve() == Path(kernels).resolve() == (bare / "kernels" / "__init__.py").resolve()
    assert same == "True"
    assert Path(module).resolve() == (bare / "kernels" / "skip_output.py").resolve()
    assert 0.2 < float(std) < 1.5


@pytest.mark.skipif(torch.cuda.device_count() > 99, reason="cuda:99 exists here")
def test_hub_map_location_reaches_the_load(tmp_path):
    """map_location goes to the load of every entry point: a device this machine lacks is refused in one line naming
    it (it was dropped on the way, the model silently staying on the CPU)."""
    from cmfast.pretrained import ASSETS
    ckpt = tmp_path / "ckpt-00000001.safetensors"
    shutil.copy(os.path.join(ASSETS, "fmnist.safetensors"), ckpt)
    for name, kw in (("fmnist", {}), ("fmnist", {"pretrained": False}), ("fmnist_sct", {}),
                     ("fmnist_sct", {"pretrained": False}), ("consistency_model", {"checkpoint": str(ckpt)})):
        with pytest.raises(ValueError, match="map_location 'cuda:99'"):
            torch.hub.load(str(ROOT), name, source="local", map_location="cuda:99", **kw)
