"""The training loaders: exact DDP partitioning, determinism and resume, pixel round trip, manifest checks.

Shards are real webdataset tars written by the shard writer from faces whose pixels encode their own
index (grey levels [0, 0] and [0, 1]), so which samples a rank saw can be checked exactly. Ranks are
simulated by building the loader with rank 0 and 1 of world size 2; stream mode runs real DataLoader
worker processes; one test runs two real processes joined by torch.distributed (gloo).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bicogan_dist.config import ConfigError
from bicogan_dist.data.augment import AugmentConfig, build_augmenter
from bicogan_dist.data.loader import (DataConfig, InMemoryBatches, StreamingBatches, batch_seed, build_loader,
                                      load_split, mix_seed)
from bicogan_dist.data.shard_io import ShardLocation, read_shard
from bicogan_dist.data.manifest import ShardError, ShardManifest, SplitInfo
from bicogan_dist.data.records import FaceRecord
from bicogan_dist.data.shards import write_split_shards
from bicogan_dist.labels import EmotionLabels

LABELS = EmotionLabels.six()
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def indexed_records(n: int, split: str = "Training", seed: int = 0) -> list[FaceRecord]:
    """Faces whose grey levels [0, 0] and [0, 1] spell their index; class index = index % 6."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        pixels = rng.integers(0, 256, (48, 48), dtype=np.uint8)
        pixels[0, 0], pixels[0, 1] = i % 256, i // 256
        records.append(FaceRecord(pixels, LABELS.fer_codes[i % 6], split, f"test:{i}"))
    return records


def make_shards(folder: Path, splits: dict[str, int], shard_size: int) -> dict[str, list[FaceRecord]]:
    folder.mkdir(parents=True, exist_ok=True)
    infos, records = {}, {}
    for split, n in splits.items():
        records[split] = indexed_records(n, split, seed=len(split))
        entries, counts = write_split_shards(records[split], split, LABELS, folder, shard_size)
        infos[split] = SplitInfo(count=n, class_counts=counts, shards=entries)
    ShardManifest(label_names=list(LABELS.names), splits=infos, source="test").save(folder)
    return records


def ids(images: torch.Tensor) -> list[int]:
    """Sample indices spelled by the images (see indexed_records)."""
    px = images[:, 0, 0].to(torch.int64)
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def run_epoch(source, epoch: int, start: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    xs, ys = [], []
    for x, y in source.epoch(epoch, start_batch=start):
        xs.append(x)
        ys.append(y)
    return xs, ys


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, list[FaceRecord]]]:
    """Training: 96 samples in 3 shards (40, 40, 16); PublicTest: 50 samples in 2 shards (40, 10)."""
    folder = tmp_path_factory.mktemp("shards") / "set"
    return folder, make_shards(folder, {"Training": 96, "PublicTest": 50}, shard_size=40)


def two_ranks(folder: Path, **overrides) -> list:
    cfg = DataConfig(shards=str(folder), **{"batch_size": 8, "num_workers": 2, "shuffle_buffer": 16, **overrides})
    return [build_loader(cfg, rank=r, world_size=2, device=CPU, seed=3) for r in range(2)]


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("num_workers", -1), ("shuffle_buffer", 0),
                                         ("mode", "disk"), ("shards", " "), ("split", "")])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"data.{field}"):
        DataConfig(**{field: value})


def test_config_from_experiment_keys():
    from bicogan_dist.config import from_dict

    cfg = from_dict(DataConfig, {"mode": "stream", "batch_size": "32", "resampled": "true"}, prefix="data.")
    assert (cfg.mode, cfg.batch_size, cfg.resampled) == ("stream", 32, True)
    with pytest.raises(ConfigError, match="data.mode"):
        from_dict(DataConfig, {"mode": "tape"}, prefix="data.")


def test_seeds_are_stable_and_distinct():
    assert batch_seed(1, 2, 3, 0) == batch_seed(1, 2, 3, 0)
    seeds = {batch_seed(0, e, k, r) for e in range(3) for k in range(5) for r in range(2)}
    assert len(seeds) == 30 and all(0 <= s < 2**63 for s in seeds)
    assert mix_seed(0, 1) != mix_seed(1, 0)
    assert mix_seed(7, 9) == 1243669055319212802  # pinned: resume across versions depends on it


# ------------------------------------------------------------------------------- reading the shards


def test_load_split_round_trips_pixels_and_labels(shards):
    folder, records = shards
    x, y = load_split(folder, "Training")
    assert x.dtype == torch.uint8 and x.shape == (96, 1, 48, 48) and y.dtype == torch.int64
    expected = np.stack([r.pixels for r in records["Training"]])
    assert np.array_equal(x[:, 0].numpy(), expected)
    assert y.tolist() == [i % 6 for i in range(96)]
    x5, y5 = load_split(folder, "Training", limit=5)
    assert torch.equal(x5, x[:5]) and torch.equal(y5, y[:5])
    x1, _ = load_split(folder, "Training", threads=1)
    assert torch.equal(x1, x)


def test_reader_matches_webdataset(shards):
    """read_shard yields what webdataset's own WebDataset pipeline yields, in the same order."""
    import webdataset as wds

    folder, _ = shards
    path = folder / "Training-000000.tar"
    got = list(read_shard(ShardLocation.parse(folder), "Training-000000.tar", 40, 6))
    samples = list(wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()))
    assert [k for k, _, _ in got] == [s["__key__"] for s in samples]
    assert [p for _, p, _ in got] == [s["png"] for s in samples]
    assert [c for _, _, c in got] == [int(s["cls"]) for s in samples]


def test_tar_members_match_webdatasets_tar_iterator(shards, tmp_path):
    """The streaming header parser gives what webdataset's tarfile-based iterator gives, long (pax) names too."""
    import webdataset as wds
    from webdataset.tariterators import tar_file_iterator

    from bicogan_dist.data.shard_io import tar_members

    folder, _ = shards
    path = tmp_path / "long.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "k" * 150, "png": b"\x89PNG", "cls": b"3", "json": b"{}"})
        sink.write({"__key__": "dir/short", "png": b"x" * 1000, "cls": b"1"})
    for tar in (path, folder / "Training-000002.tar"):
        with open(tar, "rb") as fh:
            theirs = [(f["fname"], f["data"]) for f in tar_file_iterator(fh)]
        with open(tar, "rb") as fh:
            ours = [(f["fname"], f["data"]) for f in tar_members(fh, str(tar), skip=())]
        assert ours == theirs and len(ours) >= 5
    with open(path, "rb") as fh:
        assert [f["fname"] for f in tar_members(fh, "x")] == ["k" * 150 + ".cls", "k" * 150 + ".png",
                                                               "dir/short.cls", "dir/short.png"]


def test_opencv_and_pil_decode_identically(shards, monkeypatch):
    folder, _ = shards
    x_fast, _ = load_split(folder, "PublicTest")
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails: the PIL path
    x_pil, _ = load_split(folder, "PublicTest")
    assert torch.equal(x_fast, x_pil)


# ------------------------------------------------------------------------------ partitioning (both)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_two_ranks_cover_the_split_once_per_epoch(shards, mode):
    folder, records = shards
    ranks = two_ranks(folder, mode=mode)
    assert [r.batches_per_epoch for r in ranks] == [6, 6]  # 96 // (2 * 8)
    assert ranks[0].num_samples == 96 and ranks[0].label_names == LABELS.names
    seen = {}
    for e in (0, 1):
        per_rank = []
        for src in ranks:
            xs, ys = run_epoch(src, e)
            assert len(xs) == 6
            for x, y in zip(xs, ys):
                assert x.shape == (8, 1, 48, 48) and x.dtype == torch.uint8 and x.device == CPU
                assert y.shape == (8,) and y.dtype == torch.int64
                got = ids(x)
                assert y.tolist() == [i % 6 for i in got]  # labels travel with their images
                for i, img in zip(got, x):  # exact pixels
                    assert np.array_equal(img[0].numpy(), records["Training"][i].pixels)
            per_rank.append([i for x in xs for i in ids(x)])
        a, b = per_rank
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(96))
        seen[e] = per_rank
    assert seen[0] != seen[1]  # a new order (and new rank subsets) each epoch
    assert set(seen[0][0]) != set(seen[1][0])


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_epochs_are_deterministic_and_resume_exactly(shards, mode):
    folder, _ = shards
    first = two_ranks(folder, mode=mode)
    again = two_ranks(folder, mode=mode)  # a fresh process after a restart would build this
    for r in range(2):
        xs, ys = run_epoch(first[r], 2)
        xs2, ys2 = run_epoch(again[r], 2)
        assert all(torch.equal(a, b) for a, b in zip(xs, xs2)) and len(xs) == len(xs2) == 6
        for k in (1, 4, 6):
            tail_x, tail_y = run_epoch(again[r], 2, start=k)
            assert len(tail_x) == 6 - k
            assert all(torch.equal(a, b) for a, b in zip(tail_x, xs[k:]))
            assert all(torch.equal(a, b) for a, b in zip(tail_y, ys[k:]))
    with pytest.raises(ValueError, match="start_batch"):
        first[0].epoch(0, start_batch=7)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_remainder_is_dropped_equally(tmp_path, mode):
    make_shards(tmp_path, {"Training": 45}, shard_size=20)  # 45 = 2 * 2 * 11 + 1
    ranks = [build_loader(DataConfig(shards=str(tmp_path), mode=mode, batch_size=4, num_workers=2,
                                     shuffle_buffer=8), rank=r, world_size=2, device=CPU, seed=0) for r in range(2)]
    assert [r.batches_per_epoch for r in ranks] == [5, 5]
    seen = [[i for x, _ in r.epoch(0) for i in ids(x)] for r in ranks]
    assert [len(s) for s in seen] == [20, 20]
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) <= set(range(45))


def test_fewer_shards_than_ranks_times_workers(shards):
    folder, _ = shards  # PublicTest: two shards (40, 10) for 2 ranks x 2 workers
    ranks = two_ranks(folder, mode="stream", split="PublicTest", batch_size=5)
    seen = [[i for x, _ in r.epoch(0) for i in ids(x)] for r in ranks]
    assert [len(s) for s in seen] == [25, 25]
    assert sorted(seen[0] + seen[1]) == list(range(50))


def test_stream_without_workers_and_with_a_big_buffer(shards):
    folder, _ = shards
    ranks = two_ranks(folder, mode="stream", num_workers=0, shuffle_buffer=1000)
    seen = [[i for x, _ in r.epoch(0) for i in ids(x)] for r in ranks]
    assert sorted(seen[0] + seen[1]) == list(range(96))
    one_worker = two_ranks(folder, mode="stream", num_workers=1, shuffle_buffer=1000)
    assert [i for x, _ in one_worker[0].epoch(0) for i in ids(x)] == seen[0]  # worker 0 runs what the main ran


def test_resampled_keeps_the_epoch_length_and_is_deterministic(shards):
    folder, _ = shards
    ranks = two_ranks(folder, mode="stream", resampled=True)
    for r in ranks:
        a = [i for x, _ in r.epoch(5) for i in ids(x)]
        assert len(a) == 6 * 8 and set(a) <= set(range(96))
        assert a == [i for x, _ in r.epoch(5) for i in ids(x)]
        tail = [i for x, _ in r.epoch(5, start_batch=2) for i in ids(x)]
        assert tail == a[16:]
    a0 = [i for x, _ in ranks[0].epoch(5) for i in ids(x)]
    a1 = [i for x, _ in ranks[1].epoch(5) for i in ids(x)]
    assert len(set(a0) & set(a1)) < len(a0)  # draws differ per rank; repeats across shards are allowed


def test_batch_size_too_big_for_the_split(shards):
    folder, _ = shards
    with pytest.raises(ConfigError, match="data.batch_size: split Training has 96 samples, fewer than world_size x"):
        build_loader(DataConfig(shards=str(folder), batch_size=64), rank=0, world_size=2, device=CPU, seed=0)


def test_bad_rank():
    with pytest.raises(ValueError, match="rank 2 / world_size 2"):
        build_loader(DataConfig(), rank=2, world_size=2, device=CPU, seed=0)


# ------------------------------------------------------------------------------------- augmentation


def test_memory_augmentation_is_seeded_per_batch(shards):
    folder, _ = shards
    aug = build_augmenter(AugmentConfig(ops=["affine_rotate", "fliplr"], backend="torch", p=1.0))
    cfg = DataConfig(shards=str(folder), batch_size=8)
    plain = InMemoryBatches(cfg, rank=1, world_size=2, device=CPU, seed=3)
    src = InMemoryBatches(cfg, rank=1, world_size=2, device=CPU, seed=3, augmenter=aug)
    xs, ys = run_epoch(src, 1)
    px, py = run_epoch(plain, 1)
    assert all(torch.equal(a, b) for a, b in zip(ys, py))
    for k, (x, p) in enumerate(zip(xs, px)):
        assert x.dtype == torch.uint8 and x.shape == p.shape and not torch.equal(x, p)
        assert torch.equal(x, aug(p, batch_seed(3, 1, k, 1)))  # the documented seed
    tail, _ = run_epoch(src, 1, start=3)
    assert all(torch.equal(a, b) for a, b in zip(tail, xs[3:]))


@pytest.mark.parametrize("backend", ["torch", "imgaug"])
def test_stream_augmentation_is_deterministic(shards, backend):
    folder, _ = shards
    aug = build_augmenter(AugmentConfig(ops=["affine_rotate"], backend=backend, p=1.0))
    src = two_ranks(folder, mode="stream")[0]
    aug_src = StreamingBatches(src.cfg, rank=0, world_size=2, device=CPU, seed=3, augmenter=aug)
    assert (aug_src.worker_augmenter is not None) == (backend == "imgaug")  # imgaug runs in the workers
    xs, ys = run_epoch(aug_src, 0)
    _, plain_y = run_epoch(src, 0)
    assert all(torch.equal(a, b) for a, b in zip(ys, plain_y))  # same samples, same order
    again, _ = run_epoch(aug_src, 0)
    assert all(torch.equal(a, b) for a, b in zip(xs, again))
    tail, _ = run_epoch(aug_src, 0, start=2)
    assert all(torch.equal(a, b) for a, b in zip(tail, xs[2:]))
    plain_x, _ = run_epoch(src, 0)
    assert not torch.equal(torch.cat(xs), torch.cat(plain_x))


def test_stream_workers_fork_with_opencv_single_threaded(shards):
    """OpenCV's thread pool does not survive fork (a worker hung after imgaug ran in the parent)."""
    cv2 = pytest.importorskip("cv2")
    folder, _ = shards
    cv2.setNumThreads(2)
    try:
        src = two_ranks(folder, mode="stream")[0]
        assert len(list(src.epoch(0))) == 6
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(1)


# ------------------------------------------------------------------------------ stream workers across epochs


def child_pids() -> set[int]:
    """Processes whose parent is this one: a stream source's DataLoader workers (their pipe: commands
    are the workers' children). Read from /proc; zombies (exited, not reaped) are listed too."""
    me, kids = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            kids.add(int(entry))
    return kids


def gone(pids: set[int]) -> bool:
    """No process in ``pids`` exists, neither running nor as a zombie (os.kill(pid, 0) succeeds for both)."""
    for pid in pids:
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            pass
    return True


def same_batches(a: tuple[list, list], b: tuple[list, list]) -> bool:
    return len(a[0]) == len(b[0]) and all(torch.equal(x, u) for x, u in zip(a[0] + a[1], b[0] + b[1]))


def fresh_epoch(folder: Path, epoch: int, start: int = 0, **overrides) -> tuple[list, list]:
    """``epoch`` from a new source (new workers), as every epoch was read before workers persisted."""
    src = two_ranks(folder, mode="stream", **overrides)[0]
    try:
        return run_epoch(src, epoch, start)
    finally:
        src.close()


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")


@needs_proc
@pytest.mark.parametrize("resampled", [False, True])
def test_stream_workers_persist_across_epochs_with_the_same_batches(shards, resampled):
    folder, _ = shards
    before = child_pids()
    src = two_ranks(folder, mode="stream", resampled=resampled)[0]
    got = run_epoch(src, 0)
    workers = child_pids() - before
    assert len(workers) == 2  # num_workers, alive after the epoch
    assert same_batches(got, fresh_epoch(folder, 0, resampled=resampled))
    for e in (1, 2):
        got = run_epoch(src, e)
        assert child_pids() - before == workers  # the same processes read every epoch
        assert same_batches(got, fresh_epoch(folder, e, resampled=resampled))
    straight = run_epoch(src, 1)
    tail = run_epoch(src, 1, start=4)  # resume mid-epoch: the tail of the straight epoch
    assert len(tail[0]) == 2 and same_batches(tail, (straight[0][4:], straight[1][4:]))
    assert same_batches(tail, fresh_epoch(folder, 1, start=4, resampled=resampled))
    assert child_pids() - before == workers
    src.close()
    assert gone(workers) and child_pids() - before == set()
    again = run_epoch(src, 2)  # a closed source starts new workers
    renewed = child_pids() - before
    assert len(renewed) == 2 and not renewed & workers
    assert same_batches(again, fresh_epoch(folder, 2, resampled=resampled))
    src.close()
    assert gone(renewed)


@needs_proc
def test_an_epoch_stopped_early_shuts_the_workers_down(shards):
    folder, _ = shards
    before = child_pids()
    src = two_ranks(folder, mode="stream")[0]
    run_epoch(src, 0)
    workers = child_pids() - before
    it = src.epoch(1)
    first = next(it)
    it.close()  # the consumer stops early
    assert gone(workers) and child_pids() - before == set()
    assert torch.equal(first[0], fresh_epoch(folder, 1)[0][0])
    for x, _ in src.epoch(2):  # a for loop left by break: the dropped generator is closed
        break
    del x
    assert child_pids() - before == set()
    assert same_batches(run_epoch(src, 2), fresh_epoch(folder, 2))  # new workers, same batches
    later = src.epoch(0)  # not started yet when the source is closed: it reads its epoch afterwards
    src.close()
    assert child_pids() - before == set()
    assert len(list(later)) == 6
    src.close()
    assert child_pids() - before == set()


def test_two_epochs_read_at_once_from_one_source(shards):
    """The second epoch started while the first is read gets its own loader; both are exact."""
    folder, _ = shards
    src = two_ranks(folder, mode="stream")[0]
    a, b = [], []
    for (x0, _), (x1, _) in zip(src.epoch(0), src.epoch(1)):
        a.append(ids(x0))
        b.append(ids(x1))
    src.close()
    assert a == [ids(x) for x in fresh_epoch(folder, 0)[0]] and len(a) == 6
    assert b == [ids(x) for x in fresh_epoch(folder, 1)[0]]


@needs_proc
def test_a_worker_error_ends_the_workers_and_a_later_epoch_recovers(shards, tmp_path):
    folder, _ = shards
    copy = tmp_path / "set"
    shutil.copytree(folder, copy)
    before = child_pids()
    src = two_ranks(copy, mode="stream")[0]
    good = run_epoch(src, 0)
    workers = child_pids() - before
    path = copy / "Training-000000.tar"
    original = path.read_bytes()
    path.write_bytes((copy / "Training-000002.tar").read_bytes())  # 16 samples where 40 were
    with pytest.raises(ShardError, match="Training-000000.tar holds 16 samples but the manifest says 40"):
        run_epoch(src, 0)
    assert gone(workers) and child_pids() - before == set()
    path.write_bytes(original)
    assert same_batches(run_epoch(src, 0), good)
    src.close()
    assert child_pids() - before == set()


# ------------------------------------------------------------------------------------ manifest checks


@pytest.fixture
def shard_copy(shards, tmp_path) -> Path:
    folder, _ = shards
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    for p in out.iterdir():
        p.chmod(0o644)
    return out


def build(folder: Path, mode: str, **kw):
    return build_loader(DataConfig(shards=str(folder), mode=mode, batch_size=8, **kw), rank=0, world_size=2,
                        device=CPU, seed=0)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_missing_shard_is_named(shard_copy, mode):
    (shard_copy / "Training-000001.tar").unlink()
    with pytest.raises(ShardError, match="Training-000001.tar.*missing"):
        build(shard_copy, mode)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_sha256_mismatch_with_verify(shard_copy, mode):
    path = shard_copy / "Training-000002.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF  # tar padding after the first sample's json: the shard still reads, only sha256 can tell
    path.write_bytes(bytes(data))
    build(shard_copy, mode, verify=False)  # not checked unless asked
    with pytest.raises(ShardError, match="Training-000002.tar.*sha256"):
        build(shard_copy, mode, verify=True)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_wrong_sample_count_is_named(shard_copy, mode):
    manifest = ShardManifest.load(shard_copy)
    info = manifest.split("Training")
    info.shards[0].count += 1  # the split total still adds up: only the real count can tell
    info.shards[1].count -= 1
    manifest.save(shard_copy)
    with pytest.raises(ShardError, match="Training-000000.tar holds 40 samples but the manifest says 41|"
                                         "Training-000001.tar holds more than the 39 samples"):
        list(build(shard_copy, mode).epoch(0))  # memory mode fails in build, stream mode while reading


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_truncated_shard_is_named(shard_copy, mode):
    path = shard_copy / "Training-000001.tar"
    path.write_bytes(path.read_bytes()[:30000])
    with pytest.raises(ShardError, match="Training-000001.tar (is truncated|holds)"):
        list(build(shard_copy, mode).epoch(0))


def test_missing_split_manifest_and_folder(shards, tmp_path):
    folder, _ = shards
    with pytest.raises(ShardError, match="split 'Validation' is not in the manifest"):
        build_loader(DataConfig(shards=str(folder), split="Validation"), rank=0, world_size=1, device=CPU, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no manifest.json"):
        build(tmp_path / "empty", "stream")
    with pytest.raises(ShardError, match="does not exist"):
        build(tmp_path / "nowhere", "memory")


def test_stream_refuses_a_shard_rewritten_after_the_start(shard_copy):
    src = build_loader(DataConfig(shards=str(shard_copy), mode="stream", batch_size=8, num_workers=1), rank=0,
                       world_size=1, device=CPU, seed=0)
    path = shard_copy / "Training-000000.tar"
    path.write_bytes((shard_copy / "Training-000002.tar").read_bytes())  # 16 samples where 40 were
    with pytest.raises(ShardError, match="Training-000000.tar holds 16 samples but the manifest says 40"):
        list(src.epoch(0))
    path.write_bytes((shard_copy / "Training-000001.tar").read_bytes())  # 40 again, but the manifest says 39:
    manifest = ShardManifest.load(shard_copy)
    info = manifest.split("Training")
    info.shards[0].count, info.shards[1].count = 39, 41
    manifest.save(shard_copy)
    with pytest.raises(ShardError, match="Training-000000.tar holds more than the 39 samples"):
        load_split(shard_copy, "Training")


def test_bad_png_is_named(shard_copy):
    import tarfile

    path = shard_copy / "PublicTest-000000.tar"
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".png")][3]
    data = bytearray(path.read_bytes())
    data[member.offset_data:member.offset_data + member.size] = b"\0" * member.size
    path.write_bytes(bytes(data))
    key = member.name.split(".")[0]
    with pytest.raises(ShardError, match=f"PublicTest-000000.tar: sample '{key}'"):
        load_split(shard_copy, "PublicTest")
    with pytest.raises(ShardError, match=f"PublicTest-000000.tar: sample '{key}'"):
        list(build_loader(DataConfig(shards=str(shard_copy), mode="stream", split="PublicTest", batch_size=5),
                          rank=0, world_size=1, device=CPU, seed=0).epoch(0))


# ------------------------------------------------------------------------------ two real processes


WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    from bicogan_dist.data.loader import DataConfig, build_loader

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    seen = {}
    for mode in ("stream", "memory"):
        src = build_loader(DataConfig(shards=sys.argv[1], mode=mode, batch_size=8, num_workers=2, shuffle_buffer=16),
                           rank=rank, world_size=world, device=torch.device("cpu"), seed=11)
        for epoch in range(2):
            ids = seen[f"{mode}{epoch}"] = []
            for x, y in src.epoch(epoch):
                px = x[:, 0, 0].to(torch.int64)
                ids += (px[:, 0] + 256 * px[:, 1]).tolist()
                dist.all_reduce(torch.ones(1))  # a DDP step: hangs if the ranks had unequal batch counts
    with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "world_size": world, "seen": seen}, fh)
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_real_processes_see_disjoint_covers(shards, tmp_path):
    """Two processes joined by gloo, each with 2 stream workers, then memory mode: disjoint covers."""
    folder, _ = shards
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(folder), str(tmp_path)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out.decode()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in results] == [2, 2] and [r["rank"] for r in results] == [0, 1]
    for key in ("stream0", "stream1", "memory0", "memory1"):
        a, b = (r["seen"][key] for r in results)
        assert len(a) == len(b) == 48, key
        assert not set(a) & set(b) and sorted(a + b) == list(range(96)), key
    assert results[0]["seen"]["stream0"] != results[0]["seen"]["stream1"]
    # A process sees exactly what the in-process simulation of its rank sees.
    for mode in ("stream", "memory"):
        simulated = build_loader(DataConfig(shards=str(folder), mode=mode, batch_size=8, num_workers=2,
                                            shuffle_buffer=16), rank=1, world_size=2, device=CPU, seed=11)
        assert [i for x, _ in simulated.epoch(1) for i in ids(x)] == results[1]["seen"][f"{mode}1"]


# -------------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_fer2013_training_split_in_memory(real_fer2013_shards):
    src = build_loader(DataConfig(shards=str(real_fer2013_shards), batch_size=128), rank=0, world_size=2,
                       device=CPU, seed=0)
    assert src.num_samples == 28273 and src.batches_per_epoch == 28273 // 256
    assert src.images.shape == (28273, 1, 48, 48)
    assert torch.bincount(src.labels).tolist() == ShardManifest.load(real_fer2013_shards).split("Training").class_counts
    x, y = next(src.epoch(0))
    assert x.shape == (128, 1, 48, 48) and y.shape == (128,)
