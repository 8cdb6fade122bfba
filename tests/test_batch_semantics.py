"""Batch semantics across process counts: ``train.global_batch_size`` split per process, the learning-rate rule,
the EMA as a half-life in images, and a 1- and a 2-process run (real accelerate launch) that see the same
number of images per step and the same epochs."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bicogan_dist.config import ConfigError
from bicogan_dist.train.config import (OptimConfig, TrainConfig, check_world_size, ema_decay_per_step, load_config,
                                       scaled_optim)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "launch_configs" / "experiments" / "smoke.yaml"
CPU_2PROC = ROOT / "launch_configs" / "accelerate" / "cpu_2proc.yaml"


def test_global_batch_is_split_over_the_launched_processes_and_wins_over_data_batch_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(SMOKE, ["train.global_batch_size=48", "data.batch_size=64"])
    assert cfg.data.batch_size == 24
    check_world_size(cfg, 2)
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 48 was split as 24 per process for "
                                          r"WORLD_SIZE=2, but the run has 4 processes"):
        check_world_size(cfg, 4)
    monkeypatch.delenv("WORLD_SIZE")
    assert load_config(SMOKE, ["train.global_batch_size=48"]).data.batch_size == 48  # no launcher: one process
    assert load_config(SMOKE).data.batch_size == 32  # unset: data.batch_size per process, as written


@pytest.mark.parametrize("world, batch, hint", [(2, 17, "e.g. 16 or 18"), (3, 32, "e.g. 30 or 33"),
                                                (8, 4, "e.g. 8 or 8")])
def test_global_batch_that_does_not_divide_names_the_key(monkeypatch, world, batch, hint):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [f"train.global_batch_size={batch}"])
    assert str(err.value) == (f"train.global_batch_size: {batch} images per step do not split evenly over {world} "
                              f"processes; choose a multiple of {world} ({hint}), or unset it and give "
                              f"data.batch_size per process")


def test_global_batch_per_process_must_still_fit_the_minibatch_stddev_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"model.mbstd_group: data.batch_size 6 \(per process\)"):
        load_config(SMOKE, ["train.global_batch_size=24"])


def test_learning_rate_rules():
    base = OptimConfig(lr_ge=1e-4, lr_d=3e-4, reference_batch=64)
    assert scaled_optim(base, 256) == base  # none: as written, whatever the batch
    linear = scaled_optim(OptimConfig(lr_ge=1e-4, lr_d=3e-4, reference_batch=64, lr_scaling="linear"), 256)
    assert (linear.lr_ge, linear.lr_d) == pytest.approx((4e-4, 12e-4), rel=1e-12)
    sqrt = scaled_optim(OptimConfig(lr_ge=1e-4, lr_d=3e-4, reference_batch=64, lr_scaling="sqrt"), 256)
    assert (sqrt.lr_ge, sqrt.lr_d) == pytest.approx((2e-4, 6e-4), rel=1e-12)


def test_ema_half_life_in_images_gives_the_same_average_per_image_at_any_batch():
    assert ema_decay_per_step(TrainConfig(ema_decay=0.99), 4096) == 0.99  # per step, unless ema_kimg is set
    t = TrainConfig(ema_kimg=10.0)
    assert ema_decay_per_step(t, 10_000) == 0.5
    # after the same number of images, the same weight is left on the start, at 64 or 512 images per step
    assert ema_decay_per_step(t, 64) ** 8 == pytest.approx(ema_decay_per_step(t, 512), rel=1e-12)
    assert math.isclose(ema_decay_per_step(t, 512), 0.5 ** 0.0512)


@pytest.mark.parametrize("override, message", [
    ("optim.lr_scaling=cube", "optim.lr_scaling: 'cube' is not one of ['none', 'linear', 'sqrt']"),
    ("optim.reference_batch=0", "optim.reference_batch must be an integer >= 1, got 0"),
    ("train.global_batch_size=0", "train.global_batch_size must be an integer >= 1, got 0"),
    ("train.ema_kimg=0", "train.ema_kimg must be > 0"),
    ("train.sync_every=0", "train.sync_every must be an integer >= 1, got 0"),
])
def test_bad_batch_keys_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [override])
    assert message in str(err.value)


def _launch(run_dir: Path, shards: Path, processes: int) -> str:
    from test_train import env, free_port

    launch = ["--config_file", str(CPU_2PROC)] if processes == 2 else ["--num_processes", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", str(free_port()),
           "-m", "bicogan_dist.train", "--config", str(SMOKE), f"data.shards={shards}", f"log.run_dir={run_dir}",
           "model.width=0.25", "model.z_dim=16", "log.heldout_size=32", "log.progress=false",
           "train.global_batch_size=32", "optim.lr_scaling=linear", "optim.reference_batch=16",
           "train.ema_kimg=0.5", "train.max_steps=4", "log.log_every=2", "log.image_every=100",
           "log.checkpoint_every=100"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert f"{processes} process(es) on cpu" in output  # the world size, not assumed
    return output


def test_one_and_two_processes_see_the_same_images_per_step(tmp_path):
    from bicogan_dist.cli.shard import main as shard_main
    from test_train import scalars_and_images

    shards = tmp_path / "shards"
    assert shard_main(["--synthetic", "900", "--out", str(shards), "--no-progress"]) in (0, None)
    one = _launch(tmp_path / "one", shards, 1)
    two = _launch(tmp_path / "two", shards, 2)
    # 900 samples, 6 classes -> the Training split; the same batches per epoch at 32 or 2 x 16 images per step
    assert "batches/epoch of 32/process" in one and "batches/epoch of 16/process" in two
    decay = 0.5 ** (32 / 500)
    for out in (one, two):
        assert f"global batch 32 images/step; lr/ge 0.0004, lr/d 0.0004 (optim.lr_scaling linear); EMA decay " \
               f"{decay:.6g}/step" in out
    s1, _ = scalars_and_images(tmp_path / "one")
    s2, _ = scalars_and_images(tmp_path / "two")
    assert s1["epoch"] == s2["epoch"] and len(s1["epoch"]) == 2
    assert s1["lr/ge"] == s2["lr/ge"] == pytest.approx([4e-4, 4e-4])
    assert s1["efl/gamma"] == s2["efl/gamma"]  # t = epochs: the same schedule
