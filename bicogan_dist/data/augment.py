"""The seed paper's augmentations, on two interchangeable backends.

The paper compared six imgaug augmentations (docs/architecture.md §1). ``PRESET_TABLE`` writes
each down once — name, what it does, its parameter range — and both backends are
built from it:

* ``imgaug``: the paper's own library, per image on the CPU. The reference.
* ``torch``: batched on the images' device. Per-sample parameters are drawn from a
  CPU ``torch.Generator`` (same numbers on any device, so a resumed or moved run repeats
  them) and reach a GPU through pinned memory without blocking (``_to_device``: no host
  sync per batch), all geometric ops of a run of
  consecutive ops become one affine matrix per image and one ``affine_grid`` +
  ``grid_sample`` call, with imgaug's defaults (bilinear, constant 0 outside the image,
  rotation about the centre pixel at ((W-1)/2, (H-1)/2), uint8 rounding between ops).

The presets are the paper's values, literally. Note ``affine_shear`` =
``Affine(shear=(0, 0.2))``: imgaug's shear is in DEGREES, so it shears by at most 0.2
degrees — a corner of a 48x48 image moves by less than 0.1 px, all but a no-op (which
may be why the paper saw no effect). ``preset_with("affine_shear", 20)`` is a real shear.

Each op fires on each image independently with probability ``p`` (imgaug's
``Sometimes``), so the paper's ``Fliplr(1)`` becomes a random flip. Augmenters are
pure functions of (images, seed): the loader derives the seed from run seed, epoch,
batch index and rank, so a resumed run reproduces its augmentations without saving
RNG state.

How closely the backends agree, per op with fixed parameters, on 96 synthetic faces
(absolute difference in grey levels: mean / 99th percentile / max; asserted by
``tests/test_augment.py`` as mean < 0.25, p99 <= 1, max <= 2):

================  ===================  ============================================
op (fixed value)  mean / p99 / max     why they differ at all
================  ===================  ============================================
rotate 30, -50    < 0.001 / 0 / 1      cv2.warpAffine's fixed-point coordinates
shear 20          < 0.001 / 0 / 1      same
scale 1.3         0.001 / 0 / 1        same
fliplr            0 / 0 / 0            exact
crop 10%, 20%     0.10, 0.06 / 1 / 1   cv2 INTER_AREA, emulated by snapping
gamma 2, 0.5      0 / 0 / 0            exact: the same float32 lookup table
================  ===================  ============================================

Chains differ more, by design: imgaug interpolates once per op, the torch backend once
per run of consecutive geometric ops (sharper). Shear 20 → rotate 30 → crop 10%:
3.6 / 26 / 85; rotate 30 → scale 1.3: 2.3 / 18 / 80. Applying the ops one torch call
at a time reproduces imgaug's chain (mean < 0.25).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from bicogan_dist.config import ConfigError

Kind = Literal["rotate", "fliplr", "shear", "crop", "gamma", "scale"]
_GEOMETRIC: frozenset[str] = frozenset({"rotate", "fliplr", "shear", "crop", "scale"})


@dataclass(frozen=True)
class OpPreset:
    """One augmentation: its kind and the range [low, high] its parameter is drawn from per image.

    Parameter per kind: rotate — degrees (positive turns clockwise on screen); shear —
    degrees, applied to x and y alike (imgaug's meaning of a ``shear`` tuple); scale —
    factor, x and y drawn independently (>1 zooms in); crop — fraction cropped from each
    side, the four drawn independently, then resized back; gamma — exponent; fliplr —
    probability of flipping (1: always, when the op fires).
    """

    name: str
    kind: Kind
    low: float
    high: float
    paper: str  # the imgaug expression the seed paper used

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"{self.name}: low {self.low} > high {self.high}")
        bounds = {"crop": (0.0, 0.49), "fliplr": (0.0, 1.0), "gamma": (1e-3, math.inf), "scale": (1e-3, math.inf)}
        lo, hi = bounds.get(self.kind, (-math.inf, math.inf))
        if self.low < lo or self.high > hi:
            raise ValueError(f"{self.name}: values must lie in [{lo}, {hi}], got [{self.low}, {self.high}]")

    @property
    def fixed(self) -> bool:
        return self.low == self.high


#: The paper's augmentations, written once (docs/architecture.md §1, best first).
PRESET_TABLE: dict[str, OpPreset] = {p.name: p for p in (
    OpPreset("affine_rotate", "rotate", -50.0, 30.0, "iaa.Affine(rotate=(-50, 30))"),
    OpPreset("fliplr", "fliplr", 1.0, 1.0, "iaa.Fliplr(1)"),
    # degrees, not radians: all but a no-op, kept literally (see the module docstring)
    OpPreset("affine_shear", "shear", 0.0, 0.2, "iaa.Affine(shear=(0, 0.2))"),
    OpPreset("crop", "crop", 0.0, 0.2, "iaa.Crop(percent=(0, 0.2))"),
    OpPreset("gamma_contrast", "gamma", 2.0, 2.0, "iaa.GammaContrast(2)"),
    OpPreset("affine_scale", "scale", 1.0, 1.5, 'iaa.Affine(scale={"x": (1.5, 1.0), "y": (1.5, 1.0)})'),
)}
#: Names accepted in ``AugmentConfig.ops``.
PRESETS: tuple[str, ...] = tuple(PRESET_TABLE)


def preset_with(name: str, value: float) -> OpPreset:
    """The preset ``name`` with its parameter fixed to ``value`` (e.g. rotate exactly 30 degrees)."""
    return replace(_lookup(name), low=float(value), high=float(value))


def _lookup(name: str) -> OpPreset:
    if name not in PRESET_TABLE:
        raise ValueError(f"unknown augmentation {name!r}; presets: {list(PRESETS)}")
    return PRESET_TABLE[name]


@dataclass
class AugmentConfig:
    """Which augmentations the loader applies to real training images."""

    ops: list[str] = field(default_factory=lambda: ["affine_rotate"])  # composable, applied in order; [] = none
    backend: Literal["torch", "imgaug"] = "torch"
    p: float = 0.5  # each op is applied to each image independently with probability p

    def __post_init__(self) -> None:
        if isinstance(self.ops, str):
            self.ops = [s.strip() for s in self.ops.split(",") if s.strip()]
        unknown = [op for op in self.ops if op not in PRESET_TABLE]
        if unknown:
            raise ConfigError(f"augment.ops: unknown augmentation {unknown[0]!r}; presets: {list(PRESETS)}")
        if self.backend not in ("torch", "imgaug"):
            raise ConfigError(f"augment.backend: {self.backend!r} is not one of ['torch', 'imgaug']")
        if not 0.0 <= float(self.p) <= 1.0:
            raise ConfigError(f"augment.p must lie in [0, 1], got {self.p}")


class Augmenter:
    """``augmenter(images, seed)``: uint8 (B, C, H, W) on any device → same shape, dtype and device.

    Deterministic for a seed; ``seed`` is a non-negative integer (reduced modulo 2**63).
    """

    backend: str

    def __init__(self, ops: list[OpPreset], p: float):
        if not ops:
            raise ValueError("an augmenter needs at least one op")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.ops, self.p = list(ops), float(p)

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] == 0:
            return images.clone()
        return self._augment(images, int(seed) % 2**63)

    def _augment(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ops={[o.name for o in self.ops]}, p={self.p})"


def make_augmenter(ops: list[OpPreset | str], backend: Literal["torch", "imgaug"] = "torch",
                   p: float = 0.5) -> Augmenter:
    """An augmenter from presets (or preset names), e.g. ``[preset_with("affine_rotate", 30)]``."""
    presets = [_lookup(o) if isinstance(o, str) else o for o in ops]
    if backend == "torch":
        return TorchAugmenter(presets, p)
    if backend == "imgaug":
        return ImgaugAugmenter(presets, p)
    raise ValueError(f"unknown augmentation backend {backend!r}; expected 'torch' or 'imgaug'")


def build_augmenter(cfg: AugmentConfig) -> Augmenter | None:
    """The configured augmenter, or None when ``cfg.ops`` is empty."""
    return make_augmenter(list(cfg.ops), cfg.backend, cfg.p) if cfg.ops else None


# --------------------------------------------------------------------------- torch


def _forward_matrices(kind: str, params: dict[str, torch.Tensor], h: int, w: int) -> torch.Tensor:
    """(B, 3, 3) float64 forward maps (input pixel → output pixel), coordinates centred on ((W-1)/2, (H-1)/2).

    These are imgaug's matrices (``_AffineSamplingResult.to_matrix``, y pointing down).
    """
    n = next(iter(params.values())).shape[0]
    m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    if kind == "rotate":
        a = torch.deg2rad(params["angle"])
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    elif kind == "shear":  # x-shear after y-shear by the same angle, as imgaug does for a shear tuple
        t = torch.tan(torch.deg2rad(params["shear"]))
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0] = 1 - t * t, -t, t
    elif kind == "scale":
        m[:, 0, 0], m[:, 1, 1] = params["scale"][:, 0], params["scale"][:, 1]
    elif kind == "fliplr":
        m[:, 0, 0] = torch.where(params["flip"], -1.0, 1.0)
    elif kind == "crop":
        # crop (top, right, bottom, left) whole pixels, resize back with pixel centres aligned
        # (cv2.resize): x_out = (x_in - (left - right) / 2) * W / (W - left - right)
        top, right, bottom, left = params["crop_px"].to(torch.float64).unbind(1)
        sx, sy = w / (w - left - right), h / (h - top - bottom)
        m[:, 0, 0], m[:, 0, 2] = sx, -sx * (left - right) / 2
        m[:, 1, 1], m[:, 1, 2] = sy, -sy * (top - bottom) / 2
    else:
        raise ValueError(f"{kind} is not a geometric op")
    return m


class TorchAugmenter(Augmenter):
    """Batched augmentation on the images' device; see the module docstring."""

    backend = "torch"

    def sample(self, batch: int, seed: int, height: int = 48, width: int = 48) -> list[dict[str, torch.Tensor]]:
        """Per-op, per-image parameters (CPU tensors) for a batch: ``apply`` (bool) plus the op's values.

        Keys: rotate ``angle`` (deg), shear ``shear`` (deg), scale ``scale`` (B, 2: x, y),
        crop ``crop`` (B, 4 fractions: top, right, bottom, left) and ``crop_px``,
        gamma ``gamma``, fliplr ``flip``.
        """
        g = torch.Generator().manual_seed(int(seed) % 2**63)

        def uniform(op: OpPreset, *shape: int) -> torch.Tensor:
            return op.low + (op.high - op.low) * torch.rand(batch, *shape, generator=g, dtype=torch.float64)

        out = []
        for op in self.ops:
            d = {"apply": torch.rand(batch, generator=g, dtype=torch.float64) < self.p}
            if op.kind == "rotate":
                d["angle"] = uniform(op)
            elif op.kind == "shear":
                d["shear"] = uniform(op)
            elif op.kind == "scale":
                d["scale"] = uniform(op, 2)
            elif op.kind == "crop":
                d["crop"] = uniform(op, 4)
                size = torch.tensor([height, width, height, width], dtype=torch.float64)
                d["crop_px"] = torch.round(d["crop"] * size).to(torch.int64)
            elif op.kind == "gamma":
                d["gamma"] = uniform(op)
            elif op.kind == "fliplr":
                d["flip"] = torch.rand(batch, generator=g, dtype=torch.float64) < op.low
            out.append(d)
        return out

    def _augment(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        b, _, h, w = images.shape
        x = images.float()
        run: list[tuple[str, torch.Tensor]] = []  # (kind, forward matrices) of a run of consecutive geometric ops
        for op, params in zip(self.ops, self.sample(b, seed, h, w)):
            if op.kind in _GEOMETRIC:
                m = _forward_matrices(op.kind, params, h, w)
                m[~params["apply"]] = torch.eye(3, dtype=torch.float64)
                run.append((op.kind, m))
            else:
                x = _resample(x, run)
                run = []
                x = _gamma(x, params)
        return _resample(x, run).to(torch.uint8)


_EYE = torch.eye(3, dtype=torch.float64)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU-drawn parameter tensor on ``device``: on CUDA through pinned memory with ``non_blocking`` (a plain
    ``.to()`` from pageable memory waits for the GPU's queue to drain); the pinned block is not reused
    before the copy is done (torch's caching host allocator records it on the stream)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _normalised_grid(forward: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 2) grid_sample coordinates (align_corners=False) of every output pixel's source.

    Same values as ``F.affine_grid`` (to 5e-7), built as one matmul against a cached base
    grid: on CPU ``affine_grid`` took twice as long as the ``grid_sample`` it feeds.
    """
    b, c, h, w = x.shape
    inv = torch.linalg.inv(forward)[:, :2, :]  # output pixel → input pixel, centred coordinates
    # normalised coordinates, align_corners=False: pixel j ↔ (j - (W-1)/2) / (W/2)
    half = torch.tensor([w / 2, h / 2], dtype=torch.float64)
    theta = torch.cat([inv[:, :, :2] * half[None, None, :] / half[None, :, None], (inv[:, :, 2] / half)[:, :, None]], 2)
    theta = _to_device(theta.to(torch.float32), x.device)
    return torch.matmul(_base_grid(h, w, x.device), theta.transpose(1, 2)).reshape(b, h, w, 2)


@functools.lru_cache(maxsize=8)
def _base_grid(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(1, H*W, 3) rows (x, y, 1) of every pixel centre in normalised coordinates (align_corners=False)."""
    xs = (torch.arange(w, dtype=torch.float32) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=torch.float32) * 2 + 1) / h - 1
    one = torch.ones((), dtype=torch.float32)
    return torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None], one), -1).reshape(1, h * w, 3).to(device)


def _half(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return _half_cached(h, w, x.device)


@functools.lru_cache(maxsize=8)
def _half_cached(h: int, w: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([w / 2, h / 2], dtype=torch.float32).to(device)


def _pixel_grid(forward: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 2) source pixel coordinates (x, y; pixel centres at integers) of every output pixel."""
    half = _half(x)
    return _normalised_grid(forward, x) * half + (half - 0.5)


def _coverage(grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 1, H, W): how much of a bilinear sample at ``grid`` falls inside an h x w frame (1 inside, 0 beyond)."""
    gx, gy = grid.unbind(-1)
    cx = torch.minimum(gx + 1, w - gx).clamp_(0, 1)
    cy = torch.minimum(gy + 1, h - gy).clamp_(0, 1)
    return (cx * cy)[:, None]


def _resample(x: torch.Tensor, run: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """One grid_sample for a run of geometric ops; rounds to whole grey levels like imgaug's uint8 output.

    Composing the run into one map skips the intermediate images, but their frames still
    matter (content rotated out of the frame and zoomed back in must stay black, as in
    imgaug): the result is multiplied by each intermediate frame's coverage.

    A run of crops only (an axis-aligned zoom-in) is sampled like cv2's INTER_AREA
    upscaling, which imgaug's Crop resizes with: each output pixel is the mean of the
    input it covers, i.e. bilinear at a coordinate snapped towards the pixel centres.
    """
    forward = _EYE
    for _kind, m in run:
        forward = m @ forward
    if not run:
        return x
    moved = (forward != _EYE).flatten(1).any(1)  # with p < 1 many images keep the identity: skip them
    if not bool(moved.all()):
        if not bool(moved.any()):
            return x
        idx = moved.nonzero().squeeze(1)
        on_device = _to_device(idx, x.device)
        out = x.clone()
        out[on_device] = _resample(x[on_device], [(kind, m[idx]) for kind, m in run])
        return out
    b, _, h, w = x.shape
    grid = _normalised_grid(forward, x)  # the common path samples these directly
    if all(kind == "crop" for kind, _ in run):
        half = _half(x)
        pix = grid * half + (half - 0.5)
        s = _to_device(torch.linalg.inv(forward)[:, [0, 1], [0, 1]].abs().to(torch.float32), x.device)[:, None, None, :]
        a = pix + 0.5 - s / 2  # left/top edge of the box (s < 1 input pixels) an output pixel covers
        k = a.floor()
        pix = k + ((a + s - k - 1) / s).clamp_(0, 1)  # weight of the next pixel = its overlap / s
        grid = (pix - (half - 0.5)) / half
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    after = _EYE  # forward map from an intermediate image to the output
    for _kind, m in reversed(run[1:]):
        after = after @ m
        if not _frame_inside(after, h, w):
            out *= _coverage(_pixel_grid(after, x), h, w)
    return out.round_().clamp_(0, 255)


def _frame_inside(forward: torch.Tensor, h: int, w: int) -> bool:
    """Whether every output pixel centre maps inside the source frame, for every image (then coverage is 1)."""
    cx, cy = (w - 1) / 2, (h - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [-cx, cy, 1], [cx, cy, 1]], dtype=torch.float64)
    src = torch.linalg.inv(forward)[:, :2, :] @ corners.T  # (B, 2, 4), centred
    return bool((src[:, 0].abs() <= cx + 1e-6).all() and (src[:, 1].abs() <= cy + 1e-6).all())


def _gamma(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """imgaug's uint8 gamma: a per-image table floor(255 * (v/255) ** gamma), built in float32 as imgaug does."""
    levels = torch.linspace(0, 1, 256, dtype=torch.float32)
    table = (levels[None, :] ** params["gamma"].to(torch.float32)[:, None] * 255).clamp_(0, 255).floor_()
    table[~params["apply"]] = torch.arange(256, dtype=torch.float32)
    idx = x.reshape(x.shape[0], -1).long()
    return _to_device(table, x.device).gather(1, idx).reshape(x.shape)


# --------------------------------------------------------------------------- imgaug


def _imgaug_op(op: OpPreset) -> Any:
    """The imgaug augmenter for one preset: the paper's expression when the range is the paper's."""
    from bicogan_dist.imgaug_compat import iaa

    rng: Any = op.low if op.fixed else (op.low, op.high)
    if op.kind == "rotate":
        return iaa.Affine(rotate=rng)
    if op.kind == "shear":
        # a tuple shears x and y by the same angle; a single number would shear x only,
        # so a fixed value is given for both axes to keep the meaning
        return iaa.Affine(shear={"x": op.low, "y": op.low} if op.fixed else rng)
    if op.kind == "scale":
        return iaa.Affine(scale={"x": rng, "y": rng})
    if op.kind == "crop":
        return iaa.Crop(percent=rng)  # keep_size=True: resized back to the input size
    if op.kind == "gamma":
        return iaa.GammaContrast(rng)
    if op.kind == "fliplr":
        return iaa.Fliplr(op.low)
    raise ValueError(f"unknown op kind {op.kind}")


class ImgaugAugmenter(Augmenter):
    """The paper's library, image by image on the CPU: ``Sequential([Sometimes(p, op), ...])``."""

    backend = "imgaug"

    def __init__(self, ops: list[OpPreset], p: float):
        super().__init__(ops, p)
        from bicogan_dist.imgaug_compat import iaa

        self.imgaug_ops = [_imgaug_op(op) for op in self.ops]
        self._seq = iaa.Sequential([iaa.Sometimes(self.p, a) for a in self.imgaug_ops])

    def _augment(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        arr = np.ascontiguousarray(images.detach().cpu().permute(0, 2, 3, 1).numpy())  # (B, H, W, C)
        self._seq.seed_(seed)
        out = np.asarray(self._seq(images=arr), dtype=np.uint8).reshape(arr.shape)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)

    def draw_parameters(self, n: int, seed: int) -> list[dict[str, np.ndarray]]:
        """n draws of each op's parameters from imgaug's own parameter objects (to check ranges)."""
        import imgaug

        out = []
        for op, aug in zip(self.ops, self.imgaug_ops):
            rs = imgaug.random.RNG(seed)
            if op.kind == "rotate":
                out.append({"angle": aug.rotate.draw_samples((n,), random_state=rs)})
            elif op.kind == "shear":
                param = aug.shear[0] if isinstance(aug.shear, tuple) else aug.shear
                out.append({"shear": param.draw_samples((n,), random_state=rs)})
            elif op.kind == "scale":
                out.append({"scale": np.stack([s.draw_samples((n,), random_state=rs) for s in aug.scale], 1)})
            elif op.kind == "crop":  # imgaug stores crops as negative padding
                out.append({"crop": -aug.all_sides.draw_samples((n, 4), random_state=rs)})
            elif op.kind == "gamma":
                out.append({"gamma": aug.params1d[0].draw_samples((n,), random_state=rs)})
            elif op.kind == "fliplr":
                out.append({"flip": aug.p.draw_samples((n,), random_state=rs)})
        return out
