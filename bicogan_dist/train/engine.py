"""The Accelerate DDP engine (and single process): the :class:`~bicogan_dist.train.engine_base.Engine` the trainer
uses by default; DeepSpeed ZeRO is the other one (``engine_deepspeed``).

The interface, and what both engines share (``GeneratorEncoder``, ``all_reduce``, ``grad_norm``,
Adam), live in ``engine_base``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from bicogan_dist.models.networks import GANModels
from bicogan_dist.train import checkpoint as ckpt
from bicogan_dist.train.config import OptimConfig
from bicogan_dist.train.engine_base import Engine, GeneratorEncoder, Unit, adam, device_defaults, grad_norm


class AccelerateEngine(Engine):
    """DDP (and single-process) training through Accelerate.

    Optimizers stay plain torch objects and each unit has its own GradScaler: with fp16,
    G/E and D gradients differ by orders of magnitude, and an overflow that skips the D
    step must not change the G/E step's scale (docs/architecture.md §4). Ranks agree on skips because
    the inf check runs on all-reduced gradients.
    """

    name = "ddp"
    applies_channels_last = True

    def __init__(self, mixed_precision: str | None, dist_timeout_s: float = 1800.0) -> None:
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        # broadcast_buffers=False: G's BatchNorm buffers are not re-broadcast in the middle of a step.
        ddp_kwargs = DistributedDataParallelKwargs(broadcast_buffers=False)
        # cpu=True on machines without CUDA: accelerate's launcher does not pass a config's
        # ``use_cpu`` on to the processes, which then fall back to independent runs (docs/architecture.md §3).
        # An explicit timeout (train.dist_timeout_s): a rank whose peer died or stalls fails after it, not never.
        pg_kwargs = InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout_s))
        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                                       kwargs_handlers=[ddp_kwargs, pg_kwargs])
        self.mixed_precision = self.accelerator.mixed_precision

    def prepare(self, models: GANModels, optim_cfg: OptimConfig, compile_models: bool = False,
                channels_last: bool = False) -> None:
        """Wrap G+E and D for DDP and create one optimizer and one GradScaler per unit."""
        device_defaults(self.device, self.mixed_precision)
        ge: nn.Module = GeneratorEncoder(models.G, models.E).to(self.device)
        d: nn.Module = models.D.to(self.device)
        if channels_last:
            ge = ge.to(memory_format=torch.channels_last)
            d = d.to(memory_format=torch.channels_last)
        self.optimizers = {"ge": adam(ge, "ge", optim_cfg), "d": adam(d, "d", optim_cfg)}
        self.grad_clip = optim_cfg.grad_clip
        fp16 = self.mixed_precision == "fp16"
        self.scalers = {k: torch.amp.GradScaler(self.device.type, enabled=fp16) for k in ("ge", "d")}
        self.ge, self.d = self.accelerator.prepare(ge, d)
        if compile_models:
            # After the DDP wrap, as DDP recommends (its optimizer splits graphs at bucket boundaries so
            # communication overlaps the backward); unwrap() still reaches the plain modules, so
            # checkpoints hold plain keys and a compiled run resumes uncompiled and back.
            # fallback_random: compiled dropout (E's emotion branch) draws from the eager generator, as
            # eager would, so a compiled run equals an eager one and resumes across compile on/off; inductor's
            # own random kernels would draw other masks.
            import torch._inductor.config as inductor_config

            inductor_config.fallback_random = True
            self.ge, self.d = torch.compile(self.ge), torch.compile(self.d)

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

    # -- modules ----------------------------------------------------------------------
    def unwrap(self, unit: Unit) -> nn.Module:
        """The plain module (no DDP/compile wrapper) of ``ge`` or ``d``."""
        # keep_torch_compile=False: accelerate keeps the compile wrapper by default, whose state_dict keys carry
        # ``_orig_mod.`` and whose forward the frozen-D call of the G/E step would recompile.
        return self.accelerator.unwrap_model(getattr(self, unit), keep_torch_compile=False)

    def learning_rate(self, unit: Unit) -> float:
        return self.optimizers[unit].param_groups[0]["lr"]

    def push_module_weights(self, unit: Unit) -> None:
        """Nothing to do: the optimizer steps the module's own parameters, so an in-place edit already holds."""

    # -- one optimisation step ------------------------------------------------------------
    def step(self, unit: Unit, loss: torch.Tensor, want_grad_norm: bool = False) -> float | None:
        """backward + (clip) + optimizer step on ``unit``; returns the grad norm when asked."""
        opt, scaler = self.optimizers[unit], self.scalers[unit]
        scaler.scale(loss).backward()
        norm = None
        if self.grad_clip > 0 or want_grad_norm:
            scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            if self.grad_clip > 0:
                total = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                norm = float(total) if want_grad_norm else None  # float() waits for the device: only when asked
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
