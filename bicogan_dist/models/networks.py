"""G, E and D for every GAN variant the paper walks through, from one configurable builder.

The variants differ only in which inputs G and D see and whether an encoder exists:

============  ==========  ======================  ==============
kind          G           E                       D
============  ==========  ======================  ==============
``gan``       G(z)        —                       D(x)
``cgan``      G(z, c)     —                       D(x, c)
``bigan``     G(z)        E(x) → z_hat            D(x, z)
``bicogan``   G(z, c)     E(x) → (z_hat, logits)  D(x, z, c)
============  ==========  ======================  ==============

All kinds share one signature per network (unused inputs are ``None`` and ignored), so
the trainer, EMA, export and sampling code never branch on the kind:

- ``G(z: (B, z_dim) float, c: (B,) long | None) -> (B, 1, 48, 48)`` in [-1, 1] (tanh).
- ``E(x: (B, 1, 48, 48)) -> (z_hat (B, z_dim), c_logits (B, num_classes) | None)``.
- ``D(x, z: (B, z_dim) | None, c: (B, num_classes) float | None) -> (B,)`` raw score.
  D takes the emotion as a probability / one-hot *vector*: one_hot(c) for fake tuples,
  softmax(E's logits) for real tuples in BiCoGAN, one_hot(label) for real ones in cGAN.
  D has no batch statistics by default, so one forward over a concatenated real+fake
  batch scores each sample independently (docs/architecture.md §4).

Two architectures:

``ours`` (default) — DCGAN adapted to 48x48, with channel multiplier ``width`` (base
channels ``C = 8 * max(1, round(8 * width))``: 64 at width 1, 16 at 0.25). A Linear layer
makes 6x6x4C + BatchNorm + ReLU, two ConvTranspose(4x4, stride 2) + BatchNorm + ReLU blocks
reach 24x24xC and a last ConvTranspose to 1 channel + tanh gives 48x48. How G sees the
emotion is ``g_conditioning``: ``concat`` (default) concatenates z with a learned class
embedding at the input; ``cbn`` feeds z alone to the Linear layer and modulates every
BatchNorm with a gain and bias computed from one shared class embedding (BigGAN/SNGAN's
class-conditional BatchNorm). Transposed 4x4 stride-2
convolutions (kernel divisible by stride, so no uneven overlap) were chosen over
nearest-upsample + 3x3 conv because the latter, with its 48x48 conv to one channel, made G
4.5x slower on CPU (5.4 s vs 1.2 s forward+backward at batch 128).
E is a 4x4 stride-2 conv stack (48→24→12→6, C→2C→4C) with GroupNorm (no batch
statistics, nothing to synchronise under DDP) and LeakyReLU(0.2), with Linear heads for
z_hat and the emotion logits (``e_emotion=shared``). With ``e_emotion=branch`` (the default) the emotion
logits come from E's own branch instead: four stages (C/2, C, 2C, 4C channels) of two 3x3
conv + BatchNorm + LeakyReLU(0.2) and a 2x2 max pool (48→3), dropout 0.3, Linear to 8C, Linear
to the classes. Training runs it on the augmented real view that the emotion loss reads and
never on fakes, so its batch statistics hold real faces only, and the emotion loss no longer
shapes the z trunk. D is a BiGAN-style joint discriminator: the same conv stack
on x (spectral norm, LeakyReLU, no BatchNorm unless ``d_batchnorm``) plus a
minibatch-stddev channel (``mbstd_group``) → Linear to 8C features phi(x), a two-layer MLP
on z and a joint MLP on [phi(x), z features] → score. The emotion enters by
``d_conditioning``: ``projection`` (default) adds <embed(c), phi(x)> to the score (Miyato &
Koyama: D must judge x *as* the emotion c), ``concat`` feeds embed(c) into the joint MLP.
Spectral norm (``spectral_norm``) wraps every D layer. Weights start at DCGAN's
normal(0, 0.02). Cost is quadratic in width: use width 0.25-0.5 on CPU.
Parameter counts (6 classes, z_dim 100, bicogan, defaults): width 1 — G 2,501,081,
E 3,934,794, D 6,762,433; width 0.5 — G 1,087,001, E 1,216,090, D 1,710,049; width 0.25 —
G 502,841, E 420,258, D 437,233 (``cbn`` G at width 1: 1,668,185; ``concat`` D: 7,286,721; E with
``e_emotion=shared``: 1,634,218 / 653,322 / 285,754 at width 1 / 0.5 / 0.25).

``paper`` — the seed paper's published Keras networks, layer for layer (``width``,
``spectral_norm`` and ``d_batchnorm`` do not apply; ``describe`` reports the effective
values): G multiplies z by a learned z_dim embedding of the emotion, Dense to 12x12x128
+ LeakyReLU(0.2), two ConvTranspose(128, 4x4, stride 2) + LeakyReLU(0.2) (12→24→48), a
12x12 "same" conv to 1 channel and tanh. E: Conv 64/128/256/512 (5x5, stride 2, "same")
with LeakyReLU(0.2) and BatchNorm on the last three, Flatten, Dense → z_dim, plus the
emotion head (Dense → num_classes) that the paper's code lacks. D: five Conv(128, 5x5)
with LeakyReLU(0.2) (stride 1 then 2, 2, 2, 2: 48→48→24→12→6→3), Flatten (1152),
concatenated with z and a Linear(num_classes, 2304) embedding of the emotion vector,
Dense → 1. Initialisation follows Keras defaults (Glorot-uniform kernels, zero biases,
uniform(-0.05, 0.05) embeddings, BatchNorm momentum 0.01 in torch terms and eps 1e-3).
"Same" padding is TensorFlow's (``KerasSameConv2d``: the extra pixel goes bottom/right).
Parameter counts (6 classes, z_dim 100, bicogan): G 2,405,209, E 4,793,706, D 1,661,925.

Structure is a pure function of ``(ModelConfig, num_classes)``: export and checkpoint code
rebuild the networks from those two and get the same state_dict keys and shapes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from bicogan_dist.config import ConfigError

KINDS: tuple[str, ...] = ("gan", "cgan", "bigan", "bicogan")
ARCHS: tuple[str, ...] = ("ours", "paper")
G_CONDITIONING: tuple[str, ...] = ("concat", "cbn")
D_CONDITIONING: tuple[str, ...] = ("projection", "concat")
E_EMOTION: tuple[str, ...] = ("shared", "branch")
IMAGE_SHAPE: tuple[int, int, int] = (1, 48, 48)


@dataclass
class ModelConfig:
    """Which GAN variant and which architecture; validated on construction."""

    kind: Literal["gan", "cgan", "bigan", "bicogan"] = "bicogan"
    arch: Literal["ours", "paper"] = "ours"
    z_dim: int = 100
    width: float = 1.0  # channel multiplier of ``ours``; must stay 1.0 for ``paper`` (fixed widths)
    spectral_norm: bool = True  # spectral norm on every D layer (``ours``; ignored by ``paper``)
    d_batchnorm: bool = False  # BatchNorm in D's conv stack (``ours``); off by default: DDP trap, docs/architecture.md §4
    mbstd_group: int = 4  # D's minibatch-stddev group (``ours``; 0 = off): lets D see a lack of variety
    # The trainer sorts each batch by emotion, so a minibatch-stddev group holds one emotion and D sees a G that
    # draws one face per emotion (mixed-emotion groups vary whether or not z is used).
    mbstd_by_class: bool = True
    # channels_last (NHWC) conv weights and inputs while training: true, false, or "auto" = the trainer times both
    # layouts at start and keeps the faster (bicogan_dist/train/memory_format.py). channels_last was 1.5-2x faster
    # for bf16 convs on the CPU (oneDNN); on GPUs it depends on precision and batch. A bool or "auto" (YAML strings
    # other than true/false/auto are refused in __post_init__).
    channels_last: bool | str = "auto"
    # How G sees the emotion (``ours``): "concat" = an embedding concatenated with z at the input; "cbn" =
    # class-conditional BatchNorm in every G block from one shared class embedding (BigGAN/SNGAN). concat is
    # the default because it measured better at the quick start's budget (README, quality benchmark).
    g_conditioning: Literal["concat", "cbn"] = "concat"
    # How D sees the emotion (``ours``): "projection" = score + <embed(c), x features> (Miyato & Koyama);
    # "concat" = an embedding of c fed into the joint MLP beside the x (and z) features.
    d_conditioning: Literal["projection", "concat"] = "projection"
    # ADC-GAN's classifier head on D's x features (``ours``, conditional kinds): 2K logits, real-k vs fake-k.
    # Trained by ``loss.adc_weight``; a head that knows about the generator, unlike a plain AC-GAN classifier.
    d_class_head: bool = False
    # Where E's emotion logits come from (``ours`` with kind bicogan; ignored elsewhere, ``describe`` reports the
    # effective value): "branch" = E's own deeper emotion branch (two 3x3 convs + BatchNorm per stage at C/2, C,
    # 2C, 4C, max pooling, dropout), run only on the real view that E's emotion loss reads; "shared" = a Linear
    # head on the z trunk (three strided convs), which plateaued near 52% on FER2013 PrivateTest even when trained
    # alone as a classifier (README, quality benchmark).
    e_emotion: Literal["shared", "branch"] = "branch"
    # Convolutions per stage of D's x stack (``ours``): 1 = one 4x4 stride-2 conv per stage (48→24→12→6, the
    # same shape as E's z trunk, which read FER2013's emotions at about 50% when trained as a classifier);
    # 2 = a 3x3 stride-1 conv after each (SNGAN's standard CNN D). On FER2013 two gave a better FID (8.3 against
    # 8.6-8.8) and no more conditional accuracy (49.2% against 48.7-50.1%), at about 1.6x D's cost (README).
    d_depth: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"model.kind: {self.kind!r} is not one of {list(KINDS)}")
        if self.arch not in ARCHS:
            raise ConfigError(f"model.arch: {self.arch!r} is not one of {list(ARCHS)}")
        if isinstance(self.z_dim, bool) or not isinstance(self.z_dim, int) or self.z_dim < 1:
            raise ConfigError(f"model.z_dim must be an integer >= 1, got {self.z_dim!r}")
        if isinstance(self.width, bool) or not isinstance(self.width, (int, float)) \
                or not math.isfinite(self.width) or self.width <= 0:
            raise ConfigError(f"model.width must be a number > 0, got {self.width!r}")
        self.width = float(self.width)
        if isinstance(self.d_depth, bool) or not isinstance(self.d_depth, int) or not 1 <= self.d_depth <= 4:
            raise ConfigError(f"model.d_depth must be an integer from 1 to 4 (convs per stage of D), got {self.d_depth!r}")
        if isinstance(self.mbstd_group, bool) or not isinstance(self.mbstd_group, int) or self.mbstd_group < 0:
            raise ConfigError(f"model.mbstd_group must be an integer >= 0 (0 = off), got {self.mbstd_group!r}")
        if not (isinstance(self.channels_last, bool) or self.channels_last == "auto"):
            raise ConfigError(f"model.channels_last: {self.channels_last!r} is not one of [true, false, auto]")
        for name in ("spectral_norm", "d_batchnorm", "d_class_head", "mbstd_by_class"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
        for name, allowed in (("g_conditioning", G_CONDITIONING), ("d_conditioning", D_CONDITIONING),
                              ("e_emotion", E_EMOTION)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}: {getattr(self, name)!r} is not one of {list(allowed)}")
        if self.arch == "paper":
            if self.width != 1.0:
                raise ConfigError(f"model.width: the paper architecture has fixed layer widths; "
                                  f"use width 1.0 with arch=paper (got {self.width})")
            if self.d_batchnorm:
                raise ConfigError("model.d_batchnorm: the paper architecture's D has no BatchNorm; "
                                  "d_batchnorm applies to arch=ours only")
        if self.d_class_head and (self.arch != "ours" or not self.conditional):
            raise ConfigError("model.d_class_head: applies to arch=ours with a conditional kind (cgan, bicogan)")

    @property
    def conditional(self) -> bool:
        """G and D see the emotion c."""
        return self.kind in ("cgan", "bicogan")

    @property
    def bidirectional(self) -> bool:
        """An encoder E exists and D scores (x, z) tuples."""
        return self.kind in ("bigan", "bicogan")

    @property
    def emotion_branch(self) -> bool:
        """E's emotion logits come from its own branch (``e_emotion=branch`` where it applies)."""
        return self.arch == "ours" and self.kind == "bicogan" and self.e_emotion == "branch"

    @property
    def base_channels(self) -> int:
        """C of ``ours``: 64 * width rounded to a multiple of 8 (at least 8)."""
        return 8 * max(1, round(8 * self.width))


# ----------------------------------------------------------------------------- helpers
def truncate(z: torch.Tensor, psi: float) -> torch.Tensor:
    """The truncation trick (BigGAN; StyleGAN's psi, here in z space): z pulled toward the prior's mean 0.

    psi = 1 leaves z as drawn; a smaller psi trades variety within an emotion for fidelity to it (measured
    in the README's quality benchmark, which reports the diversity beside the accuracy it buys).
    """
    return z if check_truncation(psi) == 1 else z * psi


def check_truncation(psi: float) -> float:
    """``psi`` if it is a truncation ``truncate`` accepts, else ValueError naming it."""
    if isinstance(psi, bool) or not isinstance(psi, (int, float)) or not 0 < psi <= 1:
        raise ValueError(f"truncation psi must be in (0, 1], got {psi!r}")
    return psi


def count_parameters(module: nn.Module | None) -> int:
    """Number of parameters (trainable or not); 0 for ``None``."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _groups(channels: int) -> int:
    """GroupNorm group count: about 8 channels per group, at most 32, dividing ``channels``."""
    g = max(1, min(32, channels // 8))
    while channels % g:
        g -= 1
    return g


def _need(t: torch.Tensor | None, name: str, kind: str, net: str) -> torch.Tensor:
    if t is None:
        raise ValueError(f"{net} of a {kind!r} model needs {name}, got None")
    return t


def _check_c(c: torch.Tensor, num_classes: int) -> None:
    if c.dim() != 2 or c.shape[1] != num_classes or not c.is_floating_point():
        raise ValueError(f"D takes c as a float (B, {num_classes}) probability/one-hot vector, "
                         f"got {tuple(c.shape)} {c.dtype}")


# ----------------------------------------------------------------------------- ours
def _init_dcgan(module: nn.Module) -> None:
    """DCGAN init: conv/linear weights N(0, 0.02), zero biases, norm scales N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine; gain ``1 + W_g e`` and bias ``W_b e`` from the class embedding ``e``.

    BigGAN's form: one class embedding shared by all blocks, a bias-free linear map per
    layer. With ``e = None`` (unconditional kinds) it is an ordinary affine BatchNorm.
    """

    def __init__(self, channels: int, embed_dim: int | None) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=embed_dim is None)
        self.gain = nn.Linear(embed_dim, channels, bias=False) if embed_dim else None
        self.bias = nn.Linear(embed_dim, channels, bias=False) if embed_dim else None

    def forward(self, h: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        h = self.bn(h)
        if self.gain is None:
            return h
        gain = 1.0 + self.gain(e).to(h.dtype)
        return h * gain[:, :, None, None] + self.bias(e).to(h.dtype)[:, :, None, None]


class OursGenerator(nn.Module):
    """z (+ class embedding) → 6x6x4C → ConvT blocks 12x12x2C, 24x24xC → 48x48 tanh.

    ``g_conditioning="cbn"``: z alone enters the first Linear and the emotion modulates every
    BatchNorm (the class cannot be ignored by one layer, and z owns the input). ``"concat"``:
    z and the embedding are concatenated at the input, plain BatchNorm after.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        C, self.kind = cfg.base_channels, cfg.kind
        self.cbn = cfg.conditional and cfg.g_conditioning == "cbn"
        self.embed = nn.Embedding(num_classes, cfg.z_dim) if cfg.conditional else None
        in_dim = cfg.z_dim * (2 if cfg.conditional and not self.cbn else 1)
        e_dim = cfg.z_dim if self.cbn else None
        self.c0 = 4 * C
        self.fc = nn.Linear(in_dim, 6 * 6 * self.c0, bias=False)
        self.bn0 = ConditionalBatchNorm2d(self.c0, e_dim)
        self.ups = nn.ModuleList()
        self.bns = nn.ModuleList()
        for cin, cout in ((4 * C, 2 * C), (2 * C, C)):  # 6→12→24
            self.ups.append(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False))
            self.bns.append(ConditionalBatchNorm2d(cout, e_dim))
        self.to_img = nn.ConvTranspose2d(C, 1, 4, stride=2, padding=1)  # 24→48
        _init_dcgan(self)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight)  # unit scale like z, so neither half dominates
        for m in self.modules():
            if isinstance(m, ConditionalBatchNorm2d) and m.gain is not None:
                # A small start: every class begins near plain BatchNorm and learns its own modulation.
                nn.init.normal_(m.gain.weight, 0.0, 0.02)
                nn.init.normal_(m.bias.weight, 0.0, 0.02)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        e = None if self.embed is None else self.embed(_need(c, "c", self.kind, "G"))
        h = z if (e is None or self.cbn) else torch.cat([z, e], 1)
        e = e if self.cbn else None
        h = F.relu(self.bn0(self.fc(h).view(-1, self.c0, 6, 6), e))
        for up, bn in zip(self.ups, self.bns):
            h = F.relu(bn(up(h), e))
        return torch.tanh(self.to_img(h))


def _ours_conv_stack(C: int, norm: str, sn: bool, depth: int = 1) -> nn.Sequential:
    """48→24→12→6 with 4x4 stride-2 convs (1→C→2C→4C), each followed by ``depth - 1`` 3x3 stride-1 convs;
    LeakyReLU(0.2) after every conv, the norm after every conv but the first."""
    wrap = _spectral_norm if sn else (lambda m: m)
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(((1, C), (C, 2 * C), (2 * C, 4 * C))):
        for j in range(depth):
            first = i == 0 and j == 0
            conv = (nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=(first or norm == "none")) if j == 0
                    else nn.Conv2d(cout, cout, 3, padding=1, bias=norm == "none"))
            layers.append(wrap(conv))
            if not first and norm == "group":
                layers.append(nn.GroupNorm(_groups(cout), cout))
            elif not first and norm == "batch":
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, True))
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """What every E offers the trainer beyond ``forward(x) -> (z_hat, emotion logits or None)``.

    Training reads z from the real faces and the emotion from an augmented view of them, and z
    alone from the fakes (the latent cycle); an encoder whose emotion path is separate computes
    only what is asked for, and its batch statistics never see a fake.
    """

    def encode_z(self, x: torch.Tensor) -> torch.Tensor:
        """E_z(x) alone (the latent cycle's fakes)."""
        return self(x)[0]

    def encode_c(self, x: torch.Tensor) -> torch.Tensor | None:
        """E_c(x) alone: emotion logits, None without an emotion head (E reading the fakes)."""
        return self(x)[1]

    def encode_views(self, x: torch.Tensor, x_emotion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(E_z(x), E_c(x_emotion)) in one call over both views: GroupNorm (``ours``) is per sample; the
        paper E's BatchNorm sees both views."""
        z_both, c_both = self(torch.cat([x, x_emotion]))
        return z_both[:x.shape[0]], (None if c_both is None else c_both[x.shape[0]:])


def _emotion_branch(C: int, num_classes: int, dropout: float = 0.3) -> nn.Sequential:
    """48→3 in four stages (C/2, C, 2C, 4C channels) of two 3x3 conv + BatchNorm + LeakyReLU and a max pool."""
    layers: list[nn.Module] = []
    c_in = 1
    for width in (C // 2, C, 2 * C, 4 * C):
        for _ in range(2):
            layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.LeakyReLU(0.2, True)]
            c_in = width
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in * 3 * 3, 8 * C),
                         nn.LeakyReLU(0.2, True), nn.Dropout(dropout), nn.Linear(8 * C, num_classes))


class OursEncoder(Encoder):
    """Strided conv stack with GroupNorm → Linear z_hat head; the emotion from a head on it or from its own branch."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        C = cfg.base_channels
        self.features = _ours_conv_stack(C, "group", sn=False)
        self.z_head = nn.Linear(6 * 6 * 4 * C, cfg.z_dim)
        shared = cfg.conditional and not cfg.emotion_branch
        self.c_head = nn.Linear(6 * 6 * 4 * C, num_classes) if shared else None
        _init_dcgan(self)
        # torch's default init (as when it was measured alone): BatchNorm follows every conv of the branch.
        self.emotion = _emotion_branch(C, num_classes) if cfg.emotion_branch else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.emotion is not None:
            return self.encode_z(x), self.emotion(x)
        h = self.features(x)
        return self.z_head(h), (None if self.c_head is None else self.c_head(h))

    def encode_z(self, x: torch.Tensor) -> torch.Tensor:
        return self.z_head(self.features(x))

    def encode_c(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.emotion is not None:
            return self.emotion(x)
        return super().encode_c(x)

    def encode_views(self, x: torch.Tensor, x_emotion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.emotion is not None:
            return self.encode_z(x), self.emotion(x_emotion)
        return super().encode_views(x, x_emotion)


class MinibatchStd(nn.Module):
    """Append one channel: the feature standard deviation over groups of ``group`` consecutive samples.

    StyleGAN's remedy for mode collapse: a per-sample D cannot see that every fake in a batch
    is the same face, this channel can. Groups are consecutive samples, so the trainer's
    concatenated (real, fake) batch never mixes the two halves when the per-process batch is
    a multiple of the group; a batch that no group size > 1 divides gets group 1 (a zero channel).
    """

    def __init__(self, group: int) -> None:
        super().__init__()
        self.group = group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = h.shape
        g = next(d for d in range(min(self.group, n), 0, -1) if n % d == 0)
        # contiguous first: torch.var over a strided (channels_last) view took 70 ms here, this 1 ms
        y = h.float().contiguous().view(n // g, g, c, hh, ww)
        std = ((y - y.mean(1, keepdim=True)).square().mean(1) + 1e-8).sqrt()
        stat = std.mean((1, 2, 3)).to(h.dtype)  # (n // g,)
        stat = stat.repeat_interleave(g).view(n, 1, 1, 1).expand(n, 1, hh, ww)
        return torch.cat([h, stat], 1)

    def extra_repr(self) -> str:
        return f"group={self.group}"


class OursDiscriminator(nn.Module):
    """Joint D(x, z, c): conv features of x (+ minibatch stddev), MLP of z, embedding of c, joint MLP → score."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        C, H, self.kind, self.num_classes = cfg.base_channels, 8 * cfg.base_channels, cfg.kind, num_classes
        sn = _spectral_norm if cfg.spectral_norm else (lambda m: m)
        lrelu = lambda: nn.LeakyReLU(0.2, True)  # noqa: E731
        convs = list(_ours_conv_stack(C, "batch" if cfg.d_batchnorm else "none", cfg.spectral_norm, cfg.d_depth))[:-1]
        extra = 1 if cfg.mbstd_group > 0 else 0
        self.x_net = nn.Sequential(
            *convs, *([MinibatchStd(cfg.mbstd_group)] if extra else []), nn.Flatten(),
            sn(nn.Linear(6 * 6 * (4 * C + extra), H)), lrelu())
        self.z_net = (nn.Sequential(sn(nn.Linear(cfg.z_dim, H)), lrelu(), sn(nn.Linear(H, H)), lrelu())
                      if cfg.bidirectional else None)
        self.c_net = sn(nn.Linear(num_classes, H, bias=False)) if cfg.conditional else None
        self.projection = cfg.conditional and cfg.d_conditioning == "projection"
        parts = 1 + int(self.z_net is not None) + int(self.c_net is not None and not self.projection)
        self.joint = nn.Sequential(sn(nn.Linear(parts * H, 2 * H)), lrelu(), sn(nn.Linear(2 * H, 1)))
        self.class_head = sn(nn.Linear(H, 2 * num_classes)) if cfg.d_class_head else None
        _init_dcgan(self)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None, c: torch.Tensor | None = None,
                with_class_logits: bool = False):
        """The score; with ``with_class_logits`` also the 2K logits of ``class_head`` (real-k, then fake-k)."""
        phi = self.x_net(x)
        score = self._score(phi, z, c)
        if not with_class_logits:
            return score
        if self.class_head is None:
            raise ValueError("D has no class head: build it with model.d_class_head=true")
        return score, self.class_head(phi)

    def _score(self, phi: torch.Tensor, z: torch.Tensor | None, c: torch.Tensor | None) -> torch.Tensor:
        feats = [phi]
        if self.z_net is not None:
            feats.append(self.z_net(_need(z, "z", self.kind, "D")))
        proj = None
        if self.c_net is not None:
            c = _need(c, "c", self.kind, "D")
            _check_c(c, self.num_classes)
            if self.projection:  # <embed(c), phi(x)>: D must judge x *as* the emotion c
                proj = (self.c_net(c.to(phi.dtype)) * phi).sum(1)
            else:
                feats.append(self.c_net(c))
        score = self.joint(torch.cat(feats, 1)).squeeze(1)
        return score if proj is None else score + proj


# ----------------------------------------------------------------------------- paper
def _init_keras(module: nn.Module) -> None:
    """Keras defaults: Glorot-uniform kernels, zero biases, U(-0.05, 0.05) embeddings."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.uniform_(m.weight, -0.05, 0.05)


class KerasSameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding: out = ceil(in / stride), extra pixel at bottom/right.

    torch's symmetric padding gives the same shapes for these layers but shifts stride-2
    outputs by a pixel, and torch's ``padding="same"`` copies the input for even kernels
    with a warning; this pads exactly as the paper's Keras layers did.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _keras_bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=1e-3, momentum=0.01)  # Keras momentum 0.99 = torch momentum 0.01


class PaperGenerator(nn.Module):
    """z ⊙ embed(c) → Dense 12x12x128 → 2 x ConvT(128, 4, s2) → Conv(1, 12x12, same) → tanh."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.kind = cfg.kind
        self.embed = nn.Embedding(num_classes, cfg.z_dim) if cfg.conditional else None
        self.fc = nn.Linear(cfg.z_dim, 12 * 12 * 128)
        self.up = nn.Sequential(
            nn.ConvTranspose2d(128, 128, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True),  # 12→24
            nn.ConvTranspose2d(128, 128, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True),  # 24→48
        )
        self.to_img = KerasSameConv2d(128, 1, 12)
        _init_keras(self)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = z
        if self.embed is not None:
            h = z * self.embed(_need(c, "c", self.kind, "G"))
        h = F.leaky_relu(self.fc(h), 0.2).view(-1, 128, 12, 12)
        return torch.tanh(self.to_img(self.up(h)))


class PaperEncoder(Encoder):
    """Conv 64/128/256/512 (5x5, s2, same; BN on the last three) → Flatten → Dense z (+ emotion head)."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(((1, 64), (64, 128), (128, 256), (256, 512))):  # 48→24→12→6→3
            layers.append(KerasSameConv2d(cin, cout, 5, stride=2))
            if i > 0:
                layers.append(_keras_bn(cout))
            layers.append(nn.LeakyReLU(0.2, True))
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.z_head = nn.Linear(3 * 3 * 512, cfg.z_dim)
        self.c_head = nn.Linear(3 * 3 * 512, num_classes) if cfg.conditional else None
        _init_keras(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.features(x)
        return self.z_head(h), (None if self.c_head is None else self.c_head(h))


class PaperDiscriminator(nn.Module):
    """Five Conv(128, 5x5) + LeakyReLU(0.2) → Flatten(1152) ⊕ z ⊕ Linear(c → 2304) → Dense(1)."""

    FLAT = 3 * 3 * 128
    C_EMBED = 2304

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.kind, self.num_classes = cfg.kind, num_classes
        layers: list[nn.Module] = []
        for i in range(5):  # 48→48→24→12→6→3
            layers += [KerasSameConv2d(1 if i == 0 else 128, 128, 5, stride=1 if i == 0 else 2),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Flatten())
        self.x_net = nn.Sequential(*layers)
        self.uses_z = cfg.bidirectional
        self.c_embed = nn.Linear(num_classes, self.C_EMBED) if cfg.conditional else None
        joint_in = self.FLAT + (cfg.z_dim if self.uses_z else 0) + (self.C_EMBED if cfg.conditional else 0)
        self.out = nn.Linear(joint_in, 1)
        _init_keras(self)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None,
                c: torch.Tensor | None = None, with_class_logits: bool = False) -> torch.Tensor:
        """The score. ``with_class_logits`` is the trainer's uniform call (ours' D may carry ADC-GAN's head);
        the paper's D has no class head, so asking for its logits is an error."""
        if with_class_logits:
            raise ValueError("D has no class head: model.d_class_head applies to arch=ours only")
        feats = [self.x_net(x)]
        if self.uses_z:
            feats.append(_need(z, "z", self.kind, "D"))
        if self.c_embed is not None:
            c = _need(c, "c", self.kind, "D")
            _check_c(c, self.num_classes)
            feats.append(self.c_embed(c))
        return self.out(torch.cat(feats, 1)).squeeze(1)


# ----------------------------------------------------------------------------- builder
_ARCH = {
    "ours": (OursGenerator, OursEncoder, OursDiscriminator),
    "paper": (PaperGenerator, PaperEncoder, PaperDiscriminator),
}


class GANModels(nn.Module):
    """Container of G, E (None for gan/cgan) and D: one ``.to(device)`` and one state_dict for all."""

    def __init__(self, cfg: ModelConfig, num_classes: int, G: nn.Module, E: nn.Module | None,
                 D: nn.Module) -> None:
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        self.G, self.E, self.D = G, E, D

    def parameter_counts(self) -> dict[str, int]:
        return {"G": count_parameters(self.G), "E": count_parameters(self.E), "D": count_parameters(self.D)}


def build_models(cfg: ModelConfig, num_classes: int) -> GANModels:
    """Build G, E, D for ``cfg``; initial weights come from torch's global RNG (seed before).

    Weights are channels_last only for ``channels_last=True``: ``"auto"`` is the trainer's to resolve
    (``bicogan_dist.train.memory_format``), and other builders (exports, evaluation) stay contiguous.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    gen_cls, enc_cls, disc_cls = _ARCH[cfg.arch]
    G = gen_cls(cfg, num_classes)
    E = enc_cls(cfg, num_classes) if cfg.bidirectional else None
    D = disc_cls(cfg, num_classes)
    models = GANModels(cfg, num_classes, G, E, D)
    if cfg.channels_last is True:
        models = models.to(memory_format=torch.channels_last)
    return models


def describe(cfg: ModelConfig, num_classes: int) -> dict[str, Any]:
    """JSON-safe description of the architecture, for exports and run reports.

    The ``config`` entry holds every ``ModelConfig`` field, so ``config_from_description``
    rebuilds the exact structure. Parameters are counted on a throwaway CPU build with
    torch's RNG forked (the caller's random stream is untouched) and spectral norm off
    (same parameter count, without the power iterations it runs at registration).
    """
    with torch.random.fork_rng(devices=[]):
        models = build_models(dataclasses.replace(cfg, spectral_norm=False, channels_last=False), num_classes)
    paper = cfg.arch == "paper"
    return {
        "kind": cfg.kind,
        "arch": cfg.arch,
        "z_dim": cfg.z_dim,
        "width": cfg.width,
        "num_classes": num_classes,
        "conditional": cfg.conditional,
        "bidirectional": cfg.bidirectional,
        "has_encoder": cfg.bidirectional,
        "encoder_emotion_head": cfg.kind == "bicogan",
        "encoder_emotion": None if cfg.kind != "bicogan" else ("branch" if cfg.emotion_branch else "shared"),
        "base_channels": None if paper else cfg.base_channels,
        "spectral_norm": False if paper else cfg.spectral_norm,
        "d_batchnorm": False if paper else cfg.d_batchnorm,
        "image_shape": list(IMAGE_SHAPE),
        "output_range": [-1.0, 1.0],
        "generator_conditioning": None if not cfg.conditional else ("multiply" if paper else cfg.g_conditioning),
        "discriminator_conditioning": None if not cfg.conditional else ("concat" if paper else cfg.d_conditioning),
        "parameters": models.parameter_counts(),
        "config": dataclasses.asdict(cfg),
    }


#: What a model section written before an option existed built: the emotion concatenated in G and D (before
#: the conditioning options), E's emotion read by a head on its z trunk (before ``e_emotion``), one conv per
#: stage of D (before ``d_depth``). Readers of
#: saved model sections (exports, checkpoints) fill the missing keys from here, not from today's defaults.
FIELDS_ADDED_LATER: dict[str, Any] = {"g_conditioning": "concat", "d_conditioning": "concat", "e_emotion": "shared",
                                      "d_depth": 1}


def with_fields_added_later(section: dict[str, Any]) -> dict[str, Any]:
    """A saved ModelConfig section with the keys it predates filled with what its networks were."""
    return {**FIELDS_ADDED_LATER, **section}


def config_from_description(desc: dict[str, Any]) -> ModelConfig:
    """Inverse of ``describe(...)["config"]``: the ModelConfig that rebuilds the same networks."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = with_fields_added_later(dict(desc.get("config", desc)))
    return ModelConfig(**{k: v for k, v in cfg.items() if k in names})
