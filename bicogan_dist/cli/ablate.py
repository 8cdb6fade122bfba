"""``bicogan-ablate`` / ``tools/ablate_augmentations.py``: the paper's augmentation table, trained and measured.

The work is :func:`bicogan_dist.evaluate.ablation.run_ablation`; its module docstring has the verdict rule.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from bicogan_dist.cli.common import USER_ERROR, Command


def build_parser() -> argparse.ArgumentParser:
    """The ablation's flags; extra ``key=value`` words go to every training run."""
    from bicogan_dist.evaluate.ablation import DEFAULT_CONFIGS

    p = argparse.ArgumentParser(
        prog="ablate_augmentations",
        description="Train BiCoGAN once per augmentation setting of the paper (none, affine_rotate, fliplr, "
                    "affine_shear, crop, gamma_contrast, affine_scale) for the same number of steps, evaluate each, "
                    "and print the paper's table with measured columns and verdicts.",
        epilog="Extra key=value arguments are passed to every training run (e.g. model.width=0.5 data.batch_size=64).")
    p.add_argument("--shards", required=True)
    p.add_argument("--classifier", required=True, metavar="CLASSIFIER_DIR")
    p.add_argument("--steps", type=int, required=True, help="training steps per setting")
    p.add_argument("--out", default="runs/ablation", help="output folder (default %(default)s)")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="relative FID change counted as 'same' (default %(default)s = 10%%)")
    p.add_argument("--settings", default=None, help="comma-separated subset (none is always included)")
    p.add_argument("--num-samples", type=int, default=500, help="generated faces per emotion for evaluation")
    p.add_argument("--split", default=None, help="held-out split (default PrivateTest, or Test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-repeats", type=int, default=1,
                   help="train the no-augmentation baseline this many times with different seeds to show seed noise")
    p.add_argument("--launch", default="",
                   help='command that starts training instead of plain python, e.g. "accelerate launch '
                        '--config_file launch_configs/accelerate/1gpu.yaml" (followed by -m bicogan_dist.train ...)')
    p.add_argument("--configs", default=str(DEFAULT_CONFIGS), help="folder of the aug_*.yaml experiment configs")
    p.add_argument("--device", default=None, help="evaluation device (default cuda when available)")
    p.add_argument("--rerun", action="store_true", help="discard earlier results in --out and train again")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _ablate(args: argparse.Namespace) -> int:
    """Train and measure every setting, print the table and the files written."""
    import torch

    from bicogan_dist.evaluate.ablation import ablation_markdown, run_ablation

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = [n.strip() for n in args.settings.split(",") if n.strip()] if args.settings else None
    result = run_ablation(args.shards, args.classifier, args.steps, args.out, args.tolerance, args.overrides,
                          names, args.num_samples, args.split, device, args.seed, shlex.split(args.launch),
                          args.configs, args.rerun, args.baseline_repeats)
    print(ablation_markdown(result))
    print(f"wrote {Path(args.out) / 'ablation.md'} and {Path(args.out) / 'ablation.json'}")
    return 0


def _errors() -> dict:
    from bicogan_dist.evaluate.ablation import AblationError
    from bicogan_dist.export import ExportError

    return {(AblationError, ExportError, FileNotFoundError, ValueError): USER_ERROR}


#: 0 on success, 2 with ``error: ...`` when a setting fails or input is bad; overrides may stand anywhere.
COMMAND = Command(build_parser, _ablate, _errors, [(lambda a: a.tolerance < 0, "--tolerance must be >= 0")])
main, parse_args = COMMAND.main, COMMAND.parse_args


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
