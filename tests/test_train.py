"""The trainer end to end, in real processes: accelerate launch with 2 CPU ranks, resume, precision, errors.

Every run uses tiny networks and a few steps on the built-in synthetic set; what is
asserted is behaviour (ranks in sync, resume == straight, messages), not quality.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
PROBE = ["-m", "bicogan_dist.cli.probe"]  # accelerate launch runs the module on every rank
SMOKE = ROOT / "launch_configs" / "experiments" / "smoke.yaml"
CPU_2PROC = ROOT / "launch_configs" / "accelerate" / "cpu_2proc.yaml"
TINY = ["model.width=0.25", "model.z_dim=16", "data.batch_size=16", "log.heldout_size=32", "log.progress=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("ACCELERATE_USE_CPU", None)
    return e


def run(cmd: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout, **kw)


def train_cmd(run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "bicogan_dist.train", "--config", str(SMOKE), f"data.shards={shards}",
            f"log.run_dir={run_dir}", *TINY, *overrides]


def accelerate_cmd(*launch_args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_args]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from bicogan_dist.cli.shard import main as shard_main

    out = tmp_path_factory.mktemp("shards") / "synthetic"
    assert shard_main(["--synthetic", "900", "--out", str(out)]) in (0, None)
    return out


def scalars_and_images(run_dir: Path) -> tuple[dict[str, list[float]], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [e.value for e in acc.Scalars(t)] for t in tags["scalars"]}
    return scalars, set(tags["images"])


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("ge", "d", "ema"):
        out.update({f"{name}.{k}": v for k, v in load_file(str(ckpt / f"{name}.safetensors")).items()})
    return out


def test_two_process_ddp_stays_in_sync_and_logs(shards, tmp_path):
    out, run_dir = tmp_path / "probe", tmp_path / "run"
    proc = run(accelerate_cmd("--config_file", str(CPU_2PROC), "--main_process_port", str(free_port()),
                              *PROBE, str(out), "--config", str(SMOKE), f"data.shards={shards}",
                              f"log.run_dir={run_dir}", *TINY, "train.max_steps=6", "log.log_every=2",
                              "loss.mode_seeking_weight=1",  # the optional terms too
                              "loss.recon_weight=1", "loss.efl_augment=[flip,cutout]", "loss.fake_emotion_weight=1",
                              "model.channels_last=auto",  # rank 0 measures, both ranks take its choice
                              "log.image_every=3", "log.checkpoint_every=3", "log.keep_checkpoints=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world_size"] for i in infos] == [2, 2]
    assert [i["rank"] for i in infos] == [0, 1]
    assert {i["backend"] for i in infos} == {"gloo"}
    from bicogan_dist.train.memory_format import parse_memory_format_line

    assert (proc.stdout + proc.stderr).count("memory format: ") == 1  # rank 0 logs it
    layout = parse_memory_format_line(proc.stdout + proc.stderr)
    assert layout["setting"] == "auto" and layout["ms_contiguous"] > 0 and layout["ms_channels_last"] > 0
    assert [i["channels_last"] for i in infos] == [layout["channels_last"]] * 2  # the live weights, on each rank
    rank0, rank1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and any(k.startswith("d.") for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
        assert torch.isfinite(rank0[key].float()).all(), key

    # Training changed the weights, and what rank 0 checkpointed is what it holds.
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["checkpoint-00000006"]  # keep_checkpoints=1 removed step 3
    saved = checkpoint_tensors(ckpts[0])
    for key, value in saved.items():
        assert torch.equal(value, rank0[key]), key
    state = json.loads((ckpts[0] / "state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 2

    scalars, images = scalars_and_images(run_dir)
    expected = {"loss/d", "loss/ge", "loss/ge_adversarial", "loss/efl", "loss/latent_cycle", "loss/mode_seeking",
                "loss/reconstruction", "loss/fake_emotion",
                "efl/gamma",
                "D/real_score", "D/fake_score", "encoder/batch_accuracy", "encoder/heldout_accuracy", "grad_norm/d",
                "grad_norm/ge", "lr/ge", "lr/d", "perf/images_per_s", "epoch"}
    assert expected <= scalars.keys(), expected - scalars.keys()
    assert all(len(v) == 3 for k, v in scalars.items() if k in expected)  # steps 2, 4, 6
    assert all(torch.isfinite(torch.tensor(v)).all() for v in scalars.values())
    assert scalars["efl/gamma"][0] >= 5.0 and scalars["efl/gamma"] == sorted(scalars["efl/gamma"])
    assert {"samples/per_emotion", "reconstruction/real_vs_GEx", "transfer/real_then_each_emotion"} <= images
    assert (run_dir / "samples" / "step-00000006.png").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


def test_resume_equals_straight_run(shards, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["log.checkpoint_every=100", "augment.ops=[affine_rotate]",  # and every seeded option
              "loss.efl_augment=[flip,translation,cutout]", "loss.recon_weight=1", "loss.fake_emotion_weight=1"]
    proc = run(train_cmd(straight, shards, "train.max_steps=8", *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(train_cmd(split, shards, "train.max_steps=4", *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(train_cmd(split, shards, "train.max_steps=8", *common) + ["--resume", "latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting at step 4" in proc.stdout + proc.stderr
    a = checkpoint_tensors(straight / "checkpoints" / "checkpoint-00000008")
    b = checkpoint_tensors(split / "checkpoints" / "checkpoint-00000008")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6, rtol=0), key
    opt_a = torch.load(straight / "checkpoints" / "checkpoint-00000008" / "optim.pt", weights_only=True)
    opt_b = torch.load(split / "checkpoints" / "checkpoint-00000008" / "optim.pt", weights_only=True)
    assert opt_a["optimizers"]["d"]["state"][0]["step"] == opt_b["optimizers"]["d"]["state"][0]["step"] == 8


def test_new_run_refuses_to_mix_into_an_old_one(shards, tmp_path):
    run_dir = tmp_path / "run"
    first = run(train_cmd(run_dir, shards, "train.max_steps=2", "loss.latent_weight=0"))  # the paper's objective
    assert first.returncode == 0, first.stderr[-3000:]
    scalars, _ = scalars_and_images(run_dir)
    assert "loss/efl" in scalars and "loss/latent_cycle" not in scalars
    proc = run(train_cmd(run_dir, shards, "train.max_steps=4"))
    assert proc.returncode == 2
    assert "already holds checkpoints" in proc.stderr and "--resume latest" in proc.stderr


@pytest.mark.parametrize("kind", ["gan", "cgan", "bigan"])
def test_every_model_kind_trains_with_the_default_losses(shards, tmp_path, kind):
    """The default reconstruction loss (bidirectional kinds) and E's view (conditional + bidirectional) apply
    only where they exist: an unconditional BiGAN reconstructs with G(E_z(x)), the others skip it."""
    run_dir = tmp_path / "run"
    proc = run(train_cmd(run_dir, shards, "train.max_steps=2", "log.log_every=1", f"model.kind={kind}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars, _ = scalars_and_images(run_dir)
    assert ("loss/reconstruction" in scalars) == (kind == "bigan")
    assert all(torch.isfinite(torch.tensor(v)).all() for v in scalars.values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu_stays_finite(shards, tmp_path, precision):
    run_dir = tmp_path / "run"
    proc = run(train_cmd(run_dir, shards, "train.max_steps=4", "log.log_every=2", f"train.mixed_precision={precision}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"precision {precision}" in proc.stdout + proc.stderr
    scalars, _ = scalars_and_images(run_dir)
    assert len(scalars["loss/d"]) == 2
    assert all(torch.isfinite(torch.tensor(v)).all() for v in scalars.values())


def test_nan_loss_stops_with_step_and_loss_and_saves_nothing_after(shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(train_cmd(run_dir, shards, "train.max_steps=6", "log.checkpoint_every=1", "train.inject_nan_at_step=3"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "step 3: non-finite loss (loss/d=nan" in proc.stderr
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["checkpoint-00000001", "checkpoint-00000002"]


def test_nan_between_flag_comparisons_still_names_its_step_and_saves_nothing_after(shards, tmp_path):
    """Flags are compared every train.sync_every steps (and at every log/image/checkpoint step): a NaN at step 6,
    between the checkpoint at 4 and the comparison at 7, is reported as step 6 and nothing after it is saved."""
    run_dir = tmp_path / "run"
    proc = run(train_cmd(run_dir, shards, "train.max_steps=20", "log.log_every=100", "log.image_every=100",
                         "log.checkpoint_every=4", "train.sync_every=7", "train.inject_nan_at_step=6"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "step 6: non-finite loss (loss/d=nan" in proc.stderr
    assert "compared flags at step 7 (train.sync_every)" in proc.stderr
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["checkpoint-00000004"]


@pytest.mark.parametrize("override, message", [
    ("train.sync_every=0", "train.sync_every must be an integer >= 1, got 0"),
    ("model.knd=gan", "unknown config key model.knd"),
    ("model.kind=vae", "model.kind: 'vae' is not one of"),
    ("train.max_steps=0", "train.max_steps must be >= 1"),
    ("data.shards=/nonexistent/shards", "/nonexistent/shards"),
    ("data.batch_size=6", "model.mbstd_group: data.batch_size 6 (per process) is not a multiple"),
])
def test_bad_config_fails_fast_with_the_key(shards, tmp_path, override, message):
    proc = run(train_cmd(tmp_path / "run", shards, override), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_saves_a_checkpoint_and_resume_continues(shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = train_cmd(run_dir, shards, "train.max_steps=100000", "log.checkpoint_every=5")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    first = run_dir / "checkpoints" / "checkpoint-00000005" / "state.json"
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert first.exists(), proc.communicate()[0][-3000:] if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "stop signal received" in output
    steps = [json.loads((p / "state.json").read_text())["step"] for p in (run_dir / "checkpoints").iterdir()]
    assert max(steps) > 5 and max(steps) < 100000
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    resumed = run(train_cmd(run_dir, shards, f"train.max_steps={max(steps) + 2}") + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"starting at step {max(steps)}" in resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_two_machines_on_loopback_form_one_job(shards, tmp_path):
    port, out = free_port(), tmp_path / "probe"
    procs = []
    for machine in (0, 1):
        cmd = accelerate_cmd("--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank",
                             str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                             "--rdzv_backend", "static", *PROBE, str(out), "--config", str(SMOKE),
                             f"data.shards={shards}", f"log.run_dir={tmp_path / 'run'}", *TINY, "train.max_steps=4")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world_size"] for i in infos] == [2, 2]
    a, b = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("path", sorted((ROOT / "launch_configs" / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_config_validates(path):
    """Each shipped experiment loads and passes validation (a typo in one would only show at launch)."""
    from bicogan_dist.train.config import load_config

    cfg = load_config(path)
    assert cfg.name == path.stem
    if path.stem == "bicogan_paper":
        assert (cfg.model.arch, cfg.loss.latent_weight, cfg.data.batch_size) == ("paper", 0.0, 128)
        assert (cfg.loss.loss, cfg.loss.real_emotion, cfg.loss.diffaugment) == ("bce", "encoder", [])
        assert (cfg.loss.mode_seeking_weight, cfg.model.mbstd_by_class) == (0.0, False)
        assert (cfg.optim.lr_ge, cfg.optim.lr_d, cfg.optim.beta1, cfg.optim.beta2) == (2e-4, 2e-4, 0.5, 0.999)
