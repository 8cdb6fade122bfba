"""The run folder and its checkpoints: atomic writes, ``latest``, rotation.

Layout of one run::

    runs/<name>/config.yaml                  resolved config
    runs/<name>/tb/                          TensorBoard events (rank 0)
    runs/<name>/samples/step-XXXXXXXX.png    sample grids
    runs/<name>/checkpoints/checkpoint-XXXXXXXX/
        ge.safetensors d.safetensors         trained units (or the DeepSpeed engine's folders)
        ema.safetensors                      EMA of G
        optim.pt                             optimizer + GradScaler states (tensors only)
        rng-rank<R>.pt                       each rank's torch RNG state
        state.json                           step, epoch, world size — written last

Every rank writes into ``checkpoint-XXXXXXXX.tmp`` and rank 0 renames it only after all
ranks are done, so a checkpoint interrupted mid-write is never taken for a good one.
Nothing here unpickles: tensors come from safetensors or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8})$")
STATE_FILE = "state.json"


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with state.json), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def resolve_checkpoint(resume: str, run_dir: str | Path) -> Path | None:
    """``latest`` → newest complete checkpoint of the run (None if there is none); else a path.

    A path may name a checkpoint folder or a run folder (then its newest checkpoint).
    """
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise CheckpointError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}) nor a run folder with checkpoints")


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())


def begin(run_dir: str | Path, step: int, create: bool = False) -> Path:
    """The temporary folder a checkpoint is written into; rank 0 passes ``create`` to make it afresh."""
    tmp = checkpoint_root(run_dir) / (checkpoint_name(step) + ".tmp")
    if create:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict[str, Any], keep: int) -> Path:
    """Rank 0, after every rank has written: state.json last, rename into place, drop old ones."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(tmp.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_incomplete(run_dir: str | Path) -> None:
    """Delete leftovers of interrupted writes (``*.tmp``)."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for p in root.glob("checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
