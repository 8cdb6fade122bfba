"""Faults of the checkpoint layer found by trying to break it, each through the real trainer command.

A damaged newest checkpoint is skipped by ``--resume latest`` (and refused by an explicit path); a
pickle that would run code is refused by name without advice to load it unsafely; weights of other
shapes name their file; a second run on one run folder stops while the first holds it, and a lock
left by a dead process is taken over.
"""
from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bicogan_dist.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "launch_configs" / "experiments" / "smoke.yaml"
TINY = ["model.width=0.25", "model.z_dim=16", "data.batch_size=16", "log.heldout_size=32", "log.progress=false",
        "log.checkpoint_every=1", "log.image_every=100"]


def train(run_dir: Path, shards: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bicogan_dist.train", "--config", str(SMOKE), f"data.shards={shards}",
           f"log.run_dir={run_dir}", *TINY, f"train.max_steps={steps}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """Synthetic shards and a 2-step run with a checkpoint at each step (copied per test)."""
    from bicogan_dist.cli.shard import main as shard_main

    base = tmp_path_factory.mktemp("ckpt")
    shards = base / "synthetic"
    assert shard_main(["--synthetic", "600", "--out", str(shards)]) in (0, None)
    proc = train(base / "run", shards, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "run", shards


@pytest.fixture
def run_copy(trained, tmp_path) -> tuple[Path, Path]:
    run, shards = trained
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", shards


def test_resume_latest_skips_a_checkpoint_with_a_missing_file(run_copy):
    run, shards = run_copy
    (ckpt.checkpoint_root(run) / "checkpoint-00000002" / "d.safetensors").unlink()
    proc = train(run, shards, 3, "--resume", "latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: skipping" in proc.stderr and "checkpoint-00000002: incomplete (missing d.safetensors)" in proc.stderr
    assert "starting at step 1" in proc.stdout + proc.stderr


def test_resume_from_an_incomplete_checkpoint_path_fails_clearly(run_copy):
    run, shards = run_copy
    target = ckpt.checkpoint_root(run) / "checkpoint-00000002"
    (target / "ema.safetensors").unlink()
    proc = train(run, shards, 3, "--resume", str(target))
    assert proc.returncode == 2
    assert "the checkpoint is incomplete (missing ema.safetensors)" in proc.stderr and "Traceback" not in proc.stderr


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("name", ["optim.pt", "rng-rank0.pt"])
def test_a_malicious_pickle_is_refused_by_name(run_copy, name, tmp_path):
    run, shards = run_copy
    target = ckpt.checkpoint_root(run) / "checkpoint-00000002" / name
    target.write_bytes(pickle.dumps({"cpu": _Payload()}))
    proc = train(run, shards, 3, "--resume", "latest")
    assert proc.returncode == 2
    assert f"error: {target}: not a plain tensor file" in proc.stderr and "do not trust" in proc.stderr
    assert "weights_only=False" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (ROOT / "PWNED").exists()


def test_weights_of_other_shapes_name_their_file(run_copy):
    run, shards = run_copy
    target = ckpt.checkpoint_root(run) / "checkpoint-00000002" / "ema.safetensors"
    state = ckpt.read_tensors(target)
    key = next(k for k, v in state.items() if v.dim() == 2)
    state[key] = torch.zeros(3, 3)
    save_file(state, str(target))
    proc = train(run, shards, 3, "--resume", "latest")
    assert proc.returncode == 2
    assert f"error: {target}: weights do not match the model of this config ({key}: file (3, 3)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_second_run_on_a_folder_in_use_stops_and_a_stale_lock_is_taken_over(run_copy):
    run, shards = run_copy
    lock = run / ckpt.LOCK_FILE
    lock.write_text(f"{socket.gethostname()} {os.getpid()}\n")  # this (live) test process holds it
    proc = train(run, shards, 3, "--resume", "latest")
    assert proc.returncode == 2
    assert f"log.run_dir: {run} is in use by another run (process {socket.gethostname()} {os.getpid()})" in proc.stderr
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{socket.gethostname()} {int(dead.stdout)}\n")  # its owner has exited: stale
    proc = train(run, shards, 3, "--resume", "latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not lock.exists()  # released at the end
