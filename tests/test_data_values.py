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


# ---- gaps a mutation study of cmfast/data.py left open (each test fails with the mutation named) ------------------
def test_image_dataset_refuses_other_than_uint8_nchw_and_counts_no_classes_without_labels():
    # mutations: either half of ImageDataset's dtype / rank check dropped; class_count without its numel() guard
    with pytest.raises(data.DataError, match="t: expected uint8 images \\(N, C, H, W\\), got torch.float32"):
        data.ImageDataset(_images().float(), None, "t")
    with pytest.raises(data.DataError, match="expected uint8 images .* got torch.uint8 \\(4, 3, 5\\)"):
        data.ImageDataset(_images()[:, 0], None, "t")
    empty = data.ImageDataset(_images(n=0), torch.zeros(0, dtype=torch.int64), "t")
    assert len(empty) == 0 and empty.num_classes == 0


def test_sampler_epoch_ends_on_the_last_index_when_the_batch_does_not_divide_it():
    # 7 images, batches of 3: a batch starts at position 6 = n - 1 (a new epoch begun there lost the epoch's last
    # index); every 7 consecutive indices are one epoch's permutation of 0..6
    s = data.Sampler(7, seed=1)
    got = torch.cat([s.next(3)[0] for _ in range(7)])
    for e in range(3):
        assert sorted(got[7 * e:7 * (e + 1)].tolist()) == list(range(7))


def test_cifar_batch_layout_checks(tmp_path):
    import pickle
    x = np.arange(2 * 3072).reshape(2, 3072) % 256
    got, labels = data._cifar_batch(pickle.dumps({b"data": x.tolist(), b"labels": [1, 2]}), "b")   # lists of ints
    assert got.dtype == np.uint8 and np.array_equal(got, x) and labels.dtype == np.int64
    for bad in ({b"data": x.astype(np.uint8), b"labels": [1, 2, 3]},                 # 3 labels for 2 images
                {b"data": x.astype(np.uint8).reshape(2, 3072, 1), b"labels": [1, 2]},  # rank 3
                {b"data": x.astype(np.uint8).ravel(), b"labels": [1, 2]}):             # rank 1: data.shape[1] raised
        with pytest.raises(data.DataError, match="b: corrupt CIFAR-10 batch"):
            data._cifar_batch(pickle.dumps(bad), "b")


def test_cifar_folder_or_tarball_missing_a_batch_is_one_line(tmp_path, monkeypatch):
    import hashlib
    import io
    import pickle
    import tarfile
    from train_fixtures import write_cifar_folder
    write_cifar_folder(tmp_path / "f", n_per_batch=2)
    (tmp_path / "f" / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(data.DataError, match="CIFAR-10: .*data_batch_4 is missing"):
        data.load_cifar10(str(tmp_path / "f"))
    buf = io.BytesIO()                              # a tarball without data_batch_5 (KeyError from extractfile)
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for i in range(1, 5):
            raw = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i}")
            info.size = len(raw)
            t.addfile(info, io.BytesIO(raw))
    for name, blob in (("nobatch", buf.getvalue()), ("cut", buf.getvalue()[:len(buf.getvalue()) // 2])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cifar-10-python.tar.gz").write_bytes(blob)
        monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(blob).hexdigest())
        with pytest.raises(data.DataError, match=f"{name}/cifar-10-python.tar.gz: corrupt archive") as e:
            data.load_cifar10(str(tmp_path / name))
        assert "\n" not in str(e.value)


def test_idx_header_rank_and_length_are_checked(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(idx_bytes(np.arange(40, dtype=np.uint8)))        # a labels file (rank 1) read as images (rank 3)
    with pytest.raises(data.DataError, match="not a uint8 idx file of rank 3 \\(header 00000801\\)"):
        data.read_idx(str(p), 3)
    p.write_bytes(b"\x00\x00\x08")                                 # 3 bytes: raw[3] raised IndexError
    with pytest.raises(data.DataError, match="not a uint8 idx file of rank 1"):
        data.read_idx(str(p), 1)
    p.write_bytes(b"\x00\x00\x08\x01\x00\x00")                     # a header cut inside the dimension
    with pytest.raises(data.DataError, match="not a uint8 idx file of rank 1"):
        data.read_idx(str(p), 1)


def test_fmnist_plain_idx_files_and_label_count(tmp_path, monkeypatch):
    # uncompressed idx files (as gunzip leaves them) are found as well as .gz ones
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "none"))
    rng = np.random.default_rng(5)
    images, labels = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.array([4, 0, 9], np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    ds = data.load_fashion_mnist(str(tmp_path))
    np.testing.assert_array_equal(ds.images[:, 0, 2:30, 2:30].numpy(), images)
    assert ds.labels.tolist() == [4, 0, 9]
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:2]))
    with pytest.raises(data.DataError, match=r"images with n labels, got \(3, 28, 28\) and \(2,\)"):
        data.load_fashion_mnist(str(tmp_path))


def test_fmnist_download_is_md5_checked(tmp_path, monkeypatch):
    import gzip
    import hashlib
    monkeypatch.delenv("CMFAST_OFFLINE", raising=False)
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "none"))
    images, labels = np.full((2, 28, 28), 7, np.uint8), np.array([1, 2], np.uint8)
    blobs = {"train-images-idx3-ubyte": gzip.compress(idx_bytes(images)),
             "train-labels-idx1-ubyte": gzip.compress(idx_bytes(labels))}
    urls = []
    monkeypatch.setattr(data, "_fetch", lambda url, timeout=30.0: urls.append(url) or blobs[url.split("/")[-1][:-3]])
    monkeypatch.setattr(data, "FMNIST_FILES", {**data.FMNIST_FILES, **{n: hashlib.md5(b).hexdigest()
                                                                       for n, b in blobs.items()}})
    ds = data.load_fashion_mnist(str(tmp_path / "a"))
    assert ds.labels.tolist() == [1, 2] and int(ds.images[0, 0, 2, 2]) == 7
    assert urls == [data.FMNIST_URL + n + ".gz" for n in blobs]
    assert (tmp_path / "a" / "fashion-mnist" / "train-labels-idx1-ubyte.gz").read_bytes() == blobs[
        "train-labels-idx1-ubyte"]
    monkeypatch.setattr(data, "FMNIST_FILES", dict(data.FMNIST_FILES, **{"train-images-idx3-ubyte": "0" * 32}))
    with pytest.raises(data.DataError, match="Fashion-MNIST train not found.*wrong md5"):
        data.load_fashion_mnist(str(tmp_path / "b"))
    assert not (tmp_path / "b" / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists()


def _py2_pickle(d: dict) -> bytes:
    """A protocol-2 pickle as Python 2 wrote CIFAR-10's batches: str keys as SHORT_BINSTRING ('U'), which Python 3
    reads as bytes only with encoding='bytes'; (nested) lists of small ints (BININT1 'K')."""
    def enc(v):
        return b"](" + b"".join(map(enc, v)) + b"e" if isinstance(v, list) else b"K" + bytes([v])
    return b"\x80\x02}(" + b"".join(b"U" + bytes([len(k)]) + k.encode() + enc(v) for k, v in d.items()) + b"u."


def test_cifar_batch_of_python_2_reads_its_str_keys_as_bytes():
    # mutation: encoding='latin1' (the keys then load as str, and b"data" is missing: the real files refused)
    x = np.arange(3072) % 256
    got, labels = data._cifar_batch(_py2_pickle({"data": [x.tolist()], "labels": [7]}), "b")
    assert np.array_equal(got, x[None]) and labels.tolist() == [7]


def test_fmnist_labels_are_int64_and_md5_reads_past_one_chunk(tmp_path, monkeypatch):
    # labels index a class embedding / one_hot, which take int64 (mutation: the idx file's uint8 kept)
    import hashlib
    from train_fixtures import write_fmnist
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "none"))
    write_fmnist(tmp_path, n=3)
    assert data.load_fashion_mnist(str(tmp_path)).labels.dtype == torch.int64
    blob = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()    # 3 MiB: 3 chunks
    (tmp_path / "big").write_bytes(blob)
    assert data._md5(str(tmp_path / "big")) == hashlib.md5(blob).hexdigest()


def test_offline_is_only_cmfast_offline_1(tmp_path, monkeypatch):
    # CMFAST_OFFLINE=0 downloads (mutation: any value read as offline)
    monkeypatch.setenv("CMFAST_OFFLINE", "0")
    monkeypatch.setattr(data, "_fetch", lambda url, timeout=30.0: (_ for _ in ()).throw(OSError("no route")))
    with pytest.raises(data.DataError, match=r"\(download from .* failed: no route\)"):
        data._download("http://x/y", str(tmp_path / "y"), "0" * 32, "hint")
