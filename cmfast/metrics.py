"""Frechet distances: FID (Heusel et al. 2017) and FD-FMNIST, cmfast's offline quality metric; the Inception Score.

FD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to features. FID uses the
standard Inception-V3 pool3 features (pytorch-fid weights, local file only). FD-FMNIST uses the penultimate
features of a small Fashion-MNIST classifier shipped with cmfast: it runs offline in seconds on a CPU, but its
numbers are NOT comparable with FID. Inception Score (Salimans et al. 2016): FID's network, its 1008-way softmax
without the output bias, 10 splits, as the original code. Precision / recall: Kynkaanniemi et al. 2019 (k-NN
manifolds, k = 3).
Imports only torch and numpy here; scipy, torchvision, safetensors and tqdm load where used.
"""
import hashlib
import math
import os
import sys

import numpy as np
import torch

from ._device import checked_device

METRICS = ("fid", "fd-fmnist", "is")
SHAPES = {"fashion-mnist": (1, 32, 32), "cifar10": (3, 32, 32)}   # reference datasets' image shapes


# ---------------------------------------------------------------- streaming feature statistics (float64)

class FeatureStats:
    """Running mean and covariance of feature rows in float64; mergeable (Chan et al.'s parallel update).

    cov is the unbiased estimate (ddof = 1), equal to np.cov(features, rowvar=False) of all rows seen.
    """

    def __init__(self, dim):
        self.n = 0
        self.mean = np.zeros(dim, np.float64)
        self._m2 = np.zeros((dim, dim), np.float64)   # sum of outer products of centered rows

    def update(self, feats):
        f = feats.detach().cpu().double().numpy() if torch.is_tensor(feats) else np.asarray(feats, np.float64)
        if f.ndim != 2 or f.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features: expected (N, {self.mean.shape[0]}), got {f.shape}")
        if len(f):
            other = FeatureStats(f.shape[1])
            other.n, other.mean = len(f), f.mean(0)
            c = f - other.mean
            other._m2 = c.T @ c
            self.merge(other)
        return self

    def merge(self, other):
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"merge: dims differ ({self.mean.shape[0]} vs {other.mean.shape[0]})")
        n = self.n + other.n
        if other.n:
            delta = other.mean - self.mean
            self._m2 = self._m2 + other._m2 + np.outer(delta, delta) * (self.n * other.n / n)
            self.mean = self.mean + delta * (other.n / n)
            self.n = n
        return self

    @property
    def cov(self):
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 samples, got {self.n}")
        return self._m2 / (self.n - 1)

    def save(self, path, **meta):
        """Atomic write of mu, sigma, n (and string metadata) to an npz file (temp file, fsync, rename: a crash
        leaves the old file or none, never a part that a later run would read as the cache)."""
        import io
        from .training.checkpoint import atomic_write
        buf = io.BytesIO()
        np.savez(buf, mu=self.mean, sigma=self.cov, n=self.n, **{k: np.asarray(str(v)) for k, v in meta.items()})
        atomic_write(path, buf.getvalue())


def load_stats(path):
    """(mu, sigma, metadata dict) from an npz written by FeatureStats.save (or pytorch-fid's mu/sigma npz).
    ValueError naming the file when it is not one: unreadable or truncated, mu or sigma missing, their shapes not
    (d,) and (d, d), or values not finite."""
    import zipfile
    try:
        with np.load(path) as f:
            meta = {k: f[k].item() for k in f.files if k not in ("mu", "sigma") and f[k].size == 1}
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a statistics npz with mu and sigma ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if mu.ndim != 1 or sigma.shape != mu.shape * 2 or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: expected finite mu (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    return mu, sigma, meta


# ---------------------------------------------------------------- Frechet distance

def sqrtm_psd(a):
    """Principal square root of a symmetric positive semi-definite matrix via eigh (negative round-off -> 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2):
    """tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the latter is symmetric PSD, so eigh is stable even
    when S1 S2 is singular (where scipy.linalg.sqrtm needs pytorch-fid's eps * I offset)."""
    r = sqrtm_psd(sigma1)
    w = np.linalg.eigvalsh(((r @ sigma2 @ r) + (r @ sigma2 @ r).T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def _array(a, what: str):
    """a as a float64 numpy array: torch tensors on any device (a CUDA one failed in numpy's conversion), arrays,
    numbers; a string or None is refused (numpy read None as NaN: 'expected mu (1,)'; 'a' as 'could not convert')."""
    if torch.is_tensor(a):
        a = a.detach().cpu()
    try:
        if a is None or isinstance(a, (str, bytes)):
            raise TypeError
        return np.asarray(a, np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"frechet_distance: {what}: expected an array of numbers, got {type(a).__name__}") from None


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 -> float."""
    mu1, mu2 = np.atleast_1d(_array(mu1, "mu1")), np.atleast_1d(_array(mu2, "mu2"))
    s1, s2 = np.atleast_2d(_array(sigma1, "sigma1")), np.atleast_2d(_array(sigma2, "sigma2"))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: expected mu ({d},) and sigma ({d}, {d}) twice, got "
                         f"{mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, s1, mu2, s2)):     # a NaN distance came back without a word
        raise ValueError("frechet_distance: expected finite means and covariances, got NaN / inf")
    diff = mu1 - mu2
    # >= 0 in exact arithmetic; rank-deficient covariances (fewer samples than features) left -5e-4 for identical
    # inputs (50 samples, 2048 features), a negative distance from round-off
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2)))


# ---------------------------------------------------------------- precision / recall (Kynkaanniemi et al. 2019)

def _knn_radii(feats, k, chunk):
    radii = []
    for i in range(0, len(feats), chunk):
        d = torch.cdist(feats[i:i + chunk], feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)    # k + 1: the point itself is at distance 0
    return torch.cat(radii)


def _coverage(query, ref, radii, chunk):
    inside = []
    for i in range(0, len(query), chunk):
        inside.append((torch.cdist(query[i:i + chunk], ref) <= radii[None]).any(1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real_feats, fake_feats, k=3, chunk=1024):
    """(precision, recall): the share of fake samples inside the real k-NN manifold, and of real in the fake."""
    real, fake = torch.as_tensor(real_feats).float(), torch.as_tensor(fake_feats).float()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1] or min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall: expected (N, D) features with N > k={k}, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    precision = _coverage(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall


# ---------------------------------------------------------------- Inception Score (Salimans et al. 2016)

class InceptionScoreStats:
    """The Inception Score of `num` samples, streamed: IS_k = exp(mean over part k of KL(p(y|x) || p_k(y))), p_k the
    mean prediction of part k, over `splits` consecutive parts (rows [k num // splits, (k+1) num // splits) in sample
    order); mean and standard deviation (ddof 0) of the IS_k, as the original code (improved-gan) and StyleGAN3's
    and torch-fidelity's metrics report them. Per part it keeps sum_x sum_y p log p and sum_x p in float64, so the
    predictions (50,000 x 1008) are never held: mean_x KL = (sum_x sum_y p log p) / n - sum_y p_k log p_k."""

    def __init__(self, num: int, splits: int = 10, classes: int = 1008):
        num, splits = _check_count("num", num, 1), _check_count("splits", splits, 1)
        if splits > num:
            raise ValueError(f"splits: expected at most num={num} parts, got {splits}")
        self.num, self.splits, self.n = num, splits, 0
        self.bounds = np.array([k * num // splits for k in range(splits + 1)])
        self._plogp = np.zeros(splits, np.float64)
        self._psum = np.zeros((splits, classes), np.float64)

    def update(self, logits):
        """Add the rows of `logits` (N, classes), the next samples in order."""
        z = logits.detach().cpu().double().numpy() if torch.is_tensor(logits) else np.asarray(logits, np.float64)
        if z.ndim != 2 or z.shape[1] != self._psum.shape[1]:
            raise ValueError(f"logits: expected (N, {self._psum.shape[1]}), got {z.shape}")
        if self.n + len(z) > self.num:
            raise ValueError(f"logits: {self.n + len(z)} rows for an Inception Score of {self.num} samples")
        if not np.isfinite(z).all():
            raise ValueError("logits: expected finite values, got NaN / inf")
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        p = np.exp(logp)
        part = np.searchsorted(self.bounds, self.n + np.arange(len(z)), side="right") - 1
        np.add.at(self._plogp, part, (p * logp).sum(1))
        np.add.at(self._psum, part, p)
        self.n += len(z)
        return self

    def result(self) -> tuple[float, float]:
        """(mean, std) of the parts' scores; all `num` samples must have been added."""
        if self.n != self.num:
            raise ValueError(f"Inception Score of {self.num} samples: {self.n} added")
        sizes = np.diff(self.bounds).astype(np.float64)
        pbar = self._psum / sizes[:, None]
        kl = self._plogp / sizes - (pbar * np.log(np.where(pbar > 0, pbar, 1.0))).sum(1)
        scores = np.exp(kl)
        return float(scores.mean()), float(scores.std())


def inception_score(images, splits=10, batch_size=100, device="cpu", weights=None) -> tuple[float, float]:
    """(mean, std) Inception Score of [-1, 1] images (N, C in {1, 3}, H, W) with FID's Inception-V3 (pytorch-fid's
    weights, local file only), in `splits` consecutive parts (at most N, as evaluate and score_samples)."""
    _check_images(images)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels for the Inception network, got {tuple(images.shape)}")
    batch_size = _check_count("batch_size", batch_size)
    stats = InceptionScoreStats(len(images), min(_check_count("splits", splits), len(images)))
    device = checked_device(device)
    from ._inception import load_fid_inception
    net = load_fid_inception(_weights_path("fid", weights), device)
    with torch.no_grad():
        for x in _chunks(images, batch_size):
            stats.update(net(x.to(device=device, dtype=torch.float32), logits=True)[1])
    return stats.result()


# ---------------------------------------------------------------- feature extractors and reference statistics

def _progress(it, total, desc, enabled):
    import sys
    if not enabled or not sys.stderr.isatty():
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, desc=desc, unit="batch")


@torch.no_grad()
def feature_stats(extractor, batches, dim, device="cpu"):
    """FeatureStats of extractor(batch) over an iterable of [-1, 1] image batches."""
    stats = FeatureStats(dim)
    for x in batches:   # float32, as the feature network's weights (float64 / float16 images failed in its conv)
        stats.update(extractor(x.to(device=device, dtype=torch.float32)).double())
    return stats


def _chunks(images, batch_size):
    return (images[i:i + batch_size] for i in range(0, len(images), batch_size))


def _file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _source_id(path: str) -> str:
    """A short id of an image folder or zip, so the cached statistics of two folders never meet and a changed one is
    computed again: its absolute path and, for a zip, its size and modification time; for a folder, every file's
    relative path, size and modification time (a replaced image in a subfolder changes neither the folder's file
    count nor its own time)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        from .data import DataError
        raise DataError(f"reference images not found: {path}")
    h = hashlib.sha256(path.encode())
    if os.path.isfile(path):
        st = os.stat(path)
        h.update(f":{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                h.update(f"\0{os.path.relpath(os.path.join(root, f), path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _pipeline_id(metric: str) -> str:
    """A short hash of the code that turns reference files into features: the loaders (cmfast/data.py),
    reference_batches, and the feature network's module. Cached statistics of an older pipeline (another padding,
    resize or feature layer) are computed again, not reused."""
    import inspect

    from . import data
    from . import _fd_classifier, _inception
    h = hashlib.sha256()
    for obj in (data, reference_batches, _inception if metric == "fid" else _fd_classifier):
        try:
            h.update(inspect.getsource(obj).encode())
        except (OSError, TypeError):      # no source files (a frozen install): the package version stands in
            from . import __version__
            h.update(f"{obj.__name__}:{__version__}".encode())
    return h.hexdigest()[:8]


def reference_cache_path(metric, dataset, data_dir=None, num=50000, weights=None) -> str:
    """Where reference_stats caches a dataset's statistics: in data_dir (named datasets) or cmfast's data dir
    (folders, under an id of the folder), named by metric, dataset, count, the feature network's weights and the
    pipeline's code."""
    return _cache_key(metric, dataset, data_dir, num, weights)[0]


def _cache_key(metric, dataset, data_dir, num, weights) -> tuple[str, str]:
    """(reference_cache_path's path, the feature weights' hash: the statistics file records it)."""
    from .data import default_data_dir
    net_hash = _file_hash(_weights_path(metric, weights))
    root, name = data_dir or default_data_dir(), dataset
    if dataset == "folder":
        if not data_dir:
            raise ValueError("dataset 'folder': give the folder or zip of reference images as data_dir (--data-dir)")
        root, name = default_data_dir(), f"folder-{_source_id(data_dir)}"
    return os.path.join(root, f"{metric}_{name}_train_n{num}_{net_hash}_{_pipeline_id(metric)}.npz"), net_hash


def reference_stats(metric, dataset, data_dir=None, num=50000, batch_size=250, device="cpu", weights=None):
    """(mu, sigma, meta) of a dataset's train split for a metric, computed once and cached as npz in the data dir.

    dataset 'folder': the images of the folder or zip data_dir (ImageNet 64x64, LSUN, ...: EDM's dataset_tool
    layout), `num` of them drawn with a fixed seed, cached in cmfast's data dir under an id of that folder.
    The cache file name (reference_cache_path) carries the feature network's hash and the pipeline's code hash, so
    new weights or a changed preprocessing never reuse stale statistics.
    """
    path, net_hash = _cache_key(metric, dataset, data_dir, num, weights)
    root = os.path.dirname(path)
    if os.path.isfile(path):
        try:
            return load_stats(path)
        except ValueError as e:     # a damaged cache (a crash, a full disk) is computed again, not fatal every run
            print(f"cmfast: cached reference statistics unreadable ({e}): computing them again", file=sys.stderr,
                  flush=True)
    # Once per dataset, metric and pipeline; tens of seconds (Fashion-MNIST on a CPU) with no other output
    print(f"cmfast: computing the {metric} reference statistics of {dataset} (once; cached in {path})",
          file=sys.stderr, flush=True)
    extractor, dim, impl = _extractor(metric, device, weights)
    stats = feature_stats(extractor, reference_batches(dataset, data_dir, num, batch_size), dim, device)
    meta = dict(metric=metric, dataset=dataset, split="train", implementation=impl, weights_sha256_16=net_hash,
                **({"source": os.path.abspath(data_dir)} if dataset == "folder" else {}))
    try:
        os.makedirs(root, exist_ok=True)
        stats.save(path, **meta)
    except OSError as e:    # a read-only data dir, a full disk: the statistics just computed are used, not lost
        print(f"cmfast: could not cache the reference statistics in {path} ({e.strerror or e}): they are computed "
              f"again next time (set CMFAST_DATA or --data-dir to a writable folder)", file=sys.stderr, flush=True)
    return stats.mean, stats.cov, dict(meta, n=stats.n)


def reference_features(metric, dataset, data_dir=None, num=10000, batch_size=250, device="cpu", weights=None):
    """(n, dim) float32 features of `num` reference images (a seed-0 draw, as reference_stats; n < num when the set is
    smaller), for precision / recall, which need the points themselves; cached as .npy beside the statistics (10,000
    Inception features: 80 MB), under the same naming (metric, dataset, count, weights, pipeline)."""
    path = os.path.splitext(_cache_key(metric, dataset, data_dir, num, weights)[0])[0] + "_features.npy"
    if os.path.isfile(path):
        try:
            feats = np.load(path, allow_pickle=False)
            if feats.ndim == 2 and feats.dtype == np.float32 and 0 < len(feats) <= num and np.isfinite(feats).all():
                return feats
            why = f"shape {feats.shape}, {feats.dtype}"
        except (OSError, ValueError, EOFError) as e:
            why = f"{type(e).__name__}: {e}"
        print(f"cmfast: cached reference features unreadable ({path}: {why}): computing them again", file=sys.stderr,
              flush=True)
    print(f"cmfast: computing the {metric} reference features of {num} {dataset} images (once; cached in {path})",
          file=sys.stderr, flush=True)
    extractor, _, _ = _extractor(metric, device, weights)
    with torch.no_grad():
        feats = np.concatenate([extractor(x.to(device=device, dtype=torch.float32)).float().cpu().numpy()
                                for x in reference_batches(dataset, data_dir, num, batch_size)])
    try:
        import io
        from .training.checkpoint import atomic_write
        buf = io.BytesIO()
        np.save(buf, feats)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, buf.getvalue())
    except OSError as e:
        print(f"cmfast: could not cache the reference features in {path} ({e.strerror or e}): they are computed "
              f"again next time", file=sys.stderr, flush=True)
    return feats


CIFAR10_TRAIN = 50_000


def reference_batches(dataset, data_dir=None, num=50000, batch_size=250):
    """The reference images, `num` of them (a fixed-seed draw when the set is larger), as float32 [-1, 1] batches
    converted one at a time (the set stays uint8 until then: an LSUN reference would be 39 GB as one float tensor).
    dataset: 'fashion-mnist' (the whole train split), 'cifar10' (train), 'folder' (the images of data_dir)."""
    from .data import load_cifar10, load_fashion_mnist, load_folder
    if dataset == "fashion-mnist":
        ds = load_fashion_mnist(data_dir, "train", full=True)
    elif dataset == "cifar10":
        ds = load_cifar10(data_dir)
        if len(ds) != CIFAR10_TRAIN:   # statistics of a partial set would be cached under the full set's name
            from .data import DataError
            raise DataError(f"CIFAR-10 reference: expected the {CIFAR10_TRAIN} training images, found {len(ds)}")
    elif dataset == "folder":
        ds = load_folder(data_dir)
    else:
        raise ValueError(f"dataset must be one of {tuple(SHAPES) + ('folder',)}, got {dataset!r}")
    idx = torch.arange(len(ds))
    if num < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:num]
    return (ds.batch(idx[i:i + batch_size])[0] for i in range(0, len(idx), batch_size))


def _weights_path(metric, weights=None):
    if metric in ("fid", "is"):
        from ._inception import find_weights
        return find_weights(weights)
    if metric == "fd-fmnist":
        from ._fd_classifier import ASSET
        return weights or ASSET
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _extractor(metric, device, weights=None):
    """(features function, feature dim, implementation string) for "fid" or "fd-fmnist"."""
    path = _weights_path(metric, weights)
    if metric == "fid":
        from ._inception import IMPLEMENTATION, load_fid_inception
        return load_fid_inception(path, device), 2048, IMPLEMENTATION
    from ._fd_classifier import FEATURE_DIM, load_classifier
    net, meta = load_classifier(path, device)
    return net.features, FEATURE_DIM, (f"FD-FMNIST: cmfast offline metric, not comparable with FID (CNN "
                                       f"penultimate {FEATURE_DIM}-d features, classifier test acc "
                                       f"{meta.get('test_accuracy', '?')})")


def _check_count(name, v, lo: int = 1) -> int:
    """v as an int >= lo (numpy's integers too): a batch size of 0 failed as 'range() arg 3 must not be zero' (and
    '5' or 2.5 inside range()) once the reference statistics were being computed."""
    from .schedules import as_integer
    k = as_integer(v)
    if k is None or k < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
    return k


def _check_dataset(dataset) -> None:
    """A reference dataset reference_batches reads: refused before the feature network loads, not after."""
    if dataset not in (*SHAPES, "folder"):
        raise ValueError(f"dataset must be one of {tuple(SHAPES) + ('folder',)}, got {dataset!r}")


def fd_fmnist(images, batch_size=500, device="cpu", data_dir=None):
    """FD-FMNIST of [-1, 1] images (N, 1, 32, 32) against Fashion-MNIST train (all 60k), float."""
    _check_images(images, channels=1, size=(32, 32))
    batch_size = _check_count("batch_size", batch_size)
    device = checked_device(device)
    mu2, s2, _ = reference_stats("fd-fmnist", "fashion-mnist", data_dir, num=60000, batch_size=batch_size,
                                 device=device)
    extractor, dim, _ = _extractor("fd-fmnist", device)
    stats = feature_stats(extractor, _chunks(images, batch_size), dim, device)
    return frechet_distance(stats.mean, stats.cov, mu2, s2)


def fid(images, dataset="cifar10", num_ref=50000, batch_size=100, device="cpu", data_dir=None, weights=None):
    """FID of [-1, 1] images (N, C, H, W) against `dataset`'s train split (pytorch-fid's Inception weights)."""
    _check_images(images)
    if images.shape[1] not in (1, 3):    # the Inception network's own error came after the reference statistics
        raise ValueError(f"images: expected 1 or 3 channels for FID's Inception network, got {tuple(images.shape)}")
    _check_dataset(dataset)
    batch_size, num_ref = _check_count("batch_size", batch_size), _check_count("num_ref", num_ref)
    device = checked_device(device)
    mu2, s2, _ = reference_stats("fid", dataset, data_dir, num_ref, batch_size, device, weights)
    extractor, dim, _ = _extractor("fid", device, weights)
    stats = feature_stats(extractor, _chunks(images, batch_size), dim, device)
    return frechet_distance(stats.mean, stats.cov, mu2, s2)


def _check_images(images, channels=None, size=None):
    """(N, C, H, W) float images in [-1, 1] (channels and (H, W) = size where given): a uint8 batch (cmfast-sample's
    .npz) is refused by dtype, not scored on the wrong scale or failed inside a convolution."""
    hw = tuple(images.shape[2:]) if torch.is_tensor(images) and images.ndim == 4 else None
    if not torch.is_tensor(images) or images.ndim != 4 or (channels and images.shape[1] != channels) or \
            (size and hw != tuple(size)):
        want = f"(N, {channels or 'C'}, {size[0] if size else 'H'}, {size[1] if size else 'W'})"
        got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images: expected a {want} tensor in [-1, 1], got {got}")
    if not images.is_floating_point():
        raise TypeError(f"images: expected floating-point images in [-1, 1], got {images.dtype} (uint8 x: "
                        f"x.float() / 127.5 - 1)")
    if len(images) < 2:
        raise ValueError(f"images: need at least 2 images for a covariance, got {len(images)}")
    # NaN ended in numpy's 'Eigenvalues did not converge'; [0, 255] (or [0, 1] x 10) floats were scored as they
    # were. Unclamped samples a little outside [-1, 1] pass: the bound is 2.
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images: expected finite values, got NaN / inf")
    if lo < -2 or hi > 2:
        raise ValueError(f"images: expected values in [-1, 1], got [{lo:.4g}, {hi:.4g}] (8-bit pixels: "
                         "x.float() / 127.5 - 1)")


# ---------------------------------------------------------------- evaluating a model

def default_sigmas(steps):
    """Sampling noise levels for `steps` evaluations: (80,) and ECT's two-step (80, 0.821); for more steps the
    Karras grid with steps + 1 levels (sigma_min dropped), decreasing."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    if steps <= 2:
        return (80.0, 0.821)[:steps]
    from .schedules import karras_sigmas
    return tuple(float(s) for s in karras_sigmas(steps + 1).flip(0)[:steps])


def model_sigmas(model, steps: int) -> tuple[float, ...]:
    """default_sigmas(steps) with the first level at the model's own sigma_max (80 for the paper's models)."""
    levels = default_sigmas(steps)
    return (float(getattr(model, "sigma_max", levels[0])), *levels[1:])


def search_sigmas(score, steps: int = 2, sigma_min: float = 0.002, sigma_max: float = 80.0, iters: int = 6,
                  start: tuple | None = None, log=None) -> dict:
    """Algorithm 1's noise levels by search (the CM paper tunes them on FID): the first level is sigma_max; each
    later one, greedily in turn, by ternary search over log sigma between sigma_min and the level before it,
    minimizing score(sigmas) (lower is better; e.g. FD-FMNIST of a fixed noise seed). `start` (levels, e.g. the
    defaults) is scored too, so the result is never worse than it. -> {"sigmas", "score", "trials": [[sigmas,
    score], ...]} with every evaluation in order."""
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps: expected an integer >= 2 (one step has nothing to search), got {steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if iters < 1:
        raise ValueError(f"iters: expected >= 1, got {iters}")
    seen: dict[tuple, float] = {}

    def f(sig):
        sig = tuple(round(float(v), 6) for v in sig)
        if sig not in seen:
            seen[sig] = float(score(sig))
            if log:
                log(f"sigmas {list(sig)}: {seen[sig]:.4f}")
        return seen[sig]
    if start is not None:
        start = tuple(float(v) for v in start)
        if len(start) != steps or any(b >= a for a, b in zip(start, start[1:])):
            raise ValueError(f"start: expected {steps} decreasing levels, got {list(start)}")
        f(start)
    prefix = [float(sigma_max)]
    for _ in range(steps - 1):
        lo, hi = math.log(sigma_min) + 1e-3, math.log(prefix[-1]) - 1e-3
        # later levels during this search: the Karras grid below the candidate (replaced when their turn comes)
        def full(t, prefix=tuple(prefix)):
            rest = steps - len(prefix) - 1
            tail = [math.exp(t + (math.log(sigma_min) - t) * (i + 1) / (rest + 1)) for i in range(rest)]
            return prefix + (math.exp(t),) + tuple(tail)
        for _ in range(iters):
            m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
            if f(full(m1)) <= f(full(m2)):
                hi = m2
            else:
                lo = m1
        prefix.append(math.exp(min(((t, f(full(t))) for t in (lo, (lo + hi) / 2, hi)), key=lambda p: p[1])[0]))
    best = min(seen.items(), key=lambda kv: kv[1])
    return {"sigmas": list(best[0]), "score": best[1], "trials": [[list(k), v] for k, v in seen.items()]}


def _image_shape(model, dataset):
    for m in (model, getattr(model, "net", None)):
        res = getattr(m, "img_resolution", None)
        ch = getattr(m, "img_channels", None) or getattr(m, "in_channels", None)
        if isinstance(res, int) and isinstance(ch, int):
            return (ch, res, res)
    return SHAPES[dataset]


def _quantize(x):
    """[-1, 1] -> the 8-bit level cmfast-sample would write (EDM's rounding), back in [-1, 1]: the reference
    statistics come from uint8 images."""
    return (x.float() * 127.5 + 128).clamp(0, 255).floor() / 127.5 - 1


def _metric_dataset(metric, dataset):
    """The metric checked and its reference dataset: the one given, else Fashion-MNIST for fd-fmnist (its only one),
    else CIFAR-10."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    dataset = dataset or ("fashion-mnist" if metric == "fd-fmnist" else "cifar10")
    if metric == "fd-fmnist" and dataset != "fashion-mnist":
        raise ValueError(f"fd-fmnist compares with Fashion-MNIST only, got dataset {dataset!r}")
    _check_dataset(dataset)
    return dataset


def _check_scoring(metric, num, shape, is_splits, pr_num, pr_k, makes):
    """The scoring side's arguments (evaluate, score_samples), checked before any work: (is_splits, pr_num, pr_k).
    shape: the images' (C, H, W); `makes` words the source in a message ('this model makes')."""
    is_splits = _check_count("is_splits", is_splits)
    if pr_num is not None:
        if metric == "is":
            raise ValueError("pr_num: precision / recall compare with reference images; the Inception Score has none "
                             "(use fid)")
        pr_k = _check_count("pr_k", pr_k)
        pr_num = _check_count("pr_num", pr_num, pr_k + 1)
        if pr_num > num:
            raise ValueError(f"pr_num: expected at most num={num} samples, got {pr_num}")
    if metric in ("fid", "is") and shape[0] not in (1, 3):     # else the Inception network's error after sampling
        raise ValueError(f"{metric} scores 1- or 3-channel images (the Inception network's); {makes} "
                         f"{tuple(shape)}")
    if metric == "fd-fmnist" and tuple(shape) != SHAPES["fashion-mnist"]:   # else a conv2d traceback after the stats
        raise ValueError(f"fd-fmnist scores {SHAPES['fashion-mnist']} images (Fashion-MNIST's); {makes} "
                         f"{tuple(shape)}: score it with fid")
    return is_splits, pr_num, pr_k


def _ref_stats(path, metric, pr_num=None):
    """Given reference statistics for a Frechet distance: (mu, sigma, metadata, absolute path, images), or None. Any
    npz with mu and sigma (load_stats): cmfast's cache files, pytorch-fid's and EDM's fid-refs files, openai's
    reference batches (VIRTUAL_imagenet64_labeled.npz and the like; their spatial statistics are left alone). images:
    with pr_num, the first pr_num of the file's own uint8 (N, H, W, C) images (arr_0, as openai's batches hold them,
    which their evaluator's precision / recall use), else None (precision / recall then read the dataset's)."""
    if path is None:
        return None
    if metric == "is":
        raise ValueError("ref_stats: the Inception Score compares with no reference")
    if not os.path.isfile(path):
        raise ValueError(f"ref_stats: {path} not found")
    mu, sigma, meta = load_stats(path)
    images = None
    if pr_num is not None:
        with np.load(path, allow_pickle=False) as f:
            a = f["arr_0"] if "arr_0" in f.files else None
        if a is not None and a.dtype == np.uint8 and a.ndim == 4 and a.shape[-1] in (1, 3) and len(a):
            images = a[:pr_num]
    return mu, sigma, meta, os.path.abspath(path), images


def _score(batches, metric, num, dataset, device, data_dir, weights, is_splits, pr_num, pr_k, source,
           ref=None) -> dict:
    """Score `num` images, given as [-1, 1] batches (quantized to 8 bits here), with `metric` -> the result's head:
    metric, value (std, splits for IS), implementation, mode (naming `source`), and the Inception Score (fid) and
    precision / recall (pr_num) where they apply, and the reference read: ref_stats (the given file) and dataset
    (None where no dataset was read). ref: given reference statistics (_ref_stats), else the dataset's."""
    from ._inception import IS_IMPLEMENTATION, FIDInception, load_fid_inception
    if metric == "is":      # no reference data: the Inception network alone
        extractor, impl, stats = load_fid_inception(_weights_path("is", weights), device), IS_IMPLEMENTATION, None
    else:
        if ref is None:
            mu_ref, s_ref, ref_meta = reference_stats(metric, dataset, data_dir, num=60000 if metric == "fd-fmnist"
                                                      else 50000, device=device, weights=weights)
            against = f"{dataset} train ({ref_meta.get('n', '?')} images)"
        else:
            mu_ref, s_ref, ref_meta, path, _ = ref
            against = f"{path} ({ref_meta.get('n', '?')} images)"
        extractor, dim, impl = _extractor(metric, device, weights)
        if ref is not None and len(mu_ref) != dim:      # given statistics of another network: before the samples
            raise ValueError(f"ref_stats: {ref[3]} holds {len(mu_ref)}-d statistics; {metric}'s features are {dim}-d")
        stats = FeatureStats(dim)
    ref_feats, ref_name = None, dataset
    if pr_num is not None and ref is not None and ref[4] is not None:     # the reference file's own images
        with torch.no_grad():       # kept on the device, where precision / recall are computed
            ref_feats = torch.cat([extractor(x.to(device)).float() for x in _uint8_batches(ref[4], 250)])
        ref_name = os.path.basename(ref[3])
    elif pr_num is not None:
        ref_feats = torch.from_numpy(reference_features(metric, dataset, data_dir, pr_num, device=device,
                                                        weights=weights)).to(device)
    if ref_feats is not None and len(ref_feats) <= pr_k:    # a tiny folder: said before the samples are made
        raise ValueError(f"pr_num: precision / recall need more than k={pr_k} reference images; {ref_name} has "
                         f"{len(ref_feats)}")
    fake_feats: list[torch.Tensor] = []
    splits = min(is_splits, num)
    is_stats = InceptionScoreStats(num, splits) if isinstance(extractor, FIDInception) else None     # fid, is
    seen = 0
    with torch.no_grad():
        for x in batches:
            x = _quantize(x.to(device))
            seen += len(x)
            if is_stats is None:
                features = extractor(x)
            else:
                features, logits = extractor(x, logits=True)     # FID's features and IS's logits: one pass
                is_stats.update(logits)
            if stats is not None:
                stats.update(features.double())
            if pr_num is not None and sum(map(len, fake_feats)) < pr_num:
                fake_feats.append(features.float())     # on the device, where precision / recall are computed
    if seen != num:
        raise ValueError(f"expected {num} images to score, got {seen}")
    if metric == "is":
        value, std = is_stats.result()
        return {"metric": "IS", "value": value, "std": std, "splits": splits, "implementation": impl,
                "mode": f"{num} samples (8-bit), {splits} splits; {source}", "dataset": None}
    head = {"metric": "FD-FMNIST" if metric == "fd-fmnist" else "FID",
            "value": frechet_distance(stats.mean, stats.cov, mu_ref, s_ref), "implementation": impl,
            "mode": f"{num} samples (8-bit) vs {against}; {source}",
            **({"ref_stats": ref[3]} if ref else {}),
            # the dataset where it was read: for the statistics, or for precision / recall beside given statistics
            "dataset": dataset if ref is None or (pr_num is not None and ref[4] is None) else None}
    if is_stats is not None:
        m, sd = is_stats.result()
        head["inception_score"] = {"mean": m, "std": sd, "splits": splits, "implementation": IS_IMPLEMENTATION}
    if pr_num is not None:
        fake = torch.cat(fake_feats)[:pr_num]
        head["precision"], head["recall"] = precision_recall(ref_feats, fake, k=pr_k)
        head["precision_recall"] = {"k": pr_k, "samples": len(fake), "reference": len(ref_feats),
                                    "method": "Kynkaanniemi et al. 2019, k-NN manifolds in the metric's features"}
    return head


@torch.no_grad()
def evaluate(model, metric, steps=None, num=50000, batch_size=256, seed=0, sigmas=None, dataset=None,
             device=None, data_dir=None, weights=None, progress=False, engine="eager", dtype=torch.float32,
             is_splits=10, pr_num=None, pr_k=3, ref_stats=None, clip_denoised=False):
    """Sample `num` images and score them -> a JSON-ready dict that records implementation and mode.

    A ConsistencyModel samples with cmfast.sample (Algorithm 1; sigmas default to model_sigmas(model, steps)), an
    EDMDenoiser with EDM's Heun sampler (steps default 18); engine and dtype as cmfast.sampling.generate_batches
    (default: eager, float32); clip_denoised as cmfast.sample's. Noise per batch and class labels (balanced) follow
    cmfast-sample, so the same seed, engine and batch size score the same images. Samples are quantized to 8 bits before scoring.
    metric "fd-fmnist" (cmfast's offline metric, against Fashion-MNIST train), "fid" (Inception-V3, against cifar10
    train unless `dataset` says otherwise; the result also holds the samples' Inception Score, from the same network
    pass) or "is" (the Inception Score alone: no reference data; value = the mean over `is_splits` parts, with std).
    pr_num (fid, fd-fmnist): also precision and recall (Kynkaanniemi et al. 2019, k-NN manifolds with k = pr_k, as
    the CM paper's ImageNet 64 / LSUN tables) of the first pr_num samples against pr_num reference images, in the
    metric's features. ref_stats (fid, fd-fmnist): an npz of reference mu and sigma to compare with instead of the
    dataset's (e.g. EDM's cifar10-32x32.npz or openai's VIRTUAL_imagenet64_labeled.npz, for the papers' protocol);
    precision / recall then use the file's own images (arr_0, as openai's reference batches hold them) where it has
    them, else the dataset's.
    """
    import time
    from .precond import EDMDenoiser
    from .sampling import (check_clip_denoised, check_edm_steps, check_engine_args, check_model, check_sigmas,
                           generate_batches, resolve_engine)
    from .schedules import as_integer
    # Every argument is checked here, before the reference statistics (minutes, the first time) are computed:
    # a bad level, engine, seed or model failed after them.
    dataset = _metric_dataset(metric, dataset)
    check_model(model, want="a cmfast model (ConsistencyModel or EDMDenoiser)")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a cmfast model (ConsistencyModel or EDMDenoiser), got "
                        f"{type(model).__name__}")
    check_engine_args(engine, dtype)
    if as_integer(seed) is None:     # a string was repeated 1000003 times by the noise's seeding arithmetic
        raise TypeError(f"seed: expected an integer, got {seed!r}")
    given = sigmas is not None and not (isinstance(sigmas, (tuple, list)) and not sigmas)
    edm = isinstance(model, EDMDenoiser)
    check_clip_denoised(clip_denoised, edm)     # here: generate_batches' own check runs at its first batch
    if edm:
        if given:
            raise ValueError("sigmas: an EDM teacher samples with its Heun schedule; give steps instead")
        steps = 18 if steps is None else check_edm_steps(steps, "steps")   # steps=0 sampled 18 (`steps or 18`)
        sampler = f"EDM Heun, {steps} steps"
    else:
        # default: starting at the model's own sigma_max, as cmfast-sample (80 was hard-coded here); given levels
        # checked now ('80' was read as the levels 8 and 0)
        sigmas = check_sigmas(sigmas, model.sigma_min, model.sigma_max) if given else \
            model_sigmas(model, 1 if steps is None else steps)
        if steps is not None and steps != len(sigmas):
            raise ValueError(f"steps={steps} but {len(sigmas)} sigmas given: {list(sigmas)}")
        steps, sampler = len(sigmas), f"consistency sampling (Algorithm 1), {len(sigmas)}-step"
    n, b = as_integer(num), as_integer(batch_size)     # '10' failed inside a comparison
    if n is None or b is None or n < 2 or b < 1:
        raise ValueError(f"num >= 2 and batch_size >= 1 expected, got num={num!r}, batch_size={batch_size!r}")
    num, batch_size = n, b
    shape = _image_shape(model, dataset)
    is_splits, pr_num, pr_k = _check_scoring(metric, num, shape, is_splits, pr_num, pr_k, "this model makes")
    ref = _ref_stats(ref_stats, metric, pr_num)
    home = next(model.parameters()).device
    device = checked_device(device or home)
    t0 = time.time()
    # The model samples on `device` in eval mode (sample's own) and is given back as it came: on its device, in its
    # mode (it was left in eval mode, moved to `device`).
    model.to(device)
    try:
        engine = resolve_engine(engine, model, dtype)
        batches = generate_batches(model, num, sigmas=None if edm else sigmas, steps=steps if edm else None,
                                   seed=seed, batch_size=batch_size, engine=engine, dtype=dtype, shape=shape,
                                   clip_denoised=clip_denoised)
        batches = (x for _, x in _progress(batches, math.ceil(num / min(batch_size, num)), f"{metric} {steps}-step",
                                           progress))
        head = _score(batches, metric, num, dataset, device, data_dir, weights, is_splits, pr_num, pr_k, sampler, ref)
    finally:
        model.to(home)
    return {**head,
            "steps": steps, "sigmas": list(sigmas) if sigmas else None, "num": num, "seed": seed,
            "batch_size": batch_size, "device": str(device), "engine": engine,
            "dtype": str(dtype).removeprefix("torch."), "clip_denoised": clip_denoised,
            "seconds": round(time.time() - t0, 2)}


def load_samples(path):
    """uint8 images (N, H, W, C) from a samples file: an .npz holding them as arr_0 (cmfast-sample --npz, and the
    sample files of openai/guided-diffusion and consistency_models, whose arr_1 labels are ignored) or as its only
    array, or an .npy of them; or an image folder or zip (PNG / JPEG, cmfast.data.load_folder). One ValueError naming
    the file when it is none of these."""
    if os.path.isdir(path) or str(path).lower().endswith(".zip"):
        from .data import load_folder
        return load_folder(path).images.permute(0, 2, 3, 1).numpy()
    import zipfile
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):      # an .npy: the array itself (`with` on it was a TypeError traceback)
            arr = loaded
        else:
            with loaded as f:
                names = list(f.files)
                name = "arr_0" if "arr_0" in names else (names[0] if len(names) == 1 else None)
                if name is None:
                    raise ValueError(f"no arr_0 among {names}")
                arr = f[name]
    except FileNotFoundError:
        raise ValueError(f"{path}: samples not found") from None
    except (OSError, EOFError, ValueError, KeyError, AttributeError, zipfile.BadZipFile) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if "allow_pickle" in str(e):    # numpy's last guess, a pickle, and its advice to load it unsafely: neither fits
            why = ("one image, not a samples file: give the folder of images" if os.path.splitext(str(path))[1].lower()
                   in (".png", ".jpg", ".jpeg") else "neither an .npz nor an .npy file")
        raise ValueError(f"{path}: not a samples .npz ({why}); "
                         f"expected uint8 images (N, H, W, C) as arr_0, as cmfast-sample --npz writes") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3) or not len(arr):
        raise ValueError(f"{path}: expected uint8 images (N, H, W, C) with C 1 or 3 as arr_0, got {arr.dtype} "
                         f"{arr.shape}")
    return arr


def _uint8_batches(arr, batch_size):
    """uint8 images (N, H, W, C) as float32 [-1, 1] (B, C, H, W) batches, converted one at a time."""
    return (torch.from_numpy(arr[i:i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
            for i in range(0, len(arr), batch_size))


def score_samples(samples, metric, num=None, dataset=None, batch_size=250, device="cpu", data_dir=None, weights=None,
                  is_splits=10, pr_num=None, pr_k=3, progress=False, label=None, ref_stats=None):
    """Score images made elsewhere -> a JSON-ready dict as evaluate's. samples: a path load_samples reads (.npz,
    image folder or zip) or uint8 images (N, H, W, C) as a numpy array; the first `num` of them (default all).
    metric, dataset, weights, is_splits, pr_num, pr_k and ref_stats as evaluate; label: what the result calls the images
    ("samples", and "from ..." in "mode"; default the path, for an array none)."""
    import time
    from .schedules import as_integer
    dataset = _metric_dataset(metric, dataset)
    b = as_integer(batch_size)
    if b is None or b < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    source = os.path.abspath(samples) if isinstance(samples, (str, os.PathLike)) else None
    if source is not None:
        arr = load_samples(samples)
    elif isinstance(samples, np.ndarray) and samples.dtype == np.uint8 and samples.ndim == 4 and \
            samples.shape[-1] in (1, 3):
        arr = samples
    else:
        got = f"{samples.dtype} {samples.shape}" if hasattr(samples, "shape") else type(samples).__name__
        raise TypeError(f"samples: expected a path (.npz, image folder or zip) or uint8 images (N, H, W, C), got {got}")
    if num is None and len(arr) < 2:     # else 'num: expected an integer in [2, 1] ..., got 1', no num given
        raise ValueError(f"samples: expected at least 2 images to score, got {len(arr)}")
    n = len(arr) if num is None else as_integer(num)
    if n is None or not 2 <= n <= len(arr):
        raise ValueError(f"num: expected an integer in [2, {len(arr)}] (the images given), got {num!r}")
    shape = (arr.shape[3], arr.shape[1], arr.shape[2])
    is_splits, pr_num, pr_k = _check_scoring(metric, n, shape, is_splits, pr_num, pr_k, "the samples are")
    ref = _ref_stats(ref_stats, metric, pr_num)
    device = checked_device(device)
    t0 = time.time()
    batches = _uint8_batches(arr[:n], b)
    head = _score(_progress(batches, math.ceil(n / b), metric, progress), metric, n, dataset, device, data_dir,
                  weights, is_splits, pr_num, pr_k, f"from {label or source or 'an array'}", ref)
    return {**head, "num": n, "device": str(device), "samples": label or source,
            "seconds": round(time.time() - t0, 2)}
