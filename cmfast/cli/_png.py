"""PNG edges of the CLIs: 8-bit grayscale / RGB files <-> [-1, 1] tensors, and image grids. PIL is imported
lazily (it comes with torchvision), so `import cmfast` does not need it."""
from __future__ import annotations

import os

import numpy as np
import torch


def png_files(path: str) -> list[str]:
    """One PNG, or the sorted PNGs of a directory (macOS's ._NAME.png AppleDouble files skipped, as in training)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(".png") and not f.startswith("._"))
        if not files:
            raise FileNotFoundError(f"no .png files in {path}")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input not found: {path}")
    return [path]


def load_png(path: str, channels: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(channels, H, W) float32 in [-1, 1]; RGB files become gray by PIL's ITU-R 601 luma, gray files RGB by
    repetition. `size` (H, W): a clear error when the file has another size. 16-bit and float images are refused
    (convert clipped them to 255: an almost all-white input), as cmfast.data.load_folder refuses them."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I") or im.mode == "F":
                raise ValueError(f"{path}: {im.mode} pixels (16-bit or float) are not read; save 8 bits a channel")
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, Image.DecompressionBombError) as e:     # the bomb check (huge width x height) is no OSError
        raise ValueError(f"{path}: not a readable image ({e})") from None
    if size is not None and arr.shape[:2] != tuple(size):
        raise ValueError(f"{path}: expected {size[1]}x{size[0]} pixels, got {arr.shape[1]}x{arr.shape[0]}")
    x = torch.from_numpy(arr.copy()).float()
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    return x / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, 3) uint8, clamped."""
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()


def save_png(x: torch.Tensor, path: str, scale: int = 1) -> None:
    """Write (C, H, W) in [-1, 1] as an 8-bit gray (C = 1) or RGB (C = 3) PNG, upscaled by nearest `scale`."""
    from PIL import Image
    if scale > 1:
        x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    Image.fromarray(to_uint8(x)).save(path)


def grid(rows: list[list[torch.Tensor]], pad: int = 2, fill: float = 1.0) -> torch.Tensor:
    """Tile rows of equally sized (C, H, W) images with `pad` pixels of `fill` between and around them:
    (C, R (H + pad) + pad, K (W + pad) + pad), C the largest channel count (gray tiles repeated to RGB)."""
    C = max(t.shape[0] for r in rows for t in r)
    H, W = rows[0][0].shape[1:]
    K = max(len(r) for r in rows)
    out = torch.full((C, len(rows) * (H + pad) + pad, K * (W + pad) + pad), fill)
    for i, r in enumerate(rows):
        for j, t in enumerate(r):
            y0, x0 = pad + i * (H + pad), pad + j * (W + pad)
            out[:, y0:y0 + H, x0:x0 + W] = t.detach().float().cpu().expand(C, -1, -1)
    return out
