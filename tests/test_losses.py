"""Loss values on hand-computed scores, sign conventions, WGAN-GP, clipping and the EFL schedule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bicogan_dist.config import ConfigError, from_dict
from bicogan_dist.models.losses import (LossConfig, clip_weights_, d_loss, efl_loss, efl_weight, ge_loss,
                                        gradient_penalty, latent_cycle_loss)
from bicogan_dist.models.networks import ModelConfig, build_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gp_value(*args) -> float:
    return float(gradient_penalty(*args).detach())


REAL = torch.tensor([2.0, 0.5])
FAKE = torch.tensor([-3.0, 0.0])


def sp(v: float) -> float:
    """softplus, written out."""
    return math.log1p(math.exp(v))


# ----------------------------------------------------------------------------- EFL schedule
def test_efl_schedule_is_pinned():
    assert efl_weight(0, 5, 0.25, 10) == 5.0
    assert efl_weight(1, 5, 0.25, 10) == pytest.approx(5 * math.exp(0.25))
    assert efl_weight(0.5, 5, 0.25, 10) == pytest.approx(5 * math.exp(0.125))
    t_sat = math.log(2) / 0.25  # ≈ 2.7726
    assert t_sat == pytest.approx(2.7726, abs=1e-4)
    assert efl_weight(t_sat - 0.01, 5, 0.25, 10) < 10
    assert efl_weight(t_sat + 0.01, 5, 0.25, 10) == 10.0
    assert efl_weight(1e6, 5, 0.25, 10) == 10.0  # no overflow
    ts = [i / 10 for i in range(60)]
    ws = [efl_weight(t, 5, 0.25, 10) for t in ts]
    assert ws == sorted(ws) and isinstance(ws[0], float)
    with pytest.raises(ValueError, match="epochs"):
        efl_weight(-1, 5, 0.25, 10)


def test_efl_loss_is_cross_entropy():
    assert float(efl_loss(torch.zeros(3, 6), torch.tensor([0, 2, 5]))) == pytest.approx(math.log(6))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    want = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (1 + math.e))) / 2
    assert float(efl_loss(logits, torch.tensor([0, 1]))) == pytest.approx(want)


# ----------------------------------------------------------------------------- values
def test_bce_values():
    cfg = LossConfig(loss="bce")
    want_d = (sp(-2.0) + sp(-0.5)) / 2 + (sp(-3.0) + sp(0.0)) / 2
    assert float(d_loss(cfg, REAL, FAKE)) == pytest.approx(want_d)
    want_fake = (sp(3.0) + sp(0.0)) / 2  # non-saturating: -log sigmoid(fake)
    assert float(ge_loss(cfg, None, FAKE)) == pytest.approx(want_fake)
    want_ge = want_fake + (sp(2.0) + sp(0.5)) / 2  # real tuples labelled fake
    assert float(ge_loss(cfg, REAL, FAKE)) == pytest.approx(want_ge)
    zeros = torch.zeros(4)
    assert float(d_loss(cfg, zeros, zeros)) == pytest.approx(2 * math.log(2))
    # equals BCE with logits, labels real→1 fake→0 (and swapped for G/E)
    bce = F.binary_cross_entropy_with_logits
    assert float(d_loss(cfg, REAL, FAKE)) == pytest.approx(
        float(bce(REAL, torch.ones(2)) + bce(FAKE, torch.zeros(2))))
    assert float(ge_loss(cfg, REAL, FAKE)) == pytest.approx(
        float(bce(REAL, torch.zeros(2)) + bce(FAKE, torch.ones(2))))


def test_hinge_values():
    cfg = LossConfig(loss="hinge")
    # relu(1 - [2, .5]) = [0, .5] → .25; relu(1 + [-3, 0]) = [0, 1] → .5
    assert float(d_loss(cfg, REAL, FAKE)) == pytest.approx(0.75)
    assert float(ge_loss(cfg, None, FAKE)) == pytest.approx(1.5)  # -mean(fake)
    assert float(ge_loss(cfg, REAL, FAKE)) == pytest.approx(1.25 + 1.5)  # mean(real) - mean(fake)


@pytest.mark.parametrize("name", ["wgan", "wgan_gp"])
def test_wasserstein_values(name):
    cfg = LossConfig(loss=name)
    assert float(d_loss(cfg, REAL, FAKE)) == pytest.approx(-1.5 - 1.25)
    assert float(ge_loss(cfg, REAL, FAKE)) == pytest.approx(1.25 + 1.5)
    assert float(ge_loss(cfg, None, FAKE)) == pytest.approx(1.5)


# ----------------------------------------------------------------------------- signs
@pytest.mark.parametrize("name", ["bce", "hinge", "wgan", "wgan_gp"])
def test_sign_conventions(name):
    cfg = LossConfig(loss=name)
    torch.manual_seed(0)
    good_real, good_fake = torch.full((8,), 3.0), torch.full((8,), -3.0)  # D tells them apart
    rand_real, rand_fake = torch.randn(8) * 0.1, torch.randn(8) * 0.1
    assert d_loss(cfg, good_real, good_fake) < d_loss(cfg, rand_real, rand_fake)
    # G/E do worse against the perfect D, better when D is fooled (real called fake, fake real)
    assert ge_loss(cfg, good_real, good_fake) > ge_loss(cfg, rand_real, rand_fake) > ge_loss(cfg, good_fake, good_real)
    assert ge_loss(cfg, None, good_fake) > ge_loss(cfg, None, good_real)
    # gradient directions: D pushes real up, fake down; G/E push fake up and (encoder) real down
    r, f = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    gr, gf = torch.autograd.grad(d_loss(cfg, r, f), (r, f))
    assert (gr < 0).all() and (gf > 0).all()
    gr, gf = torch.autograd.grad(ge_loss(cfg, r, f), (r, f))
    assert (gr > 0).all() and (gf < 0).all()


# ----------------------------------------------------------------------------- WGAN-GP
class LinearD(nn.Module):
    """D(x, z, c) = w · [x, z, c]: its input gradient is w everywhere."""

    def __init__(self, dims: tuple[int, int | None, int | None], scale: float = 1.0) -> None:
        super().__init__()
        self.dims = dims
        n = sum(d for d in dims if d)
        w = torch.randn(n)
        self.w = nn.Parameter(scale * w / w.norm())

    def forward(self, x, z=None, c=None):
        parts = [x.flatten(1)] + [t for t in (z, c) if t is not None]
        return torch.cat(parts, 1) @ self.w


def _tuples(b: int = 5, z: bool = True, c: bool = True):
    def one():
        return (torch.randn(b, 1, 4, 4), torch.randn(b, 3) if z else None,
                torch.softmax(torch.randn(b, 6), 1) if c else None)
    return one(), one()


@pytest.mark.parametrize("z, c", [(True, True), (False, False), (True, False), (False, True)])
def test_gradient_penalty_is_zero_for_unit_gradient_and_positive_otherwise(z, c):
    torch.manual_seed(0)
    real, fake = _tuples(z=z, c=c)
    dims = (16, 3 if z else None, 6 if c else None)
    assert gp_value(LinearD(dims), real, fake) == pytest.approx(0.0, abs=1e-6)
    assert gp_value(LinearD(dims, scale=2.0), real, fake) == pytest.approx(1.0, rel=1e-5)
    assert gp_value(LinearD(dims, scale=0.5), real, fake) == pytest.approx(0.25, rel=1e-5)


def test_gradient_penalty_uses_all_tuple_parts():
    """A D whose unit gradient lies on z only: the norm must include z's gradient."""
    torch.manual_seed(0)
    real, fake = _tuples()
    d = LinearD((16, 3, 6))
    with torch.no_grad():
        d.w.zero_()
        d.w[16] = 1.0
    assert gp_value(d, real, fake) == pytest.approx(0.0, abs=1e-6)


def test_gradient_penalty_interpolates_and_backpropagates_to_d():
    torch.manual_seed(0)
    real, fake = _tuples()
    seen = []

    class Probe(LinearD):
        def forward(self, x, z=None, c=None):
            seen.append((x, z, c))
            return (torch.cat([x.flatten(1), z, c], 1) @ self.w) ** 2  # non-linear: gradient depends on input

    d = Probe((16, 3, 6), scale=1.0)
    gp = gradient_penalty(d, real, fake)
    x, z, c = seen[0]
    eps = (x - fake[0]).flatten(1)[:, 0] / (real[0] - fake[0]).flatten(1)[:, 0]
    assert ((eps >= 0) & (eps <= 1)).all() and eps.unique().numel() == 5  # one epsilon per sample
    torch.testing.assert_close(z, eps[:, None] * real[1] + (1 - eps[:, None]) * fake[1])
    torch.testing.assert_close(c.sum(1), torch.ones(5))  # interpolated probabilities stay probabilities
    gp.backward()
    assert d.w.grad is not None and d.w.grad.abs().sum() > 0
    assert all(t.grad is None for t in (*real[1:], *fake[1:]))  # inputs are detached


def test_gradient_penalty_rejects_mismatched_tuples():
    real, fake = _tuples()
    with pytest.raises(ValueError, match="part z"):
        gradient_penalty(LinearD((16, 3, 6)), real, (fake[0], None, fake[2]))


def test_gradient_penalty_runs_through_the_real_discriminator():
    """Double backward through spectral norm and in-place LeakyReLU of ``ours`` D."""
    torch.manual_seed(0)
    m = build_models(ModelConfig(kind="bicogan", width=0.25, z_dim=8), 6)
    b = 3
    real = (torch.rand(b, 1, 48, 48) * 2 - 1, torch.randn(b, 8), torch.softmax(torch.randn(b, 6), 1))
    fake = (torch.rand(b, 1, 48, 48) * 2 - 1, torch.randn(b, 8), F.one_hot(torch.tensor([0, 1, 2]), 6).float())
    gp = gradient_penalty(m.D, real, fake)
    assert torch.isfinite(gp) and gp > 0
    gp.backward()
    # Every weight shapes D's input gradient; only the last layer's bias cannot.
    assert [n for n, p in m.D.named_parameters() if p.grad is None] == ["joint.2.bias"]


# ----------------------------------------------------------------------------- clipping
def test_clip_weights_bounds_every_parameter():
    torch.manual_seed(0)
    d = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    with torch.no_grad():
        d[0].weight.mul_(100)
        small = d[2].bias.clone().clamp(-0.001, 0.001)
        d[2].bias.copy_(small)
    clip_weights_(d, 0.01)
    assert all(p.abs().max() <= 0.01 for p in d.parameters())
    assert (d[0].weight.abs() == 0.01).any()
    torch.testing.assert_close(d[2].bias, small)  # values inside the bound are untouched


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, field", [
    ({"loss": "lsgan"}, "loss.loss"),
    ({"gp_weight": -1.0}, "loss.gp_weight"),
    ({"clip_value": 0.0}, "loss.clip_value"),
    ({"efl_alpha": float("inf")}, "loss.efl_alpha"),
    ({"efl_phi": -2.0}, "loss.efl_phi"),
    ({"latent_weight": -0.5}, "loss.latent_weight"),
])
def test_loss_config_rejects_bad_values_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        LossConfig(**kw)


def test_loss_config_defaults_and_from_dict():
    cfg = LossConfig()
    assert (cfg.loss, cfg.gp_weight, cfg.clip_value, cfg.efl_alpha, cfg.efl_rho, cfg.efl_phi) == \
        ("hinge", 10.0, 0.01, 5.0, 0.25, 10.0)
    assert (cfg.latent_weight, cfg.mode_seeking_weight, cfg.mode_seeking_pool) == (0.1, 0.0, 1)
    assert from_dict(LossConfig, {"loss": "bce", "efl_rho": "0.5"}).efl_rho == 0.5
    with pytest.raises(ConfigError):
        from_dict(LossConfig, {"loss": "lsgan"})


def test_latent_cycle_loss_is_mse_per_dimension():
    z = torch.randn(8, 16)
    assert latent_cycle_loss(z.clone(), z) == 0
    torch.testing.assert_close(latent_cycle_loss(z + 2.0, z), torch.tensor(4.0))
    half = latent_cycle_loss(z.to(torch.bfloat16), z)
    assert half.dtype == torch.float32 and half < 1e-3
