"""``python -m bicogan_dist.cli.probe OUT_DIR [--config EXP.yaml] [key=value ...]`` (under ``accelerate launch``).

The training tests and ``tools/bench_engines.py`` launch it; :func:`bicogan_dist.train.probe.run_probe`
does the work. Errors are not caught: a failing probe should show its traceback to the test.
"""
from __future__ import annotations

import argparse

from bicogan_dist.cli.common import Command


def build_parser() -> argparse.ArgumentParser:
    """The probe's arguments: where to write, an experiment YAML and overrides."""
    p = argparse.ArgumentParser(prog="python -m bicogan_dist.cli.probe",
                                description="Train, then dump each rank's weights, G's output on fixed inputs and "
                                            "run facts (tests and tools/bench_engines.py compare them).")
    p.add_argument("out", metavar="OUT_DIR", help="folder for rank<R>.safetensors and rank<R>.json")
    p.add_argument("--config", help="experiment YAML; defaults if omitted")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def _probe(args: argparse.Namespace) -> int:
    from bicogan_dist.train.probe import run_probe

    run_probe(args.out, args.config, args.overrides)
    return 0


#: 0 after this rank's files are written; nothing is caught (a failing probe shows its traceback to the test).
COMMAND = Command(build_parser, _probe)
main, parse_args = COMMAND.main, COMMAND.parse_args


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
