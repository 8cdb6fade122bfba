"""Evaluation end to end on the synthetic set: a tiny export and a tiny classifier built through the real code paths.

The fast tests call the CLIs' ``main`` functions in this process (trainer, converter,
classifier, evaluator); the slow ones run the tools as users do, as subprocesses, and
run the augmentation ablation for 2 steps per setting.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "launch_configs" / "experiments" / "smoke.yaml"
TINY_GAN = ["model.width=0.25", "model.z_dim=16", "data.batch_size=16", "log.heldout_size=32", "log.progress=false"]
TINY_CLF = ["--epochs", "2", "--batch-size", "32", "--widths", "8,16,16,16", "--feature-dim", "32", "--no-progress"]
NUM = 12  # generated faces per emotion


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_in_process(shards: Path, run_dir: Path, *overrides: str) -> None:
    from bicogan_dist.cli.train import main as train_main

    rc = train_main(["--config", str(SMOKE), f"data.shards={shards}", f"log.run_dir={run_dir}",
                     "train.max_steps=2", *TINY_GAN, *overrides])
    assert rc == 0


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Synthetic shards, a 2-step bicogan export, a 2-step gan export and a tiny classifier."""
    from bicogan_dist.cli.shard import main as shard_main
    from bicogan_dist.cli.train_classifier import main as clf_main
    from bicogan_dist.cli.export import main as export_main

    tmp = tmp_path_factory.mktemp("evaluate")
    shards = tmp / "shards"
    assert shard_main(["--synthetic", "720", "--out", str(shards), "--workers", "1", "--no-progress"]) in (0, None)
    out = {"shards": shards, "tmp": tmp}
    for kind in ("bicogan", "gan"):
        train_in_process(shards, tmp / f"run_{kind}", f"model.kind={kind}")
        assert export_main([str(tmp / f"run_{kind}"), "--out", str(tmp / f"export_{kind}")]) == 0
        out[kind] = tmp / f"export_{kind}"
    assert clf_main(["--shards", str(shards), "--out", str(tmp / "clf"), *TINY_CLF]) == 0
    out["clf"] = tmp / "clf"
    return out


def check_report(report: dict, shards: Path, split: str = "PrivateTest", num: int = NUM) -> None:
    from bicogan_dist.data.manifest import ShardManifest

    manifest = ShardManifest.load(shards)
    names = manifest.label_names
    n_cls = len(names)
    assert report["format"] == "bicogan_dist.evaluation"
    assert "penultimate" in report["feature_space"] and "not Inception" in report["feature_space"]
    ca = report["conditional_accuracy"]
    assert 0 <= ca["overall"] <= 1 and set(ca["per_class"]) == set(names)
    cm = np.array(ca["confusion_matrix"])
    assert cm.shape == (n_cls, n_cls) and (cm.sum(1) == num).all()
    assert ca["overall"] == pytest.approx(np.trace(cm) / cm.sum())
    for key in ("generated_vs_Training", f"generated_vs_{split}", f"real_Training_vs_{split}"):
        assert report["fid"][key] >= 0 and np.isfinite(report["fid"][key])
        assert np.isfinite(report["kid"][key]["mean"]) and report["kid"][key]["std"] >= 0
    assert report["generated"] == num * n_cls and sum(report["generated_class_counts"].values()) == num * n_cls
    enc = report["encoder_accuracy"]
    test_counts = manifest.split(split).class_counts
    assert 0 <= enc["overall"] <= 1 and np.array(enc["confusion_matrix"]).sum(1).tolist() == test_counts
    rec = report["reconstruction"]
    assert 0 <= rec["mae_grey_levels"] <= 255 and 0 <= rec["mse_model_range"] <= 4
    tr = report["emotion_transfer"]
    n_test = sum(test_counts)
    assert 0 <= tr["overall"] <= 1 and (np.array(tr["confusion_matrix"]).sum(1) == n_test).all()
    assert set(tr["per_target"]) == set(names)


def test_evaluate_cli_writes_json_markdown_and_png(built):
    from bicogan_dist.cli.evaluate import main as evaluate_main

    out = built["tmp"] / "reports" / "REPORT.json"
    assert evaluate_main([str(built["bicogan"]), "--shards", str(built["shards"]), "--classifier", str(built["clf"]),
                          "--out", str(out), "--num-samples", str(NUM), "--kid-subsets", "10"]) == 0
    report = json.loads(out.read_text())
    check_report(report, built["shards"])
    md = out.with_suffix(".md").read_text()
    assert "FER classifier penultimate layer, 32-d, trained by this project" in md and "not Inception" in md
    assert "Training vs PrivateTest" in md and "Conditional generation" in md
    png = Image.open(out.with_name("REPORT_confusion.png"))
    assert png.width > 300 and png.height > 100
    clf_meta = json.loads((built["clf"] / "classifier.json").read_text())
    assert set(clf_meta["accuracy"]) == {"PublicTest", "PrivateTest"} and clf_meta["training"]["seconds"] > 0
    assert report["classifier"]["accuracy_at_training"] == clf_meta["accuracy"]


def test_evaluation_is_deterministic_and_unconditional_kinds_get_nulls(built):
    from bicogan_dist.evaluate.classifier import load_classifier
    from bicogan_dist.evaluate.evaluation import RealData, evaluate_export
    from bicogan_dist.export import load_export

    clf = load_classifier(built["clf"])
    real = RealData.load(built["shards"], "PrivateTest", clf)
    exported = load_export(built["bicogan"])
    a = evaluate_export(exported, built["shards"], clf, num_samples=NUM, seed=3, kid_subsets=5, real=real)
    b = evaluate_export(exported, built["shards"], clf, num_samples=NUM, seed=3, kid_subsets=5, real=real)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    # The ceilings on real faces: plain accuracy, and the mean recall over emotions that a balanced generated set
    # is read against, counted here by hand from the classifier's predictions.
    pred, true = clf.predict(real.test_x).cpu().numpy(), real.test_y.cpu().numpy()
    recall = {name: float((pred[true == k] == k).mean()) for k, name in enumerate(real.class_names)}
    on_real = a["classifier"]
    assert on_real["accuracy_on_real"]["PrivateTest"] == pytest.approx(float((pred == true).mean()))
    assert on_real["per_class_accuracy_on_real"]["PrivateTest"] == pytest.approx(recall)
    assert on_real["balanced_accuracy_on_real"]["PrivateTest"] == pytest.approx(np.mean(list(recall.values())))
    gan = evaluate_export(built["gan"], built["shards"], built["clf"], num_samples=NUM, kid_subsets=5)
    assert gan["conditional_accuracy"] is None and gan["encoder_accuracy"] is None
    assert gan["reconstruction"] is None and gan["emotion_transfer"] is None
    assert gan["fid"]["generated_vs_Training"] >= 0 and gan["generated_class_counts"] is None


def test_truncated_evaluation_draws_from_scaled_noise_and_says_so(built):
    from bicogan_dist.evaluate.classifier import load_classifier
    from bicogan_dist.evaluate.evaluation import Evaluator, RealData, _noise, evaluate_export
    from bicogan_dist.evaluate.report import markdown_summary
    from bicogan_dist.export import load_export
    from bicogan_dist.imaging import to_uint8

    clf = load_classifier(built["clf"])
    real = RealData.load(built["shards"], "PrivateTest", clf)
    exported = load_export(built["bicogan"])
    labels = torch.arange(3).repeat_interleave(2)
    images = Evaluator(clf, real, truncation=0.5).generate(exported.G, labels, 6, exported.z_dim, seed=4)
    exported.G.eval()
    with torch.no_grad():
        expected = to_uint8(exported.G(0.5 * _noise(6, exported.z_dim, 4, torch.device("cpu")), labels))
    assert torch.equal(images, expected)
    with pytest.raises(ValueError, match="truncation psi"):
        Evaluator(clf, real, truncation=0)
    plain = evaluate_export(exported, built["shards"], clf, num_samples=NUM, seed=3, kid_subsets=5, real=real)
    half = evaluate_export(exported, built["shards"], clf, num_samples=NUM, seed=3, kid_subsets=5, real=real,
                           truncation=0.5)
    assert plain["settings"]["truncation"] == 1.0 and half["settings"]["truncation"] == 0.5
    assert "drawn from z x 0.5" in markdown_summary(half) and "drawn from z x" not in markdown_summary(plain)
    # G decodes psi * z everywhere: drawn faces, reconstruction and transfer change; E's accuracy does not
    assert half["fid"] != plain["fid"] and half["encoder_accuracy"] == plain["encoder_accuracy"]
    assert half["reconstruction"]["mae_grey_levels"] != plain["reconstruction"]["mae_grey_levels"]
    ev = Evaluator(clf, real, truncation=0.5)
    z_hat, logits = ev.encode(exported.E, real.test_x)
    with torch.no_grad():
        recon = to_uint8(exported.G(0.5 * z_hat, logits.argmax(1))).float()
    assert ev.reconstruction_and_transfer(exported.G, exported.E, True)["reconstruction"]["mae_grey_levels"] \
        == pytest.approx(float((recon - real.test_x.float()).abs().mean()), abs=1e-3)


def test_training_evaluator_returns_flat_scalars(built):
    from bicogan_dist.evaluate.evaluation import make_training_evaluator
    from bicogan_dist.export import load_export

    exported = load_export(built["bicogan"])
    G, E = exported.G, exported.E
    G.train()
    evaluate = make_training_evaluator(built["clf"], built["shards"], num_samples=8, split="PublicTest")
    metrics = evaluate(G, E, exported.class_names)
    assert set(metrics) == {"eval/conditional_accuracy", "eval/fid_training", "eval/kid_training",
                            "eval/encoder_accuracy"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    assert G.training  # modes restored for the trainer
    with_cfg = make_training_evaluator(built["clf"], built["shards"], num_samples=8, model=exported.model)
    assert with_cfg(G, E, exported.class_names) == metrics
    with pytest.raises(ValueError, match="differ"):
        evaluate(G, E, list(reversed(exported.class_names)))


def test_evaluate_cli_reports_bad_inputs(built, tmp_path, capsys):
    from bicogan_dist.cli.evaluate import main as evaluate_main

    rc = evaluate_main([str(tmp_path), "--shards", str(built["shards"]), "--classifier", str(built["clf"]),
                        "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "error:" in capsys.readouterr().err
    rc = evaluate_main([str(built["bicogan"]), "--shards", str(built["shards"]), "--classifier", str(tmp_path),
                        "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "train_classifier" in capsys.readouterr().err


def test_ablation_verdict_rule_and_table():
    from bicogan_dist.evaluate.ablation import SETTINGS, ablation_markdown, verdict

    assert verdict(100, 100, 0.1) == "same" and verdict(109, 100, 0.1) == "same"
    assert verdict(89, 100, 0.1) == "better" and verdict(111, 100, 0.1) == "worse"
    assert [s.name for s in SETTINGS] == ["none", "affine_rotate", "fliplr", "affine_shear", "crop",
                                          "gamma_contrast", "affine_scale"]
    rows = [{"name": s.name, "setting": s.name, "paper": s.paper, "paper_verdict": s.paper_verdict,
             "conditional_accuracy": 0.5, "fid_training": 10.0 + i, "encoder_accuracy": 0.4,
             "fid_change": i / 10, "measured_verdict": "same", "agrees_with_paper": None if i == 0 else True,
             "seconds": 30.0}
            for i, s in enumerate(SETTINGS)]
    md = ablation_markdown({"steps": 2, "overrides": [], "rule": "r = ...", "feature_space": "FS",
                            "split": "PrivateTest", "num_samples_per_class": 5, "seed": 0, "seconds": 1.0,
                            "rows": rows})
    assert "Affine(rotate=(-50, 30))" in md and "| crop |" in md and "FS" in md
    assert "these settings: 210 s; this call: 1 s" in md


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("ACCELERATE_USE_CPU", None)
    return e


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_tools_end_to_end_as_subprocesses(built, tmp_path):
    """The user's path: trainer, convert_checkpoint, train_classifier and evaluate as commands."""
    py = sys.executable
    run([py, "-m", "bicogan_dist.train", "--config", str(SMOKE), f"data.shards={built['shards']}",
         f"log.run_dir={tmp_path / 'run'}", "train.max_steps=2", *TINY_GAN])
    run([py, "tools/convert_checkpoint.py", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    run([py, "tools/train_classifier.py", "--shards", str(built["shards"]), "--out", str(tmp_path / "clf"), *TINY_CLF])
    out = tmp_path / "REPORT.json"
    proc = run([py, "tools/evaluate.py", str(tmp_path / "export"), "--shards", str(built["shards"]),
                "--classifier", str(tmp_path / "clf"), "--out", str(out), "--num-samples", str(NUM),
                "--kid-subsets", "10"])
    assert "not Inception" in proc.stdout
    check_report(json.loads(out.read_text()), built["shards"])
    assert "not Inception" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_ablation_runs_all_seven_settings(built, tmp_path):
    out = tmp_path / "ablation"
    proc = run([sys.executable, "tools/ablate_augmentations.py", "--shards", str(built["shards"]), "--classifier",
                str(built["clf"]), "--steps", "2", "--out", str(out), "--num-samples", "6", "--tolerance", "0.05",
                "model.width=0.25", "model.z_dim=16", "data.batch_size=16", "log.heldout_size=32"], timeout=1200)
    result = json.loads((out / "ablation.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["none", "affine_rotate", "fliplr", "affine_shear", "crop", "gamma_contrast", "affine_scale"]
    assert result["tolerance"] == 0.05 and "FID" in result["rule"]
    for r in result["rows"][1:]:
        assert r["measured_verdict"] in ("better", "same", "worse") and isinstance(r["agrees_with_paper"], bool)
        assert Path(r["report"]).is_file()
    md = (out / "ablation.md").read_text()
    assert "| affine_rotate | Affine(rotate=(-50, 30)) | better |" in md and "not Inception" in md
    assert "measured verdict" in proc.stdout
    # A second call reuses the finished settings instead of training again ...
    again = [sys.executable, "tools/ablate_augmentations.py", "--shards", str(built["shards"]), "--classifier",
             str(built["clf"]), "--out", str(out), "--num-samples", "6", "--settings", "crop"]
    tiny = ["model.width=0.25", "model.z_dim=16", "data.batch_size=16", "log.heldout_size=32"]
    proc = run([*again, "--steps", "2", *tiny])
    assert "reusing" in proc.stdout and "| crop |" in proc.stdout
    # Another classifier is another feature space: the trained export is scored again, not reused or retrained.
    from bicogan_dist.data.manifest import sha256_file
    from bicogan_dist.cli.train_classifier import main as clf_main

    other = tmp_path / "clf_seed1"
    assert clf_main(["--shards", str(built["shards"]), "--out", str(other), *TINY_CLF, "--seed", "1"]) == 0
    crop = out / "crop"
    trained = (crop / "train.log").read_text(), sorted(p.name for p in (crop / "run" / "checkpoints").iterdir())
    first = json.loads((crop / "report.json").read_text())
    proc = run([*again, "--steps", "2", *tiny, "--classifier", str(other)])
    assert "re-evaluating" in proc.stdout and "] training " not in proc.stdout
    second = json.loads((crop / "report.json").read_text())
    assert first["classifier"]["weights_sha256"] == sha256_file(built["clf"] / "classifier.safetensors")
    assert second["classifier"]["weights_sha256"] == sha256_file(other / "classifier.safetensors")
    assert second["fid"]["generated_vs_Training"] != first["fid"]["generated_vs_Training"]
    assert second["ablation"]["seconds"] == first["ablation"]["seconds"]  # the training's cost is kept
    assert "reevaluation_seconds" in second["ablation"]
    assert ((crop / "train.log").read_text(), sorted(p.name for p in (crop / "run" / "checkpoints").iterdir())) \
        == trained
    # ... but never results made with another budget.
    proc = subprocess.run([*again, "--steps", "3", *tiny], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "--rerun" in proc.stderr


def test_trainer_logs_periodic_evaluation_to_tensorboard(built, tmp_path):
    """eval.every: the trainer calls the evaluator on rank 0 and TensorBoard gets eval/* scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train_in_process(built["shards"], run_dir, "model.kind=bicogan", "eval.every=1",
                     f"eval.classifier={built['clf']}", "eval.num_samples=4")
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/conditional_accuracy", "eval/fid_training", "eval/encoder_accuracy"} <= tags, tags
    assert [e.step for e in acc.Scalars("eval/conditional_accuracy")] == [1, 2]
    assert [e.step for e in acc.Scalars("time/eval_s")] == [1, 2]  # how long rank 0 evaluated (other ranks wait)
    assert all(e.value > 0 for e in acc.Scalars("time/eval_s"))
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("eval/encoder_accuracy"))


def test_class_fidelity_numbers_and_their_real_references(built):
    """Per-emotion diversity and FID are in the report; a G that ignores z scores 0 diversity."""
    from bicogan_dist.evaluate.classifier import load_classifier
    from bicogan_dist.evaluate.evaluation import Evaluator, RealData
    from bicogan_dist.export import load_export

    clf = load_classifier(built["clf"])
    real = RealData.load(built["shards"], "PrivateTest", clf)
    ev = Evaluator(clf, real, num_samples=NUM, seed=0)
    exported = load_export(built["bicogan"])
    ca = ev.conditional_accuracy(exported.G, exported.z_dim)
    div, pcf = ca["intra_class_diversity"], ca["per_class_fid"]
    assert set(div["per_class"]) == set(pcf["per_class"]) == set(real.class_names)
    assert div["mean"] > 0 and div["pixels_mean"] > 0 and pcf["mean"] > 0
    assert 0.5 < div["real_PrivateTest_mean"] < 1.5  # real held-out vs real Training: about 1

    class IgnoresZ(torch.nn.Module):  # the failure the metric exists for: one face per emotion
        def __init__(self, G):
            super().__init__()
            self.G = G

        def forward(self, z, c):
            return self.G(torch.zeros_like(z), c)

    collapsed = ev.conditional_accuracy(IgnoresZ(exported.G), exported.z_dim)["intra_class_diversity"]
    assert collapsed["mean"] == pytest.approx(0.0, abs=1e-6) and collapsed["pixels_mean"] == 0.0


@pytest.mark.slow
def test_bench_quality_end_to_end_on_a_tiny_budget(built, tmp_path):
    """tools/bench_quality.py as a user runs it: two rows trained through accelerate launch, one table."""
    out = tmp_path / "quality"
    cmd = [sys.executable, "tools/bench_quality.py", "--preset", "synthetic", "--classifier", str(built["clf"]),
           "--shards", str(built["shards"]), "--out", str(out), "--steps", "3", "--rows", "default,before",
           "--num-samples", "12", "--truncation", "1,0.5", *TINY_GAN]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((out / "quality.json").read_text())
    names = ["default", "default psi=0.5", "before", "before psi=0.5"]
    assert [r["name"] for r in result["rows"]] == names and result["meta"]["steps"] == 3
    assert [r["truncation"] for r in result["rows"]] == [1, 0.5, 1, 0.5]
    for r in result["rows"]:
        assert 0 <= r["conditional_accuracy"] <= 1 and r["fid_training"] >= 0 and r["images_per_s"] > 0
        assert r["intra_class_diversity"] >= 0 and r["per_class_fid"] >= 0 and r["reconstruction_mae"] >= 0
        assert Path(r["grid"]).is_file() and Path(r["report"]).with_suffix(".md").is_file()
        if r["truncation"] != 1:
            assert json.loads(Path(r["report"]).read_text())["settings"]["truncation"] == r["truncation"]
            continue
        state = json.loads(next((out / r["name"] / "run" / "checkpoints").glob("*/state.json")).read_text())
        assert state["step"] == 3 and state["world_size"] == 2
    assert "| default |" in proc.stdout and "| before |" in proc.stdout
    ceiling = result["rows"][0]
    recall = ceiling["classifier_real_accuracy_per_class"]
    assert ceiling["classifier_real_balanced_accuracy"] == pytest.approx(sum(recall.values()) / len(recall))
    assert "| real faces (the classifier's recall: the ceiling) |" in (out / "quality.md").read_text()
    # the second call reuses both rows
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("reusing") == 2 and "] training " not in again.stdout
    # a report of an older evaluation version is measured again from the export, without training
    old = out / "before" / "report_psi0.5.json"
    stale = json.loads(old.read_text())
    old.write_text(json.dumps(dict(stale, version=1, seconds=-1.0)))
    third = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and third.stdout.count("reusing") == 2 and "] training " not in third.stdout
    fresh = json.loads(old.read_text())
    assert fresh["version"] == 2 and fresh["seconds"] >= 0
    assert fresh["emotion_transfer"] == stale["emotion_transfer"]  # deterministic: the same numbers again
    # a row stopped before its report resumes from its checkpoint instead of training afresh
    before = json.loads((out / "default" / "report.json").read_text())
    (out / "default" / "report.json").unlink()
    (out / "default" / "bench.json").unlink()
    fourth = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert fourth.returncode == 0, fourth.stdout[-2000:] + fourth.stderr[-3000:]
    assert "[default] resuming the interrupted run at step 3 of 3" in fourth.stdout and "] training " not in fourth.stdout
    assert json.loads((out / "default" / "bench.json").read_text())["resumed_from_step"] == 3
    again_report = json.loads((out / "default" / "report.json").read_text())
    assert again_report["conditional_accuracy"] == before["conditional_accuracy"]


def test_an_interrupted_benchmark_row_resumes_only_what_it_started(tmp_path):
    """A row killed mid-training keeps its checkpoints for the same steps and overrides; anything else starts over."""
    from bicogan_dist.evaluate.quality import ROW_FILE, interrupted_step

    folder = tmp_path / "row"
    assert interrupted_step(folder, 100, ["a=1"]) is None  # nothing there
    folder.mkdir()
    (folder / ROW_FILE).write_text(json.dumps({"steps": 100, "overrides": ["a=1"]}))
    assert interrupted_step(folder, 100, ["a=1"]) is None  # started, nothing saved yet
    for step in (20, 40):
        ckpt = folder / "run" / "checkpoints" / f"checkpoint-{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text(json.dumps({"step": step}))
    (folder / "run" / "checkpoints" / "checkpoint-00000060").mkdir()  # being written when killed: no state.json
    assert interrupted_step(folder, 100, ("a=1",)) == 40
    assert interrupted_step(folder, 200, ["a=1"]) is None  # other steps
    assert interrupted_step(folder, 100, ["a=2"]) is None  # other overrides
    (folder / ROW_FILE).write_text("{not json")
    assert interrupted_step(folder, 100, ["a=1"]) is None


def test_every_quality_preset_row_is_a_valid_config():
    """A typo in a benchmark row would only show after the rows before it had trained for an hour."""
    from bicogan_dist.evaluate.quality import CONFIGS, PRESETS
    from bicogan_dist.train.config import load_config

    for name, preset in PRESETS.items():
        assert len({r.name for r in preset.rows}) == len(preset.rows), name
        for row in preset.rows:
            extra = [*(preset.overrides if row.shared else ()), *row.overrides]
            cfg = load_config(CONFIGS / f"{row.config}.yaml", extra)
            assert cfg.model.kind in ("bicogan", "cgan"), (name, row.name)
    fer = {r.name: r for r in PRESETS["fer2013"].rows}
    assert load_config(CONFIGS / "bicogan_paper.yaml").model.arch == "paper" and not fer["paper"].shared
