"""Image grids for TensorBoard and PNG files (one implementation for the trainer and the tools)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model pixels in [-1, 1] → uint8 grey levels (the inverse of the loader's normalisation)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 grey levels → float pixels in [-1, 1], the range G produces."""
    return x.float().div_(127.5).sub_(1.0)


def grid_array(images: torch.Tensor, rows: int, cols: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """(rows*cols, 1, H, W) uint8 → one (rows*(H+pad)+pad, cols*(W+pad)+pad) uint8 array."""
    imgs = images.detach().cpu()
    if imgs.dtype != torch.uint8:
        imgs = to_uint8(imgs)
    n, _, h, w = imgs.shape
    if n > rows * cols:
        raise ValueError(f"{n} images do not fit a {rows}x{cols} grid")
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), fill, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + h, x:x + w] = imgs[i, 0].numpy()
    return out


def labelled_grid(images: torch.Tensor, rows: int, cols: int, row_labels: Sequence[str] | None = None,
                  col_labels: Sequence[str] | None = None, scale: int = 2) -> Image.Image:
    """A grid with text labels left of each row and above each column, upscaled ``scale`` times."""
    grid = Image.fromarray(grid_array(images, rows, cols))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    font = ImageFont.load_default()
    left = (max((len(s) for s in row_labels), default=0) * 7 + 8) if row_labels else 0
    top = 16 if col_labels else 0
    canvas = Image.new("L", (grid.width + left, grid.height + top), 255)
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    cell_h = (grid.height - 2 * scale) / rows
    cell_w = (grid.width - 2 * scale) / cols
    for r, label in enumerate(row_labels or []):
        draw.text((4, top + int((r + 0.5) * cell_h) - 5), label, fill=0, font=font)
    for c, label in enumerate(col_labels or []):
        draw.text((left + int(c * cell_w) + 4, 2), label, fill=0, font=font)
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
