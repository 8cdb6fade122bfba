"""Convert a training checkpoint into an export (safetensors + export.json, optionally ONNX).

    python tools/convert_checkpoint.py RUN_OR_CHECKPOINT --out EXPORT_DIR [--onnx] [--force]

RUN_OR_CHECKPOINT: a run folder (its newest complete checkpoint) or a checkpoint folder,
written by the DDP or the DeepSpeed engine. It only calls bicogan_dist.cli.export.main (also
the ``bicogan-export`` console script), so the tool runs from a checkout without installing.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bicogan_dist.cli.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
