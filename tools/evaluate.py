"""Evaluate an export: conditional accuracy, FID/KID (FER-classifier features), encoder accuracy, reconstruction, transfer.

    python tools/evaluate.py EXPORT_DIR --shards DIR --classifier CLASSIFIER_DIR --out REPORT.json
        [--num-samples N] [--split PrivateTest] [--seed S] [--device D]

Writes REPORT.json, REPORT.md and REPORT_confusion.png. It only calls
bicogan_dist.cli.evaluate.main (also the ``bicogan-evaluate`` console script), so the tool runs from a
checkout without installing.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bicogan_dist.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
