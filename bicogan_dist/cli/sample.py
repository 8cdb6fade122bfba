"""``bicogan-sample`` / ``tools/sample_images.py``: grids, N images per emotion, interpolation, emotion transfer.

The work is :func:`bicogan_dist.sample.run`; its module docstring describes the modes and the seed rule.
"""
from __future__ import annotations

import argparse

from bicogan_dist.cli.common import USER_ERROR, Command


def build_parser() -> argparse.ArgumentParser:
    """The sampling tool's flags; one mode per call."""
    p = argparse.ArgumentParser(
        prog="sample_images",
        description="Sample and edit faces with an export from tools/convert_checkpoint.py. One mode per call:\n"
                    "  (default)             grid PNG: one row per emotion, one column per seed\n"
                    "  --per-class N         N images per emotion: DIR/<emotion>/<index>.png, or --format shards\n"
                    "                        (split 'Generated' + manifest.json, read like real shards)\n"
                    "  --interpolate         per emotion a strip from seed A to seed B, then seed A across emotions\n"
                    "  --transfer INPUT      each real face, G(E(x)) and G(E_z(x), c') for every emotion c'\n"
                    "                        (needs a bigan/bicogan export; bigan: reconstruction only)",
        epilog="Seeds: the noise of seed s is torch.randn(z_dim) from torch.Generator().manual_seed(s) on the CPU, "
               "so outputs are reproducible on any device. --per-class: image i of class k uses seed S + k*N + i.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", metavar="EXPORT_DIR", help="export folder (export.json + safetensors)")
    p.add_argument("--out", required=True, help="output PNG (grid, --interpolate, --transfer) or folder (--per-class)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--per-class", type=int, metavar="N", help="write N images per emotion into the --out folder")
    mode.add_argument("--interpolate", action="store_true",
                      help="strips from seed A to seed B per emotion, plus seed A across all emotions")
    mode.add_argument("--transfer", metavar="INPUT",
                      help="emotion transfer of real faces: an image, a folder of images, or SHARD_FOLDER:SPLIT "
                           "(e.g. data_shards/fer2013:PrivateTest)")
    p.add_argument("--seeds", default=None,
                   help="grid: seeds as 0-7, 1,5,9 or a count (default 8 = 0-7); --interpolate: two seeds A,B "
                        "(default 0,1)")
    p.add_argument("--emotions", default=None, help="comma-separated emotions to show or generate (default all)")
    p.add_argument("--format", choices=("png", "shards"), default="png",
                   help="--per-class output layout (default png)")
    p.add_argument("--seed", type=int, default=0, help="--per-class base seed S (default 0)")
    p.add_argument("--shard-size", type=int, default=4000,
                   help="--per-class --format shards: images per shard (default 4000)")
    p.add_argument("--steps", type=int, default=8, help="--interpolate: images per strip (default 8)")
    p.add_argument("--method", choices=("slerp", "linear"), default="slerp",
                   help="--interpolate: path in z space (default slerp)")
    p.add_argument("--limit", type=int, default=8, help="--transfer: at most this many faces, one row each (default 8)")
    p.add_argument("--force", action="store_true", help="--per-class: replace a folder this tool wrote before")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--truncation", type=float, default=1.0, metavar="PSI",
                   help="decode z * PSI, PSI in (0, 1]: less variety within an emotion, clearer emotions (the "
                        "truncation trick; default 1 = no truncation; README, section 5). With --transfer the "
                        "encoded z: a clearer target emotion, a little less likeness")
    return p


def _sample(args: argparse.Namespace) -> int:
    from bicogan_dist.sample import SampleRequest, run

    print(f"wrote {run(SampleRequest(**vars(args)))}")
    return 0


def _errors() -> dict:
    from bicogan_dist.data.manifest import ShardError
    from bicogan_dist.data.readers import DataFormatError
    from bicogan_dist.export import ExportError
    from bicogan_dist.sample import SampleError

    return {(SampleError, ExportError, ShardError, DataFormatError): USER_ERROR}


#: 0 on success (``wrote PATH``), 2 with ``error: ...`` on bad input; sizes below 1 are usage errors.
COMMAND = Command(build_parser, _sample, _errors, [(lambda a: a.batch_size < 1, "--batch-size must be at least 1"),
                                                   (lambda a: a.limit < 1, "--limit must be at least 1"),
                                                   (lambda a: a.shard_size < 1, "--shard-size must be at least 1"),
                                                   (lambda a: not 0 < a.truncation <= 1,
                                                    "--truncation must be in (0, 1]")])
main, parse_args = COMMAND.main, COMMAND.parse_args


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
