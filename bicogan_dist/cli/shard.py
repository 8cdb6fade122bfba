"""``bicogan-shard`` / ``tools/shard_fer2013.py``: FER2013 (or the synthetic set) → webdataset shards + manifest.json.

The work is :func:`bicogan_dist.data.shards.build_shards`. It uses worker processes (spawn), so a
script calling :func:`main` must do so under ``if __name__ == "__main__"``.
"""
from __future__ import annotations

import argparse

from bicogan_dist.cli.common import OS_ERROR, USER_ERROR, Command
from bicogan_dist.data.shards import DEFAULT_SHARD_SIZE, UPLOAD_SCHEMES


def build_parser() -> argparse.ArgumentParser:
    """The shard tool's flags (help texts are the user's documentation)."""
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
    p.add_argument("--upload-to", metavar="DEST",
                   help="after writing --out locally, print the commands that upload it to DEST (s3://bucket/prefix, "
                        "gs://bucket/prefix, or the http(s):// URL a web server will serve it at) and the "
                        "data.shards value that streams it back; nothing is uploaded")
    return p


def _shard(args: argparse.Namespace) -> int:
    from bicogan_dist.data.shards import ShardOptions, build_shards, upload_commands

    opts = ShardOptions(keep_disgust=args.keep_disgust, shard_size=args.shard_size,
                        drop_duplicates=args.drop_duplicates, drop_leaks=args.drop_leaks,
                        drop_blank=args.drop_blank, force=args.force, progress=not args.no_progress)
    if args.workers is not None:
        opts.workers = max(1, args.workers)
    build_shards(args.source, args.out, opts, synthetic=args.synthetic, seed=args.seed)
    if args.upload_to:
        print("\n".join(upload_commands(args.out, args.upload_to)))
    return 0


def _errors() -> dict:
    from bicogan_dist.atomic_dir import OutputExistsError
    from bicogan_dist.data.readers import DataFormatError

    return {(DataFormatError, OutputExistsError): USER_ERROR, OSError: OS_ERROR}


#: 0 on success, 2 with ``error: ...`` on bad input or an occupied --out, 1 on an OS error (disk full, no
#: permission: not the input's fault, but no traceback either).
COMMAND = Command(build_parser, _shard, _errors, [
    (lambda a: (a.source is None) == (a.synthetic is None), "give exactly one of SOURCE and --synthetic N"),
    (lambda a: a.shard_size < 1, "--shard-size must be at least 1"),
    (lambda a: a.synthetic is not None and a.synthetic < 1, "--synthetic N needs N >= 1"),
    (lambda a: a.upload_to is not None and not a.upload_to.startswith(UPLOAD_SCHEMES),
     f"--upload-to must start with one of {', '.join(UPLOAD_SCHEMES)}")])
main, parse_args = COMMAND.main, COMMAND.parse_args


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
