"""The one owner of the checkpoint layout: file names, atomic writes, ``latest``, rotation, save, load, read.

Layout of one run::

    runs/<name>/config.yaml                  resolved config
    runs/<name>/tb/                          TensorBoard events (rank 0)
    runs/<name>/samples/step-XXXXXXXX.png    sample grids
    runs/<name>/checkpoints/checkpoint-XXXXXXXX/
        ge.safetensors d.safetensors         trained units (DDP engine; DeepSpeed writes ge/ and d/ folders)
        ema.safetensors                      EMA of G
        optim.pt                             optimizer + GradScaler states (tensors only)
        rng-rank<R>.pt                       each rank's torch RNG state
        state.json                           step, epoch, world size, engine, model — written last

Every rank writes into ``checkpoint-XXXXXXXX.tmp`` (creating it if it cannot see rank 0's yet) and
rank 0 renames it only after all ranks are done, so a checkpoint interrupted mid-write is never
taken for a good one.

All ranks share one run folder (a filesystem every node mounts): :func:`check_shared_run_dir`
proves it at start with a marker file per rank; :func:`agree_on_resume` lets rank 0 alone resolve
``--resume`` and every rank confirm it sees that checkpoint; :func:`load_agreed` confirms every
rank loaded rank 0's step. Each ends with a collective, so a failure on one rank stops them all.
Nothing here unpickles: tensors come from safetensors or ``torch.load(weights_only=True)``,
and always onto the CPU first: under ``accelerate launch`` on CPU the device prints as
``cpu:0``, which safetensors and torch's storage restore both refuse; ``load_state_dict``
then copies into modules wherever they live.

Engines save and load their own units (``engine.save(folder)`` / ``engine.load(folder)``)
through the helpers here; the trainer, export and the ablation read checkpoints only
through this module.

Writing fails early and by name: :func:`check_writable` runs before any data is read (an
uncreatable or read-only run folder, or a full disk, stops the run with exit code 2), and a
write that fails during :func:`save` (``OSError`` such as ENOSPC, torch's path-less
``RuntimeError``, safetensors' own error) becomes a :class:`CheckpointWriteError` naming the
folder; the unfinished ``.tmp`` folder is removed and earlier checkpoints are untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bicogan_dist.train.engine_base import broadcast_text, ranks_where

if TYPE_CHECKING:
    from bicogan_dist.train.engine_base import Engine

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8})$")
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
EMA_FILE = "ema.safetensors"
OPTIM_FILE = "optim.pt"
UNITS: tuple[str, ...] = ("ge", "d")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resolved, read or trusted; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, lost permission); the message names the folder."""


#: What a failed write raises: OSError (ENOSPC, EDQUOT, EFBIG, EACCES, EIO), torch.save's RuntimeError (for
#: example "basic_ios::clear: iostream error" or "unexpected pos", with no path) and safetensors' own error.
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, SafetensorError)


def unit_file(unit: str) -> str:
    """The DDP engine's file of one trained unit (``ge`` or ``d``)."""
    return f"{unit}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


# ----------------------------------------------------------------------------- reading files safely
def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a dict of CPU tensors; a missing or unreadable file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def write_tensors(state: dict[str, torch.Tensor], path: str | Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))


def read_torch_tensors(path: str | Path, safe_globals: list | None = None) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU, with a message a user can act on.

    A file that holds anything but tensors and plain containers (a pickle that would run
    code, say) is refused with its name, not with torch's advice to retry unsafely.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        with torch.serialization.safe_globals(safe_globals or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: not a plain tensor file (it holds objects this project never writes); "
                              f"refusing to load it: do not trust this checkpoint") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch tensor file ({str(exc).splitlines()[0]})") from exc


def load_module(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Strict ``load_state_dict`` whose failure names the file and the first mismatching keys or shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = ([f"missing {missing[:4]}"] if missing else []) + ([f"unexpected {unexpected[:4]}"] if unexpected
                                                                  else []) + shapes[:4]
    if problems:
        raise CheckpointError(f"{where}: weights do not match the model of this config ({'; '.join(problems)})")
    module.load_state_dict(state)


# ----------------------------------------------------------------------------- finding checkpoints
def missing_files(folder: Path, for_resume: bool = True) -> list[str]:
    """Files ``folder`` lacks to resume from it (or, with ``for_resume=False``, to export its weights)."""
    try:
        state = read_state(folder)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return [STATE_FILE]
    if state.get("engine", "ddp") == "ddp":
        needed = [EMA_FILE, *(unit_file(u) for u in UNITS)] + ([OPTIM_FILE] if for_resume else [])
    else:
        needed = [EMA_FILE, *UNITS]
    return [name for name in needed if not (folder / name).exists()]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints that have a state.json (committed), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def resolve_checkpoint(resume: str, run_dir: str | Path, warn: bool = True, for_resume: bool = True) -> Path | None:
    """``latest`` → newest complete checkpoint of the run (None if there is none); else a path.

    ``latest`` skips, with a warning, committed checkpoints that lack a file (damaged by
    hand or by a full disk) and takes the previous complete one. A path may name a
    checkpoint folder (which must be complete) or a run folder (then its newest complete one).
    """
    if resume == "latest":
        return _newest_complete(run_dir, warn, for_resume)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        missing = missing_files(path, for_resume)
        if missing:
            raise CheckpointError(f"{resume}: the checkpoint is incomplete (missing {', '.join(missing)})")
        return path
    found = _newest_complete(path, warn, for_resume)
    if found:
        return found
    raise CheckpointError(f"{resume}: not a checkpoint folder (no {STATE_FILE}) nor a run folder with "
                          f"complete checkpoints")


def _newest_complete(run_dir: str | Path, warn: bool, for_resume: bool) -> Path | None:
    for folder in reversed(list_checkpoints(run_dir)):
        missing = missing_files(folder, for_resume)
        if not missing:
            return folder
        if warn:
            print(f"warning: skipping {folder}: incomplete (missing {', '.join(missing)})", file=sys.stderr,
                  flush=True)
    return None


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / STATE_FILE).read_text())


# ----------------------------------------------------------------------------- writing checkpoints
def check_writable(run_dir: str | Path) -> Path:
    """Create ``run_dir`` and write and remove a probe file in it, so a folder this run cannot write stops it at start.

    Every rank checks (each writes its RNG state into checkpoints), with a probe of its own name.
    Raises ConfigError ``log.run_dir: FOLDER is not writable: REASON`` (exit code 2).
    """
    run_dir = Path(run_dir)
    probe = run_dir / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"probe\n")
        probe.unlink()
    except OSError as exc:
        from bicogan_dist.config import ConfigError

        reason = exc.strerror or str(exc)
        if exc.filename and Path(exc.filename) != run_dir:
            reason += f" ({exc.filename})"
        raise ConfigError(f"log.run_dir: {run_dir} is not writable: {reason}; choose another log.run_dir, or free "
                          f"space or fix permissions there") from None
    return run_dir


def begin(run_dir: str | Path, step: int, create: bool = False) -> Path:
    """The temporary folder a checkpoint is written into; rank 0 passes ``create`` to make it afresh.

    Without ``create`` nothing is made: every rank then creates the folder itself before it writes
    (``mkdir(parents=True, exist_ok=True)`` in :func:`save`).
    """
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


def save(run_dir: Path, step: int, engine: Engine, G_ema: torch.nn.Module, state: dict[str, Any], keep: int) -> Path:
    """Write one whole checkpoint (every rank calls it): engine units, EMA, each rank's RNG, then state.json.

    Each phase ends with the ranks agreeing whether any of them failed to write (in place of a
    barrier), so all of them stop together with a CheckpointWriteError rather than wait for a
    rank that gave up; the ``.tmp`` folder is then removed and the previous checkpoint stays as it was.
    """
    tmp = begin(run_dir, step)
    final = tmp.with_name(tmp.name[: -len(".tmp")])

    def write_parts() -> None:
        # Every rank creates the folder it writes into: rank 0 made it on the shared filesystem, but a rank
        # whose view lags (or a node-local run_dir) must not fail with FileNotFoundError.
        tmp.mkdir(parents=True, exist_ok=True)
        engine.save(tmp)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / rng_file(engine.rank))
        if engine.is_main:
            write_tensors(G_ema.state_dict(), tmp / EMA_FILE)

    def write_state() -> None:
        commit(tmp, {"step": step, "world_size": engine.world_size, "engine": engine.name, **state}, keep=keep)

    _write_agreed(engine, tmp, lambda: begin(run_dir, step, create=True) if engine.is_main else None)
    _write_agreed(engine, tmp, write_parts)
    _write_agreed(engine, tmp, write_state if engine.is_main else lambda: None)
    return final


def _write_agreed(engine: Engine, tmp: Path, write: Callable[[], Any]) -> None:
    """Run this rank's ``write``, then learn whether any rank failed; if one did, every rank raises."""
    error: BaseException | None = None
    try:
        write()
    except WRITE_ERRORS as exc:
        error = exc
    failed = engine.all_reduce(torch.tensor([float(error is not None)], device=engine.device), op="max")
    if not float(failed[0]):
        return
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what the partial write took; never a committed checkpoint
    done = list_checkpoints(tmp.parent.parent)
    last = f"the last good checkpoint, {done[-1]}, is intact" if done else "no checkpoint of this run was completed"
    if error is None:
        cause = "another rank could not write its part"
    else:
        lines = str(error).strip().splitlines()
        cause = f"rank {engine.rank}: {lines[0] if lines else type(error).__name__}"
    raise CheckpointWriteError(f"{tmp.parent}: cannot write checkpoint {tmp.name[: -len('.tmp')]} ({cause}); the disk "
                               f"may be full or the folder no longer writable: free space or fix permissions there, "
                               f"then resume with --resume latest ({last})") from error


def _without_layout(section: Any) -> Any:
    """A model section without ``channels_last`` (a memory layout, not part of what was trained)."""
    return {k: v for k, v in section.items() if k != "channels_last"} if isinstance(section, dict) else section


def model_differences(saved: Any, model_section: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint's value, config's value)`` for each model key a resume would change.

    A checkpoint written before an option existed lacks its key; it is read as the networks it
    trained then (``networks.FIELDS_ADDED_LATER``), not as today's default. ``channels_last`` is a
    memory layout, not part of what was trained, and is never compared.
    """
    from bicogan_dist.models.networks import with_fields_added_later

    saved = _without_layout(with_fields_added_later(saved if isinstance(saved, dict) else {}))
    now = _without_layout(model_section)
    return [(k, saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def load(folder: Path, engine: Engine, G_ema: torch.nn.Module, model_section: dict[str, Any]) -> int:
    """Restore engine units, EMA and this rank's RNG from ``folder``; returns the step.

    The model section must equal the checkpoint's (a resumed run is the same experiment), except
    ``channels_last``: the saved tensors are contiguous whatever layout trained them; the error names
    each differing key (:func:`model_differences`). The engine must match too; a different process
    count resumes with a warning.
    """
    folder = Path(folder)
    state = read_state(folder)
    differences = model_differences(state.get("model"), model_section)
    if differences:
        from bicogan_dist.config import ConfigError, format_override

        listed = "; ".join(f"model.{k} (checkpoint: {saved!r}, config: {now!r})" for k, saved, now in differences)
        overrides = " ".join(format_override(f"model.{k}", saved) for k, saved, _ in differences)
        raise ConfigError(f"model: the config's model section differs from the checkpoint's ({folder}): {listed}; "
                          f"resume with the run's own settings, e.g. add {overrides}")
    if state.get("engine", "ddp") != engine.name:
        from bicogan_dist.config import ConfigError

        raise ConfigError(f"train.engine: checkpoint {folder} was written by {state.get('engine')}, "
                          f"this run uses {engine.name}")
    engine.load(folder)
    load_module(G_ema, read_tensors(folder / EMA_FILE), folder / EMA_FILE)
    rng_path = folder / rng_file(engine.rank)
    if rng_path.is_file() and state.get("world_size") == engine.world_size:
        rng = read_torch_tensors(rng_path)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    elif engine.is_main:
        print(f"warning: resuming a {state.get('world_size')}-process checkpoint on {engine.world_size} processes: "
              f"the data order differs from a straight run", flush=True)
    return int(state["step"])


# ----------------------------------------------------------------------------- every rank, one run folder
SHARED_FS_HINT = ("log.run_dir must be on a filesystem every node mounts at the same path (NFS, Lustre, GPFS, ...), "
                  "not a node-local disk: every rank writes its part of each checkpoint into one folder and every "
                  "rank reads it back on --resume")
#: How long rank 0 looks for the other ranks' marker files (an NFS client may cache a directory listing briefly).
SHARED_FS_WAIT_S = 5.0


def check_shared_run_dir(run_dir: str | Path, engine: Engine, wait_s: float = SHARED_FS_WAIT_S) -> None:
    """Stop at start, on every rank, unless all ranks see one run folder (the shared-filesystem check).

    Each rank writes a marker file named by a token of rank 0's; after a barrier rank 0 looks for all
    of them; every rank then learns the verdict and removes its own marker. Raises ConfigError (exit 2)
    naming the ranks rank 0 could not see.
    """
    if engine.world_size == 1:
        return
    from bicogan_dist.config import ConfigError

    run_dir = Path(run_dir)
    token = broadcast_text(os.urandom(6).hex() if engine.is_main else None, engine)
    name = f".shared-fs-{token}-rank{{}}"
    mine = run_dir / name.format(engine.rank)
    error: OSError | None = None
    try:
        mine.write_text(f"{socket.gethostname()} {os.getpid()}\n")
    except OSError as exc:
        error = exc
    failed = ranks_where(error is not None, engine)  # also the barrier: every marker is written
    if failed:
        raise ConfigError(f"log.run_dir: rank(s) {failed} cannot write into {run_dir}"
                          f"{f' ({error.strerror or error})' if error else ''}; {SHARED_FS_HINT}")
    verdict = None
    if engine.is_main:
        deadline = time.monotonic() + wait_s
        while True:
            os.listdir(run_dir)  # a fresh listing, not a cached lookup
            unseen = [r for r in range(engine.world_size) if not (run_dir / name.format(r)).exists()]
            if not unseen or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        verdict = json.dumps(unseen)
    unseen = json.loads(broadcast_text(verdict, engine))
    mine.unlink(missing_ok=True)
    if unseen:
        where = (f"; this rank (host {socket.gethostname()}) wrote {mine}" if engine.rank in unseen else "")
        raise ConfigError(f"log.run_dir: {run_dir} is not one folder shared by all ranks: rank 0 does not see the "
                          f"marker files of rank(s) {unseen}{where}. {SHARED_FS_HINT}")


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint every rank resumes from (this rank's path to it) and the step rank 0 read in it."""

    path: Path
    step: int


def agree_on_resume(resolve: Callable[[], Path | None], run_dir: str | Path, engine: Engine,
                    resume: str | None) -> ResumePoint | None:
    """Rank 0 runs ``resolve`` (the ``--resume`` rule); every rank gets its answer and confirms it can read it.

    Ranks never resolve ``latest`` on their own: a rank with a stale listing or a node-local run
    folder would start at step 0 with other weights and the job would hang later. The answer
    travels as the checkpoint's name inside ``run_dir`` (or its path, if outside) and its step; a
    rank that lacks any file of it stops every rank with a CheckpointError naming the ranks.
    An error in ``resolve`` (ConfigError, CheckpointError) is raised on every rank.
    """
    from bicogan_dist.config import ConfigError

    run_dir = Path(run_dir)
    payload = None
    if engine.is_main:
        try:
            found = resolve()
            if found is None:
                payload = json.dumps({"none": True})
            else:
                found = Path(found)
                inside = found.parent.resolve() == checkpoint_root(run_dir).resolve()
                where = {"name": found.name} if inside else {"path": str(found.resolve())}
                payload = json.dumps({**where, "step": int(read_state(found)["step"])})
        except (ConfigError, CheckpointError, OSError, ValueError, KeyError) as exc:
            payload = json.dumps({"error": str(exc), "config": isinstance(exc, ConfigError)})
            if engine.world_size == 1:
                raise
    answer = json.loads(broadcast_text(payload, engine))
    if "error" in answer:
        raise (ConfigError if answer["config"] else CheckpointError)(answer["error"])
    if answer.get("none"):
        return None
    path = checkpoint_root(run_dir) / answer["name"] if "name" in answer else Path(answer["path"])
    missing = missing_files(path) if path.is_dir() else [path.name]
    blind = ranks_where(bool(missing), engine)
    if blind:
        seen = f"does not see {path}" if not path.is_dir() else f"lacks {', '.join(missing)} in {path}"
        mine = f" (this rank, host {socket.gethostname()}, {seen})" if missing else ""
        raise CheckpointError(f"--resume {resume}: rank 0 resolved checkpoint {answer.get('name') or path} "
                              f"(step {answer['step']}) but rank(s) {blind} cannot see it{mine}; nothing was "
                              f"trained. {SHARED_FS_HINT}")
    return ResumePoint(path, int(answer["step"]))


def load_agreed(point: ResumePoint, engine: Engine, G_ema: torch.nn.Module, model_section: dict[str, Any]) -> int:
    """:func:`load` on every rank, then every rank confirms all of them loaded rank 0's step, or all stop.

    After DDP's one-time broadcast of the initial weights, each rank loads the checkpoint on its own;
    the weights are identical only if every rank loaded the same checkpoint: the ranks confirm the
    step, then a hash of G+E, D and the EMA against rank 0's.
    """
    from bicogan_dist.config import ConfigError

    step, error = -1, None
    try:
        step = load(point.path, engine, G_ema, model_section)
    except (ConfigError, CheckpointError, OSError) as exc:
        error = exc
    failed = ranks_where(error is not None, engine)
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"{point.path}: rank(s) {failed} could not load this checkpoint (see their error); "
                              f"nothing was trained. {SHARED_FS_HINT}")
    wrong = ranks_where(step != point.step, engine)
    if wrong:
        mine = f"; this rank loaded step {step}" if step != point.step else ""
        raise CheckpointError(f"{point.path}: rank(s) {wrong} loaded another step than rank 0's {point.step}"
                              f"{mine}: the ranks do not see the same checkpoint and would train different "
                              f"weights; nothing was trained. {SHARED_FS_HINT}")
    digest = weights_digest([engine.unwrap(u) for u in UNITS] + [G_ema])
    differ = ranks_where(digest != broadcast_text(digest if engine.is_main else None, engine), engine)
    if differ:
        raise CheckpointError(f"{point.path}: after loading step {step}, rank(s) {differ} hold other weights than "
                              f"rank 0: the ranks do not see the same checkpoint files; nothing was trained. "
                              f"{SHARED_FS_HINT}")
    return step


def weights_digest(modules: list[torch.nn.Module]) -> str:
    """A hash of every tensor of ``modules`` (names, dtypes, shapes, bytes): equal only for identical weights."""
    h = hashlib.blake2b(digest_size=16)
    for module in modules:
        for name, tensor in module.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading weights (export)
def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes, whichever engine saved the keys."""
    out = {}
    for key, value in state.items():
        key = key.replace("_orig_mod.", "")
        if key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def weights(folder: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of one checkpoint, whatever engine wrote it: ``{"ge", "d", "ema"}`` → state dicts on CPU.

    ``ge`` has keys ``G.*`` and ``E.*`` (the trainer's GeneratorEncoder), ``d`` is D and
    ``ema`` the EMA of G with G's own keys. The engine named in state.json decides how
    ``ge`` and ``d`` are read (DeepSpeed's ZeRO shards are consolidated without a process group).
    """
    folder = Path(folder)
    engine = read_state(folder).get("engine", "ddp")
    if engine == "ddp":
        out = {unit: read_tensors(folder / unit_file(unit)) for unit in UNITS}
    elif engine == "deepspeed":
        try:  # DeepSpeed is optional: imported only for checkpoints that need it
            from bicogan_dist.train.engine_deepspeed import consolidated_weights

            consolidated = consolidated_weights(folder)
        except ImportError as exc:
            raise CheckpointError(f"{folder} was written by the DeepSpeed engine; reading it needs DeepSpeed, "
                                  f"which cannot be imported here ({exc}); install the deepspeed extra "
                                  f"(pip install -e .[deepspeed])") from exc
        out = {k: {n: t.detach().cpu() for n, t in v.items()} for k, v in consolidated.items()}
        missing = set(UNITS) - set(out)
        if missing:
            raise CheckpointError(f"{folder}: the DeepSpeed checkpoint yielded no {sorted(missing)} weights")
    else:
        raise CheckpointError(f"{folder / STATE_FILE}: unknown engine {engine!r} (expected 'ddp' or 'deepspeed')")
    out["ema"] = read_tensors(folder / EMA_FILE)
    return {unit: strip_wrappers(sd) for unit, sd in out.items()}


# ----------------------------------------------------------------------------- one run per folder
class RunLock:
    """Rank 0's claim on a run folder: two runs writing one folder would overwrite each other's checkpoints.

    The lock file holds ``host pid``; a lock whose process is gone (same host) is stale and is
    taken over. A lock held by a live process, or by another host, stops the second run with a
    message naming the folder and the owner.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> "RunLock":
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text(errors="replace").strip() if self.path.exists() else ""
                if self._stale(owner):
                    self.path.unlink(missing_ok=True)
                    continue
                from bicogan_dist.config import ConfigError

                raise ConfigError(f"log.run_dir: {self.path.parent} is in use by another run (process {owner or '?'}); "
                                  f"wait for it, stop it, or choose another log.run_dir") from None
            except OSError as exc:  # checked at start, before any data is read or any step is trained
                from bicogan_dist.config import ConfigError

                raise ConfigError(f"log.run_dir: cannot write to {self.path.parent} ({exc.strerror}); choose a "
                                  f"writable folder") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(me + "\n")
            self.held = True
            return self
        raise CheckpointError(f"{self.path}: could not take the run folder's lock")

    @staticmethod
    def _stale(owner: str) -> bool:
        parts = owner.split()
        if len(parts) != 2 or not parts[1].isdigit():
            return True  # unreadable: left by a crash mid-write
        from bicogan_dist.atomic_dir import process_gone

        return process_gone(parts[0], int(parts[1]))  # another host's, or unsure: alive

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
