"""Train the FER classifier that measures generated faces, and export it.

    python tools/train_classifier.py --shards DIR --out CLASSIFIER_DIR [--epochs N] [--batch-size B] [--device D]

Writes classifier.safetensors + classifier.json (architecture, class names, pixel range,
feature dim, accuracy per held-out split, training time). Its penultimate layer is the
feature space of FID/KID in tools/evaluate.py. It only calls
bicogan_dist.cli.train_classifier.main (also the ``bicogan-train-classifier`` console script).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bicogan_dist.cli.train_classifier import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
