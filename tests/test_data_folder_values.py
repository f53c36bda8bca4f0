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
