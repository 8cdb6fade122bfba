"""Numbers for an exported BiCoGAN (or gan/cgan/bigan): what ``tools/evaluate.py`` and the trainer hook compute.

Measures (each null where the model kind cannot have it):

- conditional accuracy — the FER classifier's accuracy on G(z, c), N per emotion, with the
  confusion matrix (row: the emotion asked for, column: the emotion the classifier sees);
- class fidelity on the same N per emotion: intra-class diversity (mean pairwise feature
  distance of generated faces of emotion k over that of real Training faces of k) and
  per-emotion FID (generated k vs real Training k), each beside its real reference
  (held-out k vs Training k);
- FID / KID in the classifier's penultimate feature space: generated vs real Training and
  vs the held-out split, beside the real-vs-real reference (Training vs held-out split)
  that gives the numbers a scale. Generated classes for FID/KID follow Training's class
  proportions, so the distance measures faces, not a mismatched class prior;
- the encoder's emotion accuracy on the held-out split (the BiCoGAN paper's headline);
- reconstruction error of x → E → G(E_z(x), argmax E_c(x)) on the held-out split;
- emotion transfer: the classifier's accuracy on G(E_z(x), c') for every target c'.

With a truncation psi < 1 G decodes psi * z everywhere: drawn noise and encoded E_z(x) alike (the
encoder's emotion accuracy does not change).

Determinism: noise comes from a CPU ``torch.Generator`` seeded with ``seed``, real images
are read in manifest order, KID subsets come from a seeded numpy generator.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from bicogan_dist.evaluate.classifier import LoadedClassifier, load_classifier
from bicogan_dist.evaluate.metrics import (accuracy_from_confusion, confusion_matrix, fid, kid,
                                           mean_pairwise_distance)
from bicogan_dist.imaging import to_model_range, to_uint8
from bicogan_dist.models.networks import check_truncation, truncate

REPORT_FORMAT = "bicogan_dist.evaluation"
REPORT_VERSION = 2  # 2: the truncation psi also pulls encoded z (reconstruction, transfer)


def default_split(shards: str | Path) -> str:
    """PrivateTest where the shards have it; image-folder exports only have the merged ``Test``."""
    from bicogan_dist.data.manifest import ShardManifest

    splits = ShardManifest.load(shards).splits
    for name in ("PrivateTest", "Test", "PublicTest"):
        if name in splits:
            return name
    raise ValueError(f"{shards}: no held-out split (PrivateTest, Test or PublicTest) in the manifest; "
                     f"it has {sorted(splits)}")


def _noise(n: int, z_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed)).to(device)


def proportional_counts(class_counts: list[int], total: int) -> list[int]:
    """Split ``total`` into integers proportional to ``class_counts`` (largest remainders; sums to total)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise ValueError("class counts are all zero")
    exact = counts / counts.sum() * total
    out = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - out), kind="stable")[: total - int(out.sum())]:
        out[i] += 1
    return [int(v) for v in out]


def _pixels(images_u8: torch.Tensor) -> torch.Tensor:
    """Images as (N, H*W) grey levels, for distances in pixel space."""
    return images_u8.flatten(1).float()


class _Modes:
    """Put modules in eval mode for a measurement and restore their previous modes afterwards."""

    def __init__(self, *modules: nn.Module | None) -> None:
        self.modules = [m for m in modules if m is not None]

    def __enter__(self) -> None:
        self.saved = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        for m, was in zip(self.modules, self.saved):
            m.train(was)


@dataclass
class RealData:
    """Real Training and held-out images (uint8, CPU) with their classifier features, computed once."""

    split: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_features: torch.Tensor
    test_features: torch.Tensor
    class_names: list[str]
    cache: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, shards: str | Path, split: str, classifier: LoadedClassifier,
             train_limit: int | None = None) -> "RealData":
        from bicogan_dist.data.loader import load_split
        from bicogan_dist.data.manifest import ShardManifest

        manifest = ShardManifest.load(shards)
        if list(manifest.label_names) != list(classifier.class_names):
            raise ValueError(f"the shards' classes {manifest.label_names} differ from the classifier's "
                             f"{classifier.class_names}")
        tx, ty = load_split(shards, "Training", device="cpu", limit=train_limit)
        hx, hy = load_split(shards, split, device="cpu")
        return cls(split, tx, ty, hx, hy, classifier.features(tx).cpu(), classifier.features(hx).cpu(),
                   list(manifest.label_names))


class Evaluator:
    """One classifier + real data; each method measures one thing for given G (and E)."""

    def __init__(self, classifier: LoadedClassifier, real: RealData, num_samples: int = 500, seed: int = 0,
                 batch_size: int = 256, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 transfer_limit: int | None = None, truncation: float = 1.0) -> None:
        self.clf, self.real = classifier, real
        # G decodes z * truncation, z drawn or encoded (reconstruction, transfer); a bad psi fails before any
        # measurement
        self.truncation = check_truncation(truncation)
        self.num_samples, self.seed, self.batch_size = num_samples, seed, batch_size
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.transfer_limit = transfer_limit
        self.n_cls = len(real.class_names)

    # -- generation helpers
    @torch.no_grad()
    def generate(self, G: nn.Module, labels: torch.Tensor | None, n: int, z_dim: int, seed: int) -> torch.Tensor:
        """n images as uint8 on the CPU (rounded to grey levels, as a saved PNG would be)."""
        device = next(G.parameters()).device
        z = truncate(_noise(n, z_dim, seed, device), self.truncation)
        out = []
        with _Modes(G):
            for i in range(0, n, self.batch_size):
                c = None if labels is None else labels[i:i + self.batch_size].to(device)
                out.append(to_uint8(G(z[i:i + self.batch_size], c)).cpu())
        return torch.cat(out) if out else torch.empty(0, 1, 48, 48, dtype=torch.uint8)

    @torch.no_grad()
    def encode(self, E: nn.Module, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = next(E.parameters()).device
        zs, logits = [], []
        with _Modes(E):
            for i in range(0, images_u8.shape[0], self.batch_size):
                z_hat, c_logits = E(to_model_range(images_u8[i:i + self.batch_size].to(device)))
                zs.append(z_hat.float())
                if c_logits is not None:
                    logits.append(c_logits.float())
        return torch.cat(zs), (torch.cat(logits) if logits else None)

    def _classified(self, images_u8: torch.Tensor, true: torch.Tensor) -> dict[str, Any]:
        pred = self.clf.predict(images_u8).cpu()
        cm = confusion_matrix(true, pred, self.n_cls)
        overall, per_class = accuracy_from_confusion(cm)
        return {"overall": overall, "per_class": dict(zip(self.real.class_names, per_class)),
                "confusion_matrix": cm.tolist()}

    # -- measures
    def conditional_accuracy(self, G: nn.Module, z_dim: int) -> dict[str, Any]:
        """Accuracy on N faces per emotion, and on the same faces diversity and FID per emotion."""
        labels = torch.arange(self.n_cls).repeat_interleave(self.num_samples)
        images = self.generate(G, labels, labels.shape[0], z_dim, self.seed)
        out = {**self._classified(images, labels), "samples_per_class": self.num_samples}
        out.update(self._per_class_fidelity(images, self.clf.features(images).cpu(), labels))
        return out

    def _real_per_class(self) -> dict[str, Any]:
        """Per-emotion reference numbers of the real data (independent of G: computed once)."""
        if "per_class" not in self.real.cache:
            r, n = self.real, self.num_samples
            ref = {"train": [], "train_spread": [], "train_pixel_spread": [], "diversity": [], "fid": []}
            for k in range(self.n_cls):
                tr, te = r.train_features[r.train_y == k], r.test_features[r.test_y == k]
                pick = torch.randperm(tr.shape[0], generator=torch.Generator().manual_seed(self.seed))[:n]
                ref["train"].append(tr)
                ref["train_spread"].append(mean_pairwise_distance(tr[pick]))
                ref["train_pixel_spread"].append(mean_pairwise_distance(_pixels(r.train_x[r.train_y == k][pick])))
                ref["diversity"].append(mean_pairwise_distance(te) / ref["train_spread"][-1])
                ref["fid"].append(fid(te, tr))
            r.cache["per_class"] = ref
        return self.real.cache["per_class"]

    def _per_class_fidelity(self, images: torch.Tensor, gen_f: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        ref, names = self._real_per_class(), self.real.class_names
        div, pix, fids = [], [], []
        for k in range(self.n_cls):
            g = gen_f[labels == k]
            div.append(mean_pairwise_distance(g) / ref["train_spread"][k])
            pix.append(mean_pairwise_distance(_pixels(images[labels == k])) / ref["train_pixel_spread"][k])
            fids.append(fid(g, ref["train"][k]))
        return {
            "intra_class_diversity": {"mean": float(np.mean(div)), "per_class": dict(zip(names, div)),
                                      f"real_{self.real.split}_mean": float(np.mean(ref["diversity"])),
                                      "pixels_mean": float(np.mean(pix)), "pixels_per_class": dict(zip(names, pix)),
                                      "definition": "mean pairwise classifier-feature distance of generated faces "
                                                    "of one emotion / the same of real Training faces of it; "
                                                    "pixels_*: the same ratio on grey levels"},
            "per_class_fid": {"mean": float(np.mean(fids)), "per_class": dict(zip(names, fids)),
                              f"real_{self.real.split}_mean": float(np.mean(ref["fid"])),
                              f"real_{self.real.split}": dict(zip(names, ref["fid"])),
                              "definition": "FID of generated emotion k vs real Training emotion k"},
        }

    def fid_kid(self, G: nn.Module, z_dim: int, conditional: bool) -> dict[str, Any]:
        total = self.num_samples * self.n_cls
        if conditional:
            counts = proportional_counts(torch.bincount(self.real.train_y, minlength=self.n_cls).tolist(), total)
            labels = torch.arange(self.n_cls).repeat_interleave(torch.tensor(counts))
        else:
            labels = None
        images = self.generate(G, labels, total, z_dim, self.seed + 1)
        gen_f = self.clf.features(images).cpu()
        r = self.real
        tr, te = "Training", r.split
        out_fid = {f"generated_vs_{tr}": fid(gen_f, r.train_features),
                   f"generated_vs_{te}": fid(gen_f, r.test_features)}
        out_kid = {f"generated_vs_{tr}": self._kid(gen_f, r.train_features),
                   f"generated_vs_{te}": self._kid(gen_f, r.test_features)}
        if "reference" not in r.cache:  # real vs real does not depend on G: compute once
            r.cache["reference"] = (fid(r.train_features, r.test_features),
                                    self._kid(r.train_features, r.test_features))
        out_fid[f"real_{tr}_vs_{te}"], out_kid[f"real_{tr}_vs_{te}"] = r.cache["reference"]
        return {"fid": out_fid, "kid": out_kid, "generated": total,
                "generated_class_counts": None if labels is None else dict(zip(r.class_names, counts)),
                "real_counts": {tr: int(r.train_x.shape[0]), te: int(r.test_x.shape[0])}}

    def _kid(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        mean, std = kid(a, b, subsets=self.kid_subsets, subset_size=self.kid_subset_size, seed=self.seed)
        return {"mean": mean, "std": std}

    def encoder_accuracy(self, E: nn.Module) -> dict[str, Any] | None:
        _, logits = self.encode(E, self.real.test_x)
        if logits is None:
            return None
        cm = confusion_matrix(self.real.test_y, logits.argmax(1).cpu(), self.n_cls)
        overall, per_class = accuracy_from_confusion(cm)
        return {"overall": overall, "per_class": dict(zip(self.real.class_names, per_class)),
                "confusion_matrix": cm.tolist(), "split": self.real.split, "images": int(self.real.test_x.shape[0])}

    @torch.no_grad()
    def reconstruction_and_transfer(self, G: nn.Module, E: nn.Module, conditional: bool) -> dict[str, Any]:
        x = self.real.test_x
        if self.transfer_limit is not None:
            x = x[: self.transfer_limit]
        z_hat, logits = self.encode(E, x)
        z_hat = truncate(z_hat, self.truncation)  # the same psi as the drawn faces (sample_images --transfer)
        device = next(G.parameters()).device
        recon, moved = [], []
        with _Modes(G):
            for i in range(0, x.shape[0], self.batch_size):
                zb = z_hat[i:i + self.batch_size].to(device)
                c = logits[i:i + self.batch_size].argmax(1).to(device) if (conditional and logits is not None) else None
                recon.append(G(zb, c).float().cpu())
                if conditional:
                    k = zb.shape[0]
                    targets = torch.arange(self.n_cls, device=device).repeat(k)
                    moved.append(to_uint8(G(zb.repeat_interleave(self.n_cls, 0), targets)).cpu())
        recon_f = torch.cat(recon)
        mae = (to_uint8(recon_f).float() - x.float()).abs().mean()
        mse = (recon_f - to_model_range(x)).pow(2).mean()
        out: dict[str, Any] = {"reconstruction": {"mae_grey_levels": float(mae), "mse_model_range": float(mse),
                                                  "split": self.real.split, "images": int(x.shape[0]),
                                                  "emotion_used": "E's predicted emotion" if conditional else None}}
        if conditional:
            targets = torch.arange(self.n_cls).repeat(x.shape[0])
            res = self._classified(torch.cat(moved), targets)
            out["emotion_transfer"] = {"overall": res["overall"], "per_target": res["per_class"],
                                       "confusion_matrix": res["confusion_matrix"], "split": self.real.split,
                                       "images": int(x.shape[0])}
        else:
            out["emotion_transfer"] = None
        return out


def evaluate_export(exported: Any, shards: str | Path, classifier: LoadedClassifier | str | Path,
                    num_samples: int = 500, split: str | None = None, device: torch.device | str = "cpu",
                    seed: int = 0, kid_subsets: int = 100, kid_subset_size: int = 1000,
                    transfer_limit: int | None = None, train_limit: int | None = None,
                    real: RealData | None = None, truncation: float = 1.0) -> dict[str, Any]:
    """Every measure for one export (``bicogan_dist.export.ExportedModel`` or its folder) → a JSON-able dict.

    ``real`` (from ``RealData.load``) lets callers that evaluate many exports read and embed
    the real images once.
    """
    from bicogan_dist.export import load_export

    t0 = time.perf_counter()
    device = torch.device(device)
    if isinstance(exported, (str, Path)):
        exported = load_export(exported, device)
    if not isinstance(classifier, LoadedClassifier):
        classifier = load_classifier(classifier, device)
    split = split or default_split(shards)
    if list(exported.class_names) != list(classifier.class_names):
        raise ValueError(f"the export's classes {exported.class_names} differ from the classifier's "
                         f"{classifier.class_names}: evaluate with a classifier trained on the same label map")
    if real is None or real.split != split:
        real = RealData.load(shards, split, classifier, train_limit)
    ev = Evaluator(classifier, real, num_samples, seed, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                   transfer_limit=transfer_limit, truncation=truncation)
    cfg = exported.model
    conditional, bidirectional = bool(cfg.conditional), bool(cfg.bidirectional)
    G, E = exported.G, exported.E if bidirectional else None
    if "classifier_on_real" not in real.cache:  # independent of G: once per RealData (bench_quality reuses it)
        real.cache["classifier_on_real"] = accuracy_from_confusion(
            confusion_matrix(real.test_y, classifier.predict(real.test_x).cpu(), len(real.class_names)))
    real_overall, real_recall = real.cache["classifier_on_real"]
    # Conditional accuracy draws the same number of faces per emotion, so its ceiling is the classifier's mean
    # recall over emotions on real faces, not its accuracy on the (imbalanced) real split.
    real_balanced = float(np.mean([r for r in real_recall if r is not None]))
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "export": {"path": str(exported.path) if getattr(exported, "path", None) else None, "kind": cfg.kind,
                   "arch": getattr(cfg, "arch", None), "z_dim": exported.z_dim,
                   "class_names": list(exported.class_names),
                   "step": (exported.metadata.get("source") or {}).get("step") if exported.metadata else None},
        "feature_space": classifier.feature_space,
        "classifier": {"path": str(classifier.path) if classifier.path else None,
                       "weights_sha256": classifier.weights_sha256,
                       "feature_dim": classifier.feature_dim,
                       "accuracy_on_real": {real.split: real_overall},
                       "balanced_accuracy_on_real": {real.split: real_balanced},
                       "per_class_accuracy_on_real": {real.split: dict(zip(real.class_names, real_recall))},
                       "accuracy_at_training": classifier.meta.get("accuracy")},
        "settings": {"shards": str(shards), "split": split, "num_samples_per_class": num_samples, "seed": seed,
                     "device": str(device), "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size,
                     "transfer_limit": transfer_limit, "train_limit": train_limit, "classifier_flip_tta": True,
                     "truncation": truncation},
    }
    report["conditional_accuracy"] = ev.conditional_accuracy(G, exported.z_dim) if conditional else None
    report.update(ev.fid_kid(G, exported.z_dim, conditional))
    report["encoder_accuracy"] = ev.encoder_accuracy(E) if E is not None else None
    if E is not None:
        report.update(ev.reconstruction_and_transfer(G, E, conditional))
    else:
        report["reconstruction"] = report["emotion_transfer"] = None
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


TrainingEvaluator = Callable[[nn.Module, "nn.Module | None", list[str]], dict[str, float]]


def make_training_evaluator(classifier_dir: str | Path, shards: str | Path, num_samples: int = 200,
                            split: str = "PublicTest", device: torch.device | str = "cpu", seed: int = 0,
                            train_limit: int | None = 10000, model: Any = None) -> TrainingEvaluator:
    """A callable for the trainer: ``fn(G_ema, E, class_names) -> {"eval/...": float}`` to log every N steps.

    Real features are computed once here, so each call costs only generation and
    classification of ``num_samples`` faces per emotion. ``split`` defaults to PublicTest so
    that watching training never touches PrivateTest, the split reports are made on. FID from
    few samples is biased upwards: compare these values along one run, not with evaluate.py.
    ``model`` (the run's ModelConfig) gives z_dim and the kind; without it they are read off G.
    """
    device = torch.device(device)
    clf = load_classifier(classifier_dir, device)
    from bicogan_dist.data.manifest import ShardManifest

    if split not in ShardManifest.load(shards).splits:
        split = default_split(shards)
    real = RealData.load(shards, split, clf, train_limit)
    ev = Evaluator(clf, real, num_samples, seed, kid_subsets=20, kid_subset_size=500, transfer_limit=num_samples)

    def evaluate(G_ema: nn.Module, E: nn.Module | None, class_names: list[str]) -> dict[str, float]:
        if list(class_names) != list(clf.class_names):
            raise ValueError(f"training classes {list(class_names)} differ from the classifier's {clf.class_names}")
        G = getattr(G_ema, "module", G_ema)
        E = getattr(E, "module", E) if E is not None else None
        if model is not None:
            z_dim, conditional = int(model.z_dim), bool(model.conditional)
        else:
            z_dim, conditional = _z_dim(G), getattr(G, "embed", None) is not None
        out: dict[str, float] = {}
        if conditional:
            out["eval/conditional_accuracy"] = ev.conditional_accuracy(G, z_dim)["overall"]
        fk = ev.fid_kid(G, z_dim, conditional)
        out["eval/fid_training"] = fk["fid"]["generated_vs_Training"]
        out["eval/kid_training"] = fk["kid"]["generated_vs_Training"]["mean"]
        if E is not None:
            enc = ev.encoder_accuracy(E)
            if enc is not None:
                out["eval/encoder_accuracy"] = enc["overall"]
        return out

    return evaluate


def _z_dim(G: nn.Module) -> int:
    """The generator's noise size: its class embedding's width (conditional kinds) or its first Linear's input."""
    embed = getattr(G, "embed", None)
    if isinstance(embed, nn.Embedding):
        return int(embed.embedding_dim)
    for m in G.modules():
        if isinstance(m, nn.Linear):
            return int(m.in_features)
    raise ValueError("cannot tell the generator's z_dim; pass model= (the run's ModelConfig) to "
                     "make_training_evaluator")
