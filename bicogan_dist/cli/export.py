"""``bicogan-export`` / ``tools/convert_checkpoint.py``: a training checkpoint (DDP or DeepSpeed) → an export folder.

The work is :func:`bicogan_dist.export.export_checkpoint`.
"""
from __future__ import annotations

import argparse
import json

from bicogan_dist.cli.common import USER_ERROR, Command
from bicogan_dist.export import ONNX_FILE, ONNX_OPSET


DESCRIPTION = ("Convert a training checkpoint (DDP or DeepSpeed) into an export: generator.safetensors (EMA weights "
               "of G), encoder.safetensors (E, for bigan/bicogan), export.json, and with --onnx generator.onnx. "
               "Loading an export never unpickles.")


def build_parser() -> argparse.ArgumentParser:
    """The converter's flags."""
    p = argparse.ArgumentParser(prog="convert_checkpoint", description=DESCRIPTION)
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a run folder (its newest complete checkpoint is used) or a checkpoint-XXXXXXXX folder")
    p.add_argument("--out", required=True, metavar="EXPORT_DIR", help="export folder (written atomically)")
    p.add_argument("--onnx", action="store_true",
                   help=f"also write {ONNX_FILE} (inputs z float32 (B, z_dim) and, for conditional kinds, "
                        f"c int64 (B,); dynamic batch; opset {ONNX_OPSET})")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset (default {ONNX_OPSET}, at least 17)")
    p.add_argument("--force", action="store_true", help="replace an existing export in EXPORT_DIR")
    return p


def _export(args: argparse.Namespace) -> int:
    """Write the export and print one line naming it and its files."""
    from bicogan_dist.export import META_FILE, export_checkpoint

    out = export_checkpoint(args.source, args.out, onnx=args.onnx, force=args.force, opset=args.opset)
    meta = json.loads((out / META_FILE).read_text())
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {meta['model']['kind']} (step {meta['source']['step']}, {meta['source']['engine']}) "
          f"to {out}: {files}")
    return 0


def _errors() -> dict:
    from bicogan_dist.config import ConfigError
    from bicogan_dist.export import ExportError
    from bicogan_dist.train.checkpoint import CheckpointError

    return {(ExportError, ConfigError, CheckpointError): USER_ERROR}


#: 0 on success, 2 with ``error: ...`` on bad input; an opset below 17 is a usage error.
COMMAND = Command(build_parser, _export, _errors, [(lambda a: a.opset < 17, "--opset must be at least 17")])
main, parse_args = COMMAND.main, COMMAND.parse_args


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
