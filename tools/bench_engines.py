"""Benchmark: the trainer under DeepSpeed ZeRO against Accelerate DDP, same config, 2 CPU processes (or 2 GPUs).

    python tools/bench_engines.py [--shards DIR] [--steps 40] [--width 0.5] [--batch 64] [--precision no]
                                  [--engines ddp,zero1,zero2] [--repeats 1] [--device cpu|cuda]

Each engine runs the real trainer once under ``accelerate launch`` with
launch_configs/accelerate/cpu_2proc.yaml (bicogan_dist/train/probe.py wraps it and reports each rank's
peak resident memory, ``resource.getrusage().ru_maxrss``). Prints one table: images/s (median
of the logged 10-step intervals after the first, both ranks together), peak RSS of each rank,
and the size of the final checkpoint. Runs are sequential in this one invocation (``--repeats N``
interleaves N rounds and reports the median run) so the rows are comparable on a noisy machine; the RSS includes the interpreter, torch and (for
ZeRO) DeepSpeed, which dominate at this model size.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ["-m", "bicogan_dist.cli.probe"]  # accelerate launch runs the module on every rank
ENGINES = {
    "ddp": ("ddp", None),
    "zero1": ("deepspeed", ROOT / "launch_configs" / "deepspeed" / "zero1.json"),
    "zero2": ("deepspeed", ROOT / "launch_configs" / "deepspeed" / "zero2.json"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_engine(key: str, shards: Path, work: Path, args: argparse.Namespace, repeat: int = 0) -> dict:
    engine, ds_config = ENGINES[key]
    out, run_dir = work / f"probe_{key}_{repeat}", work / f"run_{key}_{repeat}"
    overrides = [f"data.shards={shards}", f"log.run_dir={run_dir}", f"model.width={args.width}",
                 f"data.batch_size={args.batch}", f"train.max_steps={args.steps}",
                 f"train.mixed_precision='{args.precision}'", f"train.engine={engine}", "augment.ops=[]",
                 "log.log_every=10", f"log.image_every={10 * args.steps}", f"log.checkpoint_every={10 * args.steps}",
                 "log.progress=false"]
    if ds_config is not None:
        overrides.append(f"train.deepspeed_config={ds_config}")
    # cpu: the two-process CPU config (stays on the CPU on a GPU machine); cuda: two GPUs of the 8-GPU config.
    launch_cfg = "cpu_2proc.yaml" if args.device == "cpu" else "8gpu_bf16.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch_configs" / "accelerate" / launch_cfg), "--num_processes", "2",
           "--main_process_port", str(free_port()), *PROBE, str(out), *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))  # DeepSpeed's comm op, compiled once
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{key} failed:\n{proc.stderr[-4000:]}")
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    if [i["world_size"] for i in infos] != [2, 2]:
        raise SystemExit(f"{key}: expected 2 processes, got {[i['world_size'] for i in infos]}")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    rates = [e.value for e in acc.Scalars("perf/images_per_s")]
    ckpt = Path(infos[0]["last_checkpoint"])
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file() and not p.name.endswith(".py"))
    return {"engine": key, "images_per_s": statistics.median(rates[1:] or rates),
            "rss_mib": [i["maxrss_kib"] / 1024 for i in infos], "checkpoint_mib": size / 2 ** 20,
            "precision": infos[0]["precision"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="shard folder (default: a synthetic set made here)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--width", type=float, default=0.5, help="model.width (arch ours)")
    parser.add_argument("--batch", type=int, default=64, help="data.batch_size per process")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: 2 CPU processes (cpu_2proc.yaml); cuda: 2 GPUs (8gpu_bf16.yaml, --num_processes 2)")
    parser.add_argument("--engines", default="ddp,zero2", help=f"comma-separated subset of {sorted(ENGINES)}")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the engines in turn this many times; rows show the median run (noisy machines)")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.engines.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ENGINES]
    if unknown:
        parser.error(f"--engines: unknown {unknown}; choose from {sorted(ENGINES)}")

    work = Path(tempfile.mkdtemp(prefix="bench_engines_"))
    shards = args.shards
    if shards is None:
        from bicogan_dist.cli.shard import main as shard_main

        shards = work / "shards"
        shard_main(["--synthetic", "3000", "--out", str(shards)])
    runs: dict[str, list[dict]] = {k: [] for k in keys}
    for repeat in range(args.repeats):  # interleaved, so a burst of load elsewhere hits every engine alike
        for k in keys:
            runs[k].append(run_engine(k, shards, work, args, repeat))
    rows = []
    for k in keys:
        rates = [r["images_per_s"] for r in runs[k]]
        row = dict(runs[k][0], images_per_s=statistics.median(rates), all_rates=rates)
        row["rss_mib"] = [max(r["rss_mib"][i] for r in runs[k]) for i in (0, 1)]
        rows.append(row)

    print(f"\n2 CPU processes (gloo), arch ours width {args.width}, batch {args.batch}/process, "
          f"{args.steps} steps, precision {args.precision}, {args.repeats} run(s) per engine")
    print(f"{'engine':<8} {'images/s':>9} {'vs ddp':>7} {'peak RSS rank0':>15} {'rank1':>7} {'checkpoint':>11}")
    base = next((r["images_per_s"] for r in rows if r["engine"] == "ddp"), None)
    for r in rows:
        ratio = f"{r['images_per_s'] / base:.2f}" if base else "-"
        print(f"{r['engine']:<8} {r['images_per_s']:>9.0f} {ratio:>7} {r['rss_mib'][0]:>11.0f} MiB "
              f"{r['rss_mib'][1]:>3.0f} MiB {r['checkpoint_mib']:>7.1f} MiB"
              + (f"   runs: {', '.join(f'{x:.0f}' for x in r['all_rates'])}" if args.repeats > 1 else ""))
    print("images/s: median of 10-step intervals after the first, both ranks (median over runs); "
          "RSS: ru_maxrss of each rank (max over runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
