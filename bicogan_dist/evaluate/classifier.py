"""The project's FER classifier: the measuring stick for generated faces.

Why it exists: FID needs a feature network and none can be downloaded here, so the
project trains its own emotion classifier on FER2013 Training and uses (a) its
predictions for the conditional accuracy of G(z, c) and emotion transfer, and (b) its
penultimate layer as the feature space of FID/KID. Numbers in that space are
comparable between runs of this project only, never with published (Inception) FIDs.

A compact VGG-style CNN (conv-BN-ReLU pairs, max-pool, four stages 48→3), a 256-d
embedding (``features``) and a linear head. It is trained in memory with batched
torch augmentation (random flip, small affine, erasing), AdamW + OneCycle and bf16
autocast (fast on CPUs with AMX and on GPUs), and exported like the generator:
``classifier.safetensors`` + ``classifier.json``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from bicogan_dist.config import ConfigError
from bicogan_dist.data.manifest import sha256_file
from bicogan_dist.imaging import to_model_range, to_uint8

FORMAT = "bicogan_dist.fer_classifier"
FORMAT_VERSION = 1
WEIGHTS_NAME = "classifier.safetensors"
META_NAME = "classifier.json"
FEATURE_SPACE_TEMPLATE = ("FER classifier penultimate layer, {dim}-d, trained by this project; "
                          "not Inception — not comparable to published FIDs")


@dataclass
class ClassifierConfig:
    """Architecture: one stage per width (``convs[i]`` 3x3 convs, then a 2x2 max-pool).

    One conv at 48x48 and two at each coarser stage: the full-resolution stage costs the
    most time per parameter on a CPU.
    """

    widths: tuple[int, ...] = (32, 64, 128, 256)
    convs: tuple[int, ...] = (1, 2, 2, 2)
    feature_dim: int = 256
    dropout: float = 0.25
    num_classes: int = 6
    image_size: int = 48

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        self.convs = tuple(int(c) for c in self.convs)
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(f"classifier.widths must be positive, got {self.widths}")
        if len(self.convs) != len(self.widths) or any(c < 1 for c in self.convs):
            raise ConfigError(f"classifier.convs needs one count >= 1 per stage ({len(self.widths)}), got {self.convs}")
        if self.image_size % (2 ** len(self.widths)):
            raise ConfigError(f"classifier.image_size {self.image_size} is not divisible by 2^{len(self.widths)}")
        if self.feature_dim < 1 or self.num_classes < 2:
            raise ConfigError("classifier: feature_dim must be >= 1 and num_classes >= 2")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"classifier.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ClassifierTrainConfig:
    """Optimisation. The defaults (with ClassifierConfig's) reached 69.3% six-class accuracy on
    PrivateTest of the real FER2013 (68.7% PublicTest, flip TTA; 68.6% / 67.9% without) on a
    2-core CPU: 40-65 s per epoch when the machine was otherwise idle. 12 epochs gave 66.5%:
    the model still underfits (train accuracy 74%), so more epochs and width should help where
    compute allows (published single networks reach 73-74% on seven classes)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3  # OneCycle peak
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    # Augmentation (per image, batched in torch): flip, small affine, random erasing.
    flip_p: float = 0.5
    rotate_deg: float = 12.0
    scale: float = 0.12  # zoom in [1 - scale, 1 + scale]
    translate: float = 0.1  # fraction of the image size
    erase_p: float = 0.3
    precision: str = "bf16"  # "bf16" autocast or "fp32"
    seed: int = 0
    eval_split: str = "PublicTest"  # watched each epoch (for the log only; the final weights are kept)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError("classifier training: epochs must be >= 1 and batch_size >= 2")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"classifier precision must be bf16 or fp32, got {self.precision!r}")


class FERClassifier(nn.Module):
    """x in [-1, 1], (B, 1, 48, 48) → logits; ``features`` is the penultimate embedding used for FID/KID."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = 1
        for width, n_convs in zip(cfg.widths, cfg.convs):
            for _ in range(n_convs):
                layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                c_in = width
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.widths)
        # A dense layer over the final 3x3 map keeps where on the face a feature fired (brows vs mouth).
        self.embed = nn.Sequential(nn.Flatten(), nn.Dropout(cfg.dropout),
                                   nn.Linear(c_in * side * side, cfg.feature_dim, bias=False),
                                   nn.BatchNorm1d(cfg.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.feature_dim, cfg.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _autocast(device: torch.device, precision: str):
    enabled = precision == "bf16" and device.type in ("cpu", "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def as_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 grey levels or float pixels in [-1, 1] → float [-1, 1] rounded to grey levels.

    Generated images are rounded to 256 levels exactly as saving them as PNG would, so real
    and generated faces reach the classifier through the same quantisation.
    """
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    return to_model_range(images)


@dataclass
class LoadedClassifier:
    """A trained classifier ready for measuring: eval mode, frozen, with batched helpers."""

    model: FERClassifier
    class_names: list[str]
    meta: dict[str, Any]
    device: torch.device
    precision: str = "bf16"
    path: Path | None = None
    weights_sha256: str | None = None  # identifies the feature space: reports from different weights never mix

    @property
    def feature_dim(self) -> int:
        return self.model.cfg.feature_dim

    @property
    def feature_space(self) -> str:
        return FEATURE_SPACE_TEMPLATE.format(dim=self.feature_dim)

    @torch.no_grad()
    def _batched(self, images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
                 batch_size: int) -> torch.Tensor:
        outs = []
        for i in range(0, images.shape[0], batch_size):
            x = as_model_input(images[i:i + batch_size].to(self.device))
            with _autocast(self.device, self.precision):
                outs.append(fn(x.contiguous(memory_format=torch.channels_last)).float())
        if not outs:
            return torch.empty(0, device=self.device)
        return torch.cat(outs)

    def logits(self, images: torch.Tensor, batch_size: int = 512, tta_flip: bool = True) -> torch.Tensor:
        """Class logits; with ``tta_flip`` the mean over the image and its mirror (faces are near-symmetric)."""
        def fn(x: torch.Tensor) -> torch.Tensor:
            out = self.model(x)
            return (out + self.model(x.flip(-1))) / 2 if tta_flip else out
        return self._batched(images, fn, batch_size)

    def predict(self, images: torch.Tensor, batch_size: int = 512, tta_flip: bool = True) -> torch.Tensor:
        return self.logits(images, batch_size, tta_flip).argmax(1)

    def features(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Penultimate embeddings (float32, (N, feature_dim)): the FID/KID feature space."""
        return self._batched(images, self.model.features, batch_size)


# ----------------------------------------------------------------------------- augmentation


def augment_batch(x: torch.Tensor, cfg: ClassifierTrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random flip + small affine (one grid_sample for the whole batch) + random erasing, in [-1, 1].

    Why its own ops and not the GAN's augmenter: the paper's GAN augmentations are fixed,
    strong transforms under study (rotate -50..30 degrees, always-flip, gamma 2); a
    classifier wants mild, label-preserving jitter that is cheap on a whole batch.
    """
    b, device = x.shape[0], x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=gen.device).to(device)

    flip = torch.where(rand(b) < cfg.flip_p, -1.0, 1.0)
    angle = (rand(b) * 2 - 1) * math.radians(cfg.rotate_deg)
    zoom = 1 + (rand(b) * 2 - 1) * cfg.scale
    shift = (rand(b, 2) * 2 - 1) * cfg.translate * 2  # grid units: the image spans [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.erase_p > 0:
        side = x.shape[-1]
        size = (side * (0.15 + 0.25 * rand(b, 2))).long()
        corner = (rand(b, 2) * (side - size)).long()
        ys = torch.arange(side, device=device).view(1, side, 1)
        xs = torch.arange(side, device=device).view(1, 1, side)
        box = ((ys >= corner[:, 0, None, None]) & (ys < (corner[:, 0] + size[:, 0])[:, None, None])
               & (xs >= corner[:, 1, None, None]) & (xs < (corner[:, 1] + size[:, 1])[:, None, None]))
        box &= (rand(b) < cfg.erase_p)[:, None, None]
        out = out.masked_fill(box[:, None], 0.0)
    return out


# ----------------------------------------------------------------------------- training


def accuracy_of(clf: LoadedClassifier, images: torch.Tensor, labels: torch.Tensor,
                tta_flip: bool = True) -> float:
    if images.shape[0] == 0:
        return float("nan")
    return float((clf.predict(images, tta_flip=tta_flip) == labels.to(clf.device)).float().mean())


def fit_classifier(train_x: torch.Tensor, train_y: torch.Tensor, class_names: list[str],
                   arch: ClassifierConfig | None = None, cfg: ClassifierTrainConfig | None = None,
                   device: torch.device | str = "cpu", watch: tuple[torch.Tensor, torch.Tensor] | None = None,
                   progress: bool = True, log: Callable[[str], None] = print) -> tuple[LoadedClassifier, list[dict]]:
    """Train on in-memory uint8 images (N, 1, 48, 48) with class indices; returns the classifier and per-epoch log.

    Deterministic for a given seed on one device (batch order, augmentation and dropout all
    come from seeded generators).
    """
    from tqdm import tqdm

    cfg = cfg or ClassifierTrainConfig()
    device = torch.device(device)
    arch = arch or ClassifierConfig(num_classes=len(class_names))
    if arch.num_classes != len(class_names):
        raise ConfigError(f"classifier has {arch.num_classes} classes but the data has {len(class_names)}")
    n = train_x.shape[0]
    steps = n // cfg.batch_size
    if steps < 1:
        raise ConfigError(f"classifier training: {n} images are fewer than one batch of {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    model = FERClassifier(arch).to(device).to(memory_format=torch.channels_last)
    decay = [p for name, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for name, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps,
                                                pct_start=0.25, div_factor=20, final_div_factor=200)
    train_x, train_y = train_x.to(device), train_y.to(device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    clf = LoadedClassifier(model, list(class_names), {}, device, cfg.precision)
    history: list[dict] = []
    bar = tqdm(total=cfg.epochs * steps, desc="classifier", unit="step", dynamic_ncols=True, disable=not progress)
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for i in range(steps):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = augment_batch(to_model_range(train_x[idx]), cfg, gen).contiguous(memory_format=torch.channels_last)
            y = train_y[idx]
            with _autocast(device, cfg.precision):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            seen += y.shape[0]
            bar.update(1)
            if i % 20 == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}")
        model.eval()
        entry = {"epoch": epoch + 1, "loss": float(loss_sum) / steps, "train_accuracy": float(correct) / seen,
                 "seconds": time.perf_counter() - t0}
        if watch is not None and watch[0].shape[0]:
            entry[f"{cfg.eval_split}_accuracy"] = accuracy_of(clf, *watch)
        history.append(entry)
        msg = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items())
        (bar.write if progress else log)(msg)
    bar.close()
    model.requires_grad_(False)
    return clf, history


# ----------------------------------------------------------------------------- export / load


def save_classifier(clf: LoadedClassifier, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """``classifier.safetensors`` (fp32 weights) + ``classifier.json`` (everything needed to rebuild and trust it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
               for k, v in clf.model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_NAME))
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": asdict(clf.model.cfg),
        "class_names": list(clf.class_names),
        "input": {"shape": [1, clf.model.cfg.image_size, clf.model.cfg.image_size], "pixel_range": [-1.0, 1.0],
                  "from_uint8": "x / 127.5 - 1"},
        "feature_dim": clf.feature_dim,
        "feature_layer": "embed (Linear-BN-ReLU after the conv stages), before the classification head",
        "feature_space": clf.feature_space,
        "precision": clf.precision,
        **meta,
    }
    doc["architecture"]["widths"] = list(doc["architecture"]["widths"])
    doc["architecture"]["convs"] = list(doc["architecture"]["convs"])
    (out / META_NAME).write_text(json.dumps(doc, indent=2) + "\n")
    return out


def load_classifier(classifier_dir: str | Path, device: torch.device | str = "cpu") -> LoadedClassifier:
    """Rebuild from an export folder; reads safetensors only (never unpickles)."""
    folder = Path(classifier_dir)
    meta_path, weights = folder / META_NAME, folder / WEIGHTS_NAME
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder}: not a classifier export (needs {META_NAME} and {WEIGHTS_NAME}); "
                                f"train one with tools/train_classifier.py")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    arch = ClassifierConfig(**{**meta["architecture"], "widths": tuple(meta["architecture"]["widths"]),
                               "convs": tuple(meta["architecture"]["convs"])})
    device = torch.device(device)
    model = FERClassifier(arch)
    model.load_state_dict(load_file(str(weights)))
    model = model.to(device).to(memory_format=torch.channels_last).eval().requires_grad_(False)
    precision = meta.get("precision", "bf16")
    return LoadedClassifier(model, list(meta["class_names"]), meta, device, precision, folder, sha256_file(weights))


def train_classifier(shards: str | Path, out_dir: str | Path, arch: ClassifierConfig | None = None,
                     cfg: ClassifierTrainConfig | None = None, device: torch.device | str = "cpu",
                     progress: bool = True, limit: int | None = None) -> dict[str, Any]:
    """Shards → trained, exported classifier; returns the JSON it wrote (accuracy per held-out split)."""
    from bicogan_dist.data.loader import load_split
    from bicogan_dist.data.manifest import ShardManifest

    cfg = cfg or ClassifierTrainConfig()
    manifest = ShardManifest.load(shards)
    names = list(manifest.label_names)
    arch = arch or ClassifierConfig(num_classes=len(names))
    t_load = time.perf_counter()
    train_x, train_y = load_split(shards, "Training", device="cpu", limit=limit)
    heldout = {s: load_split(shards, s, device="cpu") for s in ("PublicTest", "PrivateTest", "Test")
               if s in manifest.splits}
    watch_split = cfg.eval_split if cfg.eval_split in heldout else next(iter(heldout), None)
    watch = heldout[watch_split] if watch_split else None
    load_s = time.perf_counter() - t_load
    t0, c0 = time.perf_counter(), time.process_time()
    clf, history = fit_classifier(train_x, train_y, names, arch, cfg, device, watch=watch, progress=progress)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    accuracy, per_class = {}, {}
    for split, (x, y) in heldout.items():
        pred = clf.predict(x).cpu()
        accuracy[split] = float((pred == y).float().mean())
        per_class[split] = {name: float((pred[y == k] == k).float().mean()) if (y == k).any() else None
                            for k, name in enumerate(names)}
    accuracy_no_tta = {split: accuracy_of(clf, x, y, tta_flip=False) for split, (x, y) in heldout.items()}
    meta = {
        "accuracy": accuracy,
        "accuracy_without_flip_tta": accuracy_no_tta,
        "per_class_accuracy": per_class,
        "accuracy_note": "predictions average the logits of each image and its mirror (flip TTA)",
        "training": {**asdict(cfg), "train_images": int(train_x.shape[0]), "device": str(device),
                     "seconds": round(train_s, 1), "cpu_seconds": round(cpu_s, 1),
                     "threads": torch.get_num_threads(), "data_load_seconds": round(load_s, 1),
                     "torch": torch.__version__, "shards": str(shards), "source": manifest.source,
                     "history": history},
    }
    save_classifier(clf, out_dir, meta)
    return json.loads((Path(out_dir) / META_NAME).read_text())
