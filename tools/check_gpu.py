"""The prepared GPU check: one command, under 10 minutes on one GPU, a report folder (JSON + Markdown table).

    python tools/check_gpu.py [--out reports/gpu_check] [--dry-run] [--budget SECONDS] [--only STEP,STEP]

Runs from the repo root. Installs if needed, shards the synthetic set (and FER2013 when
../shared/fer2013/fer2013.csv.gz exists), trains through the real launcher (1gpu.yaml) in bf16 with
grids and checkpoints, resumes it, runs fp16 and fp32, measures throughput of arch ours and paper at
batch 1024 and 4096 (bf16), compile on vs off, the loaders on the GPU, DeepSpeed ZeRO-2 bf16, and
checks that the CPU launch config stays on the CPU; nvidia-smi is sampled while steps run. A failed
step is a FAIL row and the check continues; the exit code is 1 when any step failed.
`--dry-run` runs the same steps on the CPU with tiny sizes (what the test suite does).
The work is bicogan_dist/evaluate/gpu_check.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="reports/gpu_check",
                   help="report folder: report.json, report.md, logs/, work/ (default %(default)s; work/ and logs/ "
                        "are replaced)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny sizes")
    p.add_argument("--budget", type=float, default=None,
                   help="overall seconds (default 540 on the GPU, none in a dry run); later steps are FAIL when spent")
    p.add_argument("--only", default=None, help="comma-separated step ids to run (default: all)")
    args = p.parse_args(argv)

    from bicogan_dist.evaluate.gpu_check import markdown, run_check

    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    try:
        result = run_check(args.out, dry_run=args.dry_run, budget_s=args.budget, only=only)
    except ValueError as exc:
        print(f"error: --only: {exc}", file=sys.stderr)
        return 2
    print()
    print(markdown(result))
    print(f"report: {result.out_dir / 'report.json'}, {result.out_dir / 'report.md'}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
