"""Shard FER2013 into webdataset tars + manifest.json with a data-quality report.

    python tools/shard_fer2013.py SOURCE --out DIR [--keep-disgust] [--shard-size N]
        [--drop-duplicates] [--drop-leaks] [--drop-blank] [--synthetic N] [--seed S] [--force]

SOURCE: Kaggle fer2013.csv[.gz], icml_face_data.csv, torchvision's fer2013/ folder, or an
image folder train|test/<emotion>/*.jpg. The logic is bicogan_dist.data.shards.main (also the
``bicogan-shard`` console script); this file only makes it runnable from a checkout.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bicogan_dist.data.shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
