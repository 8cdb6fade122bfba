"""The paper's augmentation table, measured: ``tools/ablate_augmentations.py`` / ``bicogan-ablate``.

Flags are parsed in ``bicogan_dist/cli/ablate.py``, which calls :func:`run_ablation`.

The seed paper compared six imgaug augmentations for BiCoGAN on FER2013 by eye. This runs
the seven settings (``none`` plus the six) for the same number of steps with the real
trainer (a subprocess per setting, so each run is exactly what a user would launch),
exports each, evaluates each with the project's classifier, and prints the table with a
measured verdict beside the paper's.

Verdict rule (the main metric is FID vs real Training in the classifier's feature space,
lower is better; it measures image quality and diversity, which is what the paper judged):
with ``r = (FID_setting - FID_none) / FID_none``,

- ``same``   if ``|r| <= tolerance`` (default 0.10, i.e. within 10% of the baseline),
- ``better`` if ``r < -tolerance``,
- ``worse``  if ``r > tolerance``.

Conditional accuracy and encoder accuracy are reported beside it but do not enter the
verdict. One run per setting cannot separate small effects from seed noise: run the
baseline twice (``--baseline-repeats 2``) to see how far FID moves by chance, and pick
the tolerance at least that large.

Each setting lives in ``OUT/<name>/`` (``run/`` the training run, ``export/``, ``report.json``
+ ``.md`` + confusion PNG, ``train.log``). A setting whose report exists is reused, so an
interrupted ablation continues where it stopped (only with the same steps and overrides); a
report scored by another classifier (weights sha256) is re-evaluated from its export without
training again; ``--rerun`` starts afresh. ``ablation.md``/``.json`` cover the settings of the
latest call.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIGS = ROOT / "launch_configs" / "experiments"


@dataclass(frozen=True)
class Setting:
    name: str
    config: str  # experiment YAML stem
    paper: str  # the imgaug call the paper used
    paper_verdict: str  # relative to no augmentation


SETTINGS: tuple[Setting, ...] = (
    Setting("none", "aug_none", "—", "baseline"),
    Setting("affine_rotate", "aug_affine_rotate", "Affine(rotate=(-50, 30))", "better"),
    Setting("fliplr", "aug_fliplr", "Fliplr(1)", "same"),
    Setting("affine_shear", "aug_affine_shear", "Affine(shear=(0, 0.2))", "same"),
    Setting("crop", "aug_crop", "Crop(percent=(0, 0.2))", "worse"),
    Setting("gamma_contrast", "aug_gamma_contrast", "GammaContrast(2)", "worse"),
    Setting("affine_scale", "aug_affine_scale", 'Affine(scale={"x": (1.5, 1.0), "y": (1.5, 1.0)})', "worse"),
)
MAIN_METRIC = "fid_training"


class AblationError(RuntimeError):
    """A setting that failed to train, export or evaluate; the message names it and shows the log's tail."""


def verdict(value: float, baseline: float, tolerance: float) -> str:
    """better / same / worse for a lower-is-better metric, by relative change against the baseline."""
    if baseline == 0:
        return "same" if value == 0 else "worse"
    r = (value - baseline) / abs(baseline)
    if abs(r) <= tolerance:
        return "same"
    return "better" if r < 0 else "worse"


def train_setting(setting: Setting, run_dir: Path, shards: Path, steps: int, overrides: Sequence[str],
                  configs: Path, launch: Sequence[str], log_file: Path, timeout: float | None = None) -> None:
    """One training run as a subprocess (the quality benchmark's runner): ``[launch] -m bicogan_dist.train ...``."""
    from bicogan_dist.evaluate.quality import QualityError, train_run

    try:
        train_run(setting.name, configs / f"{setting.config}.yaml", run_dir, shards, steps, overrides, launch,
                  log_file, timeout)
    except QualityError as exc:
        raise AblationError(str(exc)) from exc


def run_ablation(shards: str | Path, classifier_dir: str | Path, steps: int, out_dir: str | Path,
                 tolerance: float = 0.10, overrides: Sequence[str] = (), names: Sequence[str] | None = None,
                 num_samples: int = 500, split: str | None = None, device: str = "cpu", seed: int = 0,
                 launch: Sequence[str] = (), configs: str | Path = DEFAULT_CONFIGS, rerun: bool = False,
                 baseline_repeats: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, export and evaluate every setting; write ``ablation.md`` and ``ablation.json`` in ``out_dir``."""
    import torch

    from bicogan_dist.evaluate.classifier import load_classifier
    from bicogan_dist.evaluate.evaluation import RealData, default_split, evaluate_export
    from bicogan_dist.evaluate.report import write_report
    from bicogan_dist.export import export_checkpoint, load_export

    if steps < 1:
        raise AblationError("--steps must be >= 1")
    shards, out, configs = Path(shards).resolve(), Path(out_dir).resolve(), Path(configs).resolve()
    chosen = [s for s in SETTINGS if names is None or s.name in names]
    unknown = set(names or []) - {s.name for s in SETTINGS}
    if unknown:
        raise AblationError(f"unknown setting(s) {sorted(unknown)}; choose from {[s.name for s in SETTINGS]}")
    if chosen and chosen[0].name != "none":
        chosen.insert(0, SETTINGS[0])  # verdicts need the baseline
    runs: list[tuple[Setting, str]] = []
    for s in chosen:
        runs.append((s, s.name))
        if s.name == "none":
            runs += [(s, f"none_repeat{k}") for k in range(2, baseline_repeats + 1)]
    device_t = torch.device(device)
    clf = load_classifier(classifier_dir, device_t)
    split = split or default_split(shards)
    real = None
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for setting, name in runs:
        folder = out / name
        report_json = folder / "report.json"
        if rerun and folder.exists():
            shutil.rmtree(folder)
        extra = list(overrides)
        if name != setting.name:  # a repeat of the baseline: another seed, same budget
            extra.append(f"train.seed={seed + int(name.rsplit('repeat', 1)[1]) - 1}")
        elif seed:
            extra.append(f"train.seed={seed}")
        report = json.loads(report_json.read_text()) if report_json.is_file() else None
        if report is not None:
            before = report.get("ablation", {})
            if before.get("steps") != steps or before.get("overrides") != extra:
                raise AblationError(f"{report_json} was made with steps={before.get('steps')} and overrides "
                                    f"{before.get('overrides')}, not steps={steps} and {extra}; pass --rerun to "
                                    f"replace it or choose another --out")
        t0, trained_seconds = time.perf_counter(), None
        if report is None:
            log(f"[{name}] training {steps} steps ({setting.config}.yaml)")
            train_setting(setting, folder / "run", shards, steps, extra, configs, launch, folder / "train.log")
            export_checkpoint(folder / "run", folder / "export", force=True)
        elif report.get("classifier", {}).get("weights_sha256") != clf.weights_sha256:
            # Same training, another measuring stick: FIDs in two feature spaces must not share a table.
            if not (folder / "export").is_dir():
                raise AblationError(f"{report_json} was scored with another classifier and {folder / 'export'} "
                                    f"is gone; pass --rerun to train this setting again")
            log(f"[{name}] re-evaluating the trained export with classifier {classifier_dir}")
            trained_seconds, report = before.get("seconds"), None
        else:
            log(f"[{name}] reusing {report_json}")
        if report is None:
            if real is None:
                real = RealData.load(shards, split, clf)
            exported = load_export(folder / "export", device_t)
            report = evaluate_export(exported, shards, clf, num_samples=num_samples, split=split, device=device_t,
                                     seed=seed, real=real)
            report["ablation"] = {"setting": setting.name, "steps": steps, "overrides": extra,
                                  "seconds": round(time.perf_counter() - t0, 1)}
            if trained_seconds is not None:  # keep the training's cost; this call only re-scored it
                report["ablation"].update(seconds=trained_seconds, reevaluation_seconds=report["ablation"]["seconds"])
            write_report(report, report_json)
            log(f"[{name}] done in {time.perf_counter() - t0:.0f} s: FID vs Training "
                f"{report['fid']['generated_vs_Training']:.2f}")
        ca, enc = report.get("conditional_accuracy"), report.get("encoder_accuracy")
        rows.append({"name": name, "setting": setting.name, "paper": setting.paper,
                     "paper_verdict": setting.paper_verdict,
                     "conditional_accuracy": ca["overall"] if ca else None,
                     "fid_training": report["fid"]["generated_vs_Training"],
                     "kid_training": report["kid"]["generated_vs_Training"]["mean"],
                     "encoder_accuracy": enc["overall"] if enc else None,
                     "seconds": report["ablation"].get("seconds"), "report": str(report_json)})
    baseline = next(r for r in rows if r["name"] == "none")
    repeats = [r for r in rows if r["setting"] == "none"]
    for r in rows:
        r["fid_change"] = (r[MAIN_METRIC] - baseline[MAIN_METRIC]) / baseline[MAIN_METRIC] \
            if baseline[MAIN_METRIC] else None
        if r["setting"] == "none":
            r["measured_verdict"] = ("baseline" if r["name"] == "none"
                                     else verdict(r[MAIN_METRIC], baseline[MAIN_METRIC], tolerance))
            r["agrees_with_paper"] = None
        else:
            r["measured_verdict"] = verdict(r[MAIN_METRIC], baseline[MAIN_METRIC], tolerance)
            r["agrees_with_paper"] = r["measured_verdict"] == r["paper_verdict"]
    result = {
        "steps": steps, "overrides": list(overrides), "tolerance": tolerance, "main_metric": "FID vs Training",
        "rule": (f"r = (FID - FID_none) / FID_none; same if |r| <= {tolerance:g}, better if r < -{tolerance:g}, "
                 f"worse if r > {tolerance:g} (FID vs Training in the FER classifier's feature space, lower is "
                 f"better)"),
        "baseline_spread": (max(abs(r["fid_change"]) for r in repeats) if len(repeats) > 1 else None),
        "feature_space": clf.feature_space, "split": split, "num_samples_per_class": num_samples, "seed": seed,
        "seconds": round(time.perf_counter() - t_all, 1), "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ablation.md").write_text(ablation_markdown(result))
    return result


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def ablation_markdown(result: dict[str, Any]) -> str:
    lines = ["# Augmentation ablation (the paper's table, measured)", "",
             f"BiCoGAN, {result['steps']} steps per setting"
             + (f", overrides `{' '.join(result['overrides'])}`" if result["overrides"] else "")
             + f"; evaluated on {result['split']} with {result['num_samples_per_class']} generated faces per emotion, "
               f"seed {result['seed']}.", "",
             f"**Verdict rule:** {result['rule']}. Conditional and encoder accuracy are shown but do not enter it.", "",
             f"**Feature space:** {result['feature_space']}.", ""]
    if result.get("baseline_spread") is not None:
        lines += [f"Baseline repeated with other seeds: FID moved by up to {100 * result['baseline_spread']:.1f}% "
                  f"by chance alone; a tolerance below that calls noise a verdict.", ""]
    header = ["augmentation", "paper (imgaug)", "paper verdict", "conditional acc.", "FID vs Training", "Δ FID",
              "encoder acc.", "measured verdict", "agrees"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in result["rows"]:
        agrees = "—" if r["agrees_with_paper"] is None else ("yes" if r["agrees_with_paper"] else "no")
        change = "—" if r["name"] == "none" or r["fid_change"] is None else f"{100 * r['fid_change']:+.1f}%"
        lines.append("| " + " | ".join([r["name"], r["paper"], r["paper_verdict"], _pct(r["conditional_accuracy"]),
                                         f"{r['fid_training']:.2f}", change, _pct(r["encoder_accuracy"]),
                                         r["measured_verdict"], agrees]) + " |")
    spent = sum(r.get("seconds") or 0 for r in result["rows"])
    lines += ["", f"Training and first evaluation of these settings: {spent:.0f} s; "
                  f"this call: {result['seconds']:.0f} s. Per-setting reports: `<out>/<setting>/report.md`.", ""]
    return "\n".join(lines)
