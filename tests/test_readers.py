"""Readers: every FER2013 layout on tiny real files, and every kind of bad input named precisely."""
from __future__ import annotations

import gzip
import multiprocessing
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import FerRow, face, fer_rows, pixel_text
from PIL import Image

from bicogan_dist.data.readers import DataFormatError, open_source, parse_pixels
from bicogan_dist.cli.shard import main


def assert_records_match(records, rows: list[FerRow], source_prefix: str) -> None:
    assert len(records) == len(rows)
    for i, (record, row) in enumerate(zip(records, rows), start=1):
        assert record.pixels.dtype == np.uint8 and record.pixels.shape == (48, 48)
        np.testing.assert_array_equal(record.pixels, row.pixels)
        assert (record.fer_code, record.split) == (row.code, row.split)
        assert record.source == f"{source_prefix}:row {i}"


# ------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("gz", [False, True])
def test_kaggle_csv_plain_and_gzip(write_fer_csv, tiny_rows, gz):
    name = "fer2013.csv.gz" if gz else "fer2013.csv"
    src = open_source(write_fer_csv(tiny_rows, name=name, gz=gz))
    assert src.layout == "Kaggle fer2013.csv"
    assert_records_match(list(src.records()), tiny_rows, name)
    assert src.report.records == len(tiny_rows)


def test_windows_line_ends_and_byte_order_mark(write_fer_csv, tiny_rows):
    path = write_fer_csv(tiny_rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert_records_match(list(open_source(path).records()), tiny_rows, "fer2013.csv")


def test_gzip_is_told_by_content_not_name(write_fer_csv, tiny_rows):
    src = open_source(write_fer_csv(tiny_rows, name="fer2013.csv", gz=True))
    assert_records_match(list(src.records()), tiny_rows, "fer2013.csv")


def test_icml_csv_with_spaced_column_names(write_fer_csv, tiny_rows):
    path = write_fer_csv(tiny_rows, name="icml_face_data.csv", layout="icml")
    assert path.read_text().splitlines()[0] == "emotion, Usage, pixels"
    src = open_source(path)
    assert src.layout == "icml_face_data.csv"
    assert_records_match(list(src.records()), tiny_rows, "icml_face_data.csv")


def test_folder_holding_a_kaggle_file(write_fer_csv, tiny_rows, tmp_path):
    write_fer_csv(tiny_rows, name="fer2013.csv.gz", gz=True, folder=tmp_path / "data")
    assert_records_match(list(open_source(tmp_path / "data").records()), tiny_rows, "fer2013.csv.gz")


def test_torchvision_folder_skips_unlabelled_test_csv(write_fer_csv, tmp_path):
    train = fer_rows({"Training": 9}, seed=1)
    test = fer_rows({"Training": 4}, seed=2)
    folder = tmp_path / "root" / "fer2013"
    write_fer_csv(train, name="train.csv", layout="torchvision-train", folder=folder)
    write_fer_csv(test, name="test.csv", layout="torchvision-test", folder=folder)
    assert '"' in (folder / "train.csv").read_text().splitlines()[1]  # quoted pixels, as torchvision's file
    src = open_source(folder)
    assert src.layout == "torchvision fer2013/"
    assert_records_match(list(src.records()), train, "train.csv")
    assert src.report.skipped_unlabelled == 4
    assert "skipped 4 unlabelled rows" in " ".join(src.report.lines())
    # the torchvision root (the folder holding fer2013/) works too, with paths relative to it
    root = open_source(tmp_path / "root")
    assert_records_match(list(root.records()), train, "fer2013/train.csv")


def test_torchvision_train_csv_named_directly(write_fer_csv):
    rows = fer_rows({"Training": 3})
    src = open_source(write_fer_csv(rows, name="train.csv", layout="torchvision-train"))
    assert_records_match(list(src.records()), rows, "train.csv")


def test_image_folder_converts_any_image(tmp_path):
    root = tmp_path / "export"
    exact = face(1)
    (root / "train" / "happy").mkdir(parents=True)
    (root / "train" / "Angry").mkdir(parents=True)  # emotion names are case-insensitive
    (root / "test" / "sad").mkdir(parents=True)
    Image.fromarray(exact, "L").save(root / "train" / "happy" / "a.png")
    Image.fromarray(face(2), "L").save(root / "train" / "Angry" / "z.jpg", quality=95)
    rgb = np.random.default_rng(3).integers(0, 256, size=(80, 100, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(root / "test" / "sad" / "b.JPEG")
    (root / "train" / "happy" / "notes.txt").write_text("not an image")
    src = open_source(root)
    assert src.layout == "image folder"
    records = list(src.records())
    assert [r.source for r in records] == ["test/sad/b.JPEG", "train/Angry/z.jpg", "train/happy/a.png"]
    assert [(r.split, r.fer_code) for r in records] == [("Test", 4), ("Training", 0), ("Training", 3)]
    assert all(r.pixels.shape == (48, 48) and r.pixels.dtype == np.uint8 for r in records)
    np.testing.assert_array_equal(records[2].pixels, exact)  # lossless PNG: exact round trip
    assert src.report.converted_images == 1  # only the RGB 100x80 one
    assert src.report.ignored_files == 1
    assert "converted 1 images" in " ".join(src.report.lines())


def test_multiline_quoted_rows_keep_row_and_line_numbers(tmp_path):
    rows = fer_rows({"Training": 3})
    lines = ["emotion,pixels,Usage"]
    for row in rows:
        text = pixel_text(row.pixels)
        cut = text.index(" ", 50)
        lines.append(f'{row.code},"{text[:cut]}\n{text[cut + 1:]}",{row.split}')  # quoted field over two lines
    lines.append(f"0,{pixel_text(rows[0].pixels)},Nowhere")
    path = tmp_path / "fer2013.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"row 4 \(line 8\)"):
        records = []
        for r in open_source(path).records():
            records.append(r)
    assert_records_match(records, rows, "fer2013.csv")


def test_parallel_map_gives_the_same_records_and_errors(write_fer_csv, tmp_path):
    rows = fer_rows({"Training": 20, "PublicTest": 5, "PrivateTest": 5})
    path = write_fer_csv(rows)
    bad = tmp_path / "bad" / "fer2013.csv"
    bad.parent.mkdir()
    text = path.read_text().splitlines()
    text[25] = text[25].replace("PublicTest", "Public")
    bad.write_text("\n".join(text) + "\n")
    cut = write_fer_csv(rows, name="cut.csv.gz", gz=True)
    cut.write_bytes(cut.read_bytes()[:-2000])
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        imap = partial(pool.imap, chunksize=4)
        parallel = list(open_source(path).records(imap))
        parallel_errors = []
        for source in (bad, cut):  # an error found by a worker, and one found while reading the file
            with pytest.raises(DataFormatError) as err:
                list(open_source(source).records(imap))
            parallel_errors.append(str(err.value))
    assert_records_match(parallel, rows, "fer2013.csv")
    serial_errors = []
    for source in (bad, cut):
        with pytest.raises(DataFormatError) as err:
            list(open_source(source).records())
        serial_errors.append(str(err.value))
    assert parallel_errors == serial_errors
    assert "row 25 (line 26)" in serial_errors[0] and "truncated" in serial_errors[1]


def test_parse_pixels_fast_path_accepts_any_whitespace():
    px = face(7)
    text = pixel_text(px)
    np.testing.assert_array_equal(parse_pixels(text, "f", "row 1"), px)
    np.testing.assert_array_equal(parse_pixels("  " + text.replace(" ", " \t ") + " \n", "f", "row 1"), px)


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture
def rejected(tmp_path, capsys):
    """Shard ``source`` through the CLI; assert it fails with exit 2 and writes nothing; return the message."""

    def run(source: Path) -> str:
        out = tmp_path / "out" / "shards"
        capsys.readouterr()
        assert main([str(source), "--out", str(out), "--workers", "1", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ")
        assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
        return err[len("error: "):].strip()

    return run


def good_line(code: int = 3, split: str = "Training", seed: int = 0) -> str:
    return f"{code},{pixel_text(face(seed))},{split}"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def pixels_with(index: int, token: str) -> str:
    tokens = pixel_text(face(0)).split()
    tokens[index] = token
    return " ".join(tokens)


BAD_ROWS = {
    "too few pixels": (f"3,{' '.join(['1'] * 2303)},Training", ["'pixels'", "2304", "found 2303"]),
    "too many pixels": (f"3,{' '.join(['1'] * 2305)},Training", ["'pixels'", "2304", "found 2305"]),
    "non-numeric pixel": (f"3,{pixels_with(4, 'x7')},Training", ["'pixels'", "non-numeric pixel 5 'x7'"]),
    "float pixel": (f"3,{pixels_with(9, '12.5')},Training", ["'pixels'", "non-numeric pixel 10 '12.5'"]),
    "pixel above 255": (f"3,{pixels_with(6, '256')},Training", ["'pixels'", "0..255", "pixel 7 = 256"]),
    "negative pixel": (f"3,{pixels_with(0, '-1')},Training", ["'pixels'", "0..255", "pixel 1 = -1"]),
    "unknown emotion": (good_line(code=7), ["'emotion'", "0..6", "found '7'"]),
    "non-numeric emotion": (good_line().replace("3,", "happy,", 1), ["'emotion'", "found 'happy'"]),
    "unknown split": (good_line(split="Validation"), ["'Usage'", "PublicTest", "found 'Validation'"]),
    "missing field": ("3,1 2 3", ["expected 3 fields (emotion,pixels,Usage)", "found 2", "truncated"]),
    "extra field": (good_line() + ",extra", ["expected 3 fields", "found 4"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_is_named_by_file_row_line_and_field(tmp_path, case, rejected):
    line, expected = BAD_ROWS[case]
    path = write_lines(tmp_path / "fer2013.csv", ["emotion,pixels,Usage", good_line(seed=1), "", line, good_line()])
    msg = rejected(path)
    assert str(path) in msg and "row 2 (line 4)" in msg  # the blank line 3 is not a row
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_icml_errors_use_the_stripped_column_name(tmp_path, rejected):
    path = write_lines(tmp_path / "icml_face_data.csv",
                       ["emotion, Usage, pixels", f"3,Training,{pixel_text(face(0))}", "3,Nowhere,1 2"])
    assert re.search(r"row 2 \(line 3\): field 'Usage': .*found 'Nowhere'", rejected(path))


@pytest.mark.parametrize("header, missing", [("emotion,Usage", "pixels"), ("pixels,Usage", "emotion"),
                                             ("emotion,pixels", "usage"), ("a,b,c", "emotion, pixels, usage")])
def test_missing_column(tmp_path, header, missing, rejected):
    path = write_lines(tmp_path / "fer2013.csv", [header, "3,1 2,Training"])
    msg = rejected(path)
    assert str(path) in msg and f"(missing {missing})" in msg


def test_empty_file_and_header_only(tmp_path, rejected):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert re.search(r"empty\.csv: expected a CSV header .*found an empty file", rejected(empty))
    header_only = write_lines(tmp_path / "fer2013.csv", ["emotion,pixels,Usage"])
    assert re.search(r"fer2013\.csv: expected data rows after the header, found none", rejected(header_only))


def test_truncated_gzip(write_fer_csv, tiny_rows, rejected):
    path = write_fer_csv(tiny_rows, name="fer2013.csv.gz", gz=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    msg = rejected(path)
    assert str(path) in msg and "truncated" in msg and "after row" in msg


def test_corrupt_gzip(tmp_path, rejected):
    path = tmp_path / "fer2013.csv.gz"
    path.write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    assert re.search("fer2013.csv.gz", rejected(path))


def test_last_row_cut_short(write_fer_csv, tiny_rows, rejected):
    path = write_fer_csv(tiny_rows)
    data = path.read_text()
    path.write_text(data[: len(data) - 3000])  # mid-pixels of the last row, no Usage, no newline
    msg = rejected(path)
    assert f"row {len(tiny_rows)} (line {len(tiny_rows) + 1})" in msg
    assert "found 2 (row cut short: truncated file?)" in msg


def test_unclosed_quote_at_end(tmp_path, rejected):
    path = write_lines(tmp_path / "train.csv", ["emotion,pixels", f'3,"{pixel_text(face(0))}"', '3,"1 2 3'])
    assert re.search(r"row 2 \(line 3\): expected a closing quote", rejected(path))


def test_unreadable_image(tmp_path, rejected):
    bad = tmp_path / "export" / "train" / "fear" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    msg = rejected(tmp_path / "export")
    assert str(bad) in msg and "expected a readable JPEG or PNG image" in msg


def test_truncated_image(tmp_path, rejected):
    path = tmp_path / "export" / "test" / "happy" / "cut.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(face(0), "L").save(path)
    path.write_bytes(path.read_bytes()[:200])
    assert re.search("cut.png: expected a readable JPEG or PNG image", rejected(tmp_path / "export"))


def test_unknown_emotion_folder(tmp_path, rejected):
    folder = tmp_path / "export" / "train" / "happyy"
    folder.mkdir(parents=True)
    Image.fromarray(face(0), "L").save(folder / "a.png")
    msg = rejected(tmp_path / "export")
    assert str(folder) in msg and "'emotion folder name'" in msg
    assert "angry, disgust, fear" in msg and "'happyy'" in msg


def test_unknown_layout_and_missing_path(tmp_path, rejected):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("hi")
    assert re.search("stuff: expected fer2013.csv", rejected(tmp_path / "stuff"))
    assert re.search("no such file or folder", rejected(tmp_path / "nowhere.csv"))


def test_torchvision_folder_without_labels(write_fer_csv, tmp_path, rejected):
    write_fer_csv(fer_rows({"Training": 2}), name="test.csv", layout="torchvision-test", folder=tmp_path / "tv")
    assert re.search("expected a labelled train.csv", rejected(tmp_path / "tv"))


def test_gzip_content_error_names_the_row(tmp_path, rejected):
    path = tmp_path / "fer2013.csv.gz"
    lines = ["emotion,pixels,Usage", good_line(), good_line(code=9)]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    assert re.search(r"fer2013\.csv\.gz: row 2 \(line 3\): field 'emotion'", rejected(path))
