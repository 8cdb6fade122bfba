"""Resume through the paths users run: ``accelerate launch`` with two CPU processes, and ``bash run.sh`` twice.

The in-process resume tests (test_train, test_deepspeed) could not see that under the launcher
the device prints as ``cpu:0``, which safetensors and torch's storage restore refuse; these do.
Each compares a 2-process run split in two (resumed through the launcher, overrides written
after ``--resume``) with a straight run of the same length.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from bicogan_dist.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "launch_configs" / "experiments" / "smoke.yaml"
CPU_2PROC = ROOT / "launch_configs" / "accelerate" / "cpu_2proc.yaml"
TINY = ["model.width=0.25", "model.z_dim=16", "data.batch_size=16", "log.heldout_size=32", "log.progress=false",
        "log.checkpoint_every=100"]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"))
    e.pop("ACCELERATE_USE_CPU", None)
    return e


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from bicogan_dist.cli.shard import main as shard_main

    out = tmp_path_factory.mktemp("shards") / "synthetic"
    assert shard_main(["--synthetic", "900", "--out", str(out)]) in (0, None)
    return out


def launch(run_dir: Path, shards: Path, steps: int, *extra: str, resume: bool = False) -> str:
    """``accelerate launch`` the trainer on 2 CPU processes; ``--resume latest`` goes *before* the overrides."""
    from test_train import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "--main_process_port", str(free_port()), "-m", "bicogan_dist.train", "--config", str(SMOKE)]
    if resume:
        cmd += ["--resume", "latest"]
    cmd += [f"data.shards={shards}", f"log.run_dir={run_dir}", *TINY, *extra, f"train.max_steps={steps}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "2 process(es) on cpu" in output  # the world size, not assumed
    return output


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the newest checkpoint (both engines), consolidated on the CPU."""
    weights = ckpt.weights(ckpt.list_checkpoints(run_dir)[-1])
    return {f"{unit}.{k}": v for unit, sd in weights.items() for k, v in sd.items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=0), key


def test_ddp_resume_through_the_launcher_equals_the_straight_run(shards, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["augment.ops=[affine_rotate]"]
    launch(straight, shards, 8, *common)
    launch(split, shards, 4, *common)
    out = launch(split, shards, 8, *common, resume=True)
    assert "starting at step 4" in out
    assert_same(final_tensors(straight), final_tensors(split), atol=1e-6)
    opt = [ckpt.read_torch_tensors(ckpt.list_checkpoints(r)[-1] / ckpt.OPTIM_FILE) for r in (straight, split)]
    for unit in ("ge", "d"):
        a, b = (o["optimizers"][unit]["state"] for o in opt)
        assert a.keys() == b.keys() and int(a[0]["step"]) == 8
        for i in a:
            assert torch.allclose(a[i]["exp_avg"], b[i]["exp_avg"], atol=1e-6, rtol=0), (unit, i)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed")
def test_deepspeed_resume_through_the_launcher_equals_the_straight_run(shards, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["train.engine=deepspeed", f"train.deepspeed_config={ROOT / 'launch_configs/deepspeed/zero2.json'}"]
    launch(straight, shards, 6, *common)
    launch(split, shards, 3, *common)
    out = launch(split, shards, 6, *common, resume=True)
    assert "starting at step 3" in out
    assert_same(final_tensors(straight), final_tensors(split), atol=1e-6)


def _clone_with_venv(tmp_path: Path) -> Path:
    """A fresh clone of this checkout whose .venv sees this venv's packages (run.sh then installs only itself)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    # Uncommitted work is what is under test: copy the tracked files as they are now.
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        src, dst = ROOT / name, clone / name
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    subprocess.run([sys.executable, "-m", "venv", str(clone / ".venv")], check=True)
    purelib = subprocess.run([str(clone / ".venv/bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_outer_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return clone


@pytest.mark.slow
def test_run_sh_twice_continues_the_run(tmp_path):
    """The README's main job, run a second time with a larger step count, continues where it stopped."""
    clone = _clone_with_venv(tmp_path)
    e = env()
    e.pop("VIRTUAL_ENV", None)
    quick = ["model.width=0.25", "log.progress=false", "log.image_every=5", "log.checkpoint_every=5"]
    first = subprocess.run(["bash", "run.sh", "train.max_steps=6", *quick], cwd=clone, env=e, capture_output=True,
                           text=True, timeout=900)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert "starting at step 0" in first.stdout + first.stderr
    second = subprocess.run(["bash", "run.sh", "train.max_steps=10", *quick], cwd=clone, env=e, capture_output=True,
                            text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "starting at step 6" in out and "at step 10" in out
    run_dir = clone / "runs" / "quickstart-synthetic"
    assert [json.loads((p / "state.json").read_text())["step"] for p in ckpt.list_checkpoints(run_dir)][-1] == 10
