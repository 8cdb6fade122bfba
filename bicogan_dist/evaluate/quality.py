"""The quality benchmark: ``tools/bench_quality.py`` — train configs for a fixed budget, evaluate, one table.

Each row is one training run of an experiment YAML plus overrides, for exactly ``steps``
steps, launched the way a user launches it (a subprocess, by default ``accelerate launch``
with the CPU two-process config, or a GPU config with ``--launch``). Every run is then
exported, evaluated with the project classifier of that data set, and drawn as a grid (one
row per emotion, one column per seed). Columns:

- conditional accuracy overall and per emotion, beside the classifier's recall on real faces of each
  emotion and its mean (the ceiling: the generated set holds as many faces of every emotion);
- intra-class diversity (generated / real, 1.0 = as varied as real, 0 = one face per emotion), in the
  classifier's features and in grey levels: noisy fakes inflate the feature ratio (their features vary
  when the face does not), so read the two together and with the grid;
- FID vs Training and mean per-emotion FID, beside the real-vs-real references;
- encoder emotion accuracy on the held-out split, emotion-transfer success, reconstruction MAE
  (grey levels);
- training images/s (the trainer's ``perf/images_per_s``, median over the run) and wall time.

Presets fix the budget and the rows (``PRESETS``); ``--rows`` picks a subset. Each row lives
in ``OUT/<row>/`` (``run/``, ``export/``, ``report.json`` + ``.md``, ``grid.png``,
``train.log``); a row whose report exists with the same steps, overrides and classifier is
reused, so an interrupted benchmark continues (a report of an older evaluation version is measured again
from the row's export, without training). ``quality.md`` / ``quality.json`` cover the call.
A preset's ``truncations`` (``--truncation``) add a row per psi < 1 for every run: the same export with
G decoding z * psi, drawn or encoded (``report_psi<psi>.json``, ``grid_psi<psi>.png``), no training.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "launch_configs" / "experiments"
CPU_2PROC = ROOT / "launch_configs" / "accelerate" / "cpu_2proc.yaml"


class QualityError(RuntimeError):
    """A row that failed to train, export or evaluate; the message names it and shows the log's tail."""


@dataclass(frozen=True)
class Row:
    """One benchmark run: an experiment YAML, overrides on top of it, and what it is meant to show."""

    name: str
    config: str  # experiment YAML stem
    overrides: tuple[str, ...] = ()
    note: str = ""
    steps: int | None = None  # this row's own budget (None: the preset's)
    shared: bool = True  # whether the preset's overrides apply (not to a model with fixed widths and batch)


@dataclass(frozen=True)
class Preset:
    steps: int
    shards: str
    rows: tuple[Row, ...]
    overrides: tuple[str, ...] = ()  # added to every row (the budget's batch size, precision, ...)
    num_samples: int = 200  # generated faces per emotion
    description: str = ""
    # Every row is also evaluated with G decoding z * psi (drawn and encoded) for each psi here besides 1 (the
    # truncation trick), reusing the row's export: a row per psi, with the diversity it keeps beside the accuracy
    # it buys.
    truncations: tuple[float, ...] = (1.0,)


#: E's emotion read by a head on its z trunk (the default until 2026-12-03 evening; the quick start's).
SHARED_E = ("model.e_emotion=shared",)
#: The class loss on the fakes through E (the default from 2026-12-04 evening) turned off.
NO_FAKE_EMOTION = ("loss.fake_emotion_weight=0",)
#: What the options added on 2026-12-03 turn off: E's augmented emotion view, the reconstruction loss, E's branch.
NO_E_OPTIONS = ("loss.efl_augment=[]", "loss.recon_weight=0", *SHARED_E, *NO_FAKE_EMOTION)
#: The default until 2026-12-03 (no mirrored reals, no E options), as overrides of today's defaults.
NO_MIRROR_NO_E = ("augment.ops=[]", *NO_E_OPTIONS)
#: The first default of this benchmark (2026-12-02), as overrides of today's defaults.
PREVIOUS = ("loss.loss=bce", "loss.mode_seeking_weight=1", "loss.latent_weight=1", "model.mbstd_by_class=false",
            "augment.ops=[affine_rotate]", "optim.beta1=0.5", "optim.beta2=0.999", *NO_E_OPTIONS)
#: The default before this benchmark existed.
BEFORE = ("loss.loss=bce", "loss.latent_weight=1", "model.mbstd_by_class=false", "augment.ops=[affine_rotate]",
          "optim.beta1=0.5", "optim.beta2=0.999", "model.d_conditioning=concat", "loss.real_emotion=encoder",
          *NO_E_OPTIONS)

#: ADC-GAN's 2K-class head on D (real-k / fake-k), trained at weight 1.
ADC = ("model.d_class_head=true", "loss.adc_weight=1")

_ABLATIONS = (
    Row("default", "quickstart", (), "the default recipe, seed 0"),
    Row("default_seed1", "quickstart", ("train.seed=1",), "the same, seed 1: the noise of one row"),
    Row("previous", "quickstart", PREVIOUS, "the previous default: bce, mode seeking, latent cycle, mixed-emotion "
                                            "minibatch-stddev groups, rotation"),
    Row("before", "quickstart", BEFORE, "the default before the benchmark: emotion concatenated in D, E's c in real "
                                        "tuples, no mode seeking"),
    Row("adam_beta05", "quickstart", ("optim.beta1=0.5", "optim.beta2=0.999", "loss.latent_weight=0"),
        "Adam betas (0.5, 0.999) (the paper's) and no latent cycle"),
    Row("no_latent_cycle", "quickstart", ("loss.latent_weight=0",), "no latent cycle loss"),
    Row("no_e_options", "quickstart", NO_MIRROR_NO_E,
        "the default until 2026-12-03: no mirrored reals, no augmented view for E, no reconstruction loss"),
    Row("no_recon", "quickstart", ("loss.recon_weight=0",), "no reconstruction loss"),
    Row("rotate", "quickstart", ("augment.ops=[affine_rotate]",), "rotation of the real images (the paper's)"),
    Row("bce", "quickstart", ("loss.loss=bce",), "non-saturating loss instead of hinge"),
    Row("mbstd_mixed", "quickstart", ("model.mbstd_by_class=false",), "minibatch-stddev groups of mixed emotions"),
    Row("mode_seeking", "quickstart", ("loss.mode_seeking_weight=1", "loss.mode_seeking_pool=4"),
        "mode seeking on 4x4-pooled images"),
    Row("latent_cycle_1", "quickstart", ("loss.latent_weight=1",), "latent cycle loss at weight 1"),
    Row("g_cbn", "quickstart", ("model.g_conditioning=cbn",), "class-conditional BatchNorm in G"),
    Row("d_concat", "quickstart", ("model.d_conditioning=concat",), "emotion concatenated in D, no projection"),
    Row("real_c_encoder", "quickstart", ("loss.real_emotion=encoder",), "softmax(E_c(x)) in real tuples"),
    Row("diffaugment", "quickstart", ("loss.diffaugment=[translation,cutout]",), "DiffAugment on D's inputs"),
    Row("ttur", "quickstart", ("optim.lr_d=4e-4", "optim.lr_ge=1e-4"), "TTUR learning rates"),
    Row("adc", "quickstart", ADC,
        "ADC-GAN's real-k / fake-k head on D"),
    Row("no_fake_emotion", "quickstart", NO_FAKE_EMOTION, "no class loss on the fakes through E"),
    Row("cgan", "quickstart", ("model.kind=cgan",), "cGAN (no encoder) with the same recipe"),
    Row("e_branch", "quickstart", ("model.e_emotion=branch",),
        "E's own emotion branch (bicogan.yaml's default) instead of the quick start's shared head"),
)

PRESETS: dict[str, Preset] = {
    "synthetic": Preset(
        steps=2500, shards="data_shards/synthetic", rows=_ABLATIONS,
        description="the quick start's budget: quickstart.yaml, 2,500 steps of 32 images x 2 CPU processes in bf16"),
    "fer2013": Preset(
        steps=7500, shards="data_shards/fer2013",
        rows=(Row("default", "bicogan"), Row("default_seed1", "bicogan", ("train.seed=1",)),
              Row("no_e_options", "bicogan", NO_MIRROR_NO_E,
                  "the default until 2026-12-03: no mirrored reals, no augmented view for E, no reconstruction"),
              Row("rotate", "bicogan_rotate", NO_E_OPTIONS, "the paper's rotation of the real images instead"),
              Row("e_shared", "bicogan", SHARED_E, "E's emotion from a head on its z trunk, not its own branch"),
              Row("no_recon", "bicogan", ("loss.recon_weight=0",), "no reconstruction loss"),
              Row("adc", "bicogan", ADC,
                  "ADC-GAN's real-k / fake-k head on D"),
              Row("g_cbn", "bicogan", ("model.g_conditioning=cbn",), "class-conditional BatchNorm in G"),
              Row("diffaugment", "bicogan", ("loss.diffaugment=[translation,cutout]",), "DiffAugment on D's inputs"),
              Row("d_depth2", "bicogan", ("model.d_depth=2",),
                  "a 3x3 conv after each of D's strided convs (SNGAN's CNN D)"),
              Row("lr_d_4e-4", "bicogan", ("optim.lr_d=4e-4",), "D learns at twice G's rate (4e-4 against 2e-4)"),
              Row("no_fake_emotion", "bicogan", NO_FAKE_EMOTION,
                  "the default until 2026-12-04 evening: no class loss on the fakes through E"),
              Row("before", "bicogan", BEFORE),
              # The paper's networks at batch 128 ran 24.2 images/s in bf16 in one process here
              # (tools/bench_train.py): 30 minutes are 340 of its steps there; with the preset's two processes each
              # step reads twice the images (the measured row took 4,473 s on shared cores; README, section 7).
              Row("paper", "bicogan_paper", (), "the paper's model as published, same wall-clock budget", steps=340,
                  shared=False)),
        overrides=("model.width=0.5", "train.mixed_precision=bf16", "data.batch_size=64"),
        num_samples=500,
        # 0.8: reconstruction and transfer both better than at 1; 0.7: every target holds on both default seeds;
        # 0.6: clearer emotions, reconstruction past its target (README, section 7)
        truncations=(1.0, 0.8, 0.7, 0.6),
        description="7,500 steps of 64 images x 2 processes, width 0.5, bf16, fixed at 30 minutes of training on "
                    "the 2-core CPU machine (with the cores to itself, today's default plus DiffAugment, which adds "
                    "an index gather and a mask per image, trained them in 1,924 s at 504 images/s; rows beside "
                    "other jobs take longer); "
                    "bicogan_paper is the paper's model as published, 340 steps of 128 images x 2 processes "
                    "(derived from one process's 24 images/s, so about 60 minutes here)"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_launch(device: str | None = None) -> list[str]:
    """Training on ``device``: "cpu" is two CPU processes (the tests' and the quick start's launcher, which stays on
    the CPU on a GPU machine too), "cuda" one GPU; None picks cuda when torch sees one."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r} is not cpu or cuda")
    config = CPU_2PROC if kind == "cpu" else ROOT / "launch_configs" / "accelerate" / "1gpu.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(free_port())]


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def train_run(name: str, config: Path, run_dir: Path, shards: Path, steps: int, overrides: Sequence[str],
              launch: Sequence[str], log_file: Path, timeout: float | None = None) -> float:
    """One training run as a subprocess, ``[launch] -m bicogan_dist.train --config ... key=value ...``; wall seconds.

    A run folder that already holds checkpoints is resumed (an interrupted run continues, a
    finished one stops at once); ``run_quality`` keeps such a folder only for the row that made it
    (``interrupted_step``). Failure raises ``QualityError`` with the log's tail.
    """
    from bicogan_dist.train import checkpoint as ckpt

    if not config.is_file():
        raise QualityError(f"{name}: experiment config {config} is missing")
    cmd = [*(launch or [sys.executable]), "-m", "bicogan_dist.train", "--config", str(config)]
    if ckpt.list_checkpoints(run_dir):
        cmd += ["--resume", "latest"]
    cmd += [f"data.shards={shards}", f"log.run_dir={run_dir}", f"train.max_steps={steps}", "log.progress=false",
            *overrides]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_file, "a") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=fh,
                                stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired as exc:
            raise QualityError(f"{name}: training did not finish within {timeout} s; log {log_file}") from exc
    if rc != 0:
        raise QualityError(f"{name}: training exited with status {rc}; last lines of {log_file}:\n{tail(log_file)}")
    return time.perf_counter() - t0


#: What a row's training was started with, written before it trains: an interrupted row resumes only when its
#: steps and overrides are the same.
ROW_FILE = "row.json"


def interrupted_step(folder: Path, steps: int, overrides: Sequence[str]) -> int | None:
    """The step of the latest checkpoint of a row stopped before its report, when the row was started with these
    ``steps`` and ``overrides`` (training resumes exactly from it, section 2 of the README); None otherwise."""
    from bicogan_dist.train import checkpoint as ckpt

    try:
        started = json.loads((folder / ROW_FILE).read_text())
    except (OSError, ValueError):
        return None
    found = ckpt.list_checkpoints(folder / "run")
    if started != {"steps": steps, "overrides": list(overrides)} or not found:
        return None
    return int(json.loads((found[-1] / ckpt.STATE_FILE).read_text())["step"])


def images_per_second(run_dir: Path) -> float | None:
    """Median of the trainer's ``perf/images_per_s`` over the run (TensorBoard), the first interval left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    if "perf/images_per_s" not in acc.Tags()["scalars"]:
        return None
    values = [e.value for e in acc.Scalars("perf/images_per_s")]
    return float(statistics.median(values[1:] if len(values) > 2 else values))


@dataclass
class QualityResult:
    preset: str
    steps: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def summarise(row: Row, report: dict[str, Any], bench: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers for one row, from its evaluation report."""
    ca, enc = report.get("conditional_accuracy"), report.get("encoder_accuracy")
    rec, tr = report.get("reconstruction"), report.get("emotion_transfer")
    split = report["settings"]["split"]
    truncation = report["settings"].get("truncation", 1.0)
    return {
        "name": row.name if truncation == 1 else f"{row.name} psi={truncation:g}", "truncation": truncation,
        "config": row.config, "overrides": list(row.overrides), "note": row.note,
        "steps": bench.get("steps"),
        "conditional_accuracy": ca["overall"] if ca else None,
        "conditional_accuracy_per_class": ca["per_class"] if ca else None,
        "classifier_real_accuracy": report["classifier"]["accuracy_on_real"].get(split),
        # Absent from reports written before 2026-12-03 evening (then None / "—" in the table).
        "classifier_real_balanced_accuracy": (report["classifier"].get("balanced_accuracy_on_real") or {}).get(split),
        "classifier_real_accuracy_per_class": (report["classifier"].get("per_class_accuracy_on_real") or {}).get(split),
        "intra_class_diversity": ca["intra_class_diversity"]["mean"] if ca else None,
        "intra_class_diversity_real": ca["intra_class_diversity"][f"real_{split}_mean"] if ca else None,
        "pixel_diversity": ca["intra_class_diversity"]["pixels_mean"] if ca else None,
        "fid_training": report["fid"]["generated_vs_Training"],
        "fid_training_real": report["fid"][f"real_Training_vs_{split}"],
        "per_class_fid": ca["per_class_fid"]["mean"] if ca else None,
        "per_class_fid_real": ca["per_class_fid"][f"real_{split}_mean"] if ca else None,
        "encoder_accuracy": enc["overall"] if enc else None,
        "transfer_success": tr["overall"] if tr else None,
        "reconstruction_mae": rec["mae_grey_levels"] if rec else None,
        "images_per_s": bench.get("images_per_s"), "train_seconds": bench.get("train_seconds"),
        "resumed_from_step": bench.get("resumed_from_step"),
        "grid": bench.get("grid"), "report": bench.get("report"),
    }


def run_quality(preset_name: str, classifier_dir: str | Path, out_dir: str | Path, shards: str | Path | None = None,
                steps: int | None = None, rows: Sequence[str] | None = None, overrides: Sequence[str] = (),
                launch: Sequence[str] | None = None, device: str = "cpu", num_samples: int | None = None,
                seed: int = 0, rerun: bool = False, log: Callable[[str], None] = print,
                truncations: Sequence[float] | None = None) -> QualityResult:
    """Train, export, evaluate and draw every row of a preset; write ``quality.md`` and ``quality.json``."""
    import torch

    from bicogan_dist.evaluate.classifier import load_classifier
    from bicogan_dist.evaluate.evaluation import RealData, default_split, evaluate_export
    from bicogan_dist.evaluate.report import write_report
    from bicogan_dist.export import export_checkpoint, load_export
    from bicogan_dist.sample import grid_panel, save_panel

    if preset_name not in PRESETS:
        raise QualityError(f"unknown preset {preset_name!r}; choose from {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    steps = steps or preset.steps
    if steps < 1:
        raise QualityError("--steps must be >= 1")
    num_samples = num_samples or preset.num_samples
    truncations = list(truncations or preset.truncations)
    if any(not 0 < psi <= 1 for psi in truncations):
        raise QualityError(f"--truncation: every psi must lie in (0, 1], got {truncations}")
    truncations = [1.0] + [psi for psi in dict.fromkeys(truncations) if psi != 1]  # psi 1 first, always
    shards = Path(shards or ROOT / preset.shards).resolve()
    if not (shards / "manifest.json").is_file():
        raise QualityError(f"{shards}: no manifest.json; shard the data first (tools/shard_fer2013.py)")
    unknown = set(rows or []) - {r.name for r in preset.rows}
    if unknown:
        raise QualityError(f"unknown row(s) {sorted(unknown)}; preset {preset_name} has {[r.name for r in preset.rows]}")
    chosen = [r for r in preset.rows if rows is None or r.name in rows]
    out = Path(out_dir).resolve()
    device_t = torch.device(device)
    clf = load_classifier(classifier_dir, device_t)
    split = default_split(shards)
    real = None
    result = QualityResult(preset_name, steps)
    t_all = time.perf_counter()
    for row in chosen:
        folder = out / row.name
        extra = [*(preset.overrides if row.shared else ()), *overrides, *row.overrides]
        row_steps = row.steps or steps
        report_json, bench_json = folder / "report.json", folder / "bench.json"
        if rerun and folder.exists():
            shutil.rmtree(folder)
        bench = json.loads(bench_json.read_text()) if bench_json.is_file() else None
        if bench is not None and (bench.get("steps") != row_steps or bench.get("overrides") != extra
                                  or bench.get("classifier_sha256") != clf.weights_sha256):
            raise QualityError(f"{bench_json} was made with other steps, overrides or classifier; pass --rerun to "
                               f"replace it or choose another --out")
        exported = None  # loaded at most once per row: after training, or for truncations still to evaluate
        if bench is None or not report_json.is_file():
            resumed_from = interrupted_step(folder, row_steps, extra)
            if resumed_from is None:
                if folder.exists():
                    shutil.rmtree(folder)  # another row's leftovers, or nothing saved yet: train it afresh
                folder.mkdir(parents=True)
                (folder / ROW_FILE).write_text(json.dumps({"steps": row_steps, "overrides": extra}) + "\n")
                log(f"[{row.name}] training {row_steps} steps ({row.config}.yaml {' '.join(extra)})")
            else:
                log(f"[{row.name}] resuming the interrupted run at step {resumed_from} of {row_steps}")
            seconds = train_run(row.name, CONFIGS / f"{row.config}.yaml", folder / "run", shards, row_steps, extra,
                                default_launch(device) if launch is None else launch, folder / "train.log")
            export_checkpoint(folder / "run", folder / "export", force=True)
            if real is None:
                real = RealData.load(shards, split, clf)
            exported = load_export(folder / "export", device_t)
            report = evaluate_export(exported, shards, clf, num_samples=num_samples, split=split, device=device_t,
                                     seed=seed, real=real)
            write_report(report, report_json)
            save_panel(grid_panel(exported, list(range(8))), folder / "grid.png")
            bench = {"steps": row_steps, "overrides": extra, "classifier_sha256": clf.weights_sha256,
                     "train_seconds": round(seconds, 1), "images_per_s": images_per_second(folder / "run"),
                     "grid": str(folder / "grid.png"), "report": str(report_json),
                     # train_seconds covers only the steps after this one when a run was resumed
                     "resumed_from_step": resumed_from}
            bench_json.write_text(json.dumps(bench, indent=2) + "\n")
        else:
            log(f"[{row.name}] reusing {report_json}")
        for psi in truncations:
            psi_json = report_json if psi == 1 else folder / f"report_psi{psi:g}.json"
            report = _current_report(psi_json)
            if report is None:  # the same export, decoding z * psi; older reports re-measured
                if real is None:
                    real = RealData.load(shards, split, clf)
                if exported is None:
                    exported = load_export(folder / "export", device_t)
                report = evaluate_export(exported, shards, clf, num_samples=num_samples, split=split,
                                         device=device_t, seed=seed, real=real, truncation=psi)
                write_report(report, psi_json)
                save_panel(grid_panel(exported, list(range(8)), truncation=psi),
                           folder / ("grid.png" if psi == 1 else f"grid_psi{psi:g}.png"))
            summary = summarise(row, report, bench)
            if psi != 1:
                summary.update(grid=str(folder / f"grid_psi{psi:g}.png"), report=str(psi_json))
            result.rows.append(summary)
            log(f"[{summary['name']}] conditional accuracy {_pct(summary['conditional_accuracy'])}, diversity "
                f"{_num(summary['intra_class_diversity'])}, FID {_num(summary['fid_training'])}")
    result.meta = {"preset": preset_name, "description": preset.description, "steps": steps,
                   "shards": str(shards), "split": split, "num_samples_per_class": num_samples, "seed": seed,
                   "feature_space": clf.feature_space, "classifier": str(classifier_dir),
                   "classifier_sha256": clf.weights_sha256, "truncations": truncations,
                   "seconds": round(time.perf_counter() - t_all, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"meta": result.meta, "rows": result.rows}, indent=2) + "\n")
    (out / "quality.md").write_text(quality_markdown(result))
    return result


def _current_report(path: Path) -> dict[str, Any] | None:
    """The report at ``path`` if it is of this evaluation's version; None when it is missing or older (an
    older one is measured again from the export)."""
    from bicogan_dist.evaluate.evaluation import REPORT_VERSION

    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return report if report.get("version") == REPORT_VERSION else None


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def quality_markdown(result: QualityResult) -> str:
    m = result.meta
    rows = result.rows
    ref = rows[0] if rows else {}
    lines = [f"# Quality benchmark: preset `{m['preset']}`", "",
             f"{m['description']}. {m['steps']} steps per row; evaluated on {m['split']} with "
             f"{m['num_samples_per_class']} generated faces per emotion, seed {m['seed']}.", "",
             f"Feature space: {m['feature_space']} (classifier sha256 {str(m['classifier_sha256'])[:12]}). "
             f"Ceilings and references, real data: classifier accuracy {_pct(ref.get('classifier_real_accuracy'))} "
             f"(averaged over emotions {_pct(ref.get('classifier_real_balanced_accuracy'))}: the ceiling of "
             f"conditional accuracy, which draws as many faces of every emotion), "
             f"diversity {_num(ref.get('intra_class_diversity_real'))}, FID vs Training "
             f"{_num(ref.get('fid_training_real'))}, per-emotion FID {_num(ref.get('per_class_fid_real'))}.", ""]
    header = ["row", "steps", "cond. acc.", "diversity", "pixel div.", "FID", "per-emotion FID", "encoder acc.", "transfer", "recon. MAE",
              "img/s", "train s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["name"], str(r["steps"]), _pct(r["conditional_accuracy"]), _num(r["intra_class_diversity"]),
            _num(r["pixel_diversity"]), _num(r["fid_training"]),
            _num(r["per_class_fid"]), _pct(r["encoder_accuracy"]), _pct(r["transfer_success"]),
            _num(r["reconstruction_mae"], 1), _num(r["images_per_s"], 0),
            ("+" if r.get("resumed_from_step") else "") + _num(r["train_seconds"], 0)]) + " |")
    if rows and rows[0]["conditional_accuracy_per_class"]:
        names = list(rows[0]["conditional_accuracy_per_class"])
        lines += ["", "Conditional accuracy per emotion:", "",
                  "| row | " + " | ".join(names) + " |", "|---|" + "|".join("---" for _ in names) + "|"]
        for r in rows:
            pc = r["conditional_accuracy_per_class"] or {}
            lines.append(f"| {r['name']} | " + " | ".join(_pct(pc.get(n)) for n in names) + " |")
        real_pc = ref.get("classifier_real_accuracy_per_class")
        if real_pc:
            lines.append("| real faces (the classifier's recall: the ceiling) | "
                         + " | ".join(_pct(real_pc.get(n)) for n in names) + " |")
    lines += ["", "Rows:", ""] + [f"- `{r['name']}`: {r['note'] or r['config']}"
                                  + (f" (`{' '.join(r['overrides'])}`)" if r["overrides"] else "") for r in rows]
    lines += ["", f"This call: {m['seconds']:.0f} s. Grids: `<out>/<row>/grid.png` (`grid_psi<psi>.png` "
              f"with truncation); reports: `<out>/<row>/report.md` (`report_psi<psi>.md`).",
              ""]
    return "\n".join(lines)
