"""Values of the scripts no other test checked: scripts/make_edit_figures.py (the README's docs/edit_*.png: the test
images it reads, the stroke inputs, each task's levels and settings, its command line),
scripts/train_fmnist_classifier.py (the FD-FMNIST classifier's training and the file it writes) and
scripts/triton_compile_check.py (exit status, the shared-memory limit per GPU, --only). Small synthetic inputs; the
expensive parts replaced where the checked values do not depend on them."""
import gzip
import importlib.util
import os
import types

import numpy as np
import pytest
import torch

from _repo import ROOT

import cmfast


def _load(name):
    spec = importlib.util.spec_from_file_location(f"cmfast_script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- make_edit_figures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mef():
    return _load("make_edit_figures")


def _idx3(path, images, magic=b"\x00\x00\x08\x03"):
    n, h, w = images.shape
    with gzip.open(path, "wb") as f:
        f.write(magic + b"".join(v.to_bytes(4, "big") for v in (n, h, w)) + images.astype(np.uint8).tobytes())


def test_test_images_are_the_first_ones_padded_to_32_in_minus_1_to_1(mef, tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (4, 28, 28))
    raw[0, 0, 0], raw[0, 0, 1] = 0, 255
    _idx3(tmp_path / "t.gz", raw)
    x = mef.fmnist_test_images(3, str(tmp_path / "t.gz"))
    want = np.full((3, 1, 32, 32), -1.0)
    want[:, 0, 2:30, 2:30] = raw[:3] / 127.5 - 1
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), want, rtol=0, atol=1e-6)
    assert x[0, 0, 2, 2] == -1 and x[0, 0, 2, 3] == 1
    _idx3(tmp_path / "labels.gz", raw, magic=b"\x00\x00\x08\x01")
    with pytest.raises(ValueError, match="expected an idx3 uint8 file, got magic 00000801"):
        mef.fmnist_test_images(1, str(tmp_path / "labels.gz"))


def test_strokes_are_4x4_cell_means_quantised_at_plus_minus_half(mef):
    """Each 4 x 4 cell's mean -> -1 below -0.5, 0 between, 1 above 0.5 (black / gray / white), over the whole cell."""
    means = torch.tensor([[-0.8, -0.3], [0.45, 0.7]])
    x = means.repeat_interleave(4, 0).repeat_interleave(4, 1)[None, None].clone()
    # a zero-mean pattern inside each cell: 2 x 2 sub-blocks of +-0.4 (a 2-pixel cell would see them)
    x += 0.4 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1).repeat(2, 2)
    want = torch.tensor([[-1.0, 0.0], [0.0, 1.0]]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(mef.strokes_from(x)[0, 0], want)


def _karras_desc(steps, smin, top, rho=7.0):
    """The first `steps` of steps + 1 Karras levels from top down to smin (numpy)."""
    i = np.arange(steps + 1) / steps
    s = (top ** (1 / rho) + i * (smin ** (1 / rho) - top ** (1 / rho))) ** rho
    return s[:-1]


def test_each_task_gets_its_levels_and_settings(mef, tmp_path, monkeypatch, capsys):
    """A 1-channel 16 px model: the 32 px test images area-averaged to 16 px; colorize skipped; the CLI's default
    steps per task from sigma_max (stroke: from 2.0, on the stroke painting), noise seeded by `seed`, sigma 0.5,
    min(num, 4) interpolation pairs of 9 alphas, the given factor; one PNG per task at `scale`."""
    import cmfast.cli._png as png
    import cmfast.cli.edit as edit
    x32 = torch.linspace(-1, 1, 5 * 32 * 32).reshape(5, 1, 32, 32).sin()
    monkeypatch.setattr(mef, "fmnist_test_images", lambda num: x32[:num])
    calls, saved = [], []

    def run(model, task, images, **kw):
        calls.append((task, images, kw, kw["generator"].initial_seed()))
        return None, [[torch.zeros(1, 16, 16)] * 2]
    monkeypatch.setattr(edit, "run", run)
    monkeypatch.setattr(png, "save_png", lambda t, path, scale=1: saved.append((path, scale)))
    model = torch.nn.Module()
    model.p = torch.nn.Parameter(torch.zeros(1))
    model.net = types.SimpleNamespace(in_channels=1, img_resolution=16)
    model.sigma_min, model.sigma_max = 0.002, 80.0
    written = mef.make_figures(model, str(tmp_path), num=5, seed=7, factor=2, scale=2)
    assert "colorize: skipped" in capsys.readouterr().out
    tasks = ["inpaint", "super-resolve", "stroke", "interpolate", "denoise"]
    assert [c[0] for c in calls] == tasks
    x16 = torch.nn.functional.avg_pool2d(x32, 2)
    for task, images, kw, seed in calls:
        steps = edit.DEFAULT_STEPS.get(task, 1)
        np.testing.assert_allclose(kw["sigmas"], _karras_desc(steps, 0.002, 2.0 if task == "stroke" else 80.0),
                                   rtol=1e-9)
        assert seed == 7 and kw["factor"] == 2 and kw["sigma"] == 0.5 and kw["pairs"] == 4 and kw["alphas"] == 9
        if task == "interpolate":
            assert images is None
        else:
            torch.testing.assert_close(images, mef.strokes_from(x16) if task == "stroke" else x16)
    assert len(calls[0][2]["sigmas"]) == 20 and len(calls[2][2]["sigmas"]) == 2
    paths = [str(tmp_path / f"edit_{t.replace('-', '_')}.png") for t in tasks]
    assert written == paths and saved == [(p, 2) for p in paths]
    calls.clear()
    mef.make_figures(model, str(tmp_path), num=2, steps=3, tasks=("inpaint", "stroke"))
    assert [len(c[2]["sigmas"]) for c in calls] == [3, 3] and [c[2]["pairs"] for c in calls] == [2, 2]
    assert [c[3] for c in calls] == [0, 0] and calls[0][2]["factor"] == 4


def test_command_line_loads_the_ema_weights_and_passes_its_settings(mef, tmp_path, monkeypatch, capsys):
    from cmfast.pretrained import ASSETS
    from cmfast.training.checkpoint import load_weights, save_checkpoint
    modules, meta = load_weights(f"{ASSETS}/fmnist.safetensors")
    ema = {k: v.float() for k, v in modules["ema"].items()}
    online = {k: v + 1 for k, v in ema.items()}
    ckpt = save_checkpoint(str(tmp_path), 5, {"model": online, "ema": ema}, meta["config"], {})
    got = []
    monkeypatch.setattr(mef, "make_figures", lambda model, *a: got.append((model, a)))
    assert mef.main(["--checkpoint", ckpt, "--device", "cpu"]) == 0
    model, args = got[-1]
    torch.testing.assert_close(model.net.out_conv.weight, ema["net.out_conv.weight"], rtol=0, atol=0)
    assert not model.training and args == ("docs", 8, None, 0, 4)
    assert mef.main(["--pretrained", "fmnist", "--out", "o", "--num", "3", "--steps", "2", "--seed", "5",
                     "--factor", "2", "--device", "cpu"]) == 0
    model, args = got[-1]
    assert isinstance(model, cmfast.ConsistencyModel) and args == ("o", 3, 2, 5, 2)
    capsys.readouterr()
    assert mef.main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("make_edit_figures: error: ")
    if not torch.cuda.is_available():
        assert mef.main(["--checkpoint", ckpt, "--device", "cuda"]) == 2
        assert "map_location 'cuda'" in capsys.readouterr().err


# ---- train_fmnist_classifier ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tfc():
    return _load("train_fmnist_classifier")


def test_evaluate_is_the_accuracy_over_every_batch_in_eval_mode(tfc):
    """Accuracy over all 10 images in batches of 3 (the last one short), the network switched to eval mode."""
    x = torch.zeros(10, 1, 32, 32)
    pred = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    for i, p in enumerate(pred):
        x[i, 0, 0, p] = 1.0
    y = torch.tensor([3, 1, 4, 0, 5, 9, 2, 0, 0, 3])                # 7 of 10 right, the last one among them

    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.dropout(x[:, 0, 0, :10], 0.9, self.training)

    net = Net().train()
    assert tfc.evaluate(net, x, y, batch=3) == pytest.approx(0.7) and not net.training
    assert tfc.evaluate(net, x[:9], y[:9], batch=3) == pytest.approx(6 / 9)


class _Split:
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 10, (n,), generator=g)
        self.x = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1
        self.x[:, :, :, :16] += self.y[:, None, None, None] / 10     # left-right asymmetric: a flip shows

    def __len__(self):
        return len(self.y)

    def batch(self, idx):
        return self.x[idx], self.y[idx]


def _train(tfc, monkeypatch, argv):
    """main(argv) on 130 train / 20 test synthetic images; -> (what it recorded, the network it trained)."""
    rec = {"load": [], "seed": [], "inputs": [], "smoothing": set()}
    splits = {"train": _Split(130, 1), "test": _Split(20, 2)}

    def load(data_dir, split, full=False):
        rec["load"].append((data_dir, split, full))
        return splits[split]
    monkeypatch.setattr(tfc, "load_fashion_mnist", load)
    real_seed = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda s: (rec["seed"].append(s), real_seed(s))[1])

    class Net(torch.nn.Module):          # a small stand-in for the classifier (BatchNorm's counter included)
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 4, stride=4), torch.nn.BatchNorm2d(4),
                                            torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
            rec["net"] = self

        def forward(self, x):
            if self.training:
                rec["inputs"].append(x.detach().clone())
            return self.body(x)

    def load_classifier(path):
        from safetensors.torch import load_file
        net = Net()
        net.load_state_dict({k: v.float() for k, v in load_file(path).items()}, strict=False)
        return net.eval(), {}
    monkeypatch.setattr(tfc, "FMNISTClassifier", Net)
    import cmfast._fd_classifier
    monkeypatch.setattr(cmfast._fd_classifier, "load_classifier", load_classifier)

    class Sched(torch.optim.lr_scheduler.OneCycleLR):
        def __init__(self, opt, max_lr, **kw):
            super().__init__(opt, max_lr, **kw)
            rec["sched"], rec["opt"], rec["max_lr"], rec["total"] = self, opt, max_lr, kw["total_steps"]
    monkeypatch.setattr(torch.optim.lr_scheduler, "OneCycleLR", Sched)
    real_ce = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda *a, **k: (rec["smoothing"].add(k.get("label_smoothing")), real_ce(*a, **k))[1])
    tfc.main(argv)
    return rec, splits


def test_training_run_and_the_file_it_writes(tfc, tmp_path, monkeypatch, capsys):
    """Defaults: 4 epochs of whole 128-image batches (130 images: one a epoch), seed 0, AdamW at the one-cycle
    peak 3e-3 with weight decay 5e-4, run to the schedule's end; label smoothing 0.1; about half of each batch
    flipped left-right. The file: every tensor but BatchNorm's counters, in fp16, and the accuracy of the trained
    network on the test split in its metadata."""
    from safetensors import safe_open
    out = tmp_path / "clf.safetensors"
    rec, splits = _train(tfc, monkeypatch, ["--out", str(out)])
    assert rec["load"] == [(None, "train", True), (None, "test", True)] and rec["seed"] == [0]
    assert rec["total"] == 4 and rec["sched"].last_epoch == 4 and rec["max_lr"] == 3e-3
    assert isinstance(rec["opt"], torch.optim.AdamW) and rec["opt"].param_groups[0]["weight_decay"] == 5e-4
    assert rec["smoothing"] == {0.1}
    inputs = torch.cat(rec["inputs"])
    assert inputs.shape == (4 * 128, 1, 32, 32)
    xtr = splits["train"].x
    exact = dict(compute_mode="donot_use_mm_for_euclid_dist")
    plain = (torch.cdist(inputs.flatten(1), xtr.flatten(1), **exact) == 0).any(1)
    flipped = (torch.cdist(inputs.flatten(1), xtr.flip(3).flatten(1), **exact) == 0).any(1)
    assert bool((plain | flipped).all()) and 0.35 < flipped.float().mean() < 0.65
    net = rec["net"].eval()
    assert "reloaded from" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        saved = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert saved.keys() == state.keys() and all(v.dtype == torch.float16 for v in saved.values())
    assert all(torch.equal(saved[k], state[k].half()) for k in state)
    xte, yte = splits["test"].x, splits["test"].y
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean().item()
    assert meta["test_accuracy"] == f"{acc:.4f}" and meta["epochs"] == "4" and meta["seed"] == "0"
    assert meta["script"] == "scripts/train_fmnist_classifier.py"
    rec, _ = _train(tfc, monkeypatch, ["--epochs", "1", "--batch-size", "60", "--lr", "1e-3", "--seed", "3",
                                       "--data-dir", "d", "--out", str(out)])
    assert rec["load"] == [("d", "train", True), ("d", "test", True)] and rec["seed"] == [3]
    assert rec["total"] == 2 and rec["sched"].last_epoch == 2 and rec["max_lr"] == 1e-3
    assert [len(x) for x in rec["inputs"]] == [60, 60]
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["epochs"] == "1" and f.metadata()["seed"] == "3"


# ---- triton_compile_check ------------------------------------------------------------------------------------------
@pytest.fixture
def tcc(monkeypatch):
    """The script imported here with its compiler replaced: the kernels are imported first (interpreted, as every
    test here sees them), and TRITON_INTERPRET, which the script drops on import, comes back after the test."""
    pytest.importorskip("triton.backends.compiler")
    from cmfast.kernels import (attention, consistency_loss, group_norm_act, residual, skip_output,  # noqa: F401
                                trig_tangent_loss)
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    return _load("triton_compile_check")


def _check(tcc, monkeypatch, capsys, argv, shared):
    """main(argv) with every kernel "compiled" to `shared` bytes (or raising it): -> (status, output, builds)."""
    builds = []

    def build(kernel, ptr_ty, constexprs, floats, arch, **opts):
        builds.append((ptr_ty.get("*"), arch, opts))
        if isinstance(shared, Exception):
            raise shared
        return shared
    monkeypatch.setattr(tcc, "build", build)
    rc = tcc.main(argv)
    return rc, capsys.readouterr().out, builds


def test_compile_check_fails_over_the_targets_shared_memory(tcc, monkeypatch, capsys):
    """Exit 1 when a kernel needs more shared memory than the target has (227 KiB on sm_90, 163 KiB on sm_80, 99 KiB
    on an unlisted one), exactly the limit passes; --only keeps the named kernels, --quick only bf16."""
    only = ["--quick", "--no-attention", "--only", "loss_bwd;trig_tangent_finish"]
    rc, out, builds = _check(tcc, monkeypatch, capsys, only, 227 * 1024)
    assert rc == 0 and out.count(" shared ") == 2 and "OVER" not in out and "0 failures" in out
    assert [b[:2] for b in builds] == [("fp32", 90), ("fp32", 90)]       # both kernels' pointers mostly fp32
    rc, out, _ = _check(tcc, monkeypatch, capsys, only, 227 * 1024 + 1)
    assert rc == 1 and out.count("OVER SHARED-MEMORY LIMIT") == 2 and "compiled for sm_90" in out
    assert "2 failures" in out
    for arch, limit in ((80, 163 * 1024), (86, 99 * 1024), (75, 99 * 1024)):
        assert _check(tcc, monkeypatch, capsys, only + ["--arch", str(arch)], limit)[0] == 0
        rc, out, builds = _check(tcc, monkeypatch, capsys, only + ["--arch", str(arch)], limit + 1)
        assert rc == 1 and f"compiled for sm_{arch}" in out and {b[1] for b in builds} == {arch}
    rc, out, _ = _check(tcc, monkeypatch, capsys, only, RuntimeError("ptxas fatal: bad\nsecond line"))
    assert rc == 1 and out.count("FAILED: RuntimeError: ptxas fatal: bad") == 2 and "second line" not in out


def test_compile_check_covers_every_dtype_and_attention_unless_told(tcc, monkeypatch, capsys):
    rc, out, builds = _check(tcc, monkeypatch, capsys, ["--only", "skip_output_fwd;attn_delta"], 0)
    assert rc == 0 and [b[0] for b in builds] == ["fp32"] * 4 + ["bf16"] * 4 + ["fp16"] * 4    # D 16, 64, 256
    assert [line for line in out.splitlines() if line.startswith("--")] == ["-- fp32", "-- bf16", "-- fp16"]
    _, _, builds = _check(tcc, monkeypatch, capsys, ["--quick", "--only", "attn_delta"], 0)
    assert [b[0] for b in builds] == ["bf16"]
    _, _, builds = _check(tcc, monkeypatch, capsys, ["--no-attention", "--only", "attn"], 0)
    assert builds == []
    _, out, builds = _check(tcc, monkeypatch, capsys, ["--quick", "--only", ";loss_bwd;"], 0)   # empty parts: none
    assert len(builds) == 1 and out.count(" shared ") == 1 and "loss_bwd" in out
    # the group-norm kernels' warps reach the compiler
    _, out, builds = _check(tcc, monkeypatch, capsys, ["--quick", "--only", "gn_stats[256x8,pre=False]"], 0)
    assert [b[2] for b in builds] == [{"num_warps": 8}]


def test_compile_check_signature_and_build(tcc, monkeypatch):
    fn = types.SimpleNamespace(arg_names=["x_ptr", "y_ptr", "n", "eps", "BLOCK"])
    assert tcc.signature(fn, {"*": "bf16", "y_ptr": "u8"}, {"BLOCK": 64}, ("eps",)) == {
        "x_ptr": "*bf16", "y_ptr": "*u8", "n": "i32", "eps": "fp32", "BLOCK": "constexpr"}
    assert tcc.signature(fn, {}, {}, ())["x_ptr"] == "*fp32" and tcc.signature(fn, {}, {}, ())["eps"] == "i32"
    from triton.runtime.jit import JITFunction

    def kernel(x_ptr):
        pass
    jit = JITFunction(kernel)
    assert tcc.jit_fn(types.SimpleNamespace(fn=types.SimpleNamespace(fn=jit))) is jit
    seen = {}

    def compile_(src, target, options):
        seen.update(src=src, target=target, options=options)
        return types.SimpleNamespace(metadata=types.SimpleNamespace(shared=1234))
    monkeypatch.setattr(tcc, "ASTSource", lambda fn, sig, constexprs: ("src", fn, sig, constexprs))
    monkeypatch.setattr(tcc.triton, "compile", compile_)
    assert tcc.build(jit, {}, {}, (), 80) == 1234
    assert seen["src"] == ("src", jit, {"x_ptr": "*fp32"}, {})
    assert (seen["target"].backend, seen["target"].arch, seen["target"].warp_size) == ("cuda", 80, 32)
    assert seen["options"] == {"num_warps": 4, "num_stages": 2}
    tcc.build(jit, {}, {}, (), 90, num_warps=8, num_stages=3)
    assert seen["target"].arch == 90 and seen["options"] == {"num_warps": 8, "num_stages": 3}
