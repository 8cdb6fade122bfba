"""Write labelled faces as webdataset tar shards plus ``manifest.json``; the shard tool's library side.

``python tools/shard_fer2013.py SOURCE --out DIR`` (or the ``bicogan-shard`` console script; both parse
in ``bicogan_dist/cli/shard.py``) runs :func:`build_shards`: read any supported FER2013 layout
(``readers``), report data quality over every image read (``quality``), drop what the options ask
for, write per-split shards and the manifest into a temporary sibling folder
``DIR.tmp-<host>-<pid>-<hex>`` and move it into place only when everything succeeded
(``bicogan_dist.atomic_dir``), so a failed run leaves nothing behind and never mixes old and new shards.

Same input and options → byte-identical shards and manifest, whatever the number of workers.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from bicogan_dist.atomic_dir import atomic_output
from bicogan_dist.data.manifest import MANIFEST_NAME, ShardEntry, ShardManifest, SplitInfo, sha256_file
from bicogan_dist.data.records import IMAGE_SIZE, FaceRecord
from bicogan_dist.data.shard_format import encode_sample
from bicogan_dist.labels import SPLITS, EmotionLabels

if TYPE_CHECKING:
    import multiprocessing.pool

    from bicogan_dist.data.readers import FerSource, ReadReport

DEFAULT_SHARD_SIZE = 4000
#: PNG encoding dominates writing (~0.27 ms/image); jobs go to workers in chunks this size.
_ENCODE_CHUNK = 256
#: Images per worker task when reading an image folder.
_READ_CHUNK = 64
#: Below these input sizes starting worker processes (~0.5 s) costs more than it saves.
_POOL_MIN_BYTES = 4 << 20
_POOL_MIN_IMAGES = 4000


def _labelled(records: Iterable[FaceRecord], labels: EmotionLabels) -> Iterator[tuple[FaceRecord, int]]:
    for record in records:
        cls = labels.index_of_code(record.fer_code)
        if cls is None:
            raise ValueError(f"{record.source}: FER code {record.fer_code} is not in the label map {labels.names}")
        yield record, cls


def _encode_job(job: tuple[FaceRecord, int, int]) -> tuple[int, dict]:
    """Worker side of parallel writing (module level so it pickles): (class index, sample dict)."""
    record, cls, index = job
    return cls, encode_sample(record, cls, index)


_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK
_TAR_OWNER = b"bicogan"
_TAR_MODE = 0o444


class TarShardWriter:
    """One shard tar, written directly: POSIX ustar members ``<key>.<ext>`` in sorted ext order, mtime 0,
    mode 0444, owner ``bicogan``, zero-padded to 10 KiB records.

    Why not ``webdataset.TarWriter``: it builds every header through ``tarfile``'s general code
    (~70 us a member, 3 members a sample: as costly as the PNG encoding, ~7 s for FER2013) and
    importing webdataset imports torch (~2 s). This writes the very bytes that
    ``webdataset.TarWriter(path, mtime=0, user="bicogan", group="bicogan", mode=0o444)`` writes on
    Python 3.11.4+ (tests/test_shards.py compares them), and keeps writing them on any Python
    version (``tarfile`` changed its device fields in 3.11.4), so shard sha256s stay stable.
    """

    def __init__(self, path: str | Path):
        self._fh = open(path, "wb")
        self._offset = 0

    def write(self, sample: dict) -> None:
        """A webdataset sample dict: ``__key__`` plus extension → bytes (str is UTF-8 encoded)."""
        key = sample["__key__"]
        for ext in sorted(sample):
            if ext.startswith("_"):
                continue
            data = sample[ext]
            self._add(f"{key}.{ext}", data.encode("utf-8") if isinstance(data, str) else bytes(data))

    def _add(self, name: str, data: bytes) -> None:
        raw = name.encode("ascii")
        if len(raw) > 100:
            raise ValueError(f"tar member name {name!r} is longer than 100 characters")
        header = b"".join([
            raw.ljust(100, b"\0"), b"%07o\0" % _TAR_MODE, b"0000000\0", b"0000000\0", b"%011o\0" % len(data),
            b"00000000000\0", b" " * 8, b"0", b"\0" * 100, b"ustar\x0000", _TAR_OWNER.ljust(32, b"\0"),
            _TAR_OWNER.ljust(32, b"\0"), b"\0" * 16, b"\0" * 155,
        ]).ljust(_TAR_BLOCK, b"\0")
        header = header[:148] + b"%06o\0" % sum(header) + header[155:]  # checksum: byte sum, field as spaces
        pad = -len(data) % _TAR_BLOCK
        self._fh.write(header + data + b"\0" * pad)
        self._offset += _TAR_BLOCK + len(data) + pad

    def close(self) -> None:
        end = self._offset + 2 * _TAR_BLOCK
        self._fh.write(b"\0" * (2 * _TAR_BLOCK + (-end % _TAR_RECORD)))
        self._fh.close()


def _write_samples(samples: Iterable[tuple[int, dict]], split: str, num_classes: int, out_dir: Path,
                   shard_size: int) -> tuple[list[ShardEntry], list[int]]:
    """Tar-writing half of the writer: encoded samples in order → ``<split>-NNNNNN.tar`` files."""
    entries: list[ShardEntry] = []
    class_counts = [0] * num_classes
    writer: TarShardWriter | None = None
    path: Path | None = None
    in_shard = 0

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            entries.append(ShardEntry(file=path.name, count=in_shard, sha256=sha256_file(path)))
            writer = None

    for cls, sample in samples:
        if writer is None or in_shard == shard_size:
            close()
            path = out_dir / f"{split}-{len(entries):06d}.tar"
            writer = TarShardWriter(path)
            in_shard = 0
        writer.write(sample)
        class_counts[cls] += 1
        in_shard += 1
    close()
    return entries, class_counts


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
    return write_split_shards_parallel(records, split, labels, out_dir, shard_size, pool=None)


def write_split_shards_parallel(
    records: Iterable[FaceRecord],
    split: str,
    labels: EmotionLabels,
    out_dir: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    pool: "multiprocessing.pool.Pool | None" = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[ShardEntry], list[int]]:
    """``write_split_shards`` with PNG encoding in ``pool`` (order kept by ``imap``, so bytes are identical);
    ``progress(1)`` is called per sample written."""
    jobs = ((record, cls, index) for index, (record, cls) in enumerate(_labelled(records, labels)))
    encoded = pool.imap(_encode_job, jobs, chunksize=_ENCODE_CHUNK) if pool is not None else map(_encode_job, jobs)

    def counted() -> Iterator[tuple[int, dict]]:
        for item in encoded:
            yield item
            if progress is not None:
                progress(1)

    return _write_samples(counted(), split, labels.num_classes, Path(out_dir), shard_size)


# ------------------------------------------------------------------------------------- shard tool


@dataclass
class ShardOptions:
    """Everything a shard run depends on besides the input (CLI flags one to one)."""

    keep_disgust: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE
    drop_duplicates: bool = False
    drop_leaks: bool = False
    drop_blank: bool = False
    force: bool = False
    workers: int = field(default_factory=lambda: min(os.cpu_count() or 1, 8))
    progress: bool = True


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal (CI logs, tests).
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None if enabled else True,
                dynamic_ncols=True, leave=False)


def _owned(entry: Path) -> bool:
    """What a shard folder holds: ``manifest.json`` and tar files (anything else is not the tool's)."""
    return entry.name == MANIFEST_NAME or (entry.suffix == ".tar" and entry.is_file())


def _read_records(src: "FerSource", map_fn: Callable,
                  progress: bool) -> tuple[list[FaceRecord], str, "ReadReport"]:
    """All records of a FER2013 copy, its description and the reader's report."""
    records = []
    with _progress(None, f"reading {src.path.name}", progress) as bar:
        for record in src.records(map_fn):
            records.append(record)
            bar.update(1)
    return records, src.description, src.report


def _synthetic_records(n: int, seed: int, labels: EmotionLabels) -> tuple[list[FaceRecord], str, "ReadReport"]:
    from bicogan_dist.data.readers import ReadReport
    from bicogan_dist.data.synthetic import synthetic_records

    records = synthetic_records(n, seed=seed, labels=labels)
    return records, f"synthetic (n={n}, seed={seed})", ReadReport("synthetic", ["built-in"], records=len(records))


@contextmanager
def _worker_pool(workers: int) -> Iterator["multiprocessing.pool.Pool | None"]:
    """A spawn pool (no fork: safe with threads, same on every OS), or None for serial work."""
    if workers <= 1:
        yield None
        return
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def build_shards(source: str | Path | None, out: str | Path, options: ShardOptions | None = None, *,
                 synthetic: int | None = None, seed: int = 0,
                 log: Callable[[str], None] = print) -> ShardManifest:
    """Read, check, filter and shard one FER2013 copy (or the synthetic set) into ``out``; returns the manifest.

    Raises ``DataFormatError`` for bad input and ``atomic_dir.OutputExistsError`` for an occupied ``out``;
    in both cases nothing is written. One worker pool (when the input is big enough to pay for
    it) encodes the PNGs (and decodes image-folder files); results come back in input order.
    """
    from bicogan_dist.data.readers import open_source

    opts = options or ShardOptions()
    if opts.shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {opts.shard_size}")
    if (source is None) == (synthetic is None):
        raise ValueError("give exactly one of a SOURCE path and --synthetic N")
    out = Path(os.path.abspath(out))  # absolute, so "." or "x/.." still have a name and a parent for the swap
    labels = EmotionLabels.make(opts.keep_disgust)
    with atomic_output(out, force=opts.force, what="shards", owned=_owned, log=log) as tmp:
        src = open_source(source) if synthetic is None else None
        big = src.input_bytes >= _POOL_MIN_BYTES if src is not None else synthetic >= _POOL_MIN_IMAGES
        with _worker_pool(opts.workers if big else 1) as pool:
            if src is None:
                records, description, read_report = _synthetic_records(synthetic, seed, labels)
            else:
                # Workers pay off for decoding images, not for CSV rows: shipping a row to a worker and the array
                # back costs about as much CPU as parsing it (measured), so CSVs are parsed here.
                parallel_read = pool is not None and src.layout == "image folder"
                map_fn = partial(pool.imap, chunksize=_READ_CHUNK) if parallel_read else map
                records, description, read_report = _read_records(src, map_fn, opts.progress)
            manifest = _write_output(records, description, read_report, labels, tmp, opts, pool, log)
    for line in _summary_lines(manifest, out):
        log(line)
    return manifest


def _write_output(records: list[FaceRecord], description: str, read_report: "ReadReport", labels: EmotionLabels,
                  tmp: Path, opts: ShardOptions, pool: "multiprocessing.pool.Pool | None",
                  log: Callable[[str], None]) -> ShardManifest:
    """Quality report, drops, shards and manifest into the temporary folder ``tmp`` (swapped in by the caller)."""
    from bicogan_dist.data.quality import analyse, drop_decisions

    for line in read_report.lines():
        log(line)
    analysis = analyse(records)
    log(analysis.report.table())
    decisions = drop_decisions(records, analysis, drop_disgust=not opts.keep_disgust,
                               drop_duplicates=opts.drop_duplicates, drop_leaks=opts.drop_leaks,
                               drop_blank=opts.drop_blank)
    by_split: dict[str, list[FaceRecord]] = {}
    for i, record in enumerate(records):
        if i not in decisions:
            by_split.setdefault(record.split, []).append(record)
    split_order = [s for s in SPLITS if s in by_split] + sorted(s for s in by_split if s not in SPLITS)
    quality = analysis.report.to_dict()
    quality["reader"] = read_report.to_dict()

    splits: dict[str, SplitInfo] = {}
    with _progress(sum(len(v) for v in by_split.values()), "writing shards", opts.progress) as bar:
        for split in split_order:
            entries, class_counts = write_split_shards_parallel(
                by_split[split], split, labels, tmp, opts.shard_size, pool, bar.update)
            splits[split] = SplitInfo(count=len(by_split[split]), class_counts=class_counts, shards=entries)
    manifest = ShardManifest(label_names=list(labels.names), splits=splits, source=description,
                             image_size=IMAGE_SIZE, quality=quality,
                             dropped=_dropped_counts(decisions, opts, read_report))
    manifest.save(tmp)
    return manifest


def _dropped_counts(decisions: dict[int, str], opts: ShardOptions, read_report: "ReadReport") -> dict[str, int]:
    """Counts per reason, listing every reason that was active (0 included), so the manifest says what was checked."""
    from bicogan_dist.data.quality import DROP_REASONS

    active = {"disgust": not opts.keep_disgust, "blank": opts.drop_blank, "conflicting_labels": opts.drop_duplicates,
              "duplicates": opts.drop_duplicates, "leaks": opts.drop_leaks}
    counts = {reason: 0 for reason in DROP_REASONS if active[reason]}
    for reason in decisions.values():
        counts[reason] += 1
    if read_report.skipped_unlabelled:
        counts["unlabelled"] = read_report.skipped_unlabelled
    return counts


def _summary_lines(manifest: ShardManifest, out: Path) -> list[str]:
    names = manifest.label_names
    width = max(12, *(len(n) for n in names))
    lines = ["", "dropped: " + (", ".join(f"{k} {v:,}" for k, v in manifest.dropped.items()) or "nothing"), ""]
    lines.append(f"{'split':<12} {'images':>7} {'shards':>6}  " + " ".join(f"{n:>{min(width, 8)}}" for n in names))
    for split, info in manifest.splits.items():
        lines.append(f"{split:<12} {info.count:>7,} {len(info.shards):>6}  "
                     + " ".join(f"{c:>{min(width, 8)},}" for c in info.class_counts))
    lines.append(f"{'all':<12} {manifest.image_count:>7,}")
    lines.append(f"wrote {sum(len(s.shards) for s in manifest.splits.values())} shards and {MANIFEST_NAME} to {out}")
    return lines


#: Where ``--upload-to`` can point: object stores (read back through ``pipe:``) and web servers.
UPLOAD_SCHEMES = ("s3://", "gs://", "http://", "https://")


def upload_commands(out: str | Path, dest: str) -> list[str]:
    """Shell commands that copy the shard folder ``out`` to ``dest`` (manifest last, so a reader never sees a
    manifest naming shards not yet there), then the ``data.shards`` value that reads it back.

    Printed, not run: credentials, tools and the web server's folder are the user's.
    """
    import shlex

    src = shlex.quote(str(Path(out)) + "/")
    manifest = shlex.quote(str(Path(out) / MANIFEST_NAME))
    base = dest.rstrip("/")
    if base.startswith("s3://"):
        cmds = [f"aws s3 sync {src} {base}/ --exclude {MANIFEST_NAME}", f"aws s3 cp {manifest} {base}/{MANIFEST_NAME}"]
        shards = f"pipe:aws s3 cp {base}/{{}} -"
    elif base.startswith("gs://"):
        cmds = [f"gsutil -m rsync -x '^{MANIFEST_NAME}$' {src} {base}/", f"gsutil cp {manifest} {base}/{MANIFEST_NAME}"]
        shards = f"pipe:gsutil cat {base}/{{}}"
    elif base.startswith(("http://", "https://")):
        cmds = [f"rsync -a --exclude {MANIFEST_NAME} {src} SERVER:/FOLDER/SERVED/AS/{base.split('://', 1)[1]}/",
                f"rsync -a {manifest} SERVER:/FOLDER/SERVED/AS/{base.split('://', 1)[1]}/"]
        shards = base
    else:
        raise ValueError(f"--upload-to {dest!r}: expected one of {', '.join(UPLOAD_SCHEMES)}")
    return ["# upload (manifest last):", *cmds, "# then train with:", f"data.shards='{shards}'"]
