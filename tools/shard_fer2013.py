"""Shard FER2013 into webdataset tars + manifest.json with a data-quality report.

    python tools/shard_fer2013.py SOURCE --out DIR [--keep-disgust] [--shard-size N]
        [--drop-duplicates] [--drop-leaks] [--drop-blank] [--synthetic N] [--seed S] [--force]

SOURCE: Kaggle fer2013.csv[.gz], icml_face_data.csv, torchvision's fer2013/ folder, or an
image folder train|test/<emotion>/*.jpg. It only calls bicogan_dist.cli.shard.main (also the ``bicogan-shard``
console script), so the tool runs from a checkout without installing.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bicogan_dist.cli.shard import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
