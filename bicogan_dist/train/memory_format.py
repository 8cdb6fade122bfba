"""The memory format of the trained convolutions: ``model.channels_last`` true, false, or ``auto`` (measured).

Why measure: channels_last (NHWC) made bf16 convolutions 1.5-2x faster on the CPU (oneDNN), and
cuDNN's tensor-core kernels usually prefer it in 16 bits too; but our networks are small (one input
channel, 48x48 faces, GroupNorm and minibatch-stddev that reshape activations), so on a given GPU,
precision and batch either layout may win, and a wrong guess costs every step of the run. ``auto``
(the default) therefore times both layouts once, at start, on the run's own G/E/D, per-process
batch, precision and device, and keeps the faster.

How: rank 0 alone measures (the others wait) and broadcasts the choice, so every rank runs the same
layout (DDP's buckets and the ranks' numerics stay alike). The measurement uses throwaway copies of
the networks built with torch's RNG forked, so the run's weights, RNG streams and spectral-norm
vectors are those of a run that measured nothing. The layout is not part of what a run saves:
checkpoints and exports hold contiguous tensors (``checkpoint.py``, ``export.py``) and load into
either layout, so a checkpoint resumes under the other choice (``checkpoint.load`` ignores this key
when it compares model sections). A checkpoint records the layout its run used, and a resumed
``auto`` run takes that one without measuring: a second measurement could choose otherwise, which
changes float rounding, and a resumed run must equal a straight one.

The passes are eager: with ``train.compile=true`` the choice is the eager one (compiled kernels were not
timed). The DeepSpeed engine keeps its weights contiguous (ZeRO flattens them; ``engine_deepspeed.py``), so
there ``auto`` resolves to false without measuring; an explicit ``true`` still only makes the inputs
channels_last, as before.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch.nn import functional as F

from bicogan_dist.models.networks import ModelConfig, build_models

if TYPE_CHECKING:
    import contextlib

    from bicogan_dist.train.engine_base import Engine

#: Seconds (warm-up included) after which the measurement stops early: about 2 s for the quick start's model on
#: the CPU; with the default model on one CPU thread a pass takes about a second, so four passes are done.
DEFAULT_BUDGET_S = 3.0
#: Warm-up passes per layout (cudnn.benchmark picks its algorithms in the first) and timed passes per layout.
WARMUP, REPEATS = 2, 5


@dataclass(frozen=True)
class MemoryFormatChoice:
    """The layout a run uses, what the config asked for, and (``auto``) the two median timings."""

    channels_last: bool
    setting: str  # "true", "false" or "auto": model.channels_last as configured
    reason: str  # "measured", "as configured, not measured", or why auto resolved without measuring
    ms_contiguous: float | None = None  # median ms of one G/E/D forward + backward, contiguous
    ms_channels_last: float | None = None  # the same in channels_last
    timed: int = 0  # timed passes per layout
    batch: int | None = None
    precision: str | None = None
    device: str | None = None

    def describe(self) -> str:
        """The run log's line (``parse_memory_format_line`` reads it back)."""
        head = f"memory format: channels_last={str(self.channels_last).lower()} (model.channels_last={self.setting}"
        if self.ms_contiguous is None or self.ms_channels_last is None:
            return f"{head}; {self.reason})"
        return (f"{head}; median G/E/D forward+backward at batch {self.batch}, precision {self.precision} on "
                f"{self.device}: contiguous {self.ms_contiguous:.2f} ms, channels_last {self.ms_channels_last:.2f} ms; "
                f"{self.timed} timed each)")

    def to_text(self) -> str:
        return json.dumps(asdict(self))


_LINE = re.compile(r"^memory format: channels_last=(true|false) \(model\.channels_last=(\w+)"
                   r"(?:;.*?: contiguous ([\d.]+) ms, channels_last ([\d.]+) ms)?", re.M)


def parse_memory_format_line(log: str) -> dict[str, object] | None:
    """``{"channels_last", "setting", "ms_contiguous", "ms_channels_last"}`` from a run's log (the last such line)."""
    found = _LINE.findall(log)
    if not found:
        return None
    chosen, setting, ms_c, ms_cl = found[-1]
    return {"channels_last": chosen == "true", "setting": setting,
            "ms_contiguous": float(ms_c) if ms_c else None, "ms_channels_last": float(ms_cl) if ms_cl else None}


def setting_text(value: bool | str) -> str:
    """``model.channels_last`` as written in YAML: true, false or auto."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def time_memory_formats(model_cfg: ModelConfig, num_classes: int, batch_size: int, device: torch.device,
                        autocast: Callable[[], "contextlib.AbstractContextManager"],
                        budget_s: float = DEFAULT_BUDGET_S, warmup: int = WARMUP,
                        repeats: int = REPEATS) -> tuple[float, float, int]:
    """Median seconds of one forward + backward of G, E and D, contiguous and channels_last; and the passes timed.

    One pass: fake = G(z, c), (z_hat, logits) = E(x), D's scores on the real and fake tuples in one
    batch (as the trainer's D step), backward of their mean into every parameter. ``warmup`` passes
    per layout first (only one when the first pair already took ``budget_s / 2``), then up to
    ``repeats`` timed passes per layout, alternating which layout goes first, stopping once
    ``budget_s`` has passed since the start (at least one each: the time spent is at most about
    ``budget_s`` plus one pass of each layout, or four passes where one pass exceeds the budget).
    CUDA is synchronised around every timed pass.
    """
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(0)
        base = build_models(_with_channels_last(model_cfg, False), num_classes).to(device).train()
        nets = {False: base, True: copy.deepcopy(base).to(memory_format=torch.channels_last)}
        gen = torch.Generator().manual_seed(0)
        x = (torch.rand(batch_size, 1, 48, 48, generator=gen) * 2 - 1).to(device)
        z = torch.randn(batch_size, model_cfg.z_dim, generator=gen).to(device)
        y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
        inputs = {False: x, True: x.contiguous(memory_format=torch.channels_last)}

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize(device)

        def one_pass(cl: bool) -> None:
            m, xs = nets[cl], inputs[cl]
            c = y if model_cfg.conditional else None
            onehot = F.one_hot(y, num_classes).float() if model_cfg.conditional else None
            with autocast():
                fake = m.G(z, c)
                z_hat, logits = m.E(xs) if m.E is not None else (None, None)
                scores = m.D(torch.cat([xs, fake]), None if z_hat is None else torch.cat([z_hat, z]),
                             None if onehot is None else torch.cat([onehot, onehot]))
                loss = scores.float().mean() + (0 if logits is None else logits.float().mean())
            loss.backward()
            for p in m.parameters():
                p.grad = None

        t0 = time.perf_counter()
        for i in range(max(1, warmup)):
            for cl in (False, True):
                one_pass(cl)
            sync()
            if time.perf_counter() - t0 > budget_s / 2:
                break
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(max(1, repeats)):
            for cl in ((False, True) if i % 2 == 0 else (True, False)):
                sync()
                t = time.perf_counter()
                one_pass(cl)
                sync()
                times[cl].append(time.perf_counter() - t)
            if time.perf_counter() - t0 > budget_s:
                break
        del nets, base
        if cuda:
            torch.cuda.empty_cache()
    return statistics.median(times[False]), statistics.median(times[True]), len(times[False])


def resolve_channels_last(engine: Engine, model_cfg: ModelConfig, num_classes: int, batch_size: int,
                          budget_s: float = DEFAULT_BUDGET_S, resumed: bool | None = None) -> MemoryFormatChoice:
    """The layout this run trains in, the same on every rank; call it before the models are wrapped.

    ``true`` / ``false`` are taken as written (nothing measured). ``auto``: resolves to false where
    the engine keeps weights contiguous anyway (DeepSpeed; nothing measured), else rank 0 times both
    layouts (:func:`time_memory_formats`, with the engine's autocast and its device defaults such as
    ``cudnn.benchmark`` already set) and broadcasts the faster; a tie keeps contiguous. ``resumed``
    (read on rank 0 only): the layout the checkpoint being resumed was trained in, which ``auto``
    keeps without measuring.
    """
    from bicogan_dist.train.engine_base import broadcast_text, device_defaults

    setting = setting_text(model_cfg.channels_last)
    if isinstance(model_cfg.channels_last, bool):
        return MemoryFormatChoice(model_cfg.channels_last, setting, "as configured, not measured")
    if not engine.applies_channels_last:
        return MemoryFormatChoice(False, setting, f"the {engine.name} engine keeps weights contiguous, not measured")
    text = None
    if engine.rank == 0 and resumed is not None:
        text = MemoryFormatChoice(bool(resumed), setting, "the resumed checkpoint's layout, not measured").to_text()
    elif engine.rank == 0:
        try:
            device_defaults(engine.device, engine.mixed_precision)
            t_c, t_cl, n = time_memory_formats(model_cfg, num_classes, batch_size, engine.device, engine.autocast,
                                               budget_s=budget_s)
            text = MemoryFormatChoice(t_cl < t_c, setting, "measured", ms_contiguous=1000 * t_c,
                                      ms_channels_last=1000 * t_cl, timed=n, batch=batch_size,
                                      precision=engine.mixed_precision, device=str(engine.device)).to_text()
        except (RuntimeError, ValueError) as exc:  # out of memory, a bad shape: every rank must learn of it
            text = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
    data = json.loads(broadcast_text(text, engine))
    if "error" in data:
        raise RuntimeError(f"model.channels_last=auto: measuring the memory formats on rank 0 failed "
                           f"({data['error']}); set model.channels_last=true or false to skip the measurement")
    return MemoryFormatChoice(**data)


def _with_channels_last(cfg: ModelConfig, value: bool) -> ModelConfig:
    return dataclasses.replace(cfg, channels_last=value)
