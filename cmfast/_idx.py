"""Private reader for Fashion-MNIST idx(.gz) files (LeCun's idx format) used by cmfast.metrics.

Kept private so that cmfast.data can absorb it later; it only needs numpy and gzip.
"""
import gzip
import os

import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"   # Debian package dataset-fashion-mnist (DESIGN.md 5)
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_COUNTS = {"train": 60000, "test": 10000}


def read_idx(path):
    """Read one idx file (plain or .gz) of unsigned bytes; checks magic, rank and size against the header."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (expected magic 0x0000, got {raw[:2].hex()})")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: expected idx dtype 0x08 (uint8), got {raw[2]:#04x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable, owns its memory


def find_fmnist_dir(data_dir=None):
    """First directory holding the four Fashion-MNIST files: the Debian dir, then data_dir, then data_dir/fashion-mnist."""
    data_dir = data_dir or os.environ.get("CMFAST_DATA") or os.path.expanduser("~/.cache/cmfast")
    for d in (DEBIAN_DIR, data_dir, os.path.join(data_dir, "fashion-mnist")):
        if all(_locate(d, n) for pair in _FILES.values() for n in pair):
            return d
    raise FileNotFoundError(f"Fashion-MNIST idx files not found: install the Debian package dataset-fashion-mnist "
                            f"or put train-images-idx3-ubyte.gz etc. in {data_dir}")


def _locate(d, name):
    for cand in (os.path.join(d, name + ".gz"), os.path.join(d, name)):
        if os.path.isfile(cand):
            return cand
    return None


def load_fmnist(split="train", data_dir=None):
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the given split ("train" or "test")."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = find_fmnist_dir(data_dir)
    images = read_idx(_locate(d, _FILES[split][0]))
    labels = read_idx(_locate(d, _FILES[split][1]))
    if images.shape != (_COUNTS[split], 28, 28) or labels.shape != (_COUNTS[split],):
        raise ValueError(f"Fashion-MNIST {split}: expected ({_COUNTS[split]}, 28, 28) images and labels, "
                         f"got {images.shape} and {labels.shape}")
    return images, labels.astype(np.int64)


def to_model_range(images_u8):
    """uint8 (N, 28, 28) -> float32 torch tensor (N, 1, 32, 32) in [-1, 1], padded by 2 with -1 (DESIGN.md 2)."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).float().div_(127.5).sub_(1.0)
    return torch.nn.functional.pad(x[:, None], (2, 2, 2, 2), value=-1.0)
