"""Zero-shot editing (CM paper Algorithm 4), cmfast-edit and the figure script, on a random-weight tiny UNet."""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cmfast
from cmfast import edit
from cmfast.data import FMNIST_SYSTEM_DIR

RES = 16
SIGMAS = (80.0, 2.0)
LUM = torch.tensor([0.2989, 0.5870, 0.1140]).reshape(1, 3, 1, 1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny", img_resolution=RES)).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, RES, RES, generator=g) * 2 - 1


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- Tasks keep their known content -----------------------------------------------------------------------------
class Counted:
    """Any callable f(x, sigma) with sigma_min / sigma_max will do (a compiled model, say); counts evaluations."""

    def __init__(self, model):
        self.model, self.sigma_min, self.sigma_max, self.calls = model, model.sigma_min, model.sigma_max, 0
        self.net = model.net

    def __call__(self, x, sigma):
        self.calls += 1
        return self.model(x, sigma)


def test_inpaint_matches_algorithm_4_and_keeps_known_pixels_exactly(model, images):
    mask = (torch.rand(2, 1, RES, RES, generator=gen(2)) < 0.5).float()
    f = Counted(model)
    out = edit.inpaint(f, images, mask, SIGMAS, gen())
    assert f.calls == len(SIGMAS)
    g = gen()               # Algorithm 4 with A = I, Omega = 1 - mask, written from the paper
    with torch.no_grad():
        x = images * mask + SIGMAS[0] * torch.randn(images.shape, generator=g)
        x = images * mask + model(x, SIGMAS[0]).clamp(-1, 1) * (1 - mask)
        x = x + math.sqrt(SIGMAS[1] ** 2 - 0.002 ** 2) * torch.randn(images.shape, generator=g)
        ref = images * mask + model(x, SIGMAS[1]).clamp(-1, 1) * (1 - mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    known = mask.expand_as(images).bool()
    assert torch.equal(out[known], images[known])
    assert (out[~known] - images[~known]).abs().max() > 0.1          # the rest was generated
    assert out.min() >= -1 and out.max() <= 1


def test_colorize_keeps_luminance(model, images):
    gray = images[:, :1]
    out = edit.colorize(model, gray, SIGMAS, gen())
    assert out.shape == (2, 3, RES, RES) and out.min() >= -1 and out.max() <= 1
    # gray g repeated to RGB has luminance (0.2989 + 0.5870 + 0.1140) g = 0.9999 g
    torch.testing.assert_close((out * LUM).sum(1, keepdim=True), 0.9999 * gray, rtol=0, atol=2e-6)
    assert (out[:, 0] - out[:, 2]).abs().max() > 0.05                # coloured, not gray
    rgb = edit.colorize(model, images, (80.0,), gen())                # an RGB input keeps its own luminance
    torch.testing.assert_close((rgb * LUM).sum(1), (images * LUM).sum(1), rtol=0, atol=2e-6)
    assert rgb.min() >= -1 and rgb.max() <= 1


@pytest.mark.parametrize("factor", [2, 4])
def test_super_resolve_keeps_patch_means(model, images, factor):
    out = edit.super_resolve(model, images, factor, SIGMAS, gen())
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(F.avg_pool2d(out, factor), F.avg_pool2d(images, factor), rtol=0, atol=1e-6)
    blocky = F.avg_pool2d(images, factor).repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    assert (out - blocky).abs().max() > 0.05


def test_super_resolve_low_res_input_is_its_patch_means(model, images):
    low = F.avg_pool2d(images, 4)
    full = low.repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert torch.equal(edit.super_resolve(model, low, 4, (80.0,), gen()),
                       edit.super_resolve(model, full, 4, (80.0,), gen()))


class _Stub:
    """A deterministic f(x, sigma) whose outputs leave [-1, 1] often (so the final box fit is exercised)."""
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        self.W = torch.randn(3, 3, generator=gen(3), dtype=torch.float64)

    def __call__(self, x, sigma):
        sd, xd = 0.5, x.double()
        c_skip = sd ** 2 / ((sigma - 0.002) ** 2 + sd ** 2)
        c_out = sd * (sigma - 0.002) / math.sqrt(sigma ** 2 + sd ** 2)
        h = xd / math.sqrt(sigma ** 2 + sd ** 2)
        return (c_skip * xd + c_out * (1.7 * torch.tanh(2 * torch.einsum("bchw,cd->bdhw", h, self.W))
                                       + 0.3 * torch.roll(h, 1, -1))).to(x.dtype)


def _gram_schmidt(v):
    """Orthonormal columns, the first v / |v| (float64, independent of cmfast's QR)."""
    cols = [v / v.norm()]
    for e in torch.eye(v.numel(), dtype=torch.float64):
        for c in cols:
            e = e - (c @ e) * c
        if e.norm() > 1e-8 and len(cols) < v.numel():
            cols.append(e / e.norm())
    return torch.stack(cols, 1)


def _project(x, w, c):
    """Nearest z in [-1, 1]^n with w.z = c, over the last axis: z = clamp(x + lam w), lam by bisection (float64)."""
    lo, hi = torch.full(c.shape, -1e3, dtype=torch.float64), torch.full(c.shape, 1e3, dtype=torch.float64)
    for _ in range(200):
        mid = (lo + hi) / 2
        below = (torch.clamp(x + mid[..., None] * w, -1, 1) * w).sum(-1) < c
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return torch.clamp(x + ((lo + hi) / 2)[..., None] * w, -1, 1)


@pytest.mark.parametrize("task", ["colorize", "super-resolve 2", "super-resolve 4"])
def test_colorize_and_super_resolve_match_float64_transcription(task):
    """Algorithm 4 written again in float64 (Gram-Schmidt bases, the paper's replacement line, clamped f), then each
    group that left [-1, 1] projected onto the box keeping its known coefficient: cmfast agrees to float32 rounding."""
    f, sig = _Stub(), (80.0, 5.0, 0.01)        # 0.01: sqrt(s^2 - sigma_min^2) differs from s by 2e-4
    y = torch.rand(2, 3, 8, 8, generator=gen(1)) * 2 - 1
    if task == "colorize":
        w = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float64)
        Q = _gram_schmidt(w)
        to_groups = lambda x: x.permute(0, 2, 3, 1)                     # (..., 3): a pixel's channels
        from_groups = lambda p: p.permute(0, 3, 1, 2)
        y, out = y[:, :1].expand(-1, 3, -1, -1), edit.colorize(f, y[:, :1], sig, gen())
    else:
        k = int(task.split()[1])
        Q = _gram_schmidt(torch.ones(k * k, dtype=torch.float64))
        to_groups = lambda x: x.reshape(2, 3, 8 // k, k, 8 // k, k).permute(0, 1, 2, 4, 3, 5).reshape(
            2, 3, 8 // k, 8 // k, k * k)
        from_groups = lambda p: p.reshape(2, 3, 8 // k, 8 // k, k, k).permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 8, 8)
        out = edit.super_resolve(f, y, k, sig, gen())
    A, A_inv = lambda x: to_groups(x) @ Q, lambda c: from_groups(c @ Q.T)
    keep = torch.zeros(Q.shape[0], dtype=torch.float64)
    keep[0] = 1
    g, yd = gen(), y.double()
    x = A_inv(A(yd) * keep)
    for i, s in enumerate(sig):
        x = x + (s if i == 0 else math.sqrt(s * s - 0.002 ** 2)) * torch.randn(y.shape, generator=g).double()
        x = A_inv(A(yd) * keep + A(f(x, s).clamp(-1, 1)) * (1 - keep))
    groups = to_groups(x)
    outside = (groups.abs() > 1).any(-1, keepdim=True)
    assert outside.sum() > 5                                              # the box fit is exercised
    ref = from_groups(torch.where(outside, _project(groups, Q[:, 0], (to_groups(yd) * Q[:, 0]).sum(-1)), groups))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)


def test_kept_content_exact_under_autocast(model, images):
    """The backbone runs in bf16 under the caller's autocast; the transforms A, A^-1 must not (bf16 matmuls left the
    kept luminance off by 7e-3 and patch means by 1e-3, and returned bf16 images)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        col = edit.colorize(model, images[:, :1], SIGMAS, gen())
        sr = edit.super_resolve(model, images, 4, SIGMAS, gen())
    assert col.dtype == sr.dtype == torch.float32
    torch.testing.assert_close((col * LUM).sum(1, keepdim=True), 0.9999 * images[:, :1], rtol=0, atol=2e-6)
    torch.testing.assert_close(F.avg_pool2d(sr, 4), F.avg_pool2d(images, 4), rtol=0, atol=1e-6)


def test_fit_box_moves_only_out_of_range_groups():
    # colour basis, a kept luminance beside a saturated colour: the fitted pixel keeps Y and lies in [-1, 1]
    Q = edit.luminance_basis()
    A = lambda x: torch.einsum("bchw,cd->bdhw", x, Q)
    A_inv = lambda c: torch.einsum("bdhw,cd->bchw", c, Q)
    known = torch.tensor([1.0, 0, 0]).reshape(1, 3, 1, 1)
    x = torch.tensor([[1.6, 0.2, -0.3], [0.1, 0.2, 0.3]]).T.reshape(1, 3, 1, 2)
    kept = A(x) * known
    out = edit._fit_box(x, kept, A, A_inv, known)
    assert out.abs().max() <= 1
    torch.testing.assert_close((out * LUM).sum(1), (x * LUM).sum(1), rtol=0, atol=1e-6)
    assert torch.equal(out[..., 1], x[..., 1])                       # an in-range pixel is untouched
    # nearest point: out = clamp(x + lam w) for one lam >= 0 (KKT of the projection)
    lam = (out[0, 1:, 0, 0] - x[0, 1:, 0, 0]) / torch.tensor(edit.LUMINANCE[1:])
    torch.testing.assert_close(lam[0], lam[1], rtol=1e-4, atol=1e-6)


# ---- Bases ------------------------------------------------------------------------------------------------------
def test_luminance_basis_orthonormal():
    Q = edit.luminance_basis().double()
    torch.testing.assert_close(Q @ Q.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)
    w = np.array([0.2989, 0.5870, 0.1140])
    np.testing.assert_allclose(Q[:, 0].numpy(), w / np.linalg.norm(w), atol=1e-7)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_patch_basis_orthonormal(k):
    Q = edit.patch_basis(k).double()
    torch.testing.assert_close(Q @ Q.T, torch.eye(k * k, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(Q[:, 0], torch.full((k * k,), 1 / k, dtype=torch.float64), rtol=0, atol=1e-7)


# ---- Sampling-side tasks against plain references ---------------------------------------------------------------
def test_same_generator_same_output(model, images):
    mask = torch.ones(1, 1, RES, RES)
    mask[..., 4:12, 4:12] = 0
    a = edit.inpaint(model, images, mask, SIGMAS, gen(5))
    assert torch.equal(a, edit.inpaint(model, images, mask, SIGMAS, gen(5)))
    assert not torch.equal(a[:1], edit.inpaint(model, images[:1], mask, (80.0,), gen(6)))


def test_denoise_is_one_evaluation(model, images):
    noisy = images + 0.7 * torch.randn(images.shape, generator=gen(3))
    with torch.no_grad():
        assert torch.equal(edit.denoise(model, noisy, 0.7), model(noisy, 0.7))


def test_stroke_guided_matches_sdedit_reference(model, images):
    g = gen(4)
    with torch.no_grad():   # SDEdit: noise the strokes to sigma_start, then Algorithm 1 with clamped outputs
        x = model(images + 3.0 * torch.randn(images.shape, generator=g), 3.0).clamp(-1, 1)
        n = torch.randn(images.shape, generator=g)
        ref = model(x + math.sqrt(0.5 ** 2 - 0.002 ** 2) * n, 0.5).clamp(-1, 1)
    torch.testing.assert_close(edit.stroke_guided(model, images, 3.0, (0.5,), gen(4)), ref, rtol=0, atol=0)


def test_interpolate_endpoints_are_samples(model):
    z0, z1 = torch.randn(2, 2, 3, RES, RES, generator=gen(7))
    out = edit.interpolate(model, z0, z1, [0.0, 0.5, 1.0])
    assert out.shape == (3, 2, 3, RES, RES)
    torch.testing.assert_close(out[0], cmfast.sample(model, z0), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2], cmfast.sample(model, z1), rtol=0, atol=1e-5)
    two = edit.interpolate(model, z0, z1, [1.0], sigmas=SIGMAS, generator=gen(8))[0]
    torch.testing.assert_close(two, cmfast.sample(model, z1, SIGMAS, gen(8)), rtol=0, atol=1e-5)


def test_interpolate_multistep_shares_the_later_noise_across_alphas(model):
    """Algorithm 1's later noise is drawn once per pair and level and used at every alpha: both endpoints are the
    samples of z0 and z1 with that same noise (a draw per alpha made neighbouring alphas' images jump)."""
    z0, z1 = torch.randn(2, 2, 3, RES, RES, generator=gen(7))
    out = edit.interpolate(model, z0, z1, [0.0, 0.5, 1.0], sigmas=SIGMAS, generator=gen(8))
    g = gen(8)
    later = [torch.randn(z0.shape, generator=g) for _ in SIGMAS[1:]]
    torch.testing.assert_close(out[0], cmfast.sample(model, z0, SIGMAS, noise=later), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2], cmfast.sample(model, z1, SIGMAS, noise=later), rtol=0, atol=1e-5)
    assert (out[0] - out[2]).abs().max() > 1e-4          # (the endpoints are different images)


def test_slerp_against_formula():
    u, v = torch.randn(2, 1, 48, generator=gen(9), dtype=torch.float64)
    th = math.acos(float((u * v).sum() / (u.norm() * v.norm())))
    ref = (math.sin(0.3 * th) * u + math.sin(0.7 * th) * v) / math.sin(th)
    torch.testing.assert_close(edit.slerp(u, v, [0.7])[0], ref, rtol=1e-12, atol=1e-12)


# ---- Bad inputs -------------------------------------------------------------------------------------------------
def test_bad_inputs(model, images):
    m1 = cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny", img_resolution=RES, in_channels=1))
    ok = torch.ones(1, 1, RES, RES)
    cases = [
        (lambda: edit.inpaint(model, images, torch.ones(1, 1, 8, 8), SIGMAS), "mask: expected shape"),
        (lambda: edit.inpaint(model, images, torch.ones(3, 1, RES, RES), SIGMAS), "mask: expected shape"),
        (lambda: edit.inpaint(model, images, ok * 0.5, SIGMAS), "mask: expected binary"),
        (lambda: edit.super_resolve(model, images, 3, SIGMAS), "factor: expected a divisor"),
        (lambda: edit.super_resolve(model, images, 0, SIGMAS), "factor: expected an integer"),
        (lambda: edit.colorize(m1, images[:, :1], SIGMAS), "3-channel"),
        (lambda: edit.stroke_guided(model, images, 100.0, ()), "sigma_start"),
        (lambda: edit.stroke_guided(model, images, 2.0, (5.0,)), "below sigma_start"),
        (lambda: edit.inpaint(model, images, ok, (2.0, 80.0)), "strictly decreasing"),
        (lambda: edit.inpaint(model, images * 1.5, ok, SIGMAS), r"values in \[-1, 1\]"),
        (lambda: edit.inpaint(model, images[..., :8, :8], ok, SIGMAS), "for this model"),
        (lambda: edit.colorize(model, images[:, :2], SIGMAS), "for this model"),
        (lambda: edit.denoise(model, images[0], 1.0), r"\(B, C, H, W\)"),
        (lambda: edit.denoise(model, images, 200.0), "sigma: expected noise levels <= sigma_max = 80.0, got 200"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


def test_wrong_device_is_a_clear_error(model, images):
    """Images on another device than the model, or a generator on another than the images, raised a RuntimeError
    from inside the network or torch.randn; now a ValueError naming both devices (a 'meta' model stands in for a
    CUDA one on a CPU-only machine)."""
    import copy
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match="images: expected a tensor on meta .the model's device., got one on cpu"):
        edit.inpaint(meta, images, torch.ones(1, 1, RES, RES), SIGMAS)
    with pytest.raises(ValueError, match="noisy: expected a tensor on meta"):
        edit.denoise(meta, images, 0.5)
    z = torch.zeros(1, 3, RES, RES, device="meta")
    with pytest.raises(ValueError, match="generator: expected a torch.Generator on meta .the images' device., got "
                                         "one on cpu"):
        edit.interpolate(meta, z, z, [0.5], sigmas=SIGMAS, generator=gen())
    with pytest.raises(ValueError, match="z1: expected a tensor on z0's device"):
        edit.interpolate(model, images[:1], z, [0.5])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_editing_on_cuda(model, images):
    import copy
    m, x = copy.deepcopy(model).cuda(), images.cuda()
    cg = lambda: torch.Generator("cuda").manual_seed(0)
    mask = (torch.rand(2, 1, RES, RES, generator=gen(2)) < 0.5).float().cuda()
    out = edit.inpaint(m, x, mask, SIGMAS, cg())
    known = mask.expand_as(x).bool()
    assert out.is_cuda and torch.equal(out[known], x[known]) and out.abs().max() <= 1
    assert torch.equal(out, edit.inpaint(m, x, mask, SIGMAS, cg()))
    col = edit.colorize(m, x[:, :1], SIGMAS, cg())
    torch.testing.assert_close((col * LUM.cuda()).sum(1, keepdim=True), 0.9999 * x[:, :1], rtol=0, atol=2e-6)
    sr = edit.super_resolve(m, x, 4, SIGMAS, cg())
    torch.testing.assert_close(F.avg_pool2d(sr, 4), F.avg_pool2d(x, 4), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="images: expected a tensor on cuda:0 .the model's device., got one on cpu"):
        edit.inpaint(m, images, mask.cpu(), SIGMAS)
    with pytest.raises(ValueError, match="generator: expected a torch.Generator on cuda"):
        edit.colorize(m, x[:, :1], SIGMAS, gen())


# ---- CLI --------------------------------------------------------------------------------------------------------
def _write_png(path, arr):
    from PIL import Image
    Image.fromarray(arr).save(path)


@pytest.fixture
def cli_env(model, tmp_path):
    """A checkpoint written with cmfast.training.checkpoint.save_checkpoint and read back by cmfast-edit through
    load_model."""
    from cmfast.nets import preset_config
    from cmfast.training.checkpoint import save_checkpoint
    cfg = dict(method="ict", net=preset_config("tiny", img_resolution=RES), sigma_data=0.5, sigma_min=0.002,
               sigma_max=80.0)
    (tmp_path / "run").mkdir()
    ckpt = save_checkpoint(str(tmp_path / "run"), 1, {"ema": model.state_dict(), "model": model.state_dict()}, cfg, {})
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        _write_png(inp / f"img{i}.png", rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8))
    return str(ckpt), inp, tmp_path


def test_cli_inpaint_end_to_end(cli_env):
    from PIL import Image
    from cmfast.cli.edit import main
    ckpt, inp, tmp = cli_env
    mask = np.full((RES, RES), 255, np.uint8)
    mask[:, RES // 2:] = 0
    _write_png(tmp / "mask.png", mask)
    assert main(["inpaint", "--checkpoint", ckpt, "--input", str(inp), "--mask", str(tmp / "mask.png"),
                 "--steps", "2", "--seed", "1", "--out", str(tmp / "out")]) == 0
    for i in range(2):
        res = np.asarray(Image.open(tmp / "out" / f"img{i}_inpaint.png"))
        src = np.asarray(Image.open(inp / f"img{i}.png"))
        assert res.shape == (RES, RES, 3)
        assert np.array_equal(res[:, :RES // 2], src[:, :RES // 2])   # known half survives the uint8 round trip
    g = Image.open(tmp / "out" / "inpaint_grid.png")
    assert g.size == (3 * (RES + 2) + 2, 2 * (RES + 2) + 2)              # original | masked | result, 2 rows


def test_cli_input_folder_skips_appledouble_files(cli_env):
    # a folder copied off a Mac holds ._img0.png resource forks: the edit stopped on them as unreadable PNGs
    from cmfast.cli.edit import main
    ckpt, inp, tmp = cli_env
    (inp / "._img0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    assert main(["denoise", "--checkpoint", ckpt, "--input", str(inp), "--out", str(tmp / "out")]) == 0
    assert sorted(os.listdir(tmp / "out")) == ["denoise_grid.png", "img0_denoise.png", "img1_denoise.png"]


def test_cli_super_resolve_and_interpolate(cli_env):
    from PIL import Image
    from cmfast.cli.edit import main
    ckpt, inp, tmp = cli_env
    _write_png(tmp / "low.png", np.zeros((RES // 2, RES // 2, 3), np.uint8) + 200)
    assert main(["super-resolve", "--checkpoint", ckpt, "--input", str(tmp / "low.png"), "--factor", "2",
                 "--steps", "1", "--out", str(tmp / "sr"), "--grid-scale", "2"]) == 0
    res = np.asarray(Image.open(tmp / "sr" / "low_super-resolve.png")).astype(np.float64)
    assert np.abs(res.reshape(RES // 2, 2, RES // 2, 2, 3).mean((1, 3)) - 200).max() <= 0.5   # patch means, 8-bit
    # low-res (nearest) | result, one row, upscaled 2x
    assert Image.open(tmp / "sr" / "super-resolve_grid.png").size == (2 * (2 * (RES + 2) + 2), 2 * (RES + 4))
    assert main(["interpolate", "--checkpoint", ckpt, "--pairs", "2", "--alphas", "3", "--out", str(tmp / "it")]) == 0
    assert len(os.listdir(tmp / "it")) == 2 * 3 + 1
    assert Image.open(tmp / "it" / "interpolate_grid.png").size == (3 * (RES + 2) + 2, 2 * (RES + 2) + 2)


def test_cli_pretrained_colorize_stroke_denoise(cli_env, model, monkeypatch):
    from PIL import Image
    from cmfast.cli.edit import main
    _, inp, tmp = cli_env
    monkeypatch.setattr(cmfast, "load_pretrained", lambda name: model)
    assert main(["colorize", "--pretrained", "x", "--input", str(inp / "img0.png"), "--steps", "1",
                 "--out", str(tmp / "c")]) == 0
    y = lambda a: a.astype(np.float64) @ np.array([0.2989, 0.5870, 0.1140])
    src, res = (np.asarray(Image.open(p)) for p in (inp / "img0.png", tmp / "c" / "img0_colorize.png"))
    assert np.abs(y(res) - y(src)).max() <= 0.5 + 1e-6              # 8-bit rounding of each channel only
    assert Image.open(tmp / "c" / "colorize_grid.png").size == (2 * (RES + 2) + 2, RES + 4)
    for task, cols in (("stroke", 2), ("denoise", 3)):
        assert main([task, "--pretrained", "x", "--input", str(inp), "--steps", "1", "--out", str(tmp / task)]) == 0
        assert sorted(os.listdir(tmp / task)) == sorted([f"img0_{task}.png", f"img1_{task}.png", f"{task}_grid.png"])
        assert Image.open(tmp / task / f"{task}_grid.png").size == (cols * (RES + 2) + 2, 2 * (RES + 2) + 2)


def test_cli_output_does_not_depend_on_batch_size(cli_env):
    """--batch-size is a performance knob: each image's noise is its own (seed, index, level). One generator drawing
    batch after batch gave other images for another --batch-size (up to 220 gray levels apart)."""
    from PIL import Image
    from cmfast.cli.edit import main
    ckpt, inp, tmp = cli_env
    for task in ("inpaint", "denoise"):
        for bs in (1, 2):
            assert main([task, "--checkpoint", ckpt, "--input", str(inp), "--steps", "2" if task == "inpaint" else "1",
                         "--seed", "3", "--batch-size", str(bs), "--out", str(tmp / f"{task}{bs}")]) == 0
        for i in range(2):
            a, b = (np.asarray(Image.open(tmp / f"{task}{bs}" / f"img{i}_{task}.png")).astype(int) for bs in (1, 2))
            assert np.abs(a - b).max() <= 1          # float rounding of a batched convolution at most


def test_noise_argument_makes_images_independent_of_their_batch(model, images):
    """noise= (one tensor per level, shaped like the output) replaces the generator: image i of a batch is the image
    edited alone with its slice of the noise."""
    n = [torch.randn(images.shape, generator=gen(k)) for k in range(2)]
    mask = torch.ones(1, 1, RES, RES)
    mask[..., 4:12, 4:12] = 0
    for fn in (lambda x, z: edit.inpaint(model, x, mask, SIGMAS, noise=z),
               lambda x, z: edit.super_resolve(model, x, 4, SIGMAS, noise=z),
               lambda x, z: edit.stroke_guided(model, x, 3.0, (0.5,), noise=z)):
        both = fn(images, n)
        for i in range(2):
            torch.testing.assert_close(both[i:i + 1], fn(images[i:i + 1], [z[i:i + 1] for z in n]), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"noise: expected 2 tensor\(s\) shaped \(2, 3, 16, 16\), one per level"):
        edit.inpaint(model, images, mask, SIGMAS, noise=n[:1])


@pytest.mark.parametrize("args, msg", [
    (["inpaint", "--checkpoint", "MISSING", "--input", "IN"], "checkpoint not found"),
    (["inpaint", "--input", "SMALL"], "expected 16x16 pixels"),
    (["inpaint", "--input", "IN", "--mask", "SMALL"], "expected 16x16 pixels"),
    (["super-resolve", "--input", "SMALL", "--factor", "3"], "expected 16x16 or 5x5"),
    (["super-resolve", "--input", "IN", "--factor", "3"], "factor: expected a divisor"),
    (["super-resolve", "--input", "MIXED", "--factor", "2"],
     "expected PNGs of one size, got 16x16 (a.png) and 8x8 (b.png)"),
    (["colorize"], "needs --input"),
    (["stroke", "--input", "IN", "--sigmas", "2,5"], "below sigma_start"),
    (["denoise", "--input", "IN", "--sigmas", "x"], "comma-separated"),
    (["blur", "--input", "IN"], "invalid choice"),
    (["denoise", "--pretrained", "no-such-model", "--input", "IN"], "no shipped model"),
])
def test_cli_bad_input_exits_2(cli_env, capsys, args, msg):
    from cmfast.cli.edit import main
    ckpt, inp, tmp = cli_env
    _write_png(tmp / "small.png", np.zeros((8, 8), np.uint8))
    if "--checkpoint" not in args and "--pretrained" not in args:
        args = args + ["--checkpoint", ckpt]
    (tmp / "mixed").mkdir()
    _write_png(tmp / "mixed" / "a.png", np.zeros((RES, RES), np.uint8))
    _write_png(tmp / "mixed" / "b.png", np.zeros((RES // 2, RES // 2), np.uint8))
    subst = {"IN": str(inp), "SMALL": str(tmp / "small.png"), "MISSING": str(tmp / "nope.pt"),
             "MIXED": str(tmp / "mixed")}
    with pytest.raises(SystemExit) as e:
        main([subst.get(a, a) for a in args] + ["--out", str(tmp / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmfast-edit: error: ") and msg in err and "\n" not in err


# ---- Class-conditional models (the CM paper's ImageNet 64 ones) ------------------------------------------------
def test_class_conditional_model_edits_with_a_label(images, tmp_path, capsys):
    """with_class makes a conditional model the one-callable model the tasks take: the label reaches the network,
    the known pixels stay exact; cmfast-edit asks for --class instead of failing inside the network."""
    torch.manual_seed(0)
    cond = cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny", img_resolution=RES, label_dim=3)).eval()
    with torch.no_grad():
        for p in cond.net.parameters():
            p.normal_(0, 0.3)
    mask = torch.zeros(1, 1, RES, RES)
    mask[..., :, : RES // 2] = 1
    a = cmfast.edit.inpaint(cmfast.edit.with_class(cond, 0), images, mask, SIGMAS, gen())
    b = cmfast.edit.inpaint(cmfast.edit.with_class(cond, 2), images, mask, SIGMAS, gen())
    assert torch.equal(a[..., : RES // 2], images[..., : RES // 2]) and (a - b).abs().max() > 1e-2
    z = torch.randn(1, 3, RES, RES)
    ends = cmfast.edit.interpolate(cmfast.edit.with_class(cond, 1), z, z, [0.0], sigma=80.0)
    torch.testing.assert_close(ends[0], cond(80.0 * z, 80.0, torch.tensor([1])))
    for bad, match in ((lambda: cmfast.edit.with_class(cond, 3), "0 <= label < 3"),
                       (lambda: cmfast.edit.with_class(cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny")), 0),
                        "unconditional")):
        with pytest.raises(ValueError, match=match):
            bad()
    with pytest.raises(TypeError, match=r"^class label: expected an integer class index, got 1\.5$"):
        cmfast.edit.with_class(cond, 1.5)                                   # was class 1 without a word
    assert cmfast.edit.with_class(cond, np.int64(2)).label == cmfast.edit.with_class(cond, torch.tensor(2)).label == 2
    from cmfast.cli.edit import main
    from cmfast.nets import preset_config
    from cmfast.training.checkpoint import save_checkpoint
    cfg = dict(method="ict", net=preset_config("tiny", img_resolution=RES, label_dim=3), sigma_data=0.5,
               sigma_min=0.002, sigma_max=80.0)
    ckpt = save_checkpoint(str(tmp_path), 1, {"ema": cond.state_dict()}, cfg, {})
    inp = tmp_path / "in"
    inp.mkdir()
    _write_png(inp / "a.png", np.zeros((RES, RES, 3), np.uint8))
    with pytest.raises(SystemExit):
        main(["inpaint", "--checkpoint", ckpt, "--input", str(inp), "--out", str(tmp_path / "o")])
    assert "class-conditional (3 classes): pass --class" in capsys.readouterr().err
    assert main(["inpaint", "--checkpoint", ckpt, "--input", str(inp), "--class", "2", "--steps", "1",
                 "--out", str(tmp_path / "o")]) == 0


def test_cli_refuses_an_edm_teacher_except_to_denoise(model, tmp_path, capsys):
    # An EDM checkpoint was edited with Algorithm 4 as if it were a consistency model, without a word.
    from cmfast.cli.edit import main
    from cmfast.nets import preset_config
    from cmfast.training.checkpoint import save_checkpoint
    cfg = dict(method="edm", net=preset_config("tiny", img_resolution=RES), sigma_data=0.5, sigma_min=0.002,
               sigma_max=80.0)
    ckpt = save_checkpoint(str(tmp_path), 1, {"ema": model.state_dict()}, cfg, {})
    inp = tmp_path / "in"
    inp.mkdir()
    _write_png(inp / "a.png", np.zeros((RES, RES, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        main(["inpaint", "--checkpoint", ckpt, "--input", str(inp), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "an EDM teacher is a denoiser, not a consistency model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["denoise", "--checkpoint", ckpt, "--input", str(inp), "--out", str(tmp_path / "o")]) == 0


# ---- Figure script ----------------------------------------------------------------------------------------------
def test_make_edit_figures_runs(model, tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_edit_figures.py")
    spec = importlib.util.spec_from_file_location("make_edit_figures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not os.path.exists(mod.FMNIST_TEST):
        pytest.skip(f"Fashion-MNIST test images not installed at {mod.FMNIST_TEST}")
    x = mod.fmnist_test_images(3)
    assert x.shape == (3, 1, 32, 32) and x.min() == -1 and torch.all(x[..., :2, :] == -1)
    written = mod.make_figures(model, str(tmp_path), num=2, steps=1, factor=2, scale=1)
    assert [os.path.basename(p) for p in written] == [f"edit_{t}.png" for t in
                                                      ("inpaint", "colorize", "super_resolve", "stroke",
                                                       "interpolate", "denoise")]
    from PIL import Image
    assert Image.open(written[0]).size == (3 * (RES + 2) + 2, 2 * (RES + 2) + 2)


@pytest.mark.skipif(not os.path.isdir(FMNIST_SYSTEM_DIR), reason="needs the Debian package dataset-fashion-mnist")
def test_cli_edits_fashion_mnist_test_images(tmp_path, capsys):
    """--input fashion-mnist:test:N edits the split's first N images, padded to 32x32 as in training, without PNGs
    made first: the shipped model denoises them (sigma 0.5) to within 0.2 mean absolute error of the originals
    (measured 0.04-0.13; neighbouring test images differ by 0.18-0.64)."""
    from PIL import Image

    from cmfast.cli.edit import main as edit_main
    from cmfast.data import load_fashion_mnist
    out = tmp_path / "dn"
    assert edit_main(["denoise", "--pretrained", "fmnist", "--input", "fashion-mnist:test:4", "--out", str(out)]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    x = load_fashion_mnist(split="test").batch(torch.arange(4))[0]
    for i in range(4):
        y = np.asarray(Image.open(out / f"fmnist-test-{i:05d}_denoise.png").convert("L"), dtype=np.float32)
        assert np.abs(y / 127.5 - 1 - x[i, 0].numpy()).mean() < 0.2
    assert (out / "denoise_grid.png").is_file()
    with pytest.raises(SystemExit):
        edit_main(["denoise", "--pretrained", "fmnist", "--input", "fashion-mnist:test:0", "--out", str(out)])
    assert "expected a number of images >= 1" in capsys.readouterr().err


def test_noise_argument_is_one_draw_per_level(model, images):
    """noise=[n_1, n_2]: n_k is the noise of level k of Algorithm 4, so it edits as the generator drawing n_1 then n_2
    (itself checked against the paper's transcription above). Reusing n_1 at every level passed the batch test."""
    mask = (torch.rand(1, 1, RES, RES, generator=gen(3)) < 0.5).float()
    g = gen(5)
    n = [torch.randn(images.shape, generator=g) for _ in SIGMAS]
    torch.testing.assert_close(edit.inpaint(model, images, mask, SIGMAS, noise=n),
                               edit.inpaint(model, images, mask, SIGMAS, gen(5)), rtol=0, atol=0)


def test_tasks_run_a_model_in_train_mode_without_dropout_and_keep_its_modes(images):
    """Every edit (and with_class around a model) ran a model left in train() mode with dropout on: other images for
    the same seed on every call. They run it in eval mode and put each submodule's mode back."""
    torch.manual_seed(0)
    plain = cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny", img_resolution=RES, dropout=0.5))
    cond = cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny", img_resolution=RES, dropout=0.5, label_dim=3))
    mask = torch.zeros(1, 1, RES, RES)
    mask[..., : RES // 2] = 1
    runs = [(plain, lambda m: edit.inpaint(m, images, mask, SIGMAS, generator=gen())),
            (plain, lambda m: edit.denoise(m, images, 0.5)),
            (plain, lambda m: edit.interpolate(m, images, images.flip(0), [0.5])),
            (cond, lambda m: edit.inpaint(edit.with_class(m, 1), images, mask, SIGMAS, generator=gen()))]
    for i, (m, run) in enumerate(runs):
        want = run(m.eval())
        m.train()
        m.net.out_conv.eval()
        assert torch.equal(run(m), want), i
        assert m.training and m.net.enc.training and not m.net.out_conv.training


def test_bad_generator_alphas_and_nan_inputs_are_one_clear_error(model, images):
    """generator=0 (a seed) was an AttributeError ('int' object has no attribute 'device'); interpolate with no
    alphas failed in the model as an empty batch 'x', and a NaN alpha, NaN noise z0 / z1 or a NaN noisy image gave
    NaN images without a word."""
    mask = torch.ones(1, 1, RES, RES)
    with pytest.raises(TypeError, match=r"^generator: expected a torch\.Generator or None, got int"):
        edit.inpaint(model, images, mask, SIGMAS, generator=0)
    z = torch.randn_like(images)
    nan = z.clone()
    nan[0, 0, 0, 0] = float("nan")
    for alphas in ([], [0.5, float("nan")]):
        with pytest.raises(ValueError, match=r"^alphas: expected one or more finite interpolation weights"):
            edit.interpolate(model, z, z.flip(0), alphas)
    for z0, z1, what in ((nan, z, "z0"), (z, nan, "z1")):
        with pytest.raises(ValueError, match=rf"^{what}: expected finite values, got NaN / inf$"):
            edit.interpolate(model, z0, z1, [0.5])
    with pytest.raises(ValueError, match=r"^noisy: expected finite values, got NaN / inf$"):
        edit.denoise(model, nan, 0.5)
    assert edit.interpolate(model, z, z.flip(0), [[0.0, 1.0]]).shape == (2, *z.shape)
