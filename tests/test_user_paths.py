"""What a new user gets wrong on the README's paths (found by walking the README as a first-time user): each is one
clear line, raised before the work it would otherwise throw away."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import cmfast
from cmfast import objectives, trigflow
from cmfast.cli import _common
from cmfast.cli.edit import main as edit_main
from cmfast.cli.eval import main as eval_main
from cmfast.cli.sample import main as sample_main
from test_train_cli import fails as train_cli_fails

PROC = "/proc"      # a folder os.access calls writable for root, where no file can be made
needs_proc = pytest.mark.skipif(not os.path.isdir(PROC), reason="no /proc here")


def fails(capsys, main, argv, prog):
    """The command's one error line (exit 2, no traceback); the tests compare all of it."""
    return train_cli_fails(capsys, argv, "", main=main, prog=prog)


# ---- an output path in a folder that takes no file, checked before the work -------------------------------------
@needs_proc
def test_sample_refuses_an_output_under_proc_before_sampling(capsys, monkeypatch):
    # before: os.access passed for root, the samples were drawn, then "[Errno 2] cannot write /proc/x.npz" lost them
    import cmfast.cli.sample as S
    monkeypatch.setattr(S, "generate", lambda *a, **k: pytest.fail("sampled before the output was checked"))
    err = fails(capsys, sample_main, ["--pretrained", "fmnist", "--num", "2", "--npz", f"{PROC}/cmfast-x.npz"],
                "cmfast-sample")
    assert err == f"cmfast-sample: error: --npz {PROC}/cmfast-x.npz: folder {PROC} is not writable" + \
        (" (No such file or directory)" if os.geteuid() == 0 else "")
    err = fails(capsys, sample_main, ["--pretrained", "fmnist", "--num", "2", "--out", f"{PROC}/new/g.png"],
                "cmfast-sample")
    assert f"--out {PROC}/new/g.png: folder {PROC} is not writable" in err


@needs_proc
def test_edit_and_eval_refuse_an_output_under_proc_before_loading(capsys, monkeypatch):
    import cmfast.cli.edit as E
    import cmfast.pretrained as P
    monkeypatch.setattr(E, "load", lambda *a, **k: pytest.fail("loaded the model before the output was checked"))
    monkeypatch.setattr(P, "load_pretrained", lambda *a, **k: pytest.fail("loaded before the output was checked"))
    err = fails(capsys, edit_main, ["denoise", "--pretrained", "fmnist", "--input", "x.png", "--out",
                                    f"{PROC}/edited"], "cmfast-edit")
    # the folder the user named, not the file name the check made up inside it ("/proc/edited/x")
    assert f"--out {PROC}/edited: folder {PROC} is not writable" in err, err
    err = fails(capsys, eval_main, ["--pretrained", "fmnist", "--metric", "fd-fmnist", "--num", "2", "--out",
                                    f"{PROC}/fd.json"], "cmfast-eval")
    assert f"--out {PROC}/fd.json: folder {PROC} is not writable" in err, err


def test_the_output_check_leaves_no_file_behind(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    _common.check_output(str(tmp_path / "g.png"), "--out", (".png",))
    _common.check_output_dir(str(tmp_path / "edited"), "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "x").mkdir()     # a subfolder named like the check's made-up file is no error
    _common.check_output_dir(str(tmp_path / "edited"), "--out")


def test_eval_names_its_own_flag_for_a_non_integer(capsys):
    # before: "argument --num: invalid _positive value: 'nan'" (argparse printed the parser function's name)
    for flag in ("--num", "--steps", "--batch-size"):
        err = fails(capsys, eval_main, ["--pretrained", "fmnist", "--metric", "fd-fmnist", flag, "nan"],
                    "cmfast-eval")
        assert err == f"cmfast-eval: error: argument {flag}: expected an integer >= 1, got 'nan'"


# ---- the losses given integer images (a uint8 batch straight from a dataset) -------------------------------------
def _net():
    torch.manual_seed(0)
    return cmfast.UNet.from_preset("tiny", img_resolution=8, attn_resolutions=[])


@pytest.mark.parametrize("name", ["edm", "cd", "ct", "ict", "sct", "scd"])
def test_losses_refuse_integer_images(name):
    # before: edm / cd / ct / ict raised NotImplementedError '"normal_kernel_cpu" not implemented for 'Byte'';
    # sct / scd ran, training on pixels 0..255 as if they were [-1, 1] values
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    cm, teacher, trig = cmfast.ConsistencyModel(_net()), cmfast.EDMDenoiser(_net()), trigflow.TrigFlowModel(_net())
    call = {"edm": lambda x: objectives.edm_loss(teacher, x),
            "cd": lambda x: objectives.cd_loss(cm, cm, teacher, x, num_scales=4, loss="l2"),
            "ct": lambda x: objectives.ct_loss(cm, cm, x, 4, loss="l2"),
            "ict": lambda x: objectives.ict_loss(cm, x, 4),
            "sct": lambda x: trigflow.sct_loss(trig, x),
            "scd": lambda x: trigflow.scd_loss(trig, x, teacher)}[name]
    what = "x0" if name in ("sct", "scd") else "x"
    with pytest.raises(TypeError, match=rf"^{what}: expected a floating-point tensor \(images in \[-1, 1\]\), "
                                        r"got torch.uint8$"):
        call(x)
    loss = call(x.float() / 127.5 - 1)      # the same images in [-1, 1] run
    assert loss.shape == (2,) and bool(torch.isfinite(loss).all())


def test_samples_that_are_not_an_array_file_say_so(tmp_path):
    # before: numpy's pickle fallback: "This file contains pickled (object) data. If you trust the file you can load
    # it unsafely using the `allow_pickle=` keyword argument" for a PNG or a text file
    from cmfast import metrics
    from PIL import Image
    (tmp_path / "one.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (tmp_path / "notes.txt").write_text("hello\n")
    image = "one image, not a samples file: give the folder of images"
    for name in ("one.jpg", "one.JPEG", "ONE.PNG"):     # real images, the extension in any spelling
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / name,
                                                                  format="PNG" if name.endswith("PNG") else "JPEG")
    for name, why in (("one.png", image), ("one.jpg", image), ("one.JPEG", image), ("ONE.PNG", image),
                      ("notes.txt", "neither an .npz nor an .npy file")):
        with pytest.raises(ValueError) as e:
            metrics.load_samples(str(tmp_path / name))
        assert str(e.value) == (f"{tmp_path / name}: not a samples .npz ({why}); expected uint8 images (N, H, W, C) "
                                "as arr_0, as cmfast-sample --npz writes")


def test_generate_batches_names_a_float_count():
    # before: num=5e4 (a float, as a config file or 5e4 writes it) was "TypeError: 'float' object cannot be
    # interpreted as an integer" from deep inside, naming neither argument
    from cmfast.sampling import generate_batches
    model = cmfast.ConsistencyModel(_net()).eval()
    # 0 / -1 / 0: no empty output, or range()'s 'arg 3 must not be zero'; '8': the count shown as the string it is
    for num, bs in ((5e4, 4), (2.5, 4), (2, 4.0), (0, 4), (-1, 4), (3, 0), ("8", 4)):
        with pytest.raises(ValueError) as e:
            list(generate_batches(model, num, sigmas=(80.0,), batch_size=bs, engine="eager"))
        assert str(e.value) == f"num and batch_size: expected positive ints, got {num!r} and {bs!r}"
    with torch.no_grad():
        got = [x for _, x in generate_batches(model, np.int64(3), sigmas=(80.0,), batch_size=np.int64(2),
                                                engine="eager")]
        want = [x for _, x in generate_batches(model, 3, sigmas=(80.0,), batch_size=2, engine="eager")]
    assert [tuple(x.shape) for x in got] == [(2, 3, 8, 8), (1, 3, 8, 8)]
    torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=0, atol=0)


def test_edit_takes_a_class_by_name_as_sample_does(tmp_path, monkeypatch, capsys):
    # before: cmfast-sample --class dogs worked (README), cmfast-edit --class dogs was "expected int, got 'dogs'"
    import numpy as np
    from PIL import Image
    import cmfast.cli.edit as E
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", img_resolution=8, attn_resolutions=[], label_dim=2)
    with torch.no_grad():       # the label's effect not ~0 at init: a visible difference between classes
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = cmfast.ConsistencyModel(net).eval()
    meta = {"config": {"method": "ict", "classes": ["cats", "dogs"]}}
    monkeypatch.setattr(E, "load", lambda args, device: (model, meta))
    (tmp_path / "in").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in" / "a.png")
    out = {}
    for cls in ("dogs", "1", "0"):
        assert E.main(["denoise", "--checkpoint", "x", "--input", str(tmp_path / "in"), "--out",
                       str(tmp_path / cls), "--class", cls]) == 0
        out[cls] = np.asarray(Image.open(tmp_path / cls / "a_denoise.png"))
    np.testing.assert_array_equal(out["dogs"], out["1"])          # dogs is label 1 of (cats, dogs)
    assert np.abs(out["dogs"].astype(int) - out["0"]).max() > 0   # and the label reaches the network
    err = fails(capsys, E.main, ["denoise", "--checkpoint", "x", "--input", str(tmp_path / "in"), "--out",
                                 str(tmp_path / "o"), "--class", "owls"], "cmfast-edit")
    assert err == "cmfast-edit: error: --class owls: not a class of this model (cats, dogs)"
