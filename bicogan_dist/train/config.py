"""The experiment config: every part's dataclass composed, loaded from YAML + ``key=value`` overrides.

Validation happens once, here, at start: an unknown key or a bad value raises
``ConfigError`` naming it (for example ``model.kind: 'vae' is not one of [...]``).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bicogan_dist.config import ConfigError, deep_merge, from_dict, load_yaml, parse_overrides, to_dict
from bicogan_dist.data.augment import AugmentConfig
from bicogan_dist.data.loader import DataConfig
from bicogan_dist.models.losses import LossConfig
from bicogan_dist.models.networks import ModelConfig


@dataclass
class OptimConfig:
    """Adam for G+E and for D; the paper's notebook uses Adam(2e-4, beta1=0.5).

    betas (0, 0.99), as in the spectral-norm / hinge GANs (SNGAN, BigGAN, StyleGAN2), learnt faster
    here: 80.5% conditional accuracy after 1,000 synthetic steps against 70.5% with (0.5, 0.999).
    """

    lr_ge: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.0
    beta2: float = 0.99
    grad_clip: float = 0.0  # max global grad norm per optimizer; 0 = off
    # How the learning rates follow the global batch (data.batch_size x processes): none = lr_ge/lr_d as written;
    # linear / sqrt = multiplied by (global batch / reference_batch) or its square root (see ``scaled_optim``).
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    reference_batch: int = 64  # the global batch at which lr_ge/lr_d hold (lr_scaling linear / sqrt)

    def __post_init__(self) -> None:
        for name in ("lr_ge", "lr_d"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        if self.lr_scaling not in ("none", "linear", "sqrt"):
            raise ConfigError(f"optim.lr_scaling: {self.lr_scaling!r} is not one of ['none', 'linear', 'sqrt']")
        if isinstance(self.reference_batch, bool) or not isinstance(self.reference_batch, int) \
                or self.reference_batch < 1:
            raise ConfigError(f"optim.reference_batch must be an integer >= 1, got {self.reference_batch!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")


@dataclass
class TrainConfig:
    max_steps: int = 2000  # one step = one D update + one G/E update
    seed: int = 0
    # None: take the precision from the accelerate launch config (``mixed_precision:``).
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    ema_decay: float = 0.999  # EMA of G's weights per step; 0 disables (EMA = G)
    # EMA half-life in thousands of images (StyleGAN's ema_kimg); when set it replaces ema_decay:
    # decay per step = 0.5 ** (global batch / (1000 * ema_kimg)), the same average whatever the process count.
    ema_kimg: float | None = None
    # Images per step over all processes; when set, data.batch_size (per process) is derived from it as
    # global_batch_size / WORLD_SIZE and any data.batch_size given is replaced (this key takes precedence).
    global_batch_size: int | None = None
    sync_every: int = 10  # steps between the ranks' comparisons of stop / non-finite flags (one host sync each)
    compile: bool = False  # torch.compile G, E and D
    engine: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: str | None = None  # DeepSpeed JSON (engine: deepspeed)
    # Seconds a rank waits in a collective (or at a barrier, e.g. while rank 0 evaluates) before the run
    # fails instead of hanging; must exceed the longest evaluation (logged as time/eval_s).
    dist_timeout_s: float = 1800.0
    # Debugging aid for tests: make the D loss NaN at this step (steps count from 1) to exercise the non-finite stop.
    inject_nan_at_step: int | None = None

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_kimg is not None and not (isinstance(self.ema_kimg, (int, float)) and self.ema_kimg > 0):
            raise ConfigError(f"train.ema_kimg must be > 0 (or null to use train.ema_decay), got {self.ema_kimg!r}")
        for name in ("global_batch_size", "sync_every"):
            value = getattr(self, name)
            if value is None and name == "global_batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.dist_timeout_s, (int, float)) and math.isfinite(self.dist_timeout_s)
                and self.dist_timeout_s > 0):
            raise ConfigError(f"train.dist_timeout_s must be a number of seconds > 0, got {self.dist_timeout_s!r}")


@dataclass
class LogConfig:
    run_dir: str = ""  # the run folder; default runs/<experiment name>
    log_every: int = 25  # scalars to TensorBoard
    image_every: int = 500  # image panels to TensorBoard and samples/*.png
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    heldout_split: str = "PublicTest"  # held-out batch for encoder accuracy; PrivateTest stays for evaluation
    heldout_size: int = 256
    grid_columns: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("log_every", "image_every", "checkpoint_every", "keep_checkpoints", "heldout_size", "grid_columns"):
            if getattr(self, name) < 1:
                raise ConfigError(f"log.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    """Periodic evaluation during training (bicogan_dist.evaluate), logged to TensorBoard as eval/*."""

    every: int = 0  # steps between evaluations; 0 = off
    classifier: str = ""  # tools/train_classifier.py output folder
    num_samples: int = 200  # generated faces per emotion
    split: str = "PublicTest"  # real held-out split; PrivateTest stays for final reports

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {self.every}")
        if self.every > 0 and not self.classifier:
            raise ConfigError("eval.classifier: required when eval.every > 0 (a tools/train_classifier.py folder)")
        if self.num_samples < 1:
            raise ConfigError(f"eval.num_samples must be >= 1, got {self.num_samples}")


@dataclass
class ExperimentConfig:
    name: str = "bicogan"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not self.log.run_dir:
            self.log.run_dir = str(Path("runs") / self.name)
        if self.train.global_batch_size is not None:
            self.data = dataclasses.replace(
                self.data, batch_size=per_process_batch(self.train.global_batch_size, launched_world_size()))
        if self.train.engine == "deepspeed" and not self.train.deepspeed_config:
            raise ConfigError("train.deepspeed_config: required when train.engine is deepspeed "
                              "(for example launch_configs/deepspeed/zero2.json)")
        group = self.model.mbstd_group
        if self.model.arch == "ours" and group > 1 and self.data.batch_size % group:
            raise ConfigError(f"model.mbstd_group: data.batch_size {self.data.batch_size} (per process) is not a "
                              f"multiple of the minibatch-stddev group {group}, so groups would mix real and fake "
                              f"samples; choose a batch size that is, or model.mbstd_group "
                              f"{math.gcd(group, self.data.batch_size)} (0 = off)")
        if self.loss.adc_weight > 0 and not self.model.d_class_head:
            raise ConfigError("loss.adc_weight: needs model.d_class_head=true (the 2K-class head on D)")
        if self.loss.loss == "wgan_gp" and self.train.compile:
            raise ConfigError("train.compile: not supported with loss.loss=wgan_gp (double backward)")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def launched_world_size() -> int:
    """The number of processes of this run as the launcher announces it (``WORLD_SIZE``: accelerate launch,
    torchrun, deepspeed), before any process group exists; 1 without a launcher."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(value)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE: expected an integer number of processes, got {value!r}") from None
    return max(world, 1)


def per_process_batch(global_batch: int, world_size: int) -> int:
    """``train.global_batch_size`` split over ``world_size`` processes; an error naming the key if not divisible."""
    if global_batch % world_size:
        lower, upper = global_batch // world_size * world_size, (global_batch // world_size + 1) * world_size
        raise ConfigError(f"train.global_batch_size: {global_batch} images per step do not split evenly over "
                          f"{world_size} processes; choose a multiple of {world_size} (e.g. "
                          f"{lower or upper} or {upper}), or unset it and give data.batch_size per process")
    return global_batch // world_size


def check_world_size(cfg: ExperimentConfig, world_size: int) -> None:
    """The batch was split for the world size the engine really has (WORLD_SIZE may lie outside a launcher)."""
    g = cfg.train.global_batch_size
    if g is not None and cfg.data.batch_size * world_size != g:
        raise ConfigError(f"train.global_batch_size: {g} was split as {cfg.data.batch_size} per process for "
                          f"WORLD_SIZE={launched_world_size()}, but the run has {world_size} processes; start it "
                          f"through a launcher that sets WORLD_SIZE (accelerate launch, torchrun)")


def scaled_optim(optim: OptimConfig, global_batch: int) -> OptimConfig:
    """``optim`` with lr_ge / lr_d scaled for ``global_batch`` images per step by ``optim.lr_scaling``.

    none: unchanged. linear: x (global_batch / reference_batch) (Goyal et al.'s rule for SGD);
    sqrt: x sqrt(global_batch / reference_batch) (the usual rule for Adam). GANs are sensitive to
    the learning rate, so the default is none: state the rule you want.
    """
    ratio = global_batch / optim.reference_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[optim.lr_scaling]
    return dataclasses.replace(optim, lr_ge=optim.lr_ge * factor, lr_d=optim.lr_d * factor)


def ema_decay_per_step(train: TrainConfig, global_batch: int) -> float:
    """The EMA decay of one step: ``train.ema_decay``, or from ``train.ema_kimg`` (a half-life in images)."""
    if train.ema_kimg is None:
        return train.ema_decay
    return 0.5 ** (global_batch / (1000.0 * train.ema_kimg))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> ExperimentConfig:
    """YAML file (optional) → overrides → validated ExperimentConfig. ``base`` is merged under the file."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, load_yaml(path))
    data = deep_merge(data, parse_overrides(overrides or []))
    return from_dict(ExperimentConfig, data)
