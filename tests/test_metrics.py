"""cmfast.metrics: Frechet distance math against scipy / numpy, FD-FMNIST ordering on real (or generated) data,
the FID Inception port (random weights of the same architecture), the classifier asset, cmfast-eval errors."""
import json
import os
import re
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmfast import metrics
from cmfast._fd_classifier import ASSET, load_classifier
from _metric_fixtures import ReplayModel, random_fid_inception

scipy_linalg = pytest.importorskip("scipy.linalg")
HAVE_FMNIST = all(os.path.isfile(f"/usr/share/datasets/fashion-mnist/{n}-idx{r}-ubyte.gz")
                  for n, r in (("train-images", 3), ("train-labels", 1), ("t10k-images", 3), ("t10k-labels", 1)))


def _random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d + 5))
    return a @ a.T / a.shape[1]


# ---------------------------------------------------------------- Frechet distance math

def test_matrix_sqrt_matches_scipy():
    rng = np.random.default_rng(0)
    for d in (1, 7, 64):
        a = _random_spd(rng, d) + 1e-3 * np.eye(d)
        np.testing.assert_allclose(metrics.sqrtm_psd(a), scipy_linalg.sqrtm(a).real, rtol=1e-8, atol=1e-10)
        b = _random_spd(rng, d)
        ref = np.trace(scipy_linalg.sqrtm(a @ b)).real           # pytorch-fid's formula
        assert metrics.trace_sqrt_product(a, b) == pytest.approx(ref, rel=1e-9)


def _fd_pytorch_fid_style(mu1, s1, mu2, s2, eps=1e-6):
    """The usual scipy formula, with pytorch-fid's eps * I offset when sqrtm of the product is not finite."""
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(len(s1)) * eps
        covmean = scipy_linalg.sqrtm((s1 + off) @ (s2 + off))
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_frechet_distance_matches_scipy_formula_and_self_is_zero():
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    fd = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert fd == pytest.approx(_fd_pytorch_fid_style(mu1, s1, mu2, s2), rel=1e-9)
    assert fd > 1.0
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-6
    # Rank-deficient covariances (fewer samples than dims): singular product, still finite and close to scipy's
    s3, s4 = _random_spd(rng, d, rank=10), _random_spd(rng, d, rank=12)
    assert metrics.frechet_distance(mu1, s3, mu2, s4) == pytest.approx(_fd_pytorch_fid_style(mu1, s3, mu2, s4),
                                                                        rel=1e-4)
    assert abs(metrics.frechet_distance(mu1, s3, mu1, s3)) < 1e-6
    # 50 samples of 2048 features: the same rank-49 covariance twice came out below 0 from round-off; never now
    x = rng.standard_normal((50, 2048)) * rng.uniform(0.01, 3.0, 2048)
    s5 = np.cov(x, rowvar=False)
    assert 0.0 <= metrics.frechet_distance(x.mean(0), s5, x.mean(0), s5) < 1e-2
    with pytest.raises(ValueError, match="expected mu"):
        metrics.frechet_distance(mu1, s1, mu2[:-1], s2)
    bad = s2.copy()
    bad[3, 4] = np.nan                                   # was a NaN distance (or numpy's eigh failing) without a word
    for args in ((mu1, s1, mu2, bad), (np.full(d, np.inf), s1, mu2, s2)):
        with pytest.raises(ValueError, match=r"^frechet_distance: expected finite means and covariances"):
            metrics.frechet_distance(*args)


def test_streaming_stats_equal_one_shot():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1000, 16)) * rng.uniform(0.1, 3, 16) + 1000.0   # large offset: tests stability
    a, b = metrics.FeatureStats(16), metrics.FeatureStats(16)
    for lo, hi in ((0, 1), (1, 1), (1, 300), (300, 301)):                    # size 1 and empty chunks too
        a.update(torch.from_numpy(x[lo:hi]))                        # tensors and arrays
    for lo, hi in ((301, 700), (700, 1000)):
        b.update(x[lo:hi])
    a.merge(b)
    assert a.n == 1000
    np.testing.assert_allclose(a.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(a.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_stats_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    s = metrics.FeatureStats(5).update(rng.standard_normal((50, 5)))
    s.save(tmp_path / "s.npz", metric="x")
    mu, sigma, meta = metrics.load_stats(tmp_path / "s.npz")
    np.testing.assert_array_equal(mu, s.mean)
    np.testing.assert_array_equal(sigma, s.cov)
    assert meta == {"n": 50, "metric": "x"}


def test_precision_recall_knn():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g)
    same = torch.randn(400, 8, generator=g)
    shifted = same + 6.0                                           # disjoint support
    p, r = metrics.precision_recall(real, same)
    assert p > 0.8 and r > 0.8
    p, r = metrics.precision_recall(real, shifted)
    assert p == 0.0 and r == 0.0
    # Hand-checkable, 1-D, k = 1: real radii are all 1, so only 0.5 is inside (precision 1/3); the fake point
    # 0.5 has radius 9.5 (its nearest fake is 10), which covers every real point (recall 1).
    p, r = metrics.precision_recall(torch.tensor([[0.], [1.], [2.]]), torch.tensor([[0.5], [10.], [11.]]), k=1)
    assert p == pytest.approx(1 / 3) and r == 1.0
    p, r = metrics.precision_recall(torch.tensor([[0.], [1.], [2.]]), torch.tensor([[5.], [6.], [7.]]), k=1)
    assert p == 0.0 and r == 0.0                                   # all radii 1, the sets 3 apart



# ---------------------------------------------------------------- FD-FMNIST

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A fresh data dir, so the train reference statistics are computed here (and cached) once."""
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("cmfast_data")
        mp.setenv("CMFAST_DATA", str(d))
        yield d


def _blur(x):
    k = torch.tensor([1., 4., 6., 4., 1.]) / 16
    k = (k[:, None] * k[None]).expand(1, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k)


def _fmnist(split, n):
    """The first n images of a Fashion-MNIST split as [-1, 1] float (N, 1, 32, 32), padded with -1, and labels."""
    from cmfast.data import load_fashion_mnist
    return load_fashion_mnist(split=split, full=True).batch(torch.arange(n))


def _generated_sets(n):
    """Without the dataset: two draws of the same synthetic distribution (random rectangles)."""
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        x = -torch.ones(n, 1, 32, 32)
        lo = torch.randint(2, 14, (n, 2), generator=g)
        hi = lo + torch.randint(8, 16, (n, 2), generator=g)
        val = torch.rand(n, generator=g) * 1.5 - 0.5
        for i in range(n):
            x[i, 0, lo[i, 0]:hi[i, 0], lo[i, 1]:hi[i, 1]] = val[i]
        return x
    return draw(0), draw(1)


def test_fd_fmnist_orders_test_blurred_noise(data_dir):
    g = torch.Generator().manual_seed(0)
    if HAVE_FMNIST:
        test, train = _fmnist("test", 3000)[0], _fmnist("train", 3000)[0]
        fd = metrics.fd_fmnist                                      # against all 60k train images (cached)
    else:
        train, test = _generated_sets(2000)
        net, _ = load_classifier()
        ref = metrics.FeatureStats(128).update(net.features(train))
        def fd(x):
            s = metrics.FeatureStats(128).update(net.features(x))
            return metrics.frechet_distance(s.mean, s.cov, ref.mean, ref.cov)
    noise = torch.rand(1000, 1, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        d_test, d_blur, d_noise = fd(test), fd(_blur(train)), fd(noise)
    print(f"FD-FMNIST test {d_test:.3f}  blurred train {d_blur:.3f}  noise {d_noise:.3f}")
    assert d_test < 0.05 * d_noise
    assert 3 * d_test < d_blur < 0.7 * d_noise
    if HAVE_FMNIST:
        assert [f for f in os.listdir(data_dir) if f.startswith("fd-fmnist_fashion-mnist_train_n60000_")]
        assert metrics.fd_fmnist(test[:500]) > 0                    # second call reads the cache


def test_fd_fmnist_rejects_bad_input():
    with pytest.raises(ValueError, match=r"expected a \(N, 1, 32, 32\)"):
        metrics.fd_fmnist(torch.zeros(4, 3, 32, 32))
    # DESIGN.md 3: fd_fmnist takes [-1, 1] images (N, 1, 32, 32). Unpadded 28x28 images were scored (a number on a
    # different geometry), and uint8 ones (cmfast-sample's .npz) failed inside the classifier's convolution
    # ("RuntimeError: expected scalar type Byte but found Float").
    with pytest.raises(ValueError, match=r"expected a \(N, 1, 32, 32\) tensor in \[-1, 1\], got \(4, 1, 28, 28\)"):
        metrics.fd_fmnist(torch.zeros(4, 1, 28, 28))
    with pytest.raises(TypeError, match="expected floating-point images in \\[-1, 1\\], got torch.uint8"):
        metrics.fd_fmnist(torch.zeros(4, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="got torch.int64"):
        metrics.fid(torch.zeros(4, 3, 32, 32, dtype=torch.int64))


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST idx files not installed")
def test_classifier_asset_accuracy():
    assert os.path.getsize(ASSET) < 3_000_000
    net, meta = load_classifier()
    assert float(meta["test_accuracy"]) >= 0.90
    x, y = _fmnist("test", 2000)
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.90


# ---------------------------------------------------------------- FID Inception port (random weights)

def test_fid_inception_architecture_and_strict_load(tmp_path):
    pytest.importorskip("torchvision")
    from cmfast._inception import WEIGHTS_NAME, FIDInception, load_fid_inception
    net = random_fid_inception()
    state = net.net.state_dict()
    assert len(state) == 566 and state["fc.weight"].shape == (1008, 2048)
    assert "Mixed_7c.branch_pool.conv.weight" in state and "Conv2d_1a_3x3.bn.running_var" in state
    assert not any(k.startswith("AuxLogits") for k in state)
    path = tmp_path / WEIGHTS_NAME
    torch.save(state, path)
    loaded = load_fid_inception(str(path))                      # strict load through the weights-path loader
    for k, v in loaded.net.state_dict().items():
        assert torch.equal(v, state[k]), k
    # Output shape through the whole net (resize to 299, pool3), on the meta device: shapes without the FLOPs
    with torch.device("meta"):
        f = FIDInception()(torch.empty(2, 1, 32, 32))
    assert f.shape == (2, 2048) and f.dtype == torch.float32
    torch.save(dict(state, extra=torch.zeros(1)), path)
    with pytest.raises(ValueError, match="not the FID Inception weights .*Unexpected key"):
        load_fid_inception(str(path))


def test_fid_pooling_differs_from_torchvision_only_where_tensorflow_does():
    tv = pytest.importorskip("torchvision.models.inception")
    from cmfast._inception import _blocks
    _, A, _, E = _blocks()
    torch.manual_seed(0)
    ref, fid = tv.InceptionA(16, pool_features=8).eval(), A(16, 8).eval()
    fid.load_state_dict(ref.state_dict())
    x = torch.randn(1, 16, 7, 7)
    with torch.no_grad():
        a, b = ref(x), fid(x)
    torch.testing.assert_close(a[:, :-8], b[:, :-8])                   # conv branches identical
    torch.testing.assert_close(a[:, -8:, 1:-1, 1:-1], b[:, -8:, 1:-1, 1:-1])   # pool: interior identical
    assert (a[:, -8:, 0] - b[:, -8:, 0]).abs().max() > 1e-3            # border: padding excluded from the mean
    import cmfast._inception as inc
    e = E(16, inc._max_pool).eval()
    with torch.no_grad():
        pooled = e.branch_pool(F.max_pool2d(x, 3, 1, 1))
        torch.testing.assert_close(e(x)[:, -192:], pooled)              # Mixed_7c max-pools


def test_missing_inception_weights_error(tmp_path, monkeypatch):
    from cmfast._inception import WEIGHTS_NAME, find_weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("CMFAST_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        find_weights()
    msg = str(e.value)
    assert "\n" not in msg and WEIGHTS_NAME in msg and str(tmp_path / "hub" / "checkpoints") in msg


def test_bad_fd_fmnist_classifier_weights_one_line(tmp_path):
    """cmfast-eval --metric fd-fmnist --inception-weights FILE loads FILE as the classifier: a truncated file raised
    safetensors' SafetensorError and another model's weights a RuntimeError listing every key, both tracebacks
    (the CLI catches ValueError / OSError). Now one ValueError naming the file, as the Inception loader does."""
    from safetensors.torch import save_file
    good = open(ASSET, "rb").read()
    cases = {"truncated.safetensors": lambda p: p.write_bytes(good[:len(good) // 2]),
             "other.safetensors": lambda p: save_file({"a": torch.zeros(3)}, str(p))}
    for name, write in cases.items():
        write(tmp_path / name)
        with pytest.raises(ValueError, match=f"{name}: not the FD-FMNIST classifier weights") as e:
            load_classifier(str(tmp_path / name))
        assert "\n" not in str(e.value) and len(str(e.value)) < 300


# ---------------------------------------------------------------- evaluate and cmfast-eval

def test_fd_fmnist_takes_any_float_dtype_and_refuses_nan_or_pixel_scale(tmp_path, monkeypatch):
    """float64 / float16 images failed inside the classifier's conv ('expected scalar type Double but found Float');
    NaN ended in numpy's 'Eigenvalues did not converge'; [0, 255] floats were scored as they were."""
    _fake_reference(tmp_path)
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    want = metrics.fd_fmnist(x, data_dir=str(tmp_path))
    assert metrics.fd_fmnist(x.double(), data_dir=str(tmp_path)) == pytest.approx(want, rel=1e-6)
    assert metrics.fd_fmnist(x.half(), data_dir=str(tmp_path)) == pytest.approx(want, rel=1e-3)
    assert metrics.fd_fmnist(x * 1.05, data_dir=str(tmp_path)) > 0     # unclamped samples a little outside: scored
    monkeypatch.setattr(metrics, "reference_stats", lambda *a, **k: pytest.fail("reference statistics computed"))
    nan = x.clone()
    nan[3, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"^images: expected finite values, got NaN / inf$"):
        metrics.fd_fmnist(nan)
    with pytest.raises(ValueError, match=r"^images: expected values in \[-1, 1\], got \[0, 255\] \(8-bit pixels"):
        metrics.fd_fmnist(torch.linspace(0, 255, 8).reshape(8, 1, 1, 1).expand(8, 1, 32, 32))
    with pytest.raises(ValueError, match=r"^images: expected finite values"):
        metrics.fid(torch.full((4, 3, 32, 32), float("inf")))
    with pytest.raises(ValueError, match=r"^device 'gpu': expected cpu, cuda, cuda:N or mps$"):
        metrics.fd_fmnist(x, device="gpu")      # torch's device-string error from inside the classifier before
    if not torch.cuda.is_available():           # torch's 'Found no NVIDIA driver' after the reference statistics
        with pytest.raises(ValueError, match=r"^device 'cuda': asks for CUDA, which is not available here"):
            metrics.fd_fmnist(x, device="cuda")


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST idx files not installed")
def test_evaluate_equals_fd_fmnist_of_the_samples(data_dir):
    imgs = _fmnist("test", 600)[0]
    res = metrics.evaluate(ReplayModel(imgs), "fd-fmnist", steps=1, num=600, batch_size=250)
    assert res["metric"] == "FD-FMNIST" and "not comparable with FID" in res["implementation"]
    assert res["sigmas"] == [80.0] and res["num"] == 600
    assert res["value"] == pytest.approx(metrics.fd_fmnist(imgs), rel=1e-6)
    assert metrics.default_sigmas(2) == (80.0, 0.821)


def _fake_reference(root):
    """A cached FD-FMNIST reference file (random statistics) so evaluate runs without the dataset."""
    from cmfast._fd_classifier import FEATURE_DIM
    stats = metrics.FeatureStats(FEATURE_DIM).update(np.random.default_rng(0).standard_normal((300, FEATURE_DIM)))
    stats.save(metrics.reference_cache_path("fd-fmnist", "fashion-mnist", root, 60000))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_evaluate_real_tiny_models_seeded(device, tmp_path):
    from cmfast import ConsistencyModel, EDMDenoiser
    from cmfast.nets import UNet
    _fake_reference(tmp_path)
    torch.manual_seed(0)
    cm = ConsistencyModel(UNet.from_preset("tiny", in_channels=1, out_channels=1)).to(device)
    run = lambda seed: metrics.evaluate(cm, "fd-fmnist", steps=2, num=4, batch_size=2, seed=seed,
                                        data_dir=str(tmp_path))
    a, b, c = run(0), run(0), run(1)
    assert a["value"] == pytest.approx(b["value"], rel=1e-6) and a["value"] > 1.0   # same seed, same images
    assert abs(a["value"] - c["value"]) > 1e-6 * a["value"] and a["sigmas"] == [80.0, 0.821]
    assert a["device"].startswith(device)
    edm = EDMDenoiser(cm.net)
    r = metrics.evaluate(edm, "fd-fmnist", steps=2, num=2, batch_size=2, data_dir=str(tmp_path))
    assert "EDM Heun, 2 steps" in r["mode"] and r["sigmas"] is None
    with pytest.raises(ValueError, match="strictly decreasing"):
        metrics.evaluate(cm, "fd-fmnist", sigmas=(0.821, 80.0), num=4, data_dir=str(tmp_path))
    s3 = metrics.default_sigmas(3)
    torch.testing.assert_close(torch.tensor(s3, dtype=torch.float64), karras_desc(4)[:3])
    # The default levels start at the model's own sigma_max, as cmfast.sample's and cmfast-sample's (80 was fixed).
    low = ConsistencyModel(cm.net, sigma_max=40.0)
    r = metrics.evaluate(low, "fd-fmnist", steps=2, num=2, batch_size=2, data_dir=str(tmp_path))
    assert r["sigmas"] == [40.0, 0.821] and metrics.model_sigmas(low, 3) == (40.0, *s3[1:])


def test_evaluate_gives_the_model_back_in_its_own_mode(tmp_path):
    """evaluate left a model it was given in train() mode in eval mode (model.eval().to(device), kept); it samples
    in eval mode (no dropout: the same score) and puts each submodule's mode back."""
    from cmfast import ConsistencyModel
    from cmfast.nets import UNet
    _fake_reference(tmp_path)
    torch.manual_seed(0)
    cm = ConsistencyModel(UNet.from_preset("tiny", in_channels=1, out_channels=1, dropout=0.5))
    run = lambda: metrics.evaluate(cm, "fd-fmnist", steps=2, num=4, batch_size=2, data_dir=str(tmp_path))["value"]
    want = run()
    cm.train()
    cm.net.out_conv.eval()
    assert run() == want
    assert cm.training and cm.net.enc.training and not cm.net.out_conv.training
    assert next(cm.parameters()).device.type == "cpu"


def test_steps_0_is_refused_not_read_as_the_default(monkeypatch):
    """evaluate / generate_batches read steps=0 for an EDM teacher as `steps or 18`: 18 Heun steps, no word (and a
    consistency model's steps=0 as 1 step, then 'steps=0 but 1 sigmas given')."""
    from cmfast import ConsistencyModel, EDMDenoiser
    from cmfast.nets import UNet
    from cmfast.sampling import generate_batches
    monkeypatch.setattr(metrics, "reference_stats", lambda *a, **k: pytest.fail("reference statistics computed"))
    net = UNet.from_preset("tiny", in_channels=1, img_resolution=32)
    edm_steps = r"^steps: EDM's sampler takes 2 or more steps \(sigma_max to sigma_min, then 0\), got 0$"
    with pytest.raises(ValueError, match=edm_steps):
        metrics.evaluate(EDMDenoiser(net), "fd-fmnist", steps=0, num=4)
    with pytest.raises(ValueError, match=r"^steps: expected an integer >= 1, got 0$"):
        metrics.evaluate(ConsistencyModel(net), "fd-fmnist", steps=0, num=4)
    with pytest.raises(ValueError, match=r"^steps: EDM's sampler takes 2 or more steps"):
        next(generate_batches(EDMDenoiser(net), 2, steps=0, engine="eager"))


def test_evaluate_fd_fmnist_refuses_a_model_of_other_images(tmp_path, monkeypatch):
    """An RGB (or 64x64) model scored with fd-fmnist failed in the classifier's conv2d with a traceback, after the
    reference statistics; now one ValueError before anything is computed."""
    from cmfast import ConsistencyModel
    from cmfast.nets import UNet
    monkeypatch.setattr(metrics, "reference_stats", lambda *a, **k: pytest.fail("reference statistics computed"))
    for over in (dict(), dict(in_channels=1, out_channels=1, img_resolution=16)):
        cm = ConsistencyModel(UNet.from_preset("tiny", **over))
        with pytest.raises(ValueError, match=r"fd-fmnist scores \(1, 32, 32\) images .* makes \((3, 32|1, 16)"):
            metrics.evaluate(cm, "fd-fmnist", steps=1, num=4, batch_size=2, data_dir=str(tmp_path))


def karras_desc(n):
    from cmfast import karras_sigmas
    return karras_sigmas(n).flip(0)


def _run_cli(argv, capsys):
    from cmfast.cli.eval import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    return e.value.code, err


@pytest.mark.parametrize("argv, needle", [
    (["--checkpoint", "/nonexistent/ckpt.safetensors", "--metric", "fd-fmnist"], "checkpoint not found"),
    (["--checkpoint", "x", "--metric", "kid"], "invalid choice: 'kid'"),
    (["--checkpoint", "x", "--metric", "fid", "--steps", "0"], "expected an integer >= 1"),
    (["--metric", "fid"], "--checkpoint"),
])
def test_cli_bad_input_one_line_exit_2(argv, needle, capsys):
    code, err = _run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("cmfast-eval: error: ") and err.count("\n") == 1 and needle in err


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST idx files not installed")
def test_cli_writes_json(tmp_path, data_dir, monkeypatch, capsys):
    imgs = _fmnist("test", 300)[0]
    fake = types.ModuleType("cmfast.training.checkpoint")
    fake.load_model = lambda path, which="ema", map_location="cpu": (ReplayModel(imgs), {"config": {"dataset": "fmnist"}})
    from cmfast.training.checkpoint import atomic_write
    fake.atomic_write = atomic_write                # the CLI writes its --out with it
    monkeypatch.setitem(sys.modules, "cmfast.training.checkpoint", fake)
    ckpt, out = tmp_path / "ckpt.safetensors", tmp_path / "r.json"
    ckpt.write_bytes(b"")
    from cmfast.cli.eval import main
    assert main(["--checkpoint", str(ckpt), "--metric", "fd-fmnist", "--num", "300", "--out", str(out),
                 "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert res["metric"] == "FD-FMNIST" and res["dataset"] == "fashion-mnist" and res["value"] > 0
    assert json.loads(capsys.readouterr().out) == res


def test_search_sigmas_finds_the_minimum_and_scores_the_start():
    import math
    calls = []

    def score(s):      # a bowl in log sigma with its bottom at 1.3 (2 steps)
        calls.append(s)
        return (math.log(s[1]) - math.log(1.3)) ** 2

    r = metrics.search_sigmas(score, steps=2, iters=10, start=(80.0, 0.821))
    assert calls[0] == (80.0, 0.821)                                 # the start is scored first
    assert r["sigmas"][0] == 80.0 and abs(math.log(r["sigmas"][1] / 1.3)) < 0.05
    assert r["score"] == min(v for _, v in r["trials"]) and len(r["trials"]) == len(set(calls))
    # the result is never worse than the start: a bowl outside the searched range keeps the start's level
    r = metrics.search_sigmas(lambda s: abs(s[1] - 0.821), steps=2, iters=2, start=(80.0, 0.821))
    assert r["sigmas"] == [80.0, 0.821] and r["score"] == 0.0
    # 3 steps: levels stay strictly decreasing, inside (sigma_min, sigma_max)
    r = metrics.search_sigmas(lambda s: sum(s), steps=3, iters=3)
    assert 80.0 == r["sigmas"][0] > r["sigmas"][1] > r["sigmas"][2] > 0.002
    for bad, match in (({"steps": 1}, "steps: expected an integer >= 2"), ({"iters": 0}, "iters: expected >= 1"),
                       ({"start": (80.0, 90.0)}, "start: expected 2 decreasing levels")):
        with pytest.raises(ValueError, match=match):
            metrics.search_sigmas(lambda s: 0.0, **bad)


# ---------------------------------------------------------------- FID against an image folder (ImageNet 64, LSUN)
def test_reference_stats_of_an_image_folder(tmp_path, monkeypatch):
    """dataset 'folder': the statistics of `num` of the folder's images (a seed-0 draw), converted a batch at a
    time, cached under an id of that folder (two folders never share a file; the cache is read back); evaluate
    and cmfast-eval score against it. The Inception weights are not here: a small stand-in feature function."""
    from train_fixtures import write_png_folder
    import cmfast
    arrs = write_png_folder(tmp_path / "ref", n=10, size=16)
    write_png_folder(tmp_path / "ref2", n=10, size=16, seed=1)
    monkeypatch.setenv("CMFAST_DATA", str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"stand-in weights")

    def feats(x):
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), x[:, :, :8].mean((2, 3))], dim=1)
    monkeypatch.setattr(metrics, "_weights_path", lambda metric, weights_=None: str(weights))
    monkeypatch.setattr(metrics, "_extractor", lambda metric, device, weights_=None: (feats, 9, "stand-in"))
    mu, cov, meta = metrics.reference_stats("fid", "folder", str(tmp_path / "ref"), num=8, batch_size=3)
    x = torch.from_numpy(arrs).permute(0, 3, 1, 2).float() / 127.5 - 1
    idx = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:8]
    want = metrics.FeatureStats(9).update(feats(x[idx]).double())
    np.testing.assert_allclose(mu, want.mean, rtol=1e-5, atol=1e-7)      # fp32 features, batched differently
    np.testing.assert_allclose(cov, want.cov, rtol=1e-5, atol=1e-7)
    assert meta["source"] == str(tmp_path / "ref") and meta["n"] == 8
    mu2 = metrics.reference_stats("fid", "folder", str(tmp_path / "ref2"), num=8, batch_size=3)[0]
    assert np.abs(mu2 - mu).max() > 1e-3 and len(os.listdir(tmp_path / "cache")) == 2
    monkeypatch.setattr(metrics, "_extractor", lambda *a, **k: pytest.fail("cached statistics were recomputed"))
    np.testing.assert_array_equal(metrics.reference_stats("fid", "folder", str(tmp_path / "ref"), num=8)[0], mu)
    monkeypatch.setattr(metrics, "_extractor", lambda metric, device, weights_=None: (feats, 9, "stand-in"))
    torch.manual_seed(0)
    cm = cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny", img_resolution=16)).eval()
    r = metrics.evaluate(cm, "fid", steps=1, num=4, batch_size=2, dataset="folder", data_dir=str(tmp_path / "ref"))
    assert r["dataset"] == "folder" and np.isfinite(r["value"]) and r["value"] > 0
    from cmfast.cli.eval import main as eval_main
    from cmfast.nets import preset_config
    from cmfast.training.checkpoint import save_checkpoint
    cfg = dict(method="ict", net=preset_config("tiny", img_resolution=16), sigma_data=0.5, sigma_min=0.002,
               sigma_max=80.0)
    (tmp_path / "run").mkdir()
    ckpt = save_checkpoint(str(tmp_path / "run"), 1, {"ema": cm.state_dict()}, cfg, {})
    out = tmp_path / "fid.json"
    assert eval_main(["--checkpoint", ckpt, "--metric", "fid", "--dataset", "folder", "--data-dir",
                      str(tmp_path / "ref"), "--num", "4", "--batch-size", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["value"] == pytest.approx(r["value"], rel=1e-6)     # the same images
    with pytest.raises(SystemExit):
        eval_main(["--checkpoint", ckpt, "--metric", "fid", "--dataset", "folder"])
    with pytest.raises(ValueError, match="give the folder or zip"):
        metrics.reference_stats("fid", "folder", None)
    with pytest.raises(ValueError, match="reference images not found"):
        metrics.reference_stats("fid", "folder", str(tmp_path / "nowhere"))


def test_cli_fid_of_a_folder_checkpoint_is_against_its_folder(tmp_path, monkeypatch, capsys):
    """A checkpoint trained on an image folder, scored with --metric fid and no --dataset: the reference is that
    folder (config.json's data_dir), as --help says ('default: from the checkpoint'); it was CIFAR-10, silently."""
    from train_fixtures import write_png_folder
    import cmfast
    from cmfast.cli.eval import main as eval_main
    from cmfast.nets import preset_config
    from cmfast.training.checkpoint import save_checkpoint
    write_png_folder(tmp_path / "mine", n=10, size=16)
    monkeypatch.setenv("CMFAST_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    (tmp_path / "w.bin").write_bytes(b"stand-in weights")
    monkeypatch.setattr(metrics, "_weights_path", lambda metric, weights_=None: str(tmp_path / "w.bin"))
    monkeypatch.setattr(metrics, "_extractor", lambda metric, device, weights_=None: (
        lambda x: torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1), 6, "stand-in"))
    torch.manual_seed(0)
    cm = cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny", img_resolution=16)).eval()
    cfg = dict(method="ict", dataset="folder", data_dir=str(tmp_path / "mine"), net=preset_config("tiny",
               img_resolution=16), sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    (tmp_path / "run").mkdir()
    ckpt = save_checkpoint(str(tmp_path / "run"), 1, {"ema": cm.state_dict()}, cfg, {})
    argv = ["--checkpoint", ckpt, "--metric", "fid", "--num", "4", "--batch-size", "2"]
    assert eval_main(argv + ["--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["dataset"] == "folder" and "vs folder train" in r["mode"]
    cfg["data_dir"] = str(tmp_path / "moved")
    ckpt = save_checkpoint(str(tmp_path / "run"), 2, {"ema": cm.state_dict()}, cfg, {})
    code, err = _run_cli(["--checkpoint", ckpt, "--metric", "fid", "--num", "4"], capsys)
    assert code == 2 and "trained on the image folder" in err and "--dataset folder --data-dir" in err


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "no mu", "sigma not (d, d)"])
def test_damaged_reference_cache_is_computed_again(tmp_path, monkeypatch, capsys, damage):
    """A cached statistics file that a crash or a full disk left damaged (it was written without fsync) made every
    later evaluation fail: a BadZipFile / EOFError traceback, or a KeyError naming neither the file nor the fix.
    It is now named on stderr and computed again (the cache is derived data: nothing is lost)."""
    from train_fixtures import write_png_folder
    write_png_folder(tmp_path / "ref", n=6, size=8)
    monkeypatch.setenv("CMFAST_DATA", str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"stand-in weights")
    monkeypatch.setattr(metrics, "_weights_path", lambda metric, weights_=None: str(weights))
    feats = lambda x: torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)    # noqa: E731
    monkeypatch.setattr(metrics, "_extractor", lambda metric, device, weights_=None: (feats, 6, "stand-in"))
    mu, cov, _ = metrics.reference_stats("fid", "folder", str(tmp_path / "ref"), num=6, batch_size=4)
    path = metrics.reference_cache_path("fid", "folder", str(tmp_path / "ref"), 6)
    assert os.listdir(tmp_path / "cache") == [os.path.basename(path)]        # no temporary file left
    good = open(path, "rb").read()
    bad = {"truncated": good[:len(good) // 2], "empty": b"", "random": bytes(range(256)) * 8}.get(damage)
    if bad is None:
        f = dict(np.load(path))
        f.pop("mu") if damage == "no mu" else f.update(sigma=f["sigma"][:3])
        np.savez(path, **f)
    else:
        open(path, "wb").write(bad)
    capsys.readouterr()
    mu2, cov2, _ = metrics.reference_stats("fid", "folder", str(tmp_path / "ref"), num=6, batch_size=4)
    err = capsys.readouterr().err
    assert f"cached reference statistics unreadable ({path}: " in err and "computing them again" in err
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(cov2, cov)
    assert open(path, "rb").read() == good                                    # the cache is whole again
    with pytest.raises(ValueError, match="^" + re.escape(str(tmp_path / "nope.npz")) + ": not a statistics npz"):
        metrics.load_stats(tmp_path / "nope.npz")


def test_unwritable_reference_cache_keeps_the_computed_statistics(tmp_path, monkeypatch, capsys):
    """The data dir holding the reference set may be read-only (a shared dataset folder): the statistics were
    computed (minutes for FID's 50,000 images) and then lost to the cache write's PermissionError, every run. Now the
    evaluation goes on with them and says the cache could not be written."""
    from train_fixtures import write_png_folder
    write_png_folder(tmp_path / "ref", n=6, size=8)
    monkeypatch.setenv("CMFAST_DATA", str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"stand-in weights")
    feats = lambda x: torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)    # noqa: E731
    monkeypatch.setattr(metrics, "_weights_path", lambda metric, weights_=None: str(weights))
    monkeypatch.setattr(metrics, "_extractor", lambda metric, device, weights_=None: (feats, 6, "stand-in"))
    want = metrics.reference_stats("fid", "folder", str(tmp_path / "ref"), num=6, batch_size=4)
    path = metrics.reference_cache_path("fid", "folder", str(tmp_path / "ref"), 6)
    os.remove(path)

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(metrics.FeatureStats, "save", read_only)
    capsys.readouterr()
    mu, cov, meta = metrics.reference_stats("fid", "folder", str(tmp_path / "ref"), num=6, batch_size=4)
    np.testing.assert_array_equal(mu, want[0])
    np.testing.assert_array_equal(cov, want[1])
    assert meta["n"] == 6 and not os.path.exists(path)
    assert f"could not cache the reference statistics in {path} (Permission denied)" in capsys.readouterr().err


def test_reference_cache_id_sees_a_replaced_image_in_a_subfolder(tmp_path):
    """EDM's layout keeps images in subfolders: replacing one changes neither the folder's file count nor its own
    time, and the cached statistics were reused. Every file's path, size and time now make the id."""
    from train_fixtures import write_png_folder
    write_png_folder(tmp_path / "ref" / "00000", n=3, size=8)
    first = metrics._source_id(str(tmp_path / "ref"))
    assert metrics._source_id(str(tmp_path / "ref")) == first
    top = os.stat(tmp_path / "ref").st_mtime_ns
    img = tmp_path / "ref" / "00000" / "img0001.png"
    data_ = img.read_bytes()
    img.write_bytes(data_ + b"\0")                       # another image, same name
    assert os.stat(tmp_path / "ref").st_mtime_ns == top and metrics._source_id(str(tmp_path / "ref")) != first


def test_cifar10_reference_needs_the_whole_training_set(tmp_path):
    """FID's CIFAR-10 statistics are those of the 50,000 training images: a partial folder is refused (its statistics
    would be cached under the full set's name)."""
    from train_fixtures import write_cifar_folder
    write_cifar_folder(tmp_path, n_per_batch=4)
    with pytest.raises(ValueError, match="expected the 50000 training images, found 20"):
        next(metrics.reference_batches("cifar10", str(tmp_path)))


def test_cached_reference_statistics_follow_the_pipelines_code(tmp_path, monkeypatch):
    """The cache file of a dataset's statistics is named by the code that made them (loaders, reference_batches, the
    feature network's module) beside the weights: statistics cached before a preprocessing change (the audit's
    padding 0 -> 128) were read as current, and the shipped model's FD-FMNIST test passed on them."""
    a = metrics.reference_cache_path("fd-fmnist", "fashion-mnist", str(tmp_path), 60000)
    assert a == metrics.reference_cache_path("fd-fmnist", "fashion-mnist", str(tmp_path), 60000)
    assert os.path.dirname(a) == str(tmp_path) and "_n60000_" in a
    real = metrics.reference_batches

    def reference_batches(dataset, data_dir=None, num=50000, batch_size=250):   # another preprocessing
        return (b + 1 / 255 for b in real(dataset, data_dir, num, batch_size))
    monkeypatch.setattr(metrics, "reference_batches", reference_batches)
    assert metrics.reference_cache_path("fd-fmnist", "fashion-mnist", str(tmp_path), 60000) != a


def test_evaluate_scores_the_8_bit_images_a_sampler_would_write(tmp_path):
    """evaluate scores samples as the PNGs cmfast-sample writes (EDM's rounding: uint8 of clip(127.5 x + 128)), as the
    reference statistics come from 8-bit images: its value is FD-FMNIST of those levels, not of the raw floats.
    (Scoring the raw floats passed every test: the replayed Fashion-MNIST images are 8-bit levels already.)"""
    _fake_reference(tmp_path)
    g = torch.Generator().manual_seed(0)
    raw = (torch.rand(40, 1, 32, 32, generator=g) * 2.2 - 1.1).clamp(-1, 1)    # off the 8-bit grid, both ends hit
    u8 = (raw.double() * 127.5 + 128).clip(0, 255).to(torch.uint8)
    levels = (u8.double() / 127.5 - 1).float()
    res = metrics.evaluate(ReplayModel(raw), "fd-fmnist", steps=1, num=40, batch_size=20, data_dir=str(tmp_path))
    want = metrics.fd_fmnist(levels, data_dir=str(tmp_path))
    assert res["value"] == pytest.approx(want, rel=1e-6)
    assert abs(metrics.fd_fmnist(raw, data_dir=str(tmp_path)) - want) > 1e-5 * abs(want)       # 1e-4 here


def test_precision_recall_ball_includes_its_boundary():
    """Kynkaanniemi et al. 2019: a sample is in the manifold when ||phi - phi'|| <= the k-NN radius of phi' (closed
    ball). 1-D, k = 1: real radii are 1, the fake 3 is at distance exactly 1 from the real 2 (inside), 3.5 and 4 are
    not; fake radii are 0.5, so no real point is covered. (An open ball, '<', gave precision 0 and passed.)"""
    p, r = metrics.precision_recall(torch.tensor([[0.], [1.], [2.]]), torch.tensor([[3.], [3.5], [4.]]), k=1)
    assert p == pytest.approx(1 / 3) and r == 0.0
