"""The launch configs and the SLURM script do what their comments say.

- ``cpu_2proc.yaml`` stays on the CPU on any machine: a real ``accelerate launch`` starts two
  ranks that see no CUDA device (on a GPU machine through ``CUDA_VISIBLE_DEVICES``, which the
  launcher sets from the config's ``gpu_ids``, and torch reads as "no device").
- ``1gpu.yaml`` leaves ``CUDA_VISIBLE_DEVICES`` as the caller set it.
- ``multinode_2x8.yaml`` has no default rendezvous address, and a rank of a multi-node job whose
  ``MASTER_ADDR`` is loopback stops with an error naming ``--main_process_ip``.
- ``train_multinode.sbatch``: shell syntax; with ``srun`` / ``accelerate`` / ``scontrol`` shims on
  PATH (the script's own bash runs for real), overrides arrive as separate, unglobbed arguments,
  and SIGTERM sent to the batch shell reaches the launcher of the step.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bicogan_dist.evaluate.gpu_check import probe_launch
from bicogan_dist.train.launcher import multinode_address_problem, nodes_in_job

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch_configs" / "accelerate"
SBATCH = ROOT / "launch_configs" / "slurm" / "train_multinode.sbatch"


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    e.pop("ACCELERATE_USE_CPU", None)
    e.update(extra)
    return e


def load(name: str) -> dict:
    return yaml.safe_load((LAUNCH / name).read_text())


# ------------------------------------------------------------------------------------------ CPU config


def visible_devices(value: str) -> list:
    """What torch makes of CUDA_VISIBLE_DEVICES=value (its own parser, in a fresh process)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda._parse_visible_devices())"],
                         env=env(CUDA_VISIBLE_DEVICES=value), capture_output=True, text=True, check=True).stdout
    return eval(out.strip(), {})  # a list of ints printed by torch


def test_cpu_config_hides_every_gpu():
    cfg = load("cpu_2proc.yaml")
    assert cfg["distributed_type"] == "MULTI_GPU" and cfg["num_processes"] == 2
    # The multi-GPU launcher exports gpu_ids as CUDA_VISIBLE_DEVICES (it refuses fewer than two ids);
    # torch reads this value as no device at all, so no rank can pick cuda:N.
    ids = str(cfg["gpu_ids"])
    assert len(ids.split(",")) >= 2
    assert visible_devices(ids) == []
    assert visible_devices("0,1") == [0, 1]  # the parser is real: a normal list is not empty


@pytest.mark.slow
def test_cpu_config_launches_two_cpu_ranks(tmp_path):
    """A real ``accelerate launch --config_file cpu_2proc.yaml``: two ranks, world size 2, device cpu, no CUDA,
    with the GPUs (if any) visible to the launcher itself."""
    e = env()
    e.pop("CUDA_VISIBLE_DEVICES", None)
    ranks = probe_launch(LAUNCH / "cpu_2proc.yaml", e, 300, tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["device"].startswith("cpu") and not r["cuda_available"] for r in ranks), ranks
    import torch

    if torch.backends.cuda.is_built():  # a CUDA build of torch: the launcher set the config's ids
        assert all(r["CUDA_VISIBLE_DEVICES"] == str(load("cpu_2proc.yaml")["gpu_ids"]) for r in ranks), ranks


@pytest.mark.slow
def test_1gpu_config_respects_cuda_visible_devices(tmp_path):
    assert load("1gpu.yaml")["gpu_ids"] == "all"  # a list here would overwrite the caller's choice
    ranks = probe_launch(LAUNCH / "1gpu.yaml", env(CUDA_VISIBLE_DEVICES="3"), 300, tmp_path)
    assert len(ranks) == 1 and ranks[0]["world_size"] == 1
    assert ranks[0]["CUDA_VISIBLE_DEVICES"] == "3"


# ------------------------------------------------------------------------------------------ multi-node


def test_multinode_config_has_no_default_address():
    cfg = load("multinode_2x8.yaml")
    assert cfg["num_machines"] == 2
    assert "main_process_ip" not in cfg  # 127.0.0.1 made node 1 rendezvous with itself


@pytest.mark.parametrize("addr", [None, "127.0.0.1", "127.0.1.1", "localhost", "None"])
def test_multinode_refuses_a_loopback_address(addr):
    e = {"GROUP_WORLD_SIZE": "2", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    if addr is not None:
        e["MASTER_ADDR"] = addr
    problem = multinode_address_problem(e)
    assert problem is not None
    assert f"MASTER_ADDR is {addr or 'unset'}" in problem and "--main_process_ip" in problem


def test_multinode_address_accepted_and_single_node_untouched():
    assert multinode_address_problem({"GROUP_WORLD_SIZE": "2", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
                                      "MASTER_ADDR": "10.0.0.5"}) is None
    # one node (any address, loopback included) is never refused
    assert multinode_address_problem({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1"}) is None
    assert multinode_address_problem({}) is None
    assert nodes_in_job({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}) == 2
    assert nodes_in_job({"GROUP_WORLD_SIZE": "3", "WORLD_SIZE": "24", "LOCAL_WORLD_SIZE": "8"}) == 3


def test_trainer_stops_a_multinode_rank_on_loopback(tmp_path):
    """The real entry point, as a rank of a 2-node job would start it: exit 2 with the error line, nothing trained."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "bicogan_dist.train", f"log.run_dir={run_dir}", "train.max_steps=1"],
                          cwd=ROOT, env=env(GROUP_WORLD_SIZE="2", WORLD_SIZE="16", LOCAL_WORLD_SIZE="8", RANK="0",
                                            MASTER_ADDR="127.0.0.1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: a 2-node job needs node 0's address, but MASTER_ADDR is 127.0.0.1: pass --main_process_ip")
    assert not run_dir.exists()


# ------------------------------------------------------------------------------------------ SLURM


def test_sbatch_syntax_and_signal_target():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    assert "#SBATCH --signal=TERM@120" in text  # the job steps, not only the batch shell (B:)
    assert "B:TERM" not in text


SHIM_SRUN = """#!/bin/bash
# srun stand-in: one task on this machine (node 0); forwards SIGTERM to it, as srun does to its tasks.
while [[ "$1" == --* ]]; do shift; done
export SLURM_NODEID=0
"$@" &
child=$!
trap 'kill -TERM "$child"' TERM
wait "$child"; status=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done
exit $status
"""

SHIM_ACCELERATE = """#!/bin/bash
# accelerate stand-in: writes its argv (one per line) and waits; on SIGTERM it notes it and exits 143.
printf '%s\\n' "$@" > "$SHIM_OUT/argv"
trap 'echo TERM > "$SHIM_OUT/term"; exit 143' TERM
echo started > "$SHIM_OUT/started"
for i in $(seq 1 600); do sleep 0.1; done
echo timeout > "$SHIM_OUT/timeout"
"""

SHIM_SCONTROL = """#!/bin/bash
# scontrol stand-in: `scontrol show hostnames LIST` prints one host per line.
printf 'nodeA\\nnodeB\\n'
"""


def wait_for(path: Path, seconds: float = 60.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(0.1)
    return path.exists()


def test_sbatch_overrides_unsplit_and_term_reaches_the_step(tmp_path):
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("srun", SHIM_SRUN), ("accelerate", SHIM_ACCELERATE), ("scontrol", SHIM_SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "augment.ops=f").write_text("")  # what an unquoted [fliplr,crop] would glob to
    overrides = ["augment.ops=[fliplr,crop]", "log.run_dir=/shared/runs/my run", "model.kind=*"]
    e = env(PATH=f"{shims}{os.pathsep}{os.environ['PATH']}", SHIM_OUT=str(out), SLURM_JOB_NODELIST="node[A-B]",
            SLURM_NNODES="2")
    proc = subprocess.Popen(["bash", str(SBATCH), "exp dir/bicogan.yaml", *overrides], cwd=work, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(out / "started"), (f"batch script exited {proc.returncode}: {proc.stderr.read()!r}"
                                           if proc.poll() is not None else "no start")
        argv = (out / "argv").read_text().splitlines()
        assert argv[argv.index("--num_processes") + 1] == "16"
        assert argv[argv.index("--machine_rank") + 1] == "0"
        assert argv[argv.index("--main_process_ip") + 1] == "nodeA"
        assert argv[argv.index("--config") + 1] == "exp dir/bicogan.yaml"
        assert argv[-4:] == ["latest", *overrides]  # each override one argument, as typed
        proc.send_signal(signal.SIGTERM)  # to the batch shell only
        assert wait_for(out / "term"), "SIGTERM to the batch shell never reached the step's launcher"
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143  # the step's status, passed on
        assert "forwarding it to the training step" in err
        assert not (out / "timeout").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_benchmarks_pick_the_launch_config_of_the_device():
    """bench_quality's --device: cpu trains under cpu_2proc.yaml (CPU on any machine), cuda under 1gpu.yaml."""
    from bicogan_dist.evaluate.quality import default_launch

    cpu, gpu = default_launch("cpu"), default_launch("cuda:0")
    assert cpu[cpu.index("--config_file") + 1] == str(LAUNCH / "cpu_2proc.yaml")
    assert gpu[gpu.index("--config_file") + 1] == str(LAUNCH / "1gpu.yaml")
    with pytest.raises(ValueError, match="device: 'mps' is not cpu or cuda"):
        default_launch("mps")
