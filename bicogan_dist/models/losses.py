"""Adversarial objectives, WGAN helpers and the extrinsic factor loss (EFL) of BiCoGAN.

Scores are D's raw outputs (no sigmoid). ``real_scores`` are D's scores of real tuples
(x, E(x)) and ``fake_scores`` those of fake tuples (G(z, c), z, c).

In a BiGAN/BiCoGAN the encoder is trained through the *real* tuples: E wants D to call
real tuples fake while G wants fake tuples called real, so the G/E objective uses both
scores with the labels swapped. For gan/cgan callers pass ``real_scores=None`` (real
scores do not depend on G there, so including them would only shift the value).

=========  ==========================================  =============================================
loss       D minimises                                 G/E minimise (real term only if given)
=========  ==========================================  =============================================
bce        softplus(-real) + softplus(fake)            softplus(real) + softplus(-fake)
           (BCE: real→1, fake→0)                       (non-saturating, labels swapped: the paper's)
hinge      relu(1 - real) + relu(1 + fake)             real - fake
wgan(_gp)  fake - real                                 real - fake
=========  ==========================================  =============================================

Every term is a batch mean. WGAN-GP adds ``gp_weight * gradient_penalty(...)`` to the
D loss; WGAN clips D's parameters to ``[-clip_value, clip_value]`` after each D step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bicogan_dist.config import ConfigError
from bicogan_dist.models.diffaugment import DIFF_AUGMENTS

LOSSES: tuple[str, ...] = ("bce", "hinge", "wgan", "wgan_gp")
REAL_EMOTIONS: tuple[str, ...] = ("label", "encoder")


@dataclass
class LossConfig:
    """Adversarial loss choice, WGAN settings and the EFL weight schedule."""

    # hinge (with projection D and spectral norm, SNGAN/BigGAN's) by default; bce = non-saturating, the paper's.
    loss: Literal["bce", "hinge", "wgan", "wgan_gp"] = "hinge"
    gp_weight: float = 10.0  # WGAN-GP penalty weight
    clip_value: float = 0.01  # WGAN weight clipping bound
    efl_alpha: float = 5.0  # EFL weight gamma = min(alpha * exp(rho * t), phi), t in epochs
    efl_rho: float = 0.25
    efl_phi: float = 10.0
    # Latent cycle (not in the paper): latent_weight * ||E_z(G(z,c)) - z||^2 on fake images, so E learns to
    # invert G (reconstruction, emotion transfer). Weight 1 made G hide z in pixel texture that E decodes (grainy
    # faces, FID 56 vs 47 at 500 synthetic steps); 0.1 kept the faces clean and cut the reconstruction error
    # from 49 to 36 grey levels there (README, section 3). 0 = the paper's objective.
    latent_weight: float = 0.1
    # Mode seeking (Mao et al. 2019, MSGAN): mode_seeking_weight * mean|z1 - z2| / mean|G(z1,c) - G(z2,c)|
    # over pairs of fakes that share c. Off by default: in pixels it rewards noise that changes with z
    # (README, section 3). 0 = off.
    mode_seeking_weight: float = 0.0
    # Average-pool both images by this factor before their distance: pixel noise averages out, so G cannot
    # satisfy mode seeking with texture that changes with z while the face does not. 1 = plain pixels.
    mode_seeking_pool: int = 1
    # ADC-GAN (needs model.d_class_head): D's head learns real-k vs fake-k; G makes its fakes read as real-k
    # and not as fake-k. 0 = off.
    adc_weight: float = 0.0
    # The emotion in D's *real* tuples of a BiCoGAN: "label" = one_hot(true emotion), "encoder" =
    # softmax(E_c(x)) (the BiCoGAN paper's). With "encoder" D can tell real from fake by c alone (soft
    # vs one-hot) instead of by whether x shows c; E's emotion head then learns from the EFL only.
    real_emotion: Literal["label", "encoder"] = "label"
    # Differentiable augmentation of every image D sees, real and fake alike (models.diffaugment).
    # Off by default: at the quick start's budget it slowed learning (README, quality benchmark).
    diffaugment: list[str] = field(default_factory=list)
    # The same ops on a second view of the real images that only E's emotion head learns from (the EFL). E
    # alone sees the view, never D, so G cannot learn the augmentation as data; without it E memorised the
    # FER2013 Training set (batch accuracy 99% vs 49% held out after 34 epochs). [] = EFL on the plain images.
    efl_augment: list[str] = field(default_factory=lambda: ["translation", "cutout"])
    # Reconstruction of the real images (ALICE's cycle in x): recon_weight * mean|G(E_z(x), y) - x| in [-1, 1],
    # y the true emotion. Teaches E and G together to invert each other on real faces, which emotion editing
    # needs; the latent cycle only teaches E on G's own fakes (FER2013: reconstruction error 25.1 grey levels
    # against 34.7 without it, FID unchanged; README, section 7). 0 = off.
    recon_weight: float = 1.0
    # E reads the fakes (bicogan): fake_emotion_weight * CE(E_c(view of G(z, c)), c), with E frozen and in eval
    # mode for this term, so only G learns from it and E's emotion head and batch statistics stay those of the
    # real faces (trained jointly, E learnt to read a private code in the fakes: README, section 3). The view is
    # E's own ``efl_augment`` of the fakes. It pushes every z to show the asked emotion, not only the typical
    # ones: on FER2013 conditional accuracy 48.7% / 50.1% -> 82.0% / 80.9% at 0.1, FID 8.6 -> 4.5 / 5.2 (README, 7);
    # at weight 1 the faces turned grey and blurred. 0 = off (the paper's objective).
    fake_emotion_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"loss.loss: {self.loss!r} is not one of {list(LOSSES)}")
        if self.real_emotion not in REAL_EMOTIONS:
            raise ConfigError(f"loss.real_emotion: {self.real_emotion!r} is not one of {list(REAL_EMOTIONS)}")
        if not isinstance(self.diffaugment, (list, tuple)) or any(op not in DIFF_AUGMENTS for op in self.diffaugment):
            raise ConfigError(f"loss.diffaugment: {self.diffaugment!r} must be a list drawn from {list(DIFF_AUGMENTS)}")
        self.diffaugment = list(self.diffaugment)
        if not isinstance(self.efl_augment, (list, tuple)) or any(op not in DIFF_AUGMENTS for op in self.efl_augment):
            raise ConfigError(f"loss.efl_augment: {self.efl_augment!r} must be a list drawn from {list(DIFF_AUGMENTS)}")
        self.efl_augment = list(self.efl_augment)
        for name in ("gp_weight", "clip_value", "efl_alpha", "efl_rho", "efl_phi", "latent_weight",
                     "mode_seeking_weight", "adc_weight", "recon_weight", "fake_emotion_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"loss.{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("gp_weight", "efl_alpha", "efl_phi", "latent_weight", "mode_seeking_weight", "adc_weight",
                     "recon_weight", "fake_emotion_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.mode_seeking_pool, bool) or not isinstance(self.mode_seeking_pool, int) \
                or self.mode_seeking_pool < 1 or 48 % self.mode_seeking_pool:
            raise ConfigError(f"loss.mode_seeking_pool must be an integer >= 1 that divides 48, got {self.mode_seeking_pool!r}")
        if self.clip_value <= 0:
            raise ConfigError(f"loss.clip_value must be > 0, got {self.clip_value}")


def efl_weight(epochs: float, alpha: float, rho: float, phi: float) -> float:
    """EFL weight ``gamma = min(alpha * exp(rho * t), phi)`` after ``t = epochs`` (fractional) epochs.

    Grows from alpha so the encoder's emotion head counts more as G improves, capped at
    phi; with 5, 0.25, 10 it saturates at t = ln 2 / 0.25 ≈ 2.77 epochs.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    return float(min(alpha * math.exp(min(rho * epochs, 700.0)), phi))


def d_loss(cfg: LossConfig, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """D's adversarial loss (without the gradient penalty)."""
    if cfg.loss == "bce":
        return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()
    if cfg.loss == "hinge":
        return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()
    return fake_scores.mean() - real_scores.mean()  # wgan, wgan_gp


def ge_loss(cfg: LossConfig, real_scores: torch.Tensor | None, fake_scores: torch.Tensor) -> torch.Tensor:
    """G/E adversarial loss: fake tuples should score real and, when given, real tuples fake."""
    if cfg.loss == "bce":
        loss = F.softplus(-fake_scores).mean()
        return loss if real_scores is None else loss + F.softplus(real_scores).mean()
    loss = -fake_scores.mean()  # hinge (the usual generator form) and wgan
    return loss if real_scores is None else loss + real_scores.mean()


Tuple3 = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


def gradient_penalty(D: Callable[..., torch.Tensor], real: Tuple3, fake: Tuple3,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP: mean of (||grad D(u)|| - 1)^2 over random interpolates u of real and fake tuples.

    x, z and c are interpolated with the same per-sample epsilon (None parts stay None),
    and the norm is taken over the gradient with respect to all interpolated inputs
    together, since D is a function of the joint tuple. Returns the unweighted penalty.
    """
    x_real = real[0]
    b = x_real.shape[0]
    eps = torch.rand(b, device=x_real.device, dtype=torch.float32, generator=generator)
    inputs: list[torch.Tensor | None] = []
    for i, (r, f) in enumerate(zip(real, fake)):
        if r is None and f is None:
            inputs.append(None)
            continue
        if r is None or f is None:
            raise ValueError(f"gradient_penalty: part {('x', 'z', 'c')[i]} is None in one tuple only")
        e = eps.view(b, *([1] * (r.dim() - 1))).to(r.dtype)
        inputs.append((e * r.detach() + (1 - e) * f.detach()).requires_grad_(True))
    scores = D(*inputs)
    used = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(scores.sum(), used, create_graph=True)
    sq = sum(g.float().reshape(b, -1).pow(2).sum(1) for g in grads)
    norm = torch.sqrt(sq + 1e-12)
    return (norm - 1.0).pow(2).mean()


@torch.no_grad()
def clip_weights_(D: nn.Module, clip_value: float) -> None:
    """WGAN weight clipping: clamp every parameter of D to [-clip_value, clip_value] in place."""
    for p in D.parameters():
        p.clamp_(-clip_value, clip_value)


def efl_loss(c_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Extrinsic factor loss: cross-entropy between E's emotion logits and the true emotion."""
    return F.cross_entropy(c_logits, labels)


def fake_emotion_loss(encoder: nn.Module, fake: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of E's emotion logits for ``fake`` against the asked emotions ``c``; the gradient reaches G only.

    E runs in eval mode (BatchNorm's running statistics of the reals, no dropout) with its parameters frozen for
    this call alone; both are restored before returning, so the graph of E's own losses is untouched.
    """
    was_training = encoder.training
    flags = [(p, p.requires_grad) for p in encoder.parameters()]
    try:
        encoder.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        logits = encoder.encode_c(fake)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        encoder.train(was_training)
    if logits is None:
        raise ValueError("fake_emotion_loss: the encoder has no emotion head (model.kind must be bicogan)")
    return F.cross_entropy(logits.float(), c)


def latent_cycle_loss(z_rec: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean squared error between E_z(G(z, c)) and the z that made the image (per latent dim)."""
    return F.mse_loss(z_rec.float(), z.float())


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean absolute error between G(E_z(x), y) and the real x, in the model's [-1, 1] range."""
    return (recon.float() - x.float()).abs().mean()


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor, eps: float = 1e-5, pool: int = 1) -> torch.Tensor:
    """MSGAN's term: mean|z1 - z2| / mean|G(z1) - G(z2)| over the pairs (0, 1), (2, 3), ... (pairs share c).

    Lower when different z give more different images: minimising it counters a G that ignores z.
    With ``pool`` > 1 the images are average-pooled first, so only changes larger than pixel noise count.
    """
    h = fake.shape[0] // 2
    if h < 1:
        raise ValueError("mode seeking needs a batch of at least 2")
    img = fake[: 2 * h].float()
    if pool > 1:
        img = F.avg_pool2d(img, pool)
    img = (img[0::2] - img[1::2]).abs().mean()
    lat = (z[0:2 * h:2].float() - z[1:2 * h:2].float()).abs().mean()
    return lat / (img + eps)


def adc_d_loss(real_logits: torch.Tensor, real_y: torch.Tensor, fake_logits: torch.Tensor,
               fake_c: torch.Tensor) -> torch.Tensor:
    """ADC-GAN, D side: real faces of emotion k are class k, fakes asked for k are class K + k."""
    k = real_logits.shape[1] // 2
    return F.cross_entropy(real_logits.float(), real_y) + F.cross_entropy(fake_logits.float(), fake_c + k)


def adc_g_loss(fake_logits: torch.Tensor, fake_c: torch.Tensor) -> torch.Tensor:
    """ADC-GAN, G side: fakes asked for k should read as real-k, not as fake-k."""
    k = fake_logits.shape[1] // 2
    return F.cross_entropy(fake_logits.float(), fake_c) - F.cross_entropy(fake_logits.float(), fake_c + k)
