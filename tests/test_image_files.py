"""The image-file edges, checked on their values: cmfast.training.images (the training loop's and cmfast-sample's
uint8 conversion, grids and zlib-written PNGs) and cmfast.cli._png (cmfast-edit's PNG reading and writing, grids).
Expected values come from float64 transcriptions of the formulas and from an independent PNG parse (PNG spec 1.2),
not from the code under test."""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch

from cmfast.cli import _png
from cmfast.training import images


def _parse_png(data: bytes):
    """(width, height, bit depth, colour type, rows (H, W * C) uint8) of an unfiltered, non-interlaced PNG, every chunk's
    CRC checked (PNG spec 1.2: chunk = length, type, data, CRC-32 of type + data)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks.append((tag, body))
        pos += 12 + n
    assert [t for t, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (comp, filt, interlace) == (0, 0, 0)
    raw = zlib.decompress(b"".join(b for t, b in chunks if t == b"IDAT"))
    c = {0: 1, 2: 3}[ctype]
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + w * c)
    assert (rows[:, 0] == 0).all()          # filter type 0 (None) on every scanline
    return w, h, depth, ctype, rows[:, 1:]


def test_training_to_uint8_is_edms_rounding():
    # EDM generate.py: (x * 127.5 + 128).clip(0, 255).to(uint8), i.e. floor after the clip; (B, C, H, W) -> (B, H, W, C)
    vals = [-1.5, -1.0, -0.999, -0.5, -1 / 255, 0.0, 0.3, 0.5, 127 / 127.5 - 1.0039, 0.99, 1.0, 2.0]
    x = torch.tensor(vals, dtype=torch.float64).reshape(2, 3, 2, 1).float()
    got = images.to_uint8(x)
    assert got.dtype == np.uint8 and got.shape == (2, 2, 1, 3)
    want = np.floor(np.clip(x.double().numpy() * 127.5 + 128, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, want)
    assert images.to_uint8(torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3)).ravel().tolist() == [0, 128, 255]


def test_training_grid_is_row_major_with_black_empty_cells():
    b, h, w = 5, 2, 3
    imgs = (np.arange(b, dtype=np.uint8)[:, None, None, None] * 40 + 10).repeat(h, 1).repeat(w, 2).repeat(3, 3)
    imgs[:, 0, 0, 0] = 250 - np.arange(b, dtype=np.uint8)      # a marked corner: the tile is not transposed
    g = images.grid(imgs)                                       # cols = ceil(sqrt(5)) = 3, rows = 2
    assert g.shape == (2 * h, 3 * w, 3) and g.dtype == np.uint8
    for i in range(b):
        r, q = i // 3, i % 3
        np.testing.assert_array_equal(g[r * h:(r + 1) * h, q * w:(q + 1) * w], imgs[i])
    assert (g[h:, 2 * w:] == 0).all()
    g2 = images.grid(imgs, cols=2)                              # rows = ceil(5 / 2) = 3
    assert g2.shape == (3 * h, 2 * w, 3)
    np.testing.assert_array_equal(g2[2 * h:, :w], imgs[4])
    assert (g2[2 * h:, w:] == 0).all()


@pytest.mark.parametrize("c", [1, 3])
def test_png_bytes_decode_to_the_same_pixels(c):
    h, w = 5, 7                          # not square: a width / height swap shows
    img = np.random.default_rng(c).integers(0, 256, (h, w, c), dtype=np.uint8)
    data = images.png_bytes(img)
    pw, ph, depth, ctype, rows = _parse_png(data)
    assert (pw, ph, depth, ctype) == (w, h, 8, 0 if c == 1 else 2)
    np.testing.assert_array_equal(rows.reshape(h, w, c), img)
    import io

    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == ("L" if c == 1 else "RGB") and im.size == (w, h)
        np.testing.assert_array_equal(np.asarray(im).reshape(h, w, c), img)


def test_png_bytes_refuses_other_layouts():
    for bad in (np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2), np.uint8), np.zeros((2, 2, 3), np.float32)):
        with pytest.raises(ValueError, match="expected uint8"):
            images.png_bytes(bad)


def test_cli_to_uint8_rounds_to_nearest():
    vals = torch.tensor([-2.0, -1.0, -0.998, -0.5, 0.0, 0.25, 0.7, 1.0, 3.0], dtype=torch.float64)
    want = np.round((np.clip(vals.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8)
    got = _png.to_uint8(vals.float().reshape(1, 3, 3))
    assert got.shape == (3, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got.ravel(), want)
    rgb = torch.stack([vals[:6].reshape(2, 3), torch.zeros(2, 3, dtype=torch.float64),
                       -torch.ones(2, 3, dtype=torch.float64)]).float()
    got3 = _png.to_uint8(rgb)
    assert got3.shape == (2, 3, 3)                            # (H, W, C)
    np.testing.assert_array_equal(got3[..., 0].ravel(), want[:6])
    assert (got3[..., 1] == 128).all() and (got3[..., 2] == 0).all()


def test_save_png_scales_by_nearest_and_load_png_reads_it_back(tmp_path):
    from PIL import Image
    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)     # H 3, W 4
    x = torch.from_numpy(rgb.astype(np.float64) / 127.5 - 1).permute(2, 0, 1).float()
    p = str(tmp_path / "a.png")
    _png.save_png(x, p, scale=2)
    with Image.open(p) as im:
        assert im.mode == "RGB" and im.size == (8, 6)
        np.testing.assert_array_equal(np.asarray(im), rgb.repeat(2, 0).repeat(2, 1))
    _png.save_png(x, p)
    back = _png.load_png(p, 3, size=(3, 4))
    assert back.shape == (3, 3, 4) and back.dtype == torch.float32
    torch.testing.assert_close(back.double(), torch.from_numpy(rgb).permute(2, 0, 1).double() / 127.5 - 1,
                               rtol=0, atol=1e-6)
    # gray by ITU-R 601 luma (L = 0.299 R + 0.587 G + 0.114 B, to within PIL's integer rounding)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    gray = (_png.load_png(p, 1).double() + 1) * 127.5
    assert gray.shape == (1, 3, 4)
    assert (gray[0] - torch.from_numpy(luma)).abs().max() <= 1.0
    with pytest.raises(ValueError, match="expected 3x4 pixels, got 4x3"):
        _png.load_png(p, 3, size=(4, 3))


def test_load_png_repeats_a_gray_file_to_rgb(tmp_path):
    from PIL import Image
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    x = _png.load_png(str(tmp_path / "g.png"), 3)
    want = torch.from_numpy(g).double() / 127.5 - 1
    assert x.shape == (3, 3, 4)
    for ch in range(3):
        torch.testing.assert_close(x[ch].double(), want, rtol=0, atol=1e-6)


def test_cli_grid_geometry_fill_and_gray_tiles():
    a = torch.full((3, 2, 3), 0.5)
    b = torch.tensor([[[-1.0, 0.0, 1.0], [0.25, -0.25, 0.75]]])     # gray (1, 2, 3)
    c = torch.full((3, 2, 3), -0.5)
    g = _png.grid([[a, b], [c]], pad=1, fill=0.9)
    H, W, pad = 2, 3, 1
    assert g.shape == (3, 2 * (H + pad) + pad, 2 * (W + pad) + pad)
    assert torch.equal(g[:, 1:3, 1:4], a)
    assert torch.equal(g[:, 1:3, 5:8], b.expand(3, -1, -1))
    assert torch.equal(g[:, 4:6, 1:4], c)
    mask = torch.ones_like(g, dtype=torch.bool)
    for y0, x0 in ((1, 1), (1, 5), (4, 1)):
        mask[:, y0:y0 + H, x0:x0 + W] = False
    assert (g[mask] == 0.9).all()                # padding and the empty cell (row 2, column 2) are the fill
    assert math.isclose(float(_png.grid([[b]])[0, 0, 0]), 1.0)     # the default fill is white, pad 2
    assert _png.grid([[b]]).shape == (1, 2 + 2 + 2, 3 + 2 + 2)


def test_png_files_are_sorted_and_skip_appledouble_and_other_files(tmp_path):
    for name in ("b.png", "a.PNG", "c.png", "._a.png", "notes.txt", "d.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert _png.png_files(str(tmp_path)) == [str(tmp_path / n) for n in ("a.PNG", "b.png", "c.png")]
    assert _png.png_files(str(tmp_path / "c.png")) == [str(tmp_path / "c.png")]
    with pytest.raises(FileNotFoundError, match="input not found"):
        _png.png_files(str(tmp_path / "missing.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .png files in"):
        _png.png_files(str(tmp_path / "empty"))
