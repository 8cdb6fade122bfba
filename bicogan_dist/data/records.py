"""The one in-memory record type every reader yields and the shard writer consumes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 48


@dataclass
class FaceRecord:
    """One labelled face: 48x48 uint8 grey levels, its FER2013 emotion code, split and origin."""

    pixels: np.ndarray  # uint8, shape (48, 48)
    fer_code: int
    split: str  # one of bicogan_dist.labels.SPLITS
    source: str  # "fer2013.csv.gz:row 17" or a path relative to the source root
