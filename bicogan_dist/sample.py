"""Sampling and emotion editing with an export (``tools/sample_images.py``, ``bicogan-sample``; flags parsed in
``bicogan_dist/cli/sample.py``, which calls :func:`run`).

One mode per call; every mode writes to ``--out``::

    sample_images.py EXPORT --out grid.png [--seeds 0-7]
        grid: one row per emotion (labelled), one column per seed; unconditional kinds: one row.
    sample_images.py EXPORT --per-class N --out DIR [--format png|shards] [--seed S]
        N images per emotion: DIR/<emotion>/<index>.png, or webdataset shards of split
        "Generated" + manifest.json, which the loader and the evaluator read like real shards.
    sample_images.py EXPORT --interpolate --out strip.png [--seeds A,B] [--steps 8] [--method slerp|linear]
        per emotion, a strip from seed A to seed B; then (conditional kinds) seed A across all
        emotions in order. G takes a class *index*, so there is no path "between" two emotions.
    sample_images.py EXPORT --transfer INPUT --out transfer.png [--limit 8]
        per real face: the face, G(E(x)) (its reconstruction with E's predicted emotion) and
        G(E_z(x), c') for every emotion c'. INPUT: an image file, a folder of images (searched
        recursively, sorted by path), or a shard folder and split, ``data_shards/fer2013:PrivateTest``.
        Needs a bidirectional export (bigan: face and reconstruction only; bicogan: all).

Common options: ``--device cpu|cuda`` (default cuda when available), ``--batch-size``,
``--emotions happy,sad`` (which rows / target emotions, default all).

Determinism: the noise of seed s is ``torch.randn(z_dim, generator=torch.Generator().manual_seed(s))``
drawn on the CPU and then moved to the device, so a seed gives the same z on every machine
and whatever else is in the batch. ``--seeds``: ``0-7``, ``1,5,9``, ``0-3,10`` or a count
``8`` (= seeds 0..7). ``--per-class``: image i of class k uses seed ``S + k*N + i``, so every
image has its own noise and a subset of emotions reproduces the same files.
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from bicogan_dist.atomic_dir import atomic_output
from bicogan_dist.export import ExportedModel, load_export
from bicogan_dist.imaging import labelled_grid, save_png, to_model_range, to_uint8
from bicogan_dist.models.networks import truncate

GENERATED_SPLIT = "Generated"
GENERATED_INFO = "generated.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class SampleError(ValueError):
    """A request the export or the input cannot satisfy; the message says what to change."""


# --------------------------------------------------------------------------------- noise, G, E


def parse_seeds(text: str) -> list[int]:
    """``"0-7"`` / ``"1,5,9"`` / ``"0-3,10"`` → list; a bare count ``"8"`` → seeds 0..7."""
    text = text.strip()
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise SampleError("--seeds: a count must be at least 1")
        return list(range(count))
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise SampleError(f"--seeds: range {part!r} runs backwards")
                seeds.extend(range(a, b + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise SampleError(f"--seeds: {part!r} is not a seed, a range A-B or a count") from None
    if not seeds:
        raise SampleError(f"--seeds: {text!r} names no seeds")
    return seeds


def seed_noise(seeds: Sequence[int], z_dim: int, truncation: float = 1.0) -> torch.Tensor:
    """(len(seeds), z_dim) on the CPU; row i depends only on seeds[i] (and ``truncation``, the psi of
    ``models.networks.truncate``)."""
    return truncate(torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s)))
                                 for s in seeds]), truncation)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between vectors a and b at fractions t (K,) → (K, D); linear if nearly parallel."""
    a64, b64, t64 = a.double(), b.double(), t.double()[:, None]
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if omega.abs() < 1e-6:
        return ((1 - t64) * a64 + t64 * b64).to(a.dtype)
    so = torch.sin(omega)
    return ((torch.sin((1 - t64) * omega) / so) * a64 + (torch.sin(t64 * omega) / so) * b64).to(a.dtype)


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(a.dtype)[:, None]
    return (1 - t) * a + t * b


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.inference_mode()
def generate(model: ExportedModel, z: torch.Tensor, c: torch.Tensor | None, batch_size: int = 256) -> torch.Tensor:
    """G(z, c) in batches → uint8 (N, 1, 48, 48) on the CPU; c is ignored by unconditional kinds."""
    device = model.device
    out = []
    for sl in _batches(z.shape[0], batch_size):
        cc = c[sl].to(device) if (c is not None and model.conditional) else None
        out.append(to_uint8(model.G(z[sl].to(device), cc)).cpu())
    return torch.cat(out) if out else torch.empty(0, 1, 48, 48, dtype=torch.uint8)


@torch.inference_mode()
def encode(model: ExportedModel, images: torch.Tensor,
           batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """E(x) for uint8 faces (N, 1, 48, 48) in batches → (z_hat, class logits or None) on the CPU."""
    if model.E is None:
        raise SampleError(f"this {model.model.kind} export has no encoder; reconstruction and emotion transfer "
                          f"need a bidirectional model (bigan or bicogan)")
    device = model.device
    zs, logits = [], []
    for sl in _batches(images.shape[0], batch_size):
        z_hat, lg = model.E(to_model_range(images[sl].to(device)))
        zs.append(z_hat.float().cpu())
        if lg is not None:
            logits.append(lg.float().cpu())
    return torch.cat(zs), (torch.cat(logits) if logits else None)


def select_classes(model: ExportedModel, names: Sequence[str] | None) -> list[int]:
    """Class indices for ``--emotions`` (all, in the export's order, when None)."""
    if not names:
        return list(range(model.num_classes))
    wanted = []
    for name in names:
        key = name.strip().lower()
        if key not in model.class_names:
            raise SampleError(f"--emotions: {name!r} is not a class of this export; it has {model.class_names}")
        wanted.append(model.class_names.index(key))
    return wanted


# --------------------------------------------------------------------------------------- panels


@dataclass
class Panel:
    """A labelled image grid: ``images`` holds rows*cols uint8 faces in row-major order."""

    images: torch.Tensor
    rows: int
    cols: int
    row_labels: list[str] | None = None
    col_labels: list[str] | None = None

    def to_image(self, scale: int = 2) -> Image.Image:
        return labelled_grid(self.images, self.rows, self.cols, self.row_labels, self.col_labels, scale=scale)


def _blank(n: int) -> torch.Tensor:
    return torch.full((n, 1, 48, 48), 255, dtype=torch.uint8)


def grid_panel(model: ExportedModel, seeds: Sequence[int], classes: Sequence[int] | None = None,
               batch_size: int = 256, truncation: float = 1.0) -> Panel:
    """One row per emotion (one row for unconditional kinds), one column per seed; same z down a column."""
    z = seed_noise(seeds, model.z_dim, truncation)
    cols = len(seeds)
    col_labels = [f"seed {s}" for s in seeds]
    if not model.conditional:
        return Panel(generate(model, z, None, batch_size), 1, cols, None, col_labels)
    classes = list(classes) if classes is not None else list(range(model.num_classes))
    c = torch.tensor(classes, dtype=torch.long).repeat_interleave(cols)
    images = generate(model, z.repeat(len(classes), 1), c, batch_size)
    return Panel(images, len(classes), cols, [model.class_names[k] for k in classes], col_labels)


def interpolation_panel(model: ExportedModel, seed_a: int, seed_b: int, steps: int = 8, method: str = "slerp",
                        classes: Sequence[int] | None = None, batch_size: int = 256,
                        truncation: float = 1.0) -> Panel:
    """Per emotion, ``steps`` images from z(seed_a) to z(seed_b); then seed_a across the emotions in order."""
    if steps < 2:
        raise SampleError("--steps must be at least 2")
    za, zb = seed_noise([seed_a, seed_b], model.z_dim, truncation)
    t = torch.linspace(0, 1, steps)
    path = slerp(za, zb, t) if method == "slerp" else lerp(za, zb, t)
    if not model.conditional:
        return Panel(generate(model, path, None, batch_size), 1, steps, [f"{seed_a}>{seed_b}"],
                     [f"t={x:.2f}" for x in t.tolist()])
    classes = list(classes) if classes is not None else list(range(model.num_classes))
    n = len(classes)
    cols = max(steps, n)
    c = torch.tensor(classes, dtype=torch.long).repeat_interleave(steps)
    strips = generate(model, path.repeat(n, 1), c, batch_size).view(n, steps, 1, 48, 48)
    across = generate(model, za.expand(n, -1), torch.tensor(classes, dtype=torch.long), batch_size)
    rows = [torch.cat([strips[r], _blank(cols - steps)]) for r in range(n)]
    rows.append(torch.cat([across, _blank(cols - n)]))
    row_labels = [model.class_names[k] for k in classes] + [f"seed {seed_a}"]
    col_labels = [f"t={x:.2f}" for x in t.tolist()] + [""] * (cols - steps)
    return Panel(torch.cat(rows), n + 1, cols, row_labels, col_labels)


@dataclass
class Faces:
    """Real faces to encode: uint8 (N, 1, 48, 48), where each came from, and the true emotion if known."""

    images: torch.Tensor
    names: list[str]
    labels: list[str] | None = None


def read_faces(spec: str, limit: int | None = None) -> Faces:
    """An image file, a folder of images, or ``SHARD_FOLDER:SPLIT`` → 48x48 grey faces (first ``limit``)."""
    from bicogan_dist.data.readers import load_face_image

    path = Path(spec)
    if not path.exists() and ":" in spec:
        folder, split = spec.rsplit(":", 1)
        return _read_shard_faces(Path(folder), split, limit)
    if not path.exists():
        raise SampleError(f"--transfer: {spec} does not exist (give an image, a folder of images, or "
                          f"SHARD_FOLDER:SPLIT such as data_shards/fer2013:PrivateTest)")
    if path.is_dir() and (path / "manifest.json").is_file():
        from bicogan_dist.data.manifest import ShardManifest

        splits = sorted(ShardManifest.load(path).splits)
        example = "PrivateTest" if "PrivateTest" in splits or not splits else splits[0]
        raise SampleError(f"--transfer: {path} is a shard folder; name the split, e.g. {spec}:{example} "
                          f"(it has {splits})")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith("."))
        if not files:
            raise SampleError(f"--transfer: {path} holds no .png/.jpg/.jpeg images")
    else:
        files = [path]
    if limit is not None:
        files = files[:limit]
    arrays = [load_face_image(f, str(f))[0] for f in files]
    images = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
    return Faces(images, [str(f) for f in files])


def _read_shard_faces(folder: Path, split: str, limit: int | None) -> Faces:
    from bicogan_dist.data.loader import load_split
    from bicogan_dist.data.manifest import ShardManifest

    manifest = ShardManifest.load(folder)
    manifest.split(split)  # a clear error listing the splits
    images, labels = load_split(folder, split, device="cpu", limit=limit)
    images, labels = images.cpu(), labels.cpu()
    names = [f"{folder}:{split}#{i}" for i in range(images.shape[0])]
    return Faces(images, names, [manifest.label_names[int(y)] for y in labels])


def require_encoder(model: ExportedModel) -> None:
    """Transfer and reconstruction start from E(x): refuse exports without an encoder before reading inputs."""
    if not model.bidirectional or model.E is None:
        raise SampleError(f"--transfer needs a bidirectional export (bigan or bicogan) with an encoder; "
                          f"this one is {model.model.kind!r}, which has none")


def transfer_panel(model: ExportedModel, faces: Faces, classes: Sequence[int] | None = None,
                   batch_size: int = 256, truncation: float = 1.0) -> Panel:
    """Rows: faces; columns: the face, G(E(x)), then G(E_z(x), c') per target emotion c'.

    ``truncation`` psi < 1 decodes psi * E_z(x): the encoded face pulled toward the mean, which shows the
    target emotion more clearly (README, section 5, for what it costs in likeness).
    """
    require_encoder(model)
    if faces.images.shape[0] == 0:
        raise SampleError("--transfer: no faces to encode")
    z_hat, logits = encode(model, faces.images, batch_size)
    z_hat = truncate(z_hat, truncation)
    k = z_hat.shape[0]
    predicted = logits.argmax(1) if logits is not None else None
    recon = generate(model, z_hat, predicted, batch_size)
    columns = [faces.images.cpu(), recon]
    col_labels = ["input", "G(E(x))"]
    if model.conditional:
        classes = list(classes) if classes is not None else list(range(model.num_classes))
        targets = torch.tensor(classes, dtype=torch.long).repeat(k)
        moved = generate(model, z_hat.repeat_interleave(len(classes), 0), targets, batch_size)
        columns.append(moved.view(k, len(classes), 1, 48, 48))
        col_labels += [model.class_names[c] for c in classes]
    parts = [columns[0].unsqueeze(1), columns[1].unsqueeze(1)] + columns[2:]
    images = torch.cat(parts, dim=1).flatten(0, 1)
    row_labels = []
    for i in range(k):
        pred = f"E:{model.class_names[int(predicted[i])]}" if predicted is not None else f"#{i}"
        row_labels.append(f"{faces.labels[i]}/{pred}" if faces.labels else pred)
    return Panel(images, k, len(col_labels), row_labels, col_labels)


def save_panel(panel: Panel, out: str | Path) -> Path:
    """Write the panel PNG via a temporary file and a rename (never a half-written PNG)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}.png")
    try:
        save_png(panel.to_image(), tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------------- N per class


def _per_class_batches(model: ExportedModel, n: int, classes: Sequence[int], seed: int,
                       batch_size: int, truncation: float = 1.0) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(class index, first image index, uint8 batch); image i of class k uses seed ``seed + k*n + i``."""
    for k in classes:
        for sl in _batches(n, batch_size):
            seeds = [seed + k * n + i for i in range(sl.start, sl.stop)]
            c = torch.full((len(seeds),), k, dtype=torch.long)
            yield k, sl.start, generate(model, seed_noise(seeds, model.z_dim, truncation), c, batch_size)


def write_per_class(model: ExportedModel, n: int, out: str | Path, fmt: str = "png", seed: int = 0,
                    classes: Sequence[int] | None = None, batch_size: int = 256, force: bool = False,
                    shard_size: int = 4000, truncation: float = 1.0) -> Path:
    """N images per emotion as ``out/<emotion>/<index>.png`` or as shards of split "Generated" + manifest."""
    if not model.conditional:
        raise SampleError(f"--per-class needs a conditional export (cgan or bicogan); this one is "
                          f"{model.model.kind!r}, whose G takes no emotion")
    if n < 1:
        raise SampleError("--per-class N needs N >= 1")
    if fmt not in ("png", "shards"):
        raise SampleError(f"--format must be png or shards, not {fmt!r}")
    out = Path(out)
    classes = list(classes) if classes is not None else list(range(model.num_classes))
    width = max(5, len(str(n - 1)))
    info = {
        "format": "bicogan_dist.generated", "layout": fmt, "export": str(model.path.resolve()) if model.path else None,
        "source": model.metadata.get("source"), "class_names": model.class_names, "per_class": n, "seed": seed,
        "seed_rule": "image i of class k (index in class_names) uses noise seed seed + k*per_class + i",
        "truncation": truncation,
        "counts": {model.class_names[k]: n for k in classes},
    }
    # A non-empty folder is the tool's only when it holds generated.json; then every entry in it is.
    with atomic_output(out, force=force, what="generated images", owned=lambda p: (p.parent / GENERATED_INFO).is_file(),
                       error=SampleError) as tmp:
        batches = _per_class_batches(model, n, classes, seed, batch_size, truncation)
        if fmt == "png":
            for k, start, images in batches:
                folder = tmp / model.class_names[k]
                folder.mkdir(exist_ok=True)
                for j, img in enumerate(images):
                    Image.fromarray(img[0].numpy()).save(folder / f"{start + j:0{width}d}.png", format="PNG")
        else:
            info["split"] = GENERATED_SPLIT
            _write_generated_shards(model, batches, n, seed, classes, tmp, shard_size)
        (tmp / GENERATED_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out


def _write_generated_shards(model: ExportedModel, batches: Iterator[tuple[int, int, torch.Tensor]], n: int, seed: int,
                            classes: Sequence[int], folder: Path, shard_size: int) -> None:
    from bicogan_dist.data.manifest import ShardManifest, SplitInfo
    from bicogan_dist.data.records import FaceRecord
    from bicogan_dist.data.shards import write_split_shards
    from bicogan_dist.labels import EmotionLabels

    try:
        labels = EmotionLabels.from_names(model.class_names)
    except ValueError as exc:
        raise SampleError(f"--format shards: the export's class names are not FER2013 emotions ({exc})") from exc

    def records() -> Iterator[FaceRecord]:
        for k, start, images in batches:
            for j, img in enumerate(images):
                i = start + j
                yield FaceRecord(pixels=img[0].numpy(), fer_code=labels.fer_codes[k], split=GENERATED_SPLIT,
                                 source=f"generated:class={model.class_names[k]}:seed={seed + k * n + i}")

    entries, class_counts = write_split_shards(records(), GENERATED_SPLIT, labels, folder, shard_size)
    step = (model.metadata.get("source") or {}).get("step")
    ShardManifest(
        label_names=list(labels.names),
        splits={GENERATED_SPLIT: SplitInfo(count=sum(class_counts), class_counts=class_counts, shards=entries)},
        source=f"generated by bicogan_dist.sample from {model.path} (step {step}), {n} per class, seed {seed}",
        image_size=48,
    ).save(folder)


# ------------------------------------------------------------------------------------- one call


@dataclass
class SampleRequest:
    """One call of the sampling tool: the export, ``out``, the mode and its options (the CLI flags one to one)."""

    export: str
    out: str
    per_class: int | None = None
    interpolate: bool = False
    transfer: str | None = None
    seeds: str | None = None
    emotions: str | None = None
    format: str = "png"
    seed: int = 0
    shard_size: int = 4000
    steps: int = 8
    method: str = "slerp"
    limit: int = 8
    force: bool = False
    device: str | None = None
    batch_size: int = 256
    truncation: float = 1.0


def run(args: SampleRequest) -> Path:
    """Carry out one request (grid, --per-class, --interpolate or --transfer); returns what was written."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SampleError(f"--device {device}: CUDA is not available here; use --device cpu")
    model = load_export(args.export, device=device)
    emotions = [e for e in args.emotions.split(",") if e.strip()] if args.emotions else None
    if emotions and not model.conditional:
        raise SampleError(f"--emotions: this {model.model.kind!r} export is unconditional (no emotion input)")
    classes = select_classes(model, emotions)
    if args.per_class is not None:
        return write_per_class(model, args.per_class, args.out, args.format, args.seed, classes, args.batch_size,
                               args.force, args.shard_size, args.truncation)
    if args.interpolate:
        seeds = parse_seeds(args.seeds) if args.seeds else [0, 1]
        if len(seeds) != 2:
            raise SampleError(f"--interpolate needs exactly two seeds A,B; got {seeds}")
        panel = interpolation_panel(model, seeds[0], seeds[1], args.steps, args.method, classes, args.batch_size,
                                    args.truncation)
    elif args.transfer is not None:
        require_encoder(model)  # before reading any input
        panel = transfer_panel(model, read_faces(args.transfer, args.limit), classes, args.batch_size,
                               args.truncation)
    else:
        panel = grid_panel(model, parse_seeds(args.seeds or "8"), classes, args.batch_size, args.truncation)
    return save_panel(panel, args.out)
