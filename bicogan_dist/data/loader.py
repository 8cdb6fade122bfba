"""Batches of real faces for DDP training: in memory (the fast path) or streamed from webdataset shards.

``build_loader(cfg, rank=, world_size=, device=, seed=)`` returns a :class:`BatchSource`. Both
implementations promise the trainer the same things, because DDP and exact resume depend on them:

* ``batches_per_epoch = count // (world_size * batch_size)`` comes from the manifest, so it is the
  same on every rank (unequal batch counts hang DDP at the end of an epoch);
* ``epoch(e, start_batch=k)`` yields exactly ``batches_per_epoch - k`` batches of
  ``(uint8 images (B, 1, 48, 48), int64 labels (B,))`` on ``device``, and they are a function of
  ``(seed, e, rank, world_size)`` only: a resumed run asking for epoch ``e`` from batch ``k`` gets
  exactly the tail that the straight run got;
* within an epoch the ranks see disjoint samples; without resampling every sample is seen once
  when ``count`` is divisible by ``world_size * batch_size`` (otherwise fewer than
  ``world_size * batch_size`` are left out).

**memory** (default): every rank decodes the split once into one uint8 tensor on ``device``
(FER2013's Training split is ~65 MB, ~2 s to decode); each epoch is a permutation drawn from
``torch.Generator(epoch_seed(seed, e))``, identical on all ranks; global batch ``k`` is the slice
``perm[k*W*B:(k+1)*W*B]`` and rank ``r`` takes its ``r``-th block of ``B``. Batches are gathered by
index (on the device; numpy's take on CPU): no per-sample Python.

**stream**: a webdataset ``DataPipeline`` per DataLoader worker. Splitting is per *sample*, not per
shard (FER2013 splits have 1-8 shards, fewer than ranks x workers, and shard-level splitting gives
unequal counts): each epoch the shard order and an owner for every sample position are drawn from
``epoch_seed(seed, e)`` (the same on all ranks): position ``j`` belongs to rank
``perm[j] % world_size``, so every rank owns ``count // W`` or one more samples, a fresh random
subset each epoch; a rank's samples are dealt round-robin to its workers. At construction each
shard's tar headers are scanned once into a :class:`ShardIndex` (PNG byte ranges and labels; this
is also the sample-count check); workers then read only the PNGs they keep from the memory-mapped
tars (in epoch shard order) instead of each re-reading every shard (webdataset's ``tarfile``
reader costs ~15x more per sample than this scan). A shuffle buffer of ``shuffle_buffer`` sample
references, seeded by ``(seed, e, rank, worker)``, runs before decoding; workers hand over decoded
chunks and the main process cuts them into batches of exactly ``batch_size`` and stops after
``batches_per_epoch``. DataLoader returns worker chunks in a fixed round-robin order, so batches
are deterministic. With ``resampled`` the epoch's shard sequence is drawn with replacement until it
holds at least ``count`` samples: same epoch length, samples may repeat.

Checks at construction, all ``ShardError`` naming the file: missing folder or manifest, missing
split, missing shard, sha256 mismatch (``verify=True``), a malformed or truncated tar, a sample
without png/cls or with a class outside the label map, and a shard whose real sample count differs
from the manifest (both modes scan the headers before anything else, ~0.05 s a 4,000-sample
shard). A stream worker also refuses a shard whose size or mtime changed since that scan.

Augmentation: ``augmenter(images, seed)`` is applied per batch with ``seed = batch_seed(seed, e, k,
rank)``. In stream mode an augmenter whose ``backend`` is ``"imgaug"`` (CPU, numpy) runs inside the
workers instead, per chunk, seeded ``chunk_seed(seed, e, rank, worker, chunk)``: parallel and still
deterministic.

PNG decoding uses OpenCV when it imports (installed with imgaug; ~2.5x faster than PIL here and it
releases the GIL, so memory mode decodes with threads) and PIL otherwise; both give identical pixels.
"""
from __future__ import annotations

import itertools
import math
import mmap
import os
import random
import sys
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from bicogan_dist.config import ConfigError
from bicogan_dist.data.manifest import ShardError, ShardManifest, SplitInfo
from bicogan_dist.data.records import IMAGE_SIZE

if TYPE_CHECKING:
    from bicogan_dist.data.augment import Augmenter

__all__ = [
    "DataConfig", "BatchSource", "InMemoryBatches", "StreamingBatches", "build_loader", "load_split",
    "batch_seed", "chunk_seed", "epoch_seed", "mix_seed", "count_tar_samples", "index_shard", "ShardIndex",
]

#: Samples a stream worker decodes and hands over at once (at least one batch): DataLoader's
#: per-item cost (shared-memory tensors, pickling) is ~15% of a sample's CPU time at 128 and
#: ~2% at 512, and the first batch still comes within ~0.1 s.
_CHUNK = 512


# ----------------------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    """Where the training faces come from and how they are batched (``data:`` in experiment YAML)."""

    shards: str = "data_shards/synthetic"  # folder with manifest.json
    split: str = "Training"
    mode: Literal["memory", "stream"] = "memory"
    batch_size: int = 64  # per process
    num_workers: int = 2  # stream mode: DataLoader worker processes per rank
    shuffle_buffer: int = 2000  # stream mode: raw samples held by each worker's shuffle buffer
    resampled: bool = False  # stream: shards drawn with replacement, fixed epoch length
    verify: bool = False  # check sha256 of every shard against the manifest at start

    def __post_init__(self) -> None:
        if not str(self.shards).strip():
            raise ConfigError("data.shards must name a shard folder (one holding manifest.json)")
        if not str(self.split).strip():
            raise ConfigError("data.split must name a split, for example Training")
        if self.mode not in ("memory", "stream"):
            raise ConfigError(f"data.mode: {self.mode!r} is not one of ['memory', 'stream']")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1 (1 = no shuffling), got {self.shuffle_buffer}")


# ------------------------------------------------------------------------------------------ seeds

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A well-mixed seed in [0, 2**63) from integers; stable across runs, processes and Python versions.

    (Python's ``hash`` of a tuple is stable too, but it is 64-bit signed and not mixed: neighbouring
    epochs would give neighbouring seeds.)
    """
    h = 0x5EED
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of everything that must agree across ranks in an epoch (permutation, shard order, owners)."""
    return mix_seed(seed, epoch, 0xE70C)


def batch_seed(seed: int, epoch: int, batch_index: int, rank: int) -> int:
    """Seed of the augmenter for batch ``batch_index`` of ``epoch`` on ``rank``: a resumed run repeats it."""
    return mix_seed(seed, epoch, batch_index, rank, 0xBA7C)


def chunk_seed(seed: int, epoch: int, rank: int, worker: int, chunk_index: int) -> int:
    """Seed of the augmenter for a stream worker's ``chunk_index``-th chunk (imgaug in workers)."""
    return mix_seed(seed, epoch, rank, worker, chunk_index, 0xC4C7)


# ------------------------------------------------------------------------------------ shard index


@dataclass
class ShardIndex:
    """Where every sample of one shard lies: PNG byte ranges and class indices, from one header scan.

    Why an index: the scan is needed anyway to check the shard's real sample count against the
    manifest, and with it stream workers read only the PNGs they keep (random access into the
    memory-mapped tar) instead of each of them re-reading every shard.
    """

    path: str
    size: int  # file size and mtime at scan time: a stream worker refuses a shard changed since
    mtime_ns: int
    keys: list[str]
    spans: np.ndarray  # (n, 2) int64: [start, end) of each sample's PNG in the file
    labels: np.ndarray  # (n,) int64 class indices

    @property
    def count(self) -> int:
        return len(self.keys)

    def where(self, i: int) -> str:
        return f"shard {self.path}: sample {self.keys[i]!r}"


def _open_buffer(path: str | Path) -> Any:
    """The shard's bytes, memory-mapped: no copy, and the page cache is shared by all processes."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return b""
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


def _bad_tar(path: Path, what: str) -> ShardError:
    return ShardError(f"shard {path} is not a valid tar file ({what}); re-shard or restore it")


def index_shard(path: str | Path) -> ShardIndex:
    """Scan a shard's tar headers into a :class:`ShardIndex` (~2 us a member; ``tarfile`` needs ~30).

    Reads what Python's ``tarfile`` writes (ustar, with GNU long names or pax headers; webdataset's
    TarWriter uses it) and groups members into samples by webdataset's rule (key = file name up to
    its first dot). Raises ShardError naming the shard for a malformed or truncated tar, a sample
    without ``png`` or ``cls``, or a ``cls`` that is not an integer.
    """
    path = Path(path)
    st = path.stat()
    buf = _open_buffer(path)
    n = len(buf)
    keys: list[str] = []
    spans: list[tuple[int, int]] = []
    labels: list[int] = []
    cur: bytes | None = None
    png: tuple[int, int] | None = None
    cls: bytes | None = None

    def flush() -> None:
        key = cur.decode("utf-8", "replace")
        if png is None or cls is None:
            raise ShardError(f"shard {path}: sample {key!r} has no {'png' if png is None else 'cls'} file")
        try:
            labels.append(int(cls))
        except ValueError:
            raise ShardError(f"shard {path}: sample {key!r} has a non-integer cls {cls!r}") from None
        keys.append(key)
        spans.append(png)

    off = 0
    long_name: bytes | None = None
    while off + 512 <= n:
        if buf[off] == 0:  # end-of-archive blocks
            break
        if buf[off + 257:off + 262] != b"ustar":
            raise _bad_tar(path, f"no ustar header at byte {off}")
        field = buf[off + 124:off + 136]
        if field[0] & 0x80:  # GNU base-256 size
            size = int.from_bytes(field[1:], "big")
        else:
            try:
                size = int(field.rstrip(b"\0 ") or b"0", 8)
            except ValueError:
                raise _bad_tar(path, f"bad size field {field!r} at byte {off}") from None
        kind = buf[off + 156]
        start = off + 512
        end = start + size
        if end > n:
            raise ShardError(f"shard {path} is truncated: the member at byte {off} needs {size} bytes")
        header, off = off, start + ((size + 511) & ~511)
        if kind == 0x4C:  # 'L': GNU long name of the next member
            long_name = buf[start:end].split(b"\0", 1)[0]
            continue
        if kind == 0x78:  # 'x': pax header of the next member
            for record in buf[start:end].split(b"\n"):
                _, _, kv = record.partition(b" ")
                if kv.startswith(b"path="):
                    long_name = kv[5:]
            continue
        if kind not in (0x30, 0x00, 0x37):  # directories, links, global headers: no sample data
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            stop = buf.find(b"\0", header, header + 100)
            name = buf[header:stop if stop >= 0 else header + 100]
            if buf[header + 345] != 0:
                prefix = buf[header + 345:header + 500].split(b"\0", 1)[0]
                name = prefix + b"/" + name
        slash = name.rfind(b"/") + 1
        dot = name.find(b".", slash)
        if dot < 0 or name.startswith(b"__", slash):  # no extension, or __meta__-style files
            continue
        key = name[:dot]
        if key != cur:
            if cur is not None:
                flush()
            cur, png, cls = key, None, None
        ext = name[dot + 1:]
        if ext == b"png":
            png = (start, end)
        elif ext == b"cls":
            cls = buf[start:end]
    else:
        if off < n and any(buf[off:n]):
            raise ShardError(f"shard {path} is truncated: partial tar header at byte {off}")
    if cur is not None:
        flush()
    return ShardIndex(str(path), st.st_size, st.st_mtime_ns, keys,
                      np.asarray(spans, dtype=np.int64).reshape(-1, 2), np.asarray(labels, dtype=np.int64))


def count_tar_samples(path: str | Path) -> int:
    """Number of samples in a shard, from its tar headers."""
    return index_shard(path).count


# -------------------------------------------------------------------------------------- decoding


def _png_decoder() -> Callable[[Any, int, int], np.ndarray]:
    """``decode(buffer, start, end)`` → (48, 48) uint8; OpenCV when available (faster, GIL-free), else PIL."""
    from bicogan_dist.data.shard_format import decode_png

    def pil(buf: Any, start: int, end: int) -> np.ndarray:
        return decode_png(bytes(buf[start:end]))

    try:
        import cv2  # noqa: PLC0415 - optional accelerator (installed with imgaug)
    except Exception:  # noqa: BLE001 - any import problem means: use PIL
        return pil
    imdecode, flag, u8 = cv2.imdecode, cv2.IMREAD_UNCHANGED, np.uint8

    def decode(buf: Any, start: int, end: int) -> np.ndarray:
        arr = imdecode(np.frombuffer(buf, u8, end - start, start), flag)
        if arr is None or arr.dtype != u8 or arr.shape != (IMAGE_SIZE, IMAGE_SIZE):
            return pil(buf, start, end)  # colour, 16-bit, odd sizes, junk: PIL converts or raises clearly
        return arr

    return decode


def _decode_rows(out: np.ndarray, items: Sequence[tuple[int, int]], indexes: Sequence[ShardIndex],
                 buffers: Callable[[int], Any], decode: Callable[[Any, int, int], np.ndarray]) -> None:
    """Decode samples ``(shard, i)`` into ``out[0..]``; a bad PNG raises ShardError naming shard and key."""
    for row, (s, i) in enumerate(items):
        index = indexes[s]
        start, end = index.spans[i]
        try:
            out[row] = decode(buffers(s), int(start), int(end))
        except Exception as exc:  # noqa: BLE001 - re-raised with the sample named
            raise ShardError(f"{index.where(i)}: cannot decode its PNG ({exc})") from exc


# ---------------------------------------------------------------------------------- manifest checks


def _open_split(cfg: DataConfig, limit: int | None = None) -> tuple[ShardManifest, SplitInfo, list[ShardIndex]]:
    """Manifest checks + the index of each shard (only of those holding the first ``limit`` samples)."""
    folder = Path(cfg.shards)
    if not folder.is_dir():
        raise ShardError(f"shard folder {folder} does not exist; make shards with tools/shard_fer2013.py "
                         f"(or set data.shards)")
    manifest = ShardManifest.load(folder)
    info = manifest.split(cfg.split)
    paths = manifest.shard_paths(folder, cfg.split, verify=cfg.verify)
    n_cls = len(manifest.label_names)
    indexes: list[ShardIndex] = []
    have = 0
    for path, entry in zip(paths, info.shards):
        if limit is not None and have >= limit:
            break
        index = index_shard(path)
        if index.count != entry.count:
            raise ShardError(f"shard {path} holds {index.count} samples but the manifest says {entry.count}; "
                             f"it was changed after sharding: re-shard or restore it")
        bad = np.flatnonzero((index.labels < 0) | (index.labels >= n_cls))
        if len(bad):
            i = int(bad[0])
            raise ShardError(f"{index.where(i)} has class {int(index.labels[i])}, outside the manifest's "
                             f"{n_cls} classes {manifest.label_names}")
        indexes.append(index)
        have += index.count
    return manifest, info, indexes


def _per_epoch(count: int, world_size: int, batch_size: int, split: str) -> int:
    n = count // (world_size * batch_size)
    if n == 0:
        raise ConfigError(f"data.batch_size: split {split} has {count} samples, fewer than world_size x batch_size "
                          f"= {world_size} x {batch_size}, so not one batch per process; lower data.batch_size "
                          f"or use fewer processes")
    return n


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")


# ------------------------------------------------------------------------------------ batch sources


class BatchSource(ABC):
    """What the trainer iterates: a fixed number of equal batches per epoch, reproducible per epoch."""

    label_names: tuple[str, ...]
    num_samples: int  # samples in the split (manifest count)
    batches_per_epoch: int  # identical on every rank
    batch_size: int
    rank: int
    world_size: int

    @abstractmethod
    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start_batch .. batches_per_epoch - 1`` of ``epoch``: (uint8 (B,1,48,48), int64 (B,))."""

    def _check_start(self, start_batch: int) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is outside 0..{self.batches_per_epoch}")


def _load(cfg: DataConfig, limit: int | None = None, threads: int | None = None,
          before_decode: Callable[[SplitInfo], Any] | None = None
          ) -> tuple[ShardManifest, SplitInfo, np.ndarray, np.ndarray]:
    """Checks + decode of the split's first ``limit`` (default all) samples: (manifest, info, images, labels).

    ``before_decode(info)`` runs after the manifest checks, so its errors come before seconds of decoding.
    """
    manifest, info, indexes = _open_split(cfg, limit)
    if before_decode is not None:
        before_decode(info)
    total = sum(ix.count for ix in indexes)
    n = total if limit is None else max(0, min(int(limit), total))
    items = [(s, i) for s, ix in enumerate(indexes) for i in range(ix.count)][:n]
    labels = np.concatenate([ix.labels for ix in indexes] or [np.empty(0, np.int64)])[:n]
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    buffers = [_open_buffer(ix.path) for ix in indexes]
    decode = _png_decoder()
    n_threads = threads if threads is not None else min(4, os.cpu_count() or 1)
    step = max(256, math.ceil(n / max(1, n_threads * 4)))
    ranges = [(a, min(a + step, n)) for a in range(0, n, step)]

    def work(r: tuple[int, int]) -> None:
        _decode_rows(images[r[0]:r[1]], items[r[0]:r[1]], indexes, buffers.__getitem__, decode)

    if n_threads > 1 and len(ranges) > 1:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(work, ranges))
    else:
        for r in ranges:
            work(r)
    return manifest, info, images, labels


def load_split(folder: str | Path, split: str, device: torch.device | str = "cpu", limit: int | None = None,
               verify: bool = False, threads: int | None = None) -> tuple[Tensor, Tensor]:
    """All (or the first ``limit``) samples of a split in shard order: (uint8 (N,1,48,48), int64 (N,)).

    Runs the loader's manifest checks (the real sample counts of the shards it reads included).
    Decoding runs on ``threads`` threads (default: up to 4; OpenCV releases the GIL).
    """
    _, _, images, labels = _load(DataConfig(shards=str(folder), split=split, verify=verify), limit, threads)
    device = torch.device(device)
    return torch.from_numpy(images).unsqueeze(1).to(device), torch.from_numpy(labels).to(device)


class InMemoryBatches(BatchSource):
    """The whole split decoded once into one tensor on ``device``; epochs are index permutations."""

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, device: torch.device | str, seed: int,
                 augmenter: "Augmenter | Callable[[Tensor, int], Tensor] | None" = None) -> None:
        _check_rank(rank, world_size)
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, int(seed)
        self.device = torch.device(device)
        self.augmenter = augmenter
        self.batch_size = cfg.batch_size
        t0 = time.perf_counter()
        manifest, info, images, labels = _load(
            cfg, before_decode=lambda info: _per_epoch(info.count, world_size, cfg.batch_size, cfg.split))
        self.label_names = tuple(manifest.label_names)
        self.num_samples = info.count
        self.batches_per_epoch = _per_epoch(info.count, world_size, cfg.batch_size, cfg.split)
        self.images = torch.from_numpy(images).unsqueeze(1).to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device)
        self.load_seconds = time.perf_counter() - t0  # reported by tools/bench_data.py

    def indices(self, epoch: int) -> Tensor:
        """(batches_per_epoch, B) sample indices of this rank in ``epoch`` (CPU; same draw on every rank)."""
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        perm = torch.randperm(self.num_samples, generator=gen)
        used = perm[: self.batches_per_epoch * self.world_size * self.batch_size]
        return used.view(self.batches_per_epoch, self.world_size, self.batch_size)[:, self.rank]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        self._check_start(start_batch)
        return self._epoch(epoch, start_batch)

    def _epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self.indices(epoch)[start_batch:].contiguous()
        # On CPU numpy's single-threaded take: torch's gather runs on an OpenMP team, which on busy
        # (or oversubscribed DDP) machines costs up to 20x more time than the copy itself.
        on_cpu = self.device.type == "cpu"
        if on_cpu:
            images, labels, idx_np = self.images.numpy(), self.labels.numpy(), idx.numpy()
        else:
            idx = idx.to(self.device, non_blocking=True)
        for j, k in enumerate(range(start_batch, self.batches_per_epoch)):
            if on_cpu:
                x, y = torch.from_numpy(images.take(idx_np[j], axis=0)), torch.from_numpy(labels.take(idx_np[j]))
            else:
                x, y = self.images.index_select(0, idx[j]), self.labels.index_select(0, idx[j])
            if self.augmenter is not None:
                x = self.augmenter(x, batch_seed(self.seed, epoch, k, self.rank))
            yield x, y


@dataclass
class _EpochPlan:
    """What one rank reads in one stream epoch: per worker, its samples in reading order."""

    keep: list[np.ndarray]  # per worker: (n, 5) int64 rows (shard number, sample in shard, png start, end, label)


def _stream_plan(indexes: Sequence[ShardIndex], *, resampled: bool, seed: int, epoch: int, rank: int,
                 world_size: int, workers: int) -> _EpochPlan:
    """Shard order and sample owners of an epoch, drawn identically on all ranks (module doc)."""
    counts = [ix.count for ix in indexes]
    rng = np.random.default_rng(epoch_seed(seed, epoch))
    total = sum(counts)
    if resampled:  # shards with replacement until the epoch holds at least ``total`` samples
        order: list[int] = []
        have = 0
        while have < total:
            order.append(int(rng.integers(len(counts))))
            have += counts[order[-1]]
    else:
        order = [int(i) for i in rng.permutation(len(counts))]
    lengths = np.asarray([counts[i] for i in order], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    owner = rng.permutation(int(lengths.sum())) % world_size
    mine = np.flatnonzero(owner == rank)  # sorted epoch positions of this rank
    slot = np.searchsorted(starts, mine, side="right") - 1
    shard = np.asarray(order, dtype=np.int64)[slot]
    local = mine - starts[slot]
    # Everything a worker needs per sample, gathered here once (vectorised) rather than per sample there.
    base = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    spans = np.concatenate([ix.spans for ix in indexes]) if indexes else np.empty((0, 2), np.int64)
    labels = np.concatenate([ix.labels for ix in indexes]) if indexes else np.empty(0, np.int64)
    flat = base[shard] + local
    rows = np.column_stack([shard, local, spans[flat], labels[flat]])
    n_workers = max(1, workers)
    return _EpochPlan([rows[w::n_workers] for w in range(n_workers)])


class _StreamEpoch(torch.utils.data.IterableDataset):
    """One epoch of one rank as a webdataset pipeline; each DataLoader worker runs its own part."""

    def __init__(self, indexes: list[ShardIndex], plan: _EpochPlan, *, chunk: int, shuffle_buffer: int, seed: int,
                 epoch: int, rank: int, augmenter: Any = None) -> None:
        super().__init__()
        self.indexes, self.plan, self.chunk, self.shuffle_buffer = indexes, plan, chunk, shuffle_buffer
        self.seed, self.epoch, self.rank, self.augmenter = seed, epoch, rank, augmenter

    def _buffer(self, cache: dict[int, Any], s: int) -> Any:
        """The shard's memory map, opened once per worker, refused when the file changed since indexing."""
        buf = cache.get(s)
        if buf is None:
            index = self.indexes[s]
            st = os.stat(index.path)
            if (st.st_size, st.st_mtime_ns) != (index.size, index.mtime_ns):
                raise ShardError(f"shard {index.path} changed after the loader checked it (size or mtime); "
                                 f"shards must not be rewritten during training")
            buf = cache[s] = _open_buffer(index.path)
        return buf

    def _chunks(self, refs: Iterator[list[int]], worker: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Pipeline stage: shuffled sample rows → decoded chunks (uint8 (n,1,48,48), int64 (n,))."""
        decode = _png_decoder()
        cache: dict[int, Any] = {}
        index = 0
        while True:
            block = list(itertools.islice(refs, self.chunk))
            if not block:
                return
            images = np.empty((len(block), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
            for row, (s, i, start, end, _label) in enumerate(block):
                buf = cache.get(s)
                if buf is None:
                    buf = self._buffer(cache, s)
                try:
                    images[row] = decode(buf, start, end)
                except Exception as exc:  # noqa: BLE001 - re-raised with the sample named
                    raise ShardError(f"{self.indexes[s].where(i)}: cannot decode its PNG ({exc})") from exc
            x = torch.from_numpy(images).unsqueeze(1)
            y = torch.tensor([r[4] for r in block], dtype=torch.int64)
            if self.augmenter is not None:
                x = self.augmenter(x, chunk_seed(self.seed, self.epoch, self.rank, worker, index))
            index += 1
            yield x, y

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != len(self.plan.keep):
            raise RuntimeError(f"stream plan made for {len(self.plan.keep)} workers, DataLoader has {info.num_workers}")
        rows = self.plan.keep[worker]
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, worker, 0x5F1E))
        pipeline = wds.DataPipeline(
            lambda: iter(rows.tolist()),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng),
            lambda refs: self._chunks(refs, worker),
        )
        return _guarded(pipeline, worker) if info is not None else iter(pipeline)


@dataclass
class _WorkerFailure:
    """An exception of a stream worker, sent as data: a worker that raises makes DataLoader's
    shutdown wait 5 s per worker (torch's join timeout), and its wrapped message is noisier."""

    kind: type
    message: str


def _guarded(pipeline: Any, worker: int) -> Iterator[Any]:
    try:
        yield from pipeline
    except Exception as exc:  # noqa: BLE001 - re-raised in the main process
        import traceback

        message = str(exc) if isinstance(exc, ShardError) else \
            f"{exc}\n(in stream worker {worker}:\n{traceback.format_exc()})"
        yield _WorkerFailure(type(exc), message)


def _worker_init(_worker_id: int) -> None:
    """One torch thread per worker: the workers are the parallelism."""
    torch.set_num_threads(1)


def _opencv_fork_safe() -> None:
    """Make OpenCV single-threaded in a process about to fork DataLoader workers.

    OpenCV's thread pool does not survive fork: once the parent has run a parallel OpenCV call
    (imgaug's warps do), a forked worker that touches the pool can hang for ever in
    ``pthread_cond_destroy`` (seen here: the benchmark froze on its third stream epoch). With one
    thread OpenCV keeps no pool, and for 48x48 images its threads only cost time anyway.
    """
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


class StreamingBatches(BatchSource):
    """Batches streamed from the tar shards through webdataset + DataLoader workers (see module doc)."""

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, device: torch.device | str, seed: int,
                 augmenter: "Augmenter | Callable[[Tensor, int], Tensor] | None" = None) -> None:
        _check_rank(rank, world_size)
        manifest, info, self.indexes = _open_split(cfg)
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, int(seed)
        self.device = torch.device(device)
        self.label_names = tuple(manifest.label_names)
        self.num_samples = info.count
        self.batch_size = cfg.batch_size
        self.batches_per_epoch = _per_epoch(info.count, world_size, cfg.batch_size, cfg.split)
        in_workers = cfg.num_workers > 0 and getattr(augmenter, "backend", None) == "imgaug"
        self.worker_augmenter = augmenter if in_workers else None
        self.augmenter = None if in_workers else augmenter
        self.chunk = max(cfg.batch_size, _CHUNK)

    def plan(self, epoch: int) -> _EpochPlan:
        return _stream_plan(self.indexes, resampled=self.cfg.resampled, seed=self.seed, epoch=epoch, rank=self.rank,
                            world_size=self.world_size, workers=self.cfg.num_workers)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        self._check_start(start_batch)
        return self._epoch(epoch, start_batch)

    def _epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Rebatch worker chunks to exactly ``batch_size``; stop after ``batches_per_epoch``.

        Resuming at ``start_batch`` replays the epoch's stream and drops the first batches before
        they reach the device or the main-process augmenter (the workers still decode them: at most
        one epoch of decoding, once per resume).
        """
        if start_batch == self.batches_per_epoch:
            return
        dataset = _StreamEpoch(self.indexes, self.plan(epoch), chunk=self.chunk,
                               shuffle_buffer=self.cfg.shuffle_buffer, seed=self.seed, epoch=epoch, rank=self.rank,
                               augmenter=self.worker_augmenter)
        workers = self.cfg.num_workers
        if workers > 0:
            _opencv_fork_safe()
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False, worker_init_fn=_worker_init if workers > 0 else None,
            prefetch_factor=4 if workers > 0 else None)
        B = self.batch_size
        chunks = iter(loader)
        failure: _WorkerFailure | None = None
        try:
            pending: list[tuple[Tensor, Tensor]] = []
            have = 0
            k = 0
            for item in chunks:
                if isinstance(item, _WorkerFailure):
                    failure = item
                    break
                pending.append(item)
                have += item[0].shape[0]
                if have < B:
                    continue
                xs = torch.cat([p[0] for p in pending]) if len(pending) > 1 else pending[0][0]
                ys = torch.cat([p[1] for p in pending]) if len(pending) > 1 else pending[0][1]
                a = 0
                while have - a >= B:
                    if k >= start_batch:
                        yield self._finish(xs[a:a + B], ys[a:a + B], epoch, k)
                    k += 1
                    a += B
                    if k == self.batches_per_epoch:
                        return
                pending = [(xs[a:], ys[a:])] if a < have else []
                have -= a
            if failure is None:
                raise ShardError(f"split {self.cfg.split}: the stream ended after {k} of {self.batches_per_epoch} "
                                 f"batches on rank {self.rank}; the shards changed after the loader started")
        finally:
            del chunks  # shuts the workers down, also when the consumer stops early
        try:
            error = failure.kind(failure.message)
        except Exception:  # noqa: BLE001 - an exception type that takes other arguments
            error = RuntimeError(f"{failure.kind.__name__}: {failure.message}")
        raise error

    def _finish(self, x: Tensor, y: Tensor, epoch: int, k: int) -> tuple[Tensor, Tensor]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.augmenter is not None:
            x = self.augmenter(x, batch_seed(self.seed, epoch, k, self.rank))
        return x, y


def build_loader(cfg: DataConfig, *, rank: int, world_size: int, device: torch.device | str, seed: int,
                 augmenter: "Augmenter | Callable[[Tensor, int], Tensor] | None" = None) -> BatchSource:
    """The batch source ``cfg.mode`` asks for, for process ``rank`` of ``world_size`` (see module doc)."""
    cls = InMemoryBatches if cfg.mode == "memory" else StreamingBatches
    return cls(cfg, rank=rank, world_size=world_size, device=device, seed=seed, augmenter=augmenter)
