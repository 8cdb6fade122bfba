"""Run the real trainer in a launched process, then dump what the tests compare.

Usage (under ``accelerate launch``): ddp_probe.py OUT_DIR [--config EXP.yaml] [key=value ...]
Writes OUT_DIR/rank<R>.safetensors (every parameter and buffer of G+E and D, and the EMA)
and OUT_DIR/rank<R>.json (rank, world size, backend, step).
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from bicogan_dist.train.config import load_config
from bicogan_dist.train.trainer import train


def main() -> None:
    out = Path(sys.argv[1])
    args = sys.argv[2:]
    config = None
    if args[:1] == ["--config"]:
        config, args = args[1], args[2:]
    result = train(load_config(config, args))
    engine = result.engine
    tensors = {}
    for unit in ("ge", "d"):
        for k, v in engine.unwrap(unit).state_dict().items():
            tensors[f"{unit}.{k}"] = v.detach().cpu().contiguous()
    for k, v in result.G_ema.state_dict().items():
        tensors[f"ema.{k}"] = v.detach().cpu().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / f"rank{engine.rank}.safetensors"))
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    (out / f"rank{engine.rank}.json").write_text(json.dumps(
        {"rank": engine.rank, "world_size": engine.world_size, "backend": backend, "step": result.step}))


if __name__ == "__main__":
    main()
