"""cmfast.data's image folders on their values: dataset.json's classes (integers in [0, MAX_CLASSES), the same line
from load_folder and peek_folder) and EXIF orientation (photos load upright, as a viewer shows them). Expected
pixels come from numpy rotations of the array written, not from PIL's transposes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cmfast import data


def _folder(root, n=3, h=4, w=6, seed=0):
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    arrs = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    for i, a in enumerate(arrs):
        Image.fromarray(a).save(root / f"img{i:04d}.png")
    return arrs


def _labels(root, classes):
    (root / "dataset.json").write_text(json.dumps({"labels": [[f"img{i:04d}.png", c] for i, c in enumerate(classes)]}))


@pytest.mark.parametrize("bad, why", [
    (10 ** 12, "class 1000000000000 of img0001.png is out of range"),     # a class count of 10**12 + 1 before
    (100_000, "class 100000 of img0001.png is out of range"),               # MAX_CLASSES itself: classes 0..99999
    (-1, "class -1 of img0001.png is out of range"),
    (2.5, "class 2.5 of img0001.png is not an integer"),                   # int() truncated it to 2
    (True, "class True of img0001.png is not an integer"),                 # int(True) read it as class 1
    ("3", "class '3' of img0001.png is not an integer"),
    (None, "class None of img0001.png is not an integer"),
])
def test_dataset_json_refuses_absurd_classes_in_one_line_from_load_and_peek(tmp_path, bad, why):
    _folder(tmp_path / "imgs")
    _labels(tmp_path / "imgs", [0, bad, 1])
    lines = []
    for fn in (data.load_folder, data.peek_folder):
        with pytest.raises(data.DataError) as e:
            fn(str(tmp_path / "imgs"))
        lines.append(str(e.value))
    assert lines[0] == lines[1]                                    # the dry run says what the run says
    assert "\n" not in lines[0] and lines[0].startswith(f"{tmp_path / 'imgs'}/dataset.json: expected ")
    assert "0 <= class < 100000" in lines[0] and why in lines[0]


def test_dataset_json_accepts_classes_up_to_the_bound(tmp_path):
    _folder(tmp_path / "imgs")
    _labels(tmp_path / "imgs", [99_999, 0, 7.0])          # 7.0: an integer written as a float (json of a float)
    ds = data.load_folder(str(tmp_path / "imgs"))
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [99_999, 0, 7] and ds.num_classes == 100_000
    assert data.peek_folder(str(tmp_path / "imgs")).num_classes == 100_000
    assert data.MAX_CLASSES == 100_000


def test_a_bad_dataset_json_is_reported_before_the_images_are_decoded(tmp_path):
    # load_folder decoded every image before reading dataset.json: a damaged image hid the label error (and a big
    # folder took minutes to say it); now both the run and the dry run name dataset.json first
    _folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "img0002.png").write_bytes(b"no PNG")
    _labels(tmp_path / "imgs", [0, -5, 1])
    for fn in (data.load_folder, data.peek_folder):
        with pytest.raises(data.DataError, match=r"imgs/dataset.json: expected .*class -5 of img0001.png"):
            fn(str(tmp_path / "imgs"))


# What a viewer does to the stored pixels to show EXIF orientation 1..8 (EXIF 2.3 table 6, in exiftool's words: 2
# mirror horizontal, 3 rotate 180, 4 mirror vertical, 5 mirror horizontal and rotate 270 CW, 6 rotate 90 CW, 7 mirror
# horizontal and rotate 90 CW, 8 rotate 270 CW), in numpy: np.rot90(a, -1) turns clockwise, np.rot90(a, 1) counter.
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: np.rot90(a, 2), 4: lambda a: a[::-1],
           5: lambda a: np.rot90(a[:, ::-1], 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a[:, ::-1], -1),
           8: lambda a: np.rot90(a, 1)}


def _save(path, a, orientation, fmt):
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_images_upright_in_load_and_peek(tmp_path, orientation):
    # PNG (Pillow writes an eXIf chunk): exact pixels. Stored 4 high, 6 wide: orientations 5-8 load 6 high, 4 wide.
    a = np.random.default_rng(orientation).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    _save(tmp_path / "a.png", a, orientation, "PNG")
    ds = data.load_folder(str(tmp_path))
    want = UPRIGHT[orientation](a)
    np.testing.assert_array_equal(ds.images[0].permute(1, 2, 0).numpy(), want)
    assert ds.shape == (3, *want.shape[:2]) == data.peek_folder(str(tmp_path)).shape
    assert ds.shape[1:] == ((6, 4) if orientation >= 5 else (4, 6))


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_sideways_jpeg_among_upright_ones_loads_upright(tmp_path, orientation):
    # A phone photo taken in portrait: stored 4 high and 6 wide with orientation 6 (or 8), shown 6 high and 4 wide
    # like the folder's other images. It was loaded lying on its side, and the folder refused as of mixed sizes.
    from PIL import Image
    rng = np.random.default_rng(0)
    portrait = rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)
    sideways = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(portrait).save(tmp_path / "a.jpg", quality=95)
    _save(tmp_path / "b.jpg", sideways, orientation, "JPEG")
    with Image.open(tmp_path / "b.jpg") as im:       # the stored pixels (JPEG is lossy): PIL's plain decode
        stored = np.asarray(im.convert("RGB"))
    assert stored.shape == (4, 6, 3)
    ds = data.load_folder(str(tmp_path))
    assert ds.shape == (3, 6, 4) == data.peek_folder(str(tmp_path)).shape
    np.testing.assert_array_equal(ds.images[1].permute(1, 2, 0).numpy(), UPRIGHT[orientation](stored))
    with Image.open(tmp_path / "a.jpg") as im:
        np.testing.assert_array_equal(ds.images[0].permute(1, 2, 0).numpy(), np.asarray(im))


def test_a_sideways_jpeg_that_differs_once_upright_is_refused_alike_by_load_and_peek(tmp_path):
    # stored 6x4 like the upright 6x4 one, but orientation 6 shows it 4 wide and 6 high: not the same size
    a = np.zeros((6, 4, 3), np.uint8)
    _save(tmp_path / "a.jpg", a, 1, "JPEG")
    _save(tmp_path / "b.jpg", a, 6, "JPEG")
    for fn in (data.load_folder, data.peek_folder):
        with pytest.raises(data.DataError, match="b.jpg: expected all images 4x6 RGB as a.jpg, got 6x4 RGB"):
            fn(str(tmp_path))


# ---- gaps a mutation study of cmfast/data.py left open (each test fails with the mutation named) ------------------
def test_zip_members_load_in_sorted_name_order(tmp_path):
    # a zip lists its members in the order they were added; images and dataset.json's labels pair by sorted names
    # (mutation: the zip's own order kept)
    import zipfile
    arrs = _folder(tmp_path / "imgs", n=4)
    with zipfile.ZipFile(tmp_path / "r.zip", "w") as z:
        for i in reversed(range(4)):
            z.write(tmp_path / "imgs" / f"img{i:04d}.png", f"img{i:04d}.png")
        z.writestr("dataset.json", json.dumps({"labels": [[f"img{i:04d}.png", 10 + i] for i in range(4)]}))
    ds = data.load_folder(str(tmp_path / "r.zip"))
    np.testing.assert_array_equal(ds.images.permute(0, 2, 3, 1).numpy(), arrs)
    assert ds.labels.tolist() == [10, 11, 12, 13]


def test_one_bit_images_load_as_gray(tmp_path):
    # PIL mode "1" (a 1-bit PNG): one channel of 0 / 255, as a gray image (mutation: mode "1" read as RGB)
    from PIL import Image
    bits = np.array([[1, 0, 1], [0, 0, 1]], bool)
    Image.fromarray(bits).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == "1"
    ds = data.load_folder(str(tmp_path))
    assert ds.shape == (1, 2, 3) == data.peek_folder(str(tmp_path)).shape
    np.testing.assert_array_equal(ds.images[0, 0].numpy(), bits.astype(np.uint8) * 255)


def test_a_dataset_json_in_a_subfolder_labels_only_a_folder_that_holds_every_image(tmp_path):
    # notes/dataset.json beside images outside notes/ is no label file of this set (mutation: read it anyway, then
    # 'no label for img0000.png'); a class-per-subfolder layout needs two subfolders or more (one: no labels)
    _folder(tmp_path / "a")
    (tmp_path / "a" / "notes").mkdir()
    (tmp_path / "a" / "notes" / "dataset.json").write_text(json.dumps({"labels": [["img0000.png", 1]]}))
    assert data.load_folder(str(tmp_path / "a")).labels is None
    _folder(tmp_path / "b" / "cats")
    for fn in (data.load_folder, data.peek_folder):
        got = fn(str(tmp_path / "b"))
        assert got.classes is None and got.num_classes == 0


def test_load_folder_xflip_and_one_line_errors_for_no_or_unreadable_images(tmp_path):
    _folder(tmp_path / "imgs")
    assert data.load_folder(str(tmp_path / "imgs"), xflip=True).xflip is True          # mutation: xflip dropped
    assert data.load_folder(str(tmp_path / "imgs")).xflip is False
    assert data.load_dataset("folder", str(tmp_path / "imgs"), xflip=True).xflip is True      # --xflip on a folder
    assert data.load_dataset("folder", str(tmp_path / "imgs")).xflip is False                # off unless asked
    (tmp_path / "imgs" / "img0001.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    for fn in (data.load_folder, data.peek_folder):
        with pytest.raises(data.DataError, match=r"imgs/img0001.png: unreadable image \(\w+\)$"):
            fn(str(tmp_path / "imgs"))
        with pytest.raises(data.DataError, match="empty: no PNG or JPEG images found"):
            fn(str(tmp_path / "empty"))


def test_peek_counts_every_image_not_only_the_headers_it_reads(tmp_path):
    # 5 images, headers of 2 read (the first and the last): count 5 (mutation: the number of headers read)
    _folder(tmp_path / "imgs", n=5)
    peek = data.peek_folder(str(tmp_path / "imgs"), sample=2)
    assert peek.count == 5 and peek.shape == (3, 4, 6)


def test_a_missing_path_and_float_pixels_are_named(tmp_path):
    # mutations: the existence check dropped (then 'expected a folder or a zip'); mode F let through as RGB
    from PIL import Image
    for fn in (data.load_folder, data.peek_folder):
        with pytest.raises(data.DataError, match="image folder or zip not found: .*nope"):
            fn(str(tmp_path / "nope"))
    (tmp_path / "f").mkdir()
    # a TIFF named .png: PIL reads it by its content, in mode F
    Image.fromarray(np.full((2, 2), 0.5, np.float32)).save(tmp_path / "f" / "a.png", format="TIFF")
    for fn in (data.load_folder, data.peek_folder):
        with pytest.raises(data.DataError, match="a.png: F pixels \\(16-bit or float\\) are not read"):
            fn(str(tmp_path / "f"))


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")      # torchvision 0.29 points at torchcodec
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_agrees_with_torchvisions_decoder(tmp_path, fmt):
    # an independent implementation: torchvision.io.decode_image(apply_exif_orientation=True), libpng / libjpeg
    # underneath. PNG exact; JPEG within 8 levels (two decoders' IDCT and chroma upsampling may differ by a few
    # levels; a wrong turn or mirror of random pixels differs by ~100s)
    io = pytest.importorskip("torchvision.io")
    for o in range(1, 9):
        a = np.random.default_rng(o).integers(0, 256, (4, 6, 3), dtype=np.uint8)
        sub = tmp_path / str(o)
        sub.mkdir()
        _save(sub / f"a.{fmt.lower()}", a, o, fmt)
        raw = (sub / f"a.{fmt.lower()}").read_bytes()
        want = io.decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), apply_exif_orientation=True)
        got = data.load_folder(str(sub)).images[0]
        assert got.shape == want.shape == data.peek_folder(str(sub)).shape, o
        assert (got.int() - want.int()).abs().max() <= (0 if fmt == "PNG" else 8), o


def _chunks(raw: bytes) -> list[bytes]:
    """A PNG's chunks, each whole (length, type, data, CRC), after the 8-byte signature."""
    import struct
    out, i = [], 8
    while i < len(raw):
        n = struct.unpack(">I", raw[i:i + 4])[0]
        out.append(raw[i:i + 12 + n])
        i += 12 + n
    return out


@pytest.mark.parametrize("orientation", [3, 6])
def test_exif_after_the_image_data_turns_png_upright_in_load_and_peek(tmp_path, orientation):
    # PNG 1.5 lets eXIf follow IDAT (tools that add metadata to a written file append it there). Pillow reads only
    # the chunks before IDAT until it decodes, so such a photo loaded as stored, lying on its side. The file here is
    # Pillow's own with its eXIf chunk moved after IDAT, bytes otherwise unchanged (each chunk keeps its CRC).
    from PIL import Image
    a = np.random.default_rng(orientation).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    _save(tmp_path / "early.png", a, orientation, "PNG")
    raw = (tmp_path / "early.png").read_bytes()
    chunks = _chunks(raw)
    kinds = [c[4:8] for c in chunks]
    assert kinds.index(b"eXIf") < kinds.index(b"IDAT")
    exif = chunks.pop(kinds.index(b"eXIf"))
    chunks.insert(len(chunks) - 1, exif)                     # just before IEND
    (tmp_path / "early.png").unlink()
    (tmp_path / "late.png").write_bytes(raw[:8] + b"".join(chunks))
    with Image.open(tmp_path / "late.png") as im:            # the case: nothing of it in the header Pillow reads
        assert "exif" not in im.info and Image.Image.getexif(im).get(0x0112) is None
    ds = data.load_folder(str(tmp_path))
    want = UPRIGHT[orientation](a)
    np.testing.assert_array_equal(ds.images[0].permute(1, 2, 0).numpy(), want)
    assert ds.shape == (3, *want.shape[:2]) == data.peek_folder(str(tmp_path)).shape


def test_png_late_exif_walks_chunks_and_leaves_the_file_where_it_was(tmp_path):
    import io as _io
    from PIL import Image
    Image.fromarray(np.zeros((2, 3), np.uint8)).save(tmp_path / "a.png")
    raw = (tmp_path / "a.png").read_bytes()
    f = _io.BytesIO(raw)
    f.seek(5)
    assert data._png_late_exif(f) is None and f.tell() == 5             # no eXIf at all: None, position kept
    assert data._png_late_exif(_io.BytesIO(raw[:-12])) is None           # no IEND (cut): None, no error
    body = b"MM\x00\x2a\x00\x00\x00\x08\x00\x00"
    import struct
    import zlib
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    assert data._png_late_exif(_io.BytesIO(raw[:-12] + chunk + raw[-12:])) == b"Exif\x00\x00" + body
    assert data._png_late_exif(_io.BytesIO(raw[:-12] + chunk[:-8])) is None   # a chunk cut short: None


def _edm_subset(root, classes, seed):
    """EDM dataset_tool's layout: root/00000/img*.png and root/dataset.json naming them '00000/img*.png'."""
    arrs = _folder(root / "00000", n=len(classes), seed=seed)
    (root / "dataset.json").write_text(json.dumps(
        {"labels": [[f"00000/img{i:04d}.png", c] for i, c in enumerate(classes)]}))
    return arrs


def test_a_dataset_json_per_subset_labels_each_subsets_images(tmp_path):
    # train/dataset.json and test/dataset.json, each EDM's layout: before, neither was read, and the two subfolders
    # became two classes ('test' 0, 'train' 1) of a conditional model. Now each labels its own images; in a zip too.
    import zipfile
    root = tmp_path / "set"
    a_test = _edm_subset(root / "test", [7, 2], seed=1)
    a_train = _edm_subset(root / "train", [0, 5, 9], seed=2)
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                z.write(f, f"set/{f.relative_to(root)}")
    for path in (root, tmp_path / "set.zip"):
        ds = data.load_folder(str(path))
        assert ds.labels.tolist() == [7, 2, 0, 5, 9] and ds.classes is None      # sorted names: test/ before train/
        np.testing.assert_array_equal(ds.images.permute(0, 2, 3, 1).numpy(), np.concatenate([a_test, a_train]))
        peek = data.peek_folder(str(path))
        assert peek.num_classes == ds.num_classes == 10 and peek.classes is None


def test_the_nearest_dataset_json_above_an_image_labels_it(tmp_path):
    root = tmp_path / "set"
    _folder(root, n=2)
    _labels(root, [1, 3])
    _edm_subset(root / "extra", [4], seed=3)      # extra/dataset.json names 00000/img0000.png relative to extra/
    assert data.load_folder(str(root)).labels.tolist() == [4, 1, 3]     # extra/00000/img0000.png sorts first


def test_images_under_no_labelled_dataset_json_in_a_labelled_set_are_refused(tmp_path):
    # a subset without labels beside a labelled one, or images beside a labelled subfolder: which class? One line
    # from the run and the dry run, naming the images and the label files; before, all were read unlabelled
    root = tmp_path / "set"
    _edm_subset(root / "a", [1, 2], seed=1)
    _folder(root / "b" / "00000", n=2, seed=2)
    (root / "b" / "dataset.json").write_text('{"labels": null}')
    for fn in (data.load_folder, data.peek_folder):
        with pytest.raises(data.DataError, match=r"set: no label for b/00000/img0000\.png and 1 other image\(s\) "
                                                 r"\(under no dataset.json with labels; a/dataset.json label the "
                                                 r"others\)$"):
            fn(str(root))
    (root / "b" / "dataset.json").unlink()
    with pytest.raises(data.DataError, match=r"no label for b/00000/img0000\.png and 1 other"):
        data.load_folder(str(root))
    # every subset null: no labels at all, and no class-per-subfolder labels either (dataset.json decides)
    (root / "b" / "dataset.json").write_text('{"labels": null}')
    (root / "a" / "dataset.json").write_text('{"labels": null}')
    ds = data.load_folder(str(root))
    assert ds.labels is None and ds.classes is None
    # a label file's own missing name is still its error
    _edm_subset(root / "a", [1, 2], seed=1)
    (root / "b" / "dataset.json").write_text(json.dumps({"labels": [["00000/img0000.png", 3]]}))
    with pytest.raises(data.DataError, match=r"set/b/dataset.json: no label for b/00000/img0001\.png$"):
        data.load_folder(str(root))
