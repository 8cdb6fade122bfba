"""Benchmark: images/s of the trainer's step against a minimal plain-PyTorch loop on the same networks.

    python tools/bench_train.py [--shards DIR] [--steps 60] [--quick]

Prints one table (medians over the logged intervals of each run, all runs in this one
invocation, so ratios are comparable on a noisy shared machine):
  * trainer vs plain loop, single process, fp32 and bf16, arch ours (batch 64);
  * the same for arch paper at batch 128 (the seed's Keras code: 16.9 images/s on this machine);
  * the trainer as a 2-process CPU DDP job (accelerate launch, launch_configs/accelerate/cpu_2proc.yaml).
The plain loop does the same math (one G/E forward shared by a D step on concatenated
real+fake tuples and a G/E step through frozen D, Adam on both) with none of the trainer's
bookkeeping: no loader, no EMA, no logging, no rank agreement.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED_KERAS_IMAGES_PER_S = 16.9


def plain_loop(arch: str, batch: int, steps: int, precision: str, width: float) -> list[float]:
    """images/s per 5-step interval of a bare PyTorch loop (runs in this process)."""
    import torch
    from torch.nn import functional as F

    from bicogan_dist.models.losses import LossConfig, d_loss, efl_loss, ge_loss
    from bicogan_dist.models.networks import ModelConfig, build_models

    torch.manual_seed(0)
    cfg = ModelConfig(kind="bicogan", arch=arch, width=width)
    m = build_models(cfg, 6)
    G, E, D = m.G, m.E, m.D
    opt_ge = torch.optim.Adam(list(G.parameters()) + list(E.parameters()), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    loss_cfg = LossConfig()
    x = torch.rand(batch, 1, 48, 48) * 2 - 1
    y = torch.randint(0, 6, (batch,))
    onehot = F.one_hot(y, 6).float()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    rates, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        z = torch.randn(batch, cfg.z_dim)
        with amp:
            fake = G(z, y)
            z_hat, logits = E(x)
            c_real = logits.float().softmax(1)
            s = D(torch.cat([x, fake.detach()]), torch.cat([z_hat.detach(), z]),
                  torch.cat([c_real.detach(), onehot])).float()
        loss = d_loss(loss_cfg, s[:batch], s[batch:])
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
        D.requires_grad_(False)
        with amp:
            s = D(torch.cat([x, fake]), torch.cat([z_hat, z]), torch.cat([c_real, onehot])).float()
        loss = ge_loss(loss_cfg, s[:batch], s[batch:]) + 5.0 * efl_loss(logits.float(), y)
        opt_ge.zero_grad(set_to_none=True)
        loss.backward()
        opt_ge.step()
        D.requires_grad_(True)
        if step % 5 == 0:
            now = time.perf_counter()
            rates.append(5 * batch / (now - t0))
            t0 = now
    return rates[1:]  # first interval includes warm-up


def trainer_rates(cmd_prefix: list[str], shards: Path, run_dir: Path, arch: str, batch: int, steps: int,
                  precision: str, width: float) -> list[float]:
    """Run the real trainer as a subprocess and read its logged images/s from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cmd = cmd_prefix + ["-m", "bicogan_dist.train", f"data.shards={shards}", f"log.run_dir={run_dir}",
                        f"model.arch={arch}", f"model.width={width}", f"data.batch_size={batch}",
                        f"train.max_steps={steps}", f"train.mixed_precision={precision}", "augment.ops=[]",
                        "log.log_every=5", f"log.image_every={10 * steps}", f"log.checkpoint_every={10 * steps}",
                        "log.progress=false"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed:\n{proc.stderr[-3000:]}")
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    values = [e.value for e in acc.Scalars("perf/images_per_s")]
    return values[1:-1] if len(values) > 2 else values  # drop warm-up and the final (checkpoint) interval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="shard folder (default: a synthetic set made here)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--width", type=float, default=1.0, help="model.width for arch ours")
    parser.add_argument("--no-paper", action="store_true", help="skip arch paper (minutes per step on 2 CPU cores)")
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-process job")
    parser.add_argument("--plain", nargs=4, metavar=("ARCH", "BATCH", "STEPS", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain:  # child mode: one plain loop in a fresh process, result as JSON
        arch, batch, steps, precision = args.plain
        print(json.dumps(plain_loop(arch, int(batch), int(steps), precision, args.width)))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    shards = args.shards
    if shards is None:
        from bicogan_dist.data.shards import main as shard_main

        shards = tmp / "shards"
        shard_main(["--synthetic", "6000", "--out", str(shards)])
    single = [sys.executable]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "launch_configs/accelerate/cpu_2proc.yaml"), "--main_process_port", "29611"]
    rows = []
    cases = [("ours", 64, "no"), ("ours", 64, "bf16")]
    if not args.no_paper:
        cases += [("paper", 128, "no"), ("paper", 128, "bf16")]
    for arch, batch, precision in cases:
        width = args.width if arch == "ours" else 1.0
        steps = args.steps if arch == "ours" else max(20, args.steps // 2)
        child = subprocess.run([sys.executable, __file__, "--plain", arch, str(batch), str(steps), precision,
                                "--width", str(width)], cwd=ROOT, capture_output=True, text=True, check=True)
        plain = statistics.median(json.loads(child.stdout.strip().splitlines()[-1]))
        trainer = statistics.median(trainer_rates(single, shards, tmp / f"run_{arch}_{precision}", arch, batch,
                                                  steps, precision, width))
        rows.append((f"{arch} b{batch} {precision}", "1 process", trainer, plain))
    if not args.no_ddp:
        ddp = statistics.median(trainer_rates(launch, shards, tmp / "run_ddp", "ours", 64, args.steps, "no",
                                              args.width))
        rows.append(("ours b64/process no", "2 processes (DDP, gloo)", ddp, None))

    print(f"\n{'case':<22} {'job':<24} {'trainer img/s':>14} {'plain img/s':>12} {'ratio':>6} {'vs seed Keras':>14}")
    for case, job, trainer, plain in rows:
        ratio = f"{trainer / plain:.2f}" if plain else "-"
        seed = f"{trainer / SEED_KERAS_IMAGES_PER_S:.1f}x" if case.startswith("paper") else "-"
        plain_s = f"{plain:.0f}" if plain else "-"
        print(f"{case:<22} {job:<24} {trainer:>14.0f} {plain_s:>12} {ratio:>6} {seed:>14}")
    print(f"\nmedians of 5-step intervals; seed Keras code (paper arch, batch 128): {SEED_KERAS_IMAGES_PER_S} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
