"""The engine interface: what the trainer and the checkpoint layer may ask of an engine, and the parts engines share.

An engine distributes and steps the two trained units — ``ge`` (G and E in one module, so a
single forward computes the fake batch and the encoding that the D step and the G/E step
share) and ``d`` — and saves or loads their states. Everything else (EMA, schedules,
logging, the checkpoint layout) belongs to the trainer and ``checkpoint.py``.

Two engines implement :class:`Engine`: ``AccelerateEngine`` (DDP, ``engine.py``) and
``DeepSpeedEngine`` (ZeRO 1/2, ``engine_deepspeed.py``). Every operation is abstract, the
optional ones included (``push_module_weights`` is a no-op on DDP), so the trainer never asks
an engine what it is, and a new engine that forgets one fails when it is built, not mid-run.
:func:`make_engine` picks one from the config.
"""
from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    from bicogan_dist.models.networks import GANModels
    from bicogan_dist.train.config import ExperimentConfig, OptimConfig

Unit = Literal["ge", "d"]


class Engine(abc.ABC):
    """Two trained units (``ge``, ``d``) on every rank: wrap, step, reduce, save, load.

    After :meth:`prepare`, ``ge`` and ``d`` are the wrapped modules the trainer calls forward on
    (DDP- or DeepSpeed-wrapped); :meth:`unwrap` gives the plain ones (frozen D in the G/E step,
    G for the EMA, E for held-out accuracy).
    """

    #: Written into a checkpoint's state.json; a checkpoint resumes only under the engine that wrote it.
    name: str
    #: The precision the run actually uses ("no", "bf16" or "fp16"), settled at construction.
    mixed_precision: str
    #: Whether ``prepare(channels_last=True)`` makes the weights channels_last; where not (ZeRO flattens them),
    #: ``model.channels_last=auto`` resolves to false without measuring (``memory_format.py``).
    applies_channels_last: bool
    ge: nn.Module
    d: nn.Module

    @abc.abstractmethod
    def prepare(self, models: GANModels, optim_cfg: OptimConfig, compile_models: bool = False,
                channels_last: bool = False) -> None:
        """Wrap G+E and D, one optimizer (and fp16 loss scale) per unit: G/E and D never share a scale."""

    # -- facts about the process group
    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where this rank's modules and batches live."""

    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """This process's global rank."""

    @property
    @abc.abstractmethod
    def world_size(self) -> int:
        """The number of processes training together."""

    @property
    @abc.abstractmethod
    def is_main(self) -> bool:
        """Rank 0: the one that writes shared files (TensorBoard, images, state.json)."""

    @abc.abstractmethod
    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every forward runs in (autocast over fp32 weights, or nothing)."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Wait for every rank."""

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum or max of ``tensor`` over ranks, out of place."""
        return all_reduce(tensor, op, self.world_size)

    def close(self) -> None:
        """Wait for every rank, then tear the process group down.

        A process that exits with the group alive can abort in gloo's or NCCL's background threads
        ("terminate called without an active exception") and turn a finished run's exit status
        into a failure; the launcher then reports the whole job as failed.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.barrier()
            torch.distributed.destroy_process_group()

    # -- modules
    @abc.abstractmethod
    def unwrap(self, unit: Unit) -> nn.Module:
        """The plain module of ``unit`` (no DDP/DeepSpeed/compile wrapper)."""

    @abc.abstractmethod
    def learning_rate(self, unit: Unit) -> float:
        """The current learning rate of ``unit``'s optimizer (logged)."""

    @abc.abstractmethod
    def push_module_weights(self, unit: Unit) -> None:
        """Make an in-place edit of ``unit``'s plain module weights (WGAN clipping) the weights the next step starts from.

        A no-op where the module's parameters are the optimizer's (DDP); ZeRO keeps fp32 masters apart
        from the module and would overwrite the edit after the next step.
        """

    # -- one optimisation step
    @abc.abstractmethod
    def step(self, unit: Unit, loss: torch.Tensor, want_grad_norm: bool = False) -> float | None:
        """backward + (clip) + optimizer step on ``unit``; the (unscaled) grad norm when asked or clipping."""

    # -- checkpoint state (the layout around it is checkpoint.py's)
    @abc.abstractmethod
    def save(self, folder: Path) -> None:
        """Write the units' weights and optimizer states into ``folder`` (every rank calls it)."""

    @abc.abstractmethod
    def load(self, folder: Path) -> None:
        """Restore what :meth:`save` wrote, onto this engine's prepared units."""


def make_engine(cfg: ExperimentConfig) -> Engine:
    """The engine ``train.engine`` names; a rank started by a launcher first arranges to stop when the launcher dies."""
    from bicogan_dist.train.launcher import stop_with_launcher

    stop_with_launcher()
    if cfg.train.engine == "deepspeed":
        from bicogan_dist.train.engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg.train.deepspeed_config, cfg.train.mixed_precision,
                               micro_batch_size=cfg.data.batch_size, dist_timeout_s=cfg.train.dist_timeout_s)
    from bicogan_dist.train.engine import AccelerateEngine

    return AccelerateEngine(cfg.train.mixed_precision, dist_timeout_s=cfg.train.dist_timeout_s)


# -- shared by both engines
class GeneratorEncoder(nn.Module):
    """G and E as one unit: one forward gives everything both steps of an iteration need from G and E.

    Every gradient path stays inside this (DDP-wrapped) forward, so each step is one DDP pass.
    """

    def __init__(self, G: nn.Module, E: nn.Module | None) -> None:
        super().__init__()
        self.G = G
        self.E = E

    def forward(self, z: torch.Tensor, c: torch.Tensor | None, x: torch.Tensor | None, encode_fake: bool = False,
                x_efl: torch.Tensor | None = None, reconstruct: bool = False,
                c_recon: torch.Tensor | None = None) -> GEOutputs:
        """G(z, c) and, given real ``x`` and an encoder, E(x).

        ``encode_fake``: also z_rec = E_z(G(z, c)) (the latent cycle). ``x_efl``: an augmented view of
        ``x``; the emotion logits are then E_c(x_efl), while z_hat stays E_z(x). ``reconstruct``: also
        recon = G(E_z(x), c_recon) (the reconstruction loss; ``c_recon`` None for an unconditional G).
        """
        fake = self.G(z, c)
        if self.E is None or x is None:
            return GEOutputs(fake)
        if x_efl is None:
            z_hat, c_logits = self.E(x)
        else:
            z_hat, c_logits = self.E.encode_views(x, x_efl)
        # Separate calls: BatchNorm (G's; the paper E's) must not mix fakes with encodings of reals.
        z_rec = self.E.encode_z(fake) if encode_fake else None
        recon = self.G(z_hat, c_recon) if reconstruct else None
        return GEOutputs(fake, z_hat, c_logits, z_rec, recon)


class GEOutputs(NamedTuple):
    """What ``GeneratorEncoder.forward`` computed (None where it was not asked for)."""

    fake: torch.Tensor
    z_hat: torch.Tensor | None = None
    c_logits: torch.Tensor | None = None
    z_rec: torch.Tensor | None = None
    recon: torch.Tensor | None = None


def device_defaults(device: torch.device, mixed_precision: str) -> dict[str, object]:
    """Speed settings for the training device, set once per process by ``Engine.prepare``; returns what it set.

    CUDA only (the CPU keeps torch's defaults, which the CPU benchmarks were measured with):
    ``cudnn.benchmark`` picks the fastest convolution algorithm once per shape (our shapes never
    change), and with ``mixed_precision=no`` fp32 matmuls and convolutions run on TF32 tensor
    cores (fp32 range, 10-bit mantissa products, fp32 sums): the usual trade for GANs on Ampere and
    later; under bf16/fp16 autocast the big ops are already in 16 bits.
    """
    if device.type != "cuda":
        return {}
    torch.backends.cudnn.benchmark = True
    out: dict[str, object] = {"cudnn.benchmark": True}
    if mixed_precision == "no":
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: legacy flags must not be mixed in
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        out["tf32"] = True
    return out


def adam(module: nn.Module, unit: Unit, optim_cfg: OptimConfig) -> torch.optim.Adam:
    """Plain torch Adam for ``unit`` from ``optim.*`` (both engines: DeepSpeed's FusedAdam would compile an op)."""
    lr = optim_cfg.lr_ge if unit == "ge" else optim_cfg.lr_d
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(optim_cfg.beta1, optim_cfg.beta2))


def all_reduce(tensor: torch.Tensor, op: str, world_size: int) -> torch.Tensor:
    """Sum or max over ranks, out of place (a no-op in a single process)."""
    if world_size == 1:
        return tensor
    out = tensor.clone()
    reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(out, op=reduce_op)
    return out


def broadcast_text(text: str | None, engine: Engine, src: int = 0) -> str:
    """Rank ``src``'s ``text`` on every rank (other ranks pass anything), as bytes in tensors: nothing is unpickled."""
    if engine.world_size == 1:
        return text or ""
    data = (text or "").encode() if engine.rank == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=engine.device)
    torch.distributed.broadcast(size, src=src)
    if not int(size[0]):
        return ""
    buf = torch.zeros(int(size[0]), dtype=torch.uint8, device=engine.device)
    if engine.rank == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    torch.distributed.broadcast(buf, src=src)
    return bytes(buf.cpu().tolist()).decode()


def ranks_where(flag: bool, engine: Engine) -> list[int]:
    """The ranks on which ``flag`` is true, known to every rank (one all-reduce; also a barrier)."""
    vec = torch.zeros(engine.world_size, device=engine.device)
    vec[engine.rank] = float(flag)
    return [r for r, v in enumerate(engine.all_reduce(vec).tolist()) if v]


def process_group_timeout_s(device: torch.device) -> float | None:
    """The timeout the default process group really runs with (read back from torch.distributed), or None."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    try:
        backend = torch.distributed.distributed_c10d._get_default_group()._get_backend(device)
        return backend.options._timeout.total_seconds()
    except (AttributeError, RuntimeError, ValueError):  # a torch without these internals: nothing to report
        return None


def grad_norm(params: Iterable[nn.Parameter]) -> float:
    """Global L2 norm of the gradients present (0.0 when none), for logging when nothing clips."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0
