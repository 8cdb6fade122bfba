"""Run by tests/test_multinode.py on every rank of a real 2-process ``accelerate launch``: the checkpoint layer's
multi-rank parts with a run folder of each rank's own, as on nodes whose run_dir is a local disk.

    accelerate launch --config_file launch_configs/accelerate/cpu_2proc.yaml tests/multinode_worker.py OUT

1. ``checkpoint.save`` into ``OUT/node<R>`` (rank 0 creates only its own ``.tmp`` folder): every rank must
   create the folder it writes its RNG state into.
2. ``checkpoint.load_agreed`` where rank 1's copy of the checkpoint holds another step, or the same step with
   other weights: every rank must stop; with the same files on both ranks it loads.

Writes ``OUT/rank<R>.json``: rank, world size, the process group's timeout, the saved folder, the load errors.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import torch

from bicogan_dist.models.networks import build_models
from bicogan_dist.train import checkpoint as ckpt
from bicogan_dist.train.config import load_config
from bicogan_dist.train.engine_base import make_engine, process_group_timeout_s

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 77


def main(out: Path) -> None:
    cfg = load_config(ROOT / "launch_configs" / "experiments" / "smoke.yaml",
                      ["model.width=0.25", "model.z_dim=16", f"train.dist_timeout_s={TIMEOUT_S}"])
    engine = make_engine(cfg)
    torch.manual_seed(0)
    models = build_models(cfg.model, 6)
    G_ema = copy.deepcopy(models.G).requires_grad_(False)
    engine.prepare(models, cfg.optim)
    model_section = cfg.to_dict()["model"]
    result = {"rank": engine.rank, "world_size": engine.world_size,
              "timeout_s": process_group_timeout_s(engine.device)}

    saved = ckpt.save(out / f"node{engine.rank}", 1, engine, G_ema, {"model": model_section}, keep=3)
    result["saved"] = str(saved)

    other = out / "other" / saved.name  # rank 1's view: the same name, another step inside
    if engine.is_main:
        shutil.copytree(saved, other)
        state = ckpt.read_state(other)
        (other / ckpt.STATE_FILE).write_text(json.dumps({**state, "step": 7}))
    engine.barrier()
    point = ckpt.ResumePoint(saved if engine.is_main else other, 1)
    result["load_error"] = load_error(point, engine, G_ema, model_section)

    changed = out / "changed" / saved.name  # rank 1's view: the same step, other weights
    if engine.is_main:
        shutil.copytree(saved, changed)
        ge = ckpt.read_tensors(changed / "ge.safetensors")
        ckpt.write_tensors({k: v + 1 if v.is_floating_point() else v for k, v in ge.items()},
                           changed / "ge.safetensors")
    engine.barrier()
    point = ckpt.ResumePoint(saved if engine.is_main else changed, 1)
    result["weights_error"] = load_error(point, engine, G_ema, model_section)
    committed = out / "node0" / "checkpoints" / saved.name  # rank 0's, which rank 1 can read here
    result["same_files_error"] = load_error(ckpt.ResumePoint(committed, 1), engine, G_ema, model_section)
    (out / f"rank{engine.rank}.json").write_text(json.dumps(result))
    engine.close()


def load_error(point: ckpt.ResumePoint, engine, G_ema: torch.nn.Module, model_section: dict) -> str | None:
    try:
        ckpt.load_agreed(point, engine, G_ema, model_section)
        return None
    except ckpt.CheckpointError as exc:
        return str(exc)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
