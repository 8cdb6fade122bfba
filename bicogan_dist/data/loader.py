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

``cfg.shards`` is a local folder, an ``http(s)://`` base URL or a ``pipe:`` command template
(``bicogan_dist/data/shard_io.py``); both modes read shards through the one reader there
(webdataset's tar iterator and key grouping, with the manifest's count and label checks), so a URL
gives exactly the batches of the same shards in a folder.

**memory** (default): every rank reads the split once (in manifest order) and decodes it into one
uint8 tensor on ``device`` (FER2013's Training split is ~65 MB); each epoch is a permutation drawn
from ``torch.Generator(epoch_seed(seed, e))``, identical on all ranks; global batch ``k`` is the
slice ``perm[k*W*B:(k+1)*W*B]`` and rank ``r`` takes its ``r``-th block of ``B``. Batches are
gathered by index (on the device; numpy's take on CPU): no per-sample Python.

**stream**: a webdataset ``DataPipeline`` per DataLoader worker (:class:`_StreamEpoch`). The
workers persist across epochs (one DataLoader per source; the dataset reads the epoch from shared
memory at each pass); an epoch abandoned early shuts them down, ``close()`` ends them
(:class:`StreamingBatches`, docs/streaming.md).

* exact cover (``resampled: false``): the epoch's shard order and a rotation offset are drawn
  from ``epoch_seed(seed, e)`` (the same on all ranks); the shards in that order, rotated, make
  one sequence of ``count`` samples. Rank ``r`` owns the contiguous block
  ``[r*count//W, (r+1)*count//W)`` (``count // W`` or one more samples: equal batch counts) and
  its workers equal contiguous parts of that block, each a list of shard segments. So node and
  worker splitting follow shards, as webdataset's splitters do, but cut at sample boundaries: with
  fewer shards than ranks x workers several readers share a shard, each reading it from its start
  up to the end of its part (a stream cannot seek; ``cache_dir`` makes repeats local). The whole
  split is read about once per epoch when there are at least ranks x workers shards.
* resampled (``resampled: true``): webdataset's ``ResampledShards`` draws shards with replacement,
  seeded per ``(seed, e, rank, worker)``; every sample of a drawn shard is kept; ``with_epoch``
  bounds each worker. Any number of shards works, each rank reads only what it uses, but samples
  may repeat within a rank and across ranks and some are not seen in an epoch.

Then ``shuffle`` (a buffer of ``shuffle_buffer`` samples, seeded by ``(seed, e, rank, worker)``),
``map`` (PNG decode) and ``batched`` (chunks of ``_CHUNK``). The main process cuts the workers'
chunks into batches of exactly ``batch_size`` and stops after ``batches_per_epoch``. DataLoader
returns worker chunks in a fixed round-robin order, so batches are deterministic, also when
workers hold unequal numbers of shards.

Checks, all ``ShardError`` naming the file or URL: at construction a missing folder or manifest,
a missing split, a missing local shard, sha256 mismatch (``verify=True``: every shard is read once
through the same opener); while reading a truncated or malformed tar, a sample without png/cls or
with a class outside the label map, a shard whose real sample count differs from the manifest,
an HTTP error, a cut connection after ``retries`` reconnects, a ``pipe:`` command that exits
non-zero. Memory mode reads everything at construction, so its errors all come there.

Augmentation: ``augmenter(images, seed)`` is applied per batch with ``seed = batch_seed(seed, e, k,
rank)``. In stream mode an augmenter whose ``backend`` is ``"imgaug"`` (CPU, numpy) runs inside the
workers instead, per chunk, seeded ``chunk_seed(seed, e, rank, worker, chunk)``: parallel and still
deterministic.

PNG decoding uses OpenCV when it imports (installed with imgaug; ~2.5x faster than PIL here and it
releases the GIL, so memory mode decodes with threads) and PIL otherwise; both give identical pixels.
"""
from __future__ import annotations

import functools
import inspect
import math
import multiprocessing
import os
import random
import sys
import time
import weakref
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from bicogan_dist.config import ConfigError
from bicogan_dist.data.manifest import MANIFEST_NAME, ShardError, ShardManifest, SplitInfo
from bicogan_dist.data.shard_io import ShardLocation, read_shard, sha256_of
from bicogan_dist.data.records import IMAGE_SIZE

if TYPE_CHECKING:
    from bicogan_dist.data.augment import Augmenter

__all__ = [
    "DataConfig", "BatchSource", "InMemoryBatches", "StreamingBatches", "build_loader", "load_split",
    "batch_seed", "chunk_seed", "epoch_seed", "mix_seed",
]

#: Samples a stream worker decodes and hands over at once (at least one batch): DataLoader's
#: per-item cost (shared-memory tensors, pickling) is ~15% of a sample's CPU time at 128 and
#: ~2% at 512, and the first batch still comes within ~0.1 s.
_CHUNK = 512


# ----------------------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    """Where the training faces come from and how they are batched (``data:`` in experiment YAML)."""

    shards: str = "data_shards/synthetic"  # folder, http(s):// base URL or pipe: template with {}; holds manifest.json
    split: str = "Training"
    mode: Literal["memory", "stream"] = "memory"
    batch_size: int = 64  # per process
    num_workers: int = 2  # stream mode: DataLoader worker processes per rank
    shuffle_buffer: int = 2000  # stream mode: raw samples held by each worker's shuffle buffer
    resampled: bool = False  # stream: shards drawn with replacement, fixed epoch length
    verify: bool = False  # check sha256 of every shard against the manifest at start
    cache_dir: str = ""  # remote shards: keep downloaded shards here and read them from there ("" = off)
    retries: int = 3  # remote shards: reconnects per file after a refused/cut connection or a 5xx answer
    timeout: float = 60.0  # remote shards: seconds a connect, a read or a pipe's exit may take

    def __post_init__(self) -> None:
        if not str(self.shards).strip():
            raise ConfigError("data.shards must name a shard folder, an http(s):// base URL or a pipe: command "
                              "(a place holding manifest.json)")
        if str(self.shards).strip().startswith("pipe:") and "{}" not in str(self.shards):
            raise ConfigError(f"data.shards: the pipe command {self.shards!r} has no {{}} for the file name; "
                              f"for example 'pipe:aws s3 cp s3://bucket/fer2013/{{}} -'")
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
        if self.retries < 0:
            raise ConfigError(f"data.retries must be >= 0, got {self.retries}")
        if not self.timeout > 0:
            raise ConfigError(f"data.timeout must be > 0 seconds, got {self.timeout}")


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
    """Seed of everything that must agree across ranks in an epoch (permutation, shard order, offset)."""
    return mix_seed(seed, epoch, 0xE70C)


def batch_seed(seed: int, epoch: int, batch_index: int, rank: int) -> int:
    """Seed of the augmenter for batch ``batch_index`` of ``epoch`` on ``rank``: a resumed run repeats it."""
    return mix_seed(seed, epoch, batch_index, rank, 0xBA7C)


def chunk_seed(seed: int, epoch: int, rank: int, worker: int, chunk_index: int) -> int:
    """Seed of the augmenter for a stream worker's ``chunk_index``-th chunk (imgaug in workers)."""
    return mix_seed(seed, epoch, rank, worker, chunk_index, 0xC4C7)


# -------------------------------------------------------------------------------------- decoding


def _png_decoder() -> Callable[[bytes], np.ndarray]:
    """``decode(png bytes)`` → (48, 48) uint8; OpenCV when available (faster, GIL-free), else PIL."""
    from bicogan_dist.data.shard_format import decode_png

    try:
        import cv2  # noqa: PLC0415 - optional accelerator (installed with imgaug)
    except Exception:  # noqa: BLE001 - any import problem means: use PIL
        return decode_png
    imdecode, flag, u8 = cv2.imdecode, cv2.IMREAD_UNCHANGED, np.uint8

    def decode(data: bytes) -> np.ndarray:
        arr = imdecode(np.frombuffer(data, u8), flag)
        if arr is None or arr.dtype != u8 or arr.shape != (IMAGE_SIZE, IMAGE_SIZE):
            return decode_png(bytes(data))  # colour, 16-bit, odd sizes, junk: PIL converts or raises clearly
        return arr

    return decode


def _decode_or_name(decode: Callable[[bytes], np.ndarray], png: bytes, url: Callable[[int], str], shard: int,
                    key: str) -> np.ndarray:
    """``decode(png)``; a ShardError naming shard ``url(shard)`` and ``key`` when the PNG is bad."""
    try:
        return decode(png)
    except Exception as exc:  # noqa: BLE001 - re-raised with the sample named
        raise ShardError(f"shard {url(shard)}: sample {key!r}: cannot decode its PNG ({exc})") from exc


# ---------------------------------------------------------------------------------- manifest checks


@dataclass
class _Split:
    """A split's shards as the loaders read them: where, which files, their counts, the label map."""

    location: ShardLocation
    label_names: tuple[str, ...]
    info: SplitInfo

    @property
    def files(self) -> list[str]:
        return [e.file for e in self.info.shards]

    @property
    def counts(self) -> list[int]:
        return [e.count for e in self.info.shards]

    def read(self, index: int) -> Iterator[tuple[str, bytes, int]]:
        """Samples of shard ``index``: (key, png bytes, class), checked against the manifest (``shard_io``)."""
        entry = self.info.shards[index]
        return read_shard(self.location, entry.file, entry.count, len(self.label_names))

    def url(self, index: int) -> str:
        return self.location.url(self.info.shards[index].file)


def _location(cfg: DataConfig) -> ShardLocation:
    return ShardLocation.parse(cfg.shards, retries=cfg.retries, timeout=cfg.timeout, cache_dir=cfg.cache_dir)


def _open_split(cfg: DataConfig) -> _Split:
    """Manifest checks that need no shard contents (those run as shards are read: ``shard_io.read_shard``)."""
    location = _location(cfg)
    if location.kind == "local" and not Path(location.spec).is_dir():
        raise ShardError(f"shard folder {location.spec} does not exist; make shards with tools/shard_fer2013.py "
                         f"(or set data.shards)")
    manifest = ShardManifest.load(location)
    info = manifest.split(cfg.split)
    if sum(e.count for e in info.shards) != info.count:
        raise ShardError(f"{location.url(MANIFEST_NAME)}: split {cfg.split} lists {info.count} samples but its "
                         f"shards hold {sum(e.count for e in info.shards)}")
    if location.kind == "local":  # cheap here; a remote shard that is missing fails when it is read (404, exit 1)
        for entry in info.shards:
            if not (Path(location.spec) / entry.file).is_file():
                raise ShardError(f"shard {location.url(entry.file)} listed in the manifest is missing")
    if cfg.verify:
        for entry in info.shards:
            if sha256_of(location, entry.file) != entry.sha256:
                raise ShardError(f"shard {location.url(entry.file)} does not match its sha256 in the manifest "
                                 f"(corrupt or replaced)")
    return _Split(location, tuple(manifest.label_names), info)


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

    def close(self) -> None:
        """Release processes the source keeps between epochs (stream workers); nothing for the memory mode.

        The trainer calls it when training ends, so no worker or ``pipe:`` process outlives the run
        however it ends. A later ``epoch()`` still works (it starts what it needs again).
        """

    def _check_start(self, start_batch: int) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is outside 0..{self.batches_per_epoch}")


def _load(cfg: DataConfig, limit: int | None = None, threads: int | None = None,
          before_decode: Callable[[SplitInfo], Any] | None = None
          ) -> tuple[_Split, np.ndarray, np.ndarray]:
    """Checks + decode of the split's first ``limit`` (default all) samples: (split, images, labels).

    The shards are read once, in manifest order, through the stream's reader (``shard_io.read_shard``;
    from a URL or a pipe just as from a folder); the PNGs are then decoded on ``threads`` threads.
    ``before_decode(info)`` runs after the manifest checks, so its errors come before any reading.
    """
    split = _open_split(cfg)
    if before_decode is not None:
        before_decode(split.info)
    want = split.info.count if limit is None else max(0, min(int(limit), split.info.count))
    pngs: list[bytes] = []
    labels_list: list[int] = []
    where: list[tuple[int, str]] = []
    for s in range(len(split.files)):
        if len(pngs) >= want:
            break
        samples = split.read(s)
        for key, png, label in samples:
            if len(pngs) >= want:
                samples.close()  # stop reading (and close the stream) once the limit is reached
                break
            pngs.append(png)
            labels_list.append(label)
            where.append((s, key))
    n = len(pngs)
    labels = np.asarray(labels_list, dtype=np.int64)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    decode = _png_decoder()
    n_threads = threads if threads is not None else min(4, os.cpu_count() or 1)
    step = max(256, math.ceil(n / max(1, n_threads * 4)))
    ranges = [(a, min(a + step, n)) for a in range(0, n, step)]

    def work(r: tuple[int, int]) -> None:
        for i in range(r[0], r[1]):
            images[i] = _decode_or_name(decode, pngs[i], split.url, where[i][0], where[i][1])

    if n_threads > 1 and len(ranges) > 1:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(work, ranges))
    else:
        for r in ranges:
            work(r)
    return split, images, labels


def load_split(folder: str | Path, split: str, device: torch.device | str = "cpu", limit: int | None = None,
               verify: bool = False, threads: int | None = None, *, cache_dir: str = "", retries: int = 3,
               timeout: float = 60.0) -> tuple[Tensor, Tensor]:
    """All (or the first ``limit``) samples of a split in shard order: (uint8 (N,1,48,48), int64 (N,)).

    ``folder`` is any ``data.shards`` value (folder, URL, ``pipe:``). Runs the loader's manifest
    checks (the real sample counts of the shards it reads to their end included). Decoding runs on
    ``threads`` threads (default: up to 4; OpenCV releases the GIL).
    """
    cfg = DataConfig(shards=str(folder), split=split, verify=verify, cache_dir=cache_dir, retries=retries,
                     timeout=timeout)
    _, images, labels = _load(cfg, limit, threads)
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
        split, images, labels = _load(
            cfg, before_decode=lambda info: _per_epoch(info.count, world_size, cfg.batch_size, cfg.split))
        self.label_names = split.label_names
        self.num_samples = split.info.count
        self.batches_per_epoch = _per_epoch(split.info.count, world_size, cfg.batch_size, cfg.split)
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


# ------------------------------------------------------------------------------------------ stream


@dataclass
class _EpochPlan:
    """What one rank streams in one epoch: per worker, the shard segments it reads, in order."""

    epoch: int
    rank: int
    resampled: bool
    segments: list[list[tuple[int, int, int]]]  # exact cover, per worker: (shard, first sample, end sample)
    chunks_per_worker: int  # resampled: chunks each worker yields (webdataset's with_epoch)


def _unrotate(a: int, b: int, offset: int, total: int) -> list[tuple[int, int]]:
    """Positions ``[a, b)`` of the epoch sequence rotated by ``offset`` as ranges of the unrotated one."""
    if b <= a:
        return []
    s = (a + offset) % total
    e = s + (b - a)
    return [(s, e)] if e <= total else [(s, total), (0, e - total)]


def _stream_plan(counts: Sequence[int], *, resampled: bool, seed: int, epoch: int, rank: int, world_size: int,
                 workers: int, need: int, chunk: int) -> _EpochPlan:
    """Who reads what in an epoch, drawn identically on all ranks (module doc).

    Exact cover: the shards in a random order make one sequence of ``total`` samples, rotated by
    a random offset; rank ``r`` owns the contiguous block ``[r*total//W, (r+1)*total//W)`` and its
    workers equal contiguous parts of it, each part a list of shard segments ``[lo, hi)``.
    """
    n_workers = max(1, workers)
    if resampled:
        per_worker = math.ceil(math.ceil(need / chunk) / n_workers) + 1
        return _EpochPlan(epoch, rank, True, [], per_worker)
    rng = np.random.default_rng(epoch_seed(seed, epoch))
    order = [int(i) for i in rng.permutation(len(counts))]
    total = int(sum(counts))
    offset = int(rng.integers(total)) if total else 0
    starts = np.concatenate([[0], np.cumsum([counts[i] for i in order])]).astype(np.int64)
    lo_r, hi_r = rank * total // world_size, (rank + 1) * total // world_size
    segments: list[list[tuple[int, int, int]]] = []
    for w in range(n_workers):
        a = lo_r + w * (hi_r - lo_r) // n_workers
        b = lo_r + (w + 1) * (hi_r - lo_r) // n_workers
        mine: list[tuple[int, int, int]] = []
        for u, v in _unrotate(a, b, offset, total):
            first = int(np.searchsorted(starts, u, side="right")) - 1
            for i in range(first, len(order)):
                if starts[i] >= v:
                    break
                lo, hi = max(u, starts[i]) - starts[i], min(v, starts[i + 1]) - starts[i]
                if hi > lo:
                    mine.append((order[i], int(lo), int(hi)))
        segments.append(mine)
    return _EpochPlan(epoch, rank, False, segments, 0)


def _collate(samples: list[tuple[np.ndarray, int]]) -> tuple[Tensor, Tensor]:
    images = np.stack([s[0] for s in samples])
    return torch.from_numpy(images).unsqueeze(1), torch.tensor([s[1] for s in samples], dtype=torch.int64)


class _StreamEpoch(torch.utils.data.IterableDataset):
    """The stream of one rank as a webdataset ``DataPipeline``; each DataLoader worker runs its own copy.

    Stages: the epoch's shard list (exact cover) or webdataset's ``ResampledShards`` (resampled),
    ``split_by_worker``, the reader (``shard_io.read_shard``: open, tar, group, checks) with this
    rank's samples selected by position (exact cover), ``shuffle``, ``map`` (PNG decode),
    ``batched`` (chunks), the in-worker augmenter, and ``with_epoch`` (resampled).

    Which epoch ``iter()`` streams is read at that moment from ``self.epoch``, an integer in shared
    memory: persistent DataLoader workers inherit it when they start, the main process sets it
    before each pass of the loader, and every pass makes every worker call ``iter(dataset)`` anew
    (torch's ``_ResumeIteration``), so one set of workers streams epoch after epoch.
    """

    def __init__(self, split: _Split, planner: Callable[..., _EpochPlan], *, chunk: int, shuffle_buffer: int,
                 seed: int, augmenter: Any = None) -> None:
        super().__init__()
        self.split, self.planner, self.chunk, self.shuffle_buffer = split, planner, chunk, shuffle_buffer
        self.seed, self.augmenter = seed, augmenter
        self.epoch = multiprocessing.RawValue("q", 0)  # set by the main process only while no pass runs

    def _read_segments(self, segments: Iterator[dict]) -> Iterator[tuple[bytes, int, int, str]]:
        """Pipeline stage: shard segments → (png, label, shard, key) of their samples.

        A segment ending before its shard's end stops reading there (the stream is closed); one that
        reaches the end reads on to the end of the tar, so the sample-count check runs.
        """
        for seg in segments:
            s, lo, hi = seg["shard"], seg["lo"], seg["hi"]
            last = hi >= self.split.counts[s]
            samples = self.split.read(s)
            try:
                for j, (key, png, label) in enumerate(samples):
                    if j >= lo:
                        yield png, label, s, key
                    if j + 1 >= hi and not last:
                        break
            finally:
                samples.close()

    def _augment(self, chunks: Iterator[tuple[Tensor, Tensor]], plan: _EpochPlan,
                 worker: int) -> Iterator[tuple[Tensor, Tensor]]:
        for index, (x, y) in enumerate(chunks):
            yield self.augmenter(x, chunk_seed(self.seed, plan.epoch, plan.rank, worker, index)), y

    def pipeline(self, plan: _EpochPlan, worker: int) -> Any:
        import webdataset as wds

        if plan.resampled:
            files = list(range(len(self.split.files)))
            shards: Any = wds.ResampledShards(
                [str(i) for i in files], deterministic=True,
                worker_seed=lambda: mix_seed(self.seed, plan.epoch, plan.rank, worker, 0x5E5A))
            counts = self.split.counts
            source = wds.DataPipeline(shards, wds.map(lambda d: {"shard": int(d["url"]), "lo": 0,
                                                                 "hi": counts[int(d["url"])]}))
        else:
            if len(plan.segments) > 1 and worker >= len(plan.segments):
                raise RuntimeError(f"stream plan made for {len(plan.segments)} workers, worker {worker} asked")
            listed = [{"shard": s, "lo": lo, "hi": hi} for s, lo, hi in plan.segments[worker]]
            source = wds.DataPipeline(lambda: iter(listed))
        decode = _png_decoder()
        split = self.split
        stages = [
            source,
            self._read_segments,
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                        rng=random.Random(mix_seed(self.seed, plan.epoch, plan.rank, worker, 0x5F1E))),
            wds.map(lambda s: (_decode_or_name(decode, s[0], split.url, s[2], s[3]), s[1])),
            wds.batched(self.chunk, collation_fn=_collate, partial=True),
        ]
        if self.augmenter is not None:
            stages.append(lambda chunks: self._augment(chunks, plan, worker))
        pipeline = wds.DataPipeline(*stages)
        if plan.resampled:
            pipeline = pipeline.with_epoch(plan.chunks_per_worker)
        return pipeline

    def __iter__(self) -> Iterator[Any]:
        epoch = int(self.epoch.value)  # now, not lazily: the main process may set the next epoch later
        info = torch.utils.data.get_worker_info()
        if info is None:
            return iter(self.pipeline(self.planner(epoch=epoch), 0))
        worker = info.id
        # In a worker nothing may raise here: a persistent worker calls iter() outside torch's error
        # handling and would die, so even building the pipeline happens inside the guard.
        return _guarded(lambda: self.pipeline(self.planner(epoch=epoch), worker), worker)


@dataclass
class _WorkerFailure:
    """An exception of a stream worker, sent as data: a worker that raises makes DataLoader's
    shutdown wait 5 s per worker (torch's join timeout), and its wrapped message is noisier."""

    kind: type
    message: str


def _guarded(make: Callable[[], Any], worker: int) -> Iterator[Any]:
    """Items of the pipeline ``make()`` builds; an exception (also while building) ends it as a _WorkerFailure."""
    it = None
    try:
        it = iter(make())
        yield from it
    except Exception as exc:  # noqa: BLE001 - re-raised in the main process
        import traceback

        message = str(exc) if isinstance(exc, ShardError) else \
            f"{exc}\n(in stream worker {worker}:\n{traceback.format_exc()})"
        yield _WorkerFailure(type(exc), message)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # closes the open shard stream now (kills and reaps a pipe: command)


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
    """Batches streamed from the shards through a webdataset pipeline + DataLoader workers (see module doc).

    The workers persist across epochs: one DataLoader (``persistent_workers=True``) per source,
    whose dataset reads the epoch from shared memory (:class:`_StreamEpoch`). Forking
    ``num_workers`` processes costs a noticeable part of an epoch that a GPU consumes in 1-2 s.
    An epoch read to its last batch drains the loader first (the workers finish their parts and
    close their streams, ``pipe:`` commands included) and leaves the workers waiting for the next
    epoch; an epoch abandoned early (the consumer stops, an error) shuts them down, and the next
    epoch starts new ones. ``close()`` shuts them down for good. An epoch started while another is
    still being read gets its own, non-persistent loader, as every epoch did before.
    """

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, device: torch.device | str, seed: int,
                 augmenter: "Augmenter | Callable[[Tensor, int], Tensor] | None" = None) -> None:
        _check_rank(rank, world_size)
        self.split = _open_split(cfg)
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, int(seed)
        self.device = torch.device(device)
        self.label_names = self.split.label_names
        self.num_samples = self.split.info.count
        self.batch_size = cfg.batch_size
        self.batches_per_epoch = _per_epoch(self.num_samples, world_size, cfg.batch_size, cfg.split)
        in_workers = cfg.num_workers > 0 and getattr(augmenter, "backend", None) == "imgaug"
        self.worker_augmenter = augmenter if in_workers else None
        self.augmenter = None if in_workers else augmenter
        self.chunk = max(cfg.batch_size, _CHUNK)
        self._loader: torch.utils.data.DataLoader | None = None  # the persistent one (num_workers > 0)
        self._leased = False  # an epoch is reading from self._loader
        self._open: weakref.WeakSet = weakref.WeakSet()  # epoch generators not yet finished, for close()

    def plan(self, epoch: int) -> _EpochPlan:
        return self._planner()(epoch=epoch)

    def _planner(self) -> Callable[..., _EpochPlan]:
        """``plan(epoch=e)`` as a picklable function of the epoch alone (the workers call it)."""
        return functools.partial(_stream_plan, self.split.counts, resampled=self.cfg.resampled, seed=self.seed,
                                 rank=self.rank, world_size=self.world_size, workers=self.cfg.num_workers,
                                 need=self.batches_per_epoch * self.batch_size, chunk=self.chunk)

    def _make_loader(self, persistent: bool) -> torch.utils.data.DataLoader:
        dataset = _StreamEpoch(self.split, self._planner(), chunk=self.chunk, shuffle_buffer=self.cfg.shuffle_buffer,
                               seed=self.seed, augmenter=self.worker_augmenter)
        workers = self.cfg.num_workers
        pin = self.device.type == "cuda"  # batches stay in pinned memory up to the non-blocking copy
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, pin_memory=pin,
            persistent_workers=persistent and workers > 0, worker_init_fn=_worker_init if workers > 0 else None,
            prefetch_factor=4 if workers > 0 else None)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        self._check_start(start_batch)
        batches = self._epoch(epoch, start_batch)
        self._open.add(batches)
        return batches

    def close(self) -> None:
        """End every epoch still being read and shut the workers down (joined: no worker, stream or
        ``pipe:`` process is left). An epoch not started yet and a later ``epoch()`` start new workers."""
        for batches in list(self._open):
            if inspect.getgeneratorstate(batches) == inspect.GEN_SUSPENDED:
                batches.close()  # runs the epoch's finally: its loader's workers are shut down
        if self._loader is not None:
            _stop_workers(getattr(self._loader, "_iterator", None))  # the persistent workers live there
            self._loader = None
        self._leased = False

    def _epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Rebatch worker chunks to exactly ``batch_size``; stop after ``batches_per_epoch``.

        Resuming at ``start_batch`` replays the epoch's stream and drops the first batches before
        they reach the device or the main-process augmenter (the workers still read and decode
        them: at most one epoch of reading, once per resume).
        """
        if start_batch == self.batches_per_epoch:
            return
        workers = self.cfg.num_workers
        shared = workers > 0 and not self._leased
        if shared:
            self._leased = True
            if self._loader is None:
                self._loader = self._make_loader(persistent=True)
            loader = self._loader
        else:
            loader = self._make_loader(persistent=False)
        loader.dataset.epoch.value = epoch  # read by each worker's iter(dataset) in this pass
        if workers > 0:
            _opencv_fork_safe()
        B = self.batch_size
        chunks = iter(loader)
        done = False  # every batch of the epoch is made (the last may not be taken yet)
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
                if len(pending) > 1:  # a chunk boundary: cat makes pageable memory, pinned again for the copy
                    xs, ys = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
                    if loader.pin_memory:
                        xs, ys = xs.pin_memory(), ys.pin_memory()
                else:
                    xs, ys = pending[0]
                a = 0
                while have - a >= B:
                    last = k + 1 == self.batches_per_epoch
                    batch = self._finish(xs[a:a + B], ys[a:a + B], epoch, k) if k >= start_batch else None
                    if last:
                        if shared:
                            self._end_pass(chunks)
                        done = True
                    if batch is not None:
                        yield batch
                    if last:
                        return
                    k += 1
                    a += B
                pending = [(xs[a:], ys[a:])] if a < have else []
                have -= a
            if failure is None:
                raise ShardError(f"split {self.cfg.split}: the stream ended after {k} of {self.batches_per_epoch} "
                                 f"batches on rank {self.rank}; the shards changed after the loader started")
        finally:
            if not (shared and done):  # a one-shot loader, or an abandoned epoch: no worker may go on reading
                _stop_workers(chunks)
            if shared and not done and self._loader is loader:  # the next epoch starts new workers
                self._loader = None
                self._leased = False
            del chunks
        try:
            error = failure.kind(failure.message)
        except Exception:  # noqa: BLE001 - an exception type that takes other arguments
            error = RuntimeError(f"{failure.kind.__name__}: {failure.message}")
        raise error

    def _end_pass(self, chunks: Iterator[Any]) -> None:
        """After the epoch's last batch: let the workers finish their parts (at most about a chunk each,
        mostly prefetched already), so their streams close now and they wait idle for the next epoch;
        then the loader is free for it. Items past the last batch are dropped, errors in them too
        (as when the workers were shut down there)."""
        for _ in chunks:
            pass
        self._leased = False

    def _finish(self, x: Tensor, y: Tensor, epoch: int, k: int) -> tuple[Tensor, Tensor]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.augmenter is not None:
            x = self.augmenter(x, batch_seed(self.seed, epoch, k, self.rank))
        return x, y


def _stop_workers(chunks: Any) -> None:
    """Shut a DataLoader iterator's workers down now and join them.

    DataLoader does this when the iterator is garbage collected; done explicitly, no worker (nor
    its open stream or ``pipe:`` process) outlives an abandoned epoch or ``close()``, whatever
    still refers to the iterator (a traceback, say). An in-process iterator has nothing to stop.
    """
    shutdown = getattr(chunks, "_shutdown_workers", None)  # torch's own teardown: queues, join, terminate
    if shutdown is not None:
        shutdown()


def build_loader(cfg: DataConfig, *, rank: int, world_size: int, device: torch.device | str, seed: int,
                 augmenter: "Augmenter | Callable[[Tensor, int], Tensor] | None" = None) -> BatchSource:
    """The batch source ``cfg.mode`` asks for, for process ``rank`` of ``world_size`` (see module doc)."""
    cls = InMemoryBatches if cfg.mode == "memory" else StreamingBatches
    return cls(cfg, rank=rank, world_size=world_size, device=device, seed=seed, augmenter=augmenter)
