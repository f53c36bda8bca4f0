"""cmfast-edit's values, end to end in process: the levels, noise, defaults and grids it hands to cmfast.edit, each
checked against the documented rule written out here (Karras levels from the formula, each image's noise from its
own (seed, index, level) generator), on a stub model cheap enough for 20 levels. test_editing checks the editing
maths and the outputs' shapes; a mutation study of the CLI found these values unchecked."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cmfast
from cmfast import edit
from cmfast.cli.edit import main

RES = 16
SMIN, SMAX = 0.002, 80.0


class _Net(torch.nn.Module):
    """F(x, c_noise) = tanh(w x + c_noise): depends on the image and, through c_noise and the scalings, on the level."""

    def __init__(self, channels=3, res=RES):
        super().__init__()
        self.in_channels, self.img_resolution, self.label_dim = channels, res, 0
        self.w = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x, c_noise, class_labels=None):
        return torch.tanh(self.w * x + c_noise.reshape(-1, 1, 1, 1))


@pytest.fixture
def stub(monkeypatch):
    """--pretrained x loads a stub consistency model (3 channels, 16x16 unless changed)."""
    made = {}

    def make(channels=3, res=RES):
        made["model"] = cmfast.ConsistencyModel(_Net(channels, res)).eval()
        return made["model"]
    make()
    monkeypatch.setattr(cmfast, "load_pretrained", lambda name: made["model"])
    return make


@pytest.fixture(autouse=True)
def _threads(one_thread):
    pass


def levels(steps, top=SMAX, rho=7.0):
    """`steps` decreasing levels of the Karras grid of steps + 1 points from top to sigma_min, sigma_min left out."""
    a, b = top ** (1 / rho), SMIN ** (1 / rho)
    return tuple((a + j / steps * (b - a)) ** rho for j in range(steps))


def noise(seed, first, num, shape, draw):
    """Image i's noise of level `draw`: N(0, I) from its own generator, seeded (seed * 1_000_003 + i) * 64 + draw."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed((seed * 1_000_003 + i) * 64 + draw))
                        for i in range(first, first + num)])


def write_inputs(folder, n=3, channels=3, res=RES, seed=0):
    """n PNGs img0..; returns them as (n, C, H, W) in [-1, 1] (what cmfast-edit reads back)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrs = [rng.integers(0, 256, (res, res, channels) if channels == 3 else (res, res), dtype=np.uint8)
            for _ in range(n)]
    for i, a in enumerate(arrs):
        Image.fromarray(a).save(os.path.join(folder, f"img{i}.png"))
    x = torch.stack([torch.from_numpy(a.copy()).float().reshape(res, res, -1).permute(2, 0, 1) for a in arrs])
    return x / 127.5 - 1


def png(path):
    """A written PNG as (C, H, W) in [-1, 1] (gray as 1 channel)."""
    a = np.asarray(Image.open(path), dtype=np.float32)
    t = torch.from_numpy(a.copy())
    return (t[None] if t.dim() == 2 else t.permute(2, 0, 1)) / 127.5 - 1


def close(got, want):
    """Within one 8-bit level (the PNG's rounding, float rounding of a batched evaluation at most)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got - want.clamp(-1, 1)).abs().max().item()
    assert err <= 1.01 / 127.5, err


def tile(grid_png, row, col, res=RES, pad=2):
    y0, x0 = pad + row * (res + pad), pad + col * (res + pad)
    return grid_png[:, y0:y0 + res, x0:x0 + res]


def test_inpaint_defaults_are_20_karras_levels_each_images_own_noise_and_the_central_square(stub, tmp_path):
    """No --steps, --mask or --batch-size: 20 levels of the Karras grid from sigma_max, the central half-size square
    generated, image i's noise from (seed, i, level) whatever batch it falls in; the grid shows the image, the
    image with the generated square at 0 (mid-gray) and the result."""
    x = write_inputs(tmp_path / "in", n=3)
    assert main(["inpaint", "--pretrained", "x", "--input", str(tmp_path / "in"), "--seed", "5", "--batch-size", "2",
                 "--out", str(tmp_path / "o")]) == 0
    mask = torch.ones(1, 1, RES, RES)
    mask[..., 4:12, 4:12] = 0
    sig = levels(20)
    want = edit.inpaint(cmfast.load_pretrained("x"), x, mask, sig,
                        noise=[noise(5, 0, 3, (3, RES, RES), k) for k in range(20)])
    g = png(tmp_path / "o" / "inpaint_grid.png")
    for i in range(3):
        close(png(tmp_path / "o" / f"img{i}_inpaint.png"), want[i])
        close(tile(g, i, 0), x[i])
        close(tile(g, i, 1), x[i] * mask[0])
        close(tile(g, i, 2), want[i])
    assert g.shape == (3, 3 * (RES + 2) + 2, 3 * (RES + 2) + 2)


def test_inpaint_mask_png_white_is_known(stub, tmp_path):
    """--mask: pixels >= 128 are known, < 128 generated (a pixel of 127 is generated)."""
    x = write_inputs(tmp_path / "in", n=1)
    m = np.full((RES, RES), 255, np.uint8)
    m[:, :5] = 0
    m[:, 5:8] = 127
    m[:, 8:10] = 128
    Image.fromarray(m).save(tmp_path / "mask.png")
    assert main(["inpaint", "--pretrained", "x", "--input", str(tmp_path / "in"), "--mask", str(tmp_path / "mask.png"),
                 "--steps", "2", "--out", str(tmp_path / "o")]) == 0
    known = torch.from_numpy(m >= 128).float()[None, None]
    want = edit.inpaint(cmfast.load_pretrained("x"), x, known, levels(2),
                        noise=[noise(0, 0, 1, (3, RES, RES), k) for k in range(2)])
    close(png(tmp_path / "o" / "img0_inpaint.png"), want[0])


@pytest.mark.parametrize("task", ["colorize", "super-resolve"])
def test_colorize_and_super_resolve_defaults_and_their_grids(stub, tmp_path, task):
    """20 default levels and each image's noise (3 channels); the grid's first tiles are the luminance (a weighted
    sum, gray) for colorize, and the image then its 2x2 patch means (nearest-upsampled) for super-resolve."""
    x = write_inputs(tmp_path / "in", n=2)
    argv = [task, "--pretrained", "x", "--input", str(tmp_path / "in"), "--seed", "2", "--out", str(tmp_path / "o")]
    assert main(argv + (["--factor", "2"] if task == "super-resolve" else [])) == 0
    n = [noise(2, 0, 2, (3, RES, RES), k) for k in range(20)]
    model = cmfast.load_pretrained("x")
    g = png(tmp_path / "o" / f"{task}_grid.png")
    if task == "colorize":
        want = edit.colorize(model, x, levels(20), noise=n)
        lum = (x * torch.tensor([0.2989, 0.5870, 0.1140]).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
        befores = [[lum[i].expand(3, -1, -1)] for i in range(2)]
    else:
        want = edit.super_resolve(model, x, 2, levels(20), noise=n)
        means = x.reshape(2, 3, RES // 2, 2, RES // 2, 2).mean((3, 5))
        befores = [[x[i], means[i].repeat_interleave(2, 1).repeat_interleave(2, 2)] for i in range(2)]
    for i in range(2):
        close(png(tmp_path / "o" / f"img{i}_{task}.png"), want[i])
        for j, b in enumerate(befores[i] + [want[i]]):
            close(tile(g, i, j), b)


def test_stroke_defaults_start_at_2_with_two_levels(stub, tmp_path):
    """stroke: --sigma-start 2 and 2 levels by default, the Karras grid from 2 down (the first is the start)."""
    x = write_inputs(tmp_path / "in", n=2)
    assert main(["stroke", "--pretrained", "x", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o")]) == 0
    sig = levels(2, top=2.0)
    want = edit.stroke_guided(cmfast.load_pretrained("x"), x, sig[0], sig[1:],
                              noise=[noise(0, 0, 2, (3, RES, RES), k) for k in range(2)])
    for i in range(2):
        close(png(tmp_path / "o" / f"img{i}_stroke.png"), want[i])
    # --steps with --sigma-start: the grid from that start
    assert main(["stroke", "--pretrained", "x", "--input", str(tmp_path / "in"), "--sigma-start", "5", "--steps", "3",
                 "--seed", "1", "--out", str(tmp_path / "o3")]) == 0
    sig = levels(3, top=5.0)
    want = edit.stroke_guided(cmfast.load_pretrained("x"), x, sig[0], sig[1:],
                              noise=[noise(1, 0, 2, (3, RES, RES), k) for k in range(3)])
    close(png(tmp_path / "o3" / "img1_stroke.png"), want[1])


def test_denoise_adds_sigma_times_each_images_noise(stub, tmp_path):
    """denoise: noisy = image + sigma n (n image i's level-0 noise; --sigma 0.5 by default), result f(noisy, sigma);
    the grid shows image | noisy | result."""
    x = write_inputs(tmp_path / "in", n=2)
    model = cmfast.load_pretrained("x")
    for extra, sigma in (([], 0.5), (["--sigma", "1.5"], 1.5)):
        out = tmp_path / f"o{sigma}"
        assert main(["denoise", "--pretrained", "x", "--input", str(tmp_path / "in"), "--seed", "3", "--out", str(out),
                     *extra]) == 0
        noisy = x + sigma * noise(3, 0, 2, (3, RES, RES), 0)
        with torch.no_grad():
            want = model(noisy, sigma)
        g = png(out / "denoise_grid.png")
        for i in range(2):
            close(png(out / f"img{i}_denoise.png"), want[i])
            close(tile(g, i, 1), noisy[i])


def test_interpolate_defaults_4_pairs_9_alphas_from_the_seeded_generator(stub, tmp_path, capsys):
    """interpolate: 4 pairs (rows) x 9 alphas (columns) by default, one step at sigma_max; the two noises drawn as
    one (2, pairs, C, H, W) randn from a generator seeded --seed; pair<p>_<i>.png is pair p at alpha i / 8."""
    assert main(["interpolate", "--pretrained", "x", "--seed", "4", "--out", str(tmp_path / "o")]) == 0
    assert "wrote 36 images" in capsys.readouterr().out
    g = torch.Generator().manual_seed(4)
    z = torch.randn((2, 4, 3, RES, RES), generator=g)
    want = edit.interpolate(cmfast.load_pretrained("x"), z[0], z[1], [i / 8 for i in range(9)], sigma=SMAX)
    assert len(os.listdir(tmp_path / "o")) == 37
    grid = png(tmp_path / "o" / "interpolate_grid.png")
    for p in range(4):
        for i in range(9):
            close(png(tmp_path / "o" / f"pair{p}_{i}.png"), want[i, p])
            close(tile(grid, p, i), want[i, p])


def test_grid_scale_upscales_the_grid_only(stub, tmp_path, capsys):
    write_inputs(tmp_path / "in", n=1)
    for scale in ("1", "3"):
        assert main(["denoise", "--pretrained", "x", "--input", str(tmp_path / "in"), "--grid-scale", scale,
                     "--out", str(tmp_path / scale)]) == 0
        assert capsys.readouterr().out == f"cmfast-edit: wrote 1 image and denoise_grid.png to {tmp_path / scale}\n"
    small, big = (png(tmp_path / s / "denoise_grid.png") for s in ("1", "3"))
    assert big.shape[1:] == (3 * small.shape[1], 3 * small.shape[2])
    assert torch.equal(big, small.repeat_interleave(3, 1).repeat_interleave(3, 2))
    assert png(tmp_path / "3" / "img0_denoise.png").shape == (3, RES, RES)


class _FakeFashion:
    """What load_fashion_mnist returns, as far as --input fashion-mnist reads it: len() and batch(ids)[0]."""

    def __init__(self, n):
        self.x = torch.linspace(-1, 1, n).reshape(n, 1, 1, 1).expand(n, 1, 32, 32).contiguous()

    def __len__(self):
        return len(self.x)

    def batch(self, ids):
        return self.x[ids], None


def test_fashion_mnist_input_takes_the_first_n_of_a_split(stub, tmp_path, monkeypatch, capsys):
    """--input fashion-mnist[:SPLIT[:N]]: the test split and 8 images by default, up to the whole split; a count
    above the split's size (it was capped there without a word), below 1, or a fourth field refused."""
    stub(1, 32)
    splits = []
    monkeypatch.setattr("cmfast.data.load_fashion_mnist", lambda split: splits.append(split) or _FakeFashion(12))
    cases = (("fashion-mnist", "test", 8), ("fashion-mnist:train", "train", 8), ("fashion-mnist::3", "test", 3),
             ("fashion-mnist:train:12", "train", 12))
    for k, (spec, split, n) in enumerate(cases):
        out = tmp_path / str(k)
        assert main(["denoise", "--pretrained", "x", "--input", spec, "--out", str(out)]) == 0
        assert splits[-1] == split
        assert sorted(os.listdir(out)) == sorted([f"fmnist-{split}-{i:05d}_denoise.png" for i in range(n)] +
                                                 ["denoise_grid.png"])
        assert f"wrote {n} images" in capsys.readouterr().out
    with torch.no_grad():
        want = cmfast.load_pretrained("x")(_FakeFashion(12).x[2:3] + 0.5 * noise(0, 2, 1, (1, 32, 32), 0), 0.5)
    close(png(tmp_path / "3" / "fmnist-train-00002_denoise.png"), want[0])
    for spec, msg in (("fashion-mnist:test:0", "expected a number of images >= 1 after the split, got '0'"),
                      ("fashion-mnist:test:2:x", "expected fashion-mnist[:SPLIT[:N]]"),
                      ("fashion-mnist:train:13", "--input fashion-mnist:train:13: the train split has 12 images; "
                                                 "ask for at most that many")):
        with pytest.raises(SystemExit) as e:
            main(["denoise", "--pretrained", "x", "--input", spec, "--out", str(tmp_path / "bad")])
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_flag_misuse_is_one_line(stub, tmp_path, capsys):
    """--mask is inpaint's, denoise takes no --sigmas, an interpolate needs no --input but the others do, counts are
    integers >= 1, --sigma-start / --sigma outside the model's range are refused: each one line, exit 2."""
    write_inputs(tmp_path / "in", n=1)
    inp = str(tmp_path / "in")
    for argv, msg in ((["denoise", "--input", inp, "--mask", inp], "--mask is only used by inpaint"),
                      (["denoise", "--input", inp, "--sigmas", "1"], "denoise is one step at --sigma"),
                      (["stroke"], "stroke needs --input"),
                      (["interpolate", "--pairs", "0"], "--pairs: expected an integer >= 1, got '0'"),
                      (["interpolate", "--alphas", "x"], "--alphas: expected an integer >= 1, got 'x'"),
                      (["stroke", "--input", inp, "--sigma-start", "81"], "--sigma-start 81.0: expected a level in"),
                      (["denoise", "--input", inp, "--sigma", "0.001"], "--sigma 0.001: expected a level in")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--pretrained", "x", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("cmfast-edit: error: ") and msg in err, err
    assert not (tmp_path / "o").exists()
    # the ends of the ranges are levels of the model
    assert main(["denoise", "--pretrained", "x", "--input", inp, "--sigma", str(SMIN), "--out", str(tmp_path / "a")]) \
        == 0
    assert main(["stroke", "--pretrained", "x", "--input", inp, "--sigma-start", str(SMAX), "--steps", "1",
                 "--out", str(tmp_path / "b")]) == 0
    assert math.isclose(levels(1, top=SMAX)[0], SMAX)


def test_interpolate_with_steps_samples_each_point_over_the_karras_levels(stub, tmp_path):
    """interpolate --steps 2: Algorithm 1 over two Karras levels from sigma_max, its later noise drawn by the same
    generator after the two noises (one step at sigma_max only passed the default run)."""
    assert main(["interpolate", "--pretrained", "x", "--pairs", "1", "--alphas", "2", "--steps", "2", "--seed", "6",
                 "--out", str(tmp_path / "o")]) == 0
    g = torch.Generator().manual_seed(6)
    z = torch.randn((2, 1, 3, RES, RES), generator=g)
    want = edit.interpolate(cmfast.load_pretrained("x"), z[0], z[1], [0.0, 1.0], sigmas=levels(2), generator=g)
    for i in range(2):
        close(png(tmp_path / "o" / f"pair0_{i}.png"), want[i, 0])


def test_super_resolve_factor_4_shows_the_4x4_patch_means(stub, tmp_path):
    """--factor 4: the result is edit.super_resolve at factor 4 and the grid's second tile the 4x4 patch means,
    nearest-upsampled (factor 2 alone was tested, which the grid's pooling also took when fixed at 2)."""
    x = write_inputs(tmp_path / "in", n=1)
    assert main(["super-resolve", "--pretrained", "x", "--input", str(tmp_path / "in"), "--factor", "4", "--steps", "2",
                 "--out", str(tmp_path / "o")]) == 0
    want = edit.super_resolve(cmfast.load_pretrained("x"), x, 4, levels(2),
                              noise=[noise(0, 0, 1, (3, RES, RES), k) for k in range(2)])
    means = x.reshape(1, 3, RES // 4, 4, RES // 4, 4).mean((3, 5)).repeat_interleave(4, 2).repeat_interleave(4, 3)
    g = png(tmp_path / "o" / "super-resolve_grid.png")
    close(tile(g, 0, 1), means[0])
    close(tile(g, 0, 2), want[0])
    close(png(tmp_path / "o" / "img0_super-resolve.png"), want[0])


def test_fashion_mnist_input_for_an_rgb_model_is_the_gray_image_repeated(stub, tmp_path, monkeypatch):
    """inpaint --input fashion-mnist with a 3-channel model: the 1-channel images are repeated to RGB, as a gray PNG
    is read (colorize takes either; inpaint refused the gray batch)."""
    stub(3, 32)
    monkeypatch.setattr("cmfast.data.load_fashion_mnist", lambda split: _FakeFashion(4))
    assert main(["inpaint", "--pretrained", "x", "--input", "fashion-mnist::2", "--steps", "1",
                 "--out", str(tmp_path / "o")]) == 0
    rgb = _FakeFashion(4).x[:2].expand(-1, 3, -1, -1)
    mask = torch.ones(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 0
    want = edit.inpaint(cmfast.load_pretrained("x"), rgb, mask, levels(1), noise=[noise(0, 0, 2, (3, 32, 32), 0)])
    for i in range(2):
        close(png(tmp_path / "o" / f"fmnist-test-{i:05d}_inpaint.png"), want[i])


def test_checkpoint_loads_the_asked_weights_onto_the_device(stub, tmp_path, monkeypatch):
    """--checkpoint with --which model: load_model gets those weights and --device (its map_location)."""
    seen = []
    monkeypatch.setattr("cmfast.training.checkpoint.load_model", lambda path, **k: seen.append((path, k)) or
                        (cmfast.load_pretrained("x"), {}))
    write_inputs(tmp_path / "in", n=1)
    assert main(["denoise", "--checkpoint", str(tmp_path), "--which", "model", "--device", "cpu", "--input",
                 str(tmp_path / "in"), "--out", str(tmp_path / "o")]) == 0
    assert seen == [(str(tmp_path), dict(which="model", map_location="cpu"))]


def test_missing_factor_and_fashion_mnist_for_another_resolution_are_one_line(stub, tmp_path, monkeypatch, capsys):
    """super-resolve without --factor, and --input fashion-mnist (32x32) for a 16x16 model, are refused with their own
    line before anything is written."""
    write_inputs(tmp_path / "in", n=1)
    monkeypatch.setattr("cmfast.data.load_fashion_mnist", lambda split: _FakeFashion(4))
    for argv, msg in ((["super-resolve", "--input", str(tmp_path / "in")], "super-resolve needs --factor"),
                      (["denoise", "--input", "fashion-mnist"], "--input fashion-mnist: 32x32 images, the model takes "
                                                                "16x16")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--pretrained", "x", "--out", str(tmp_path / "o")])
        assert e.value.code == 2 and capsys.readouterr().err == f"cmfast-edit: error: {msg}\n"
    assert not (tmp_path / "o").exists()
