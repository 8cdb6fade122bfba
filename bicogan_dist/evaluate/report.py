"""Evaluation report files of ``tools/evaluate.py`` / ``bicogan-evaluate``.

Flags are parsed in ``bicogan_dist/cli/evaluate.py``.

``python tools/evaluate.py EXPORT_DIR --shards DIR --classifier CLASSIFIER_DIR --out REPORT.json``
writes REPORT.json (every number), REPORT.md (a readable summary that names the feature
space) and REPORT_confusion.png (the confusion matrices, drawn with PIL so no plotting
library is needed).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def report_paths(out_json: str | Path) -> tuple[Path, Path, Path]:
    """REPORT.json → (REPORT.json, REPORT.md, REPORT_confusion.png)."""
    out = Path(out_json)
    if out.suffix.lower() != ".json":
        out = out.with_suffix(out.suffix + ".json") if out.suffix else out.with_suffix(".json")
    return out, out.with_suffix(".md"), out.with_name(f"{out.stem}_confusion.png")


def _fmt(v: Any, pct: bool = False, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _confusion_md(title: str, cm: list[list[int]], names: list[str], row_label: str, col_label: str) -> list[str]:
    header = [f"{row_label} \\ {col_label}", *names, "n"]
    rows = [[names[i], *[str(v) for v in row], str(sum(row))] for i, row in enumerate(cm)]
    return [f"**{title}** (rows: {row_label}, columns: {col_label})", "", *_table(header, rows), ""]


def markdown_summary(report: dict[str, Any]) -> str:
    """A human-readable page for one report; always states the feature space of FID/KID."""
    names = report["export"]["class_names"]
    s = report["settings"]
    split = s["split"]
    lines = [f"# Evaluation of {report['export'].get('path') or 'an export'}", "",
             f"Model kind `{report['export']['kind']}`, step {report['export'].get('step')}, z dim "
             f"{report['export']['z_dim']}; held-out split **{split}**; seed {s['seed']}; "
             f"{s['num_samples_per_class']} generated faces per emotion"
             + (f", drawn from z x {s['truncation']:g} (truncation: less variety, clearer emotions); "
                f"reconstruction and transfer decode E_z(x) x {s['truncation']:g}"
                if s.get("truncation", 1) != 1 else "") + ".", "",
             f"**Feature space of FID/KID:** {report['feature_space']}.", ""]
    clf = report["classifier"]
    acc_real = clf.get("accuracy_on_real") or {}
    sha = clf.get("weights_sha256")
    balanced = (clf.get("balanced_accuracy_on_real") or {}).get(split)
    lines += [f"The classifier (measuring stick) scores {_fmt(acc_real.get(split), True)} on real {split} faces"
              + (f" ({_fmt(balanced, True)} averaged over emotions: the ceiling to read conditional accuracy "
                 f"against, which draws as many faces of every emotion)" if balanced is not None
                 else ": the ceiling to read conditional accuracy against")
              + f". Classifier `{clf.get('path')}`"
              + (f", weights sha256 `{sha[:12]}`" if sha else "")
              + ": FIDs from other classifiers are in other feature spaces.", ""]

    lines += ["## Summary", ""]
    ca, enc, rec, tr = (report.get(k) for k in ("conditional_accuracy", "encoder_accuracy", "reconstruction",
                                                 "emotion_transfer"))
    rows = [["conditional accuracy of G(z, c)", _fmt(ca and ca["overall"], True)],
            [f"encoder emotion accuracy on {split}", _fmt(enc and enc["overall"], True)],
            [f"emotion transfer success on {split}", _fmt(tr and tr["overall"], True)],
            [f"reconstruction MAE on {split} (grey levels)", _fmt(rec and rec["mae_grey_levels"], digits=2)],
            [f"reconstruction MSE on {split} ([-1, 1])", _fmt(rec and rec["mse_model_range"], digits=4)]]
    lines += _table(["measure", "value"], rows) + [""]

    lines += ["## FID and KID", "", f"Generated: {report['generated']} faces"
              + (" with emotions in Training's class proportions" if report.get("generated_class_counts") else "")
              + f"; real: {', '.join(f'{k} {v}' for k, v in report['real_counts'].items())}. "
              "The real-vs-real row is the scale: a generator whose faces were indistinguishable from "
              "real ones would score about that.", ""]
    rows = []
    for key, value in report["fid"].items():
        k = report["kid"][key]
        rows.append([key.replace("_", " "), _fmt(value, digits=2), f"{k['mean']:.4f} ± {k['std']:.4f}"])
    lines += _table(["comparison", "FID", "KID (mean ± std)"], rows) + [""]

    per_class_rows = []
    for i, name in enumerate(names):
        per_class_rows.append([name, _fmt(ca and ca["per_class"][name], True),
                               _fmt(enc and enc["per_class"][name], True), _fmt(tr and tr["per_target"][name], True)])
    lines += ["## Per emotion", ""] + _table(["emotion", "conditional accuracy", f"encoder accuracy ({split})",
                                               "transfer success (as target)"], per_class_rows) + [""]
    lines += ["## Confusion matrices", ""]
    if ca:
        lines += _confusion_md("Conditional generation", ca["confusion_matrix"], names, "asked", "classified")
    if enc:
        lines += _confusion_md(f"Encoder on {split}", enc["confusion_matrix"], names, "true", "encoder")
    if tr:
        lines += _confusion_md(f"Emotion transfer on {split}", tr["confusion_matrix"], names, "target", "classified")
    lines += [f"Computed in {report['seconds']:.1f} s on {s['device']}. Classifier predictions average each face "
              f"and its mirror image.", ""]
    return "\n".join(lines)


def confusion_png(matrices: list[tuple[str, list[list[int]]]], names: list[str], cell: int = 44) -> Image.Image:
    """Row-normalised confusion matrices side by side: darker = more; each cell shows its row percentage."""
    font = ImageFont.load_default()
    n = len(names)
    left, top, gap = 70, 40, 30
    width = left + len(matrices) * (n * cell + gap + left // 2)
    height = top + n * cell + 60
    img = Image.new("L", (max(width, 200), height), 255)
    draw = ImageDraw.Draw(img)
    x0 = left
    for title, cm in matrices:
        arr = np.asarray(cm, dtype=np.float64)
        rows = arr.sum(1, keepdims=True)
        frac = np.divide(arr, rows, out=np.zeros_like(arr), where=rows > 0)
        draw.text((x0, 6), title, fill=0, font=font)
        for i in range(n):
            draw.text((x0 - left + 4, top + i * cell + cell // 2 - 5), names[i][:10], fill=0, font=font)
            draw.text((x0 + i * cell + 2, top + n * cell + 4), names[i][:7], fill=0, font=font)
            for j in range(n):
                v = frac[i, j]
                shade = int(round(255 * (1 - v)))
                box = (x0 + j * cell, top + i * cell, x0 + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
                draw.rectangle(box, fill=shade, outline=160)
                draw.text((box[0] + 6, box[1] + cell // 2 - 5), f"{100 * v:.0f}", fill=255 if v > 0.5 else 0, font=font)
        draw.text((x0, top + n * cell + 20), "rows: true/asked, columns: predicted", fill=0, font=font)
        x0 += n * cell + gap + left // 2 + left // 2
    return img


def write_report(report: dict[str, Any], out_json: str | Path) -> tuple[Path, Path, Path | None]:
    """Write REPORT.json, REPORT.md and (when there is any matrix) REPORT_confusion.png."""
    from bicogan_dist.imaging import save_png

    js, md, png = report_paths(out_json)
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(report, indent=2) + "\n")
    md.write_text(markdown_summary(report))
    names = report["export"]["class_names"]
    mats = [(title, report[key]["confusion_matrix"]) for key, title in
            (("conditional_accuracy", "G(z, c): asked vs classified"),
             ("encoder_accuracy", f"E on {report['settings']['split']}: true vs encoder"),
             ("emotion_transfer", "transfer: target vs classified")) if report.get(key)]
    if not mats:
        return js, md, None
    save_png(confusion_png(mats, names), png)
    return js, md, png


def summary_lines(report: dict[str, Any], written: Sequence[Path | None]) -> list[str]:
    """The two lines the evaluate command prints: headline numbers and files, then the feature space."""
    ca = report.get("conditional_accuracy")
    enc = report.get("encoder_accuracy")
    reference = report["fid"]["real_Training_vs_" + report["settings"]["split"]]
    files = ", ".join(str(p) for p in written if p is not None)
    return [f"conditional accuracy {_fmt(ca and ca['overall'], True)}, FID vs Training "
            f"{report['fid']['generated_vs_Training']:.2f} (real reference {reference:.2f}), encoder accuracy "
            f"{_fmt(enc and enc['overall'], True)}; wrote {files}",
            f"feature space: {report['feature_space']}"]
