"""Write labelled faces as webdataset tar shards plus ``manifest.json``; the shard tool's library side.

``python tools/shard_fer2013.py SOURCE --out DIR`` (or the ``bicogan-shard`` console script)
runs :func:`main`: read any supported FER2013 layout (``readers``), report data quality over
every image read (``quality``), drop what the options ask for, write per-split shards and the
manifest into a temporary sibling folder ``DIR.tmp-XXXXXXXX`` and move it into place only when
everything succeeded, so a failed run leaves nothing behind and never mixes old and new shards.

Same input and options → byte-identical shards and manifest, whatever the number of workers.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from bicogan_dist.atomic_dir import replace_dir, temp_sibling
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


class OutputExistsError(RuntimeError):
    """The output folder already holds shards (or other files) and the run may not replace it."""


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


def _check_output(out: Path, force: bool) -> None:
    """Refuse to touch a folder that holds shards (unless force) or anything that is not ours."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    if not out.is_dir():
        return
    entries = [p for p in out.iterdir()]
    ours = [p for p in entries if p.name == MANIFEST_NAME or (p.suffix == ".tar" and p.is_file())]
    foreign = [p.name for p in entries if p not in ours]
    if foreign and ours:
        raise OutputExistsError(f"{out} holds shards and also other files ({', '.join(sorted(foreign)[:5])}); "
                                "refusing to replace it, even with --force: move those files or pick another --out")
    if foreign:
        raise OutputExistsError(f"{out} is not empty and holds no shards ({', '.join(sorted(foreign)[:5])}); "
                                "pick a new or empty folder for --out")
    if ours and not force:
        raise OutputExistsError(f"{out} already holds shards ({len(ours)} shard/manifest files); "
                                "pass --force to replace them all, or pick another --out")


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

    Raises ``DataFormatError`` for bad input and ``OutputExistsError`` for an occupied ``out``;
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
    _check_output(out, opts.force)
    labels = EmotionLabels.make(opts.keep_disgust)
    src = open_source(source) if synthetic is None else None
    big = src.input_bytes >= _POOL_MIN_BYTES if src is not None else synthetic >= _POOL_MIN_IMAGES
    with _worker_pool(opts.workers if big else 1) as pool:
        if src is None:
            records, description, read_report = _synthetic_records(synthetic, seed, labels)
        else:
            # Workers pay off for decoding images, not for CSV rows: shipping a row to a worker and the
            # array back costs about as much CPU as parsing it (measured), so CSVs are parsed here.
            parallel_read = pool is not None and src.layout == "image folder"
            map_fn = partial(pool.imap, chunksize=_READ_CHUNK) if parallel_read else map
            records, description, read_report = _read_records(src, map_fn, opts.progress)
        manifest = _write_output(records, description, read_report, labels, out, opts, pool, log)
    for line in _summary_lines(manifest, out):
        log(line)
    return manifest


def _write_output(records: list[FaceRecord], description: str, read_report: "ReadReport", labels: EmotionLabels,
                  out: Path,
                  opts: ShardOptions, pool: "multiprocessing.pool.Pool | None",
                  log: Callable[[str], None]) -> ShardManifest:
    """Quality report, drops, shards and manifest into a temporary sibling folder, then swapped into ``out``."""
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

    tmp = temp_sibling(out)
    try:
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
        _check_output(out, opts.force)  # again: another run may have written there meanwhile
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="shard_fer2013",
        description="Turn a FER2013 copy (Kaggle fer2013.csv[.gz], icml_face_data.csv, torchvision's fer2013/ "
                    "folder, or an image folder train|test/<emotion>/*.jpg) into webdataset shards per split "
                    "plus manifest.json, with a data-quality report.")
    p.add_argument("source", nargs="?", help="FER2013 file or folder (omit with --synthetic)")
    p.add_argument("--out", required=True, help="output folder (created; written atomically)")
    p.add_argument("--keep-disgust", action="store_true", help="keep disgust: seven classes instead of six")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard (default 4000)")
    p.add_argument("--drop-duplicates", action="store_true",
                   help="keep one image per exact-duplicate group (a Training one if any); drop groups whose "
                        "labels conflict entirely")
    p.add_argument("--drop-leaks", action="store_true", help="drop test-split images whose pixels occur in Training")
    p.add_argument("--drop-blank", action="store_true", help="drop nearly blank images (pixel std < 5)")
    p.add_argument("--synthetic", type=int, metavar="N", help="shard N built-in procedural faces instead of SOURCE")
    p.add_argument("--seed", type=int, default=0, help="seed of --synthetic (default 0)")
    p.add_argument("--force", action="store_true", help="replace shards already in --out")
    p.add_argument("--workers", type=int, default=None,
                   help="processes encoding PNGs and decoding image files (default: CPU count, at most 8; "
                        "1 = no extra processes; small inputs never start any)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if (args.source is None) == (args.synthetic is None):
        p.error("give exactly one of SOURCE and --synthetic N")
    if args.shard_size < 1:
        p.error("--shard-size must be at least 1")
    if args.synthetic is not None and args.synthetic < 1:
        p.error("--synthetic N needs N >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (tools/shard_fer2013.py, ``bicogan-shard``): 0 on success, 2 with ``error: ...`` on bad input
    or an occupied --out, 1 on an OS error. Uses worker processes: call it under ``if __name__ == "__main__"``."""
    from bicogan_dist.data.readers import DataFormatError

    args = parse_args(argv)
    opts = ShardOptions(keep_disgust=args.keep_disgust, shard_size=args.shard_size,
                        drop_duplicates=args.drop_duplicates, drop_leaks=args.drop_leaks,
                        drop_blank=args.drop_blank, force=args.force, progress=not args.no_progress)
    if args.workers is not None:
        opts.workers = max(1, args.workers)
    try:
        build_shards(args.source, args.out, opts, synthetic=args.synthetic, seed=args.seed)
    except (DataFormatError, OutputExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, no permission: not the input's fault, but no traceback either
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
