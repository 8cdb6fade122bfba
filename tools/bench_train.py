"""Benchmark: images/s of the trainer's step against a minimal plain-PyTorch loop on the same networks.

    python tools/bench_train.py [--shards DIR] [--steps 75] [--rounds 2] [--no-paper] [--no-ddp] [--device auto|cpu|cuda]

``--device cpu`` hides the GPUs from every run (CUDA_VISIBLE_DEVICES=""), so a GPU machine measures
the CPU; ``cuda`` runs the plain loop and the single-process trainer on the first GPU (the DDP row
stays the 2-process CPU job). ``auto`` (default): cuda when torch sees one.

Prints one table (medians over the logged intervals of each run after the first, all runs
in this one invocation; plain and trainer runs alternate and the ratio is the median of
the per-round ratios, so a load change on a noisy shared machine hits both sides):
  * trainer vs plain loop, single process, fp32 and bf16, arch ours (batch 64);
  * the same for arch paper at batch 128 (the seed's Keras code: 16.9 images/s on this machine);
  * the trainer as a 2-process CPU DDP job (accelerate launch, launch_configs/accelerate/cpu_2proc.yaml).
The plain loop does the same math (one G/E forward shared by a D step on concatenated
real+fake tuples and a G/E step through frozen D with the EFL and, for arch ours, the
latent cycle loss on E_z(G(z, c)); arch paper runs as published, without it; Adam on
both) with none of the trainer's bookkeeping: no loader, no EMA, no logging, no rank agreement.
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
# Arch ours runs with its default latent cycle loss; arch paper as published, without it (bicogan_paper.yaml).
LATENT_WEIGHT = {"ours": 1.0, "paper": 0.0}


def plain_loop(arch: str, batch: int, steps: int, precision: str, width: float, interval: int,
               device: str = "cpu") -> list[float]:
    """images/s per ``interval``-step interval of a bare PyTorch loop (runs in this process, on ``device``)."""
    import torch
    from torch.nn import functional as F

    from bicogan_dist.models.losses import LossConfig, d_loss, efl_loss, ge_loss, latent_cycle_loss
    from bicogan_dist.models.networks import ModelConfig, build_models

    torch.manual_seed(0)
    cfg = ModelConfig(kind="bicogan", arch=arch, width=width, channels_last=True)  # as this loop was measured
    latent = LATENT_WEIGHT[arch] > 0
    dev = torch.device(device)
    m = build_models(cfg, 6).to(dev)
    G, E, D = m.G, m.E, m.D
    opt_ge = torch.optim.Adam(list(G.parameters()) + list(E.parameters()), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    loss_cfg = LossConfig()
    x = (torch.rand(batch, 1, 48, 48) * 2 - 1).to(dev)
    y = torch.randint(0, 6, (batch,)).to(dev)
    onehot = F.one_hot(y, 6).float()
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    rates, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        z = torch.randn(batch, cfg.z_dim, device=dev)
        with amp:
            fake = G(z, y)
            z_hat, logits = E(x)
            z_rec = E(fake)[0] if latent else None
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
        loss = (ge_loss(loss_cfg, s[:batch], s[batch:]) + 5.0 * efl_loss(logits.float(), y)
                + (LATENT_WEIGHT[arch] * latent_cycle_loss(z_rec, z) if latent else 0.0))
        opt_ge.zero_grad(set_to_none=True)
        loss.backward()
        opt_ge.step()
        D.requires_grad_(True)
        if step % interval == 0:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            now = time.perf_counter()
            rates.append(interval * batch / (now - t0))
            t0 = now
    return rates[1:]  # first interval includes warm-up


def trainer_rates(cmd_prefix: list[str], shards: Path, run_dir: Path, arch: str, batch: int, steps: int,
                  precision: str, width: float, log_every: int, env: dict[str, str] | None = None) -> list[float]:
    """Run the real trainer as a subprocess and read its logged images/s from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cmd = cmd_prefix + ["-m", "bicogan_dist.train", f"data.shards={shards}", f"log.run_dir={run_dir}",
                        f"model.arch={arch}", f"model.width={width}", f"data.batch_size={batch}",
                        f"train.max_steps={steps}", f"train.mixed_precision={precision}", "augment.ops=[]",
                        f"log.log_every={log_every}", f"log.image_every={10 * steps}", f"log.checkpoint_every={10 * steps}",
                        "log.progress=false", f"loss.latent_weight={LATENT_WEIGHT[arch]}"]
    env = dict(env or os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed:\n{proc.stderr[-3000:]}")
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    values = [e.value for e in acc.Scalars("perf/images_per_s")]
    return values[1:] if len(values) > 1 else values  # drop the warm-up interval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="shard folder (default: a synthetic set made here)")
    parser.add_argument("--steps", type=int, default=75)
    parser.add_argument("--log-every", type=int, default=25,
                        help="the trainer's log.log_every (its default); each logged interval is one sample")
    parser.add_argument("--width", type=float, default=1.0, help="model.width for arch ours")
    parser.add_argument("--no-paper", action="store_true", help="skip arch paper (minutes per step on 2 CPU cores)")
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-process job")
    parser.add_argument("--rounds", type=int, default=2, help="alternating plain/trainer runs per arch-ours case")
    parser.add_argument("--paper-rounds", type=int, default=1, help="the same for arch paper (minutes per run)")
    parser.add_argument("--paper-steps", type=int, default=12,
                        help="steps per arch-paper run (seconds per step here), logged every 4")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the single-process runs train (cpu hides the GPUs from every run)")
    parser.add_argument("--plain", nargs=5, metavar=("ARCH", "BATCH", "STEPS", "PRECISION", "INTERVAL"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain:  # child mode: one plain loop in a fresh process, result as JSON
        arch, batch, steps, precision, interval = args.plain
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # the parent hid the GPUs for --device cpu
        print(json.dumps(plain_loop(arch, int(batch), int(steps), precision, args.width, int(interval), device)))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    child_env = dict(os.environ)
    if args.device == "cpu":
        child_env["CUDA_VISIBLE_DEVICES"] = ""  # plain loop and trainer alike stay on the CPU

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    shards = args.shards
    if shards is None:
        from bicogan_dist.cli.shard import main as shard_main

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
        steps, every = (args.steps, args.log_every) if arch == "ours" else (args.paper_steps, 4)
        plains, trainers = [], []
        # Plain and trainer runs alternate, so a load change on this shared machine hits both:
        # the ratio is the median of each round's trainer/plain ratio.
        for r in range(args.rounds if arch == "ours" else args.paper_rounds):
            child = subprocess.run([sys.executable, __file__, "--plain", arch, str(batch), str(steps), precision,
                                    str(every), "--width", str(width)], cwd=ROOT, capture_output=True, text=True,
                                   check=True, env=child_env)
            plains.append(statistics.median(json.loads(child.stdout.strip().splitlines()[-1])))
            trainers.append(statistics.median(trainer_rates(single, shards, tmp / f"run_{arch}_{precision}_{r}", arch,
                                                            batch, steps, precision, width, every, child_env)))
            print(f"{arch} b{batch} {precision} round {r + 1}: trainer {trainers[-1]:.1f} img/s, "
                  f"plain {plains[-1]:.1f} img/s", file=sys.stderr, flush=True)
        ratio = statistics.median(t / p for t, p in zip(trainers, plains))
        rows.append((f"{arch} b{batch} {precision}", "1 process", statistics.median(trainers),
                     statistics.median(plains), ratio))
    if not args.no_ddp:
        ddp = statistics.median(trainer_rates(launch, shards, tmp / "run_ddp", "ours", 64, args.steps, "no",
                                              args.width, args.log_every))
        rows.append(("ours b64/process no", "2 processes (DDP, gloo)", ddp, None, None))

    print(f"\n{'case':<22} {'job':<24} {'trainer img/s':>14} {'plain img/s':>12} {'ratio':>6} {'vs seed Keras':>14}")
    for case, job, trainer, plain, ratio in rows:
        ratio = f"{ratio:.2f}" if ratio else "-"
        seed = f"{trainer / SEED_KERAS_IMAGES_PER_S:.1f}x" if case.startswith("paper") else "-"
        plain_s = f"{plain:.0f}" if plain else "-"
        print(f"{case:<22} {job:<24} {trainer:>14.0f} {plain_s:>12} {ratio:>6} {seed:>14}")
    print(f"\nmedians of logged intervals ({args.log_every} steps; arch paper 4), ratio = median of rounds; seed Keras code (paper arch, batch 128): {SEED_KERAS_IMAGES_PER_S} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
