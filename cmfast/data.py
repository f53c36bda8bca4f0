"""Datasets (DESIGN.md 5): CIFAR-10, Fashion-MNIST and image folders / zips, held in memory as one uint8 tensor.

Small datasets fit in memory, so a batch is an index draw from a seeded generator (no DataLoader workers):
`ImageDataset.batch(idx, flip)` gives float NCHW in [-1, 1]. Files are found locally first; a missing file is
downloaded (with an md5 check) unless CMFAST_OFFLINE=1, and otherwise the error says which file to put where.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import pickle
import tarfile
import types
import zlib

import numpy as np
import torch

DATASETS = ("cifar10", "fashion-mnist", "folder")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
FMNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"   # Debian package dataset-fashion-mnist
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# md5 of the upstream .gz files (for downloads only: Debian's package re-compresses them, so its md5s differ).
FMNIST_FILES = {"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"}
FMNIST_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FMNIST_COUNTS = {"train": 60000, "test": 10000}


class DataError(ValueError):
    """A dataset file is missing or corrupt; the message is one line naming the file and the fix."""


def default_data_dir() -> str:
    return os.environ.get("CMFAST_DATA") or os.path.expanduser("~/.cache/cmfast")


def class_count(labels: torch.Tensor | None) -> int:
    """The class count labels (N,) imply: the largest label + 1 (0 without labels)."""
    return int(labels.max()) + 1 if labels is not None and labels.numel() else 0


class ImageDataset:
    """uint8 images (N, C, H, W) and int64 labels (N,) in memory; `batch` converts to [-1, 1] float."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, name: str, xflip: bool = False,
                 classes: list[str] | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"{name}: expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.name, self.xflip = images, labels, name, xflip
        self.classes = classes      # class names where the data names them (an image folder's subfolders)
        self.num_classes = class_count(labels)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batch(self, idx: torch.Tensor, flip: torch.Tensor | None = None, device="cpu"):
        """(images float32 (B, C, H, W) in [-1, 1], labels (B,) or None); flip (B,) bool mirrors horizontally."""
        x = to_device(self.images[idx], device).float().div_(127.5).sub_(1.0)
        if flip is not None and self.xflip:
            f = to_device(flip, device).reshape(-1, 1, 1, 1)
            x = torch.where(f, x.flip(3), x)
        y = to_device(self.labels[idx], device) if self.labels is not None else None
        return x, y


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor copied to `device`; to a CUDA device from pinned memory without blocking (as a DataLoader with
    pin_memory=True and .to(non_blocking=True)): a copy from pageable memory first waits for the device's queue, a
    host sync at every batch. The pinned block stays reserved until the copy has run (torch's pinned allocator)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Sampler:
    """Global batches of indices: a seeded permutation per epoch (without replacement), plus flip bits.
    Every rank holds the same sampler and takes its slice of the global batch. State: the generator's state at
    the start of the epoch and the position in it, so a resumed run draws the same batches."""

    def __init__(self, n: int, seed: int):
        self.n, self.gen = n, torch.Generator().manual_seed(seed)
        self._new_epoch()

    def _new_epoch(self):
        self.epoch_state = self.gen.get_state()
        self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0

    def next(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts, need = [], batch
        while need:
            if self.pos == self.n:
                self._new_epoch()
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
        flip = torch.randint(0, 2, (batch,), generator=self.gen).bool()
        return torch.cat(parts), flip

    def state_dict(self) -> dict:
        return {"epoch_state": self.epoch_state, "pos": self.pos, "gen_state": self.gen.get_state()}

    def load_state_dict(self, sd: dict):
        if not 0 <= int(sd["pos"]) <= self.n:  # a smaller dataset than the saved run's: next() drew oversized batches
            raise ValueError(f"the sampler stopped at image {int(sd['pos'])} of an epoch, but the dataset has {self.n} "
                             f"images (not the dataset the checkpoint was trained on)")
        self.gen.set_state(sd["epoch_state"])
        self._new_epoch()
        self.pos = int(sd["pos"])
        self.gen.set_state(sd["gen_state"])


# ---- Downloads: only when a file is missing, never silently wrong (md5) ----------------------------------------
def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, timeout: float = 30.0) -> bytes:
    import urllib.request
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _download(url: str, dest: str, md5: str, hint: str) -> str:
    """Download url to dest (atomically, md5-checked); offline or failing: a DataError with `hint`."""
    if os.environ.get("CMFAST_OFFLINE") == "1":
        raise DataError(f"{hint} (CMFAST_OFFLINE=1: no download attempted)")
    try:
        data = _fetch(url)
    except OSError as e:
        raise DataError(f"{hint} (download from {url} failed: {e})") from None
    if hashlib.md5(data).hexdigest() != md5:
        raise DataError(f"{hint} (downloaded file from {url} has the wrong md5)")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    return dest


# ---- CIFAR-10 (python pickles, Krizhevsky 2009) ---------------------------------------------------------------
class _CifarUnpickler(pickle.Unpickler):
    """A CIFAR-10 batch (a dict of numpy arrays, lists, strings) and nothing else: pickle.loads called any global a
    file names, so a data_batch_* in cifar-10-batches-py (md5-checked only inside the tarball) could run code."""
    SAFE = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),     # _codecs: bytes in protocol 2
            *((f"numpy.{c}.multiarray", "_reconstruct") for c in ("core", "_core")),
            *((f"numpy.{c}.numeric", "_frombuffer") for c in ("core", "_core"))}     # protocol 5

    def find_class(self, module, name):
        if (module, name) not in self.SAFE:
            raise pickle.UnpicklingError(f"it names {module}.{name}, not numpy array data (refused: a pickle can run "
                                         f"code)")
        obj = super().find_class(module, name)
        # _frombuffer is a Python function: BUILD with slot state would set its attributes (__defaults__) for good
        return (lambda *args, **kwargs: obj(*args, **kwargs)) if isinstance(obj, types.FunctionType) else obj


def _cifar_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data, labels = np.asarray(d[b"data"], dtype=np.uint8), np.asarray(d[b"labels"], dtype=np.int64)
    except pickle.UnpicklingError as e:
        raise DataError(f"{name}: corrupt CIFAR-10 batch ({str(e).splitlines()[0] if str(e) else 'UnpicklingError'})"
                        ) from None
    except Exception as e:
        raise DataError(f"{name}: corrupt CIFAR-10 batch ({type(e).__name__})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DataError(f"{name}: corrupt CIFAR-10 batch (expected data (n, 3072) and n labels, got "
                        f"{data.shape} and {labels.shape})")
    return data, labels


def load_cifar10(data_dir: str | None = None) -> ImageDataset:
    """The 50,000 training images from cifar-10-batches-py/ or cifar-10-python.tar.gz in data_dir."""
    data_dir = data_dir or default_data_dir()
    folder, tar = os.path.join(data_dir, "cifar-10-batches-py"), os.path.join(data_dir, "cifar-10-python.tar.gz")
    names = [f"data_batch_{i}" for i in range(1, 6)]
    raws = {}
    if os.path.isdir(folder):
        for n in names:
            p = os.path.join(folder, n)
            if not os.path.isfile(p):
                raise DataError(f"CIFAR-10: {p} is missing (remove {folder} or put the full extracted set there)")
            with open(p, "rb") as f:
                raws[p] = f.read()
    else:
        hint = f"CIFAR-10 not found: put cifar-10-python.tar.gz (md5 {CIFAR10_MD5}, {CIFAR10_URL}) in {data_dir}"
        if not os.path.isfile(tar):
            _download(CIFAR10_URL, tar, CIFAR10_MD5, hint)
        if _md5(tar) != CIFAR10_MD5:
            raise DataError(f"{tar}: corrupt (md5 differs from {CIFAR10_MD5}); delete it and download again")
        try:
            with tarfile.open(tar, "r:gz") as t:
                for n in names:
                    raws[f"{tar}:{n}"] = t.extractfile(f"cifar-10-batches-py/{n}").read()
        except (tarfile.TarError, KeyError, OSError, EOFError) as e:
            raise DataError(f"{tar}: corrupt archive ({e})") from None
    parts = [_cifar_batch(raw, name) for name, raw in raws.items()]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    return ImageDataset(torch.from_numpy(data), torch.from_numpy(labels), "cifar10", xflip=True)


# ---- Fashion-MNIST (idx files, LeCun's format) ----------------------------------------------------------------
def read_idx(path: str, ndim: int) -> np.ndarray:
    """A uint8 idx file (plain or .gz): checks magic, dtype, rank and that the size matches the header."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:     # zlib.error: a .gz whose compressed stream is damaged
        raise DataError(f"{path}: unreadable ({e})") from None
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise DataError(f"{path}: not a uint8 idx file of rank {ndim} (header {raw[:4].hex() or 'empty'})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = 4 + 4 * ndim + math.prod(shape)       # np.prod wraps at 2**64: a header (2**22, 2**21, 2**21) said 16 bytes
    if len(raw) != size:
        raise DataError(f"{path}: truncated or padded (header says {shape} = {size} bytes, file has {len(raw)})")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_fmnist(data_dir: str, split: str = "train", given: bool = False) -> dict[str, str]:
    """The split's two files (only those: the other split need not exist), first folder holding both wins: a data_dir
    the caller gave (--data-dir) before the system copy, the default one after it."""
    names = FMNIST_SPLITS[split]
    mine = (data_dir, os.path.join(data_dir, "fashion-mnist"))
    for d in (*mine, FMNIST_SYSTEM_DIR) if given else (FMNIST_SYSTEM_DIR, *mine):
        found = {}
        for n in names:
            for cand in (os.path.join(d, n + ".gz"), os.path.join(d, n)):
                if os.path.isfile(cand):
                    found[n] = cand
                    break
        if len(found) == len(names):
            return found
    dest = os.path.join(data_dir, "fashion-mnist")
    hint = (f"Fashion-MNIST {split} not found: install the Debian package dataset-fashion-mnist or put "
            f"{' and '.join(n + '.gz' for n in names)} in {dest}")
    return {n: _download(FMNIST_URL + n + ".gz", os.path.join(dest, n + ".gz"), FMNIST_FILES[n], hint)
            for n in names}


def load_fashion_mnist(data_dir: str | None = None, split: str = "train", full: bool = False) -> ImageDataset:
    """The "train" (60,000) or "test" (10,000) images, 28x28 padded to 32x32 with -1 (uint8 0) as DESIGN.md 2
    asks. full=True also requires the split's whole count (reference statistics, the FD-FMNIST classifier)."""
    if split not in FMNIST_SPLITS:
        raise DataError(f"Fashion-MNIST split: expected 'train' or 'test', got {split!r}")
    image_name, label_name = FMNIST_SPLITS[split]
    files = _find_fmnist(data_dir or default_data_dir(), split, given=bool(data_dir))
    images = read_idx(files[image_name], 3)
    labels = read_idx(files[label_name], 1)
    if images.shape[1:] != (28, 28) or labels.shape[0] != images.shape[0]:
        raise DataError(f"{files[image_name]}: expected (n, 28, 28) images with n labels, got "
                        f"{images.shape} and {labels.shape}")
    if full and images.shape[0] != FMNIST_COUNTS[split]:
        raise DataError(f"{files[image_name]}: expected all {FMNIST_COUNTS[split]} Fashion-MNIST {split} images, "
                        f"got {images.shape[0]}")
    x = torch.nn.functional.pad(torch.from_numpy(images.copy())[:, None], (2, 2, 2, 2), value=0)
    return ImageDataset(x, torch.from_numpy(labels.astype(np.int64)), "fashion-mnist", xflip=False)


# ---- Image folders / zips (EDM dataset_tool layout: PNGs + optional dataset.json with labels) ------------------
def _folder_files(path: str):
    """(every file name, '/'-separated as in a zip; the image names among them, sorted; read(name) -> bytes; open(name)
    -> a file object) of an image folder or zip."""
    import zipfile
    if not path or not os.path.exists(path):
        raise DataError(f"image folder or zip not found: {path!r} (pass --data-dir)")
    if zipfile.is_zipfile(path):
        z = zipfile.ZipFile(path)
        names = sorted(z.namelist())
        read = z.read
        opener = lambda n: io.BytesIO(z.read(n))  # noqa: E731  (PIL seeks; a deflated member seeks slowly)
    elif os.path.isdir(path):
        names = []
        for r, _, fs in os.walk(path):      # as in a zip: a/b.png (one relpath a folder: one a file took 0.9 s of 50k)
            rel = os.path.relpath(r, path).replace(os.sep, "/")
            names += fs if rel == "." else [f"{rel}/{f}" for f in fs]
        names.sort()
        read = lambda n: open(os.path.join(path, n), "rb").read()  # noqa: E731
        opener = lambda n: open(os.path.join(path, n), "rb")  # noqa: E731
    else:
        raise DataError(f"{path}: expected a folder or a zip of images")
    # macOS's AppleDouble files (__MACOSX/, ._NAME.png: zips made in Finder, folders copied off a Mac) are no images
    images = [n for n in names if n.lower().endswith((".png", ".jpg", ".jpeg"))
              and not n.startswith("__MACOSX/") and not os.path.basename(n).startswith("._")]
    if not images:
        raise DataError(f"{path}: no PNG or JPEG images found")
    return names, images, read, opener


def _channels(where: str, mode: str) -> int:
    """The channels an image of PIL `mode` is read with: gray (and 1-bit, gray + alpha) 1, everything else 3 (a
    palette image as its colours, RGBA without the alpha, CMYK / YCbCr converted); 16-bit and float refused."""
    if mode.startswith("I") or mode == "F":
        raise DataError(f"{where}: {mode} pixels (16-bit or float) are not read; save 8 bits a channel")
    return 1 if mode in ("L", "1", "LA", "La") else 3


def _turn(im):
    """The transpose (a PIL.Image.Transpose, or None) that shows `im` upright, as viewers, PIL.ImageOps.exif_transpose
    and torchvision's decode_image(apply_exif_orientation=True) do: a photo taken sideways is stored sideways with
    EXIF Orientation (tag 0x0112) 6 or 8, and was loaded lying on its side. Read without decoding (Image.Image's
    getexif: PNG's own decodes the whole image when no eXIf chunk precedes IDAT; an eXIf after IDAT is found by
    _png_late_exif), so peek_folder, which decodes nothing, sees the same orientation, hence the same (possibly
    swapped) height and width, as load_folder."""
    from PIL import Image
    t = Image.Transpose
    o = Image.Image.getexif(im).get(0x0112, 1)      # EXIF 2.3 table 6: 1 as stored, 2-8 mirrored / turned
    if o == 1 and im.format == "PNG" and "exif" not in im.info:
        late = _png_late_exif(im.fp)
        if late is not None:
            exif = Image.Exif()
            exif.load(late)
            o = exif.get(0x0112, 1)
    return {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE, 6: t.ROTATE_270,
            7: t.TRANSVERSE, 8: t.ROTATE_90}.get(o) if isinstance(o, int) else None


def _png_late_exif(f) -> bytes | None:
    """The EXIF of a PNG whose eXIf chunk follows the image data (PNG 1.5 allows it anywhere before IEND, and tools
    that add metadata to a written file append it there; Pillow reads only what precedes IDAT until it decodes), found
    by walking the chunk headers and seeking over their data: nothing is decoded. None if there is none. `f` is left
    where it was."""
    import struct
    pos = f.tell()
    try:
        f.seek(8)                               # past the signature
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            n, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                body = f.read(n)
                return b"Exif\x00\x00" + body if len(body) == n else None
            if kind == b"IEND":
                return None
            f.seek(n + 4, 1)                    # the data and its CRC
    finally:
        f.seek(pos)


def _check_same(path: str, first: str, first_hwc: tuple, name: str, hwc: tuple) -> None:
    """Every image of a folder has the first one's size and channels (HWC shapes)."""
    if hwc != first_hwc:
        kind = lambda s: f"{s[1]}x{s[0]} {'gray' if s[2] == 1 else 'RGB'}"    # noqa: E731  (HWC shapes said less)
        raise DataError(f"{path}/{name}: expected all images {kind(first_hwc)} as {first}, got {kind(hwc)} "
                        "(nothing is resized or converted: save them all alike)")


# The most classes a dataset.json may number. ImageNet-21k, the largest class-labelled set in common use, has 21,841;
# a conditional net embeds a class as a row of (classes, embedding channels) and a one-hot as wide, so a class of
# 10**12 (a typo, an id in place of an index) asked for petabytes before the first step instead of one line here.
MAX_CLASSES = 100_000


def _check_class(name, v) -> None:
    """One dataset.json class: a JSON integer (3 or 3.0; not true, 2.5 or "3") in [0, MAX_CLASSES)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):    # int(inf): OverflowError
        raise ValueError(f"class {v!r} of {name} is not an integer")
    if not 0 <= v < MAX_CLASSES:
        raise ValueError(f"class {int(v)} of {name} is out of range")


def _read_labels(path: str, meta: str, read) -> dict:
    """One dataset.json's {file name relative to its folder: class} (empty for "labels": null)."""
    import zipfile
    try:    # EDM's layout: {"labels": [[file name, class], ...]} (or null)
        table = dict(json.loads(read(meta)).get("labels") or [])
        for k, v in table.items():
            _check_class(k, v)
        return {k: int(v) for k, v in table.items()}
    except (ValueError, TypeError, AttributeError, OSError, ArithmeticError, RuntimeError, zipfile.BadZipFile) as e:
        # ArithmeticError: a class Infinity; RuntimeError: JSON nested too deep, an encrypted zip member
        raise DataError(f"{path}/{meta}: expected {{\"labels\": [[file name, class], ...]}}, 0 <= class < "
                        f"{MAX_CLASSES} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                        ) from None


def _missing(where: str, missing: list[str], why: str = "") -> DataError:
    return DataError(f"{where}: no label for {missing[0]}"
                     + (f" and {len(missing) - 1} other image(s)" if len(missing) > 1 else "") + why)


def _folder_labels(path: str, names: list[str], images: list[str], read):
    """(labels (N,) int64 or None, class names or None) of a folder's images: from dataset.json (EDM's layout) if
    present, else from the subfolders when every image sits in one and there are two or more (ImageFolder's layout;
    class i = classes[i]), else none.

    A dataset.json labels the images of its own folder and below, by paths relative to it: the top one, that of the
    one folder holding every image (a zip of the folder itself: rgb32/dataset.json beside rgb32/00000/*.png), or one
    per subset (train/dataset.json and test/dataset.json: both read; before, neither was, and the two subfolders became
    two classes). An image takes the nearest one above it. One without images below it (notes/dataset.json) is none of
    the set's. Where any image has a label, every image needs one (a silent 0 would train a conditional model on wrong
    labels; EDM's loader fails too)."""
    labels = None
    metas = {n[:-len("dataset.json")]: n for n in names if n == "dataset.json" or n.endswith("/dataset.json")}
    owner = []                  # each image's nearest dataset.json above it, or None
    for n in images:
        d = n.rsplit("/", 1)[0] + "/" if "/" in n else ""
        while d not in metas and d:
            d = d[:-1].rsplit("/", 1)[0] + "/" if "/" in d[:-1] else ""
        owner.append(metas.get(d))
    used = sorted({m for m in owner if m is not None})     # any dataset.json of the set decides, not the subfolders
    tables = {m: _read_labels(path, m, read) for m in used}
    if any(tables.values()):
        out, unlisted, outside = [], {}, []
        for n, m in zip(images, owner):
            table = tables.get(m)
            if not table:
                outside.append(n)
            elif (rel := n[len(m) - len("dataset.json"):]) in table:
                out.append(table[rel])
            else:
                unlisted.setdefault(m, []).append(n)
        for m, missing in unlisted.items():
            raise _missing(f"{path}/{m}", missing)
        if outside:
            named = ", ".join(m for m in used if tables[m])
            raise _missing(path, outside, f" (under no dataset.json with labels; {named} label the others)")
        labels = torch.tensor(out, dtype=torch.int64)
    classes = None
    parts = [n.split("/") for n in images]
    while all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]          # a zip of the folder itself: myset/cats/001.png
    if not used and all(len(p) > 1 for p in parts) and len({p[0] for p in parts}) > 1:
        # torchvision ImageFolder's layout: one subfolder a class (cats/001.png, dogs/007.png), classes numbered in
        # the sorted order of their names. dataset.json, when present, decides (EDM's chunk folders 00000/ are none).
        classes = sorted({p[0] for p in parts})
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[p[0]] for p in parts], dtype=torch.int64)
    return labels, classes


def load_folder(path: str, xflip: bool = False) -> ImageDataset:
    """All PNG / JPEG images of a folder (recursively) or zip, same size once turned upright by their EXIF orientation
    (_turn). Labels from dataset.json (EDM's layout) if present, else from the subfolders when every image sits in one
    and there are two or more (ImageFolder's layout; `classes` then holds their names, class i = classes[i]), else
    none."""
    names, images, read, _ = _folder_files(path)
    labels, classes = _folder_labels(path, names, images, read)     # first: a bad dataset.json before 50k decodes
    from PIL import Image
    arrs = []
    for n in images:
        try:
            im = Image.open(io.BytesIO(read(n)))
            turn = _turn(im)
            im.load()
        except Exception as e:
            raise DataError(f"{path}/{n}: unreadable image ({type(e).__name__})") from None
        if im.mode not in ("L", "RGB"):
            im = im.convert("L" if _channels(f"{path}/{n}", im.mode) == 1 else "RGB")
        if turn is not None:
            im = im.transpose(turn)
        a = np.asarray(im)
        a = a[:, :, None] if a.ndim == 2 else a
        if arrs:
            _check_same(path, images[0], arrs[0].shape, n, a.shape)
        arrs.append(a)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(x, labels, "folder", xflip=xflip, classes=classes)


PEEK_IMAGES = 64     # the images whose headers peek_folder reads: the first, the last and evenly spaced ones between


class FolderPeek(types.SimpleNamespace):
    """What peek_folder finds: shape (C, H, W), count, num_classes, classes (as ImageDataset's)."""


def peek_folder(path: str, sample: int = PEEK_IMAGES) -> FolderPeek:
    """What load_folder would load, without decoding the images (cmfast-train --dry-run): the file list, the labels
    (dataset.json or the class subfolders) and the headers (size, mode, EXIF orientation) of `sample` images, the
    first, the last and evenly spaced ones between. Raises load_folder's error for anything it sees: no images, an
    unreadable header, 16-bit pixels, sampled images of different sizes or channels once upright, a bad dataset.json
    or one without a label for an image. An image outside the sample that differs, or whose data past its header is
    damaged, only the real load finds."""
    names, images, read, opener = _folder_files(path)
    labels, classes = _folder_labels(path, names, images, read)     # first, as load_folder: the same error first
    from PIL import Image
    k = min(sample, len(images))
    picked = sorted({round(i * (len(images) - 1) / max(k - 1, 1)) for i in range(k)})
    first = None
    for i in picked:
        n = images[i]
        try:
            with opener(n) as f, Image.open(f) as im:       # the header only: PIL decodes lazily
                w, h, mode = im.width, im.height, im.mode
                if _turn(im) in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                                 Image.Transpose.ROTATE_270):
                    w, h = h, w                 # EXIF orientation 5-8: load_folder turns the image a quarter
        except Exception as e:
            raise DataError(f"{path}/{n}: unreadable image ({type(e).__name__})") from None
        hwc = (h, w, _channels(f"{path}/{n}", mode))
        if first is None:
            first = hwc
        else:
            _check_same(path, images[0], first, n, hwc)
    return FolderPeek(shape=(first[2], first[0], first[1]), count=len(images), num_classes=class_count(labels),
                      classes=classes)


def load_dataset(name: str, data_dir: str | None = None, xflip: bool | None = None) -> ImageDataset:
    """'cifar10' | 'fashion-mnist' | 'folder' (data_dir is then the folder or zip)."""
    if name == "cifar10":
        ds = load_cifar10(data_dir)
    elif name == "fashion-mnist":
        ds = load_fashion_mnist(data_dir)
    elif name == "folder":
        ds = load_folder(data_dir)
    else:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if xflip is not None:
        ds.xflip = xflip
    return ds
