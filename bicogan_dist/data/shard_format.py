"""The webdataset sample layout, encoded and decoded in one place.

A sample is ``<key>.png`` (48x48 8-bit grayscale PNG), ``<key>.cls`` (class index as
ASCII) and ``<key>.json`` (``{"fer_code", "source", "split"}``). Keys are
``<split>-<index:08d>`` with no dots, as webdataset groups files by the first dot.
"""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from bicogan_dist.data.records import IMAGE_SIZE, FaceRecord


def sample_key(split: str, index: int) -> str:
    return f"{split.lower()}-{index:08d}"


def encode_png(pixels: np.ndarray) -> bytes:
    """Deterministic PNG bytes (no timestamps or text chunks)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    if img.mode != "L":
        img = img.convert("L")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"shard image has shape {arr.shape}, expected {(IMAGE_SIZE, IMAGE_SIZE)}")
    return arr


def encode_sample(record: FaceRecord, class_index: int, index: int) -> dict[str, bytes | str]:
    meta = {"fer_code": int(record.fer_code), "source": record.source, "split": record.split}
    return {
        "__key__": sample_key(record.split, index),
        "png": encode_png(record.pixels),
        "cls": str(int(class_index)).encode("ascii"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def decode_sample(sample: dict) -> tuple[np.ndarray, int, dict]:
    """(pixels uint8 48x48, class index, metadata) from a raw webdataset sample dict."""
    return decode_png(sample["png"]), int(sample["cls"]), json.loads(sample["json"])
