"""cmfast-sample's values, found unchecked by a mutation study of the CLI (each test was seen failing with the mutation
it names): the ranges its counts, seed and class label take, and where the model is loaded from and onto."""
import pytest

from cmfast.cli.sample import main
from test_sampling import shipped  # noqa: F401  (--pretrained x: a stub consistency model, sigma_max 40)


@pytest.mark.parametrize("flag, value, rng", [("--num", "0", "[1, inf]"), ("--steps", "0", "[1, inf]"),
                                              ("--batch-size", "0", "[1, inf]"), ("--seed", "-1", "[0, inf]"),
                                              ("--class", "-1", "[0, inf]")],
                         ids=["num", "steps", "batch-size", "seed", "class"])
def test_counts_seed_and_class_below_their_range_are_one_line(capsys, tmp_path, flag, value, rng):
    """--num / --steps / --batch-size 0, --seed -1 and --class -1 are refused as the arguments are read (--steps 0 was
    one step, --num 0 an empty .npz; --class -1 is a label below 0, not a class name)."""
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path), "--npz", str(tmp_path / "a.npz"), flag, value])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"cmfast-sample: error: argument {flag}: expected a value in {rng}, got {value}\n"


def test_checkpoint_and_shipped_model_load_the_asked_weights_where_they_sample(shipped, tmp_path,  # noqa: F811
                                                                              monkeypatch):
    """--checkpoint with --which model loads those weights onto --device (load_model's which / map_location); a shipped
    model loads onto the device it samples on: cuda where CUDA is there and no --device is given (faked here, the
    sampling stubbed)."""
    import numpy as np
    import torch

    import cmfast.cli.sample as S
    loads, sampled = [], []
    monkeypatch.setattr("cmfast.training.checkpoint.load_model", lambda path, **k: loads.append((path, k)) or
                        (shipped["model"], {"config": {"method": "ict"}}))
    monkeypatch.setattr("cmfast.pretrained.load_pretrained", lambda name, **k: loads.append((name, k)) or
                        shipped["model"])
    monkeypatch.setattr(S, "generate", lambda model, num, *a: sampled.append(model) or
                        np.zeros((num, 4, 4, 3), np.uint8))
    assert main(["--checkpoint", "ck", "--which", "model", "--device", "cpu", "--num", "1",
                 "--npz", str(tmp_path / "a.npz")]) == 0
    assert loads.pop() == ("ck", dict(which="model", map_location="cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["--pretrained", "x", "--num", "1", "--npz", str(tmp_path / "b.npz")]) == 0
    assert loads.pop() == ("x", dict(map_location="cuda"))
    assert sampled == [shipped["model"]] * 2


def test_recorded_levels_are_named_in_the_summary_line(shipped, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A checkpoint's recorded levels for --steps 2 are sampled and named, 4 significant digits each, in the line
    that ends the run; with --sigmas too, those are sampled and the line names no levels; without --steps, one step
    at the model's sigma_max (40)."""
    import numpy as np

    import cmfast.cli.sample as S
    meta = {"config": {"method": "ict", "sampling_sigmas": {"2": [80.0, 1.3823679566]}}}
    monkeypatch.setattr("cmfast.training.checkpoint.load_model", lambda path, **k: (shipped["model"], meta))
    seen = []
    monkeypatch.setattr(S, "generate", lambda model, num, steps, sigmas, *a: seen.append(sigmas) or
                        np.zeros((num, 4, 4, 3), np.uint8))
    out = tmp_path / "a.npz"
    assert main(["--checkpoint", "ck", "--steps", "2", "--num", "1", "--npz", str(out)]) == 0
    assert seen == [(80.0, 1.3823679566)]
    assert capsys.readouterr().out == f"1 images (4, 4, 3) -> {out} (noise levels 80, 1.382, from the checkpoint)\n"
    # --sigmas wins, and the line does not say the levels came from the checkpoint
    assert main(["--checkpoint", "ck", "--steps", "2", "--sigmas", "30,2", "--num", "1", "--npz", str(out)]) == 0
    assert seen[1:] == [(30.0, 2.0)]
    assert capsys.readouterr().out == f"1 images (4, 4, 3) -> {out}\n"
    # no --steps: one step at the model's sigma_max (the checkpoint records levels for 2 steps only)
    assert main(["--checkpoint", "ck", "--num", "1", "--npz", str(out)]) == 0
    assert seen[2:] == [(40.0,)]
    assert capsys.readouterr().out == f"1 images (4, 4, 3) -> {out}\n"


def test_output_extensions_in_capitals_are_taken(shipped, tmp_path):  # noqa: F811
    """--out G.PNG and --npz A.NPZ are a PNG and an .npz: the extension's case does not matter."""
    import numpy as np
    assert main(["--pretrained", "x", "--num", "2", "--out", str(tmp_path / "G.PNG"), "--npz",
                 str(tmp_path / "A.NPZ")]) == 0
    assert (tmp_path / "G.PNG").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.load(tmp_path / "A.NPZ")["arr_0"].shape == (2, 4, 4, 3)
