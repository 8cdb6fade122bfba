"""The built-in synthetic expression set: deterministic, well-formed, balanced, split, and learnable."""
from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bicogan_dist.data.synthetic as synthetic
from bicogan_dist.data.synthetic import render_faces, synthetic_records
from bicogan_dist.labels import EmotionLabels


def test_render_is_deterministic_for_a_seed():
    codes = np.arange(130) % 7
    a = render_faces(codes, np.random.default_rng(5))
    b = render_faces(codes, np.random.default_rng(5))
    c = render_faces(codes, np.random.default_rng(6))
    assert a.shape == (130, 48, 48) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 10  # another seed: other faces, not a tweak


def test_records_deterministic_and_well_formed():
    a, b, c = synthetic_records(120, seed=3), synthetic_records(120, seed=3), synthetic_records(120, seed=4)
    assert len(a) == 120
    assert all(np.array_equal(x.pixels, y.pixels) and x.fer_code == y.fer_code and x.split == y.split
               for x, y in zip(a, b))
    assert [x.source for x in a] == [f"synthetic:seed3:i{i}" for i in range(120)]
    assert not all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a, c))
    stack = np.stack([r.pixels for r in a])
    assert stack.shape == (120, 48, 48) and stack.dtype == np.uint8
    # uses the grey range (dark hair, light backgrounds), not a constant image
    assert stack.min() < 30 and stack.max() > 220 and stack.reshape(120, -1).std(axis=1).min() > 10


@pytest.mark.parametrize("labels", [EmotionLabels.six(), EmotionLabels.seven()], ids=["six", "seven"])
def test_classes_balanced_and_every_split_has_every_class(labels):
    n = 60 * labels.num_classes + 5
    records = synthetic_records(n, seed=1, labels=labels)
    per_class = Counter(r.fer_code for r in records)
    assert set(per_class) == set(labels.fer_codes)
    assert max(per_class.values()) - min(per_class.values()) <= 1
    splits = Counter(r.split for r in records)
    assert splits["Training"] / n == pytest.approx(0.8, abs=0.03)
    assert splits["PublicTest"] / n == pytest.approx(0.1, abs=0.03)
    assert splits["PrivateTest"] / n == pytest.approx(0.1, abs=0.03)
    for split in ("Training", "PublicTest", "PrivateTest"):
        assert {r.fer_code for r in records if r.split == split} == set(labels.fer_codes), split
    # classes are shuffled, not in blocks or round robin
    codes = [r.fer_code for r in records[:12]]
    assert codes != sorted(codes) and codes != list(labels.fer_codes) * 2


def test_small_sets_still_have_every_split_per_class():
    records = synthetic_records(18, seed=0)  # three faces per class
    for split in ("Training", "PublicTest", "PrivateTest"):
        assert {r.fer_code for r in records if r.split == split} == set(EmotionLabels.six().fer_codes)


def test_unknown_code_is_refused():
    with pytest.raises(ValueError, match="9"):
        render_faces(np.array([0, 9]), np.random.default_rng(0))


def test_feature_windows_lose_nothing(monkeypatch):
    """Features are drawn only inside per-chunk windows; drawing on the whole image must give identical faces."""
    codes = np.arange(448) % 7
    windowed = render_faces(codes, np.random.default_rng(11))

    def whole_image(self, *bounds):
        self.full()
        return self.rows, self.cols

    monkeypatch.setattr(synthetic._Frame, "window", whole_image)
    assert np.array_equal(render_faces(codes, np.random.default_rng(11)), windowed)


def test_generator_speed():
    """Target >= 5,000 faces/s on one core (measured ~9,500 in CPU time); the bound here is loose: shared CPUs."""
    codes = np.arange(1280) % 6
    best = 0.0
    for i in range(3):
        t = time.process_time()
        render_faces(codes, np.random.default_rng(i))
        best = max(best, len(codes) / max(time.process_time() - t, 1e-9))
    assert best > 1500, f"{best:.0f} faces/s"


def test_a_small_cnn_learns_the_expressions():
    """Learnable, yet not trivial: a 3-layer CNN reaches >= 90% on held-out faces after two epochs.

    (A linear model on raw pixels reaches only ~75%: pose, lighting and identity vary.)
    """
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        labels = EmotionLabels.six()
        records = synthetic_records(3780, seed=0, labels=labels)

        def tensors(split_is_training: bool):
            rs = [r for r in records if (r.split == "Training") == split_is_training]
            x = torch.from_numpy(np.stack([r.pixels for r in rs])).float().div(127.5).sub(1).unsqueeze(1)
            y = torch.tensor([labels.index_of_code(r.fer_code) for r in rs])
            return x, y

        (x_tr, y_tr), (x_te, y_te) = tensors(True), tensors(False)
        assert len(x_tr) >= 3000 and len(x_te) >= 600
        net = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 6 * 6, labels.num_classes))
        opt = torch.optim.Adam(net.parameters(), 3e-3)
        for _epoch in range(2):
            net.train()
            for idx in torch.randperm(len(x_tr)).split(64):
                loss = F.cross_entropy(net(x_tr[idx]), y_tr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            accuracy = (net(x_te).argmax(1) == y_te).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert accuracy >= 0.9, accuracy
