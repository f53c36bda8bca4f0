"""Generated dataset files for the training tests (CIFAR-10 pickles / tarball, Fashion-MNIST idx, PNG folders)."""
import gzip
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np


def cifar_batches(rng, n_per_batch=8):
    """{name: pickled bytes} in the layout of cifar-10-batches-py (CIFAR-10's python version)."""
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        out[name] = pickle.dumps({b"data": data, b"labels": list(rng.integers(0, 10, n_per_batch).tolist()),
                                  b"batch_label": name.encode()})
    return out


def write_cifar_folder(root, seed=0, n_per_batch=8):
    batches = cifar_batches(np.random.default_rng(seed), n_per_batch)
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    for name, raw in batches.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(raw)
    return batches


def cifar_tarball(seed=0, n_per_batch=8):
    """(bytes of a cifar-10-python.tar.gz, its md5)."""
    batches = cifar_batches(np.random.default_rng(seed), n_per_batch)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, raw in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            t.addfile(info, io.BytesIO(raw))
    data = buf.getvalue()
    return data, hashlib.md5(data).hexdigest()


def idx_bytes(arr, magic_dtype=0x08):
    header = bytes([0, 0, magic_dtype, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fmnist(root, n=32, seed=0, images=None, labels=None):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    if images is None:    # a few smooth blobs so that a model has something to learn
        yy, xx = np.mgrid[:28, :28]
        cy, cx = rng.uniform(8, 20, (2, n, 1, 1))
        images = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30)).astype(np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8) if labels is None else labels
    for name, arr in (("train-images-idx3-ubyte.gz", images), ("train-labels-idx1-ubyte.gz", labels)):
        with gzip.open(os.path.join(root, name), "wb") as f:
            f.write(idx_bytes(arr))
    return images, labels


def write_png_folder(root, n=8, size=16, channels=3, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    arrs = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    for i, a in enumerate(arrs):
        Image.fromarray(a[:, :, 0] if channels == 1 else a).save(os.path.join(root, f"img{i:04d}.png"))
    return arrs


def teacher_run(run, shape, method="edm", label_dim=None, nan=False):
    """A teacher run folder (one checkpoint, no training) of --method `method`, preset tiny, for `shape` images;
    label_dim: class-conditional on that many classes; nan: one NaN in its EMA weights."""
    import torch

    from cmfast.training import checkpoint
    from cmfast.training.config import resolve
    cfg = resolve({"dataset": "folder", "method": method, "preset": "tiny", "ema": (0.9,), "teacher": "x",
                   "cond": bool(label_dim)}, 1, shape, label_dim or 0)
    torch.manual_seed(0)
    sd = checkpoint.build_model(cfg).state_dict()
    ema = {k: v.clone() for k, v in sd.items()}
    if nan:
        next(v for k, v in ema.items() if v.is_floating_point()).view(-1)[0] = float("nan")
    modules = {"model": sd, "ema@0.9": ema, **({"target": sd} if method in ("cd", "ct") else {})}
    os.makedirs(run)
    checkpoint.save_checkpoint(str(run), 1, modules, cfg, {"step": 1})
    return str(run)
