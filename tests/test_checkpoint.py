"""Faults of the checkpoint layer found by trying to break it, each through the real trainer command.

A damaged newest checkpoint is skipped by ``--resume latest`` (and refused by an explicit path); a
pickle that would run code is refused by name without advice to load it unsafely; weights of other
shapes name their file; a second run on one run folder stops while the first holds it, and a lock
left by a dead process is taken over. A run folder that cannot be written stops the run at start, and a
write that fails during a save (a full disk) names the folder and leaves the last good checkpoint intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
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


def train(run_dir: Path, shards: Path, steps: int, *extra: str, max_file_size: int | None = None
          ) -> subprocess.CompletedProcess:
    """The trainer in a process of its own; ``max_file_size`` caps every file it writes (RLIMIT_FSIZE)."""
    cmd = [sys.executable, "-m", "bicogan_dist.train", "--config", str(SMOKE), f"data.shards={shards}",
           f"log.run_dir={run_dir}", *TINY, f"train.max_steps={steps}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_size, max_file_size))

    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if max_file_size else None)


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


def test_a_checkpoint_older_than_an_option_resumes_as_the_networks_it_trained(trained, tmp_path):
    """A state.json written before model.e_emotion existed lacks the key: it reads as the shared head it
    trained, so the run resumes with model.e_emotion=shared; with today's default (branch) the error names
    the key, both values and the override to add (it used to point at the run's config.yaml, which lacks
    the key too)."""
    _, shards = trained
    run = tmp_path / "run"
    proc = train(run, shards, 1, "model.e_emotion=shared")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state_file = ckpt.checkpoint_root(run) / "checkpoint-00000001" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["model"].pop("e_emotion") == "shared"
    state_file.write_text(json.dumps(state))

    proc = train(run, shards, 2, "--resume", "latest")
    assert proc.returncode == 2
    assert (f"error: model: the config's model section differs from the checkpoint's "
            f"({state_file.parent}): model.e_emotion (checkpoint: 'shared', config: 'branch'); resume with the "
            f"run's own settings, e.g. add model.e_emotion=shared") in proc.stderr
    assert "Traceback" not in proc.stderr and not (ckpt.checkpoint_root(run) / "checkpoint-00000002").exists()

    proc = train(run, shards, 2, "--resume", "latest", "model.e_emotion=shared")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting at step 1" in proc.stdout + proc.stderr
    assert (ckpt.checkpoint_root(run) / "checkpoint-00000002" / "state.json").is_file()


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


@pytest.mark.parametrize("where", ["under a file", "is a file"])
def test_a_run_folder_that_cannot_be_written_stops_at_start(trained, tmp_path, where):
    """Root ignores permission bits, so the folder is made uncreatable: a path under a plain file, or a file itself."""
    _, shards = trained
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file\n")
    run = blocker / "run" if where == "under a file" else blocker
    proc = train(run, shards, 1)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: log.run_dir: {run} is not writable: " in proc.stderr
    assert "Traceback" not in proc.stderr and "starting at step" not in proc.stdout + proc.stderr


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("failing", ["ge.safetensors", "optim.pt"])
def test_a_failed_checkpoint_write_names_the_folder_and_keeps_the_last_good_one(run_copy, failing):
    """A real save runs into a file-size limit (EFBIG, the same failed write a full disk gives as ENOSPC): first in
    safetensors' writer (ge.safetensors), then in torch.save (optim.pt, whose own error names no path)."""
    run, shards = run_copy
    root = ckpt.checkpoint_root(run)
    good = root / "checkpoint-00000002"
    before = _digests(good)
    sizes = {name: (good / name).stat().st_size for name in before}
    # A cap that the failing file exceeds and every file written before it (and config, lock, events) fits under.
    if failing == "ge.safetensors":
        cap = sizes["ge.safetensors"] // 2
    else:
        cap = (max(sizes[n] for n in ("ge.safetensors", "d.safetensors")) + sizes["optim.pt"]) // 2
        assert sizes["optim.pt"] > cap > sizes["d.safetensors"]
    proc = train(run, shards, 4, "--resume", "latest", max_file_size=cap)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"error: {root}: cannot write checkpoint checkpoint-00000003 (rank 0: " in proc.stderr
            and "the disk may be full" in proc.stderr
            and f"the last good checkpoint, {good}, is intact" in proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-00000001", "checkpoint-00000002"]
    assert _digests(good) == before
    resumed = train(run, shards, 3, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "starting at step 2" in resumed.stdout + resumed.stderr
