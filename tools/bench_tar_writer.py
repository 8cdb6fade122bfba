"""Benchmark: the shard tool's hand-written tar writer against webdataset's TarWriter, on encoded samples.

    python tools/bench_tar_writer.py [--shards DIR] [--repeats 3]

Reads the samples of every split of a shard folder (default: the one tools/bench_data.py makes from
the real FER2013, else 30,000 synthetic faces) into memory as webdataset sample dicts, then writes
them all as 4,000-sample shards with ``TarShardWriter`` (``bicogan_dist/data/shards.py``) and with
``webdataset.TarWriter`` (the same bytes: mtime 0, mode 0444, owner bicogan), ``--repeats`` times
each, alternating. Prints the median seconds of each and the difference: what the shard tool's
whole command (``tools/bench_shard.py``) would gain or lose by switching.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARD = 4000


def samples_of(folder: Path) -> list[dict]:
    """Every sample of every shard of ``folder`` as a webdataset dict (``__key__`` + ext → bytes)."""
    out: list[dict] = []
    for path in sorted(folder.glob("*.tar")):
        current: dict | None = None
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if current is None or current["__key__"] != key:
                    current = {"__key__": key}
                    out.append(current)
                current[ext] = tar.extractfile(member).read()
    return out


def write_all(samples: list[dict], folder: Path, make) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(samples), SHARD):
        writer = make(folder / f"s-{i // SHARD:06d}.tar")
        for sample in samples[i:i + SHARD]:
            writer.write(sample)
        writer.close()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="shard folder whose samples are rewritten (default: bench_data's)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bicogan_bench_data"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import webdataset as wds

    from bicogan_dist.data.shards import TarShardWriter
    from bench_data import ensure_shards  # noqa: E402 - tools/ is on sys.path when run as a script

    folder = Path(args.shards) if args.shards else ensure_shards(Path(args.cache))
    samples = samples_of(folder)
    writers = {
        "TarShardWriter (hand-written)": TarShardWriter,
        "webdataset.TarWriter": lambda path: wds.TarWriter(str(path), mtime=0, user="bicogan", group="bicogan",
                                                           mode=0o444),
    }
    times: dict[str, list[float]] = {name: [] for name in writers}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, make in writers.items():
                times[name].append(write_all(samples, Path(tmp), make))
    print(f"\ntar writing only (samples already encoded): {len(samples):,} samples from {folder}, "
          f"{SHARD:,} a shard, median of {args.repeats}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, m in medians.items():
        print(f"{name:<32} {m:6.2f} s   ({1e6 * m / len(samples):5.0f} us a sample)")
    ours, theirs = medians.values()
    print(f"webdataset.TarWriter costs {theirs - ours:+.2f} s for these samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
