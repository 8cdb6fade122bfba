"""``train.compile=true`` on the CPU (inductor): the same losses as eager, no retracing after the first step,
and checkpoints that resume across compile on/off. Slow: the first compile takes minutes on 2 cores."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from test_train import checkpoint_tensors, run, scalars_and_images, train_cmd

pytestmark = pytest.mark.slow

COMMON = ["log.log_every=1", "log.image_every=100", "log.checkpoint_every=2", "log.keep_checkpoints=3",
          "augment.ops=[affine_rotate]", "loss.diffaugment=[translation]"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from bicogan_dist.cli.shard import main as shard_main

    out = tmp_path_factory.mktemp("shards") / "synthetic"
    assert shard_main(["--synthetic", "900", "--out", str(out)]) in (0, None)
    return out


def train(run_dir: Path, shards: Path, steps: int, compile_: bool, *extra: str) -> str:
    proc = run(train_cmd(run_dir, shards, f"train.max_steps={steps}", f"train.compile={str(compile_).lower()}",
                         *COMMON, *extra), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def resume_from_step_2(source: Path, target: Path, shards: Path, compile_: bool) -> None:
    """Copy ``source`` with only its step-2 checkpoint and continue it to step 4."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoint-00000004", "tb", ".lock"))
    out = train(target, shards, 4, compile_, "--resume", "latest")
    assert "starting at step 2" in out


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    assert not any("_orig_mod" in k or k.startswith("module.") for k in a)  # plain keys, compiled or not
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=0), \
            (key, (a[key].float() - b[key].float()).abs().max())


def test_compiled_equals_eager_and_resumes_across_compile_on_off(shards, tmp_path):
    compiled, eager = tmp_path / "compiled", tmp_path / "eager"
    train(compiled, shards, 4, True)
    train(eager, shards, 4, False)
    sc, _ = scalars_and_images(compiled)
    se, _ = scalars_and_images(eager)
    for key in ("loss/d", "loss/ge", "loss/efl", "loss/latent_cycle", "D/real_score"):
        assert len(sc[key]) == 4
        assert sc[key] == pytest.approx(se[key], abs=2e-3, rel=0), key
    # G/E, D and the frozen D of the G/E step: three graphs after step 1, none added later (no retracing
    # from the requires_grad_ toggles, the step-dependent EFL weight or the spectral-norm power iteration)
    assert sc["compile/graphs"] == [3.0, 3.0, 3.0, 3.0]
    assert "compile/graphs" not in se
    final = "checkpoints/checkpoint-00000004"
    straight_c, straight_e = checkpoint_tensors(compiled / final), checkpoint_tensors(eager / final)
    assert_close(straight_c, straight_e, atol=2e-3)  # spectral-norm u vectors included

    resume_from_step_2(compiled, tmp_path / "c_then_e", shards, compile_=False)  # compiled 2 steps, eager 2 more
    resume_from_step_2(eager, tmp_path / "e_then_c", shards, compile_=True)  # eager 2 steps, compiled 2 more
    assert_close(checkpoint_tensors(tmp_path / "c_then_e" / final), straight_e, atol=2e-3)
    assert_close(checkpoint_tensors(tmp_path / "e_then_c" / final), straight_c, atol=2e-3)


def test_compiled_ddp_on_two_processes_stays_in_sync(shards, tmp_path):
    """Compiled after the DDP wrap (gloo, 2 CPU ranks): the ranks hold the same weights and nothing retraces."""
    import json

    from safetensors.torch import load_file
    from test_train import CPU_2PROC, PROBE, SMOKE, TINY, accelerate_cmd, free_port

    out, run_dir = tmp_path / "probe", tmp_path / "run"
    proc = run(accelerate_cmd("--config_file", str(CPU_2PROC), "--main_process_port", str(free_port()),
                              *PROBE, str(out), "--config", str(SMOKE), f"data.shards={shards}",
                              f"log.run_dir={run_dir}", *TINY, "train.max_steps=3", "train.compile=true",
                              "log.log_every=1", "log.image_every=100"), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads((out / f"rank{r}.json").read_text())["world_size"] for r in (0, 1)] == [2, 2]
    rank0, rank1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 10
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    scalars, _ = scalars_and_images(run_dir)
    assert scalars["compile/graphs"] == [3.0, 3.0, 3.0]
