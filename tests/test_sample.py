"""Sampling and editing from exports: determinism, grid geometry, N per class (PNG and shards), interpolation,
emotion transfer from images and shards, and clear errors for what an export cannot do.

Exports come from checkpoints in the trainer's layout (``test_export.make_checkpoint``) converted by
the real exporter; shards come from the shard tool's synthetic faces.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bicogan_dist.export import export_checkpoint, load_export
from bicogan_dist.imaging import to_uint8
from bicogan_dist.cli.sample import main as sample_main
from bicogan_dist.sample import (SampleError, generate, grid_panel, interpolation_panel, parse_seeds, read_faces,
                                 seed_noise, slerp, transfer_panel)
from test_export import CLASS_NAMES, Z_DIM, make_checkpoint

N_CLS = len(CLASS_NAMES)
CELL = 48 + 2  # grid_array: image plus padding
SCALE = 2  # labelled_grid's default upscaling


class Exports:
    """Exports made on first use (each conversion costs seconds on two shared cores), then reused."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[str, Path] = {}
        self.models: dict[str, object] = {}

    def __getitem__(self, kind: str) -> Path:
        if kind not in self.paths:
            make_checkpoint(self.root / f"run-{kind}", kind)
            self.paths[kind] = export_checkpoint(self.root / f"run-{kind}", self.root / kind)
        return self.paths[kind]

    def model(self, kind: str):
        if kind not in self.models:
            self.models[kind] = load_export(self[kind])
        return self.models[kind]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="module")
def models(exports):
    class _Models:
        def __getitem__(self, kind: str):
            return exports.model(kind)

    return _Models()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from bicogan_dist.cli.shard import main as shard_main

    out = tmp_path_factory.mktemp("shards") / "synthetic"
    assert shard_main(["--synthetic", "120", "--out", str(out), "--no-progress", "--workers", "1"]) in (0, None)
    return out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """uint8 images equal up to one grey level (batch composition may change float rounding)."""
    return bool((a.int() - b.int()).abs().max() <= 1)


def test_parse_seeds():
    assert parse_seeds("0-7") == list(range(8)) == parse_seeds("8")
    assert parse_seeds("1,5,9") == [1, 5, 9]
    assert parse_seeds("0-2,10") == [0, 1, 2, 10]
    assert parse_seeds("4-4") == [4]
    for bad in ("7-3", "x", "0"):
        with pytest.raises(SampleError, match="--seeds"):
            parse_seeds(bad)


def test_noise_of_a_seed_does_not_depend_on_the_batch():
    z = seed_noise([0, 1, 2, 3], Z_DIM)
    assert torch.equal(z[3], seed_noise([3], Z_DIM)[0])
    assert torch.equal(z[0], torch.randn(Z_DIM, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(z[0], z[1])


def test_slerp_endpoints_and_norm():
    a, b = seed_noise([0, 1], 64)
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)
    lo, hi = min(a.norm(), b.norm()), max(a.norm(), b.norm())
    assert all(lo - 1e-3 <= n <= hi + 1e-3 for n in path.norm(dim=1))


def test_grid_png_is_deterministic_with_one_row_per_emotion(exports, models, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for out, seeds in ((a, "0-3"), (b, "0-3"), (c, "4-7")):
        assert sample_main([str(exports["bicogan"]), "--seeds", seeds, "--out", str(out), "--device", "cpu"]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    img = Image.open(a)
    left = max(len(n) for n in CLASS_NAMES) * 7 + 8  # labelled_grid's row-label margin
    assert img.mode == "L" and img.size == ((4 * CELL + 2) * SCALE + left, (N_CLS * CELL + 2) * SCALE + 16)

    panel = grid_panel(models["bicogan"], [0, 1, 2, 3])
    assert (panel.rows, panel.cols, panel.row_labels) == (N_CLS, 4, CLASS_NAMES)
    with torch.inference_mode():  # row r, column j is G(z(seed j), r)
        expected = to_uint8(models["bicogan"].G(seed_noise([2], Z_DIM), torch.tensor([3])))
    assert close(panel.images[3 * 4 + 2], expected[0])


def test_unconditional_grid_has_one_row(exports, tmp_path):
    out = tmp_path / "g.png"
    assert sample_main([str(exports["gan"]), "--seeds", "5", "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size == ((5 * CELL + 2) * SCALE, (CELL + 2) * SCALE + 16)


def test_per_class_png_counts_refusal_force_and_determinism(exports, tmp_path, capsys):
    out = tmp_path / "gen"
    args = [str(exports["bicogan"]), "--per-class", "3", "--out", str(out), "--device", "cpu", "--batch-size", "4"]
    assert sample_main(args) == 0
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert dirs == sorted(CLASS_NAMES)
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.png")}
    assert len(files) == 3 * N_CLS
    assert all(len(list((out / name).glob("*.png"))) == 3 for name in CLASS_NAMES)
    info = json.loads((out / "generated.json").read_text())
    assert info["per_class"] == 3 and info["counts"] == {n: 3 for n in CLASS_NAMES}
    assert np.asarray(Image.open(out / "happy" / "00000.png")).shape == (48, 48)

    capsys.readouterr()
    assert sample_main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert sample_main(args + ["--force"]) == 0
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.png")} == files

    (out / "generated.json").unlink()  # no longer recognisably this tool's folder: never replaced
    assert sample_main(args + ["--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} is not empty and holds files this tool did not write")
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.png")} == files

    subset = tmp_path / "subset"
    assert sample_main([str(exports["bicogan"]), "--per-class", "3", "--out", str(subset), "--emotions", "sad,happy",
                        "--device", "cpu"]) == 0
    got = {p.relative_to(subset).as_posix(): p.read_bytes() for p in subset.rglob("*.png")}
    assert got == {k: v for k, v in files.items() if k.split("/")[0] in ("sad", "happy")}


def test_per_class_shards_read_back_like_real_ones(exports, tmp_path):
    from bicogan_dist.data.loader import load_split
    from bicogan_dist.data.manifest import ShardManifest

    out, png = tmp_path / "shards", tmp_path / "png"
    common = ["--per-class", "4", "--device", "cpu", "--seed", "11"]
    assert sample_main([str(exports["bicogan"]), *common, "--out", str(out), "--format", "shards",
                        "--shard-size", "10"]) == 0
    assert sample_main([str(exports["bicogan"]), *common, "--out", str(png)]) == 0
    manifest = ShardManifest.load(out)
    info = manifest.split("Generated")
    assert manifest.label_names == CLASS_NAMES
    assert info.count == 4 * N_CLS and info.class_counts == [4] * N_CLS and len(info.shards) == 3
    manifest.shard_paths(out, "Generated", verify=True)
    images, labels = load_split(out, "Generated", device="cpu")
    assert images.shape == (4 * N_CLS, 1, 48, 48) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=N_CLS).tolist() == [4] * N_CLS
    for k, name in enumerate(CLASS_NAMES):  # the same seeds give the same faces in both layouts
        from_png = sorted(np.asarray(Image.open(p)).tobytes() for p in (png / name).glob("*.png"))
        from_shards = sorted(images[labels == k, 0].numpy()[i].tobytes() for i in range(4))
        assert from_png == from_shards


def test_interpolation_panel(exports, models, tmp_path):
    out = tmp_path / "interp.png"
    assert sample_main([str(exports["bicogan"]), "--interpolate", "--seeds", "3,9", "--steps", "5",
                        "--method", "linear", "--out", str(out), "--device", "cpu"]) == 0
    panel = interpolation_panel(models["bicogan"], 3, 9, steps=8)
    assert (panel.rows, panel.cols) == (N_CLS + 1, 8) and panel.images.shape[0] == (N_CLS + 1) * 8
    grid_a, grid_b = grid_panel(models["bicogan"], [3]), grid_panel(models["bicogan"], [9])
    for r in range(N_CLS):
        assert close(panel.images[r * 8], grid_a.images[r]) and close(panel.images[r * 8 + 7], grid_b.images[r])
        assert close(panel.images[N_CLS * 8 + r], grid_a.images[r])  # last row: seed A across the emotions
    assert (panel.images[N_CLS * 8 + N_CLS:] == 255).all()  # blank padding after the emotions
    assert Image.open(out).size[1] == ((N_CLS + 1) * CELL + 2) * SCALE + 16
    assert sample_main([str(exports["bicogan"]), "--interpolate", "--seeds", "0-2", "--out", str(out)]) == 2


def write_face_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (80, 64, 3), dtype=np.uint8)).save(folder / "b.jpg")
    (folder / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(folder / "sub" / "c.png")
    (folder / "notes.txt").write_text("not an image")


def test_transfer_from_image_folder_and_file(exports, models, tmp_path):
    faces_dir = tmp_path / "faces"
    write_face_images(faces_dir)
    out = tmp_path / "t.png"
    assert sample_main([str(exports["bicogan"]), "--transfer", str(faces_dir), "--out", str(out),
                        "--device", "cpu"]) == 0
    model = models["bicogan"]
    faces = read_faces(str(faces_dir))
    assert faces.images.shape == (3, 1, 48, 48) and faces.images.dtype == torch.uint8
    panel = transfer_panel(model, faces)
    assert (panel.rows, panel.cols) == (3, 2 + N_CLS)
    assert panel.col_labels == ["input", "G(E(x))", *CLASS_NAMES]
    assert Image.open(out).size == panel.to_image().size
    grid = panel.images.view(3, 2 + N_CLS, 1, 48, 48)
    assert torch.equal(grid[:, 0], faces.images)
    with torch.inference_mode():
        from bicogan_dist.imaging import to_model_range

        z_hat, logits = model.E(to_model_range(faces.images))
    assert close(grid[:, 1], generate(model, z_hat, logits.argmax(1)))
    assert close(grid[:, 2 + 4], generate(model, z_hat, torch.full((3,), 4)))
    # --truncation decodes psi * E_z(x) in the reconstruction and every target column; the input stays
    assert sample_main([str(exports["bicogan"]), "--transfer", str(faces_dir), "--out", str(tmp_path / "t05.png"),
                        "--device", "cpu", "--truncation", "0.5"]) == 0
    assert Image.open(tmp_path / "t05.png").size == Image.open(out).size
    half = transfer_panel(model, faces, truncation=0.5).images.view(3, 2 + N_CLS, 1, 48, 48)
    assert torch.equal(half[:, 0], faces.images)
    assert close(half[:, 1], generate(model, 0.5 * z_hat, logits.argmax(1)))
    assert close(half[:, 2 + 4], generate(model, 0.5 * z_hat, torch.full((3,), 4)))
    assert not close(half[:, 2 + 4], grid[:, 2 + 4])

    single = read_faces(str(faces_dir / "b.jpg"))
    assert single.images.shape == (1, 1, 48, 48)
    assert sample_main([str(exports["bicogan"]), "--transfer", str(faces_dir / "b.jpg"), "--out",
                        str(tmp_path / "one.png"), "--emotions", "happy,sad"]) == 0
    assert Image.open(tmp_path / "one.png").size == transfer_panel(
        model, single, [CLASS_NAMES.index("happy"), CLASS_NAMES.index("sad")]).to_image().size


def test_transfer_from_shards(exports, models, shards, tmp_path, capsys):
    out = tmp_path / "t.png"
    assert sample_main([str(exports["bicogan"]), "--transfer", f"{shards}:Training", "--limit", "4",
                        "--out", str(out), "--device", "cpu"]) == 0
    faces = read_faces(f"{shards}:Training", limit=4)
    assert faces.images.shape == (4, 1, 48, 48) and len(faces.labels) == 4
    panel = transfer_panel(models["bicogan"], faces)
    assert (panel.rows, panel.cols) == (4, 2 + N_CLS)
    assert all(label.split("/")[0] in CLASS_NAMES for label in panel.row_labels)
    capsys.readouterr()
    assert sample_main([str(exports["bicogan"]), "--transfer", str(shards), "--out", str(out)]) == 2
    assert "name the split" in capsys.readouterr().err
    assert sample_main([str(exports["bicogan"]), "--transfer", f"{shards}:Nope", "--out", str(out)]) == 2
    assert "Nope" in capsys.readouterr().err


def test_bigan_transfer_shows_reconstruction_only(models, tmp_path):
    faces_dir = tmp_path / "faces"
    write_face_images(faces_dir)
    panel = transfer_panel(models["bigan"], read_faces(str(faces_dir)))
    assert (panel.rows, panel.cols) == (3, 2)


def test_what_an_unconditional_export_cannot_do(exports, tmp_path, capsys):
    faces_dir = tmp_path / "faces"
    write_face_images(faces_dir)
    gan = str(exports["gan"])
    cases = [
        (["--per-class", "2", "--out", str(tmp_path / "pc")], "conditional"),
        (["--transfer", str(faces_dir), "--out", str(tmp_path / "t.png")], "bidirectional"),
        (["--emotions", "happy", "--out", str(tmp_path / "g.png")], "unconditional"),
    ]
    for args, words in cases:
        capsys.readouterr()
        assert sample_main([gan, *args, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err and "'gan'" in err
    assert not (tmp_path / "pc").exists() and not (tmp_path / "t.png").exists()


def test_bad_arguments(exports, tmp_path, capsys):
    assert sample_main([str(exports["bicogan"]), "--emotions", "bored", "--out", str(tmp_path / "x.png")]) == 2
    assert "bored" in capsys.readouterr().err
    assert sample_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert sample_main([str(exports["bicogan"]), "--device", "cuda", "--out", str(tmp_path / "x.png")]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_truncation_pulls_z_toward_the_mean_in_grids_and_per_class(exports, models, tmp_path, capsys):
    from bicogan_dist.models.networks import truncate

    z = seed_noise([0, 1, 2], Z_DIM)
    assert truncate(z, 1) is z and torch.equal(seed_noise([0, 1, 2], Z_DIM, 0.5), z * 0.5)
    for bad in (0, 1.5, -0.3, True):
        with pytest.raises(ValueError, match=r"truncation psi must be in \(0, 1\]"):
            truncate(z, bad)
    # grid cell (row r, column j) is G(psi * z(seed j), r)
    panel = grid_panel(models["bicogan"], [0, 1, 2, 3], truncation=0.5)
    with torch.inference_mode():
        expected = to_uint8(models["bicogan"].G(0.5 * seed_noise([2], Z_DIM), torch.tensor([3])))
    assert close(panel.images[3 * 4 + 2], expected[0])
    # N per class: the same files as an untruncated call with the noise scaled, and the setting is recorded
    out = tmp_path / "gen"
    assert sample_main([str(exports["bicogan"]), "--per-class", "2", "--out", str(out), "--device", "cpu",
                        "--truncation", "0.5"]) == 0
    assert json.loads((out / "generated.json").read_text())["truncation"] == 0.5
    first = np.array(Image.open(out / CLASS_NAMES[0] / "00000.png"))
    with torch.inference_mode():
        want = to_uint8(models["bicogan"].G(0.5 * seed_noise([0], Z_DIM), torch.tensor([0])))[0, 0].numpy()
    assert np.abs(first.astype(int) - want.astype(int)).max() <= 1
    # bad values are usage errors naming the flag
    for bad in ("0", "1.5"):
        with pytest.raises(SystemExit) as exc:
            sample_main([str(exports["bicogan"]), "--truncation", bad, "--out", str(tmp_path / "x.png")])
        assert exc.value.code == 2 and "--truncation must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
