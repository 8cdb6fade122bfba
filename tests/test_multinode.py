"""Multi-node correctness, simulated on one machine with real 2-process ``accelerate launch`` runs (gloo).

A run folder on each node's own disk is simulated by the trainer's test hook
``BICOGAN_TEST_NODE_LOCAL_RUN_DIR=1`` (rank 1 then uses ``<log.run_dir>.rank1``, see
``bicogan_dist.train.trainer.rank_run_dir``) or, for the checkpoint layer alone, by
tests/multinode_worker.py, which gives every rank a folder of its own. Every test asserts that two
processes ran: the monitor's ``2 process(es) on cpu`` line, or one error line per rank, or one result
file per rank.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bicogan_dist.train import checkpoint as ckpt
from bicogan_dist.train.trainer import NODE_LOCAL_TEST_ENV

from test_resume_launcher import CPU_2PROC, ROOT, SMOKE, TINY, env
from test_train import free_port

WORKER = Path(__file__).resolve().parent / "multinode_worker.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from bicogan_dist.cli.shard import main as shard_main

    out = tmp_path_factory.mktemp("shards") / "synthetic"
    assert shard_main(["--synthetic", "300", "--out", str(out)]) in (0, None)
    return out


def launch(run_dir: Path, shards: Path, steps: int, *extra: str, resume: bool = False,
           node_local: bool = False) -> subprocess.CompletedProcess:
    """The trainer on 2 CPU processes; ``node_local``: rank 1 gets a run folder of its own (the test hook)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "--main_process_port", str(free_port()), "-m", "bicogan_dist.train", "--config", str(SMOKE)]
    if resume:
        cmd += ["--resume", "latest"]
    cmd += [f"data.shards={shards}", f"log.run_dir={run_dir}", *TINY, *extra, f"train.max_steps={steps}"]
    e = env()
    if node_local:
        e[NODE_LOCAL_TEST_ENV] = "1"
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """A 2-process run of 2 steps on a shared folder, with a checkpoint after each step."""
    run_dir = tmp_path_factory.mktemp("multinode") / "run"
    proc = launch(run_dir, shards, 2, "log.checkpoint_every=1", "train.dist_timeout_s=77")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "2 process(es) on cpu" in out
    # The timeout of train.dist_timeout_s, read back from the process group the run used.
    assert "process-group timeout 77 s" in out
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["checkpoint-00000001", "checkpoint-00000002"]
    assert not list(run_dir.glob(".shared-fs-*"))  # the shared-folder check passed and removed its markers
    return run_dir


def test_resume_with_a_rank_that_sees_no_checkpoint_stops_every_rank(trained, shards):
    proc = launch(trained, shards, 4, resume=True, node_local=True)
    out = proc.stdout + proc.stderr
    # The launcher's code when a rank fails. (The ranks return 2, but a rank may abort at exit with a gloo
    # thread alive, "terminate called without an active exception", so torchrun's report is not asserted.)
    assert proc.returncode == 1, out[-4000:]
    errors = error_lines(out)
    assert len(errors) == 2, out[-4000:]  # both ranks stop, each with the message
    for line in errors:
        assert line.startswith("error: --resume latest: rank 0 resolved checkpoint checkpoint-00000002 (step 2) "
                               "but rank(s) [1] cannot see it"), line
        assert "nothing was trained. log.run_dir must be on a filesystem every node mounts at the same path" in line
    rank1_view = trained.with_name("run.rank1") / "checkpoints" / "checkpoint-00000002"
    # Rank 1 also says what it lacks.
    assert sum(f", does not see {rank1_view})" in line for line in errors) == 1, "\n".join(errors)
    assert "starting at step" not in out  # no rank started training, at step 0 or elsewhere


def test_a_run_folder_not_shared_by_all_ranks_stops_at_start(shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, shards, 2, node_local=True)
    out = proc.stdout + proc.stderr
    # The launcher's code when a rank fails. (The ranks return 2, but a rank may abort at exit with a gloo
    # thread alive, "terminate called without an active exception", so torchrun's report is not asserted.)
    assert proc.returncode == 1, out[-4000:]
    errors = error_lines(out)
    assert len(errors) == 2, out[-4000:]
    rank1_dir = run_dir.with_name("run.rank1")
    for line, folder in zip(sorted(errors, key=len), (run_dir, rank1_dir)):  # each rank names its own folder
        assert line.startswith(f"error: log.run_dir: {folder} is not one folder shared by all ranks: rank 0 does "
                               f"not see the marker files of rank(s) [1]"), line
    assert f"; this rank (host " in errors[0] + errors[1] and f"wrote {rank1_dir}/.shared-fs-" in errors[0] + errors[1]
    for line in errors:
        assert line.endswith("log.run_dir must be on a filesystem every node mounts at the same path (NFS, Lustre, "
                             "GPFS, ...), not a node-local disk: every rank writes its part of each checkpoint into "
                             "one folder and every rank reads it back on --resume"), line
    assert "starting at step" not in out
    # Each rank removed its marker; rank 1's folder was its own.
    for folder in (run_dir, rank1_dir):
        assert folder.is_dir() and not list(folder.glob(".shared-fs-*"))


def test_every_rank_creates_its_checkpoint_folder_and_ranks_agree_on_what_they_loaded(tmp_path):
    """Through tests/multinode_worker.py: rank 1's run folder is its own, so rank 0 never created its ``.tmp``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "--main_process_port", str(free_port()), str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "terminate called" not in proc.stderr  # engine.close() tore the process group down before exit
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]
    # The process group runs with train.dist_timeout_s.
    assert [r["timeout_s"] for r in results] == [77.0, 77.0]
    # Rank 0 committed its checkpoint; rank 1 wrote its RNG state into the .tmp folder it created itself.
    committed = tmp_path / "node0" / "checkpoints" / "checkpoint-00000001"
    assert results[0]["saved"] == str(committed) and (committed / ckpt.STATE_FILE).is_file()
    assert (committed / "rng-rank0.pt").is_file() and (committed / "ge.safetensors").is_file()
    assert (tmp_path / "node1" / "checkpoints" / "checkpoint-00000001.tmp" / "rng-rank1.pt").is_file()
    # Rank 1 loaded step 7 where rank 0 loaded step 1: both stop, naming rank 1.
    for r in results:
        assert r["load_error"].startswith(f"{committed if r['rank'] == 0 else tmp_path / 'other' / committed.name}: "
                                          f"rank(s) [1] loaded another step than rank 0's 1"), r
        assert "would train different weights; nothing was trained. log.run_dir must be on a filesystem" in \
            r["load_error"]
    assert "this rank loaded step 7" in results[1]["load_error"]
    # The same step but other weights on rank 1: the hash of the loaded weights differs.
    for r in results:
        assert r["weights_error"].startswith(f"{committed if r['rank'] == 0 else tmp_path / 'changed' / committed.name}"
                                             f": after loading step 1, rank(s) [1] hold other weights than rank 0"), r
    # Both ranks load the same files: no error.
    assert [r["same_files_error"] for r in results] == [None, None]


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_the_process_group_timeout_is_validated(value):
    from bicogan_dist.config import ConfigError
    from bicogan_dist.train.config import load_config

    with pytest.raises(ConfigError, match=r"^train\.dist_timeout_s must be a number of seconds > 0, got"):
        load_config(SMOKE, [f"train.dist_timeout_s={value}"])
    assert load_config(SMOKE).train.dist_timeout_s == 1800.0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed")
def test_a_zero_checkpoint_does_not_resume_on_another_world_size(shards, tmp_path):
    run_dir = tmp_path / "run"
    ds = ["train.engine=deepspeed", f"train.deepspeed_config={ROOT / 'launch_configs/deepspeed/zero2.json'}",
          "log.checkpoint_every=2"]
    proc = launch(run_dir, shards, 2, *ds, "train.dist_timeout_s=88")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "2 process(es) on cpu" in out and "process-group timeout 88 s" in out
    assert ckpt.read_state(ckpt.list_checkpoints(run_dir)[-1])["world_size"] == 2
    cmd = [sys.executable, "-m", "bicogan_dist.train", "--config", str(SMOKE), "--resume", "latest",
           f"data.shards={shards}", f"log.run_dir={run_dir}", *TINY, *ds, "train.max_steps=4"]
    one = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    out = one.stdout + one.stderr
    assert one.returncode == 2, out[-4000:]
    assert (f"error: {run_dir / 'checkpoints' / 'checkpoint-00000002'}: this DeepSpeed ZeRO checkpoint was written "
            f"by 2 processes and cannot resume on 1; resume it with 2 processes") in out
    assert "starting at step" not in out
