"""Shared fixtures: the real FER2013 when present, and tiny FER2013 files made on the fly.

Generic on purpose: anything several test modules need goes here; module-specific
helpers stay in their module.
"""
from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: The real data set lives beside the repository (never inside it); a fresh clone has none.
REAL_FER2013 = Path(__file__).resolve().parents[2] / "shared" / "fer2013" / "fer2013.csv.gz"


@pytest.fixture(scope="session")
def real_fer2013() -> Path:
    """Path of the real FER2013 (Kaggle layout, gzip); skips the test where it is absent."""
    if not REAL_FER2013.is_file():
        pytest.skip(f"real FER2013 not found at {REAL_FER2013}")
    return REAL_FER2013


@pytest.fixture(scope="session")
def real_fer2013_shards(real_fer2013: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real FER2013 sharded once per session with default options (six classes, nothing else dropped)."""
    from bicogan_dist.cli.shard import main

    out = tmp_path_factory.mktemp("real") / "fer2013"
    assert main([str(real_fer2013), "--out", str(out), "--no-progress"]) == 0
    return out


@dataclass
class FerRow:
    """One row of a tiny FER2013 CSV: what the readers should give back."""

    code: int
    pixels: np.ndarray  # uint8 (48, 48)
    split: str


def face(seed: int) -> np.ndarray:
    """A random but reproducible 48x48 uint8 image, distinct for distinct seeds."""
    return np.random.default_rng(seed).integers(0, 256, size=(48, 48), dtype=np.uint8)


def fer_rows(per_split: dict[str, int] | None = None, seed: int = 0) -> list[FerRow]:
    """Distinct images cycling through all seven codes (disgust included), split by split."""
    per_split = per_split or {"Training": 14, "PublicTest": 7, "PrivateTest": 7}
    rows, k = [], 0
    for split, n in per_split.items():
        for i in range(n):
            rows.append(FerRow(code=i % 7, pixels=face(seed * 100_000 + k), split=split))
            k += 1
    return rows


def pixel_text(pixels: np.ndarray) -> str:
    return " ".join(str(int(v)) for v in pixels.reshape(-1))


#: Column layouts as the real files spell them.
CSV_LAYOUTS = {
    "kaggle": ["emotion", "pixels", "Usage"],
    "icml": ["emotion", " Usage", " pixels"],
    "torchvision-train": ["emotion", "pixels"],
    "torchvision-test": ["pixels"],
}


def csv_text(rows: Sequence[FerRow], layout: str = "kaggle") -> str:
    """CSV text in one of CSV_LAYOUTS (pixels quoted for torchvision, as its files are)."""
    header = CSV_LAYOUTS[layout]
    buf = io.StringIO()
    quoting = csv.QUOTE_NONNUMERIC if layout.startswith("torchvision") else csv.QUOTE_MINIMAL
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(header)
    row_writer = csv.writer(buf, lineterminator="\n", quoting=quoting)
    for row in rows:
        values = {"emotion": row.code, "pixels": pixel_text(row.pixels), "usage": row.split}
        row_writer.writerow([values[h.strip().lower()] for h in header])
    return buf.getvalue()


@pytest.fixture
def write_fer_csv(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``write_fer_csv(rows, name="fer2013.csv", layout="kaggle", gz=False, folder=tmp_path)`` → path."""

    def write(rows: Sequence[FerRow], name: str = "fer2013.csv", layout: str = "kaggle", gz: bool = False,
              folder: Path | None = None) -> Path:
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = csv_text(rows, layout).encode()
        path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
        return path

    return write


@pytest.fixture
def tiny_rows() -> list[FerRow]:
    return fer_rows()


@pytest.fixture
def tiny_fer_csv(write_fer_csv: Callable[..., Path], tiny_rows: list[FerRow]) -> Path:
    """A 28-row Kaggle-format fer2013.csv: 14 Training, 7 PublicTest, 7 PrivateTest, every code, all distinct."""
    return write_fer_csv(tiny_rows)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for modules of small-tensor tests: on a shared 2-core machine a second
    OpenMP thread only adds barrier stalls. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
