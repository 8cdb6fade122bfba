"""Run the real trainer in a launched process (either engine), then dump what the training tests and the engine
benchmark compare across ranks and against consolidated checkpoints.

It lives in the library (not under tests/) because ``tools/bench_engines.py`` runs it too; its command line
is ``bicogan_dist/cli/probe.py``:
``accelerate launch [...] -m bicogan_dist.cli.probe OUT_DIR [--config EXP.yaml] [key=value ...]``. Writes

  OUT_DIR/rank<R>.safetensors  every parameter and buffer of G+E (``ge.*``) and D (``d.*``) as the live
                               modules hold them, the EMA (``ema.*``), and G's output on fixed inputs in
                               eval mode (``probe.z``, ``probe.c``, ``probe.G_out``);
  OUT_DIR/rank<R>.json         rank, world size, backend, step, engine, precision, ZeRO stage, DeepSpeed
                               micro batch, parameter dtypes, the weights' memory layout (channels_last),
                               fp16 loss scales, peak RSS (ru_maxrss, KiB).
"""
from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from bicogan_dist.train import checkpoint as ckpt
from bicogan_dist.train.config import load_config
from bicogan_dist.train.trainer import train

PROBE_SEED = 1234
PROBE_N = 8


def probe_inputs(z_dim: int, num_classes: int, conditional: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed (z, c) fed to G, live and consolidated, so outputs compare exactly."""
    z = torch.randn(PROBE_N, z_dim, generator=torch.Generator().manual_seed(PROBE_SEED))
    c = torch.arange(PROBE_N) % num_classes if conditional else None
    return z, c


@torch.no_grad()
def g_output(G: torch.nn.Module, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """G(z, c) in eval mode (BatchNorm running statistics), leaving G's mode as it was."""
    was_training = G.training
    G.eval()
    try:
        return G(z, c).float()
    finally:
        G.train(was_training)


def run_probe(out: str | Path, config: str | Path | None = None, overrides: Sequence[str] = ()) -> Path:
    """Train with ``config`` + ``overrides`` and write this rank's ``rank<R>.safetensors`` / ``.json`` into ``out``."""
    out = Path(out)
    cfg = load_config(config, list(overrides))
    result = train(cfg)
    engine = result.engine
    tensors = {}
    for unit in ("ge", "d"):
        for k, v in engine.unwrap(unit).state_dict().items():
            tensors[f"{unit}.{k}"] = v.detach().cpu().contiguous()
    for k, v in result.G_ema.state_dict().items():
        tensors[f"ema.{k}"] = v.detach().cpu().contiguous()
    last = ckpt.list_checkpoints(result.run_dir)[-1]
    num_classes = len(ckpt.read_state(last)["label_names"])
    z, c = probe_inputs(cfg.model.z_dim, num_classes, cfg.model.conditional)
    G = engine.unwrap("ge").G
    tensors["probe.z"] = z
    if c is not None:
        tensors["probe.c"] = c
    tensors["probe.G_out"] = g_output(G, z.to(engine.device), None if c is None else c.to(engine.device)).cpu()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / f"rank{engine.rank}.safetensors"))
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    info = {
        "rank": engine.rank, "world_size": engine.world_size, "backend": backend, "step": result.step,
        "engine": engine.name, "precision": engine.mixed_precision,
        "param_dtypes": sorted({str(p.dtype) for u in ("ge", "d") for p in engine.unwrap(u).parameters()}),
        # The layout the live conv weights have (model.channels_last, resolved): channels_last and not contiguous.
        "channels_last": any(p.dim() == 4 and not p.is_contiguous()
                             and p.is_contiguous(memory_format=torch.channels_last)
                             for u in ("ge", "d") for p in engine.unwrap(u).parameters()),
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "last_checkpoint": str(last),
    }
    if engine.name == "deepspeed":
        info.update({"zero_stage": engine.zero_stage, "micro_batch": engine.micro_batch_size,
                     "loss_scale": {u: engine.loss_scale(u) for u in ("ge", "d")}})
    (out / f"rank{engine.rank}.json").write_text(json.dumps(info))
    return out
