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


@pytest.mark.slow
def test_hub_from_a_bare_copy_maps_its_kernels(tmp_path):
    """A copy of the repository's files (no install) serves the model, and cmfast.kernels is the copy's kernels/."""
    bare = copy_checkout(tmp_path / "cmfast-main")
    code = ("import torch, sys; m = torch.hub.load(sys.argv[1], 'fmnist', source='local'); import cmfast, "
            "cmfast.kernels; print(cmfast.__file__); print(cmfast.kernels.__file__); "
            "x = cmfast.sample(m, torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))); "
            "print(float(x.std()))")
    r = subprocess.run([sys.executable, "-c", code, str(bare)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    pkg, kernels, std = r.stdout.strip().splitlines()[-3:]
    assert Path(pkg).resolve() == (bare / "cmfast" / "__init__.py").resolve()
    assert Path(kernels).resolve() == (bare / "kernels" / "__init__.py").resolve()
    assert 0.2 < float(std) < 1.5
