"""Write labelled faces as webdataset tar shards plus ``manifest.json``."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import webdataset as wds

from bicogan_dist.data.manifest import ShardEntry, sha256_file
from bicogan_dist.data.records import FaceRecord
from bicogan_dist.data.shard_format import encode_sample
from bicogan_dist.labels import EmotionLabels

DEFAULT_SHARD_SIZE = 4000


def write_split_shards(
    records: Iterable[FaceRecord],
    split: str,
    labels: EmotionLabels,
    out_dir: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> tuple[list[ShardEntry], list[int]]:
    """Write one split's records to ``out_dir/<split>-NNNNNN.tar``; byte-identical for identical input.

    Returns the shard entries and the per-class counts. Records whose FER code the label map
    drops must be filtered out by the caller.
    """
    out_dir = Path(out_dir)
    entries: list[ShardEntry] = []
    class_counts = [0] * labels.num_classes
    writer: wds.TarWriter | None = None
    path: Path | None = None
    in_shard = 0

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            entries.append(ShardEntry(file=path.name, count=in_shard, sha256=sha256_file(path)))
            writer = None

    for index, record in enumerate(records):
        if writer is None or in_shard == shard_size:
            close()
            path = out_dir / f"{split}-{len(entries):06d}.tar"
            writer = wds.TarWriter(str(path), mtime=0, user="bicogan", group="bicogan", mode=0o444)
            in_shard = 0
        cls = labels.index_of_code(record.fer_code)
        if cls is None:
            raise ValueError(f"{record.source}: FER code {record.fer_code} is not in the label map {labels.names}")
        writer.write(encode_sample(record, cls, index))
        class_counts[cls] += 1
        in_shard += 1
    close()
    return entries, class_counts
