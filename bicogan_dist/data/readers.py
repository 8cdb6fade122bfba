"""Readers for the layouts FER2013 comes in, auto-detected, all yielding :class:`FaceRecord`.

Supported layouts (``open_source`` tells them apart by file header or folder contents):

* **Kaggle CSV** ``fer2013.csv`` (plain or gzip): header ``emotion,pixels,Usage``.
* **ICML CSV** ``icml_face_data.csv``: header ``emotion, Usage, pixels`` (names carry
  leading spaces; columns are matched by stripped, case-insensitive name, not position).
* **torchvision folder** ``fer2013/`` with ``train.csv`` (``emotion,pixels``; every row is
  split Training) and ``test.csv`` (only ``pixels``: unlabelled, so skipped and counted; a
  ``test.csv`` that does carry ``emotion`` goes to split Test). A folder that also holds
  ``fer2013.csv[.gz]`` or ``icml_face_data.csv`` is read from that file instead, as it has
  all three labelled splits. The torchvision *root* (the folder holding ``fer2013/``) works too.
* **Image folder** ``ROOT/{train,test}/<emotion name>/*.{jpg,jpeg,png}``: any size or colour,
  converted to 48x48 grayscale (centre-cropped to square first); train → Training,
  test → Test (the merged test split: such exports do not keep PublicTest/PrivateTest apart).

Numbering, used in ``FaceRecord.source`` and in error messages: ``row N`` is the N-th
data row of a CSV, counting from 1 after the header and skipping blank lines; errors
also give the physical ``line`` of the file. Image records use their path relative to ROOT.

All bad input raises one exception type, :class:`DataFormatError`, whose message names the
file, the row/line or image, the field, what was expected and what was found.
"""
from __future__ import annotations

import csv
import gzip
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

import numpy as np
from PIL import Image, ImageOps

from bicogan_dist.data.records import IMAGE_SIZE, FaceRecord
from bicogan_dist.labels import FER_CODE_NAMES, SPLITS

PIXEL_COUNT = IMAGE_SIZE * IMAGE_SIZE
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
#: Image-folder split directory names (lower-cased) → canonical split.
FOLDER_SPLITS = {"train": "Training", "training": "Training", "test": "Test",
                 "publictest": "PublicTest", "privatetest": "PrivateTest"}
KAGGLE_FILES = ("fer2013.csv", "fer2013.csv.gz", "icml_face_data.csv", "icml_face_data.csv.gz")
_GZIP_MAGIC = b"\x1f\x8b"


class DataFormatError(ValueError):
    """Input that is not valid FER2013 data; the message says where, which field and what was expected.

    Single-argument constructor so it pickles across worker processes unchanged.
    """


def data_error(file: str | Path, where: str | None, field_name: str | None, expected: str,
               found: str | None = None) -> DataFormatError:
    """Build the one message shape every reader uses: ``FILE: WHERE: field 'F': expected E, found X``."""
    parts = [str(file)]
    if where:
        parts.append(where)
    if field_name:
        parts.append(f"field {field_name!r}")
    msg = ": ".join(parts) + f": expected {expected}"
    if found is not None:
        msg += f", found {found}"
    return DataFormatError(msg)


def _clip(text: str, limit: int = 40) -> str:
    text = text if len(text) <= limit else text[:limit] + "..."
    return repr(text)


def parse_pixels(text: str, file: str | Path, where: str, field_name: str = "pixels") -> np.ndarray:
    """2304 space-separated grey levels → uint8 (48, 48).

    Fast path: one C-level ``np.fromstring`` call plus a range check (the real file parses in
    ~3 s). Only when that fails does the slow token-by-token path run, to name the exact
    pixel that is wrong.
    """
    try:
        values = np.fromstring(text, dtype=np.int64, sep=" ")
    except ValueError:
        values = None
    if values is not None and values.size == PIXEL_COUNT and values.min() >= 0 and values.max() <= 255:
        return values.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
    return _parse_pixels_slow(text, file, where, field_name)


def _parse_pixels_slow(text: str, file: str | Path, where: str, field_name: str) -> np.ndarray:
    tokens = text.split()
    if len(tokens) != PIXEL_COUNT:
        raise data_error(file, where, field_name, f"{PIXEL_COUNT} space-separated grey levels (48x48)",
                         str(len(tokens)))
    values = np.empty(PIXEL_COUNT, dtype=np.uint8)
    for i, token in enumerate(tokens):
        try:
            value = int(token)
        except ValueError:
            raise data_error(file, where, field_name, "integer grey levels 0..255",
                             f"non-numeric pixel {i + 1} {_clip(token)}") from None
        if not 0 <= value <= 255:
            raise data_error(file, where, field_name, "grey levels in 0..255",
                             f"pixel {i + 1} = {value}")
        values[i] = value
    return values.reshape(IMAGE_SIZE, IMAGE_SIZE)


def parse_emotion(text: str, file: str | Path, where: str, field_name: str = "emotion") -> int:
    """A FER2013 emotion code 0..6."""
    try:
        code = int(text.strip())
    except ValueError:
        code = -1
    if not 0 <= code < len(FER_CODE_NAMES):
        raise data_error(file, where, field_name,
                         f"an emotion code 0..{len(FER_CODE_NAMES) - 1} ({', '.join(FER_CODE_NAMES)})", _clip(text))
    return code


def parse_split(text: str, file: str | Path, where: str, field_name: str = "Usage") -> str:
    """A split name from ``SPLITS`` (exact, surrounding spaces ignored)."""
    name = text.strip()
    if name not in SPLITS:
        raise data_error(file, where, field_name, f"a split name, one of {', '.join(SPLITS)}", _clip(text))
    return name


@dataclass
class ReadReport:
    """What a reader did besides yielding records: skipped and converted inputs, for the user and the manifest."""

    layout: str = ""
    files: list[str] = field(default_factory=list)
    records: int = 0
    skipped_unlabelled: int = 0  # rows of torchvision's test.csv, which has no labels
    converted_images: int = 0  # image-folder files that were not already 48x48 grayscale
    ignored_files: int = 0  # non-image files inside image-folder emotion folders

    def to_dict(self) -> dict:
        return {"layout": self.layout, "files": list(self.files), "records": self.records,
                "skipped_unlabelled": self.skipped_unlabelled, "converted_images": self.converted_images,
                "ignored_files": self.ignored_files}

    def lines(self) -> list[str]:
        out = [f"read {self.records:,} labelled images: {self.layout} ({', '.join(self.files)})"]
        if self.skipped_unlabelled:
            out.append(f"skipped {self.skipped_unlabelled:,} unlabelled rows (test.csv has no emotion column)")
        if self.converted_images:
            out.append(f"converted {self.converted_images:,} images to 48x48 grayscale")
        if self.ignored_files:
            out.append(f"ignored {self.ignored_files:,} non-image files")
        return out


# --------------------------------------------------------------------------------------------- CSV


def _open_text(path: Path) -> TextIO:
    """Text stream over a plain or gzip CSV (gzip told by its magic bytes, not the file name)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    raw = gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


_READ_ERRORS = (EOFError, OSError, zlib.error, UnicodeDecodeError, csv.Error)


def _read_failure(path: Path, where: str, exc: BaseException) -> DataFormatError:
    if isinstance(exc, EOFError):
        what = "the gzip stream ends early (truncated file)"
    elif isinstance(exc, (gzip.BadGzipFile, zlib.error)):
        what = f"corrupt gzip data ({exc})"
    elif isinstance(exc, UnicodeDecodeError):
        what = f"text that is not UTF-8 ({exc.reason} at byte {exc.start} of a block)"
    else:
        what = f"unreadable data ({type(exc).__name__}: {exc})"
    return data_error(path, where, None, "a complete CSV file", what)


@dataclass(frozen=True)
class _CsvColumns:
    """Where the needed columns are in one CSV, plus what a row job needs to become a record."""

    path: str
    source_name: str
    default_split: str | None
    names: tuple[str, ...]  # header as written
    emotion: int | None
    pixels: int
    usage: int | None


def _read_header(path: Path) -> list[str]:
    try:
        with _open_text(path) as fh:
            header = next(csv.reader(fh), None)
    except _READ_ERRORS as exc:
        raise _read_failure(path, "header", exc) from None
    if not header or all(not h.strip() for h in header):
        raise data_error(path, None, None, "a CSV header (emotion,pixels,Usage)", "an empty file")
    return header


def _columns(path: Path, header: list[str], need_usage: bool, need_emotion: bool, source_name: str = "",
             default_split: str | None = None) -> _CsvColumns:
    keys = [h.strip().lower() for h in header]
    wanted = ["emotion"] * need_emotion + ["pixels"] + ["usage"] * need_usage
    missing = [w for w in wanted if w not in keys]
    if missing:
        raise data_error(path, "header", None,
                         f"columns {', '.join(wanted)} (missing {', '.join(missing)})", _clip(",".join(header), 80))
    find = lambda name: keys.index(name) if name in keys else None  # noqa: E731
    return _CsvColumns(str(path), source_name, default_split, tuple(header), find("emotion"), keys.index("pixels"),
                       find("usage"))


def _csv_row_texts(path: Path) -> Iterator[tuple[int, int, str]]:
    """(row number, first line number, text) of every data row; the CSV is split into fields later, in workers.

    Only the cheap work happens here (decompression and finding row ends): a row ends at a line
    end outside quotes, told by an even count of ``"`` so far, so quoted multi-line fields
    stay whole. Blank lines are skipped and not counted as rows.
    """
    row_no, line_no = 0, 1
    pending: list[str] = []
    quotes = 0
    start_line = 0
    try:
        with _open_text(path) as fh:
            next(fh, None)  # header, validated by _read_header (a quoted multi-line header is not supported)
            for line in fh:
                line_no += 1
                if not pending:
                    if line.count('"') == 0:
                        if line.strip("\r\n"):
                            row_no += 1
                            yield row_no, line_no, line
                        continue
                    start_line = line_no
                pending.append(line)
                quotes += line.count('"')
                if quotes % 2 == 0:
                    row_no += 1
                    yield row_no, start_line, "".join(pending)
                    pending, quotes = [], 0
    except _READ_ERRORS as exc:
        raise _read_failure(path, f"after row {row_no}" if row_no else "first data row", exc) from None
    if pending:
        raise data_error(path, f"row {row_no + 1} (line {start_line})", None, "a closing quote",
                         "end of file inside a quoted field (truncated file?)")
    if row_no == 0:
        raise data_error(path, None, None, "data rows after the header", "none")


def _csv_record(job: tuple[_CsvColumns, int, int, str]) -> tuple[FaceRecord, bool]:
    """One CSV row text → FaceRecord, fully validated (runs in worker processes; module level so it pickles)."""
    cols, row_no, line_no, text = job
    where = f"row {row_no} (line {line_no})"
    text = text.rstrip("\r\n")
    if '"' in text:
        try:
            fields = next(csv.reader([text]))
        except csv.Error as exc:
            raise data_error(cols.path, where, None, "a well-formed CSV row", f"{exc}") from None
    else:
        fields = text.split(",")
    if len(fields) != len(cols.names):
        header_names = ",".join(h.strip() for h in cols.names)
        raise data_error(cols.path, where, None, f"{len(cols.names)} fields ({header_names})",
                         f"{len(fields)} (row cut short: truncated file?)" if len(fields) < len(cols.names)
                         else str(len(fields)))
    code = parse_emotion(fields[cols.emotion], cols.path, where, cols.names[cols.emotion].strip())
    split = (cols.default_split if cols.usage is None
             else parse_split(fields[cols.usage], cols.path, where, cols.names[cols.usage].strip()))
    pixels = parse_pixels(fields[cols.pixels], cols.path, where, cols.names[cols.pixels].strip())
    return FaceRecord(pixels=pixels, fer_code=code, split=split, source=f"{cols.source_name}:row {row_no}"), False


#: ``map``-like callable: (function, iterable of jobs) → results in order; ``pool.imap`` parallelises reading.
MapFn = Callable[[Callable, Iterable], Iterable]


def _counted(results: Iterable[tuple[FaceRecord, bool]], report: ReadReport | None) -> Iterator[FaceRecord]:
    for record, converted in results:
        if report is not None:
            report.records += 1
            report.converted_images += converted
        yield record


def read_csv_records(path: str | Path, source_name: str, default_split: str | None = None,
                     report: ReadReport | None = None, map_fn: MapFn = map) -> Iterator[FaceRecord]:
    """Stream one labelled FER2013 CSV; the split comes from ``Usage`` or, without it, ``default_split``."""
    path = Path(path)
    cols = _columns(path, _read_header(path), need_usage=default_split is None, need_emotion=True,
                    source_name=source_name, default_split=default_split)
    jobs = ((cols, row_no, line_no, text) for row_no, line_no, text in _csv_row_texts(path))
    yield from _counted(map_fn(_csv_record, jobs), report)


def count_unlabelled_rows(path: str | Path) -> int:
    """Rows of an unlabelled CSV (torchvision's test.csv), counted without parsing pixels."""
    path = Path(path)
    _columns(path, _read_header(path), need_usage=False, need_emotion=False)
    return sum(1 for _ in _csv_row_texts(path))


def _csv_layout(path: Path, header: list[str]) -> str:
    keys = [h.strip().lower() for h in header]
    if keys[:3] == ["emotion", "usage", "pixels"]:
        return "icml_face_data.csv"
    return "Kaggle fer2013.csv"


# ------------------------------------------------------------------------------------ image folder


def load_face_image(path: Path, display: str) -> tuple[np.ndarray, bool]:
    """Any image PIL reads → (uint8 48x48 grey levels, whether it had to be converted)."""
    try:
        with Image.open(path) as img:
            img.load()
            converted = img.mode != "L" or img.size != (IMAGE_SIZE, IMAGE_SIZE)
            if img.mode != "L":
                img = img.convert("L")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                img = ImageOps.fit(img, (IMAGE_SIZE, IMAGE_SIZE), method=Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8).copy(), converted
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise data_error(display, None, None, "a readable JPEG or PNG image", f"{type(exc).__name__}: {exc}") from None


def _image_folder_files(root: Path) -> list[tuple[Path, str, int]]:
    """(file, split, FER code) for every image, sorted by relative path so the order never depends on the OS."""
    found: list[tuple[Path, str, int]] = []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in FOLDER_SPLITS):
        split = FOLDER_SPLITS[split_dir.name.lower()]
        for emotion_dir in sorted(p for p in split_dir.iterdir() if not p.name.startswith(".")):
            if not emotion_dir.is_dir():
                continue
            name = emotion_dir.name.strip().lower()
            if name not in FER_CODE_NAMES:
                raise data_error(emotion_dir, None, "emotion folder name",
                                 f"one of {', '.join(FER_CODE_NAMES)}", _clip(emotion_dir.name))
            code = FER_CODE_NAMES.index(name)
            for file in sorted(emotion_dir.iterdir()):
                found.append((file, split, code))
    return found


def _image_record(job: tuple[str, str, str, int]) -> tuple[FaceRecord, bool]:
    """One image file → (FaceRecord, converted) (runs in worker processes; module level so it pickles)."""
    file, rel, split, code = job
    pixels, converted = load_face_image(Path(file), file)
    return FaceRecord(pixels=pixels, fer_code=code, split=split, source=rel), converted


def read_image_folder(root: str | Path, report: ReadReport | None = None, map_fn: MapFn = map) -> Iterator[FaceRecord]:
    """Stream an image-folder export; non-image files are counted and ignored."""
    root = Path(root)
    files = _image_folder_files(root)
    images = [(f, s, c) for f, s, c in files if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if report is not None:
        report.ignored_files += sum(1 for f, _, _ in files if not f.name.startswith(".")) - len(images)
    if not images:
        raise data_error(root, None, None,
                         "images under train/<emotion>/ or test/<emotion>/ (.jpg, .jpeg, .png)", "none")
    jobs = ((str(f), f.relative_to(root).as_posix(), split, code) for f, split, code in images)
    yield from _counted(map_fn(_image_record, jobs), report)


# -------------------------------------------------------------------------------------- detection


@dataclass
class FerSource:
    """A FER2013 copy on disk in one of the supported layouts; iterate ``records()`` once."""

    path: Path
    layout: str
    report: ReadReport
    csv_files: list[tuple[Path, str | None]] = field(default_factory=list)  # (file, default split)

    @property
    def description(self) -> str:
        return f"{self.path.name} ({self.layout})"

    @property
    def input_bytes(self) -> int:
        """Size on disk of what will be read (decides whether parsing in worker processes pays off)."""
        if self.layout == "image folder":
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return sum(file.stat().st_size for file, _ in self.csv_files)

    def records(self, map_fn: MapFn = map) -> Iterator[FaceRecord]:
        """All labelled records in file order; ``map_fn=functools.partial(pool.imap, chunksize=..)`` parses in
        worker processes with the same order, records and errors as the default serial ``map``."""
        if self.layout == "image folder":
            yield from read_image_folder(self.path, self.report, map_fn)
            return
        for file, default_split in self.csv_files:
            name = file.relative_to(self.path).as_posix() if self.path.is_dir() else file.name
            yield from read_csv_records(file, name, default_split, self.report, map_fn)


def open_source(path: str | Path) -> FerSource:
    """Tell which layout ``path`` holds (raises DataFormatError naming what was expected)."""
    path = Path(path)
    if not path.exists():
        raise data_error(path, None, None, "an existing FER2013 CSV file or folder", "no such file or folder")
    if path.is_file():
        return _open_csv_source(path)
    for name in KAGGLE_FILES:
        if (path / name).is_file():
            src = _open_csv_source(path / name)
            return FerSource(path, src.layout, src.report, src.csv_files)
    if (path / "train.csv").is_file() or (path / "test.csv").is_file():
        return _open_torchvision(path)
    if (path / "fer2013").is_dir():
        inner = open_source(path / "fer2013")
        return FerSource(path, inner.layout, inner.report, inner.csv_files)
    if any(p.is_dir() and p.name.lower() in FOLDER_SPLITS for p in path.iterdir()):
        return FerSource(path, "image folder", ReadReport(layout="image folder", files=[path.name]))
    raise data_error(path, None, None,
                     "fer2013.csv[.gz], icml_face_data.csv, a torchvision fer2013/ folder (train.csv, test.csv) "
                     "or an image folder (train/<emotion>/*.jpg, test/<emotion>/*.jpg)", "none of these")


def _open_csv_source(path: Path) -> FerSource:
    header = _read_header(path)
    keys = {h.strip().lower() for h in header}
    if path.name.lower() in ("train.csv", "test.csv") and "usage" not in keys:
        return _open_torchvision(path.parent, only=path)
    _columns(path, header, need_usage=True, need_emotion=True)
    layout = _csv_layout(path, header)
    return FerSource(path, layout, ReadReport(layout=layout, files=[path.name]), [(path, None)])


def _open_torchvision(folder: Path, only: Path | None = None) -> FerSource:
    """torchvision's fer2013/: train.csv → Training; test.csv → Test if labelled, else skipped and counted."""
    report = ReadReport(layout="torchvision fer2013/")
    files: list[tuple[Path, str | None]] = []
    for name, split in (("train.csv", "Training"), ("test.csv", "Test")):
        file = only if only is not None else folder / name
        if file.name.lower() != name or not file.is_file():
            continue
        header = _read_header(file)
        if "emotion" in {h.strip().lower() for h in header}:
            _columns(file, header, need_usage=False, need_emotion=True)
            files.append((file, split))
            report.files.append(file.name)
        else:
            report.skipped_unlabelled += count_unlabelled_rows(file)
            report.files.append(f"{file.name} (unlabelled, skipped)")
    if not files:
        raise data_error(only or folder, None, None, "a labelled train.csv (columns emotion,pixels)",
                         "no labelled CSV")
    return FerSource(only or folder, report.layout, report, files)
