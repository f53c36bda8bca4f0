"""cmfast.data on generated files: CIFAR-10 (folder and tarball), Fashion-MNIST idx, PNG folders, the sampler.
No test downloads: cmfast.data._fetch is replaced by a stub in every test."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from cmfast import data
from train_fixtures import cifar_tarball, idx_bytes, write_cifar_folder, write_fmnist, write_png_folder


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    def fetch(url, timeout=30.0):
        raise AssertionError(f"a test tried to download {url}")
    monkeypatch.setattr(data, "_fetch", fetch)
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "no-system-dir"))
    monkeypatch.delenv("CMFAST_OFFLINE", raising=False)


def test_cifar_folder_matches_pickles(tmp_path):
    batches = write_cifar_folder(tmp_path, n_per_batch=4)
    ds = data.load_cifar10(str(tmp_path))
    train = [pickle.loads(batches[f"data_batch_{i}"]) for i in range(1, 6)]
    want = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    assert ds.images.shape == (20, 3, 32, 32) and ds.xflip          # the test batch is not used for training
    assert np.array_equal(ds.images.numpy(), want)
    assert ds.labels.tolist() == sum((b[b"labels"] for b in train), [])
    x, y = ds.batch(torch.tensor([3, 0]), torch.tensor([True, False]))
    # [-1, 1] float; the first image is mirrored (CIFAR-10 gets random horizontal flips).
    assert torch.equal(x[0], torch.from_numpy(want[3]).float().flip(2) / 127.5 - 1)
    assert torch.equal(x[1], torch.from_numpy(want[0]).float() / 127.5 - 1)
    assert x.min() >= -1 and x.max() <= 1 and y.tolist() == [ds.labels[3].item(), ds.labels[0].item()]


def test_cifar_tarball_md5(tmp_path, monkeypatch):
    blob, md5 = cifar_tarball(n_per_batch=2)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(blob)
    with pytest.raises(data.DataError, match="corrupt \\(md5 differs"):     # the real md5 does not match
        data.load_cifar10(str(tmp_path))
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    assert data.load_cifar10(str(tmp_path)).images.shape == (10, 3, 32, 32)


def test_cifar_download_path(tmp_path, monkeypatch):
    blob, md5 = cifar_tarball(n_per_batch=2)
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    monkeypatch.setattr(data, "_fetch", lambda url, timeout=30.0: blob)
    assert data.load_cifar10(str(tmp_path)).images.shape == (10, 3, 32, 32)
    assert (tmp_path / "cifar-10-python.tar.gz").read_bytes() == blob        # kept for next time
    # A download with the wrong md5 is refused and nothing is written.
    monkeypatch.setattr(data, "_fetch", lambda url, timeout=30.0: blob + b"x")
    with pytest.raises(data.DataError, match="wrong md5"):
        data.load_cifar10(str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()


def test_cifar_missing_offline_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    with pytest.raises(data.DataError) as e:
        data.load_cifar10(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg and data.CIFAR10_MD5 in msg


def test_cifar_corrupt_batch(tmp_path):
    write_cifar_folder(tmp_path, n_per_batch=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="data_batch_3: corrupt CIFAR-10 batch"):
        data.load_cifar10(str(tmp_path))
    bad = pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(bad)
    with pytest.raises(data.DataError, match="expected data \\(n, 3072\\)"):
        data.load_cifar10(str(tmp_path))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_batch_pickle_runs_no_code(tmp_path):
    """A data_batch_* file was read with pickle.loads, which calls whatever global the file names (the folder is
    not md5-checked): this one ran a shell command. Now only numpy arrays and containers are rebuilt; the file is a
    corrupt batch naming what it asked for, and the real layout (any protocol) still loads."""
    write_cifar_folder(tmp_path, n_per_batch=2)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _RunsCode(marker), b"labels": [0, 1]})
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(evil)
    with pytest.raises(data.DataError, match=r"data_batch_2: corrupt CIFAR-10 batch \(it names (posix|nt)\.system"):
        data.load_cifar10(str(tmp_path))
    assert not marker.exists()
    core = "_core" if hasattr(np, "_core") else "core"      # numpy 2 / 1
    frombuffer = __import__(f"numpy.{core}.numeric", fromlist=["_frombuffer"])._frombuffer
    before = frombuffer.__defaults__    # a pickle setting the attributes of what it may call changes nothing
    build = f"\x80\x02cnumpy.{core}.numeric\n_frombuffer\nN}}X\x0c\x00\x00\x00__defaults__K{{\x85s\x86b."
    with pytest.raises(data.DataError, match="b: corrupt CIFAR-10 batch"):
        data._cifar_batch(build.encode("latin-1"), "b")
    assert frombuffer.__defaults__ == before
    x = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        got, labels = data._cifar_batch(pickle.dumps({b"data": x, b"labels": [3, 4]}, protocol=protocol), "b")
        assert np.array_equal(got, x) and labels.tolist() == [3, 4]


def test_fmnist_idx_padding_and_search_order(tmp_path, monkeypatch):
    images, labels = write_fmnist(tmp_path / "fashion-mnist", n=5)
    ds = data.load_fashion_mnist(str(tmp_path))
    assert ds.images.shape == (5, 1, 32, 32) and not ds.xflip
    assert np.array_equal(ds.images[:, 0, 2:30, 2:30].numpy(), images)
    x, _ = ds.batch(torch.arange(5))
    assert torch.all(x[:, :, :2] == -1) and torch.all(x[:, :, :, -2:] == -1)     # padded with -1 (DESIGN.md 2)
    assert ds.labels.tolist() == labels.tolist()
    # The system (Debian) folder wins over the default data dir (a data dir given wins over it: the test below).
    sys_images, _ = write_fmnist(tmp_path / "system", n=3, seed=1)
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "system"))
    monkeypatch.setattr(data, "default_data_dir", lambda: str(tmp_path))
    assert np.array_equal(data.load_fashion_mnist().images[:, 0, 2:30, 2:30].numpy(), sys_images)


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b"\x00\x00\x09\x03" + b[4:], "not a uint8 idx file"),        # wrong dtype byte
    (lambda b: b"\x08\x03" + b[2:], "not a uint8 idx file"),                # wrong magic
    (lambda b: b[:-7], "truncated or padded"),
    (lambda b: b"", "not a uint8 idx file"),
    # a shape whose product is 2**64: np.prod wrapped it to 0, so an empty file matched it (a ValueError from reshape)
    (lambda b: b[:4] + (2 ** 22).to_bytes(4, "big") + (2 ** 21).to_bytes(4, "big") * 2, "truncated or padded"),
])
def test_idx_corrupt_headers(tmp_path, mutate, match):
    write_fmnist(tmp_path, n=4)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    with gzip.open(p, "wb") as f:
        f.write(mutate(raw))
    with pytest.raises(data.DataError, match=match) as e:
        data.load_fashion_mnist(str(tmp_path))
    assert "\n" not in str(e.value)


def test_fmnist_wrong_dims_and_not_gzip(tmp_path):
    write_fmnist(tmp_path, n=4)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx_bytes(np.zeros((4, 27, 28), np.uint8)))
    with pytest.raises(data.DataError, match="expected \\(n, 28, 28\\)"):
        data.load_fashion_mnist(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match="unreadable"):
        data.load_fashion_mnist(str(tmp_path))


def test_fmnist_damaged_gzip_stream(tmp_path):
    """A .gz whose header is fine but whose deflate stream is damaged (a bad sector, a bit flip) raised zlib.error,
    which no caller catches: a traceback from cmfast-train instead of a one-line DataError naming the file."""
    write_fmnist(tmp_path, n=64)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(p.read_bytes())
    raw[20:60] = bytes(range(40))       # inside the deflate stream, after the 10-byte gzip header
    p.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz: unreadable") as e:
        data.load_fashion_mnist(str(tmp_path))
    assert "\n" not in str(e.value)


def test_fmnist_missing_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    with pytest.raises(data.DataError, match="dataset-fashion-mnist or put train-images-idx3-ubyte.gz"):
        data.load_fashion_mnist(str(tmp_path))


def test_fmnist_test_split_alone_and_full_counts(tmp_path, monkeypatch):
    # Only the t10k files exist: the test split loads without the train files, and vice versa.
    rng = np.random.default_rng(2)
    images, labels = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), np.arange(6, dtype=np.uint8)
    for name, arr in (("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(idx_bytes(arr))
    ds = data.load_fashion_mnist(str(tmp_path), "test")
    assert np.array_equal(ds.images[:, 0, 2:30, 2:30].numpy(), images) and ds.labels.tolist() == list(range(6))
    assert torch.all(ds.images[:, :, :2] == 0) and ds.batch(torch.arange(6))[0].min() >= -1
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    with pytest.raises(data.DataError, match="Fashion-MNIST train not found.*train-images-idx3-ubyte.gz"):
        data.load_fashion_mnist(str(tmp_path), "train")
    write_fmnist(tmp_path / "fashion-mnist", n=4)
    assert len(data.load_fashion_mnist(str(tmp_path), "train")) == 4
    # full=True asks for the whole split (60,000 / 10,000 images), as reference statistics need.
    with pytest.raises(data.DataError, match="expected all 10000 Fashion-MNIST test images, got 6") as e:
        data.load_fashion_mnist(str(tmp_path), "test", full=True)
    assert "\n" not in str(e.value)
    with pytest.raises(data.DataError, match="split: expected 'train' or 'test', got 'val'"):
        data.load_fashion_mnist(str(tmp_path), "val")


def test_png_folder_and_zip(tmp_path):
    arrs = write_png_folder(tmp_path / "imgs", n=5, size=8)
    ds = data.load_dataset("folder", str(tmp_path / "imgs"))
    assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), arrs) and ds.labels is None
    import zipfile
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for f in sorted(os.listdir(tmp_path / "imgs")):
            z.write(tmp_path / "imgs" / f, f)
        z.writestr("dataset.json", '{"labels": [["img0001.png", 7]]}')
    # A label missing from dataset.json is an error (it read as class 0, silently), as in EDM's loader.
    with pytest.raises(data.DataError, match=r"dataset.json: no label for img0000.png and 3 other image\(s\)"):
        data.load_dataset("folder", str(tmp_path / "imgs.zip"))
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for i, f in enumerate(sorted(os.listdir(tmp_path / "imgs"))):
            z.write(tmp_path / "imgs" / f, f)
        z.writestr("dataset.json", '{"labels": [' + ", ".join(f'["img{i:04d}.png", {9 - i}]' for i in range(5)) + "]}")
    dz = data.load_dataset("folder", str(tmp_path / "imgs.zip"))
    assert torch.equal(dz.images, ds.images) and dz.labels.tolist() == [9, 8, 7, 6, 5]
    write_png_folder(tmp_path / "imgs", n=1, size=9, seed=3)        # overwrites img0000.png with another size
    with pytest.raises(data.DataError, match="img0001.png: expected all images 9x9 RGB as img0000.png, got 8x8 RGB"):
        data.load_dataset("folder", str(tmp_path / "imgs"))
    write_png_folder(tmp_path / "imgs", n=1, size=8, channels=1, seed=3)      # a gray image among RGB ones
    with pytest.raises(data.DataError, match="img0001.png: expected all images 8x8 gray as img0000.png, got 8x8 RGB"):
        data.load_dataset("folder", str(tmp_path / "imgs"))


def test_class_subfolders_are_the_labels(tmp_path):
    """torchvision ImageFolder's layout (one subfolder a class, numbered in sorted name order) labels a folder, and a
    zip of it, without dataset.json: --cond on such a folder was refused ('needs dataset.json')."""
    import zipfile
    root = tmp_path / "pets"
    want = {}
    for c, name in enumerate(["cats", "dogs", "emus"]):        # written out of order: the names decide
        arrs = write_png_folder(root / name, n=2 + c, size=8, seed=c)
        want.update({f"{name}/img{i:04d}.png": (a, c) for i, a in enumerate(arrs)})
    with zipfile.ZipFile(tmp_path / "pets.zip", "w") as z:     # a zip of the folder itself: pets/cats/...
        for n in want:
            z.write(root / n, f"pets/{n}")
    for path in (root, tmp_path / "pets.zip"):
        ds = data.load_dataset("folder", str(path))
        assert ds.classes == ["cats", "dogs", "emus"] and ds.num_classes == 3
        assert ds.labels.tolist() == [c for _, c in want.values()]          # files in sorted order, as loaded
        assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), np.stack([a for a, _ in want.values()]))
    # dataset.json decides where present; images beside the subfolders, or one subfolder only, are no class layout.
    (root / "dataset.json").write_text('{"labels": null}')
    assert data.load_dataset("folder", str(root)).labels is None
    (root / "dataset.json").unlink()
    write_png_folder(root, n=1, size=8)
    assert data.load_dataset("folder", str(root)).labels is None
    assert data.load_dataset("folder", str(root / "dogs")).classes is None


def test_dataset_json_of_a_zipped_folder_is_read(tmp_path):
    """A zip of the folder itself holds rgb32/dataset.json beside rgb32/00000/*.png: its labels were ignored (--cond
    then said the data has none); they are read, paths relative to that folder."""
    import zipfile
    arrs = write_png_folder(tmp_path / "rgb32" / "00000", n=3, size=8)
    with zipfile.ZipFile(tmp_path / "rgb32.zip", "w") as z:
        for i in range(3):
            z.write(tmp_path / "rgb32" / "00000" / f"img{i:04d}.png", f"rgb32/00000/img{i:04d}.png")
        z.writestr("rgb32/dataset.json", '{"labels": [' + ", ".join(f'["00000/img{i:04d}.png", {5 - i}]'
                                                                  for i in range(3)) + "]}")
    ds = data.load_dataset("folder", str(tmp_path / "rgb32.zip"))
    assert ds.labels.tolist() == [5, 4, 3] and ds.classes is None
    assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), arrs)
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as z:
        z.write(tmp_path / "rgb32" / "00000" / "img0000.png", "rgb32/00000/img0000.png")
        z.writestr("rgb32/dataset.json", '{"labels": [["img0000.png", 1]]}')     # a path not relative to rgb32/
    with pytest.raises(data.DataError, match=r"bad.zip/rgb32/dataset.json: no label for rgb32/00000/img0000.png"):
        data.load_dataset("folder", str(tmp_path / "bad.zip"))


def test_png_zip_made_on_a_mac_skips_appledouble_files(tmp_path):
    """A zip made in macOS's Finder holds __MACOSX/._NAME.png resource forks (and copied folders ._NAME.png files):
    each ended in .png, so the whole dataset was refused as 'unreadable image'; they are skipped now."""
    import zipfile
    arrs = write_png_folder(tmp_path / "imgs", n=3, size=8)
    fork = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "       # AppleDouble magic, no image
    with zipfile.ZipFile(tmp_path / "mac.zip", "w") as z:
        for f in sorted(os.listdir(tmp_path / "imgs")):
            z.write(tmp_path / "imgs" / f, f)
            z.writestr(f"__MACOSX/._{f}", fork)
    (tmp_path / "imgs" / "._img0000.png").write_bytes(fork)
    for path in (tmp_path / "mac.zip", tmp_path / "imgs"):
        ds = data.load_dataset("folder", str(path))
        assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), arrs)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"labels": [["img0000.png", "x"]]}',
                                  '{"labels": [["img0000.png"]]}', '{"labels": 5}',
                                  '{"labels": [' + ", ".join(f'["img{i:04d}.png", {i - 1}]' for i in range(3)) + "]}"])
def test_png_folder_bad_dataset_json(tmp_path, text):
    """A dataset.json that is not EDM's {"labels": [[name, class], ...]} (bad JSON, a list, a non-integer or negative
    class, a pair of one) is a DataError naming the file; it was a JSONDecodeError without the file name, or an
    AttributeError / TypeError traceback, or (a class -1) labels that break the class embedding later."""
    write_png_folder(tmp_path / "imgs", n=3, size=8)
    (tmp_path / "imgs" / "dataset.json").write_text(text)
    with pytest.raises(data.DataError, match=r"imgs/dataset.json: expected \{\"labels\"") as e:
        data.load_dataset("folder", str(tmp_path / "imgs"))
    assert "\n" not in str(e.value)


def test_dataset_json_damaged_in_a_zip_or_out_of_range_is_one_line(tmp_path):
    """A dataset.json whose zip member fails its CRC (zipfile.BadZipFile), a class Infinity (OverflowError) or JSON
    nested deeper than Python recurses (RecursionError) escaped the DataError handler: tracebacks from cmfast-train.
    Now each is the DataError naming dataset.json."""
    import json
    import zipfile
    write_png_folder(tmp_path / "imgs", n=2, size=8)
    labels = json.dumps({"labels": [[f"img{i:04d}.png", 1] for i in range(2)]}) * 4
    path = tmp_path / "crc.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted((tmp_path / "imgs").iterdir()):
            z.write(f, f.name)
        z.writestr("dataset.json", labels)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"dataset.json") + len("dataset.json") + 5] ^= 0xFF        # inside the member's compressed data
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match=r"crc.zip/dataset.json: expected \{\"labels\".*BadZipFile"):
        data.load_dataset("folder", str(path))
    for text, why in (('{"labels": [["img0000.png", Infinity]]}', "OverflowError"),
                      ("[" * 100_000 + "]" * 100_000, "RecursionError")):
        (tmp_path / "imgs" / "dataset.json").write_text(text)
        with pytest.raises(data.DataError, match=rf"imgs/dataset.json: expected \{{\"labels\".*\({why}: ") as e:
            data.load_dataset("folder", str(tmp_path / "imgs"))
        assert "\n" not in str(e.value)


def test_png_modes_are_converted(tmp_path):
    """Palette images load as their colours (their indices read as gray levels before), gray + alpha as gray, RGBA
    as RGB; 16-bit pixels are refused in one line."""
    from PIL import Image
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).quantize(16)
    folder = tmp_path / "p"
    folder.mkdir()
    pal.save(folder / "a.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "b.png")
    ds = data.load_dataset("folder", str(folder))
    assert ds.images.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(ds.images[0].permute(1, 2, 0).numpy(), np.asarray(pal.convert("RGB")))
    np.testing.assert_array_equal(ds.images[1].permute(1, 2, 0).numpy(), rgb)
    gray = tmp_path / "g"
    gray.mkdir()
    Image.fromarray(rgb[:, :, 0]).convert("LA").save(gray / "a.png")
    Image.fromarray(rgb[:, :, 0]).save(gray / "b.png")
    g = data.load_dataset("folder", str(gray))
    assert g.images.shape == (2, 1, 8, 8) and torch.equal(g.images[0], g.images[1])
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 200).save(gray / "c.png")
    with pytest.raises(data.DataError, match="c.png: I;16 pixels .* not read"):
        data.load_dataset("folder", str(gray))


def test_sampler_epochs_and_state():
    s = data.Sampler(10, seed=3)
    first = torch.cat([s.next(4)[0] for _ in range(5)])            # 20 indices = two full epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    s = data.Sampler(10, seed=3)
    s.next(7)
    sd = s.state_dict()
    want = [s.next(4) for _ in range(3)]
    s2 = data.Sampler(10, seed=99)
    s2.load_state_dict(sd)
    got = [s2.next(4) for _ in range(3)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(want, got))


def test_sampler_state_past_the_end_of_a_smaller_dataset_is_refused():
    """A run resumed on a folder with fewer images than the checkpoint's epoch position: next(2) returned 5 indices
    (the position walked back to the end and the shortfall was added to the batch), and training went on with
    oversized batches. Now loading that state is a ValueError, which --resume reports as one line."""
    s = data.Sampler(8, seed=0)
    s.next(6)
    small = data.Sampler(3, seed=0)
    with pytest.raises(ValueError, match="stopped at image 6 of an epoch, but the dataset has 3 images"):
        small.load_state_dict(s.state_dict())
    data.Sampler(6, seed=0).load_state_dict(s.state_dict())      # at the end of an epoch: a new one starts


def test_fmnist_data_dir_given_is_searched_before_the_system_copy(tmp_path, monkeypatch):
    """--data-dir names the copy to use: it was searched after /usr/share/datasets/fashion-mnist, so a local copy
    (or a way around a damaged system file) was never read where the Debian package is installed. Without one, the
    system copy still comes before the default folder (no download)."""
    system, mine, default = tmp_path / "system", tmp_path / "mine", tmp_path / "default"
    write_fmnist(system, n=8)
    write_fmnist(mine, n=4)
    write_fmnist(default, n=6)
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(system))
    monkeypatch.setattr(data, "default_data_dir", lambda: str(default))
    assert len(data.load_fashion_mnist(str(mine))) == 4
    assert len(data.load_fashion_mnist()) == 8
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "absent"))
    assert len(data.load_fashion_mnist()) == 6
