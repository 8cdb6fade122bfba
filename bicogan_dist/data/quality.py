"""Data-quality report over FER2013 records, and the drop rules that act on it.

FER2013 has known flaws that matter for honest evaluation: exact duplicate images
(some with conflicting labels), duplicates across splits (test images that are also
training images, i.e. leakage) and nearly blank images. The report is computed over
*all* records read, before any dropping (disgust included), so its figures do not
depend on the shard options.

Definitions (fixed, and what the FER2013 README's figures mean):

* *duplicate group*: the images sharing identical pixel bytes (blake2b of ``pixels.tobytes()``),
  when there are at least two of them.
* ``duplicate_images``: images that repeat an earlier image, i.e. the sum over groups of
  (group size - 1). On the real file: 1,853 in 1,516 groups (3,369 images lie in groups;
  "every image in a group" cannot be the README's 1,853, as 1,516 groups hold >= 3,032).
* ``conflicting_label_groups``: groups whose members carry more than one emotion code.
* ``cross_split_groups``: groups with members in more than one split.
* ``leaked[split]``: images of a non-Training split whose pixels also occur in Training.
* ``blank_images``: pixel standard deviation < ``BLANK_STD``; ``constant_images``: all one
  grey level (a subset); ``all_black``: all zero (a subset of those).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from bicogan_dist.data.records import FaceRecord
from bicogan_dist.labels import DISGUST_CODE

BLANK_STD = 5.0
TRAIN_SPLIT = "Training"
#: Drop reasons, in precedence order: an image that several rules drop is counted under the first.
DROP_REASONS = ("disgust", "blank", "conflicting_labels", "duplicates", "leaks")
_EXAMPLES = 10


def pixel_digest(pixels: np.ndarray) -> bytes:
    """Identity of an image's exact pixel content."""
    return hashlib.blake2b(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(), digest_size=16).digest()


def duplicate_groups(records: Sequence[FaceRecord]) -> list[list[int]]:
    """Indices of records with identical pixels, groups of size >= 2, each in read order, groups by first index."""
    by_digest: dict[bytes, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_digest[pixel_digest(record.pixels)].append(i)
    return sorted((g for g in by_digest.values() if len(g) > 1), key=lambda g: g[0])


def pixel_std(records: Sequence[FaceRecord], chunk: int = 4096) -> np.ndarray:
    """Per-image pixel standard deviation (population, as ``np.std``), from exact integer sums, in chunks."""
    out = np.empty(len(records), dtype=np.float64)
    for start in range(0, len(records), chunk):
        block = np.stack([r.pixels.reshape(-1) for r in records[start:start + chunk]]).astype(np.int64)
        n = block.shape[1]
        s1 = block.sum(axis=1)
        s2 = np.einsum("ij,ij->i", block, block)
        out[start:start + len(block)] = np.sqrt(np.maximum(s2 * n - s1 * s1, 0)) / n
    return out


@dataclass
class QualityReport:
    """The figures of one data set; ``to_dict`` goes into the manifest, ``table`` to the terminal."""

    images: int = 0
    per_split: dict[str, int] = field(default_factory=dict)
    duplicate_images: int = 0
    images_in_duplicate_groups: int = 0
    duplicate_groups: int = 0
    largest_duplicate_group: int = 0
    conflicting_label_groups: int = 0
    cross_split_groups: int = 0
    leaked: dict[str, int] = field(default_factory=dict)
    blank_std_threshold: float = BLANK_STD
    blank_images: int = 0
    constant_images: int = 0
    all_black: int = 0
    blank_examples: list[str] = field(default_factory=list)
    conflicting_examples: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}

    def table(self) -> str:
        per_split = ", ".join(f"{s} {n:,}" for s, n in self.per_split.items())
        rows: list[tuple[str, str]] = [
            ("images checked", f"{self.images:,}  ({per_split})"),
            ("exact duplicate images", f"{self.duplicate_images:,}  (repeats of an earlier image)"),
            ("duplicate groups", f"{self.duplicate_groups:,}  ({self.images_in_duplicate_groups:,} images in them, "
                                 f"largest {self.largest_duplicate_group})"),
            ("groups with conflicting labels", f"{self.conflicting_label_groups:,}"),
            ("groups spanning splits", f"{self.cross_split_groups:,}"),
        ]
        rows += [(f"{split} images also in Training", f"{n:,}") for split, n in self.leaked.items()]
        rows += [
            (f"nearly blank (std < {self.blank_std_threshold:g})", f"{self.blank_images:,}"),
            ("  all one grey level", f"{self.constant_images:,}  ({self.all_black:,} all black)"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = ["data quality (all images read, before dropping)", "-" * (width + 30)]
        lines += [f"{k:<{width}}  {v}" for k, v in rows]
        return "\n".join(lines)


@dataclass
class QualityAnalysis:
    """The report plus the per-image facts the drop rules need (kept out of the manifest)."""

    report: QualityReport
    groups: list[list[int]]
    std: np.ndarray
    leaked_indices: list[int]


def analyse(records: Sequence[FaceRecord], blank_std: float = BLANK_STD) -> QualityAnalysis:
    """Hash every image once and derive the whole report (~1 s for the real 35,887 images)."""
    groups = duplicate_groups(records)
    std = pixel_std(records) if records else np.empty(0)
    rep = QualityReport(images=len(records), blank_std_threshold=blank_std)
    for r in records:
        rep.per_split[r.split] = rep.per_split.get(r.split, 0) + 1
    rep.duplicate_groups = len(groups)
    rep.images_in_duplicate_groups = sum(len(g) for g in groups)
    rep.duplicate_images = rep.images_in_duplicate_groups - rep.duplicate_groups
    rep.largest_duplicate_group = max((len(g) for g in groups), default=0)
    leaked: list[int] = []
    for group in groups:
        codes = {records[i].fer_code for i in group}
        splits = {records[i].split for i in group}
        if len(codes) > 1:
            rep.conflicting_label_groups += 1
            if len(rep.conflicting_examples) < _EXAMPLES:
                rep.conflicting_examples.append([f"{records[i].source} ({records[i].fer_code})" for i in group])
        if len(splits) > 1:
            rep.cross_split_groups += 1
        if TRAIN_SPLIT in splits:
            leaked += [i for i in group if records[i].split != TRAIN_SPLIT]
    leaked.sort()
    rep.leaked = {s: 0 for s in rep.per_split if s != TRAIN_SPLIT}
    for i in leaked:
        rep.leaked[records[i].split] += 1
    blank = np.flatnonzero(std < blank_std)
    rep.blank_images = int(blank.size)
    for i in blank:
        px = records[i].pixels
        lo, hi = int(px.min()), int(px.max())
        rep.constant_images += lo == hi
        rep.all_black += hi == 0
    rep.blank_examples = [records[i].source for i in blank[:_EXAMPLES]]
    return QualityAnalysis(rep, groups, std, leaked)


def quality_report(records: Sequence[FaceRecord], blank_std: float = BLANK_STD) -> QualityReport:
    return analyse(records, blank_std).report


def drop_decisions(records: Sequence[FaceRecord], analysis: QualityAnalysis, *, drop_disgust: bool,
                   drop_duplicates: bool = False, drop_leaks: bool = False,
                   drop_blank: bool = False) -> dict[int, str]:
    """Record index → reason, for every record to leave out; each index gets the first reason of DROP_REASONS.

    Rules (all judged on the full set, so they do not depend on one another):
    * disgust: FER code 1 in six-class mode.
    * blank: pixel std < the report's threshold.
    * conflicting_labels (with ``drop_duplicates``): every member of a group whose labels disagree,
      as no member's label can be trusted.
    * duplicates (with ``drop_duplicates``): all but one member of a same-label group; the one kept
      is the first Training member in read order if there is one (so keeping it never leaks), else the first.
    * leaks (with ``drop_leaks``): non-Training images whose pixels also occur in Training.
    """
    candidates: dict[str, set[int]] = {reason: set() for reason in DROP_REASONS}
    if drop_disgust:
        candidates["disgust"] = {i for i, r in enumerate(records) if r.fer_code == DISGUST_CODE}
    if drop_blank:
        candidates["blank"] = set(np.flatnonzero(analysis.std < analysis.report.blank_std_threshold).tolist())
    if drop_duplicates:
        for group in analysis.groups:
            if len({records[i].fer_code for i in group}) > 1:
                candidates["conflicting_labels"].update(group)
            else:
                keep = next((i for i in group if records[i].split == TRAIN_SPLIT), group[0])
                candidates["duplicates"].update(i for i in group if i != keep)
    if drop_leaks:
        candidates["leaks"] = set(analysis.leaked_indices)
    decisions: dict[int, str] = {}
    for reason in DROP_REASONS:
        for i in candidates[reason]:
            decisions.setdefault(i, reason)
    return decisions
