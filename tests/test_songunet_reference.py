"""cmfast's SongUNet (DDPM++ / NCSN++) against an independent float64 transcription of EDM's SongUNet.forward
(tests/edm_songunet_ref.py, written from NVlabs/edm training/networks.py; it imports nothing from cmfast).

Random weights under EDM's real state-dict names (every one at a non-trivial scale: EDM's near-zero init of conv1,
proj and aux_conv would hide errors behind them) are written as an EDM network pickle, imported through
cmfast.edm_import.load_edm_pickle (EDM names -> cmfast names, EDM kwargs -> cmfast config), and the imported UNet
must compute the reference's F(x, c_noise, class_labels) to ~1e-10. Unlike the round trips in test_edm_import.py
and test_nets.py, an error shared by cmfast's layers and its own tests (the Fourier 2*pi, the sin/cos order, the FIR
filter, the skip scales, NCSN++'s residual input path, the attention layout) shows here."""
import collections
import math
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import cmfast
from cmfast import edm_import
from edm_songunet_ref import fir_down, fir_filter, fir_up, songunet_forward, songunet_shapes

FLAVOURS = {
    # EDM --arch=ddpmpp: positional embedding, standard encoder, box resampling; attention at full resolution.
    "ddpmpp": dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard", resample_filter=[1, 1],
                   channel_mult=[1, 2], attn_resolutions=[16]),
    # EDM --arch=ncsnpp: Fourier embedding, residual encoder, FIR (1,3,3,1) resampling. Three levels, so that the
    # second aux_residual reads the first one's output (the input pyramid chains), attention at 8x8.
    "ncsnpp": dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                   resample_filter=[1, 3, 3, 1], channel_mult=[1, 2, 2], attn_resolutions=[8]),
}


def _config(flavour, label_dim):
    return dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=label_dim,
                augment_dim=9 if label_dim else 0, model_channels=16, channel_mult_emb=4, num_blocks=1, dropout=0.13,
                decoder_type="standard", **FLAVOURS[flavour])


def _edm_weights(cfg, seed=0):
    """EDM-named random tensors, float32 (as EDM's pickles store them)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in songunet_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[1]
        module = name.rsplit(".", 2)[-2]
        if leaf == "resample_filter":
            t = fir_filter(cfg["resample_filter"])
        elif leaf == "freqs":                                                    # FourierEmbedding(scale=16)
            t = torch.randn(shape, generator=g, dtype=torch.float64) * 16
        elif module.startswith("norm") or module.endswith("aux_norm"):           # GroupNorm gains and offsets
            t = (1 if leaf == "weight" else 0) + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
        elif leaf == "bias":
            t = 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:                                                                    # unit-gain weights, fan-in scaled
            t = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(math.prod(shape[1:]))
        sd[name] = t.float()
    return sd


# ---- an EDM network pickle (the layout EDM's torch_utils.persistence writes: each module as
# _reconstruct_persistent_obj(meta) with meta.state = the module's __dict__) ------------------------------------------

@pytest.fixture
def persistence(monkeypatch):
    """torch_utils.persistence for pickle.dump to name (cmfast's reader never imports or calls it)."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called")
    _reconstruct_persistent_obj.__module__, _reconstruct_persistent_obj.__qualname__ = mod.__name__, \
        "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj, pkg.persistence = _reconstruct_persistent_obj, mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)


class _Obj:
    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src="raise SystemExit", class_name=self.class_name,
                    state=self.state)
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


def _module_tree(flat: dict, class_name="SongUNet"):
    """A flat EDM state dict as nested persistent modules (freqs / resample_filter as buffers)."""
    params, buffers, children = collections.OrderedDict(), collections.OrderedDict(), collections.OrderedDict()
    groups = collections.OrderedDict()
    for name, t in flat.items():
        head, _, rest = name.partition(".")
        if rest:
            groups.setdefault(head, {})[rest] = t
        elif head in ("freqs", "resample_filter"):
            buffers[head] = t.clone()
        else:
            params[head] = torch.nn.Parameter(t.clone(), requires_grad=False)
    for head, sub in groups.items():
        children[head] = _module_tree(sub, "Module")
    return _Obj(class_name, {"training": False, "_parameters": params, "_buffers": buffers, "_modules": children})


def _write_edm_pickle(path, sd, cfg):
    net_kw = {k: v for k, v in cfg.items() if k not in ("img_resolution", "in_channels", "out_channels", "label_dim")}
    kwargs = dict(img_resolution=cfg["img_resolution"], img_channels=cfg["in_channels"], label_dim=cfg["label_dim"],
                  use_fp16=False, model_type="SongUNet", **net_kw)
    ema = _Obj("EDMPrecond", {"training": False, "_parameters": {}, "_buffers": {},
                              "_modules": collections.OrderedDict(model=_module_tree(sd)), "sigma_data": 0.5,
                              "_init_args": (), "_init_kwargs": kwargs})
    with open(path, "wb") as f:
        pickle.dump({"ema": ema, "augment_pipe": None}, f)
    return str(path)


# ---- the tests ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label_dim", [0, 5], ids=["uncond", "cond"])
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_imported_songunet_equals_edm_reference(flavour, label_dim, tmp_path, persistence):
    cfg = _config(flavour, label_dim)
    sd = _edm_weights(cfg)
    model, meta = edm_import.load_edm_pickle(_write_edm_pickle(tmp_path / "edm.pkl", sd, cfg))
    net = model.net.double().eval()
    assert meta["net"]["embedding_type"] == cfg["embedding_type"]
    assert list(meta["net"]["resample_filter"]) == cfg["resample_filter"]

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    c_noise = torch.tensor([0.002, 1.5, 80.0], dtype=torch.float64).log() / 4     # EDMPrecond: ln(sigma) / 4
    labels = torch.rand(3, label_dim, generator=g, dtype=torch.float64) if label_dim else None
    ref_sd = {k: v.double() for k, v in sd.items()}
    with cmfast.ops.use_backend("torch"), torch.no_grad():
        got = net(x, c_noise, labels)
        want = songunet_forward(ref_sd, cfg, x, c_noise, labels)
    assert got.shape == want.shape == x.shape
    scale = want.abs().max()
    assert scale > 0.1
    err = (got - want).abs().max() / scale
    assert err < 1e-10, f"max relative difference {err:.3g}"
    # Not a comparison of near-constants: the samples (other noise level, image and label) differ at O(1).
    assert (want[0] - want[-1]).abs().max() > 0.05 * scale


def test_reference_resampling_closed_forms():
    """The reference's FIR resampling: [1,1] is EDM's 2x2 mean down / nearest copy up; [1,3,3,1] keeps a constant
    image constant away from the border, halves / doubles the size, and its up-sampling preserves the mean."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    box = fir_filter([1, 1])
    torch.testing.assert_close(fir_down(x, box), F.avg_pool2d(x, 2), rtol=0, atol=1e-14)
    torch.testing.assert_close(fir_up(x, box), F.interpolate(x, scale_factor=2, mode="nearest"), rtol=0, atol=1e-14)
    fir = fir_filter([1, 3, 3, 1])
    assert fir.shape == (1, 1, 4, 4) and abs(fir.sum().item() - 1) < 1e-15
    ones = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    assert fir_down(ones, fir).shape == (1, 1, 4, 4) and fir_up(ones, fir).shape == (1, 1, 16, 16)
    torch.testing.assert_close(fir_down(ones, fir)[..., 1:-1, 1:-1], torch.ones(1, 1, 2, 2, dtype=torch.float64))
    torch.testing.assert_close(fir_up(ones, fir)[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12, dtype=torch.float64))
