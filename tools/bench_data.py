"""Benchmark: samples/s of the training loaders (stream from a folder or over HTTP with 0 and 2 workers, in memory), per augmentation.

    python tools/bench_data.py [--shards DIR] [--repeats 3] [--max-seconds 20] [--ops affine_rotate] [--p 0.5]
                               [--loaders stream0,stream2,http0,http2,memory] [--device cpu]

Without ``--shards`` it shards the real FER2013 Training split from ``../shared/fer2013/fer2013.csv.gz``
when that exists (else 30,000 synthetic faces) once into a cache folder (``--cache``) and reuses it.
Prints one table: per loader and augmentation (none / torch / imgaug backends), the median, min and
max samples/s over ``--repeats`` epochs of one rank (world size 1, batch 128, CPU; an epoch is cut
short after ``--max-seconds``), and the CPU time per 1,000 samples of all processes involved (main +
DataLoader workers), which stays meaningful when other jobs load the machine and wall-clock rates
drop. Stream epochs include their start (shuffle buffer fill; the first epoch also starts the
workers, which then persist across epochs); the in-memory loader's
one-off load time is printed under the table. The ``http`` rows stream the same shards from a
loopback web server (``python -m http.server`` in its own process, started and stopped here);
its CPU time is not in the CPU column. ``--device cuda`` delivers the batches to the GPU (pinned
copies in stream mode), as training does.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
REAL_FER2013 = ROOT.parent / "shared" / "fer2013" / "fer2013.csv.gz"
BATCH = 128


def ensure_shards(cache: Path) -> Path:
    """Shards to measure: the real FER2013 when available, else synthetic faces; made once, then reused."""
    from bicogan_dist.data.manifest import MANIFEST_NAME
    from bicogan_dist.cli.shard import main as shard_main

    if REAL_FER2013.is_file():
        out, args = cache / "fer2013", [str(REAL_FER2013)]
    else:
        out, args = cache / "synthetic30000", ["--synthetic", "30000"]
    if not (out / MANIFEST_NAME).is_file():
        print(f"making shards in {out} (once) ...", file=sys.stderr)
        if shard_main([*args, "--out", str(out), "--no-progress", "--force"]) != 0:
            raise SystemExit(f"could not make shards in {out}")
    return out


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """``python -m http.server`` serving ``folder`` on 127.0.0.1 in its own process; yields the base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/manifest.json", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (stream workers count once joined: at an
    epoch cut short, or at ``source.close()``)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_epochs(source, repeats: int, batches: int | None = None,
                max_seconds: float | None = None) -> tuple[list[float], float]:
    """samples/s of ``repeats`` epochs and CPU ms per 1,000 samples.

    An epoch is cut short after ``batches`` batches or ``max_seconds`` (slow augmenters would
    otherwise take minutes an epoch on a busy CPU).
    """
    import torch

    rates, samples = [], 0
    c0 = cpu_seconds()
    for epoch in range(repeats):
        t0, n = time.perf_counter(), 0
        it = source.epoch(epoch)
        for k, (x, _y) in enumerate(it):
            n += x.shape[0]
            if (batches is not None and k + 1 >= batches) or \
                    (max_seconds is not None and time.perf_counter() - t0 > max_seconds):
                it.close()  # stops the workers now, so their CPU time is counted
                break
        if x.is_cuda:
            torch.cuda.synchronize(x.device)  # the copies are asynchronous
        rates.append(n / (time.perf_counter() - t0))
        samples += n
    source.close()  # joins the stream workers (they persist across epochs), so their CPU time is counted
    return rates, 1e6 * (cpu_seconds() - c0) / max(1, samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="shard folder to read (default: make FER2013 or synthetic shards in --cache)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bicogan_bench_data"),
                   help="where default shards are made once (default: %(default)s)")
    p.add_argument("--split", default="Training")
    p.add_argument("--repeats", type=int, default=3, help="epochs measured per cell; the median is reported")
    p.add_argument("--batches", type=int, default=None, help="measure only the first N batches of each epoch")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="cut a measured epoch short after this many seconds (default %(default)s; 0 = never)")
    p.add_argument("--ops", default="affine_rotate", help="augmentation presets, comma separated")
    p.add_argument("--p", type=float, default=0.5, help="probability each op fires per image")
    p.add_argument("--backends", default="none,torch,imgaug")
    p.add_argument("--loaders", default="stream0,stream2,http0,http2,memory",
                   help="any of stream0, stream2 (local folder), http0, http2 (loopback HTTP), memory")
    p.add_argument("--device", default="cpu", help="where batches are delivered: cpu (default), cuda, cuda:1, ...")
    args = p.parse_args(argv)

    import torch

    from bicogan_dist.data.augment import AugmentConfig, build_augmenter
    from bicogan_dist.data.loader import DataConfig, InMemoryBatches, build_loader

    shards = Path(args.shards) if args.shards else ensure_shards(Path(args.cache))
    loaders = {"stream0": ("stream", 0), "stream2": ("stream", 2), "http0": ("stream", 0), "http2": ("stream", 2),
               "memory": ("memory", 0)}
    wanted = [s.strip() for s in args.loaders.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(loaders))
    if unknown:
        p.error(f"--loaders: unknown {unknown}; choose from {sorted(loaders)}")
    device = torch.device(args.device)
    server = contextlib.ExitStack()
    url = server.enter_context(http_server(shards)) if any(n.startswith("http") for n in wanted) else None
    backends = [s.strip() for s in args.backends.split(",") if s.strip()]
    ops = [s.strip() for s in args.ops.split(",") if s.strip()]
    rows = []
    memory_load = None
    num_samples = None
    for name in wanted:
        mode, workers = loaders[name]
        for backend in backends:
            try:
                aug = None if backend == "none" else build_augmenter(AugmentConfig(ops=ops, backend=backend, p=args.p))
            except Exception as exc:  # noqa: BLE001 - e.g. imgaug missing: say so in the table
                rows.append((name, backend, None, f"unavailable: {exc}"))
                continue
            where = url if name.startswith("http") else str(shards)
            cfg = DataConfig(shards=where, split=args.split, mode=mode, batch_size=BATCH, num_workers=workers)
            source = build_loader(cfg, rank=0, world_size=1, device=device, seed=0, augmenter=aug)
            num_samples = source.num_samples
            if isinstance(source, InMemoryBatches):
                memory_load = source.load_seconds
            rates, cpu_per_k = time_epochs(source, args.repeats, args.batches, args.max_seconds or None)
            rows.append((name, backend, rates, cpu_per_k))
            del source
    server.close()

    label = {"stream0": "stream, 0 workers", "stream2": "stream, 2 workers", "http0": "http, 0 workers",
             "http2": "http, 2 workers", "memory": "in memory"}
    load = os.getloadavg()
    print(f"\nloader throughput: {shards} split {args.split} ({num_samples or 0:,} samples), batch {BATCH}, "
          f"1 rank, batches on {device}, {args.repeats} epochs each (at most {args.batches or 'all'} batches, "
          f"{args.max_seconds or 'no limit'} s); "
          f"augmentation {ops} p={args.p}")
    print(f"{'loader':<18} {'augment':<8} {'median/s':>9} {'min/s':>8} {'max/s':>8} {'CPU ms/1k':>10}")
    for name, backend, rates, cpu in rows:
        if rates is None:
            print(f"{label[name]:<18} {backend:<8} {cpu}")
            continue
        print(f"{label[name]:<18} {backend:<8} {statistics.median(rates):>9,.0f} {min(rates):>8,.0f} "
              f"{max(rates):>8,.0f} {cpu:>10,.0f}")
    if memory_load is not None:
        print(f"in-memory load (decode the whole split once per process): {memory_load:.2f} s")
    print(f"load average now {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPUs"
          + ("  (busy machine: wall-clock rates are noisy; CPU ms/1k is not)" if load[0] > (os.cpu_count() or 1) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
