"""Differentiable augmentation of D's inputs (DiffAugment, Zhao et al. 2020): flip, translation and cutout.

Why: on a small set D memorises the real faces and its gradients stop telling G anything
useful; augmenting *both* real and fake images the same way, differentiably (so G's gradient
passes through), keeps D from overfitting without leaking the augmentation into G's output.

The parameters of one step are drawn once (``sample``) from a seeded generator and applied to
the real and the fake batch of that step, in the D update and in the G/E update alike; a
resumed run draws the same parameters as a straight one.

- ``flip``: mirror left-right with probability 1/2 (a mirrored face is still a face with the same
  emotion; StyleGAN's ``--mirror`` applies it to the data instead).
- ``translation``: shift by up to ``1/8`` of the image in x and y (integer pixels), zero padded
  (zero is mid-grey in [-1, 1]).
- ``cutout``: one square of half the image side set to 0 at a random centre.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DIFF_AUGMENTS: tuple[str, ...] = ("flip", "translation", "cutout")
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


@dataclass
class DiffAugmentParams:
    """One step's draw: per-sample mirror flags, shifts and cutout centres (None where the op is off)."""

    flip: torch.Tensor | None = None  # (B,) bool
    shift: torch.Tensor | None = None  # (B, 2) integer pixels (dy, dx)
    centre: torch.Tensor | None = None  # (B, 2) integer pixels (cy, cx)


def sample(ops: list[str] | tuple[str, ...], batch: int, size: int, generator: torch.Generator,
           device: torch.device) -> DiffAugmentParams:
    """Draw the parameters of ``ops`` for ``batch`` images of ``size`` x ``size`` (on ``generator``'s device)."""
    flip = shift = centre = None
    if "flip" in ops:
        flip = torch.rand(batch, generator=generator, device=device) < 0.5
    if "translation" in ops:
        m = int(size * TRANSLATION_RATIO + 0.5)
        shift = torch.randint(-m, m + 1, (batch, 2), generator=generator, device=device)
    if "cutout" in ops:
        centre = torch.randint(0, size, (batch, 2), generator=generator, device=device)
    return DiffAugmentParams(flip, shift, centre)


def _grid(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(size, device=device)
    return r.view(1, size, 1), r.view(1, 1, size)


def apply(x: torch.Tensor, params: DiffAugmentParams) -> torch.Tensor:
    """Augment ``x`` (B, C, H, W) with one step's parameters; differentiable with respect to ``x``."""
    if params.flip is None and params.shift is None and params.centre is None:
        return x
    b, _, h, w = x.shape
    if params.flip is not None:
        x = torch.where(params.flip.view(b, 1, 1, 1), x.flip(-1), x)
    ys, xs = _grid(h, x.device)
    if params.shift is not None:
        dy, dx = params.shift[:, 0].view(b, 1, 1), params.shift[:, 1].view(b, 1, 1)
        src_y, src_x = ys - dy, xs - dx  # output pixel (y, x) reads input (y - dy, x - dx)
        valid = (src_y >= 0) & (src_y < h) & (src_x >= 0) & (src_x < w)
        index = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(b, 1, h * w).expand(-1, x.shape[1], -1)
        flat = x.reshape(b, x.shape[1], h * w)
        x = flat.gather(2, index).view_as(x) * valid.unsqueeze(1).to(x.dtype)
    if params.centre is not None:
        half = int(h * CUTOUT_RATIO) // 2
        cy, cx = params.centre[:, 0].view(b, 1, 1), params.centre[:, 1].view(b, 1, 1)
        hole = ((ys - cy).abs() < half) & ((xs - cx).abs() < half)
        x = x * (~hole).unsqueeze(1).to(x.dtype)
    return x
