"""Quality benchmark: train experiment configs for a fixed budget, evaluate each, print one table.

    python tools/bench_quality.py --preset synthetic --classifier CLASSIFIER_DIR [--out runs/quality-synthetic]
        [--rows default,before] [--steps N] [--shards DIR] [--launch "accelerate launch ..."] [--rerun] [key=value ...]

Presets (bicogan_dist/evaluate/quality.py): ``synthetic`` (the quick start's budget: 2,500 steps of
quickstart.yaml on the built-in set) and ``fer2013`` (7,500 steps per row, fixed at about 30 minutes
of training on the 2-core CPU machine). Writes OUT/quality.md and OUT/quality.json, and per row OUT/<row>/grid.png and
report.md. Logic: bicogan_dist.evaluate.quality; this file only parses arguments.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bicogan_dist.evaluate.quality import PRESETS, QualityError, quality_markdown, run_quality  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--classifier", required=True, metavar="CLASSIFIER_DIR",
                   help="tools/train_classifier.py output for the preset's data set")
    p.add_argument("--out", default=None, help="output folder (default runs/quality-<preset>)")
    p.add_argument("--shards", default=None, help="shard folder (default the preset's)")
    p.add_argument("--steps", type=int, default=None, help="training steps per row (default the preset's)")
    p.add_argument("--rows", default=None, help="comma-separated subset of the preset's rows")
    p.add_argument("--num-samples", type=int, default=None, help="generated faces per emotion")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed")
    p.add_argument("--launch", default=None,
                   help='training launcher (default: accelerate launch with 2 CPU processes, or 1gpu.yaml on a GPU)')
    p.add_argument("--device", default=None,
                   help="cpu or cuda: where rows train (unless --launch) and are evaluated (default cuda when available)")
    p.add_argument("--rerun", action="store_true", help="discard earlier results in --out")
    p.add_argument("--truncation", default=None, metavar="PSI[,PSI...]",
                   help="also evaluate every row with G decoding z * PSI, drawn and encoded (the truncation "
                        "trick; a row per PSI; default the preset's: 1 for synthetic, 1,0.8,0.7,0.6 for fer2013)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="added to every row's training")
    args = p.parse_intermixed_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    try:
        truncations = [float(x) for x in args.truncation.split(",") if x.strip()] if args.truncation else None
    except ValueError:
        print(f"error: --truncation: {args.truncation!r} is not a comma-separated list of numbers", file=sys.stderr)
        return 2
    out = args.out or f"runs/quality-{args.preset}"
    try:
        result = run_quality(args.preset, args.classifier, out, args.shards, args.steps, rows, args.overrides,
                             None if args.launch is None else shlex.split(args.launch), device, args.num_samples,
                             args.seed, args.rerun, truncations=truncations)
    except (QualityError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(quality_markdown(result))
    print(f"wrote {Path(out) / 'quality.md'} and {Path(out) / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
