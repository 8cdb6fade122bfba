"""``bicogan-evaluate`` / ``tools/evaluate.py``: score an export with the project's FER classifier.

The work is :func:`bicogan_dist.evaluate.evaluation.evaluate_export`; the files are written by
:func:`bicogan_dist.evaluate.report.write_report`.
"""
from __future__ import annotations

import argparse

from bicogan_dist.cli.common import USER_ERROR, Command


def build_parser() -> argparse.ArgumentParser:
    """The evaluator's flags (``--device`` defaults to cuda when torch sees one)."""
    import torch

    p = argparse.ArgumentParser(
        prog="evaluate",
        description="Evaluate an export: conditional accuracy of G(z, c), FID/KID in the project's FER-classifier "
                    "feature space (not Inception), encoder emotion accuracy, reconstruction error, emotion transfer.")
    p.add_argument("export", metavar="EXPORT_DIR", help="an export folder (tools/convert_checkpoint.py)")
    p.add_argument("--shards", required=True, help="real-data shard folder (Training + a held-out split)")
    p.add_argument("--classifier", required=True, metavar="CLASSIFIER_DIR", help="tools/train_classifier.py output")
    p.add_argument("--out", required=True, metavar="REPORT.json",
                   help="report path; REPORT.md and REPORT_confusion.png are written beside it")
    p.add_argument("--num-samples", type=int, default=500, help="generated faces per emotion (default %(default)s)")
    p.add_argument("--split", default=None,
                   help="held-out split (default PrivateTest, or Test for image-folder shards)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--transfer-limit", type=int, default=None,
                   help="encode/transfer only the first N held-out faces (default all)")
    p.add_argument("--truncation", type=float, default=1.0, metavar="PSI",
                   help="G decodes z * PSI, PSI in (0, 1] (the truncation trick; default 1: none): the drawn "
                        "faces and, for reconstruction and transfer, the encoded E_z(x); the encoder's accuracy "
                        "is unchanged")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _evaluate(args: argparse.Namespace) -> int:
    """Evaluate, write the report files and print the headline numbers."""
    from bicogan_dist.evaluate.evaluation import evaluate_export
    from bicogan_dist.evaluate.report import summary_lines, write_report

    report = evaluate_export(args.export, args.shards, args.classifier, num_samples=args.num_samples,
                             split=args.split, device=args.device, seed=args.seed, kid_subsets=args.kid_subsets,
                             kid_subset_size=args.kid_subset_size, transfer_limit=args.transfer_limit,
                             truncation=args.truncation)
    for line in summary_lines(report, write_report(report, args.out)):
        print(line)
    return 0


def _errors() -> dict:
    from bicogan_dist.config import ConfigError
    from bicogan_dist.data.manifest import ShardError
    from bicogan_dist.export import ExportError

    return {(ExportError, ShardError, ConfigError, FileNotFoundError, ValueError): USER_ERROR}


#: 0 on success, 2 with ``error: ...`` on bad input.
COMMAND = Command(build_parser, _evaluate, _errors, [(lambda a: a.num_samples < 1, "--num-samples must be >= 1"),
                                                       (lambda a: not 0 < a.truncation <= 1,
                                                        "--truncation must be in (0, 1]")])
main, parse_args = COMMAND.main, COMMAND.parse_args


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
