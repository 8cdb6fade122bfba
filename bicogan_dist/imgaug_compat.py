"""Import imgaug 0.4.0 on numpy 2: the one place that patches numpy for it.

imgaug 0.4.0 (the paper's library, unmaintained since 2020) reads ``np.sctypes``,
``np.bool`` and ``np.complex``, which numpy 2 removed. Restoring those three aliases
before the import makes every augmenter we use work (docs/architecture.md §3). Always import
imgaug through this module: ``from bicogan_dist.imgaug_compat import iaa``.
"""
from __future__ import annotations

import numpy as np

if not hasattr(np, "sctypes"):
    np.sctypes = {  # type: ignore[attr-defined]
        "int": [np.int8, np.int16, np.int32, np.int64],
        "uint": [np.uint8, np.uint16, np.uint32, np.uint64],
        "float": [np.float16, np.float32, np.float64],
        "complex": [np.complex64, np.complex128],
        "others": [bool, object, bytes, str, np.void],
    }
for _alias, _target in (("bool", np.bool_), ("complex", np.complex128)):
    if _alias not in np.__dict__:
        setattr(np, _alias, _target)

import imgaug  # noqa: E402
import imgaug.augmenters as iaa  # noqa: E402

__all__ = ["imgaug", "iaa"]
