"""The BiCoGAN training loop, readable top to bottom.

One iteration ("step"): the batch sorted by emotion (the fakes take the same emotions, so D's
minibatch-stddev groups each hold one); a single forward of G(z, c) and E(x) shared by both updates;
the D update on (real, fake) tuples concatenated into one batch; then the G/E update
through the plain D module with D frozen (so D's DDP hooks never fire in the G/E
step), plus the extrinsic factor loss on E's emotion logits for real images and
(unless ``loss.latent_weight`` is 0) the latent cycle loss ||E_z(G(z, c)) - z||^2.
Optional terms, each a config weight: mode seeking over fake pairs (2i, 2i + 1) that share
an emotion, ADC-GAN's real-k / fake-k head on D, DiffAugment on every image D sees, an
augmented view of x for E's emotion head alone, the reconstruction |G(E_z(x), y) - x|, and E
(frozen) reading G's fakes as the emotion they were asked for.

Exact resume: the data order is a pure function of (seed, epoch, rank) and z (and D's
augmentation) of (seed, step, rank), so a checkpoint needs models, optimizers, scalers, EMA, each
rank's torch RNG and the step; epoch and the EFL schedule's t follow from the step.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch.nn import functional as F

from bicogan_dist.config import ConfigError
from bicogan_dist.data.augment import build_augmenter
from bicogan_dist.data.loader import build_loader, load_split
from bicogan_dist.data.manifest import ShardManifest
from bicogan_dist.imaging import to_model_range
from bicogan_dist.models import diffaugment
from bicogan_dist.models.losses import (clip_weights_, d_loss, efl_loss, efl_weight, ge_loss, gradient_penalty,
                                        adc_d_loss, adc_g_loss, fake_emotion_loss, latent_cycle_loss,
                                        mode_seeking_loss,
                                        reconstruction_loss)
from bicogan_dist.models.networks import build_models
from bicogan_dist.train import checkpoint as ckpt
from bicogan_dist.train.config import ExperimentConfig, check_world_size, ema_decay_per_step, scaled_optim
from bicogan_dist.train.engine_base import Engine, make_engine, process_group_timeout_s, ranks_where
from bicogan_dist.train.memory_format import resolve_channels_last
from bicogan_dist.train.monitor import Monitor, encoder_accuracy


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves in memory: tests and tools inspect the live modules."""

    run_dir: Path
    step: int
    engine: Engine
    G_ema: torch.nn.Module


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; the message names the step and the loss."""


def step_seed(seed: int, step: int, rank: int, stream: str = "z") -> int:
    """Seed of the random ``stream`` (z noise, D's augmentation) at ``step`` on ``rank`` (63-bit, stable)."""
    digest = hashlib.blake2b(f"{stream}/{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class StopFlags:
    """SIGTERM/SIGINT (a cluster's preemption, Ctrl-C) ask for a checkpoint and a clean exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        """Give the process its own handlers back (train() may run inside a larger program)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True


class LossHealth:
    """The first step whose loss was NaN or inf, recorded on the device so that watching costs no host sync.

    ``record`` runs every step (device ops only); ``agree`` is the one host sync: every rank learns
    the earliest non-finite step of any rank and whether any rank was asked to stop.
    """

    NONE = 2 ** 62  # "no non-finite step yet"; steps are far below

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.losses = torch.zeros(3, device=device)  # loss/d, loss/ge, loss/efl at that step (this rank)

    def record(self, step: int, loss_d: torch.Tensor, loss_ge: torch.Tensor, loss_efl: torch.Tensor) -> None:
        values = torch.stack([loss_d.detach().float(), loss_ge.detach().float(), loss_efl.detach().float()])
        new = (~torch.isfinite(values[:2]).all()) & (self.first_bad == self.NONE)
        self.first_bad = torch.where(new, step, self.first_bad)
        self.losses = torch.where(new, values, self.losses)

    def agree(self, engine: Engine, stop_requested: bool, step: int) -> bool:
        """Whether any rank asked to stop; raises NonFiniteLossError naming the first non-finite step of any rank."""
        flags = torch.stack([-self.first_bad, torch.tensor(int(stop_requested), dtype=torch.int64, device=self.device)])
        neg_first, stop = engine.all_reduce(flags, op="max").tolist()
        first = -neg_first
        if first != self.NONE:
            if int(self.first_bad) == first:
                d, ge, efl = self.losses.tolist()
                what = f"loss/d={d:.4g}, loss/ge={ge:.4g}, loss/efl={efl:.4g}"
            else:
                what = f"on another rank than {engine.rank}"
            raise NonFiniteLossError(
                f"step {first}: non-finite loss ({what}) on at least one rank, found when the ranks compared flags "
                f"at step {step} (train.sync_every); stopped without saving. "
                f"Resume from the last good checkpoint with a lower learning rate or bf16 instead of fp16.")
        return bool(stop)


def prepare_run_dir(cfg: ExperimentConfig, resume: str | None, engine: Engine,
                    run_dir: Path | None = None) -> ckpt.ResumePoint | None:
    """The checkpoint to resume from, decided by rank 0 and confirmed readable by every rank.

    Refuses to mix a new run into an old one. ``run_dir`` defaults to ``log.run_dir``.
    """
    run_dir = Path(run_dir or cfg.log.run_dir)

    def resolve() -> Path | None:
        if resume:
            return ckpt.resolve_checkpoint(resume, run_dir)
        if ckpt.list_checkpoints(run_dir):
            raise ConfigError(f"log.run_dir: {run_dir} already holds checkpoints; pass --resume latest to continue "
                              f"it or choose another log.run_dir")
        return None

    return ckpt.agree_on_resume(resolve, run_dir, engine, resume)


#: Test hook (tests/test_multinode.py): with it set to ``1``, every rank R > 0 uses ``<log.run_dir>.rank<R>``
#: as its run folder, as if log.run_dir lay on each node's own disk. Never set it for a real run.
NODE_LOCAL_TEST_ENV = "BICOGAN_TEST_NODE_LOCAL_RUN_DIR"


def rank_run_dir(run_dir: str | Path, rank: int) -> Path:
    """This rank's run folder: ``log.run_dir``, except under the :data:`NODE_LOCAL_TEST_ENV` test hook."""
    run_dir = Path(run_dir)
    if rank > 0 and os.environ.get(NODE_LOCAL_TEST_ENV) == "1":
        return run_dir.with_name(f"{run_dir.name}.rank{rank}")
    return run_dir


def _on_every_rank(engine: Engine, check: Callable[[], object]) -> None:
    """Run a start-up ``check`` on every rank; if it fails on any, every rank stops (none waits in a collective)."""
    error: ConfigError | None = None
    try:
        check()
    except ConfigError as exc:
        error = exc
    failed = ranks_where(error is not None, engine)
    if error is not None:
        raise error
    if failed:
        raise ConfigError(f"log.run_dir: rank(s) {failed} cannot use the run folder (see their error)")


#: Builds, on the training device, ``fn(G_ema, E, class_names) -> {"eval/...": value}``. The trainer
#: only calls it; the CLI composes it from bicogan_dist.evaluate, which lies downstream of training.
EvaluatorFactory = Callable[[torch.device], Callable[[torch.nn.Module, torch.nn.Module | None, list[str]], dict]]


def train(cfg: ExperimentConfig, resume: str | None = None,
          evaluator_factory: EvaluatorFactory | None = None) -> TrainResult:
    """Run (or continue) one training run; with ``cfg.eval.every`` it evaluates on rank 0.

    Before any data is read or any step is trained, every rank checks that it can write the run
    folder, rank 0 resolves ``--resume`` for all ranks, and all ranks confirm they share one run
    folder (docs/architecture.md, checkpoints); a failure on any rank stops every rank.
    """
    engine = make_engine(cfg)
    run_dir = rank_run_dir(cfg.log.run_dir, engine.rank)
    _on_every_rank(engine, lambda: ckpt.check_writable(run_dir))
    start = prepare_run_dir(cfg, resume, engine, run_dir)
    ckpt.check_shared_run_dir(run_dir, engine)
    locks: list[ckpt.RunLock] = []  # rank 0's; a folder in use stops every rank, not rank 0 alone
    _on_every_rank(engine, lambda: locks.append(ckpt.RunLock(run_dir).acquire()) if engine.is_main else None)
    lock = locks[0] if locks else None
    try:
        return _train(cfg, engine, run_dir, start, evaluator_factory)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: ExperimentConfig, engine: Engine, run_dir: Path, start: ckpt.ResumePoint | None,
           evaluator_factory: EvaluatorFactory | None) -> TrainResult:
    device, rank, world = engine.device, engine.rank, engine.world_size
    check_world_size(cfg, world)

    augmenter = build_augmenter(cfg.augment)
    data = build_loader(cfg.data, rank=rank, world_size=world, device=device, seed=cfg.train.seed,
                        augmenter=augmenter)
    label_names = list(data.label_names)
    n_cls = len(label_names)
    per_epoch = data.batches_per_epoch

    # model.channels_last (auto: rank 0 times both layouts on throwaway copies and every rank takes its choice).
    # A resumed run keeps the layout its checkpoint recorded (rank 0 reads it; it decides for all).
    resumed_layout = ckpt.read_state(start.path).get("channels_last") if start is not None and engine.is_main \
        else None
    memory_format = resolve_channels_last(engine, cfg.model, n_cls, cfg.data.batch_size, resumed=resumed_layout)
    channels_last = memory_format.channels_last
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    models = build_models(dataclasses.replace(cfg.model, channels_last=channels_last), n_cls)
    G_ema = copy.deepcopy(models.G).to(device).requires_grad_(False)
    engine.prepare(models, scaled_optim(cfg.optim, cfg.data.batch_size * world), compile_models=cfg.train.compile,
                   channels_last=channels_last)
    ge_raw, D_raw = engine.unwrap("ge"), engine.unwrap("d")
    # The G/E step's frozen D: compiled apart from the engine's D (no DDP, parameters frozen), so each of the
    # two is traced once and the requires_grad_ toggles never change what either sees.
    D_frozen = torch.compile(D_raw) if cfg.train.compile else D_raw
    conditional, bidirectional = cfg.model.conditional, cfg.model.bidirectional
    efl_on = conditional and bidirectional
    latent_on = bidirectional and cfg.loss.latent_weight > 0
    mode_seeking = cfg.loss.mode_seeking_weight > 0
    adc_on = conditional and cfg.loss.adc_weight > 0
    recon_on = bidirectional and cfg.loss.recon_weight > 0
    fake_emotion_on = efl_on and cfg.loss.fake_emotion_weight > 0

    start_step = 0
    if start is not None:  # every rank loads rank 0's choice and confirms the step it loaded
        start_step = ckpt.load_agreed(start, engine, G_ema, cfg.to_dict()["model"])
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_incomplete(run_dir)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    engine.barrier()

    heldout_x = heldout_y = torch.empty(0, device=device)
    if bidirectional and cfg.log.heldout_split in ShardManifest.load(cfg.data.shards).splits:
        hx, hy = load_split(cfg.data.shards, cfg.log.heldout_split, device=device, limit=cfg.log.heldout_size)
        heldout_x, heldout_y = to_model_range(hx), hy
    fixed_z = torch.randn(cfg.log.grid_columns, cfg.model.z_dim,
                          generator=torch.Generator().manual_seed(cfg.train.seed)).to(device)

    evaluator = None
    eval_on = evaluator_factory is not None and cfg.eval.every > 0  # known on every rank; evaluation runs on rank 0
    if eval_on and engine.is_main:
        evaluator = evaluator_factory(device)
    ema_decay = ema_decay_per_step(cfg.train, cfg.data.batch_size * world)
    monitor = Monitor(run_dir, engine.is_main, cfg.train.max_steps, start_step, cfg.log.progress)
    monitor.write(f"run {run_dir}: {cfg.model.kind}/{cfg.model.arch}, {world} process(es) on {device.type}, "
                  f"precision {engine.mixed_precision}, {per_epoch} batches/epoch of {cfg.data.batch_size}/process, "
                  f"starting at step {start_step}{_timeout_note(device)}")
    monitor.write(f"global batch {cfg.data.batch_size * world} images/step; lr/ge {engine.learning_rate('ge'):.4g}, "
                  f"lr/d {engine.learning_rate('d'):.4g} (optim.lr_scaling {cfg.optim.lr_scaling}); EMA decay "
                  f"{ema_decay:.6g}/step")
    monitor.write(memory_format.describe())
    stop = StopFlags()
    health = LossHealth(device)
    sums: dict[str, torch.Tensor] = {}
    n_sum, t_last, step_last = 0, time.perf_counter(), start_step
    batches = None
    step = start_step
    try:
        while step < cfg.train.max_steps:
            epoch, in_epoch = divmod(step, per_epoch)
            if batches is None or in_epoch == 0:
                batches = data.epoch(epoch, start_batch=in_epoch)
            x_u8, y = next(batches)
            x_u8, y, c = arrange_batch(x_u8, y, conditional and cfg.model.mbstd_by_class, conditional and mode_seeking)
            c = c if conditional else None
            x = to_model_range(x_u8)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            b = x.shape[0]
            gen = torch.Generator(device=device).manual_seed(step_seed(cfg.train.seed, step, rank))
            z = torch.randn(b, cfg.model.z_dim, device=device, generator=gen)
            # The global RNG (dropout in E's emotion branch) restarts from (seed, step, rank) like every other draw,
            # so a resumed run draws the same masks whatever used it before (memory-format timing, evaluation).
            torch.manual_seed(step_seed(cfg.train.seed, step, rank, "global"))
            want_norm = (step + 1) % cfg.log.log_every == 0 or step + 1 == cfg.train.max_steps

            # One forward of G and E, shared by both updates.
            x_efl = None
            if efl_on and cfg.loss.efl_augment:  # E's emotion head learns from its own augmented view of x
                efl_gen = torch.Generator(device=device).manual_seed(step_seed(cfg.train.seed, step, rank, "efl_aug"))
                x_efl = diffaugment.apply(x, diffaugment.sample(cfg.loss.efl_augment, b, x.shape[-1], efl_gen, device))
            with engine.autocast():
                fake, z_hat, c_logits, z_rec, recon = engine.ge(
                    z, c, x if bidirectional else None, encode_fake=latent_on, x_efl=x_efl,
                    reconstruct=recon_on, c_recon=y if conditional else None)
            c_fake = F.one_hot(c, n_cls).float() if conditional else None
            if not conditional:
                c_real = None
            elif bidirectional and cfg.loss.real_emotion == "encoder":
                c_real = c_logits.float().softmax(1)
            else:
                c_real = F.one_hot(y, n_cls).float()  # the true emotion: real tuples carry c as fake ones do
            z_real = z_hat if bidirectional else None
            # D sees every image through the same differentiable augmentation (both updates, real and fake).
            x_real_d, fake_d = x, fake
            if cfg.loss.diffaugment:
                aug_gen = torch.Generator(device=device).manual_seed(step_seed(cfg.train.seed, step, rank, "diffaug"))
                aug = diffaugment.sample(cfg.loss.diffaugment, 2 * b, x.shape[-1], aug_gen, device)
                x_d = diffaugment.apply(torch.cat([x, fake]), aug)
                x_real_d, fake_d = x_d[:b].detach(), x_d[b:]  # real images carry no gradient (one cat, one op)

            # --- D update: real and fake tuples in one batch.
            real_t = (x_real_d, _detach(z_real), _detach(c_real))
            fake_t = (fake_d.detach(), z if bidirectional else None, c_fake)
            D_raw.requires_grad_(True)
            with engine.autocast():
                if adc_on:
                    scores, cls_logits = engine.d(*_cat(real_t, fake_t), with_class_logits=True)
                else:
                    scores = engine.d(*_cat(real_t, fake_t))
            scores = scores.float()
            s_real, s_fake = scores[:b], scores[b:]
            loss_d = d_loss(cfg.loss, s_real, s_fake)
            loss_adc_d = None
            if adc_on:
                loss_adc_d = adc_d_loss(cls_logits[:b], y, cls_logits[b:], c)
                loss_d = loss_d + cfg.loss.adc_weight * loss_adc_d
            if cfg.loss.loss == "wgan_gp":
                loss_d = loss_d + cfg.loss.gp_weight * gradient_penalty(D_raw, real_t, fake_t)
            if cfg.train.inject_nan_at_step == step + 1:
                loss_d = loss_d * float("nan")
            norm_d = engine.step("d", loss_d, want_norm)
            if cfg.loss.loss == "wgan":
                clip_weights_(D_raw, cfg.loss.clip_value)
                engine.push_module_weights("d")  # ZeRO keeps fp32 master weights apart from the module

            # --- G/E update through the plain, frozen D.
            D_raw.requires_grad_(False)
            real_t = (x_real_d, z_real, c_real)
            fake_t = (fake_d, z if bidirectional else None, c_fake)
            with engine.autocast():
                if bidirectional:
                    out = D_frozen(*_cat(real_t, fake_t), with_class_logits=adc_on)
                    scores, cls_fake = (out[0], out[1][b:]) if adc_on else (out, None)
                    g_real, g_fake = scores.float()[:b], scores.float()[b:]
                else:
                    out = D_frozen(*fake_t, with_class_logits=adc_on)
                    scores, cls_fake = out if adc_on else (out, None)
                    g_real, g_fake = None, scores.float()
            loss_adv = ge_loss(cfg.loss, g_real, g_fake)
            if adc_on:
                loss_adv = loss_adv + cfg.loss.adc_weight * adc_g_loss(cls_fake, c)
            gamma = efl_weight(step / per_epoch, cfg.loss.efl_alpha, cfg.loss.efl_rho, cfg.loss.efl_phi)
            loss_efl = efl_loss(c_logits.float(), y) if efl_on else torch.zeros((), device=device)
            loss_ge = loss_adv + gamma * loss_efl
            loss_latent = None
            if latent_on:
                loss_latent = latent_cycle_loss(z_rec, z)
                loss_ge = loss_ge + cfg.loss.latent_weight * loss_latent
            loss_recon = None
            if recon_on:
                loss_recon = reconstruction_loss(recon, x)
                loss_ge = loss_ge + cfg.loss.recon_weight * loss_recon
            loss_fake_emotion = None
            if fake_emotion_on:  # E (frozen) reads G's fakes through the view it learns emotions from
                view = fake
                if cfg.loss.efl_augment:
                    fe_gen = torch.Generator(device=device).manual_seed(step_seed(cfg.train.seed, step, rank, "fake_emo"))
                    view = diffaugment.apply(fake, diffaugment.sample(cfg.loss.efl_augment, b, fake.shape[-1], fe_gen,
                                                                      device))
                with engine.autocast():
                    loss_fake_emotion = fake_emotion_loss(ge_raw.E, view, c)
                loss_ge = loss_ge + cfg.loss.fake_emotion_weight * loss_fake_emotion
            loss_ms = None
            if mode_seeking:
                loss_ms = mode_seeking_loss(fake, z, pool=cfg.loss.mode_seeking_pool)
                loss_ge = loss_ge + cfg.loss.mode_seeking_weight * loss_ms
            norm_ge = engine.step("ge", loss_ge, want_norm)
            if fake_emotion_on and world > 1:
                # The fake-emotion term reads E's running statistics, so they shape training: kept equal on every
                # rank each step, a resumed run (whose checkpoint averaged them) goes on exactly like a straight one.
                average_buffers([ge_raw.E], engine)
            update_ema(G_ema, ge_raw.G, ema_decay_at(step, ema_decay))
            health.record(step + 1, loss_d, loss_ge, loss_efl)  # on the device: no host sync per step
            step += 1
            monitor.advance()

            metrics = {"loss/d": loss_d, "loss/ge": loss_ge, "loss/ge_adversarial": loss_adv, "loss/efl": loss_efl,
                       "D/real_score": s_real.mean(), "D/fake_score": s_fake.mean()}
            if loss_latent is not None:
                metrics["loss/latent_cycle"] = loss_latent
            if loss_ms is not None:
                metrics["loss/mode_seeking"] = loss_ms
            if loss_recon is not None:
                metrics["loss/reconstruction"] = loss_recon
            if loss_fake_emotion is not None:
                metrics["loss/fake_emotion"] = loss_fake_emotion
            if loss_adc_d is not None:
                metrics["loss/adc_d"] = loss_adc_d
            if efl_on:
                metrics["encoder/batch_accuracy"] = (c_logits.argmax(1) == y).float().mean()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            n_sum += 1

            last = step == cfg.train.max_steps
            at_log = step % cfg.log.log_every == 0 or last
            at_images = step % cfg.log.image_every == 0 or last
            # The same on every rank (the evaluator exists on rank 0 only): the flag comparison below is collective.
            at_eval = eval_on and (step % cfg.eval.every == 0 or last)
            at_checkpoint = step % cfg.log.checkpoint_every == 0 or last
            # The ranks compare flags (a non-finite loss since the last comparison, a stop signal) only
            # every train.sync_every steps, and always before anything is logged or saved: nothing is
            # written after a non-finite step.
            if not (at_log or at_images or at_eval or at_checkpoint or step % cfg.train.sync_every == 0):
                continue
            stopping = health.agree(engine, stop.requested, step)
            at_checkpoint = at_checkpoint or stopping

            if at_log:
                keys = sorted(sums)
                mean = engine.all_reduce(torch.stack([sums[k] for k in keys])) / (n_sum * world)
                now = time.perf_counter()
                values = dict(zip(keys, mean.tolist()))
                values.update({
                    "efl/gamma": gamma, "lr/ge": engine.learning_rate("ge"), "lr/d": engine.learning_rate("d"),
                    "perf/images_per_s": (step - step_last) * b * world / max(now - t_last, 1e-9),
                    "epoch": step / per_epoch,
                })
                if norm_d is not None:
                    values.update({"grad_norm/d": norm_d, "grad_norm/ge": norm_ge})
                if cfg.train.compile:  # graphs compiled so far: flat after the first step unless something retraces
                    values["compile/graphs"] = compiled_graphs()
                if efl_on and heldout_x.numel() and engine.is_main:  # only rank 0 writes scalars
                    values["encoder/heldout_accuracy"] = encoder_accuracy(ge_raw.E, heldout_x, heldout_y)
                monitor.scalars(step, values)
                sums, n_sum, t_last, step_last = {}, 0, now, step

            if world > 1 and (at_images or at_checkpoint):
                average_buffers([ge_raw, D_raw, G_ema], engine)
            if at_images:
                monitor.images(step, G_ema, ge_raw.E, fixed_z, label_names, conditional,
                               heldout_x[:8], heldout_y[:8])
            if at_eval:
                # Rank 0 evaluates; the others wait at the barrier below, not inside the next step's collective.
                if evaluator is not None:
                    t_eval = time.perf_counter()
                    values = evaluator(G_ema, ge_raw.E, label_names)
                    values["time/eval_s"] = time.perf_counter() - t_eval
                    monitor.scalars(step, values)
                    monitor.write(f"step {step}: evaluation took {values['time/eval_s']:.1f} s "
                                  f"(train.dist_timeout_s={cfg.train.dist_timeout_s:g} must exceed it)")
                engine.barrier()
            if at_checkpoint:
                saved = ckpt.save(run_dir, step, engine, G_ema, {
                    "epoch": step / per_epoch, "batches_per_epoch": per_epoch, "model": cfg.to_dict()["model"],
                    "channels_last": channels_last,
                    "label_names": label_names}, keep=cfg.log.keep_checkpoints)
                monitor.write(f"step {step}: checkpoint {saved}")
            if stopping:
                monitor.write(f"step {step}: stop signal received; checkpoint saved, exiting")
                break
    finally:
        stop.restore()
        monitor.close()
        data.close()  # stream workers (persistent across epochs) and their pipes end here, however training ends
    return TrainResult(run_dir, step, engine, G_ema)


def compiled_graphs() -> int:
    """How many graphs torch.compile has built in this process (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _timeout_note(device: torch.device) -> str:
    """``, process-group timeout N s`` as torch.distributed runs it (empty in a single process)."""
    timeout = process_group_timeout_s(device)
    return "" if timeout is None else f", process-group timeout {timeout:g} s"


def arrange_batch(x: torch.Tensor, y: torch.Tensor, sort_by_emotion: bool,
                  pair_fakes: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real batch (x, y) and the emotions c of the fake batch drawn beside it.

    ``sort_by_emotion``: x and y are reordered by emotion (stable), so that D's minibatch-stddev
    groups of consecutive samples hold one emotion, for the reals and, since c follows y, for the
    fakes: a G that draws one face per emotion then shows a zero spread that real groups never have.
    ``pair_fakes``: fakes (2i, 2i + 1) share an emotion, for the mode-seeking term.
    """
    if sort_by_emotion:
        order = torch.argsort(y, stable=True)
        x, y = x[order], y[order]
    c = y
    if pair_fakes:
        n = 2 * (y.shape[0] // 2)
        c = y.clone()
        c[1:n:2] = y[0:n:2]
    return x, y, c


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _cat(a: tuple, b: tuple) -> tuple:
    """Concatenate two (x, z, c) tuples along the batch; None parts stay None."""
    return tuple(None if p is None else torch.cat([p, q]) for p, q in zip(a, b))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay ramped up over the first steps, so short runs are not dominated by the initial weights."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_p, model_p = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


@torch.no_grad()
def average_buffers(modules: list[torch.nn.Module], engine: Engine) -> None:
    """Average BatchNorm running statistics over ranks.

    Parameters stay identical through DDP, but running statistics are updated from each
    rank's local batch (and are not broadcast mid-step, see the engine). Averaging them
    before images and checkpoints gives every rank the same, whole-batch estimate.
    """
    buffers = [b for m in modules for b in m.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    flat = engine.all_reduce(flat) / engine.world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()
