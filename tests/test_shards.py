"""The shard tool end to end on tiny real files: round trip, manifest, determinism, output safety, drop flags."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, FerRow, face, fer_rows

from bicogan_dist.data.manifest import ShardManifest, sha256_file
from bicogan_dist.data.readers import open_source
from bicogan_dist.data.shard_format import decode_sample
from bicogan_dist.data.records import FaceRecord
from bicogan_dist.data.shard_format import encode_sample
from bicogan_dist.cli.shard import main
from bicogan_dist.data.shards import TarShardWriter, write_split_shards, write_split_shards_parallel
from bicogan_dist.labels import EmotionLabels

FAST = ["--workers", "1", "--no-progress"]


def shard(source: Path | None, out: Path, *flags: str) -> int:
    args = ([str(source)] if source is not None else []) + ["--out", str(out), *FAST, *flags]
    return main(args)


def read_tar(path: Path) -> list[tuple[str, np.ndarray, int, dict]]:
    """(key, pixels, class index, metadata) of every sample, in tar order, decoded by the project's decoder."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return [(key, *decode_sample(s)) for key, s in samples.items()]


def read_split(out: Path, split: str) -> list[tuple[str, np.ndarray, int, dict]]:
    manifest = ShardManifest.load(out)
    return [s for path in manifest.shard_paths(out, split, verify=True) for s in read_tar(path)]


def folder_digests(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.iterdir())}


def assert_no_leftovers(out: Path) -> None:
    assert not list(out.parent.glob(f"{out.name}.tmp-*")) and not list(out.parent.glob(f"{out.name}.old-*"))


def test_round_trip_six_classes(tiny_fer_csv, tiny_rows, tmp_path):
    out = tmp_path / "shards"
    assert shard(tiny_fer_csv, out, "--shard-size", "3") == 0
    manifest = ShardManifest.load(out)
    six = EmotionLabels.six()
    assert manifest.label_names == list(six.names)
    assert manifest.dropped == {"disgust": sum(r.code == 1 for r in tiny_rows)}
    assert manifest.source == "fer2013.csv (Kaggle fer2013.csv)"
    for split in ("Training", "PublicTest", "PrivateTest"):
        expected = [(i, r) for i, r in enumerate(tiny_rows, start=1) if r.split == split and r.code != 1]
        samples = read_split(out, split)
        info = manifest.split(split)
        assert info.count == len(samples) == len(expected)
        assert len(info.shards) == -(-len(expected) // 3)
        assert info.class_counts == [sum(six.index_of_code(r.code) == c for _, r in expected) for c in range(6)]
        for n, ((key, pixels, cls, meta), (row_no, row)) in enumerate(zip(samples, expected)):
            assert key == f"{split.lower()}-{n:08d}"
            np.testing.assert_array_equal(pixels, row.pixels)
            assert cls == six.index_of_code(row.code)
            assert meta == {"fer_code": row.code, "source": f"fer2013.csv:row {row_no}", "split": split}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [e.file for s in manifest.splits.values() for e in s.shards])
    assert_no_leftovers(out)


def test_keep_disgust_gives_seven_classes(tiny_fer_csv, tiny_rows, tmp_path):
    assert shard(tiny_fer_csv, tmp_path / "six") == 0
    assert shard(tiny_fer_csv, tmp_path / "seven", "--keep-disgust") == 0
    six, seven = ShardManifest.load(tmp_path / "six"), ShardManifest.load(tmp_path / "seven")
    assert seven.label_names == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert seven.dropped == {}
    assert seven.image_count == len(tiny_rows) == six.image_count + six.dropped["disgust"]
    assert seven.split("Training").class_counts == [2] * 7
    assert [cls for _, _, cls, meta in read_split(tmp_path / "seven", "Training")] == [i % 7 for i in range(14)]
    assert six.quality == seven.quality  # the report covers everything read, whatever is kept


def test_same_input_gives_identical_bytes(tiny_fer_csv, tmp_path):
    for name in ("a", "b"):
        assert shard(tiny_fer_csv, tmp_path / name, "--shard-size", "4") == 0
    first, second = folder_digests(tmp_path / "a"), folder_digests(tmp_path / "b")
    assert first == second and len(first) > 3


@pytest.mark.parametrize("count", [0, 1, 2, 5, 40])
def test_tar_writer_writes_what_webdataset_writes(tmp_path, count):
    """TarShardWriter is a fast stand-in for webdataset.TarWriter with the shard settings: same bytes."""
    wds = pytest.importorskip("webdataset")
    samples = [encode_sample(FaceRecord(face(i), i % 7, "PrivateTest", f"fer2013.csv:row {i + 1}"), i % 7, i)
               for i in range(count)]
    ours, theirs = TarShardWriter(tmp_path / "ours.tar"), wds.TarWriter(
        str(tmp_path / "theirs.tar"), mtime=0, user="bicogan", group="bicogan", mode=0o444)
    for sample in samples:
        ours.write(sample)
        theirs.write(sample)
    ours.close()
    theirs.close()
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "theirs.tar").read_bytes()
    if count == 0:
        return  # webdataset refuses an empty shard ("No samples found"); the writer never makes one
    loaded = [decode_sample(s) for s in wds.WebDataset(str(tmp_path / "ours.tar"), shardshuffle=False)]
    assert len(loaded) == count
    for i, (pixels, cls, meta) in enumerate(loaded):
        np.testing.assert_array_equal(pixels, face(i))
        assert cls == i % 7 and meta == {"fer_code": i % 7, "source": f"fer2013.csv:row {i + 1}",
                                         "split": "PrivateTest"}


@pytest.fixture(scope="module")
def pool():
    with multiprocessing.get_context("spawn").Pool(2) as p:
        yield p


def test_worker_pool_changes_no_byte(write_fer_csv, tmp_path, pool):
    """Parallel parsing and PNG encoding (what big inputs get) write exactly what the serial path writes."""
    rows = fer_rows({"Training": 90, "PublicTest": 10})
    src = write_fer_csv(rows)
    serial = list(open_source(src).records())
    parallel = list(open_source(src).records(partial(pool.imap, chunksize=8)))
    assert [r.source for r in serial] == [r.source for r in parallel]
    six = EmotionLabels.seven()
    (tmp_path / "s").mkdir()
    (tmp_path / "p").mkdir()
    a = write_split_shards(serial, "Training", six, tmp_path / "s", shard_size=40)
    b = write_split_shards_parallel(parallel, "Training", six, tmp_path / "p", shard_size=40, pool=pool)
    assert a == b and len(a[0]) == 3
    assert folder_digests(tmp_path / "s") == folder_digests(tmp_path / "p")


def test_refuses_to_overwrite_then_force_replaces_everything(tiny_fer_csv, tmp_path, capsys):
    out = tmp_path / "shards"
    assert shard(tiny_fer_csv, out, "--shard-size", "2") == 0
    before = folder_digests(out)
    capsys.readouterr()
    assert shard(tiny_fer_csv, out, "--shard-size", "50") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already holds shards" in err and "--force" in err
    assert folder_digests(out) == before
    assert shard(tiny_fer_csv, out, "--shard-size", "50", "--force") == 0
    manifest = ShardManifest.load(out)
    assert sorted(p.name for p in out.iterdir()) == ["PrivateTest-000000.tar", "PublicTest-000000.tar",
                                                     "Training-000000.tar", "manifest.json"]
    assert all(len(s.shards) == 1 for s in manifest.splits.values())  # no stale shard of the old run left
    assert_no_leftovers(out)


def test_output_with_foreign_files_is_never_replaced(tiny_fer_csv, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert shard(tiny_fer_csv, out, "--force") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} is not empty") and "thesis.tex" in err and "even with --force" in err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert shard(tiny_fer_csv, empty) == 0  # an empty folder is fine


@pytest.mark.parametrize("existing", [False, True])
def test_bad_input_leaves_nothing(write_fer_csv, tiny_rows, tiny_fer_csv, tmp_path, capsys, existing):
    out = tmp_path / "shards"
    if existing:
        assert shard(tiny_fer_csv, out) == 0
    before = folder_digests(out) if existing else None
    bad = write_fer_csv(tiny_rows, name="bad.csv")
    lines = bad.read_text().splitlines()
    lines[20] = lines[20].replace(" ", " 300 ", 1)
    bad.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert shard(bad, out, "--force") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.csv: row 20 (line 21): field 'pixels'" in err
    assert (folder_digests(out) == before) if existing else not out.exists()
    assert_no_leftovers(out)


def test_cli_script_exit_code_and_message(tmp_path):
    empty = tmp_path / "fer2013.csv"
    empty.write_text("")
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "shard_fer2013.py"), str(empty), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "fer2013.csv" in proc.stderr and "empty file" in proc.stderr
    assert not out.exists()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped (what a kill -9 leaves behind)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folder_of_a_killed_run_is_removed_a_live_one_kept(tmp_path):
    """Fault 9: a shard run killed with SIGKILL leaves <out>.tmp-...; the next run removes it, never a live run's."""
    import socket

    out = tmp_path / "shards"
    host = socket.gethostname()
    stale = tmp_path / f"shards.tmp-{host}-{dead_pid()}-0badc0de"
    live = tmp_path / f"shards.tmp-{host}-{os.getpid()}-5afe5afe"
    elsewhere = tmp_path / f"shards.tmp-{host}.other-{dead_pid()}-0e15e0e1"  # another host: cannot tell, keep
    for folder in (stale, live, elsewhere):
        folder.mkdir()
        (folder / "Training-000000.tar").write_bytes(b"partial" * 1000)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "shard_fer2013.py"), "--no-progress", "--synthetic",
                           "12", "--out", str(out), "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists()
    assert f"removed {stale}" in proc.stdout
    assert live.is_dir() and (live / "Training-000000.tar").is_file()
    assert elsewhere.is_dir()
    assert ShardManifest.load(out).image_count == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["shards", live.name, elsewhere.name])


def test_options_and_source_may_be_mixed_and_console_script_reports_an_occupied_out(tiny_fer_csv, tmp_path):
    out = tmp_path / "shards"
    script = Path(sys.executable).with_name("bicogan-shard")
    assert script.is_file(), "pip install -e . registers the console scripts"
    first = subprocess.run([str(script), "--out", str(out), "--no-progress", str(tiny_fer_csv), "--workers", "1"],
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([str(script), "--no-progress", str(tiny_fer_csv), "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert again.stderr == f"error: {out} already holds shards; pass --force to replace it, or pick another --out\n"


@pytest.fixture
def flawed_csv(write_fer_csv) -> Path:
    """Tiny CSV with a same-label duplicate, a conflicting pair, a PublicTest leak and an all-black image."""
    rows = fer_rows({"Training": 10, "PublicTest": 4, "PrivateTest": 4}, seed=3)
    a, b = face(9001), face(9002)
    rows += [FerRow(3, a, "Training"), FerRow(3, a, "Training"),  # duplicate, same label
             FerRow(4, b, "Training"), FerRow(6, b, "Training"),  # conflicting labels
             FerRow(3, a, "PublicTest"),  # leak (and a duplicate of a)
             FerRow(0, np.zeros((48, 48), np.uint8), "PrivateTest")]  # blank
    return write_fer_csv(rows)


@pytest.mark.parametrize("flags, dropped", [
    ([], {"disgust": 4}),
    (["--drop-duplicates"], {"disgust": 4, "conflicting_labels": 2, "duplicates": 2}),
    (["--drop-leaks"], {"disgust": 4, "leaks": 1}),
    (["--drop-blank"], {"disgust": 4, "blank": 1}),
    (["--drop-duplicates", "--drop-leaks", "--drop-blank", "--keep-disgust"],
     {"blank": 1, "conflicting_labels": 2, "duplicates": 2, "leaks": 0}),
])
def test_drop_flags_are_recorded(flawed_csv, tmp_path, flags, dropped):
    out = tmp_path / "shards"
    assert shard(flawed_csv, out, *flags) == 0
    manifest = ShardManifest.load(out)
    assert manifest.dropped == dropped
    assert manifest.image_count == 24 - sum(dropped.values())
    assert manifest.quality["duplicate_groups"] == 2 and manifest.quality["leaked"]["PublicTest"] == 1


def test_image_folder_to_test_split(tmp_path):
    from PIL import Image

    root = tmp_path / "export"
    for split, emotion, seed in [("train", "happy", 1), ("train", "disgust", 2), ("test", "fear", 3)]:
        (root / split / emotion).mkdir(parents=True, exist_ok=True)
        Image.fromarray(face(seed), "L").save(root / split / emotion / f"{seed}.png")
    out = tmp_path / "shards"
    assert shard(root, out) == 0
    manifest = ShardManifest.load(out)
    assert {k: v.count for k, v in manifest.splits.items()} == {"Training": 1, "Test": 1}
    [(key, pixels, cls, meta)] = read_split(out, "Test")
    assert key == "test-00000000" and meta["source"] == "test/fear/3.png" and cls == 1
    np.testing.assert_array_equal(pixels, face(3))


def test_torchvision_folder_records_skipped_rows(write_fer_csv, tmp_path, capsys):
    folder = tmp_path / "fer2013"
    write_fer_csv(fer_rows({"Training": 7}), name="train.csv", layout="torchvision-train", folder=folder)
    write_fer_csv(fer_rows({"Training": 5}), name="test.csv", layout="torchvision-test", folder=folder)
    assert shard(folder, tmp_path / "shards") == 0
    assert "skipped 5 unlabelled rows" in capsys.readouterr().out
    manifest = ShardManifest.load(tmp_path / "shards")
    assert manifest.dropped == {"disgust": 1, "unlabelled": 5}
    assert {k: v.count for k, v in manifest.splits.items()} == {"Training": 6}
    assert manifest.quality["reader"]["files"] == ["train.csv", "test.csv (unlabelled, skipped)"]


def test_synthetic(tmp_path):
    pytest.importorskip("bicogan_dist.data.synthetic")
    out = tmp_path / "synthetic"
    assert shard(None, out, "--synthetic", "60", "--seed", "1") == 0
    manifest = ShardManifest.load(out)
    assert manifest.image_count + manifest.dropped.get("disgust", 0) == 60
    assert manifest.source == "synthetic (n=60, seed=1)"
    assert len(manifest.label_names) == 6


def test_source_xor_synthetic(tiny_fer_csv, tmp_path):
    with pytest.raises(SystemExit) as exc:
        shard(tiny_fer_csv, tmp_path / "x", "--synthetic", "5")
    assert exc.value.code == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_real_fer2013_default_split_counts(real_fer2013_shards):
    """Six classes, nothing else dropped: the paper's 28,273 Training images and the canonical test splits."""
    manifest = ShardManifest.load(real_fer2013_shards)
    assert {k: v.count for k, v in manifest.splits.items()} == {
        "Training": 28273, "PublicTest": 3533, "PrivateTest": 3534}
    assert manifest.image_count == 35340
    assert manifest.dropped == {"disgust": 547}
    assert manifest.split("Training").class_counts == [3995, 4097, 7215, 4830, 3171, 4965]
    assert manifest.split("PublicTest").class_counts == [467, 496, 895, 653, 415, 607]
    assert manifest.split("PrivateTest").class_counts == [491, 528, 879, 594, 416, 626]
    for split in manifest.splits:
        manifest.shard_paths(real_fer2013_shards, split, verify=True)
    data = json.loads((real_fer2013_shards / "manifest.json").read_text())
    assert data["image_count"] == 35340


def test_upload_to_prints_the_upload_commands_and_the_shards_value(tiny_fer_csv, tmp_path, capsys):
    out = tmp_path / "fer"
    assert shard(tiny_fer_csv, out, "--upload-to", "s3://bkt/sets/fer/") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-5:] == ["# upload (manifest last):",
                          f"aws s3 sync {out}/ s3://bkt/sets/fer/ --exclude manifest.json",
                          f"aws s3 cp {out}/manifest.json s3://bkt/sets/fer/manifest.json",
                          "# then train with:", "data.shards='pipe:aws s3 cp s3://bkt/sets/fer/{} -'"]
    assert ShardManifest.load(out).image_count > 0  # written locally as without the flag
    assert shard(tiny_fer_csv, tmp_path / "gs", "--upload-to", "gs://bkt/fer") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "data.shards='pipe:gsutil cat gs://bkt/fer/{}'"
    with pytest.raises(SystemExit) as exc:
        shard(tiny_fer_csv, tmp_path / "x", "--upload-to", "ftp://host/fer")
    assert exc.value.code == 2 and "--upload-to must start with one of s3://" in capsys.readouterr().err
