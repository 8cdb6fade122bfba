"""DeepSpeed ZeRO (stage 1 or 2) as the trainer's engine: the same loop, two ``deepspeed.initialize`` engines.

``train.engine=deepspeed train.deepspeed_config=launch_configs/deepspeed/zero2.json`` swaps the
Accelerate DDP engine (``engine.py``) for this one; both implement ``engine_base.Engine``, and the
trainer, the experiment YAMLs and the launch command (``accelerate launch`` with the plain DDP
launch configs) stay the same.
Accelerate only spawns the processes and sets RANK/WORLD_SIZE/MASTER_ADDR; this engine then
initialises DeepSpeed's process group itself and builds one DeepSpeed engine for G+E
(``engine_base.GeneratorEncoder``) and one for D, each with its own torch Adam, its own ZeRO
partitioning of optimizer states (stage 1) and gradients (stage 2), and its own fp16 loss
scale. Why not Accelerate's DeepSpeed plugin: one ``prepare()`` with two models raises, and
the multi-plugin route needs a second Accelerator, imports transformers and reported wrong
process counts on CPU (docs/architecture.md §3). The G/E step calls the raw D module (``unwrap("d")``)
with D frozen, so D's engine hooks never fire outside the D step.

Precision — fp32 weights + autocast, never DeepSpeed's native ``bf16``/``fp16`` modes.
``train.mixed_precision`` (or, when it is unset, the JSON's ``torch_autocast``/``bf16``/``fp16``
section, else the accelerate launch config's ``mixed_precision``) selects bf16 or fp16, and
the engine always runs it as DeepSpeed's ``torch_autocast`` section: master and module weights
stay fp32, the forward runs under ``torch.autocast`` (``autocast()`` below, the same context
the trainer opens around every forward), and the gradients of Linear/Conv layers are
communicated in the low dtype (a JSON ``torch_autocast.lower_precision_safe_modules: []``
keeps every gradient fp32 on the wire, as DDP does). Reasons, all checked on DeepSpeed 0.19.8:

* The trainer and its monitor call the plain modules outside the engines with fp32 tensors:
  frozen D in the G/E step, E on held-out images, G's weights lerped into the fp32 EMA. With
  fp32 weights these calls are valid as they are, and the numerics are those of the DDP engine
  (Accelerate's bf16/fp16 are autocast over fp32 weights too), so the two engines are
  comparable run for run. Native modes cast the parameters to bf16/fp16: every such call
  would need a cast layer, and the EMA would average rounded weights.
* Native modes cast parameters but keep buffers fp32: BatchNorm (in G and E) then fails on
  CPU with "expected scalar type BFloat16 but found Float".
* The cost is memory: module weights are not halved. G, E and D hold a few million parameters;
  what ZeRO saves here is the partitioned Adam states and gradients, which stay partitioned.

fp16 needs loss scaling, and DeepSpeed 0.19.8's ``torch_autocast`` + ZeRO 1/2 fp16 path does
not scale the loss before unscaling the gradients (updates come out 2^16 times too small —
measured). So for fp16 this engine keeps its own dynamic loss scale per unit (G/E and D never
share one, docs/architecture.md §4) and hands it to ZeRO through ``override_loss_scale``: ZeRO multiplies
the loss by it, divides the gradients by it before clipping and Adam, and skips the step when
the gradients hold inf/NaN — decided on all-reduced flags, so every rank skips the same steps
and the scales never diverge (a skipped step reports an inf grad norm, as with the DDP engine's
GradScaler; with fp16 gradient communication the first few G/E steps at 2^16 typically skip). The scale halves on an overflow and doubles after
``loss_scale_window`` clean steps (the JSON ``fp16`` section's ``initial_scale_power``,
``loss_scale_window``, ``min_loss_scale`` and ``loss_scale`` (>0: static) are honoured).

The DeepSpeed JSON may say ``"auto"`` for ``train_micro_batch_size_per_gpu`` (set from
``data.batch_size``), ``gradient_accumulation_steps`` (1: the trainer steps every batch) and
``gradient_clipping`` (``optim.grad_clip``). It must not define ``optimizer`` or ``scheduler``
(the engine builds torch Adam from ``optim.*``; DeepSpeed's FusedAdam would compile a CUDA/C++
op) and must use ZeRO stage 1 or 2: stage 0 is plain data parallelism (use ``train.engine=ddp``),
and stage 3 partitions the parameters themselves, which the raw-module calls above cannot see.

Checkpoints are DeepSpeed's own format, one tag folder per unit (``<checkpoint>/ge/``,
``<checkpoint>/d/``: ``mp_rank_00_model_states.pt`` + one ``zero_pp_rank_<R>_..._optim_states.pt``
per rank), written by every rank. They are read with ``torch.load(weights_only=True)`` and an
explicit allow-list of the three DeepSpeed classes they contain, both on resume and in
:func:`consolidated_weights`, which rebuilds full fp32 state dicts for export without a
process group.

``import bicogan_dist.train.engine_deepspeed`` works without DeepSpeed installed; DeepSpeed is
imported when an engine is built (or weights consolidated).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import pickle
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from unittest import mock

import torch
from torch import nn

from bicogan_dist.config import ConfigError
from bicogan_dist.train.engine_base import Engine, GeneratorEncoder, Unit, adam, device_defaults

if TYPE_CHECKING:
    from bicogan_dist.models.networks import GANModels
    from bicogan_dist.train.config import OptimConfig

MISSING_DEEPSPEED = "train.engine=deepspeed needs DeepSpeed: pip install -e .[deepspeed]"
UNITS = ("ge", "d")
PRECISIONS = ("no", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Keys accepted in the JSON's ``fp16`` section (hysteresis and auto_cast are accepted and ignored).
_FP16_SCALE_KEYS = ("enabled", "initial_scale_power", "loss_scale_window", "min_loss_scale", "loss_scale",
                    "hysteresis", "consecutive_hysteresis", "auto_cast")


def _import_deepspeed():
    """DeepSpeed, imported on first use (quietly picks its CPU accelerator where there is no CUDA)."""
    if not torch.cuda.is_available():
        # No CUDA means CPU processes, as in AccelerateEngine; saying so skips DeepSpeed's detection warning.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(MISSING_DEEPSPEED) from exc
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines repeat the config per engine
    # DeepSpeed's ZeRO all-gather calls a torch API that warns on every process; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    return deepspeed


# -- the DeepSpeed config ---------------------------------------------------------------------------------
@dataclass
class LossScaleConfig:
    """fp16 loss scale of one unit: dynamic (halve on overflow, double after ``window`` clean steps) or static."""

    initial: float = 2.0 ** 16
    window: int = 1000
    minimum: float = 1.0
    dynamic: bool = True


@dataclass
class ResolvedConfig:
    """What the engine hands to ``deepspeed.initialize`` (``ds_config``) and what it does itself."""

    ds_config: dict[str, Any]
    precision: str
    zero_stage: int
    loss_scale: LossScaleConfig | None  # fp16 only


def resolve_config(path: str | Path | None, mixed_precision: str | None, micro_batch_size: int | None,
                   grad_clip: float | None = None, launch_precision: str | None = None) -> ResolvedConfig:
    """Read and check a DeepSpeed JSON, fill its ``auto`` keys and settle the precision.

    Precision, first that applies: ``mixed_precision`` (``train.mixed_precision``); the JSON's
    ``torch_autocast``, ``bf16`` or ``fp16`` section; ``launch_precision`` (the accelerate launch
    config's ``mixed_precision``, as the DDP engine uses it); ``no``. ``grad_clip`` None: not known
    yet (the engine is built before the optimizer config is handed over). Pure Python, no DeepSpeed.
    """
    if not path:
        raise ConfigError("train.deepspeed_config: required when train.engine is deepspeed "
                          "(for example launch_configs/deepspeed/zero2.json)")
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"train.deepspeed_config: {path} is not a readable JSON file ({exc})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed_config: {path} must hold a JSON object")
    where = f"train.deepspeed_config ({path})"

    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{where}: remove the '{key}' section; the engine builds torch Adam from optim.* "
                              f"(lr_ge, lr_d, beta1, beta2) and steps every batch")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (1, 2):
        raise ConfigError(f"{where}: zero_optimization.stage must be 1 or 2, got {stage!r}; stage 0 is plain data "
                          f"parallelism (use train.engine=ddp) and stage 3 partitions the parameters, which the "
                          f"trainer reads outside the engine (frozen D in the G/E step, G for the EMA)")
    gas = ds.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        raise ConfigError(f"{where}: gradient_accumulation_steps must be 1 or \"auto\" (the trainer steps every "
                          f"batch), got {gas!r}")
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    if micro_batch_size is not None:
        if micro not in ("auto", micro_batch_size):
            raise ConfigError(f"{where}: train_micro_batch_size_per_gpu={micro!r} differs from data.batch_size="
                              f"{micro_batch_size}; say \"auto\" (the batch comes from data.batch_size)")
        micro = micro_batch_size
    elif micro == "auto":
        micro = 1  # only DeepSpeed's own throughput counters read it; the loader decides the real batch
    clip = ds.get("gradient_clipping", "auto")
    if grad_clip is not None and clip not in ("auto", grad_clip):
        raise ConfigError(f"{where}: gradient_clipping={clip!r} differs from optim.grad_clip={grad_clip}; "
                          f"say \"auto\" (it comes from optim.grad_clip)")

    # Precision: what the JSON asks for, then who wins.
    asked = {}
    autocast_section = ds.get("torch_autocast")
    if isinstance(autocast_section, dict) and autocast_section.get("enabled", False):
        dtype = str(autocast_section.get("dtype", "torch.bfloat16")).replace("torch.", "")
        names = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "half": "fp16", "fp16": "fp16"}
        if dtype not in names:
            raise ConfigError(f"{where}: torch_autocast.dtype must be bfloat16 or float16, got {dtype!r}")
        asked["torch_autocast"] = names[dtype]
    for section in ("bf16", "bfloat16", "fp16"):
        value = ds.get(section)
        if isinstance(value, dict) and value.get("enabled", False):
            asked[section] = "fp16" if section == "fp16" else "bf16"
    if len(set(asked.values())) > 1:
        raise ConfigError(f"{where}: {sorted(asked)} enable different precisions; enable one")
    if mixed_precision is not None:
        if mixed_precision not in PRECISIONS:
            raise ConfigError(f"train.mixed_precision: {mixed_precision!r} is not one of {list(PRECISIONS)}")
        precision = mixed_precision
    elif asked:
        precision = next(iter(asked.values()))
    elif launch_precision in PRECISIONS:
        precision = launch_precision
    else:
        precision = "no"

    loss_scale = None
    fp16 = ds.get("fp16") if isinstance(ds.get("fp16"), dict) else {}
    if precision == "fp16":
        unknown = sorted(set(fp16) - set(_FP16_SCALE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: fp16.{unknown[0]} is not supported by this engine (it runs fp16 as "
                              f"autocast over fp32 weights with its own loss scale)")
        static = float(fp16.get("loss_scale", 0) or 0)
        loss_scale = LossScaleConfig(initial=static if static > 0 else 2.0 ** int(fp16.get("initial_scale_power", 16)),
                                     window=int(fp16.get("loss_scale_window", 1000)),
                                     minimum=float(fp16.get("min_loss_scale", 1)), dynamic=static <= 0)

    out = copy.deepcopy(ds)
    for key in ("bf16", "bfloat16", "fp16", "torch_autocast", "amp", "train_batch_size"):
        out.pop(key, None)
    out["train_micro_batch_size_per_gpu"] = int(micro)
    out["gradient_accumulation_steps"] = 1
    out["gradient_clipping"] = float(grad_clip or 0.0)
    out.setdefault("steps_per_print", 10 ** 9)  # the trainer logs; DeepSpeed's own step lines add nothing
    out["zero_optimization"] = dict(zero)
    out["zero_optimization"].setdefault("compute_grad_norm", True)  # grad norms for logging and overflow flags
    if precision != "no":
        # DeepSpeed's config parser wants the "torch." prefix.
        out["torch_autocast"] = {"enabled": True, "dtype": f"torch.{'bfloat16' if precision == 'bf16' else 'float16'}"}
        if isinstance(autocast_section, dict) and "lower_precision_safe_modules" in autocast_section:
            # Whose gradients travel in the low dtype (DeepSpeed's default: Linear, Conv1d/2d/3d); [] = all fp32.
            out["torch_autocast"]["lower_precision_safe_modules"] = autocast_section["lower_precision_safe_modules"]
    return ResolvedConfig(out, precision, int(stage), loss_scale)


# -- fp16 loss scale ------------------------------------------------------------------------------------------
class DynamicLossScale:
    """One unit's fp16 loss scale; ranks stay in step because ZeRO's overflow flag is all-reduced."""

    def __init__(self, cfg: LossScaleConfig) -> None:
        self.cfg = cfg
        self.scale = float(cfg.initial)
        self.clean_steps = 0

    def update(self, overflow: bool) -> None:
        if not self.cfg.dynamic:
            return
        if overflow:
            self.scale = max(self.scale / 2.0, self.cfg.minimum)
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.cfg.window:
                self.scale *= 2.0
                self.clean_steps = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])


# -- safe reading of DeepSpeed checkpoints ----------------------------------------------------------------------
def _checkpoint_globals() -> list:
    """The only non-tensor classes a ZeRO 1/2 checkpoint of this engine pickles (DeepSpeed 0.19)."""
    found = []
    for module, name in (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return found


def safe_torch_load(path, map_location=None, mmap: bool | None = None, **_ignored):
    """``torch.load(weights_only=True)`` that admits the DeepSpeed classes above and nothing else."""
    kwargs = {"map_location": map_location, "weights_only": True}
    if mmap:
        kwargs["mmap"] = True
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(path, **kwargs)
    except pickle.UnpicklingError as exc:  # what torch raises for a global outside the allow-list
        from bicogan_dist.train.checkpoint import CheckpointError

        raise CheckpointError(f"{path}: refusing to unpickle a non-tensor object this engine never writes "
                              f"({str(exc).splitlines()[0]})") from exc


class _SafeTorch:
    """Stand-in for the ``torch`` module inside DeepSpeed's zero_to_fp32: the same, but safe ``load``."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, mmap=None, weights_only=None, **kwargs):  # noqa: ARG004
        return safe_torch_load(f, map_location=map_location, mmap=mmap)


# -- the engine -------------------------------------------------------------------------------------------------
#: The comm op DeepSpeed compiles the first time a CPU process group starts (torch.utils.cpp_extension).
SHM_OP = "deepspeed_shm_comm"


def stale_build_locks(name: str = SHM_OP, older_than_s: float = 300.0) -> list[tuple[Path, float]]:
    """torch's build locks for extension ``name`` that outlived any compile (it takes about 45 s on 2 CPU cores).

    While one process compiles, torch keeps ``<extensions dir>/<name>/lock`` and every other process polls
    until it is gone, with no timeout and no owner recorded: a first run killed mid-compile leaves the lock
    behind, and every later run then hangs without a word. A lock with a built ``.so`` beside it is not stale.
    Returns (lock, age in seconds) pairs.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    locks = sorted({*root.glob(f"{name}/lock"), *root.glob(f"*/{name}/lock")})  # the default root adds py311_cpu/
    stale = []
    for lock in locks:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # a compile that just finished
            continue
        if age > older_than_s and not any(lock.parent.glob("*.so")):
            stale.append((lock, age))
    return stale


class DeepSpeedEngine(Engine):
    """Two DeepSpeed ZeRO engines (``ge``, ``d``) behind the trainer's :class:`Engine` interface."""

    name = "deepspeed"
    applies_channels_last = False  # ZeRO's flat buffers need contiguous weights (prepare); auto resolves to false

    def __init__(self, config_path: str | None, mixed_precision: str | None,
                 micro_batch_size: int | None = None, dist_timeout_s: float = 1800.0) -> None:
        self.config_path = config_path
        self.dist_timeout_s = dist_timeout_s
        # Checked here, without DeepSpeed, so config mistakes fail fast; rechecked with optim.grad_clip in prepare().
        self.resolved = resolve_config(config_path, mixed_precision, micro_batch_size,
                                       launch_precision=os.environ.get("ACCELERATE_MIXED_PRECISION"))
        self._mixed_precision_arg, self._micro = mixed_precision, micro_batch_size
        self.mixed_precision = self.resolved.precision
        self.deepspeed = _import_deepspeed()
        self._init_process_group()
        self.engines: dict[str, Any] = {}
        self.scales: dict[str, DynamicLossScale] = {}
        self.grad_clip = 0.0

    def _init_process_group(self) -> None:
        from deepspeed.accelerator import get_accelerator

        if "RANK" not in os.environ:  # a plain `python -m bicogan_dist.train`: a group of one
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(port)})
        self.accelerator = get_accelerator()
        on_cpu = self.accelerator.device_name() == "cpu"
        if on_cpu:
            for lock, age in stale_build_locks():
                print(f"warning: {lock} is {age:.0f} s old and nothing was built "
                      f"beside it: a run killed while compiling DeepSpeed's comm op leaves it, and torch then "
                      f"waits for it forever; if no other run is compiling, delete it", file=sys.stderr, flush=True)
        if not torch.distributed.is_initialized():
            # CPU: gloo (DeepSpeed's CPU default, oneCCL, is not installed); GPU: DeepSpeed's choice (nccl).
            from datetime import timedelta

            self.deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None, auto_mpi_discovery=False,
                                            timeout=timedelta(seconds=self.dist_timeout_s))
        if on_cpu:
            self._device = torch.device("cpu")
        else:
            local = int(os.environ.get("LOCAL_RANK", 0))
            self.accelerator.set_device(local)
            self._device = torch.device(self.accelerator.device_name(), local)

    # -- building the two engines ----------------------------------------------------------------------------
    def prepare(self, models: GANModels, optim_cfg: OptimConfig, compile_models: bool = False,
                channels_last: bool = False) -> None:
        """One DeepSpeed engine (torch Adam, ZeRO per the JSON) for G+E and one for D.

        ``channels_last`` is accepted for the engines' common signature and not applied (see below);
        ``model.channels_last=auto`` therefore resolves to false here without measuring (``memory_format.py``).
        """

        if compile_models:
            raise ConfigError("train.compile: not supported with train.engine=deepspeed; use train.engine=ddp "
                              "or train.compile=false")
        device_defaults(self.device, self.mixed_precision)
        self.grad_clip = optim_cfg.grad_clip
        self.resolved = resolve_config(self.config_path, self._mixed_precision_arg, self._micro, optim_cfg.grad_clip,
                                       launch_precision=os.environ.get("ACCELERATE_MIXED_PRECISION"))
        units = {"ge": GeneratorEncoder(models.G, models.E), "d": models.D}
        for unit, module in units.items():
            # ZeRO views every parameter as flat bytes, which needs dense row-major storage: the
            # weights go back to contiguous format (channels_last inputs still work, only slower).
            module = module.to(self._device).to(memory_format=torch.contiguous_format)
            optimizer = adam(module, unit, optim_cfg)
            engine, *_ = self.deepspeed.initialize(model=module, optimizer=optimizer,
                                                   config=copy.deepcopy(self.resolved.ds_config))
            self.engines[unit] = engine
            if self.resolved.loss_scale is not None:
                zero = engine.optimizer
                for attr in ("override_loss_scale", "overflow"):
                    if not hasattr(zero, attr):
                        raise ConfigError(f"train.mixed_precision=fp16: this DeepSpeed ({self.deepspeed.__version__}) "
                                          f"has no ZeRO {attr}; use bf16, or DeepSpeed 0.19")
                zero.torch_autocast_gradscaler = None  # its unscale without a matching scale is the 2^16 bug
                zero.check_grad_overflow = True  # all-reduced inf/NaN check: every rank skips the same steps
                self.scales[unit] = DynamicLossScale(self.resolved.loss_scale)
                zero.override_loss_scale(self.scales[unit].scale)
        self.ge, self.d = self.engines["ge"], self.engines["d"]

    # -- facts about the process group -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def zero_stage(self) -> int:
        return self.resolved.zero_stage

    @property
    def micro_batch_size(self) -> int:
        return self.resolved.ds_config["train_micro_batch_size_per_gpu"]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The trainer's forward context: autocast to bf16/fp16 over fp32 weights, or nothing."""
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self._device.type, dtype=_DTYPES[self.mixed_precision])

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # -- modules -------------------------------------------------------------------------------------------------
    def unwrap(self, unit: Unit) -> nn.Module:
        """The plain module of ``ge`` or ``d`` (fp32 weights, kept equal to ZeRO's fp32 masters after each step)."""
        return self.engines[unit].module

    def learning_rate(self, unit: Unit) -> float:
        return float(self.engines[unit].get_lr()[0])

    def push_module_weights(self, unit: Unit) -> None:
        """Copy in-place edits of the module's weights (WGAN clipping) into ZeRO's fp32 master partitions.

        ZeRO keeps fp32 masters apart from the module and overwrites the module from them after
        every step, so an edit of the module alone would last one forward. Each rank writes its own
        fragment of each parameter; no communication.
        """
        from deepspeed.utils import safe_set_full_fp32_param

        with torch.no_grad():
            for p in self.unwrap(unit).parameters():
                safe_set_full_fp32_param(p, p.detach().float())

    # -- one optimisation step -------------------------------------------------------------------------------------
    def step(self, unit: Unit, loss: torch.Tensor, want_grad_norm: bool = False) -> float | None:
        """backward + (clip) + ZeRO step on ``unit``; returns the (unscaled, pre-clip) grad norm when asked."""
        engine = self.engines[unit]
        scale = self.scales.get(unit)
        if scale is not None:
            engine.optimizer.override_loss_scale(scale.scale)
        engine.backward(loss)
        engine.step()
        if scale is not None:
            scale.update(bool(engine.optimizer.overflow))
        if not want_grad_norm:  # reading the norm is a host sync: only at log steps
            return None
        norm = engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def loss_scale(self, unit: str) -> float | None:
        """The current fp16 loss scale of ``unit`` (None unless fp16)."""
        scale = self.scales.get(unit)
        return None if scale is None else scale.scale

    # -- checkpoint state --------------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """DeepSpeed checkpoints ``folder/ge`` and ``folder/d`` (every rank calls it and writes its partition)."""
        for unit, engine in self.engines.items():
            client = {"loss_scale": self.scales[unit].state_dict()} if unit in self.scales else {}
            with _all_trainable(engine.module):  # D is frozen between steps; save it as the trained unit it is
                engine.save_checkpoint(str(folder), tag=unit, client_state=client, save_latest=False)

    def load(self, folder: Path) -> None:
        """Restore both units; a ZeRO checkpoint resumes only on the world size that wrote it."""
        from bicogan_dist.train.checkpoint import CheckpointError, read_state

        written = read_state(folder).get("world_size")
        if written != self.world_size:
            # ZeRO 1/2 optimizer states are partitioned by rank: another world size would misassign them.
            raise CheckpointError(f"{folder}: this DeepSpeed ZeRO checkpoint was written by {written} processes and "
                                  f"cannot resume on {self.world_size}; resume it with {written} processes, or "
                                  f"start a new run from its exported weights")
        for unit, engine in self.engines.items():
            if not (Path(folder) / unit).is_dir():
                raise CheckpointError(f"{folder}: no DeepSpeed checkpoint '{unit}/' (written by another engine?)")
            with mock.patch.object(engine.checkpoint_engine, "load", _engine_safe_load):
                path, client = engine.load_checkpoint(str(folder), tag=unit, load_module_strict=True,
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"{folder / unit}: DeepSpeed could not load this checkpoint")
            if unit in self.scales:
                if "loss_scale" in (client or {}):
                    self.scales[unit].load_state_dict(client["loss_scale"])
                engine.optimizer.override_loss_scale(self.scales[unit].scale)


def _engine_safe_load(path, map_location=None, *args, **kwargs):  # noqa: ARG001
    return safe_torch_load(path, map_location=map_location)


@contextlib.contextmanager
def _all_trainable(module: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# -- export ----------------------------------------------------------------------------------------------------------
def consolidated_weights(checkpoint_folder: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Full fp32 state dicts ``{"ge": ..., "d": ...}`` of a checkpoint written by this engine.

    Uses DeepSpeed's ``zero_to_fp32`` (no process group, any number of ranks in the checkpoint),
    with its file reads made ``weights_only``. ``ge`` keys are ``G.*``/``E.*`` (the trainer's
    GeneratorEncoder), ``d`` keys are D's. Raises ImportError without DeepSpeed.
    """
    try:
        from deepspeed.utils import zero_to_fp32
    except ImportError as exc:
        raise ImportError(MISSING_DEEPSPEED) from exc
    folder = Path(checkpoint_folder)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for unit in UNITS:
        if not (folder / unit).is_dir():
            from bicogan_dist.train.checkpoint import CheckpointError

            raise CheckpointError(f"{folder}: no DeepSpeed checkpoint '{unit}/'")
        # zero_to_fp32 prints progress to stdout/stderr; exports may print JSON there.
        with mock.patch.object(zero_to_fp32, "torch", _SafeTorch()), \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=unit)
        out[unit] = {k: (v.float() if v.is_floating_point() else v).detach().clone().contiguous()
                     for k, v in state.items()}
    return out
