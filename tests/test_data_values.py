"""cmfast.data on exact values: ImageDataset.batch's conversion and its xflip switch, a padded idx file, and the
class numbering of an image folder's subfolders (ImageFolder's: the sorted order of the names)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cmfast import data
from train_fixtures import idx_bytes


def _images(n=4, c=3, h=3, w=5, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8))


def test_batch_is_u_over_127_5_minus_1_and_flips_only_where_the_dataset_allows():
    u = _images()
    u[0, 0, 0, 0], u[1, 0, 0, 0] = 0, 255
    labels = torch.tensor([3, 1, 4, 1])
    want = u.double() / 127.5 - 1                                   # float64 truth
    flip = torch.tensor([True, False, True, True])
    idx = torch.tensor([2, 0, 3, 1])
    on = data.ImageDataset(u, labels, "t", xflip=True)
    x, y = on.batch(idx, flip)
    assert x.dtype == torch.float32 and y.tolist() == [4, 3, 1, 1]
    for row, (i, f) in enumerate(zip(idx.tolist(), flip.tolist())):
        torch.testing.assert_close(x[row].double(), want[i].flip(-1) if f else want[i], rtol=0, atol=1e-7)
    assert on.batch(torch.tensor([0, 1]))[0][:, 0, 0, 0].tolist() == [-1.0, 1.0]
    # a dataset without xflip (Fashion-MNIST) ignores the flip bits the sampler always draws
    off = data.ImageDataset(u, labels, "t", xflip=False)
    x, _ = off.batch(idx, flip)
    torch.testing.assert_close(x.double(), want[idx], rtol=0, atol=1e-7)
    assert data.ImageDataset(u, None, "t").batch(idx)[1] is None


def test_num_classes_is_the_largest_label_plus_one():
    assert data.ImageDataset(_images(), torch.tensor([0, 4, 2, 2]), "t").num_classes == 5
    assert data.ImageDataset(_images(), None, "t").num_classes == 0


def test_a_padded_idx_file_is_refused_in_one_line(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(data.read_idx(str(p), 3), arr)
    p.write_bytes(idx_bytes(arr) + b"\x00" * 5)
    with pytest.raises(data.DataError, match="truncated or padded"):
        data.read_idx(str(p), 3)


def test_class_subfolders_are_numbered_in_the_sorted_order_of_their_names(tmp_path):
    # 'cat-wild' sorts after 'cat' as a name but before 'cat/...' as a path ('-' < '/'): numbering by the order the
    # sorted file list meets the folders would swap them
    from PIL import Image
    names = ["cat", "cat-wild", "dog"]
    for k, name in enumerate(names):
        (tmp_path / name).mkdir()
        for j in range(2):
            Image.fromarray(np.full((4, 4, 3), 10 * k + j, np.uint8)).save(tmp_path / name / f"{j}.png")
    ds = data.load_folder(str(tmp_path))
    assert ds.classes == sorted(names) == ["cat", "cat-wild", "dog"]
    # each image's label is its folder's index in that order (the pixel value says which folder it came from)
    got = {(int(ds.images[i, 0, 0, 0]) // 10): int(ds.labels[i]) for i in range(len(ds))}
    assert got == {0: 0, 1: 1, 2: 2}
    peek = data.peek_folder(str(tmp_path))
    assert peek.classes == ds.classes and peek.num_classes == 3 and peek.count == 6


def test_jpeg_files_of_either_extension_are_images(tmp_path):
    from PIL import Image
    for i, ext in enumerate(("jpg", "jpeg", "JPEG")):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.{ext}", format="JPEG")
    ds = data.load_folder(str(tmp_path))
    assert len(ds) == 3 and ds.shape == (3, 8, 8)


def test_a_folder_with_one_of_the_two_split_files_is_passed_over(tmp_path, monkeypatch):
    # --data-dir holding the images but not the labels: the next folder with both is used (it raised a KeyError)
    from train_fixtures import write_fmnist
    monkeypatch.delenv("CMFAST_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_fetch", lambda url, timeout=30.0: (_ for _ in ()).throw(AssertionError(url)))
    sys_images, _ = write_fmnist(tmp_path / "system", n=3, seed=1)
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "system"))
    write_fmnist(tmp_path / "mine", n=5)
    (tmp_path / "mine" / "train-labels-idx1-ubyte.gz").unlink()
    ds = data.load_fashion_mnist(str(tmp_path / "mine"))
    np.testing.assert_array_equal(ds.images[:, 0, 2:30, 2:30].numpy(), sys_images)


def test_sampler_shuffles_each_epoch_with_its_seeded_generator():
    # per epoch a torch.randperm of the seeded generator, then per batch the flip bits from the same generator
    n, seed = 50, 7
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    flips = [torch.randint(0, 2, (20,), generator=g).bool() for _ in range(2)]
    s = data.Sampler(n, seed)
    for k in range(2):
        idx, flip = s.next(20)
        assert torch.equal(idx, perm[20 * k:20 * (k + 1)]) and torch.equal(flip, flips[k])
    assert not torch.equal(perm, torch.arange(n))
    idx, _ = s.next(20)                 # 10 left in this epoch, then the next epoch's permutation
    assert torch.equal(idx[:10], perm[40:]) and torch.equal(idx[10:], torch.randperm(n, generator=g)[:10])
