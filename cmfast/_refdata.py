"""Private: real images for reference statistics (FID / FD-FMNIST), as [-1, 1] float tensors in batches.

Reads Fashion-MNIST through cmfast._idx and CIFAR-10's python pickles (cifar-10-python.tar.gz or its
extracted cifar-10-batches-py/) directly; cmfast.data may replace this once merged.
"""
import os
import pickle
import tarfile

import numpy as np
import torch

DATASETS = ("fashion-mnist", "cifar10")
SHAPES = {"fashion-mnist": (1, 32, 32), "cifar10": (3, 32, 32)}


def data_dir(path=None):
    return path or os.environ.get("CMFAST_DATA") or os.path.expanduser("~/.cache/cmfast")


def _cifar_train_uint8(root):
    """(50000, 3, 32, 32) uint8 from the five CIFAR-10 training batches."""
    names = [f"data_batch_{i}" for i in range(1, 6)]
    extracted = os.path.join(root, "cifar-10-batches-py")
    archive = os.path.join(root, "cifar-10-python.tar.gz")
    if os.path.isdir(extracted):
        blobs = [open(os.path.join(extracted, n), "rb").read() for n in names]
    elif os.path.isfile(archive):
        with tarfile.open(archive, "r:gz") as tar:
            blobs = [tar.extractfile(f"cifar-10-batches-py/{n}").read() for n in names]
    else:
        raise FileNotFoundError(f"CIFAR-10 not found: put cifar-10-python.tar.gz (or cifar-10-batches-py/) in {root}")
    data = [pickle.loads(b, encoding="bytes")[b"data"] for b in blobs]
    return np.concatenate(data).reshape(-1, 3, 32, 32)


def reference_images(dataset, root=None, split="train"):
    """All images of a dataset's split as a float32 tensor in [-1, 1], (N, C, 32, 32)."""
    if dataset == "fashion-mnist":
        from ._idx import load_fmnist, to_model_range
        return to_model_range(load_fmnist(split, root)[0])
    if dataset == "cifar10":
        if split != "train":
            raise ValueError(f"cifar10 reference statistics use the train split, got {split!r}")
        x = torch.from_numpy(_cifar_train_uint8(data_dir(root)))
        return x.float().div_(127.5).sub_(1.0)
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
