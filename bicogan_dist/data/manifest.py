"""``manifest.json``: what a shard folder holds, written by the shard tool, checked by loaders."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ShardError(RuntimeError):
    """A shard folder that does not match its manifest (the message names the shard)."""


@dataclass
class ShardEntry:
    file: str  # name relative to the shard folder
    count: int
    sha256: str


@dataclass
class SplitInfo:
    count: int
    class_counts: list[int]  # per class index
    shards: list[ShardEntry]


@dataclass
class ShardManifest:
    label_names: list[str]
    splits: dict[str, SplitInfo]
    source: str = ""
    image_size: int = 48
    quality: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def image_count(self) -> int:
        return sum(s.count for s in self.splits.values())

    def to_json(self) -> str:
        data = asdict(self)
        data["image_count"] = self.image_count
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, folder: "str | Path | Any") -> "ShardManifest":
        """The manifest of a shard set: a local folder, an ``http(s)://`` base URL or a ``pipe:`` template
        (see ``bicogan_dist.data.shard_io``; a ``ShardLocation`` is accepted too)."""
        from bicogan_dist.data.shard_io import ShardLocation

        location = ShardLocation.parse(folder)
        if location.kind == "local":
            path = Path(location.spec) / MANIFEST_NAME
            if not path.is_file():
                raise ShardError(f"{path}: no manifest.json; make shards with tools/shard_fer2013.py first")
            where, text = str(path), path.read_text()
        else:
            where = location.url(MANIFEST_NAME)
            text = location.read_text(MANIFEST_NAME)
        try:
            data = json.loads(text)
            splits = {
                name: SplitInfo(
                    count=int(s["count"]),
                    class_counts=[int(c) for c in s["class_counts"]],
                    shards=[ShardEntry(**e) for e in s["shards"]],
                )
                for name, s in data["splits"].items()
            }
            data.pop("image_count", None)
            data["splits"] = splits
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{where}: malformed manifest ({exc!r})") from exc

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ShardError(f"split {name!r} is not in the manifest; it has {sorted(self.splits)}")
        return self.splits[name]

    def shard_paths(self, folder: str | Path, split: str, verify: bool = False) -> list[Path]:
        """Paths of a split's shards; raises ShardError naming a missing (or, with verify, altered) shard."""
        folder = Path(folder)
        info = self.split(split)
        if sum(e.count for e in info.shards) != info.count:
            raise ShardError(f"{folder / MANIFEST_NAME}: split {split} lists {info.count} samples but its shards hold "
                             f"{sum(e.count for e in info.shards)}")
        paths = []
        for entry in info.shards:
            path = folder / entry.file
            if not path.is_file():
                raise ShardError(f"shard {path} listed in the manifest is missing")
            if verify and sha256_file(path) != entry.sha256:
                raise ShardError(f"shard {path} does not match its sha256 in the manifest (corrupt or replaced)")
            paths.append(path)
        return paths


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
