"""The emotion label map, written down once and used everywhere.

FER2013 stores an emotion *code* 0..6. The paper drops disgust (code 1, under 10%
the size of the other classes) and trains on six classes; ``--keep-disgust``
keeps all seven. A *class index* is the position in ``EmotionLabels.names``: it is
what shards store as ``cls``, what models are conditioned on and what metrics use.
"""
from __future__ import annotations

from dataclasses import dataclass

FER_CODE_NAMES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
DISGUST_CODE = 1

#: Canonical split names (Kaggle ``Usage`` column). ``Test`` is the merged test split of
#: image-folder exports, which do not separate PublicTest from PrivateTest.
SPLITS: tuple[str, ...] = ("Training", "PublicTest", "PrivateTest", "Test")


@dataclass(frozen=True)
class EmotionLabels:
    """Maps FER2013 codes to contiguous class indices and names."""

    fer_codes: tuple[int, ...]

    @classmethod
    def six(cls) -> "EmotionLabels":
        return cls(tuple(c for c in range(7) if c != DISGUST_CODE))

    @classmethod
    def seven(cls) -> "EmotionLabels":
        return cls(tuple(range(7)))

    @classmethod
    def make(cls, keep_disgust: bool = False) -> "EmotionLabels":
        return cls.seven() if keep_disgust else cls.six()

    @classmethod
    def from_names(cls, names: list[str] | tuple[str, ...]) -> "EmotionLabels":
        """Rebuild from a manifest's or export's ``label_names``."""
        unknown = [n for n in names if n not in FER_CODE_NAMES]
        if unknown:
            raise ValueError(f"unknown emotion name(s) {unknown}; expected names from {list(FER_CODE_NAMES)}")
        return cls(tuple(FER_CODE_NAMES.index(n) for n in names))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(FER_CODE_NAMES[c] for c in self.fer_codes)

    @property
    def num_classes(self) -> int:
        return len(self.fer_codes)

    def index_of_code(self, fer_code: int) -> int | None:
        """Class index of a FER code, or None when the code is dropped (disgust in six-class mode)."""
        try:
            return self.fer_codes.index(fer_code)
        except ValueError:
            return None

    def index_of_name(self, name: str) -> int | None:
        name = name.strip().lower()
        return self.names.index(name) if name in self.names else None
