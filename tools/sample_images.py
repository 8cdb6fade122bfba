"""Sample and edit faces with an export: grids, N per emotion, interpolation, emotion transfer.

    python tools/sample_images.py EXPORT_DIR --out grid.png [--seeds 0-7]
    python tools/sample_images.py EXPORT_DIR --per-class N --out DIR [--format png|shards]
    python tools/sample_images.py EXPORT_DIR --interpolate --out strip.png [--seeds 0,1] [--steps 8]
    python tools/sample_images.py EXPORT_DIR --transfer INPUT --out transfer.png [--limit 8]

See ``--help`` and the docstring of bicogan_dist.sample (where the logic lives). It only calls
bicogan_dist.cli.sample.main (also the ``bicogan-sample`` console script).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bicogan_dist.cli.sample import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
