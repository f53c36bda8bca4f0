"""Algorithm 1 (one and many steps) and the EDM teacher sampler."""
import math

import numpy as np
import pytest
import torch

import cmfast
from test_objectives import SmallNet, d64, karras64


@pytest.fixture
def model():
    return cmfast.ConsistencyModel(SmallNet(seed=0)).eval()


def test_one_step_equals_model_at_sigma_max(model):
    z = torch.randn(3, 2, 8, 8)
    assert torch.equal(cmfast.sample(model, z), model(80.0 * z, 80.0))


def test_multistep_follows_algorithm_1(model):
    z = torch.randn(3, 2, 8, 8)
    sigmas = (80.0, 2.5, 0.4)
    got = cmfast.sample(model, z, sigmas, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x = model(80.0 * z, 80.0)
    for s in sigmas[1:]:
        n = torch.randn(z.shape, generator=g)
        x = model(x + math.sqrt(s**2 - 0.002**2) * n, s)
    assert torch.equal(got, x)
    again = cmfast.sample(model, z, sigmas, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, again)
    other = cmfast.sample(model, z, sigmas, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(got, other)


def test_given_noise_replaces_the_draws(model):
    z = torch.randn(3, 2, 8, 8)
    sigmas = (80.0, 2.5, 0.4)
    g = torch.Generator().manual_seed(7)
    noise = [torch.randn(z.shape, generator=g) for _ in sigmas[1:]]
    got = cmfast.sample(model, z, sigmas, noise=noise)
    assert torch.equal(got, cmfast.sample(model, z, sigmas, generator=torch.Generator().manual_seed(7)))
    for bad in (noise[:1], [noise[0], noise[1][:2]]):
        with pytest.raises(ValueError, match=r"noise: expected 2 tensor\(s\) shaped \(3, 2, 8, 8\)"):
            cmfast.sample(model, z, sigmas, noise=bad)


def test_eager_images_do_not_depend_on_the_batch_size(model):
    """Each image's noise (z and every later level's) is its own: 2-step images drawn in batches of 5 or 2 agree,
    and image 3 of a set is image 3 whatever comes before it in its batch."""
    from cmfast.sampling import generate_batches, image_noise
    model.net.in_channels, model.net.img_resolution = 2, 8

    def images(batch):
        return torch.cat([x for _, x in generate_batches(model, 5, sigmas=(80.0, 0.821), seed=3,
                                                         batch_size=batch, engine="eager")])
    a, b = images(5), images(2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.allclose(a[0], a[1])
    z = image_noise(3, 0, 5, (2, 8, 8))
    torch.testing.assert_close(image_noise(3, 3, 1, (2, 8, 8))[0], z[3], rtol=0, atol=0)
    assert not torch.equal(image_noise(3, 0, 5, (2, 8, 8), draw=1), z)
    assert not torch.equal(image_noise(4, 0, 5, (2, 8, 8)), z)


@pytest.mark.parametrize("bad", [(80.0, 80.0), (1.0, 2.0), (), (90.0,), (80.0, 0.001), (80.0, float("nan"))])
def test_bad_sigmas(model, bad):
    with pytest.raises(ValueError, match="sigmas"):
        cmfast.sample(model, torch.randn(1, 2, 8, 8), bad)


def test_edm_heun_sampler_matches_transcription():
    net = SmallNet(seed=3)
    den = cmfast.EDMDenoiser(net).eval()
    z = torch.randn(2, 2, 8, 8)
    got = cmfast.edm_sample(den, z, num_steps=4, solver="heun")
    t = karras64(4).flip(0).tolist() + [0.0]
    x = z.double() * t[0]
    evals = 0
    for tc, tn in zip(t[:-1], t[1:]):
        d = (x - d64(net, x, torch.tensor([tc] * 2, dtype=torch.float64))) / tc
        xn = x + (tn - tc) * d
        evals += 1
        if tn > 0:
            d2 = (xn - d64(net, xn, torch.tensor([tn] * 2, dtype=torch.float64))) / tn
            xn = x + (tn - tc) * (d + d2) / 2
            evals += 1
        x = xn
    assert evals == 7  # 2 N - 1
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="steps: EDM's sampler takes 2 or more steps"):     # was 'n: expected ...'
        cmfast.edm_sample(den, z, num_steps=1)


class _LabelProbe(torch.nn.Module):
    """A class-conditional stand-in whose sample is the class label it was given (every pixel)."""
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self, label_dim=3):
        super().__init__()
        self.net = torch.nn.Module()
        self.net.in_channels, self.net.img_resolution, self.net.label_dim = 1, 4, label_dim
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, class_labels=None):
        return class_labels.to(x.dtype).reshape(-1, 1, 1, 1).expand_as(x).clone()


def test_class_labels_cycle_over_the_whole_set_whatever_the_batch():
    """Image i of a conditional set gets class i mod label_dim, whatever batch it falls in (restarting the cycle at
    every batch skewed the classes and made the images depend on batch_size); class_label fixes every image's."""
    from cmfast.sampling import generate_batches
    model = _LabelProbe(3)
    for batch in (7, 3, 2):
        got = torch.cat([x for _, x in generate_batches(model, 7, sigmas=(80.0,), batch_size=batch, engine="eager")])
        assert got[:, 0, 0, 0].tolist() == [0, 1, 2, 0, 1, 2, 0], batch
    got = torch.cat([x for _, x in generate_batches(model, 4, sigmas=(80.0,), batch_size=3, class_label=2,
                                                    engine="eager")])
    assert got[:, 0, 0, 0].tolist() == [2, 2, 2, 2]


def _modes(m):
    return [sub.training for sub in m.modules()]


def test_a_model_in_train_mode_samples_without_dropout_and_keeps_its_modes():
    """sample / edm_sample in train mode drew new dropout masks at every evaluation (the same seed gave other images
    each call); they run the model in eval mode and put back each submodule's own mode (a mixed one included)."""
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", in_channels=2, img_resolution=8, dropout=0.5)
    z = torch.randn(2, 2, 8, 8)
    for wrap, run in ((cmfast.ConsistencyModel,
                       lambda m: cmfast.sample(m, z, (80.0, 1.0), generator=torch.Generator().manual_seed(1))),
                      (cmfast.EDMDenoiser, lambda m: cmfast.edm_sample(m, z, num_steps=3))):
        m = wrap(net).eval()
        want = run(m)
        m.train()
        m.net.map_layer0.eval()             # a mixed state, as a user may leave it
        modes = _modes(m)
        assert torch.equal(run(m), want)
        assert _modes(m) == modes and m.training and not m.net.map_layer0.training


class _ModeProbe(torch.nn.Module):
    """A consistency-model stand-in that records, at every evaluation, the .training of each of its modules."""
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Sequential(torch.nn.Dropout(), torch.nn.ReLU()))
        self.seen = []

    def forward(self, x, sigma, class_labels=None):
        self.seen.append([(name, sub.training) for name, sub in self.named_modules()])
        return x


def test_eval_mode_reaches_every_module_each_call_and_puts_each_mode_back():
    """Inside sample every module is in eval mode, and after it each one has its own mode again: a mixed state, a
    submodule put back in train mode between calls, modules added between calls (add_module and ModuleList.insert,
    which writes _modules directly), a module shared twice and one with a __setattr__ of its own (a ScriptModule's
    kind), set through it. eval_mode must not remember the modules of an earlier call."""
    class OwnSetattr(torch.nn.Module):
        def __setattr__(self, name, value):
            if name == "training":
                self.__dict__.setdefault("assigned", []).append(value)
            super().__setattr__(name, value)

    m = _ModeProbe()
    z = torch.randn(1, 1)

    def run_and_check(m):
        before = [(name, sub.training) for name, sub in m.named_modules()]
        m.seen.clear()
        cmfast.sample(m, z, (80.0, 1.0), generator=torch.Generator().manual_seed(0))
        assert len(m.seen) == 2 and all(not on for seen in m.seen for _, on in seen), m.seen
        assert [name for name, _ in m.seen[0]] == [name for name, _ in before]    # the probe saw every module
        assert [(name, sub.training) for name, sub in m.named_modules()] == before

    m.train()
    m.body[1][0].eval()                       # mixed: one dropout left in eval mode
    run_and_check(m)
    assert m.training and m.body[0].training and not m.body[1][0].training and m.body[1][1].training
    m.eval()
    m.body[1][1].train()                      # one submodule put back in train mode after a call
    run_and_check(m)
    assert not m.training and m.body[1][1].training
    m.body.add_module("late", torch.nn.Dropout())                    # added after earlier calls, in train mode
    m.extra = torch.nn.ModuleList([torch.nn.Identity()]).eval()
    m.extra.insert(0, torch.nn.Dropout())                             # _modules written directly
    m.shared = m.body[0]                                              # the same Linear under two names
    m.body[0].train()
    m.own = OwnSetattr()
    run_and_check(m)
    assert m.body.late.training and m.extra[0].training and not m.extra[1].training and m.shared.training
    assert m.own.training and m.own.assigned == [False, True]         # through its own __setattr__


def test_eval_mode_reaches_the_model_a_wrapper_holds():
    """A wrapper that is not a module but holds one as .model (cmfast.edit.with_class) samples with that module in
    eval mode; its modes come back, the mixed ones included, and also when the model raises."""
    class Wrapper:
        sigma_min, sigma_max = 0.002, 80.0

        def __init__(self, model):
            self.model = model

        def parameters(self):
            return self.model.parameters()

        def __call__(self, x, sigma, class_labels=None):
            return self.model(x, sigma, class_labels)

    inner = _ModeProbe().train()
    inner.body[0].eval()
    modes = _modes(inner)
    cmfast.sample(Wrapper(inner), torch.randn(1, 1))
    assert len(inner.seen) == 1 and not any(on for _, on in inner.seen[0])
    assert _modes(inner) == modes

    def boom(*args):
        assert not any(_modes(inner))
        raise RuntimeError("boom")
    inner.forward = boom
    with pytest.raises(RuntimeError, match="boom"):
        cmfast.sample(Wrapper(inner), torch.randn(1, 1))
    assert _modes(inner) == modes


def test_finite_check_is_exact_where_the_sum_overflows_or_cancels():
    """sample's NaN / inf check (one sum, then an exact look where the sum is not finite): finite values whose sum
    overflows pass, in float32 and float16, and +inf with -inf (a NaN sum) or a lone NaN / inf fail."""
    from cmfast.sampling import all_finite
    probe = _ModeProbe().eval()
    for big in (torch.full((1, 4), 3e38), torch.full((1, 4), 6e4, dtype=torch.float16)):
        assert math.isinf(float(big.sum()))          # the case the sum alone would refuse
        assert all_finite(big)
        assert torch.equal(cmfast.sample(probe, big, (1.0,)), big.float() * 1.0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.float16, torch.float64):
            z = torch.zeros(1, 5, dtype=dtype)
            z[0, 3] = bad
            assert not all_finite(z)
            with pytest.raises(ValueError, match=r"^z: expected finite noise, got NaN / inf values$"):
                cmfast.sample(probe, z)
    both = torch.tensor([[float("inf"), -float("inf"), 1.0]])
    assert not all_finite(both) and not all_finite(torch.tensor([[1e38, float("nan")]]))
    assert all_finite(torch.zeros(0, 3))


def test_bad_noise_and_levels_are_one_clear_error(model):
    """NaN noise gave NaN images without a word (CPU: checked, no device sync there); integer extra noise was cast;
    sigmas='80' was read as the levels (8, 0) and a 2-D tensor failed inside float(); edm_sample returned an int64
    'image' for an integer z and named num_steps=2.0 'n' (karras_sigmas' argument)."""
    z = torch.randn(2, 2, 8, 8)
    nan = z.clone()
    nan[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^z: expected finite noise, got NaN / inf values$"):
        cmfast.sample(model, nan)
    with pytest.raises(ValueError, match=r"^noise\[0\]: expected finite noise"):
        cmfast.sample(model, z, (80.0, 1.0), noise=[nan])
    with pytest.raises(TypeError, match=r"^noise\[0\]: expected a floating-point tensor"):
        cmfast.sample(model, z, (80.0, 1.0), noise=[torch.zeros(2, 2, 8, 8, dtype=torch.long)])
    for bad in ("80", torch.tensor([[80.0, 1.0]]), [80.0, "x"]):
        with pytest.raises(TypeError, match=r"^sigmas: expected a number or a 1-D sequence of numbers"):
            cmfast.sample(model, z, bad)
    assert torch.equal(cmfast.sample(model, z, torch.tensor([80.0, 1.0]), generator=torch.Generator().manual_seed(0)),
                       cmfast.sample(model, z, (80.0, 1.0), generator=torch.Generator().manual_seed(0)))
    teacher = cmfast.EDMDenoiser(model.net).eval()
    with pytest.raises(TypeError, match=r"^z: expected a floating-point tensor"):
        cmfast.edm_sample(teacher, z.long(), num_steps=2)
    with pytest.raises(ValueError, match=r"^z: expected finite noise"):
        cmfast.edm_sample(teacher, nan, num_steps=2)
    with pytest.raises(TypeError, match=r"^num_steps: expected an integer, got 2\.0$"):
        cmfast.edm_sample(teacher, z, num_steps=2.0)
    assert torch.equal(cmfast.edm_sample(teacher, z, num_steps=np.int64(3)), cmfast.edm_sample(teacher, z, num_steps=3))


def test_noise_on_another_device_than_the_model_is_one_clear_error(model):
    """z on the CPU for a model on another device (CUDA; 'meta' stands in here) failed inside the network's first
    layer ('Tensor on device meta is not on the expected device cpu!', on a GPU 'Input type (torch.FloatTensor) and
    weight type (torch.cuda.FloatTensor) should be the same'); a generator=<seed> inside torch.randn."""
    import copy
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match=r"^z: expected a tensor on meta \(the model's device\), got one on cpu$"):
        cmfast.sample(meta, torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"^z: expected a tensor on meta"):
        cmfast.edm_sample(cmfast.EDMDenoiser(meta.net), torch.randn(1, 2, 8, 8), num_steps=2)
    with pytest.raises(ValueError, match=r"^z: expected a tensor on cpu \(the model's device\), got one on meta$"):
        cmfast.sample(model, torch.randn(1, 2, 8, 8, device="meta"))
    with pytest.raises(TypeError, match=r"^generator: expected a torch\.Generator or None, got int$"):
        cmfast.sample(model, torch.randn(1, 2, 8, 8), (80.0, 1.0), generator=0)


# ---- cmfast-sample / cmfast-eval: the values they hand to the sampler and the scorer --------------------------------
class _CliNet(torch.nn.Module):
    """F(x, c_noise, labels) = tanh(0.7 x + c_noise + label / 4): cheap, and every input changes the image."""

    def __init__(self, label_dim=0):
        super().__init__()
        self.in_channels, self.img_resolution, self.label_dim = 3, 4, label_dim
        self.w = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x, c_noise, class_labels=None):
        y = self.w * x + c_noise.reshape(-1, 1, 1, 1)
        return torch.tanh(y if class_labels is None else y + class_labels.float().reshape(-1, 1, 1, 1) / 4)


@pytest.fixture
def shipped(monkeypatch, one_thread):
    """--pretrained x: a stub consistency model with sigma_max 40 (the default levels start at the model's own)."""
    made = {"model": cmfast.ConsistencyModel(_CliNet(), sigma_max=40.0).eval()}
    monkeypatch.setattr("cmfast.pretrained.load_pretrained", lambda name, map_location="cpu": made["model"])
    monkeypatch.setattr("cmfast.pretrained.model_card", lambda name: {"dataset": "fashion-mnist"})
    return made


def _cli_noise(seed, i, draw):
    """Image i's noise of level `draw`, from its own generator seeded (seed * 1_000_003 + i) * 64 + draw."""
    return torch.randn((3, 4, 4), generator=torch.Generator().manual_seed((seed * 1_000_003 + i) * 64 + draw))


def _cli_uint8(x):
    """EDM's 8 bits: floor(clamp(127.5 x + 128, 0, 255)), (H, W, C)."""
    return np.floor(np.clip(x.permute(1, 2, 0).numpy() * 127.5 + 128, 0, 255))



def test_sample_cli_writes_algorithm_1_from_each_images_own_noise(shipped, tmp_path, capsys):
    """cmfast-sample --npz: 64 images by default; image i is Algorithm 1 from its own noise (z = draw 0, the noise of
    the k-th later level = draw k), at the model's sigma_max for one step, (sigma_max, 0.821) for --steps 2; the grid
    is those images, 3 columns for 5, row-major, the empty cell black."""
    from PIL import Image

    from cmfast.cli.sample import main
    model = shipped["model"]
    assert main(["--pretrained", "x", "--npz", str(tmp_path / "a.npz")]) == 0
    a = np.load(tmp_path / "a.npz")
    assert sorted(a.files) == ["arr_0"] and a["arr_0"].shape == (64, 4, 4, 3) and a["arr_0"].dtype == np.uint8
    with torch.no_grad():
        for i in (0, 1, 63):
            want = model(40.0 * _cli_noise(0, i, 0)[None], 40.0)[0]
            assert np.abs(a["arr_0"][i] - _cli_uint8(want)).max() <= 1, i
    assert capsys.readouterr().out.startswith("64 images (4, 4, 3) -> ")
    assert main(["--pretrained", "x", "--steps", "2", "--seed", "3", "--num", "5", "--batch-size", "2",
                 "--npz", str(tmp_path / "b.npz"), "--grid", str(tmp_path / "b.png")]) == 0
    b = np.load(tmp_path / "b.npz")["arr_0"]
    assert b.shape == (5, 4, 4, 3)
    with torch.no_grad():
        for i in range(5):
            x = model(40.0 * _cli_noise(3, i, 0)[None], 40.0)
            want = model(x + math.sqrt(0.821 ** 2 - 0.002 ** 2) * _cli_noise(3, i, 1)[None], 0.821)[0]
            assert np.abs(b[i] - _cli_uint8(want)).max() <= 1, i
    g = np.asarray(Image.open(tmp_path / "b.png"))
    assert g.shape == (8, 12, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        assert np.array_equal(g[4 * r:4 * r + 4, 4 * c:4 * c + 4], b[i])
    assert not g[4:, 8:].any()


def test_sample_cli_labels_of_a_conditional_model(shipped, tmp_path):
    """A conditional model's images cycle through the classes (arr_1 = i mod label_dim, int64) or all take --class,
    class 0 included; the label reaches the network."""
    from cmfast.cli.sample import main
    model = shipped["model"] = cmfast.ConsistencyModel(_CliNet(label_dim=3), sigma_max=40.0).eval()
    for extra, labels in (([], [0, 1, 2, 0, 1]), (["--class", "0"], [0] * 5), (["--class", "2"], [2] * 5)):
        path = tmp_path / f"s{len(extra)}{extra[-1:]}.npz"
        assert main(["--pretrained", "x", "--num", "5", "--npz", str(path), *extra]) == 0
        f = np.load(path)
        assert f["arr_1"].dtype == np.int64 and f["arr_1"].tolist() == labels
        with torch.no_grad():
            for i in range(5):
                want = model(40.0 * _cli_noise(0, i, 0)[None], 40.0, torch.tensor([labels[i]]))[0]
                assert np.abs(f["arr_0"][i] - _cli_uint8(want)).max() <= 1, (extra, i)


def test_sample_cli_hands_its_flags_to_generate_batches(shipped, tmp_path, monkeypatch):
    """What cmfast-sample passes on (recorded): the defaults (seed 0, batch 256, engine auto, float32, every class,
    one step at the model's sigma_max) and each flag as given."""
    from cmfast.cli.sample import main
    seen = []

    def record(model, num, **k):
        seen.append(dict(k, num=num))
        yield 0, torch.zeros(num, 3, 4, 4)
    monkeypatch.setattr("cmfast.sampling.generate_batches", record)
    assert main(["--pretrained", "x", "--npz", str(tmp_path / "a.npz")]) == 0
    assert seen.pop() == dict(num=64, sigmas=(40.0,), steps=None, seed=0, batch_size=256, class_label=None,
                              engine="auto", dtype=torch.float32, clip_denoised=False)
    assert main(["--pretrained", "x", "--npz", str(tmp_path / "a.npz"), "--num", "3", "--steps", "3", "--seed", "7",
                 "--batch-size", "2", "--engine", "graphed", "--dtype", "bf16", "--clip-denoised"]) == 0
    k = seen.pop()
    assert (k["num"], k["steps"], k["seed"], k["batch_size"], k["engine"], k["dtype"], k["clip_denoised"]) == \
        (3, 3, 7, 2, "graphed", torch.bfloat16, True)
    assert len(k["sigmas"]) == 3 and k["sigmas"][0] == 40.0
    assert main(["--pretrained", "x", "--npz", str(tmp_path / "a.npz"), "--sigmas", "30,2"]) == 0
    assert seen.pop()["sigmas"] == (30.0, 2.0)


def test_eval_cli_hands_its_flags_and_defaults_to_evaluate(shipped, tmp_path, monkeypatch, capsys):
    """What cmfast-eval passes to metrics.evaluate (recorded): its defaults (50000 images, batch 256, seed 0, engine
    auto, float32, the model card's dataset, progress shown) and each flag; the JSON printed and written to --out
    (one trailing newline) names the shipped model."""
    import json

    from cmfast.cli.eval import main
    seen = []
    monkeypatch.setattr("cmfast.metrics.evaluate", lambda model, metric, **k: seen.append((metric, k)) or
                        {"metric": metric, "value": 1.5})
    assert main(["--pretrained", "x", "--metric", "fd-fmnist", "--out", str(tmp_path / "r.json")]) == 0
    metric, k = seen.pop()
    assert metric == "fd-fmnist" and k == dict(num=50000, batch_size=256, seed=0, dataset="fashion-mnist",
                                               device="cpu", data_dir=None, weights=None, engine="auto",
                                               dtype=torch.float32, steps=None, sigmas=None, progress=True,
                                               is_splits=10, pr_num=None, ref_stats=None, clip_denoised=False)
    text = (tmp_path / "r.json").read_text()
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert json.loads(text) == {"metric": "fd-fmnist", "value": 1.5, "pretrained": "x"} == \
        json.loads(capsys.readouterr().out)
    weights = tmp_path / "w.pth"
    assert main(["--pretrained", "x", "--metric", "fid", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                 "--inception-weights", str(weights), "--engine", "eager", "--dtype", "bf16", "--device", "cpu",
                 "--sigmas", "30,2", "--clip-denoised"]) == 0
    metric, k = seen.pop()
    assert (metric, k["dataset"], k["data_dir"], k["weights"], k["engine"], k["dtype"], k["sigmas"], k["steps"],
            k["clip_denoised"]) == \
        ("fid", "cifar10", str(tmp_path), str(weights), "eager", torch.bfloat16, (30.0, 2.0), None, True)
    # no --device: cuda where CUDA is there (faked here: the stub model stays on the CPU), and evaluate samples there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["--pretrained", "x", "--metric", "fd-fmnist"]) == 0
    assert seen.pop()[1]["device"] == "cuda"


def test_eval_cli_search_starts_from_the_given_levels_and_reports_the_search(shipped, monkeypatch, capsys):
    """--search-sigmas: 6 ternary rounds by default (--search-iters), started from --sigmas when given, between the
    model's sigma_min and sigma_max, logging each trial; the final evaluation is at the levels found (no --steps left
    over) and the result's "search" holds the rounds and every trial."""
    import json

    import cmfast.metrics as M
    from cmfast.cli.eval import main
    calls, searched = [], []
    monkeypatch.setattr(M, "evaluate", lambda model, metric, **k: calls.append(k) or {"value": 1.0})

    def search(score, steps, smin, smax, iters, start=None, log=None):
        searched.append((steps, smin, smax, iters, start))
        log("trial 1")
        return {"sigmas": [40.0, 0.5], "score": score((40.0, 0.5)), "trials": [[[40.0, 0.5], 1.0]]}
    monkeypatch.setattr(M, "search_sigmas", search)
    for extra, iters, start in ((["--steps", "2"], 6, (40.0, 0.821)), (["--sigmas", "30,3", "--search-iters", "2"],
                                                                        2, (30.0, 3.0))):
        calls.clear()
        assert main(["--pretrained", "x", "--metric", "fd-fmnist", "--search-sigmas", *extra]) == 0
        assert searched.pop() == (2, 0.002, 40.0, iters, start)
        assert calls[0]["sigmas"] == (40.0, 0.5) and (calls[-1]["sigmas"], calls[-1]["steps"]) == ((40.0, 0.5), None)
        out = capsys.readouterr().out
        assert out.startswith("cmfast-eval: trial 1\n")
        r = json.loads(out[out.index("{"):])
        assert r["search"]["iters"] == iters and r["search"]["trials"] == [[[40.0, 0.5], 1.0]]


def test_sample_cli_class_by_name_is_the_index_of_the_checkpoints_class(shipped, tmp_path, monkeypatch, capsys):
    """--class NAME (a run trained on class subfolders) is that name's index in the checkpoint's config "classes":
    dogs of (cats, dogs, emus) is label 1, in arr_1 and at the network; a name not there is one line."""
    from cmfast.cli.sample import main
    model = cmfast.ConsistencyModel(_CliNet(label_dim=3), sigma_max=40.0).eval()
    meta = {"config": {"method": "ict", "classes": ["cats", "dogs", "emus"]}}
    monkeypatch.setattr("cmfast.training.checkpoint.load_model", lambda path, which=None, map_location=None:
                        (model, meta))
    assert main(["--checkpoint", str(tmp_path), "--num", "2", "--class", "dogs", "--npz", str(tmp_path / "d.npz")]) \
        == 0
    f = np.load(tmp_path / "d.npz")
    assert f["arr_1"].tolist() == [1, 1]
    with torch.no_grad():
        want = model(40.0 * _cli_noise(0, 1, 0)[None], 40.0, torch.tensor([1]))[0]
    assert np.abs(f["arr_0"][1] - _cli_uint8(want)).max() <= 1
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path), "--num", "2", "--class", "owls", "--npz", str(tmp_path / "o.npz")])
    assert e.value.code == 2 and "--class owls: not a class of this model (cats, dogs, emus)" in capsys.readouterr().err


def test_eval_cli_fid_of_a_folder_run_is_against_its_folder_or_the_given_one(shipped, tmp_path, monkeypatch, capsys):
    """A checkpoint trained on an image folder, --metric fid without --dataset: evaluate gets dataset "folder" and the
    folder it was trained on, or --data-dir where given; a trained-on folder that is not here is one line."""
    from cmfast.cli.eval import main
    seen, mine, other = [], tmp_path / "mine", tmp_path / "other"
    mine.mkdir()
    other.mkdir()
    meta = {"config": {"method": "ict", "dataset": "folder", "data_dir": str(mine)}}
    monkeypatch.setattr("cmfast.training.checkpoint.load_model", lambda path, which=None, map_location=None:
                        (shipped["model"], meta))
    monkeypatch.setattr("cmfast.metrics.evaluate", lambda model, metric, **k: seen.append(k) or {"value": 1.0})
    for extra, want in (([], str(mine)), (["--data-dir", str(other)], str(other))):
        assert main(["--checkpoint", str(tmp_path), "--metric", "fid", *extra]) == 0
        k = seen.pop()
        assert (k["dataset"], k["data_dir"]) == ("folder", want)
    meta["config"]["data_dir"] = str(tmp_path / "moved")
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path), "--metric", "fid"])
    assert e.value.code == 2 and "trained on the image folder" in capsys.readouterr().err and not seen
