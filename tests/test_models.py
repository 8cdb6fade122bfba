"""Contracts of the networks: shapes, ranges, None-ness, structure of the paper arch, gradient flow."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bicogan_dist.config import ConfigError, from_dict
from bicogan_dist.models.losses import LossConfig, d_loss, efl_loss, ge_loss
from bicogan_dist.models.networks import (KINDS, KerasSameConv2d, MinibatchStd, ModelConfig, build_models,
                                          config_from_description, count_parameters, describe)

N_CLS = 6
COMBOS = [(kind, arch) for arch in ("ours", "paper") for kind in KINDS]


def small_cfg(kind: str, arch: str, **kw) -> ModelConfig:
    """Cheap configs: ours at width 0.25; paper at its fixed widths with a small z."""
    if arch == "ours":
        kw.setdefault("width", 0.25)
    return ModelConfig(kind=kind, arch=arch, z_dim=kw.pop("z_dim", 16), **kw)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(kind: str, arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = small_cfg(kind, arch, **kw)
    return cfg, build_models(cfg, N_CLS)


_CACHE: dict[tuple[str, str], tuple] = {}


def cached(kind: str, arch: str):
    """One build per (kind, arch) for the read-only contract tests (the paper's D is ~10 M
    parameters with spectral-norm-free init, ours registers spectral norm: both cost time)."""
    if (kind, arch) not in _CACHE:
        _CACHE[(kind, arch)] = make(kind, arch)
    cfg, m = _CACHE[(kind, arch)]
    m.train()
    m.zero_grad(set_to_none=True)
    return cfg, m


def batch(arch: str) -> int:
    return 2 if arch == "paper" else 3


def tuples(cfg: ModelConfig, models, b: int = 4, x: torch.Tensor | None = None):
    """Real and fake (x, z, c) tuples as the trainer builds them."""
    x = torch.rand(b, 1, 48, 48) * 2 - 1 if x is None else x
    y = torch.randint(0, N_CLS, (b,))
    z = torch.randn(b, cfg.z_dim)
    fake = models.G(z, y if cfg.conditional else None)
    z_hat, logits = models.E(x) if models.E is not None else (None, None)
    c_fake = F.one_hot(y, N_CLS).float() if cfg.conditional else None
    c_real = (logits.softmax(1) if cfg.bidirectional else c_fake) if cfg.conditional else None
    real_t = (x, z_hat, c_real)
    fake_t = (fake, z if cfg.bidirectional else None, c_fake)
    return real_t, fake_t, y, logits


def cat(a, b):
    return tuple(None if p is None else torch.cat([p, q]) for p, q in zip(a, b))


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, field", [
    ({"kind": "vae"}, "model.kind"),
    ({"arch": "resnet"}, "model.arch"),
    ({"z_dim": 0}, "model.z_dim"),
    ({"z_dim": 2.5}, "model.z_dim"),
    ({"width": 0.0}, "model.width"),
    ({"width": -1.0}, "model.width"),
    ({"width": float("nan")}, "model.width"),
    ({"spectral_norm": "yes"}, "model.spectral_norm"),
    ({"arch": "paper", "width": 0.5}, "model.width"),
    ({"arch": "paper", "d_batchnorm": True}, "model.d_batchnorm"),
])
def test_config_rejects_bad_values_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kw)


def test_config_from_dict_and_properties():
    cfg = from_dict(ModelConfig, {"kind": "cgan", "width": "0.5", "z_dim": 32})
    assert (cfg.width, cfg.z_dim, cfg.base_channels) == (0.5, 32, 32)
    with pytest.raises(ConfigError, match="kind: 'vae' is not one of"):
        from_dict(ModelConfig, {"kind": "vae"})
    with pytest.raises(ConfigError, match="model.width"):
        from_dict(ModelConfig, {"width": -1})
    flags = {k: (ModelConfig(kind=k).conditional, ModelConfig(kind=k).bidirectional) for k in KINDS}
    assert flags == {"gan": (False, False), "cgan": (True, False), "bigan": (False, True), "bicogan": (True, True)}
    assert [ModelConfig(width=w).base_channels for w in (1.0, 0.25, 0.01, 1.5)] == [64, 16, 8, 96]


def test_build_rejects_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_models(ModelConfig(width=0.25), 0)


# ----------------------------------------------------------------------------- contracts
@pytest.mark.parametrize("kind, arch", COMBOS)
def test_shapes_ranges_and_none_ness(kind, arch):
    cfg, m = cached(kind, arch)
    assert (m.E is None) == (not cfg.bidirectional)
    b = batch(arch)
    real_t, fake_t, y, logits = tuples(cfg, m, b)
    x_fake = fake_t[0]
    assert x_fake.shape == (b, 1, 48, 48) and x_fake.dtype == torch.float32
    assert x_fake.min() >= -1 and x_fake.max() <= 1
    if cfg.bidirectional:
        z_hat, c_logits = m.E(real_t[0])
        assert z_hat.shape == (b, cfg.z_dim)
        assert (c_logits is None) == (kind == "bigan")
        if kind == "bicogan":
            assert c_logits.shape == (b, N_CLS)
    # G ignores c for unconditional kinds; D ignores the inputs its kind does not use.
    if not cfg.conditional:
        z = torch.randn(b, cfg.z_dim)
        m.G.eval()
        assert torch.equal(m.G(z, None), m.G(z, torch.zeros(b, dtype=torch.long)))
    scores = m.D(*cat(real_t, fake_t))
    assert scores.shape == (2 * b,)


@pytest.mark.parametrize("kind, arch", COMBOS)
def test_d_scores_samples_independently_on_a_concatenated_batch(kind, arch):
    cfg, m = cached(kind, arch)
    real_t, fake_t, *_ = tuples(cfg, m, batch(arch))
    real_t, fake_t = tuple(None if t is None else t.detach() for t in real_t), \
        tuple(None if t is None else t.detach() for t in fake_t)
    m.D.eval()  # no power-iteration step between the calls
    with torch.no_grad():
        joint = m.D(*cat(real_t, fake_t))
        apart = torch.cat([m.D(*real_t), m.D(*fake_t)])
    torch.testing.assert_close(joint, apart, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, arch", COMBOS)
def test_gradients_reach_every_parameter(kind, arch):
    """D's score reaches G and E; a full step leaves no unused parameter (DDP needs that)."""
    cfg, m = cached(kind, arch)
    lc = LossConfig()
    b = batch(arch)
    real_t, fake_t, y, logits = tuples(cfg, m, b)
    scores = m.D(*cat(real_t, fake_t))
    loss = ge_loss(lc, scores[:b] if cfg.bidirectional else None, scores[b:])
    if kind == "bicogan":
        loss = loss + efl_loss(logits, y)
    loss.backward()
    for name, net in (("G", m.G), ("E", m.E), ("D", m.D)):
        if net is None:
            continue
        missing = [n for n, p in net.named_parameters() if p.grad is None]
        assert not missing, f"{name} parameters without gradient: {missing}"
    assert any(p.grad.abs().sum() > 0 for p in m.G.parameters())
    if m.E is not None:
        assert m.E.z_head.weight.grad.abs().sum() > 0
    # The D loss alone reaches every D parameter too.
    m.zero_grad(set_to_none=True)
    scores = m.D(*cat(tuple(None if t is None else t.detach() for t in real_t),
                      tuple(None if t is None else t.detach() for t in fake_t)))
    d_loss(lc, scores[:b], scores[b:]).backward()
    assert all(p.grad is not None for p in m.D.parameters())
    assert all(p.grad is None for p in m.G.parameters())
    m.zero_grad(set_to_none=True)


def test_missing_inputs_and_bad_c_raise_clear_errors():
    cfg, m = cached("bicogan", "ours")
    x, z = torch.zeros(2, 1, 48, 48), torch.zeros(2, cfg.z_dim)
    with pytest.raises(ValueError, match="G of a 'bicogan' model needs c"):
        m.G(z, None)
    with pytest.raises(ValueError, match="needs z"):
        m.D(x, None, torch.zeros(2, N_CLS))
    with pytest.raises(ValueError, match="probability/one-hot vector"):
        m.D(x, z, torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------- structure
def test_same_config_same_structure_and_seed_fixes_values():
    _, a = make("bicogan", "ours", seed=0)
    _, b = make("bicogan", "ours", seed=1)
    _, c = make("bicogan", "ours", seed=0)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not torch.equal(sa["G.fc.weight"], sb["G.fc.weight"])
    assert {k.split(".")[0] for k in sa} == {"G", "E", "D"}
    _, g = cached("gan", "ours")
    assert g.E is None and {k.split(".")[0] for k in g.state_dict()} == {"G", "D"}


def test_spectral_norm_and_d_batchnorm_switches():
    _, m = cached("bicogan", "ours")
    assert any("parametrizations" in k for k in m.D.state_dict())
    assert not any(isinstance(x, (nn.BatchNorm1d, nn.BatchNorm2d)) for x in m.D.modules())
    _, plain = make("bicogan", "ours", spectral_norm=False, d_batchnorm=True)
    assert not any("parametrizations" in k for k in plain.D.state_dict())
    assert sum(isinstance(x, nn.BatchNorm2d) for x in plain.D.modules()) == 2
    # GroupNorm in E's z trunk (it also encodes fakes); BatchNorm only in the emotion branch, which sees reals only
    assert not any(isinstance(x, (nn.BatchNorm1d, nn.BatchNorm2d)) for x in m.E.features.modules())
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.E.modules()) == sum(
        isinstance(x, nn.BatchNorm2d) for x in m.E.emotion.modules()) == 8


def _convs(module: nn.Module, cls=nn.Conv2d):
    return [m for m in module.modules() if type(m) is cls or (cls is nn.Conv2d and isinstance(m, KerasSameConv2d))]


def test_paper_arch_matches_the_published_layers():
    with torch.device("meta"):  # structure only: no weights to initialise
        m = build_models(ModelConfig(kind="bicogan", arch="paper"), N_CLS)
    G, E, D = m.G, m.E, m.D
    # G: z * Embedding(6, 100) → Dense 12x12x128 → 2 x ConvT(128, 4, s2) → Conv(1, 12x12, same) → tanh
    assert G.embed.weight.shape == (N_CLS, 100)
    assert (G.fc.in_features, G.fc.out_features) == (100, 12 * 12 * 128)
    ups = [x for x in G.modules() if isinstance(x, nn.ConvTranspose2d)]
    assert [(u.out_channels, u.kernel_size, u.stride) for u in ups] == [(128, (4, 4), (2, 2))] * 2
    assert (G.to_img.out_channels, G.to_img.kernel_size, G.to_img.stride) == (1, (12, 12), (1, 1))
    assert sum(isinstance(x, nn.LeakyReLU) and x.negative_slope == 0.2 for x in G.modules()) == 2
    # E: Conv 64/128/256/512 5x5 s2, BN on the last three, Dense 4608 → z and → classes
    convs = _convs(E)
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == \
        [(o, (5, 5), (2, 2)) for o in (64, 128, 256, 512)]
    assert sum(isinstance(x, nn.BatchNorm2d) for x in E.modules()) == 3
    assert (E.z_head.in_features, E.z_head.out_features) == (4608, 100)
    assert (E.c_head.in_features, E.c_head.out_features) == (4608, N_CLS)
    # D: five Conv(128, 5x5), strides 1,2,2,2,2 → flatten 1152 ⊕ z ⊕ Linear(6 → 2304) → Dense(1)
    convs = _convs(D)
    assert [(c.out_channels, c.kernel_size, c.stride[0]) for c in convs] == \
        [(128, (5, 5), s) for s in (1, 2, 2, 2, 2)]
    assert D.x_net(torch.zeros(2, 1, 48, 48, device="meta")).shape == (2, 1152)
    assert (D.c_embed.in_features, D.c_embed.out_features) == (N_CLS, 2304)
    assert (D.out.in_features, D.out.out_features) == (1152 + 100 + 2304, 1)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in D.modules())
    assert not any("parametrizations" in k for k in D.state_dict())  # no spectral norm in the paper's D
    assert m.parameter_counts() == {"G": 2_405_209, "E": 4_793_706, "D": 1_661_925}


def test_paper_arch_omits_what_the_kind_does_not_use():
    with torch.device("meta"):
        gan = build_models(ModelConfig(kind="gan", arch="paper"), N_CLS)
        bigan = build_models(ModelConfig(kind="bigan", arch="paper"), N_CLS)
    assert gan.G.embed is None and gan.E is None and gan.D.c_embed is None
    assert gan.D.out.in_features == 1152
    assert bigan.E.c_head is None and bigan.D.out.in_features == 1152 + 100


def test_keras_same_padding_puts_the_extra_pixel_bottom_right():
    conv = KerasSameConv2d(1, 1, 5, stride=2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # output(i, j) = padded input(2i, 2j) → input(2i - 1, 2j - 1)
        conv.bias.zero_()
    x = torch.arange(48 * 48, dtype=torch.float32).view(1, 1, 48, 48)
    y = conv(x)
    assert y.shape == (1, 1, 24, 24)
    assert y[0, 0, 0, 0] == 0 and y[0, 0, 1, 1] == x[0, 0, 1, 1]  # one pixel of top/left padding
    assert KerasSameConv2d(1, 1, 12)(torch.zeros(1, 1, 48, 48)).shape == (1, 1, 48, 48)


# ----------------------------------------------------------------------------- memory format
@pytest.mark.parametrize("arch", ["ours", "paper"])
def test_channels_last_matches_contiguous(arch):
    cfg, ref = make("bicogan", arch, channels_last=False)
    _, cl = make("bicogan", arch, channels_last=True)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in cl.parameters())
    for m in (ref, cl):
        m.eval()
    x = torch.rand(2, 1, 48, 48)
    z, y = torch.randn(2, cfg.z_dim), torch.tensor([0, 3])
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl.G(z, y), ref.G(z, y), rtol=1e-4, atol=1e-5)
    for a, b in zip(cl.E(x_cl), ref.E(x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    c = F.one_hot(y, N_CLS).float()
    s = cl.D(x_cl.requires_grad_(True), z, c)
    torch.testing.assert_close(s, ref.D(x, z, c), rtol=1e-4, atol=1e-5)
    s.sum().backward()
    assert all(p.grad is not None for p in cl.D.parameters())


# ----------------------------------------------------------------------------- describe
def test_describe_is_json_safe_counts_parameters_and_round_trips():
    cfg = ModelConfig(kind="bicogan", width=0.25, z_dim=16)
    state = torch.random.get_rng_state()
    desc = describe(cfg, N_CLS)
    assert torch.equal(state, torch.random.get_rng_state())  # describing consumes no randomness
    json.dumps(desc)
    assert {"kind", "arch", "z_dim", "width", "num_classes", "parameters", "config"} <= set(desc)
    assert (desc["kind"], desc["arch"], desc["z_dim"], desc["num_classes"]) == ("bicogan", "ours", 16, N_CLS)
    _, m = cached("bicogan", "ours")  # same config as small_cfg("bicogan", "ours"), spectral norm on
    assert m.cfg == cfg
    assert desc["parameters"] == {"G": count_parameters(m.G), "E": count_parameters(m.E),
                                  "D": count_parameters(m.D)}
    again = build_models(config_from_description(json.loads(json.dumps(desc))), N_CLS)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    paper = describe(ModelConfig(kind="gan", arch="paper"), 7)
    assert paper["spectral_norm"] is False and paper["parameters"]["E"] == 0 and paper["num_classes"] == 7


def test_minibatch_std_groups_never_mix_real_and_fake():
    """Groups are consecutive samples: a (real, fake) batch gives each half its own statistic."""
    mb = MinibatchStd(4)
    real = torch.randn(8, 3, 2, 2)
    fake = torch.zeros(8, 3, 2, 2)  # a collapsed generator: no variety at all
    out = mb(torch.cat([real, fake]))
    assert out.shape == (16, 4, 2, 2)
    torch.testing.assert_close(out[:, :3], torch.cat([real, fake]))
    stat = out[:, 3, 0, 0]
    assert (stat[:8] > 0.1).all() and (stat[8:] < 1e-3).all()
    expected = real.reshape(2, 4, 3, 2, 2).var(1, unbiased=False).add(1e-8).sqrt().mean((1, 2, 3))
    torch.testing.assert_close(stat[:8], expected.repeat_interleave(4))
    assert (out[:, 3] == stat[:, None, None]).all()  # one value per sample, tiled over the map
    odd = MinibatchStd(4)(torch.randn(6, 3, 2, 2))  # no group of 4 divides 6: 2 groups of 3
    assert odd[0, 3, 0, 0] == odd[2, 3, 0, 0] and odd[2, 3, 0, 0] != odd[3, 3, 0, 0]
    assert (MinibatchStd(4)(torch.randn(5, 3, 2, 2))[:, 3] < 1e-3).all()  # prime batch: group 1, zero channel


def test_mbstd_group_validated_and_optional():
    with pytest.raises(ConfigError, match="model.mbstd_group"):
        ModelConfig(mbstd_group=-1)
    off = build_models(ModelConfig(width=0.25, mbstd_group=0), N_CLS).D
    assert not any(isinstance(m, MinibatchStd) for m in off.modules())


def test_count_parameters():
    assert count_parameters(None) == 0
    assert count_parameters(nn.Linear(3, 2)) == 8


def test_ours_parameter_counts_are_documented():
    """The counts quoted in the networks module docstring (width 1, 6 classes, z 100)."""
    assert describe(ModelConfig(), N_CLS)["parameters"] == {"G": 2_501_081, "E": 3_934_794, "D": 6_762_433}
    other = ModelConfig(g_conditioning="cbn", d_conditioning="concat", e_emotion="shared")
    assert describe(other, N_CLS)["parameters"] == {"G": 1_668_185, "E": 1_634_218, "D": 7_286_721}
    for width, e_branch, e_shared in ((0.5, 1_216_090, 653_322), (0.25, 420_258, 285_754)):
        assert describe(ModelConfig(width=width), N_CLS)["parameters"]["E"] == e_branch
        assert describe(ModelConfig(width=width, e_emotion="shared"), N_CLS)["parameters"]["E"] == e_shared


# ----------------------------------------------------------------------------- cost
def _full_pass(arch: str, b: int) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(kind="bicogan", arch=arch)
    m = build_models(cfg, N_CLS)
    real_t, fake_t, y, logits = tuples(cfg, m, b)
    s = m.D(*cat(real_t, fake_t))
    (ge_loss(LossConfig(), s[:b], s[b:]) + efl_loss(logits, y)).backward()
    assert torch.isfinite(s).all()


def test_paper_arch_forward_backward_small_batch():
    _full_pass("paper", 4)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ours", "paper"])
def test_forward_backward_at_batch_128(arch):
    """The paper's batch size runs end to end (G, E and D on real+fake); no timing assertion."""
    _full_pass(arch, 128)


@pytest.mark.parametrize("kind", ["gan", "bicogan"])
def test_every_d_takes_the_trainers_with_class_logits_call(kind):
    """The trainer calls D(..., with_class_logits=False) for every arch; the paper's D once lacked the keyword
    (every arch=paper run stopped with a TypeError at step 1)."""
    cfg, m = cached(kind, "paper")
    _, (x, z, c), _, _ = tuples(cfg, m, b=2)
    m.D.eval()  # no dropout: the two calls must agree exactly
    with torch.no_grad():
        assert torch.equal(m.D(x, z, c, with_class_logits=False), m.D(x, z, c))
    with pytest.raises(ValueError, match="no class head"):
        m.D(x, z, c, with_class_logits=True)
