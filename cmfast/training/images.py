"""Image files at the edge of the pipeline: [-1, 1] float -> uint8, grids, and PNG written with zlib (no PIL)."""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), rounded as EDM's generate.py does."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """uint8 (B, H, W, C) -> one (rows H, cols W, C) image, row-major; empty cells stay black."""
    b, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    out = np.zeros((rows * h, cols * w, c), np.uint8)
    for i in range(b):
        r, q = divmod(i, cols)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i]
    return out


def png_bytes(img: np.ndarray) -> bytes:
    """uint8 (H, W, 1 | 3) -> PNG (8-bit grayscale or RGB, filter 0, one IDAT chunk; PNG spec 1.2)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f"expected uint8 (H, W, 1 or 3), got {img.dtype} {img.shape}")
    h, w, c = img.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * c)], axis=1).tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
