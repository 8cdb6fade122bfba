"""The FER classifier: shapes, augmentation, training on the synthetic set, export round trip."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from bicogan_dist.evaluate.classifier import (FEATURE_SPACE_TEMPLATE, ClassifierConfig, ClassifierTrainConfig,
                                              FERClassifier, LoadedClassifier, as_model_input, augment_batch,
                                              fit_classifier, load_classifier, save_classifier)
from bicogan_dist.labels import EmotionLabels

TINY = ClassifierConfig(widths=(8, 16, 32, 32), feature_dim=32, dropout=0.1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from bicogan_dist.data.synthetic import synthetic_records

    labels = EmotionLabels.six()
    recs = synthetic_records(n, seed=seed, labels=labels)
    x = torch.from_numpy(np.stack([r.pixels for r in recs]))[:, None]
    y = torch.tensor([labels.index_of_code(r.fer_code) for r in recs])
    return x, y


@pytest.fixture(scope="module")
def trained() -> tuple[LoadedClassifier, list[dict], tuple[torch.Tensor, torch.Tensor]]:
    x, y = synthetic(1200, seed=0)
    held = synthetic(300, seed=1)
    cfg = ClassifierTrainConfig(epochs=3, batch_size=64, lr=4e-3, seed=0)
    clf, history = fit_classifier(x, y, list(EmotionLabels.six().names), TINY, cfg, "cpu", watch=held,
                                  progress=False, log=lambda m: None)
    return clf, history, held


def test_shapes_and_feature_space():
    m = FERClassifier(ClassifierConfig()).eval()
    x = torch.rand(3, 1, 48, 48) * 2 - 1
    assert m(x).shape == (3, 6)
    assert m.features(x).shape == (3, 256)
    assert "256-d" in FEATURE_SPACE_TEMPLATE.format(dim=256) and "not Inception" in FEATURE_SPACE_TEMPLATE


def test_as_model_input_rounds_generated_pixels_like_a_png():
    u8 = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    assert torch.equal(as_model_input(u8), as_model_input(as_model_input(u8)))
    assert as_model_input(torch.tensor([-1.0, 1.0])).tolist() == [-1.0, 1.0]


def test_augmentation_identity_and_flip():
    x = torch.rand(4, 1, 48, 48) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    none = ClassifierTrainConfig(flip_p=0, rotate_deg=0, scale=0, translate=0, erase_p=0)
    assert torch.allclose(augment_batch(x, none, gen), x, atol=1e-5)
    flip = ClassifierTrainConfig(flip_p=1, rotate_deg=0, scale=0, translate=0, erase_p=0)
    assert torch.allclose(augment_batch(x, flip, gen), x.flip(-1), atol=1e-5)
    out = augment_batch(x, ClassifierTrainConfig(), gen)
    assert out.shape == x.shape and out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5


def test_training_learns_the_synthetic_expressions(trained):
    clf, history, (hx, hy) = trained
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    pred = clf.predict(hx)
    acc = float((pred == hy).float().mean())
    assert acc > 0.7, f"held-out accuracy {acc:.2f}"  # chance is 1/6
    # Images of one known class are mostly called that class.
    happy = EmotionLabels.six().names.index("happy")
    assert float((pred[hy == happy] == happy).float().mean()) > 0.6


def test_export_round_trip_is_exact(trained, tmp_path):
    clf, history, (hx, _) = trained
    save_classifier(clf, tmp_path / "clf", {"accuracy": {"PrivateTest": 0.5}, "training": {"history": history}})
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert meta["feature_dim"] == 32 and meta["input"]["pixel_range"] == [-1.0, 1.0]
    assert meta["class_names"] == list(EmotionLabels.six().names) and "not Inception" in meta["feature_space"]
    back = load_classifier(tmp_path / "clf")
    assert torch.equal(back.logits(hx[:50]), clf.logits(hx[:50]))
    assert torch.equal(back.features(hx[:50]), clf.features(hx[:50]))
    assert back.features(hx[:5]).shape == (5, 32) and back.path == tmp_path / "clf"
    weights = (tmp_path / "clf" / "classifier.safetensors").read_bytes()
    assert back.weights_sha256 == hashlib.sha256(weights).hexdigest() and clf.weights_sha256 is None


def test_load_rejects_a_folder_that_is_not_a_classifier(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        load_classifier(tmp_path)
