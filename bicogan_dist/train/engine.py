"""How the networks are distributed and stepped: Accelerate DDP here, DeepSpeed in ``engine_deepspeed``.

The trainer sees two trained units — ``ge`` (G and E in one module, so a single forward
computes the fake batch and the encoding that the D step and the G/E step share) and
``d`` — and asks the engine to wrap them, run ``backward + step`` on one of them, and
save or load their states. Everything else (EMA, schedules, logging) is the trainer's.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from bicogan_dist.models.networks import GANModels
from bicogan_dist.train import checkpoint as ckpt


class GeneratorEncoder(nn.Module):
    """G and E as one unit: one forward gives G(z, c) and E(x) for both steps of an iteration.

    With ``encode_fake`` it also encodes the fake batch, E_z(G(z, c)), for the latent cycle
    loss; that stays inside this (DDP-wrapped) forward so every gradient path is one DDP pass.
    """

    def __init__(self, G: nn.Module, E: nn.Module | None) -> None:
        super().__init__()
        self.G = G
        self.E = E

    def forward(self, z: torch.Tensor, c: torch.Tensor | None, x: torch.Tensor | None, encode_fake: bool = False):
        """(fake, z_hat, c_logits) and, with ``encode_fake``, z_rec = E_z(fake)."""
        fake = self.G(z, c)
        if self.E is None or x is None:
            return (fake, None, None, None) if encode_fake else (fake, None, None)
        z_hat, c_logits = self.E(x)
        if not encode_fake:
            return fake, z_hat, c_logits
        z_rec, _ = self.E(fake)  # a separate call: the paper E's BatchNorm must not mix real and fake
        return fake, z_hat, c_logits, z_rec


def all_reduce(tensor: torch.Tensor, op: str, world_size: int) -> torch.Tensor:
    """Sum or max over ranks, out of place (a no-op in a single process); shared by both engines."""
    if world_size == 1:
        return tensor
    out = tensor.clone()
    reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(out, op=reduce_op)
    return out


def grad_norm(params: Iterator[nn.Parameter]) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


class AccelerateEngine:
    """DDP (and single-process) training through Accelerate.

    Optimizers stay plain torch objects and each unit has its own GradScaler: with fp16,
    G/E and D gradients differ by orders of magnitude, and an overflow that skips the D
    step must not change the G/E step's scale (docs/architecture.md §4). Ranks agree on skips because
    the inf check runs on all-reduced gradients.
    """

    name = "ddp"

    def __init__(self, mixed_precision: str | None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        # broadcast_buffers=False: G's BatchNorm buffers are not re-broadcast in the middle of a step.
        ddp_kwargs = DistributedDataParallelKwargs(broadcast_buffers=False)
        # cpu=True on machines without CUDA: accelerate's launcher does not pass a config's
        # ``use_cpu`` on to the processes, which then fall back to independent runs (docs/architecture.md §3).
        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                                       kwargs_handlers=[ddp_kwargs])
        self.mixed_precision = self.accelerator.mixed_precision

    def prepare(self, models: GANModels, optim_cfg, compile_models: bool = False, channels_last: bool = False) -> None:
        """Wrap G+E and D for DDP and create one optimizer and one GradScaler per unit."""
        ge: nn.Module = GeneratorEncoder(models.G, models.E).to(self.device)
        d: nn.Module = models.D.to(self.device)
        if channels_last:
            ge = ge.to(memory_format=torch.channels_last)
            d = d.to(memory_format=torch.channels_last)
        betas = (optim_cfg.beta1, optim_cfg.beta2)
        self.optimizers = {
            "ge": torch.optim.Adam(ge.parameters(), lr=optim_cfg.lr_ge, betas=betas),
            "d": torch.optim.Adam(d.parameters(), lr=optim_cfg.lr_d, betas=betas),
        }
        self.grad_clip = optim_cfg.grad_clip
        fp16 = self.mixed_precision == "fp16"
        self.scalers = {k: torch.amp.GradScaler(self.device.type, enabled=fp16) for k in ("ge", "d")}
        if compile_models:
            ge, d = torch.compile(ge), torch.compile(d)
        self.ge, self.d = self.accelerator.prepare(ge, d)

    # -- facts about the process group -------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return all_reduce(tensor, op, self.world_size)

    # -- modules ----------------------------------------------------------------------
    def unwrap(self, unit: str) -> nn.Module:
        """The plain module (no DDP/compile wrapper) of ``ge`` or ``d``."""
        return self.accelerator.unwrap_model(getattr(self, unit))

    def learning_rate(self, unit: str) -> float:
        return self.optimizers[unit].param_groups[0]["lr"]

    # -- one optimisation step ------------------------------------------------------------
    def step(self, unit: str, loss: torch.Tensor, want_grad_norm: bool = False) -> float | None:
        """backward + (clip) + optimizer step on ``unit``; returns the grad norm when asked."""
        opt, scaler = self.optimizers[unit], self.scalers[unit]
        scaler.scale(loss).backward()
        norm = None
        if self.grad_clip > 0 or want_grad_norm:
            scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            if self.grad_clip > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
            else:
                norm = grad_norm(iter(params))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return norm

    # -- checkpoint state -------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Write this engine's state into ``folder`` (every rank calls it; rank 0 writes the shared parts)."""
        if self.is_main:
            for unit in ckpt.UNITS:
                ckpt.write_tensors(self.unwrap(unit).state_dict(), folder / ckpt.unit_file(unit))
            torch.save({
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "scalers": {k: s.state_dict() for k, s in self.scalers.items()},
            }, folder / ckpt.OPTIM_FILE)

    def load(self, folder: Path) -> None:
        for unit in ckpt.UNITS:
            path = folder / ckpt.unit_file(unit)
            ckpt.load_module(self.unwrap(unit), ckpt.read_tensors(path), path)
        # Read onto the CPU: Optimizer.load_state_dict moves each state to its parameter's device.
        state = ckpt.read_torch_tensors(folder / ckpt.OPTIM_FILE)
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.scalers.items():
            s.load_state_dict(state["scalers"][k])
