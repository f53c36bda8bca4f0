"""test_user_paths' checks, the cases its tests left open (mutation test of the user-path commits: each test here
failed on a planted change of the product line it names, and passes on the real code)."""
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
from test_user_paths import PROC, _net, fails, needs_proc


# ---- cli._common.check_output / check_output_dir ----------------------------------------------------------------
@needs_proc
def test_edit_probes_an_existing_output_folder_itself(capsys, monkeypatch):
    # an existing --out folder is where the PNGs go: the probe is made in it, not in its parent (here /proc/self
    # takes no file while /proc's message would name the wrong folder)
    import cmfast.cli.edit as E
    monkeypatch.setattr(E, "load", lambda *a, **k: pytest.fail("loaded the model before the output was checked"))
    err = fails(capsys, edit_main, ["denoise", "--pretrained", "fmnist", "--input", "x.png", "--out",
                                    f"{PROC}/self"], "cmfast-edit")
    assert err.startswith(f"cmfast-edit: error: --out {PROC}/self: folder {PROC}/self is not writable"), err


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc/self/fd here")
def test_the_output_check_closes_its_probe(tmp_path):
    # the probe's file descriptor is closed: an open one is a leak per check (the file is unlinked but held open)
    _common.check_output(str(tmp_path / "g.png"), "--out", (".png",))
    _common.check_output_dir(str(tmp_path / "edited"), "--out")
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:     # the listing's own descriptor, closed by now
            pass
    assert [h for h in held if ".cmfast-probe-" in h] == []


@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".npz", ".json", ".NPZ"])
def test_an_output_folder_named_like_a_file_is_refused(tmp_path, ext):
    path = str(tmp_path / f"samples{ext}")
    with pytest.raises(ValueError) as e:
        _common.check_output_dir(path, "--out")
    assert str(e.value) == f"--out {path}: names a file; this command writes a folder of PNGs (give a folder)"
    assert not os.path.exists(path)


def test_an_existing_folder_named_like_a_file_is_taken(tmp_path):
    # the check is for a folder still to be made: one the user already has, named out.png, is theirs to use
    (tmp_path / "out.png").mkdir()
    _common.check_output_dir(str(tmp_path / "out.png"), "--out")
    assert os.listdir(tmp_path / "out.png") == []


# ---- cli.eval._positive ------------------------------------------------------------------------------------------
def test_eval_refuses_zero_and_negative_counts(capsys):
    for flag in ("--num", "--batch-size"):
        for v in ("0", "-3"):
            err = fails(capsys, eval_main, ["--pretrained", "fmnist", "--metric", "fd-fmnist", flag, v], "cmfast-eval")
            assert err == f"cmfast-eval: error: argument {flag}: expected an integer >= 1, got {v}"


# ---- precond.check_images through the losses -----------------------------------------------------------------------
def test_losses_refuse_a_non_tensor_and_a_non_batch():
    teacher, trig = cmfast.EDMDenoiser(_net()), trigflow.TrigFlowModel(_net())
    x = np.zeros((2, 3, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=r"^x: expected a torch.Tensor \(B, C, \.\.\.\), got numpy.ndarray$"):
        objectives.edm_loss(teacher, x)
    with pytest.raises(ValueError, match=r"^x0: expected a torch.Tensor \(B, C, \.\.\.\), got numpy.ndarray$"):
        trigflow.sct_loss(trig, x)
    for bad in (torch.zeros(3), torch.zeros(0, 3, 8, 8)):
        with pytest.raises(ValueError, match=rf"^x: expected a non-empty batch tensor \(B, C, \.\.\.\), got shape "
                                             rf"\({', '.join(map(str, bad.shape))},?\)$"):
            objectives.edm_loss(teacher, bad)
        with pytest.raises(ValueError, match=r"^x0: expected a non-empty batch tensor"):
            trigflow.sct_loss(trig, bad)
