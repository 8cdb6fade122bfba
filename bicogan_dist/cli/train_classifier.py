"""``bicogan-train-classifier`` / ``tools/train_classifier.py``: train and export the FER classifier.

The classifier is the measuring stick of evaluation (accuracy, FID/KID features).

The work is :func:`bicogan_dist.evaluate.classifier.train_classifier`.
"""
from __future__ import annotations

import argparse

from bicogan_dist.cli.common import USER_ERROR, Command


def build_parser() -> argparse.ArgumentParser:
    """The classifier trainer's flags; defaults come from the library's config dataclasses."""
    import torch

    from bicogan_dist.evaluate.classifier import ClassifierConfig, ClassifierTrainConfig

    p = argparse.ArgumentParser(prog="train_classifier",
                                description="Train the FER classifier used as the measuring stick (accuracy, FID/KID "
                                            "features) and export it as classifier.safetensors + classifier.json.")
    p.add_argument("--shards", required=True, help="shard folder with manifest.json (Training + held-out splits)")
    p.add_argument("--out", required=True, help="export folder")
    defaults = ClassifierTrainConfig()
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--widths", default=",".join(map(str, ClassifierConfig().widths)),
                   help="channels per stage, comma separated (default %(default)s)")
    p.add_argument("--convs", default=None,
                   help="3x3 convs per stage, comma separated (default 1 in the first stage, 2 in the others)")
    p.add_argument("--feature-dim", type=int, default=ClassifierConfig().feature_dim,
                   help="width of the penultimate embedding, the FID/KID feature space (default %(default)s)")
    p.add_argument("--dropout", type=float, default=ClassifierConfig().dropout)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=defaults.precision)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's choice; 1 is fastest on a machine busy with other work)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--limit", type=int, default=None, help="use only the first N Training images (quick tries)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def _ints(text: str) -> tuple[int, ...]:
    """``"8,16,32"`` → (8, 16, 32)."""
    return tuple(int(w) for w in text.split(",") if w.strip())


def _train_classifier(args: argparse.Namespace) -> int:
    """Train, export and print the held-out accuracies."""
    import torch

    from bicogan_dist.data.manifest import ShardManifest
    from bicogan_dist.evaluate.classifier import ClassifierConfig, ClassifierTrainConfig, train_classifier

    widths = _ints(args.widths)
    convs = _ints(args.convs) if args.convs else (1,) + (2,) * (len(widths) - 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ClassifierTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                precision=args.precision, seed=args.seed)
    n_cls = len(ShardManifest.load(args.shards).label_names)
    arch = ClassifierConfig(widths=widths, convs=convs, feature_dim=args.feature_dim, dropout=args.dropout,
                            num_classes=n_cls)
    doc = train_classifier(args.shards, args.out, arch, cfg, args.device, progress=not args.no_progress,
                           limit=args.limit)
    acc = ", ".join(f"{k} {v:.2%}" for k, v in doc["accuracy"].items())
    print(f"classifier: {acc} (flip TTA) in {doc['training']['seconds']:.0f} s on {args.device}; wrote {args.out}")
    return 0


def _errors() -> dict:
    from bicogan_dist.config import ConfigError
    from bicogan_dist.data.manifest import ShardError

    return {(ConfigError, FileNotFoundError, ShardError): USER_ERROR}


#: 0 on success (accuracy per held-out split), 2 with ``error: ...`` on bad input or a bad shard folder.
COMMAND = Command(build_parser, _train_classifier, _errors)
main, parse_args = COMMAND.main, COMMAND.parse_args


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
