"""Values of the two importers against what the source projects define, not against cmfast's own code:

- cmfast.cm_import: the whole imported model (preconditioning and network) against openai/consistency_models'
  denoise() (cm/karras_diffusion.py: the consistency model's c_skip / c_out with sigma_min, the EDM teacher's without,
  c_in, the time 1000 * 0.25 * ln(sigma)) around the float64 UNetModel transcription of test_cm_import; the CLI's
  --qkv-order.
- cmfast.edm_import: EDM's constructor defaults (NVlabs/edm training/networks.py) and the sampler's noise range
  (generate.py: sigma_min 0.002, sigma_max 80), transcribed here."""
import math

import pytest
import torch

import cmfast
from cmfast import cm_import, edm_import
from cmfast.training.checkpoint import load_model
from test_cm_import import _downs, _openai_state, _reference

SIGMA_DATA, SIGMA_MIN = 0.5, 0.002


def _denoise(sd, x, sigma, y, distillation, qkv_order="flash"):
    """karras_diffusion.KarrasDenoiser.denoise in float64: c_skip, c_out (get_scalings_for_boundary_condition with
    distillation, else get_scalings), c_in, rescaled_t = 1000 * 0.25 * log(sigma + 1e-44)."""
    s = sigma[:, None, None, None]
    if distillation:
        c_skip = SIGMA_DATA ** 2 / ((s - SIGMA_MIN) ** 2 + SIGMA_DATA ** 2)
        c_out = (s - SIGMA_MIN) * SIGMA_DATA / (s ** 2 + SIGMA_DATA ** 2) ** 0.5
    else:
        c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
        c_out = s * SIGMA_DATA / (s ** 2 + SIGMA_DATA ** 2) ** 0.5
    c_in = 1 / (s ** 2 + SIGMA_DATA ** 2) ** 0.5
    t = 1000 * 0.25 * torch.log(sigma + 1e-44)
    return c_skip * x + c_out * _reference(sd, c_in * x, t, y, _downs(1, 2), qkv_order)


@pytest.mark.parametrize("kind", ["cm", "edm"])
def test_imported_checkpoint_is_the_released_denoiser(kind, tmp_path):
    """load_cm_checkpoint's model (float64 here) equals denoise() of the released code at noise levels from
    sigma_min to sigma_max; a consistency model returns x itself at sigma_min. A wrong sigma_min (0.02 for 0.002),
    sigma_data or time scale moves the output by far more than the float32 skip-output's rounding."""
    sd = {k: v.float() for k, v in _openai_state(classes=3, seed=3).items()}
    torch.save(sd, tmp_path / "model.pt")
    model, cfg = cm_import.load_cm_checkpoint(str(tmp_path / "model.pt"), kind=kind, img_resolution=16)
    assert (model.sigma_min, model.sigma_max, model.sigma_data) == (0.002, 80.0, 0.5)
    assert (cfg["sigma_min"], cfg["sigma_max"], cfg["sigma_data"]) == (0.002, 80.0, 0.5)
    assert cfg["net"]["dropout"] == 0.0         # scripts/launch.sh runs (and fine-tunes) them with --dropout 0.0
    model = model.double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.01, 1.3, 80.0], dtype=torch.float64)
    y = torch.tensor([1, 0, 2, 1])
    with cmfast.ops.use_backend("torch"), torch.no_grad():
        got = model(x, sigma, y).double()
        want = _denoise({k: v.double() for k, v in sd.items()}, x, sigma, y, distillation=kind == "cm")
    scale = want.abs().amax(dim=(1, 2, 3))
    err = (got - want).abs().amax(dim=(1, 2, 3)) / scale
    # The model takes sigma in float32: its time 1000 ln(80) / 4 = 1095.5 rounds by 6e-5 inside the sinusoids.
    assert err.max() < 1e-4, err
    if kind == "cm":
        assert torch.equal(got[0], x[0].float().double())         # f(x, sigma_min) = x
    else:                                         # EDM's D(x, sigma_min) is not x: the network's share is c_out
        assert (want[0] - x[0]).abs().max() > 1e-4


def test_the_cli_converts_with_the_qkv_order_asked_for(tmp_path):
    """python -m cmfast.cm_import writes the flash layout's reordering by default (the released models') and the
    legacy one for --qkv-order legacy: the written network equals UNetModel with that attention layout."""
    sd = {k: v.float() for k, v in _openai_state(classes=0, seed=5).items()}
    torch.save(sd, tmp_path / "m.pt")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    sigma = torch.tensor([0.7, 9.0], dtype=torch.float64)
    for order, extra in (("flash", []), ("legacy", ["--qkv-order", "legacy"])):
        out = tmp_path / f"{order}.safetensors"
        assert cm_import.main([str(tmp_path / "m.pt"), str(out), "--image-size", "16", *extra]) == 0
        model = load_model(str(out))[0].double()
        with cmfast.ops.use_backend("torch"), torch.no_grad():
            got = model(x, sigma).double()
            want = _denoise({k: v.double() for k, v in sd.items()}, x, sigma, None, True, order)
        assert ((got - want).abs().max() / want.abs().max()) < 1e-4, order       # float32 sigma, as above


# NVlabs/edm training/networks.py, the constructors' keyword defaults.
EDM_SONGUNET = dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
                    num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type="positional",
                    channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=[1, 1])
EDM_DHARIWAL = dict(label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4,
                    num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0)


def test_edm_defaults_are_edms():
    """A pickle records only the arguments its training run passed (EDM's train.py passes a few per --arch); the rest
    are the constructors' defaults. A default network is 56M parameters, too big to write here, so the tables are
    compared with EDM's signatures (the behaviour with them is test_edm_import's
    test_positional_arguments_recorded_defaults_and_filter_values)."""
    assert edm_import.SONGUNET_DEFAULTS == EDM_SONGUNET
    assert edm_import.DHARIWAL_DEFAULTS == EDM_DHARIWAL
    import edm_songunet_ref                       # the float64 reference's own transcription agrees
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in edm_songunet_ref.DEFAULTS.items()} == EDM_SONGUNET


@pytest.fixture
def edm_pickles(monkeypatch):
    """test_edm_import's pickle writer, with the torch_utils.persistence module pickle.dump must name."""
    import sys
    import types
    import test_edm_import
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):      # the reader never calls it
        raise AssertionError("not called by the reader")
    _reconstruct_persistent_obj.__module__ = mod.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj, pkg.persistence = _reconstruct_persistent_obj, mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return test_edm_import


def test_edm_denoiser_samples_over_edms_noise_range(edm_pickles, tmp_path):
    """EDMPrecond records sigma_min 0 and sigma_max inf (any level); EDM samples from 80 down to 0.002
    (generate.py's edm_sampler defaults), which the imported denoiser and its config carry."""
    _net, write_edm_pickle = edm_pickles._net, edm_pickles.write_edm_pickle
    net, song = _net("ddpmpp")
    model, cfg = edm_import.load_edm_pickle(str(write_edm_pickle(tmp_path / "net.pkl", net, song, sigma_data=0.5)))
    assert (model.sigma_min, model.sigma_max) == (0.002, 80.0) and (cfg["sigma_min"], cfg["sigma_max"]) == (0.002, 80.)
    assert math.isclose(model.sigma_data, 0.5)


def test_channels_come_from_the_input_and_output_convolutions():
    """in_channels from input_blocks.0.0 (its columns), out_channels from out.2 (its rows): a learn_sigma UNetModel
    (6 outputs for 3 inputs) converts, and the network equals UNetModel."""
    sd = {k: v.float() for k, v in _openai_state(classes=0, seed=6).items()}
    g = torch.Generator().manual_seed(7)
    sd["out.2.weight"] = 0.2 * torch.randn(6, *sd["out.2.weight"].shape[1:], generator=g)
    sd["out.2.bias"] = 0.2 * torch.randn(6, generator=g)
    weights, cfg = cm_import.convert(sd, img_resolution=16)
    assert (cfg["in_channels"], cfg["out_channels"]) == (3, 6)
    net = cmfast.UNet(**cfg).double().eval()
    net.load_state_dict({k: v.double() for k, v in weights.items()})
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    c_noise = torch.tensor([0.3, 2.0], dtype=torch.float64)
    with cmfast.ops.use_backend("torch"), torch.no_grad():
        got = net(x, c_noise)
        want = _reference({k: v.double() for k, v in sd.items()}, x, 1000 * c_noise, None, _downs(1, 2))
    assert got.shape == (2, 6, 16, 16)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_cm_arguments_and_weights_that_cannot_work_are_refused(tmp_path):
    """A qkv order or kind that is none of the two, a second two-step level for an EDM teacher (it samples with
    Heun), and a weight of the right rank but another size (one line naming it; load_state_dict's many-line
    RuntimeError before)."""
    sd = {k: v.float() for k, v in _openai_state(classes=0, seed=8).items()}
    with pytest.raises(ValueError, match="qkv_order: expected 'flash' or 'legacy', got 'qkv'"):
        cm_import.convert(sd, img_resolution=16, qkv_order="qkv")
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="kind: expected 'cm' .* or 'edm' .*, got 'teacher'"):
        cm_import.load_cm_checkpoint(str(tmp_path / "m.pt"), kind="teacher", img_resolution=16)
    with pytest.raises(ValueError, match="for an EDM teacher"):
        cm_import.load_cm_checkpoint(str(tmp_path / "m.pt"), kind="edm", img_resolution=16, two_step_sigma=1.0)
    model, cfg = cm_import.load_cm_checkpoint(str(tmp_path / "m.pt"), kind="cm", img_resolution=16,
                                              two_step_sigma=1.0)
    assert not model.training and cfg["sampling_sigmas"] == {"2": [80.0, 1.0]}
    wide = dict(sd, **{"out.0.bias": torch.zeros(129)})
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(cm_import.CMCheckpointError) as e:
        cm_import.load_cm_checkpoint(str(tmp_path / "wide.pt"), img_resolution=16)
    assert str(e.value) == f"{tmp_path / 'wide.pt'}: out_norm.bias: shape (129,), expected (128,)"


def test_edm_grayscale_network(edm_pickles, tmp_path):
    """img_channels is read from the pickle (EDM trains 1-channel networks too): a 1-channel SongUNet imports and
    equals the network it was written from."""
    cfg = dict(img_resolution=16, in_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1,
               attn_resolutions=[8], channel_mult_emb=2, dropout=0.0)
    torch.manual_seed(9)
    net = cmfast.UNet(**cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    net.config = cfg
    song = dict(model_type="SongUNet", model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                channel_mult_emb=2, dropout=0.0)
    model, meta = edm_import.load_edm_pickle(str(edm_pickles.write_edm_pickle(tmp_path / "g.pkl", net, song)))
    assert meta["net"]["in_channels"] == 1
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 1.5), cmfast.EDMDenoiser(net).eval()(x, 1.5), rtol=0, atol=0)


def test_edm_files_and_arguments_that_cannot_work_are_one_line(edm_pickles, tmp_path):
    """An empty file (EOFError), a recorded argument that is no plain data (kept inert: named by its class), an
    encoder cmfast lacks ('skip', EDM's third one): each an EDMPickleError naming the file and why."""
    import fractions
    (tmp_path / "empty.pkl").write_bytes(b"")
    net, song = edm_pickles._net("ddpmpp")
    cases = {"empty.pkl": "unreadable EDM pickle (EOFError",
             edm_pickles.write_edm_pickle(tmp_path / "inert.pkl", net, {**song, "dropout": fractions.Fraction(1, 10)}
                                          ).name: "a recorded network argument is not plain data (fractions.Fraction)",
             edm_pickles.write_edm_pickle(tmp_path / "skip.pkl", net, {**song, "encoder_type": "skip"}
                                          ).name: "encoder 'skip' / decoder 'standard' is not supported"}
    for name, match in cases.items():
        with pytest.raises(edm_import.EDMPickleError) as e:
            edm_import.load_edm_pickle(str(tmp_path / name))
        assert str(e.value).startswith(f"{tmp_path / name}: ") and match in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
