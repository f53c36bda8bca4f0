"""cmfast.edm_import: EDM network pickles (NVlabs/edm) read without running their code, mapped onto cmfast's UNet.

The pickles here are written the way EDM's torch_utils.persistence writes its own (read from NVlabs/edm: each network
module pickled as _reconstruct_persistent_obj(meta) with meta = class_name, module source and the module's __dict__;
parameters as torch pickles them; plain torch.nn.ModuleDicts for enc / dec), from a cmfast UNet renamed to EDM's
layout (dec.<res>_aux_norm / _aux_conv, resample_filter buffers, an augmentation embedding). A real EDM checkpoint
cannot be fetched here."""
import collections
import json
import os
import pickle
import sys
import types

import pytest
import torch

import cmfast
from cmfast import edm_import
from cmfast.training.checkpoint import CheckpointError, load_model
from cmfast.nets import UNet, architecture

SRC = "raise SystemExit('EDM source was executed')"      # what a real pickle stores: EDM's module source


@pytest.fixture(autouse=True)
def persistence_module(monkeypatch):
    """torch_utils.persistence as pickle must find it while writing (the reader never imports it)."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("not called by the reader")
    _reconstruct_persistent_obj.__module__ = mod.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return mod


class _Persistent:
    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=SRC, class_name=self.class_name, state=self.state)
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


class _Evil:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _state(params=(), buffers=(), modules=(), **attrs):
    return {"training": False, "_parameters": collections.OrderedDict(params),
            "_buffers": collections.OrderedDict(buffers), "_modules": collections.OrderedDict(modules), **attrs}


def _edm_filter(taps):
    f = torch.tensor(taps, dtype=torch.float32)
    return f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()


def _edm_tree(m, taps):
    """A cmfast module as EDM pickles its counterpart (same class names and parameter names)."""
    params = [(k, torch.nn.Parameter(v.detach().clone())) for k, v in m._parameters.items() if v is not None]
    buffers = [(k, v.clone()) for k, v in m._buffers.items()
               if v is not None and k not in m._non_persistent_buffers_set]
    if getattr(m, "resample_filter", None) is not None:
        buffers.append(("resample_filter", _edm_filter(taps)))     # EDM keeps it as a (persistent) buffer
    children = [(k, _edm_tree(c, taps)) for k, c in m._modules.items() if c is not None]
    if isinstance(m, torch.nn.ModuleDict):
        d = torch.nn.ModuleDict()
        d._modules.update(children)                              # EDM's enc / dec: plain torch ModuleDicts
        return d
    return _Persistent(type(m).__name__, _state(params, buffers, children))


def write_edm_pickle(path, net: UNet, song_kwargs: dict, precond="EDMPrecond", sigma_data=0.5, augment_dim=9,
                     marker=None, positional=False, drop=()):
    """An EDM training snapshot (network-snapshot-*.pkl) holding `net` as EDMPrecond(SongUNet or DhariwalUNet);
    positional: EDMPrecond's four positional arguments recorded as _init_args (img_resolution, img_channels,
    label_dim, use_fp16) instead of keywords; drop: names left out of the recorded keywords and of EDMPrecond's
    attributes (sigma_data, ...)."""
    cfg = net.config
    taps = list(cfg.get("resample_filter", [1, 1]))
    song = _edm_tree(net, taps)
    res = cfg["img_resolution"]
    mods = song.state["_modules"]
    if net.arch == "song":      # SongUNet ends its decoder with aux_norm / aux_conv (DhariwalUNet: out_norm / out_conv)
        dec = mods["dec"]
        dec._modules[f"{res}x{res}_aux_norm"] = mods.pop("out_norm")
        dec._modules[f"{res}x{res}_aux_conv"] = mods.pop("out_conv")
    if augment_dim:
        w = torch.nn.Parameter(torch.randn(net.map_layer0.in_features, augment_dim))
        mods["map_augment"] = _Persistent("Linear", _state([("weight", w)]))
    kwargs = dict(img_resolution=res, img_channels=cfg["in_channels"], label_dim=cfg.get("label_dim", 0),
                  use_fp16=False, augment_dim=augment_dim, **song_kwargs)
    args = tuple(kwargs.pop(k) for k in ("img_resolution", "img_channels", "label_dim", "use_fp16")) if positional else ()
    attrs = dict(img_resolution=res, sigma_data=sigma_data, sigma_min=0, sigma_max=float("inf"), _init_args=args,
                 _init_kwargs={k: v for k, v in kwargs.items() if k not in drop})
    ema = _Persistent(precond, _state(modules=[("model", song)], **{k: v for k, v in attrs.items() if k not in drop}))
    evil = _Evil()
    evil.marker = marker or os.devnull
    data = dict(ema=ema, loss_fn=_Persistent("EDMLoss", {"P_mean": -1.2, "hook": evil}), augment_pipe=None,
                dataset_kwargs={"class_name": "training.dataset.ImageFolderDataset", "resolution": res})
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


ARCHS = {   # small SongUNets of both kinds (EDM --arch ddpmpp / ncsnpp), and a conditional one
    "ddpmpp": dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard", resample_filter=[1, 1]),
    "ncsnpp": dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                   resample_filter=[1, 3, 3, 1]),
    "ddpmpp-cond": dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                        resample_filter=[1, 1], label_dim=3),
    "adm-cond": dict(arch="adm", label_dim=3),   # DhariwalUNet (EDM's ImageNet 64x64 network), 64 channels a head
}


def _net(arch):
    kw = dict(ARCHS[arch])
    cfg = dict(img_resolution=16, in_channels=3, model_channels=64 if "adm" in arch else 8, channel_mult=[1, 2],
               num_blocks=1, attn_resolutions=[8], channel_mult_emb=2, dropout=0.13, **kw)
    torch.manual_seed(0)
    net = UNet(**cfg)
    with torch.no_grad():
        for p in net.parameters():      # EDM's zero-ish inits would hide a wrong mapping
            p.normal_(0, 0.3)
    net.config = cfg
    edm = {k: v for k, v in cfg.items() if k not in ("img_resolution", "in_channels", "label_dim", "arch")}
    if "adm" in arch:
        return net, {"model_type": "DhariwalUNet", **edm}
    return net, {"model_type": "SongUNet", "decoder_type": "standard", **edm}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_imports_edm_networks_exactly(arch, tmp_path):
    """The imported denoiser equals the network the pickle was written from, bit for bit, at several noise levels
    (NCSN++: the Fourier frequencies buffer travels; conditional: the label embedding); the augmentation embedding
    and the filter buffers are left out; sigma_data comes from the pickle."""
    net, song = _net(arch)
    path = write_edm_pickle(tmp_path / "net.pkl", net, song, sigma_data=0.5)
    model, meta = load_model(str(path))
    ref = cmfast.EDMDenoiser(net).eval()
    assert isinstance(model, cmfast.EDMDenoiser) and not model.training and meta["config"]["method"] == "edm"
    assert architecture(meta["config"]["net"]) == architecture(net.config)
    x = torch.randn(3, 3, 16, 16)
    labels = torch.tensor([0, 2, 1]) if "cond" in arch else None
    if "adm" in arch:
        assert model.net.arch == "adm" and sum(b.num_heads for b in model.net.blocks()) > 0
    for sigma in (0.002, 0.5, 80.0):
        with torch.no_grad():
            assert torch.equal(model(x, sigma, labels), ref(x, sigma, labels))
    import numpy as np            # a hyperparameter saved as a numpy number (rebuilt as data, not code)
    other, cfg = edm_import.load_edm_pickle(write_edm_pickle(tmp_path / "sd.pkl", net, {**song, "dropout": np.float64(
        0.2)}, sigma_data=np.float32(0.25)))
    assert other.sigma_data == 0.25 and cfg["net"]["dropout"] == 0.2 and type(cfg["net"]["dropout"]) is float
    json.dumps(cfg)


def test_positional_arguments_recorded_defaults_and_filter_values(tmp_path):
    """What a pickle leaves out is EDM's: EDMPrecond's positional arguments (img_resolution, img_channels, label_dim,
    use_fp16, in that order), its model_type default DhariwalUNet, and the SongUNet / DhariwalUNet constructor defaults
    (EDM training/networks.py: dropout 0.10; DhariwalUNet num_blocks 3, channel_mult_emb 4, attn_resolutions
    [32, 16, 8]). A resample_filter buffer of the right shape but other taps than the recorded ones is refused."""
    net, song = _net("ddpmpp-cond")
    path = write_edm_pickle(tmp_path / "pos.pkl", net, {k: v for k, v in song.items() if k != "dropout"},
                            positional=True)
    model, cfg = edm_import.load_edm_pickle(str(path))
    assert cfg["net"]["img_resolution"] == 16 and cfg["net"]["in_channels"] == 3 and cfg["net"]["label_dim"] == 3
    assert cfg["net"]["dropout"] == 0.10
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([2, 0])
    with torch.no_grad():
        assert torch.equal(model(x, 0.7, labels), cmfast.EDMDenoiser(net).eval()(x, 0.7, labels))
    # DhariwalUNet by default, with its own defaults for what is not recorded
    torch.manual_seed(0)
    adm = UNet(img_resolution=16, in_channels=3, arch="adm", model_channels=64, channel_mult=[1, 2], num_blocks=3,
               channel_mult_emb=4, attn_resolutions=[32, 16, 8], dropout=0.0)
    adm.config = dict(img_resolution=16, in_channels=3)
    _, cfg = edm_import.load_edm_pickle(str(write_edm_pickle(tmp_path / "adm.pkl", adm, dict(
        model_channels=64, channel_mult=[1, 2]))))
    assert cfg["net"]["arch"] == "adm" and cfg["net"]["num_blocks"] == 3 and cfg["net"]["dropout"] == 0.10
    assert cfg["net"]["channel_mult_emb"] == 4 and cfg["net"]["attn_resolutions"] == [32, 16, 8]
    # the pickle's [1, 1] filter buffers under a recorded [1, 2]: same 2x2 shape, other values
    plain, plain_song = _net("ddpmpp")
    bad = write_edm_pickle(tmp_path / "filt.pkl", plain, {**plain_song, "resample_filter": [1, 2]})
    with pytest.raises(edm_import.EDMPickleError, match="is not the filter of resample_filter=.1, 2."):
        edm_import.load_edm_pickle(str(bad))


def test_no_code_in_the_pickle_runs(tmp_path):
    """EDM's stored module source would raise SystemExit and a reduce to os.system would write a file: the reader
    runs neither (both are kept as inert data)."""
    net, song = _net("ddpmpp")
    marker = tmp_path / "pwned"
    path = write_edm_pickle(tmp_path / "net.pkl", net, song, marker=marker)
    data = edm_import.read_pickle(str(path))
    assert not marker.exists()
    assert isinstance(data["loss_fn"].state["hook"], edm_import._Inert)
    assert data["loss_fn"].state["hook"]._key in ("posix.system", "nt.system")
    with pytest.raises(pickle.PicklingError):
        pickle.dumps(data["loss_fn"])
    edm_import.load_edm_pickle(str(path))
    assert not marker.exists()


def test_a_pickle_cannot_rewrite_the_functions_it_may_call(tmp_path):
    """BUILD with slot state setattr()s on the object GLOBAL pushed: the reader handed out torch's own
    _rebuild_tensor_v2 (and its own helpers), so a pickle changed their __defaults__ for the rest of the process.
    Now each lookup gets a fresh stand-in; the real functions are as they were."""
    real = (torch._utils._rebuild_tensor_v2, edm_import._np_scalar, edm_import._reconstructor)
    before = [f.__defaults__ for f in real]
    globals_ = (b"ctorch._utils\n_rebuild_tensor_v2\n", b"cnumpy.core.multiarray\nscalar\n",
                b"ccopyreg\n_reconstructor\n")
    for g in globals_:   # {'ema': <g with slot state {'__defaults__': (123,)}>}
        (tmp_path / "build.pkl").write_bytes(b"\x80\x02}X\x03\x00\x00\x00ema" + g
                                             + b"N}X\x0c\x00\x00\x00__defaults__K{\x85s\x86bs.")
        edm_import.read_pickle(str(tmp_path / "build.pkl"))
    assert [f.__defaults__ for f in real] == before


def test_errors_are_one_line(tmp_path):
    net, song = _net("ddpmpp")
    cases = [
        (dict(precond="VPPrecond"), "VPPrecond networks are not supported"),
        (dict(song_kwargs={**song, "model_type": "FooNet"}), "model_type 'FooNet' is not supported"),
        (dict(song_kwargs={**song, "model_type": "DhariwalUNet"}), "do not match EDM's DhariwalUNet"),
        (dict(song_kwargs={**song, "decoder_type": "skip"}), "decoder 'skip' is not supported"),
        (dict(song_kwargs={**song, "channel_mult_emb": 4}), "has shape"),
        (dict(song_kwargs={**song, "num_blocks": 2}), "do not match EDM's SongUNet"),
        (dict(song_kwargs={**song, "resample_filter": [1, 3, 3, 1]}), "is not the filter of resample_filter"),
    ]
    for i, (kw, match) in enumerate(cases):
        path = write_edm_pickle(tmp_path / f"{i}.pkl", net, **{"song_kwargs": song, **kw})
        with pytest.raises(CheckpointError, match=match) as e:
            load_model(str(path))
        assert "\n" not in str(e.value)
    good = write_edm_pickle(tmp_path / "good.pkl", net, song).read_bytes()
    (tmp_path / "cut.pkl").write_bytes(good[:len(good) // 2])
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    for name, match in (("cut.pkl", "unreadable EDM pickle"), ("list.pkl", "not an EDM network pickle"),
                        ("missing.pkl", "not found")):
        with pytest.raises(CheckpointError, match=match):
            load_model(str(tmp_path / name))
    with pytest.raises(CheckpointError, match="'ema' weights only"):
        load_model(str(tmp_path / "good.pkl"), which="model")


def test_arguments_and_weights_that_make_no_network_are_one_line(tmp_path, capsys):
    """A negative channel count (UNet's RuntimeError) and a sigma_data that is no number (float()'s ValueError, no
    file named) were tracebacks from python -m cmfast.edm_import, and NaN weights were converted into a checkpoint
    (exit 0). Now each is one line naming the file: EDMPickleError, CheckpointError from load_model, exit 2."""
    net, song = _net("ddpmpp")
    nan_net, _ = _net("ddpmpp")
    with torch.no_grad():
        nan_net.out_conv.weight[0, 0, 0, 0] = float("nan")
    cases = {"neg": (net, dict(song_kwargs={**song, "model_channels": -8}),
                     "do not make a cmfast UNet (model_channels: expected an integer >= 1, got -8)"),
             "sigma": (net, dict(sigma_data="x"), "a recorded network argument is not a number (could not convert"),
             "nan": (nan_net, {}, "out_conv.weight holds 1 NaN / inf value(s)")}
    for name, (n, kw, match) in cases.items():
        path = write_edm_pickle(tmp_path / f"{name}.pkl", n, **{"song_kwargs": song, **kw})
        with pytest.raises(CheckpointError, match=f"^{path}: ") as e:
            load_model(str(path))
        assert match in str(e.value) and "\n" not in str(e.value)
        assert edm_import.main([str(path), str(tmp_path / f"{name}.safetensors")]) == 2
        assert match in capsys.readouterr().err
        assert not (tmp_path / f"{name}.safetensors").exists()


def test_sample_convert_and_teach(tmp_path, capsys):
    """cmfast-sample takes the pickle as --checkpoint (EDM Heun); `python -m cmfast.edm_import` writes a cmfast
    checkpoint with the same model; cmfast-train takes the pickle as --teacher and says whether the student starts
    from its weights."""
    from cmfast.cli.sample import main as sample_main
    from cmfast.cli.train import main as train_main
    net, song = _net("ddpmpp")
    pkl = str(write_edm_pickle(tmp_path / "edm.pkl", net, song))
    assert sample_main(["--checkpoint", pkl, "--steps", "2", "--num", "2", "--npz", str(tmp_path / "s.npz"),
                        "--device", "cpu"]) == 0
    out = tmp_path / "edm.safetensors"
    assert edm_import.main([pkl, str(out)]) == 0
    a, _ = load_model(pkl)
    b, meta = load_model(str(out))
    assert meta["config"]["imported_from"] == pkl
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    assert edm_import.main([str(tmp_path / "nope.pkl"), str(tmp_path / "x.safetensors")]) == 2
    assert "cmfast.edm_import: error:" in capsys.readouterr().err
    # A folder of 16x16 RGB images; the student is another network (the tiny preset), so it starts from random weights.
    from train_fixtures import write_png_folder
    write_png_folder(tmp_path / "imgs", n=4, size=16)
    run = tmp_path / "cd"
    assert train_main(["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--method", "cd", "--teacher", pkl,
                       "--preset", "tiny", "--batch-size", "2", "--steps", "1", "--sample-num", "0", "--loss", "l2",
                       "--output-dir", str(run)]) == 0
    assert "the student starts from random weights" in (run / "log.txt").read_text()


def test_student_starts_from_a_teacher_that_differs_in_dropout_only(tmp_path):
    """CM paper: the CD student is initialized from the teacher. EDM's teachers train with dropout 0.13 and the
    paper's students with 0: before, any config difference (dropout included) silently skipped the copy."""
    from cmfast.cli.train import main as train_main
    from train_fixtures import write_fmnist
    write_fmnist(tmp_path / "fm", n=8)
    base = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm"), "--preset", "tiny", "--batch-size", "4",
            "--sample-num", "0", "--steps", "1", "--loss", "l2"]
    assert train_main([*base, "--method", "edm", "--dropout", "0.2", "--output-dir", str(tmp_path / "edm")]) == 0
    assert train_main([*base, "--method", "cd", "--teacher", str(tmp_path / "edm"), "--dropout", "0.0",
                       "--output-dir", str(tmp_path / "cd")]) == 0
    assert "the student starts from the teacher's weights" in (tmp_path / "cd" / "log.txt").read_text()
    cfg = json.loads((tmp_path / "cd" / "config.json").read_text())
    assert cfg["net"]["dropout"] == 0.0
    assert architecture({**cfg["net"], "dropout": 0.2}) == architecture(cfg["net"])
    assert architecture({**cfg["net"], "num_blocks": 2}) != architecture(cfg["net"])


def test_arguments_recorded_as_tuples_and_numpy_numbers_are_plain_data(tmp_path):
    """A pickle records its training run's arguments as that run passed them: tuples, and numpy integers inside them
    (a --cres list parsed with numpy, say). The config is plain JSON data (lists of ints: cmfast's UNet refuses a
    numpy integer as a size) and the network is the one written, NCSN++'s filter taps and noise width included."""
    import numpy as np
    net, song = _net("ncsnpp")
    song = {**song, "channel_mult": (np.int64(1), np.int64(2)), "attn_resolutions": (np.int32(8),),
            "resample_filter": (1, np.int64(3), 3, 1), "channel_mult_noise": np.int64(2)}
    model, cfg = edm_import.load_edm_pickle(str(write_edm_pickle(tmp_path / "np.pkl", net, song)))
    for key, want in (("channel_mult", [1, 2]), ("attn_resolutions", [8]), ("resample_filter", [1, 3, 3, 1])):
        assert type(cfg["net"][key]) is list and cfg["net"][key] == want, key
        assert all(type(v) is int for v in cfg["net"][key]), key
    assert type(cfg["net"]["channel_mult_noise"]) is int and cfg["net"]["channel_mult_noise"] == 2
    assert json.loads(json.dumps(cfg))["net"]["channel_mult"] == [1, 2]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, 3.0), cmfast.EDMDenoiser(net).eval()(x, 3.0))


def test_unrecorded_resolution_is_one_line_and_unrecorded_sigma_data_is_edms_default(tmp_path):
    """No img_resolution among EDMPrecond's recorded arguments: one line naming the file (a KeyError traceback
    otherwise). No sigma_data attribute: EDMPrecond's default 0.5, and the denoiser is EDM's preconditioning with it,
    D(x) = c_skip x + c_out F(c_in x, ln(sigma) / 4) with c_skip = 0.25 / (sigma^2 + 0.25), c_out = 0.5 sigma /
    sqrt(sigma^2 + 0.25), c_in = 1 / sqrt(sigma^2 + 0.25), F the network the pickle was written from."""
    net, song = _net("ddpmpp")
    for drop in (("img_resolution",), ("img_channels",)):
        path = write_edm_pickle(tmp_path / f"{drop[0]}.pkl", net, song, drop=drop)
        with pytest.raises(edm_import.EDMPickleError) as e:
            edm_import.load_edm_pickle(str(path))
        assert str(e.value) == f"{path}: the network's img_resolution / img_channels are not recorded"
    model, cfg = edm_import.load_edm_pickle(str(write_edm_pickle(tmp_path / "sd.pkl", net, song, sigma_data=0.25,
                                                                 drop=("sigma_data",))))
    assert cfg["sigma_data"] == 0.5 and model.sigma_data == 0.5
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    sigma = torch.tensor([0.3, 7.0], dtype=torch.float64)[:, None, None, None]
    c_skip, c_out = 0.25 / (sigma ** 2 + 0.25), 0.5 * sigma / (sigma ** 2 + 0.25).sqrt()
    c_in = 1 / (sigma ** 2 + 0.25).sqrt()
    ref = net.double().eval()
    with cmfast.ops.use_backend("torch"), torch.no_grad():
        want = c_skip * x + c_out * ref(c_in * x, sigma.flatten().log() / 4)
        got = model.double()(x, sigma.flatten()).double()      # the denoiser takes sigma in float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weights_missing_for_the_recorded_attention_levels_are_one_line(tmp_path):
    """attn_resolutions recorded as [16, 8] for a network with attention at 8x8 only: every weight in the pickle has
    a place, but the 16x16 blocks' attention weights are missing. One line naming them (a KeyError traceback from the
    shape check otherwise)."""
    net, song = _net("ddpmpp")
    path = write_edm_pickle(tmp_path / "attn.pkl", net, {**song, "attn_resolutions": [16, 8]})
    with pytest.raises(edm_import.EDMPickleError) as e:
        edm_import.load_edm_pickle(str(path))
    import re
    assert re.fullmatch(re.escape(f"{path}: the weights do not match EDM's SongUNet with the recorded arguments ")
                        + r"\(missing \['dec\.16x16_block\d\.norm2\.bias', 'dec\.16x16_block\d\.norm2\.weight', "
                        r"'dec\.16x16_block\d\.proj\.bias'\], unexpected \[\]\)", str(e.value)), str(e.value)


def test_a_shape_mismatch_names_the_first_weight_in_network_order(tmp_path):
    """channel_mult_emb recorded as 4 for a network built with 2 (model_channels 8): every embedding-fed weight
    differs; the error names the first, the embedding's input layer map_layer0 (2 x 8 = 16 rows written, 4 x 8 = 32
    expected, over the 8 positional-embedding channels)."""
    net, song = _net("ddpmpp")
    path = write_edm_pickle(tmp_path / "emb.pkl", net, {**song, "channel_mult_emb": 4})
    with pytest.raises(edm_import.EDMPickleError) as e:
        edm_import.load_edm_pickle(str(path))
    assert str(e.value) == f"{path}: map_layer0.weight has shape (16, 8), expected (32, 8)"
