"""User mistakes across the command lines and the library, each one line and nothing lost (found by an audit of
careless use): bad devices, output paths checked before the work, class labels, hyperparameter values, interrupts
during start-up, --resume given a file that is not a checkpoint."""
import os
import signal

import pytest
import torch

import cmfast
from cmfast.cli import _common
from cmfast.cli.edit import main as edit_main
from cmfast.cli.eval import main as eval_main
from cmfast.cli.sample import main as sample_main
from cmfast.cli.train import main as train_main
from test_train_cli import env  # noqa: F401  (autouse: offline, no system Fashion-MNIST, one thread)
from test_train_cli import fails as train_cli_fails
from train_fixtures import write_fmnist


def fails(capsys, main, argv, match, prog):
    return train_cli_fails(capsys, argv, match, main=main, prog=prog)


def test_device_names_are_checked():
    assert _common.check_device("cpu") == "cpu"
    for bad, msg in (("foo", "expected cpu, cuda, cuda:N or mps"), ("meta", "expected cpu, cuda, cuda:N or mps")):
        with pytest.raises(ValueError, match=msg):
            _common.check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asks for CUDA, which is not available here"):
            _common.check_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            _common.check_device(f"cuda:{torch.cuda.device_count()}")


def test_bad_device_is_one_line_in_every_command(capsys, tmp_path):
    fm = tmp_path / "fm"
    write_fmnist(fm, n=8)
    out = tmp_path / "run"
    fails(capsys, train_main, ["--dataset", "fashion-mnist", "--data-dir", str(fm), "--preset", "tiny", "--steps",
                               "1", "--output-dir", str(out), "--device", "foo"], "--device 'foo'", "cmfast-train")
    assert not out.exists()
    fails(capsys, sample_main, ["--pretrained", "fmnist", "--num", "2", "--out", str(tmp_path / "g.png"),
                                "--device", "meta"], "--device 'meta'", "cmfast-sample")
    fails(capsys, edit_main, ["denoise", "--pretrained", "fmnist", "--input", str(tmp_path), "--out",
                              str(tmp_path / "e"), "--device", "bogus:1"], "--device 'bogus:1'", "cmfast-edit")


def test_sample_outputs_are_checked_before_sampling(capsys, tmp_path, monkeypatch):
    import cmfast.cli.sample as S
    monkeypatch.setattr(S, "generate", lambda *a, **k: pytest.fail("sampled before the output was checked"))
    fails(capsys, sample_main, ["--pretrained", "fmnist", "--out", str(tmp_path)], "is a directory", "cmfast-sample")
    fails(capsys, sample_main, ["--pretrained", "fmnist", "--out", str(tmp_path / "g.jpg")], "ending in .png",
          "cmfast-sample")
    fails(capsys, sample_main, ["--pretrained", "fmnist", "--out", str(tmp_path / "g.png"), "--npz",
                                str(tmp_path / "x.npy")], "ending in .npz", "cmfast-sample")
    (tmp_path / "file").write_text("")
    fails(capsys, sample_main, ["--pretrained", "fmnist", "--out", str(tmp_path / "file" / "g.png")],
          "is a file, not a folder", "cmfast-sample")
    if os.geteuid() != 0:           # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        fails(capsys, sample_main, ["--pretrained", "fmnist", "--out", str(ro / "g.png")], "not writable",
              "cmfast-sample")


def test_sample_makes_the_output_folder_and_names_the_file_on_error(tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "g.png"
    assert sample_main(["--pretrained", "fmnist", "--num", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'file'}/x: "):
        (tmp_path / "file").write_text("")
        _common.write_output(str(tmp_path / "file" / "x"), b"data")


def test_class_labels(capsys, tmp_path):
    fails(capsys, sample_main, ["--pretrained", "fmnist", "--num", "2", "--out", str(tmp_path / "g.png"),
                                "--class", "3", "--device", "cpu"], "this model is unconditional", "cmfast-sample")
    net = cmfast.UNet.from_preset("tiny", img_resolution=8, in_channels=1, label_dim=10, attn_resolutions=[])
    model = cmfast.ConsistencyModel(net).eval()
    z = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ok = cmfast.sample(model, z, class_labels=torch.tensor([9, 0]))
        onehot = cmfast.sample(model, z, class_labels=torch.eye(10)[[9, 0]])
        torch.testing.assert_close(ok, onehot)
        for labels, msg in ((torch.tensor([10, 1]), "expected 0 <= label < 10, got 10"),
                            (torch.tensor([-1, 1]), "got -1"),
                            (torch.tensor([1.5, 2.0]), "expected integer class indices, got torch.float32"),
                            (torch.zeros(2, 9), r"one-hot rows \(B, 10\), got shape \(2, 9\)")):
            with pytest.raises(ValueError, match=msg):
                cmfast.sample(model, z, class_labels=labels)
    from cmfast.sampling import generate_batches
    with pytest.raises(ValueError, match="expected 0 <= label < 10, got 10"):
        next(generate_batches(model, 2, sigmas=(80.0,), class_label=10))


def test_library_inputs():
    model = cmfast.load_pretrained("fmnist")
    with pytest.raises(ValueError, match="expected a torch.Tensor .* got numpy.ndarray"):
        cmfast.sample(model, torch.randn(2, 1, 32, 32).numpy())
    with pytest.raises(ValueError, match=r"non-empty batch .* got shape \(0, 1, 32, 32\)"):
        cmfast.sample(model, torch.randn(0, 1, 32, 32))
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eps: expected a positive number"):
            cmfast.ops.group_norm_act(torch.randn(2, 4, 3, 3), 2, eps=eps)


def test_edit_checks_its_folder_and_levels(capsys, tmp_path):
    from cmfast.training.images import png_bytes
    img = tmp_path / "img.png"
    img.write_bytes(png_bytes(torch.zeros(32, 32, 1, dtype=torch.uint8).numpy()))
    fails(capsys, edit_main, ["inpaint", "--pretrained", "fmnist", "--input", str(img), "--out", str(img)],
          "is a file; give a folder", "cmfast-edit")
    fails(capsys, edit_main, ["stroke", "--pretrained", "fmnist", "--input", str(img), "--out", str(tmp_path / "o"),
                              "--sigma-start", "-1", "--device", "cpu"], "--sigma-start -1.0: expected a level in",
          "cmfast-edit")
    fails(capsys, edit_main, ["denoise", "--pretrained", "fmnist", "--input", str(img), "--out", str(tmp_path / "o"),
                              "--sigma", "1e9", "--device", "cpu"], "--sigma 1000000000.0: expected a level in",
          "cmfast-edit")
    fails(capsys, edit_main, ["denoise", "--pretrained", "fmnist", "--input", str(img), "--out", str(tmp_path / "o"),
                              "--seed", "-5"], "expected a value in [0, inf]", "cmfast-edit")
    # a 1-channel model cannot colorize: no output folder is left behind (it was, empty)
    fails(capsys, edit_main, ["colorize", "--pretrained", "fmnist", "--input", str(img), "--out", str(tmp_path / "o"),
                              "--device", "cpu"], "colorize: expected a 3-channel (RGB) model, got a 1-channel model",
          "cmfast-edit")
    # denoise is one step at --sigma: --steps / --sigmas were ignored; --which with a shipped model was ignored
    fails(capsys, edit_main, ["denoise", "--pretrained", "fmnist", "--input", str(img), "--out", str(tmp_path / "o"),
                              "--steps", "3"], "denoise is one step at --sigma", "cmfast-edit")
    for main, argv, prog in ((edit_main, ["inpaint", "--input", str(img), "--out", str(tmp_path / "o")], "cmfast-edit"),
                             (sample_main, ["--out", str(tmp_path / "o" / "g.png")], "cmfast-sample"),
                             (eval_main, ["--metric", "fd-fmnist"], "cmfast-eval")):
        fails(capsys, main, argv + ["--pretrained", "fmnist", "--which", "model"],
              "--which model: a shipped model (--pretrained) has only its EMA weights", prog)
    assert not (tmp_path / "o").exists()


def test_eval_checks_out_before_evaluating_and_bad_inception_weights(capsys, tmp_path, monkeypatch):
    import cmfast.metrics as M
    ck = tmp_path / "ck.safetensors"
    ck.write_bytes(b"")
    monkeypatch.setattr(M, "evaluate", lambda *a, **k: pytest.fail("evaluated before --out was checked"))
    fails(capsys, eval_main, ["--checkpoint", str(ck), "--metric", "fd-fmnist", "--out", str(tmp_path)],
          "is a directory", "cmfast-eval")
    from cmfast._inception import load_fid_inception
    fake = tmp_path / "fake.pth"
    fake.write_bytes(b"\x89PNG not weights")
    with pytest.raises(ValueError, match="fake.pth: not the FID Inception weights"):
        load_fid_inception(str(fake))
    torch.save({"conv.weight": torch.zeros(1)}, fake)
    with pytest.raises(ValueError, match="not the FID Inception weights .*"):
        load_fid_inception(str(fake))


def test_method_arguments_are_checked_before_anything_is_written(capsys, tmp_path):
    fm = tmp_path / "fm"
    write_fmnist(fm, n=8)
    out = tmp_path / "run"
    base = ["--dataset", "fashion-mnist", "--data-dir", str(fm), "--preset", "tiny", "--steps", "1",
            "--output-dir", str(out)]
    for extra, msg in ((["--method-arg", "s0=abc"], "--method-arg s0: expected a number, got 'abc'"),
                       (["--method-arg", "s0=2.5"], "--method-arg s0: expected a whole number"),
                       (["--method-arg", "p_std=-1"], "--method-arg p_std: expected a positive standard deviation"),
                       (["--method-arg", "c=-1"], "--method-arg c: expected a constant >= 0"),
                       (["--method-arg", "c=abc"], "--method-arg c: expected a number, got 'abc'"),
                       (["--method-arg", "schedule_mult=\"x\""], "--method-arg schedule_mult: expected a number"),
                       (["--method", "ct", "--s0", "10", "--s1", "2"], "--s1 2 is below --s0 10"),
                       (["--method", "ct", "--method-arg", "match_reference_code=1"], "expected true or false"),
                       (["--method", "sct", "--method-arg", "jvp=1"], "--method-arg jvp: expected a name"),
                       (["--method", "sct", "--method-arg", "prior_weighting=tan"],
                        "prior_weighting: expected one of none, inv_sigma, got 'tan'"),
                       (["--method", "sct", "--method-arg", "tangent_norm=linf"],
                        "tangent_norm: expected one of l2, rms, got 'linf'"),
                       (["--method", "sct", "--method-arg", "jvp=forward"],
                        "jvp: expected 'fd' or 'exact', got 'forward'"),
                       (["--method", "scd", "--teacher", "t.pkl", "--method-arg", "fd_precision=fp8"],
                        "fd_precision: expected one of fp64, fp32, tf32, bf16, fp16, got 'fp8'"),
                       (["--lr", "nan"], "expected a finite number, got nan")):
        fails(capsys, train_main, base + extra, msg, "cmfast-train")
    assert not out.exists()
    # Values a run may give stay accepted (the paper configs, c = none for iCT's default).
    from cmfast.training.config import CONFIGS, resolve
    for name in CONFIGS:
        resolve({"config": name, "teacher": "t"})
    resolve({"method": "ict", "method_args": {"c": None, "schedule_mult": 5.7}})
    assert resolve({"method": "ict", "method_args": {"s0": 10.0}})["method_args"]["s0"] == 10     # as an int


@pytest.mark.parametrize("how", ["keyboard", "sigterm"])
def test_interrupt_during_start_up_is_one_line(capsys, tmp_path, monkeypatch, how):
    """Ctrl-C or SIGTERM while the data loads (before the loop's own handlers): one line, status 130, nothing lost."""
    import cmfast.training.loop as L
    fm = tmp_path / "fm"
    write_fmnist(fm, n=8)

    def interrupted(*a, **k):
        if how == "keyboard":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM did not interrupt")
    monkeypatch.setattr(L, "load_dataset", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    assert train_main(["--dataset", "fashion-mnist", "--data-dir", str(fm), "--preset", "tiny", "--steps", "1",
                       "--output-dir", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("cmfast-train: interrupted (checkpoints written so far are kept: --resume latest continues "
                   "from them)")
    assert signal.getsignal(signal.SIGTERM) is before      # the handler is the caller's again


def test_resume_from_a_file_that_is_not_a_checkpoint(capsys, tmp_path):
    fm = tmp_path / "fm"
    write_fmnist(fm, n=8)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    fails(capsys, train_main, ["--dataset", "fashion-mnist", "--data-dir", str(fm), "--preset", "tiny", "--steps", "1",
                               "--output-dir", str(tmp_path / "new"), "--resume", str(run / "config.json")],
          "config.json: not a checkpoint; give a ckpt-*.safetensors file", "cmfast-train")
    assert not (tmp_path / "new").exists()
    fails(capsys, sample_main, ["--checkpoint", str(run / "config.json"), "--out", str(tmp_path / "g.png")],
          "config.json: not a checkpoint", "cmfast-sample")          # the same check, in checkpoint.resolve


def test_flags_are_not_abbreviated_and_edit_out_is_a_folder(capsys, tmp_path):
    """cmfast-edit took sample's --grid as an abbreviation of its --grid-scale ('expected an integer >= 1, got
    g.png'); --out result.png made a folder named result.png. Both are one-line errors now."""
    fails(capsys, edit_main, ["denoise", "--pretrained", "fmnist", "--input", str(tmp_path), "--out",
                              str(tmp_path / "o"), "--grid", "g.png"], "unrecognized arguments: --grid", "cmfast-edit")
    fails(capsys, sample_main, ["--pretrained", "fmnist", "--num", "2", "--out", str(tmp_path / "s.png"), "--see", "1"],
          "unrecognized arguments: --see", "cmfast-sample")
    (tmp_path / "in.png").write_bytes(b"")
    fails(capsys, edit_main, ["denoise", "--pretrained", "fmnist", "--input", str(tmp_path / "in.png"), "--out",
                              str(tmp_path / "result.png")], "names a file; this command writes a folder",
          "cmfast-edit")
    assert not (tmp_path / "result.png").exists()


def test_sample_takes_more_steps_without_sigmas(tmp_path, capsys):
    """--steps 3 without --sigmas samples at cmfast-eval's levels (metrics.default_sigmas: 80 and the Karras grid);
    it was an error in cmfast-sample alone."""
    import numpy as np

    from cmfast.metrics import default_sigmas
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert sample_main(["--pretrained", "fmnist", "--num", "3", "--steps", "3", "--npz", str(a)]) == 0
    assert sample_main(["--pretrained", "fmnist", "--num", "3", "--npz", str(b), "--sigmas",
                        ",".join(repr(s) for s in default_sigmas(3))]) == 0
    assert np.array_equal(np.load(a)["arr_0"], np.load(b)["arr_0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where backend 'cuda' cannot run")
def test_unavailable_backend_is_one_line_in_every_command(capsys, tmp_path, monkeypatch):
    """CMFAST_BACKEND naming a backend that cannot run here (DESIGN.md 2: it says why in one line): cmfast-sample,
    -edit and -eval printed a traceback ending in cmfast.ops.BackendUnavailable (a RuntimeError) and exited 1."""
    monkeypatch.setenv("CMFAST_BACKEND", "cuda")
    msg = "backend 'cuda' cannot run on cpu"
    fails(capsys, sample_main, ["--pretrained", "fmnist", "--num", "2", "--npz", str(tmp_path / "s.npz"),
                                "--device", "cpu"], msg, "cmfast-sample")
    from cmfast.cli._png import save_png
    save_png(torch.zeros(1, 32, 32), str(tmp_path / "in.png"))
    fails(capsys, edit_main, ["denoise", "--pretrained", "fmnist", "--input", str(tmp_path / "in.png"), "--out",
                              str(tmp_path / "e"), "--device", "cpu"], msg, "cmfast-edit")
    import cmfast.metrics as M      # the reference statistics come first; stand-ins, so that sampling is reached
    monkeypatch.setattr(M, "reference_stats", lambda *a, **k: (torch.zeros(2), torch.eye(2), {}))
    fails(capsys, eval_main, ["--pretrained", "fmnist", "--metric", "fd-fmnist", "--num", "4", "--device", "cpu"],
          msg, "cmfast-eval")


def test_non_square_image_folder_is_refused_before_anything_is_written(capsys, tmp_path):
    """A folder of 30x40 PNGs built a 30x30 net and failed at the first step (after writing config.json) with
    'expected images (B, 3, 30, 30) for this network'; now one line naming the folder, and no run folder."""
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.new("RGB", (40, 30), (i * 60, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")     # PIL: (width, height)
    out = tmp_path / "run"
    fails(capsys, train_main, ["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--steps", "1",
                               "--batch-size", "2", "--output-dir", str(out)],
          "imgs: expected square images, got 30x40 (height x width)", "cmfast-train")
    assert not out.exists()


def test_checkpoint_weights_no_model_can_use_are_one_line(capsys, tmp_path):
    """NaN / inf weights loaded silently (cmfast-sample wrote an all-black PNG and exited 0), integer or bool weights
    were cast into the model, and a stored config that UNet refuses with a RuntimeError (a negative channel count)
    was a traceback. Now each is a CheckpointError naming the file, one line and exit 2, and nothing is written."""
    import json
    from safetensors.torch import save
    from cmfast.nets import preset_config
    from cmfast.training.checkpoint import FORMAT, CheckpointError, load_model
    cm = cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny"))
    cfg = dict(method="ict", net=preset_config("tiny"), sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    meta = {"format": FORMAT, "step": "1", "config": json.dumps(cfg)}
    sd = {f"ema/{k}": v.clone().contiguous() for k, v in cm.state_dict().items()}
    nan, inf = dict(sd), dict(sd)
    nan["ema/net.out_conv.weight"] = sd["ema/net.out_conv.weight"].clone()
    nan["ema/net.out_conv.weight"].view(-1)[5] = float("nan")
    inf["ema/net.map_layer0.bias"] = torch.full_like(sd["ema/net.map_layer0.bias"], float("inf"))
    bad_net = dict(cfg, net=dict(cfg["net"], model_channels=-1))
    cases = {"nan": (nan, meta, "bad ema weights: net.out_conv.weight holds 1 NaN / inf value(s)"),
             "inf": (inf, meta, "bad ema weights: net.map_layer0.bias holds 32 NaN / inf value(s)"),
             "int": ({k: v.long() for k, v in sd.items()}, meta, "is torch.int64, not floating point"),
             "neg": (sd, dict(meta, config=json.dumps(bad_net)), "its config does not describe a model this cmfast "
                                                                   "builds (ValueError: model_channels: expected an "
                                                                   "integer >= 1, got -1)")}
    for name, (tensors, m, msg) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(save(tensors, metadata=m))
        with pytest.raises(CheckpointError, match=f"^{path}: ") as e:
            load_model(str(path))
        assert msg in str(e.value) and "\n" not in str(e.value)
        out = tmp_path / f"{name}.png"
        fails(capsys, sample_main, ["--checkpoint", str(path), "--num", "1", "--out", str(out), "--device", "cpu"],
              msg, "cmfast-sample")
        assert not out.exists()
    half = tmp_path / "half.safetensors"            # float16 / float64 weights are weights: they load as float32
    half.write_bytes(save({k: v.half() for k, v in sd.items()}, metadata=meta))
    assert next(load_model(str(half))[0].parameters()).dtype == torch.float32


def test_resume_from_a_pair_that_does_not_fit_is_one_line(capsys, tmp_path):
    """A readable checkpoint pair lacking a part or not fitting the run (another run's, edited, damaged) was a
    KeyError / RuntimeError / TypeError traceback from inside torch, and NaN weights resumed into a run whose every
    step was skipped. Now each is one line naming the file, exit 2, and the run folder's files are unchanged."""
    import shutil
    from safetensors import safe_open
    from safetensors.torch import load_file, save
    fm = tmp_path / "fm"
    write_fmnist(fm, n=8)
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(fm), "--preset", "tiny", "--method", "ct", "--loss", "l2",
            "--steps", "3", "--batch-size", "4", "--ckpt-every", "1", "--sample-num", "0"]
    base = tmp_path / "base"
    assert train_main([*argv, "--output-dir", str(base), "--stop-at", "2"]) == 0
    name = "ckpt-00000002"

    def edit_weights(run, fn):
        path = str(run / f"{name}.safetensors")
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        (run / f"{name}.safetensors").write_bytes(save(fn({k: v.clone() for k, v in load_file(path).items()}), meta))

    def edit_state(run, fn):
        torch.save(fn(torch.load(run / f"{name}.state.pt", weights_only=True)), run / f"{name}.state.pt")

    def nan(t):
        t["model/net.out_conv.bias"] = t["model/net.out_conv.bias"] * float("nan")
        return t
    shape = {"model/net.out_conv.bias": torch.zeros(2)}
    cases = {"no-optimizer": (edit_state, lambda s: {k: v for k, v in s.items() if k != "optimizer"},
                              "not a whole checkpoint of this run (no 'optimizer')"),
             "sampler": (edit_state, lambda s: {**s, "sampler": {"epoch_state": 0, "pos": 0, "gen_state": 0}},
                         "does not fit this run (TypeError: "),
             "shape": (edit_weights, lambda t: {**t, **shape}, "does not fit this run (RuntimeError: size mismatch "
                                                              "for net.out_conv.bias"),
             "nan": (edit_weights, nan, "bad model weights: net.out_conv.bias holds 1 NaN / inf value(s)")}
    for case, (edit, fn, msg) in cases.items():
        run = tmp_path / case
        shutil.copytree(base, run)
        edit(run, fn)
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.name.startswith("ckpt-")}
        err = fails(capsys, train_main, [*argv, "--output-dir", str(run), "--resume", "latest"], msg, "cmfast-train")
        assert f"{run / name}.safetensors: " in err
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.name.startswith("ckpt-")} == before


def test_edit_inputs_that_are_no_8_bit_image_are_one_line(capsys, tmp_path):
    """cmfast-edit's --input / --mask: a PNG whose header claims a huge size was PIL's DecompressionBombError
    traceback (no OSError), and a 16-bit PNG was clipped to 255 by convert (a 99% white input, edited, exit 0).
    Now both are one line naming the file, exit 2, and no image is written."""
    import struct
    import zlib
    import numpy as np
    from PIL import Image

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    deep = tmp_path / "deep.png"
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(deep)
    for path, msg in ((bomb, "not a readable image (Image size (400000000 pixels) exceeds limit"),
                      (deep, "I;16 pixels (16-bit or float) are not read; save 8 bits a channel")):
        out = tmp_path / f"out-{path.stem}"
        fails(capsys, edit_main, ["denoise", "--pretrained", "fmnist", "--input", str(path), "--out", str(out),
                                  "--device", "cpu"], f"{path}: {msg}", "cmfast-edit")
        assert not out.exists() or not list(out.iterdir())


def test_checkpoint_metadata_with_a_bad_ema_list_or_deep_json_is_one_line(capsys, tmp_path):
    """A config whose 'ema' is not a list of rates raised float()'s ValueError without the file name, and a config
    nested deeper than Python recurses a RecursionError traceback. Now both are CheckpointErrors naming the file."""
    import json
    from safetensors.torch import save
    from cmfast.nets import preset_config
    from cmfast.training.checkpoint import FORMAT, CheckpointError, load_model
    cm = cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny"))
    cfg = dict(method="ict", net=preset_config("tiny"), sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    tensors = {f"ema@0.9/{k}": v.contiguous() for k, v in cm.state_dict().items()}
    for name, config, msg in (("ema", json.dumps(dict(cfg, ema="abc")), "config 'ema' is 'abc', not a list of EMA"),
                              ("deep", "[" * 100_000 + "]" * 100_000, "damaged checkpoint metadata")):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(save(tensors, metadata={"format": FORMAT, "step": "1", "config": config}))
        with pytest.raises(CheckpointError, match=f"^{path}: damaged checkpoint metadata") as e:
            load_model(str(path))
        assert msg in str(e.value)
        fails(capsys, sample_main, ["--checkpoint", str(path), "--num", "1", "--out", str(tmp_path / "o.png"),
                                    "--device", "cpu"], msg, "cmfast-sample")


def test_resume_drops_a_stats_row_that_is_not_utf8(capsys, tmp_path):
    """stats.jsonl with a damaged last row whose bytes are not UTF-8 stopped every --resume with "cmfast-train:
    error: 'utf-8' codec can't decode byte 0xff" (no file named); a row that is not JSON is meant to be dropped."""
    import json
    fm = tmp_path / "fm"
    write_fmnist(fm, n=8)
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(fm), "--preset", "tiny", "--method", "ct", "--loss", "l2",
            "--steps", "3", "--batch-size", "4", "--ckpt-every", "1", "--sample-num", "0", "--log-every", "1",
            "--output-dir", str(tmp_path / "run")]
    assert train_main([*argv, "--stop-at", "2"]) == 0
    with open(tmp_path / "run" / "stats.jsonl", "ab") as f:
        f.write(b'{"step": 3, "lo\xff\xfe')
    assert train_main([*argv, "--resume", "latest"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
