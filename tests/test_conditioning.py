"""The conditioning options of the one network builder and loss module, and the class-fidelity metrics.

- class-conditional BatchNorm in G (``model.g_conditioning=cbn``): c changes G's output through
  every block, z alone enters the first layer;
- projection D (``model.d_conditioning=projection``): the class embedding enters the score only as
  <embed(c), phi(x)>, and its gradient reaches the embedding;
- DiffAugment (``loss.diffaugment``): exact flip, translation and cutout, differentiable, reproducible;
- E's augmented emotion view (``loss.efl_augment``) and the reconstruction of real faces
  (``loss.recon_weight``): what ``GeneratorEncoder`` computes and where the gradients go;
- E's emotion branch (``model.e_emotion=branch``): it reads the augmented view, the z trunk reads
  the faces and the fakes, and the emotion loss no longer trains the z trunk;
- intra-class diversity: 0 for identical faces, about 1 for two samples of one distribution.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bicogan_dist.config import ConfigError, from_dict
from bicogan_dist.evaluate.metrics import mean_pairwise_distance
from bicogan_dist.models import diffaugment
from bicogan_dist.models.losses import LossConfig
from bicogan_dist.models.networks import (ConditionalBatchNorm2d, ModelConfig, build_models,
                                          config_from_description, describe)

N_CLS = 6
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def models(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kw.pop("kind", "bicogan"), width=0.25, z_dim=16, channels_last=False, **kw)
    return cfg, build_models(cfg, N_CLS)


# ----------------------------------------------------------------------------- G: conditional BatchNorm
def test_cbn_generator_takes_z_alone_and_modulates_every_batchnorm():
    cfg, m = models(g_conditioning="cbn")
    assert m.G.fc.in_features == cfg.z_dim  # the class does not enter the input layer
    cbns = [mod for mod in m.G.modules() if isinstance(mod, ConditionalBatchNorm2d)]
    assert len(cbns) == 3 and all(b.gain is not None and not b.bn.affine for b in cbns)
    _, concat = models(g_conditioning="concat")
    assert concat.G.fc.in_features == 2 * cfg.z_dim


@pytest.mark.parametrize("g_conditioning", ["cbn", "concat"])
def test_changing_only_c_changes_the_generated_face(g_conditioning):
    _, m = models(g_conditioning=g_conditioning)
    m.G.eval()
    z = torch.randn(6, 16).repeat(2, 1)
    c = torch.cat([torch.zeros(6, dtype=torch.long), torch.arange(6)])
    with torch.no_grad():
        out = m.G(z, c)
        single = m.G(z[:1], c[:1])[0]
    assert torch.allclose(out[0], single, atol=1e-5)  # eval mode: no batch statistics
    diffs = (out[:6] - out[6:]).abs().flatten(1).amax(1)
    assert diffs[0] == 0 and (diffs[1:] > 1e-3).all()  # same c, same face; other c, other face


def test_cbn_class_gradient_reaches_the_shared_embedding_and_every_layer():
    _, m = models(g_conditioning="cbn")
    out = m.G(torch.randn(8, 16), torch.arange(8) % N_CLS)
    out.square().mean().backward()
    assert m.G.embed.weight.grad is not None and m.G.embed.weight.grad.abs().sum() > 0
    for mod in m.G.modules():
        if isinstance(mod, ConditionalBatchNorm2d):
            assert mod.gain.weight.grad.abs().sum() > 0 and mod.bias.weight.grad.abs().sum() > 0


def test_unconditional_kinds_use_plain_affine_batchnorm():
    _, m = models(kind="bigan", g_conditioning="cbn")
    cbns = [mod for mod in m.G.modules() if isinstance(mod, ConditionalBatchNorm2d)]
    assert cbns and all(b.gain is None and b.bn.affine for b in cbns)
    assert m.G(torch.randn(2, 16), None).shape == (2, 1, 48, 48)


# ----------------------------------------------------------------------------- D: projection
def test_projection_score_is_joint_score_plus_inner_product_with_the_class_embedding():
    cfg, m = models(d_conditioning="projection")
    D = m.D.eval()
    assert D.joint[0].in_features == 2 * 8 * cfg.base_channels  # x and z features, no c
    x, z = torch.rand(4, 1, 48, 48) * 2 - 1, torch.randn(4, 16)
    c = F.one_hot(torch.tensor([0, 1, 2, 3]), N_CLS).float()
    phi = D.x_net(x)
    joint = D.joint(torch.cat([phi, D.z_net(z)], 1)).squeeze(1)
    expected = joint + (D.c_net(c) * phi).sum(1)
    assert torch.allclose(D(x, z, c), expected, atol=1e-5)
    # changing only c moves the score by exactly the difference of the projections
    c2 = F.one_hot(torch.tensor([5, 5, 5, 5]), N_CLS).float()
    assert torch.allclose(D(x, z, c2) - D(x, z, c), ((D.c_net(c2) - D.c_net(c)) * phi).sum(1), atol=1e-5)


def test_projection_gradient_reaches_the_class_embedding():
    _, m = models(d_conditioning="projection")
    c = F.one_hot(torch.arange(4) % N_CLS, N_CLS).float()
    m.D(torch.rand(4, 1, 48, 48), torch.randn(4, 16), c).sum().backward()
    emb = m.D.c_net.parametrizations.weight.original.grad
    assert emb is not None and emb.abs().sum() > 0


@pytest.mark.parametrize("spectral_norm, d_batchnorm", [(True, False), (False, True)])
def test_deeper_d_adds_a_3x3_conv_per_stage_keeps_shapes_and_trains_every_conv(spectral_norm, d_batchnorm):
    """``model.d_depth=2``: after each 4x4 stride-2 conv a 3x3 stride-1 conv of the same width (SNGAN's CNN D),
    with D's spectral norm or BatchNorm on it too; the x features keep their size, so nothing else changes."""
    _, one = models(spectral_norm=spectral_norm, d_batchnorm=d_batchnorm)
    cfg2, two = models(d_depth=2, spectral_norm=spectral_norm, d_batchnorm=d_batchnorm)
    convs = [m for m in two.D.x_net if isinstance(m, torch.nn.Conv2d)]
    C = cfg2.base_channels
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in convs] == [
        (1, C, (4, 4), (2, 2)), (C, C, (3, 3), (1, 1)), (C, 2 * C, (4, 4), (2, 2)), (2 * C, 2 * C, (3, 3), (1, 1)),
        (2 * C, 4 * C, (4, 4), (2, 2)), (4 * C, 4 * C, (3, 3), (1, 1))]
    assert [m for m in one.D.x_net if isinstance(m, torch.nn.Conv2d)][0].stride == (2, 2)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in one.D.x_net) == 3
    assert all(hasattr(m, "parametrizations") == spectral_norm for m in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in two.D.x_net) == (5 if d_batchnorm else 0)
    assert two.E.features[0].stride == (2, 2) and sum(  # E's z trunk is not D's: unchanged
        isinstance(m, torch.nn.Conv2d) for m in two.E.features) == 3
    x, z = torch.rand(4, 1, 48, 48) * 2 - 1, torch.randn(4, 16)
    c = F.one_hot(torch.arange(4) % N_CLS, N_CLS).float()
    assert two.D.x_net(x).shape == one.D.x_net(x).shape == (4, 8 * C)
    two.D(x, z, c).sum().backward()
    for m in convs:
        w = m.parametrizations.weight.original if spectral_norm else m.weight
        assert w.grad is not None and w.grad.abs().sum() > 0
    emb = two.D.c_net.parametrizations.weight.original if spectral_norm else two.D.c_net.weight
    assert emb.grad.abs().sum() > 0  # the projection still trains


def test_d_depth_validated_and_old_sections_read_as_one_conv_per_stage():
    for bad in (0, 5, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=f"model.d_depth must be an integer from 1 to 4 .*got {bad!r}"):
            ModelConfig(d_depth=bad)
    desc = describe(ModelConfig(width=0.25, d_depth=2), N_CLS)
    assert config_from_description(desc).d_depth == 2
    old = {k: v for k, v in desc["config"].items() if k != "d_depth"}  # written before the option
    assert config_from_description({"config": old}).d_depth == 1


def test_concat_d_feeds_c_into_the_joint_mlp():
    cfg, m = models(d_conditioning="concat")
    assert m.D.joint[0].in_features == 3 * 8 * cfg.base_channels


def test_conditioning_options_validated_and_described():
    with pytest.raises(ConfigError, match="model.g_conditioning: 'film' is not one of"):
        ModelConfig(g_conditioning="film")
    with pytest.raises(ConfigError, match="d_conditioning: 'aux' is not one of"):
        from_dict(ModelConfig, {"d_conditioning": "aux"})
    desc = describe(ModelConfig(width=0.25), N_CLS)
    assert (desc["generator_conditioning"], desc["discriminator_conditioning"]) == ("concat", "projection")
    # an export written before the options existed describes concatenating networks
    old = {k: v for k, v in desc["config"].items() if k not in ("g_conditioning", "d_conditioning")}
    assert (config_from_description({"config": old}).g_conditioning,
            config_from_description({"config": old}).d_conditioning) == ("concat", "concat")


# ----------------------------------------------------------------------------- DiffAugment
def params(ops, b=4, seed=0):
    return diffaugment.sample(ops, b, 48, torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_translation_shifts_by_whole_pixels_with_zero_fill():
    x = torch.rand(3, 1, 48, 48)
    p = diffaugment.DiffAugmentParams(shift=torch.tensor([[2, -3], [0, 0], [-6, 6]]), centre=None)
    out = diffaugment.apply(x, p)
    assert torch.equal(out[0, :, 2:, :45], x[0, :, :46, 3:]) and (out[0, :, :2] == 0).all()
    assert (out[0, :, :, 45:] == 0).all()
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[2, :, :42, 6:], x[2, :, 6:, :42])
    assert params(["translation"], b=1000).shift.abs().max() == 6  # 1/8 of 48


def test_cutout_zeroes_one_square_of_half_the_side():
    x = torch.ones(2, 1, 48, 48)
    p = diffaugment.DiffAugmentParams(shift=None, centre=torch.tensor([[24, 24], [0, 47]]))
    out = diffaugment.apply(x, p)
    assert int((out[0] == 0).sum()) == 23 * 23  # |y - 24| < 12 and |x - 24| < 12
    assert (out[0, 0, 13:36, 13:36] == 0).all() and out[0, 0, 12, 24] == 1
    assert int((out[1] == 0).sum()) == 12 * 12  # clipped at the corner


def test_diffaugment_is_differentiable_reproducible_and_off_when_empty():
    x = torch.rand(4, 1, 48, 48, requires_grad=True)
    out = diffaugment.apply(x, params(["translation", "cutout"]))
    out.sum().backward()
    assert x.grad is not None and 0 < x.grad.sum() < x.numel()  # moved-out and cut pixels get no gradient
    a, b, c = params(["translation", "cutout"], seed=3), params(["translation", "cutout"], seed=3), params(
        ["translation", "cutout"], seed=4)
    assert torch.equal(a.shift, b.shift) and torch.equal(a.centre, b.centre) and not torch.equal(a.shift, c.shift)
    y = torch.rand(2, 1, 48, 48)
    assert diffaugment.apply(y, params([], b=2)) is y


def test_flip_mirrors_exactly_the_flagged_images_and_about_half_of_them():
    x = torch.rand(3, 1, 48, 48)
    out = diffaugment.apply(x, diffaugment.DiffAugmentParams(flip=torch.tensor([True, False, True])))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1]) and torch.equal(out[2], x[2].flip(-1))
    flags = params(["flip"], b=2000).flip
    assert flags.dtype == torch.bool and 900 < int(flags.sum()) < 1100
    assert params(["flip"], b=2000).shift is None


def test_loss_config_validates_the_new_keys():
    assert LossConfig().diffaugment == [] and LossConfig().real_emotion == "label"
    assert LossConfig(diffaugment=["translation", "cutout"]).diffaugment == ["translation", "cutout"]
    with pytest.raises(ConfigError, match="loss.diffaugment"):
        LossConfig(diffaugment=["color"])
    with pytest.raises(ConfigError, match="loss.real_emotion: 'soft' is not one of"):
        LossConfig(real_emotion="soft")
    assert LossConfig().efl_augment == ["translation", "cutout"] and LossConfig().recon_weight == 1.0
    assert LossConfig(efl_augment=[], recon_weight=0).efl_augment == []
    with pytest.raises(ConfigError, match=r"^loss.efl_augment: \['rotate'\] must be a list drawn from"):
        LossConfig(efl_augment=["rotate"])
    with pytest.raises(ConfigError, match=r"^loss.recon_weight must be >= 0, got -1.0"):
        LossConfig(recon_weight=-1)


# ----------------------------------------------------------------------------- E's augmented view, reconstruction
def generator_encoder(**model):
    from bicogan_dist.train.engine_base import GeneratorEncoder

    _, m = models(**model)
    return m, GeneratorEncoder(m.G, m.E)


def test_efl_view_gives_the_emotion_logits_while_z_hat_stays_the_plain_images():
    m, ge = generator_encoder(e_emotion="shared")  # one call over both views (the branch: test below)
    z, c, x = torch.randn(4, 16), torch.arange(4), torch.rand(4, 1, 48, 48) * 2 - 1
    x_view = diffaugment.apply(x, params(["flip", "translation", "cutout"]))
    out = ge(z, c, x, x_efl=x_view)
    with torch.no_grad():
        z_plain, c_plain = m.E(x)
        _, c_view = m.E(x_view)
    assert torch.allclose(out.z_hat, z_plain, atol=1e-5) and torch.allclose(out.c_logits, c_view, atol=1e-5)
    assert not torch.allclose(out.c_logits, c_plain, atol=1e-3)
    assert out.z_rec is None and out.recon is None
    plain = ge(z, c, x)
    assert torch.allclose(plain.c_logits, c_plain, atol=1e-5)


@pytest.mark.parametrize("e_emotion", ["shared", "branch"])
def test_reconstruction_is_g_of_e_z_and_its_gradient_reaches_e_z_and_g_but_not_the_emotion_path(e_emotion):
    from bicogan_dist.models.losses import reconstruction_loss

    m, ge = generator_encoder(e_emotion=e_emotion)
    ge.eval()  # no batch statistics: G(z_hat, y) must equal a separate call
    z, c, x, y = torch.randn(4, 16), torch.arange(4), torch.rand(4, 1, 48, 48) * 2 - 1, torch.tensor([5, 4, 3, 2])
    out = ge(z, c, x, reconstruct=True, c_recon=y)
    with torch.no_grad():
        expected = m.G(m.E(x)[0], y)
    assert out.recon.shape == x.shape and torch.allclose(out.recon, expected, atol=1e-5)
    loss = reconstruction_loss(out.recon, x)
    assert float(loss.detach()) == pytest.approx(float((expected - x).abs().mean()), rel=1e-5)
    loss.backward()
    assert m.E.z_head.weight.grad.abs().sum() > 0 and m.G.fc.weight.grad.abs().sum() > 0
    emotion_path = m.E.c_head if e_emotion == "shared" else m.E.emotion
    assert all(p.grad is None for p in emotion_path.parameters())  # y, not E's emotion, conditions it


# ----------------------------------------------------------------------------- E's emotion branch
def branch_inputs():
    z, c, x = torch.randn(4, 16), torch.arange(4), torch.rand(4, 1, 48, 48) * 2 - 1
    return z, c, x, diffaugment.apply(x, params(["flip", "translation", "cutout"]))


def test_emotion_branch_reads_the_view_while_the_z_trunk_reads_faces_and_fakes():
    from bicogan_dist.train.engine_base import GeneratorEncoder

    _, m = models(e_emotion="branch")
    assert m.E.c_head is None and m.E.emotion is not None
    ge = GeneratorEncoder(m.G, m.E).eval()  # no dropout, running statistics: outputs comparable call by call
    z, c, x, x_view = branch_inputs()
    out = ge(z, c, x, x_efl=x_view, encode_fake=True)
    with torch.no_grad():
        assert torch.allclose(out.z_hat, m.E.z_head(m.E.features(x)), atol=1e-5)
        assert torch.allclose(out.c_logits, m.E.emotion(x_view), atol=1e-7)
        assert torch.allclose(out.z_rec, m.E.z_head(m.E.features(out.fake)), atol=1e-5)
        z_plain, c_plain = m.E(x)  # what evaluation and sampling call: both from the same faces
        assert torch.allclose(z_plain, out.z_hat, atol=1e-5) and torch.allclose(c_plain, m.E.emotion(x), atol=1e-5)
    # an untrained branch answers nearly alike for every face: the views still give different logits
    assert out.c_logits.shape == (4, N_CLS) and (out.c_logits - c_plain).abs().max() > 1e-5


@pytest.mark.parametrize("e_emotion", ["shared", "branch"])
def test_the_emotion_loss_trains_the_z_trunk_only_when_shared(e_emotion):
    from bicogan_dist.train.engine_base import GeneratorEncoder

    _, m = models(e_emotion=e_emotion)
    z, c, x, x_view = branch_inputs()
    F.cross_entropy(GeneratorEncoder(m.G, m.E)(z, c, x, x_efl=x_view).c_logits, c).backward()
    trunk = [p.grad for p in m.E.features.parameters()]
    if e_emotion == "shared":
        assert all(g is not None and g.abs().sum() > 0 for g in trunk)
    else:
        assert all(g is None for g in trunk) and m.E.z_head.weight.grad is None
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.E.emotion.parameters())


def test_encoding_fakes_leaves_the_emotion_branch_statistics_alone():
    _, m = models(e_emotion="branch")
    bns = [mod for mod in m.E.emotion.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert len(bns) == 8
    before = [b.running_mean.clone() for b in bns]
    m.E.train().encode_z(torch.rand(4, 1, 48, 48) * 2 - 1)
    assert all(torch.equal(a, b.running_mean) for a, b in zip(before, bns))
    z, _, x, x_view = branch_inputs()
    m.E.encode_views(x, x_view)
    assert not torch.equal(before[0], bns[0].running_mean)  # the real view does move them


def test_emotion_branch_is_the_default_where_e_reads_emotions_and_old_exports_read_as_shared():
    with pytest.raises(ConfigError, match="model.e_emotion: 'deep' is not one of"):
        ModelConfig(e_emotion="deep")
    assert ModelConfig().e_emotion == "branch" and ModelConfig().emotion_branch
    for kind in ("bigan", "cgan", "gan"):  # no emotion output from E: nothing to branch
        cfg, m = models(kind=kind)
        assert not cfg.emotion_branch and describe(cfg, N_CLS)["encoder_emotion"] is None
        assert m.E is None or (m.E.emotion is None and m.E.c_head is None)
    paper = ModelConfig(arch="paper")  # the paper's E has its head on the trunk, as published
    assert not paper.emotion_branch and describe(paper, N_CLS)["encoder_emotion"] == "shared"
    assert build_models(paper, N_CLS).E.c_head is not None
    desc = describe(ModelConfig(width=0.25), N_CLS)
    assert desc["encoder_emotion"] == "branch" and config_from_description(desc).e_emotion == "branch"
    old = {k: v for k, v in desc["config"].items() if k != "e_emotion"}  # an export written before the option
    assert config_from_description({"config": old}).e_emotion == "shared"


# ----------------------------------------------------------------------------- E reading the fakes
@pytest.mark.parametrize("arch, e_emotion", [("ours", "branch"), ("ours", "shared"), ("paper", "shared")])
def test_fake_emotion_loss_is_e_eval_cross_entropy_and_trains_g_alone(arch, e_emotion):
    from bicogan_dist.models.losses import fake_emotion_loss

    if arch == "paper":
        torch.manual_seed(0)
        m = build_models(ModelConfig(arch="paper", z_dim=16, channels_last=False), N_CLS)
    else:
        _, m = models(e_emotion=e_emotion)
    m.train()
    z, c = torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 4, 5])
    fake = m.G(z, c)
    bns = [mod for mod in m.E.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    stats = [b.running_mean.clone() for b in bns]
    loss = fake_emotion_loss(m.E, fake, c)
    # E as it classifies at evaluation: running statistics, no dropout; and left in training mode, trainable
    assert m.E.training and all(p.requires_grad for p in m.E.parameters())
    assert all(torch.equal(a, b.running_mean) for a, b in zip(stats, bns))
    m.E.eval()
    with torch.no_grad():
        expected = F.cross_entropy(m.E(fake.detach())[1], c)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in m.E.parameters())  # no private code for E to learn from the fakes
    assert all(p.grad is not None for p in m.G.parameters()) and m.G.fc.weight.grad.abs().sum() > 0


def test_fake_emotion_term_leaves_e_gradients_to_its_real_view():
    """In one graph with the emotion loss on the real view (as the trainer sums them), E's gradients are those of
    the real view alone, and G's those of the fake term alone."""
    from bicogan_dist.models.losses import fake_emotion_loss
    from bicogan_dist.train.engine_base import GeneratorEncoder

    _, m = models(e_emotion="branch")
    ge = GeneratorEncoder(m.G, m.E)
    z, c, x, x_view = branch_inputs()
    y = torch.tensor([3, 2, 1, 0])
    start = copy.deepcopy(m.state_dict())  # each forward of the real view moves the branch's running statistics

    def grads(with_fake: bool, with_real: bool) -> dict[str, torch.Tensor]:
        m.load_state_dict(start)
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the branch's dropout masks
        out = ge(z, c, x, x_efl=x_view)
        loss = (F.cross_entropy(out.c_logits, y) if with_real else 0) + \
            (fake_emotion_loss(m.E, out.fake, c) if with_fake else 0)
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    both, real_only, fake_only = grads(True, True), grads(False, True), grads(True, False)
    e_keys = {n for n in both if n.startswith("E.")}
    assert e_keys == set(real_only) and e_keys and not any(n.startswith("E.") for n in fake_only)
    assert all(torch.allclose(both[n], real_only[n], atol=1e-6) for n in e_keys)
    assert all(torch.allclose(both[n], fake_only[n], atol=1e-7) for n in fake_only)  # G's, from the fakes


def test_fake_emotion_weight_validated_default_and_off_in_the_papers_model():
    from bicogan_dist.train.config import load_config

    assert LossConfig().fake_emotion_weight == 0.1
    paper_path = Path(__file__).resolve().parents[1] / "launch_configs" / "experiments" / "bicogan_paper.yaml"
    paper = load_config(paper_path)
    assert paper.loss.fake_emotion_weight == 0.0
    assert load_config(paper_path.parent / "quickstart.yaml").loss.fake_emotion_weight == 0.1
    assert LossConfig(fake_emotion_weight=1).fake_emotion_weight == 1.0
    with pytest.raises(ConfigError, match=r"^loss.fake_emotion_weight must be >= 0, got -0.5"):
        LossConfig(fake_emotion_weight=-0.5)
    with pytest.raises(ConfigError, match=r"^loss.fake_emotion_weight must be a finite number, got 'x'"):
        LossConfig(fake_emotion_weight="x")


# ----------------------------------------------------------------------------- diversity metric
def test_mean_pairwise_distance_known_cases():
    assert mean_pairwise_distance(torch.ones(10, 4)) == 0.0  # identical faces: no diversity
    assert mean_pairwise_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    pts = torch.tensor([[0.0], [1.0], [3.0]])
    assert mean_pairwise_distance(pts) == pytest.approx((1 + 3 + 2) / 3)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(800, 16, generator=gen), torch.randn(800, 16, generator=gen)
    assert mean_pairwise_distance(a) / mean_pairwise_distance(b) == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance(torch.ones(1, 3))


# ----------------------------------------------------------------------------- mode seeking
def test_mode_seeking_loss_is_latent_over_image_distance_of_interleaved_pairs():
    from bicogan_dist.models.losses import mode_seeking_loss

    # pairs (0, 1) and (2, 3): |z1 - z2| mean = (1 + 1 + 1 + 3) / 4 = 1.5
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [1.0, 3.0]])
    fake = torch.zeros(4, 1, 2, 2)
    fake[1::2] = 0.5  # every pixel differs by 0.5 within each pair
    assert float(mode_seeking_loss(fake, z)) == pytest.approx(1.5 / 0.5, rel=1e-4)
    same = mode_seeking_loss(torch.zeros(4, 1, 2, 2), z)  # G ignoring z: the loss explodes
    assert float(same) > 1e4
    g = torch.zeros(4, 1, 2, 2, requires_grad=True)
    (mode_seeking_loss(g + fake, z)).backward()
    assert g.grad[0::2].sum() > 0 > g.grad[1::2].sum()  # pushes the members of each pair apart


def test_pooled_mode_seeking_ignores_pixel_noise_that_averages_out():
    from bicogan_dist.models.losses import LossConfig, mode_seeking_loss

    z = torch.tensor([[0.0], [1.0]])
    checker = (torch.arange(4).view(1, 4) + torch.arange(4).view(4, 1)) % 2 * 2.0 - 1.0  # +-1 pixel noise
    fake = torch.stack([checker, -checker]).unsqueeze(1)  # the pair differs everywhere by 2, in texture only
    assert float(mode_seeking_loss(fake, z)) == pytest.approx(1.0 / 2.0, rel=1e-4)
    assert float(mode_seeking_loss(fake, z, pool=2)) > 1e4  # pooled, the two are the same image
    with pytest.raises(ConfigError, match="loss.mode_seeking_pool"):
        LossConfig(mode_seeking_pool=5)


# ----------------------------------------------------------------------------- ADC-GAN head
def test_adc_head_targets_real_k_and_fake_k():
    from bicogan_dist.models.losses import adc_d_loss, adc_g_loss

    k = N_CLS
    y = torch.tensor([0, 3, 5])
    perfect_real = F.one_hot(y, 2 * k).float() * 50  # real face of emotion y read as class y
    perfect_fake = F.one_hot(y + k, 2 * k).float() * 50  # fake asked for y read as class K + y
    assert float(adc_d_loss(perfect_real, y, perfect_fake, y)) == pytest.approx(0.0, abs=1e-6)
    swapped = float(adc_d_loss(perfect_fake, y, perfect_real, y))
    assert swapped > 40  # the other way round is maximally wrong
    # G wants its fakes read as real-k: lowest when they are, highest when D sees through them
    assert float(adc_g_loss(perfect_real, y)) < -40 < 40 < float(adc_g_loss(perfect_fake, y))


def test_adc_head_is_part_of_d_and_gets_gradient():
    cfg, m = models(d_class_head=True)
    assert m.D.class_head is not None
    c = F.one_hot(torch.arange(4) % N_CLS, N_CLS).float()
    score, logits = m.D(torch.rand(4, 1, 48, 48), torch.randn(4, 16), c, with_class_logits=True)
    assert score.shape == (4,) and logits.shape == (4, 2 * N_CLS)
    logits.sum().backward()
    assert m.D.class_head.parametrizations.weight.original.grad.abs().sum() > 0
    _, plain = models()
    with pytest.raises(ValueError, match="d_class_head"):
        plain.D(torch.rand(2, 1, 48, 48), torch.randn(2, 16), c[:2], with_class_logits=True)
    with pytest.raises(ConfigError, match="model.d_class_head"):
        ModelConfig(kind="bigan", d_class_head=True)


def test_adc_weight_needs_the_head():
    from bicogan_dist.train.config import load_config

    with pytest.raises(ConfigError, match="loss.adc_weight: needs model.d_class_head"):
        load_config(None, ["loss.adc_weight=1"])
    assert load_config(None, ["loss.adc_weight=1", "model.d_class_head=true"]).loss.adc_weight == 1.0


# ----------------------------------------------------------------------------- batch arrangement
def test_batches_sorted_by_emotion_keep_pairs_and_put_one_emotion_in_each_mbstd_group():
    from bicogan_dist.train.trainer import arrange_batch

    y = torch.tensor([3, 0, 3, 1, 0, 3, 1, 0])
    x = y.view(-1, 1, 1, 1).float() * 10 + torch.arange(8).view(-1, 1, 1, 1)  # each image remembers its label
    xs, ys, c = arrange_batch(x, y, sort_by_emotion=True, pair_fakes=True)
    assert ys.tolist() == [0, 0, 0, 1, 1, 3, 3, 3]
    assert torch.equal(xs.view(-1).div(10).floor().long(), ys)  # images moved with their labels
    assert c.tolist() == [0, 0, 0, 0, 1, 1, 3, 3]  # pairs (2i, 2i + 1) share an emotion
    assert torch.equal(c[0::2], c[1::2])
    _, same_y, same_c = arrange_batch(x, y, sort_by_emotion=False, pair_fakes=False)
    assert torch.equal(same_y, y) and same_c is same_y
