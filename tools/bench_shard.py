"""Benchmark: wall time of sharding the whole real FER2013 with the shard tool, as a user runs it.

    python tools/bench_shard.py [SOURCE] [--repeats 3] [--workers 1,2]

SOURCE defaults to ../shared/fer2013/fer2013.csv.gz beside the repository. Each run is a
fresh ``tools/shard_fer2013.py`` process (interpreter start, imports, read, quality report,
PNG encoding, tar writing, manifest) into a temporary folder, so nothing is cached between
runs. Prints one table: per worker count, the median and best wall seconds, images/s (images
read per second of median wall time) and the median CPU seconds of the tool and its workers
(steadier than wall time on a shared machine, whose load average is printed too).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "fer2013" / "fer2013.csv.gz"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(source: Path, workers: int, out: Path) -> tuple[float, float, int, int]:
    """Wall seconds, CPU seconds (the tool and its workers), images read and images written of one shard run."""
    cmd = [sys.executable, str(ROOT / "tools" / "shard_fer2013.py"), str(source), "--out", str(out),
           "--workers", str(workers), "--no-progress", "--force"]
    start, cpu_start = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu_start
    if proc.returncode != 0:
        raise SystemExit(f"shard run failed ({proc.returncode}):\n{proc.stderr}")
    manifest = json.loads((out / "manifest.json").read_text())
    return seconds, cpu, manifest["quality"]["images"], manifest["image_count"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", default=str(DEFAULT_SOURCE), help="FER2013 copy to shard")
    p.add_argument("--repeats", type=int, default=3, help="runs per worker count (default 3)")
    p.add_argument("--workers", default=str(min(os.cpu_count() or 1, 8)),
                   help="comma-separated worker counts to compare (default: CPU count)")
    args = p.parse_args(argv)
    source = Path(args.source)
    if not source.exists():
        print(f"error: {source} not found (pass the path of a FER2013 copy)", file=sys.stderr)
        return 2
    counts = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_shard_") as tmp:
        for workers in counts:
            times, cpus = [], []
            for r in range(args.repeats):
                seconds, cpu, read, written = one_run(source, workers, Path(tmp) / "shards")
                times.append(seconds)
                cpus.append(cpu)
                print(f"workers {workers} run {r + 1}: {seconds:.2f} s wall, {cpu:.2f} s CPU", file=sys.stderr)
            rows.append((workers, times, cpus, read, written))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"sharding {source.name} ({rows[0][3]:,} images read, {rows[0][4]:,} written); "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the end (other work on the machine slows wall time)")
    print(f"{'workers':>7} {'runs':>4} {'median s':>9} {'best s':>7} {'images/s':>9} {'median CPU s':>12}")
    for workers, times, cpus, read, _ in rows:
        median = statistics.median(times)
        print(f"{workers:>7} {len(times):>4} {median:>9.2f} {min(times):>7.2f} {read / median:>9,.0f} "
              f"{statistics.median(cpus):>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
