"""The paper's augmentation table, measured: train, export and evaluate each setting, then compare with `none`.

    python tools/ablate_augmentations.py --shards DIR --classifier CLASSIFIER_DIR --steps N
        [--out runs/ablation] [--tolerance 0.10] [--settings a,b] [--launch "accelerate launch ..."] [key=value ...]

Writes OUT/ablation.md and OUT/ablation.json (and per setting OUT/<name>/report.*). The
verdict rule is documented in bicogan_dist/evaluate/ablation.py; this file only calls
bicogan_dist.cli.ablate.main (also the ``bicogan-ablate`` console script).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bicogan_dist.cli.ablate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
