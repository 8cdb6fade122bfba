"""Data-quality report and drop rules: exact figures on a hand-built set, and on the real FER2013."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import face

from bicogan_dist.data.quality import analyse, drop_decisions, quality_report
from bicogan_dist.data.records import FaceRecord


def rec(pixels: np.ndarray, code: int, split: str, name: str) -> FaceRecord:
    return FaceRecord(pixels=pixels, fer_code=code, split=split, source=name)


def flat(value: int) -> np.ndarray:
    return np.full((48, 48), value, dtype=np.uint8)


def near_blank() -> np.ndarray:
    px = flat(100)
    px[0, :10] = 120  # std ~ 1.3: nearly blank but not constant
    return px


@pytest.fixture
def flawed():
    """A hand-built set with every flaw once or twice; the comments give each record's role."""
    a, b, c, d = face(1), face(2), face(3), face(4)
    return [
        rec(a, 3, "Training", "t0"),  # group A: same label, Training x2 + PublicTest (a leak)
        rec(a, 3, "Training", "t1"),
        rec(b, 4, "Training", "t2"),  # group B: conflicting labels (4 vs 6), both Training
        rec(b, 6, "Training", "t3"),
        rec(face(5), 1, "Training", "t4"),  # a disgust image
        rec(flat(0), 0, "Training", "t5"),  # group K: all black, conflicting labels, spans splits
        rec(near_blank(), 5, "Training", "t6"),  # nearly blank, not constant
        rec(c, 2, "PublicTest", "p0"),  # group C: test member first, then a Training one
        rec(a, 3, "PublicTest", "p1"),  # leak of group A
        rec(flat(0), 6, "PrivateTest", "q0"),  # leak (group K)
        rec(c, 2, "Training", "t7"),
        rec(d, 0, "PrivateTest", "q1"),  # group D: duplicate inside PrivateTest only, no leak
        rec(d, 0, "PrivateTest", "q2"),
        rec(flat(200), 2, "PublicTest", "p2"),  # constant grey, not black
    ]


def test_figures_on_a_hand_built_set(flawed):
    rep = quality_report(flawed)
    assert rep.images == 14
    assert rep.per_split == {"Training": 8, "PublicTest": 3, "PrivateTest": 3}
    assert rep.duplicate_groups == 5  # A, B, C, D, K
    assert rep.images_in_duplicate_groups == 11
    assert rep.duplicate_images == 6  # repeats of an earlier image: 11 - 5
    assert rep.largest_duplicate_group == 3
    assert rep.conflicting_label_groups == 2  # B, K
    assert rep.cross_split_groups == 3  # A, C, K
    assert rep.leaked == {"PublicTest": 2, "PrivateTest": 1}  # p1, p0 (C has a Training member), q0
    assert (rep.blank_images, rep.constant_images, rep.all_black) == (4, 3, 2)
    assert rep.blank_examples == ["t5", "t6", "q0", "p2"]
    assert rep.conflicting_examples[0] == ["t2 (4)", "t3 (6)"]
    json.dumps(rep.to_dict())  # goes into manifest.json as is


def test_table_is_readable(flawed):
    table = quality_report(flawed).table()
    for line in ("exact duplicate images", "groups with conflicting labels", "groups spanning splits",
                 "PublicTest images also in Training   2", "nearly blank (std < 5)", "(2 all black)"):
        assert line in table


def names(records, decisions, reason):
    return sorted(records[i].source for i, r in decisions.items() if r == reason)


def test_drop_rules_and_precedence(flawed):
    analysis = analyse(flawed)
    none = drop_decisions(flawed, analysis, drop_disgust=False)
    assert none == {}
    only_disgust = drop_decisions(flawed, analysis, drop_disgust=True)
    assert names(flawed, only_disgust, "disgust") == ["t4"] and len(only_disgust) == 1

    dups = drop_decisions(flawed, analysis, drop_disgust=False, drop_duplicates=True)
    assert names(flawed, dups, "conflicting_labels") == ["q0", "t2", "t3", "t5"]  # groups B and K, entirely
    # A keeps t0; C keeps its Training member t7 although p0 came first; D keeps q1
    assert names(flawed, dups, "duplicates") == ["p0", "p1", "q2", "t1"]

    leaks = drop_decisions(flawed, analysis, drop_disgust=False, drop_leaks=True)
    assert names(flawed, leaks, "leaks") == ["p0", "p1", "q0"]

    blank = drop_decisions(flawed, analysis, drop_disgust=False, drop_blank=True)
    assert names(flawed, blank, "blank") == ["p2", "q0", "t5", "t6"]

    everything = drop_decisions(flawed, analysis, drop_disgust=True, drop_duplicates=True, drop_leaks=True,
                                drop_blank=True)
    by_reason = {r: names(flawed, everything, r) for r in set(everything.values())}
    assert by_reason == {  # each image once, under the first reason of disgust, blank, conflicting, duplicates, leaks
        "disgust": ["t4"], "blank": ["p2", "q0", "t5", "t6"], "conflicting_labels": ["t2", "t3"],
        "duplicates": ["p0", "p1", "q2", "t1"],
    }
    kept = sorted(r.source for i, r in enumerate(flawed) if i not in everything)
    assert kept == ["q1", "t0", "t7"]


def test_empty_input():
    rep = quality_report([])
    assert rep.images == 0 and rep.duplicate_groups == 0 and rep.blank_images == 0


@pytest.mark.slow
def test_real_fer2013_quality_figures(real_fer2013_shards):
    """The FER2013 README's figures, measured exactly (the report is computed before any dropping)."""
    quality = json.loads((real_fer2013_shards / "manifest.json").read_text())["quality"]
    assert quality["images"] == 35887
    assert quality["per_split"] == {"Training": 28709, "PublicTest": 3589, "PrivateTest": 3589}
    assert quality["duplicate_images"] == 1853  # repeats of an earlier image ...
    assert quality["duplicate_groups"] == 1516  # ... in 1,516 groups,
    assert quality["images_in_duplicate_groups"] == 3369  # which hold 3,369 images in all
    assert quality["largest_duplicate_group"] == 12
    assert quality["conflicting_label_groups"] == 57
    assert quality["cross_split_groups"] == 557
    assert quality["leaked"] == {"PublicTest": 280, "PrivateTest": 288}
    assert quality["blank_images"] == 14
    assert quality["constant_images"] == 12
    assert quality["all_black"] == 12
    assert quality["reader"]["layout"] == "Kaggle fer2013.csv"
