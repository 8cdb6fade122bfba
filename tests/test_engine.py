"""The engine interface: both engines implement every operation of ``engine_base.Engine``, and the trainer
reaches the optional ones (``push_module_weights``) through it on either engine.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from bicogan_dist.train.engine_base import Engine
from test_train import run, shards, train_cmd  # noqa: F401  (shards is a fixture)


@pytest.mark.parametrize("module, name", [("bicogan_dist.train.engine", "AccelerateEngine"),
                                          ("bicogan_dist.train.engine_deepspeed", "DeepSpeedEngine")])
def test_each_engine_implements_the_whole_interface(module, name):
    cls = getattr(__import__(module, fromlist=[name]), name)
    assert issubclass(cls, Engine)
    assert not cls.__abstractmethods__, f"{name} lacks {sorted(cls.__abstractmethods__)}"
    for op in ("prepare", "autocast", "barrier", "all_reduce", "unwrap", "learning_rate", "push_module_weights",
               "step", "save", "load"):
        assert callable(getattr(cls, op)), op


def test_the_deepspeed_engine_does_not_import_its_sibling():
    """Shared parts come from engine_base: importing the DeepSpeed engine leaves the DDP engine unloaded."""
    code = ("import sys, bicogan_dist.train.engine_deepspeed; "
            "print('bicogan_dist.train.engine' in sys.modules, 'bicogan_dist.train.engine_base' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_wgan_clipping_runs_through_the_ddp_engines_no_op(shards, tmp_path):  # noqa: F811
    """loss.loss=wgan calls engine.push_module_weights after every D step; on DDP it is the interface's no-op."""
    proc = run(train_cmd(tmp_path / "run", shards, "model.kind=gan", "loss.loss=wgan", "train.max_steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done:" in proc.stdout
